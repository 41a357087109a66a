"""The Cython + OpenMP backend: determinism, threads, dispatch, numerics at the edges."""

import importlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
from fastbn import nn
from fastbn.backends import cython_backend

try:
    KERNELS = [importlib.import_module(f"fastbn._cy.kernels_{isa}")
               for isa in ("baseline", "avx2")
               if isa == "baseline" or cython_backend.cpu_has_avx2()]
except ImportError as err:
    raise ImportError(
        f"fastbn's compiled kernels are missing ({err}): tests import the checkout, so build "
        "them in place with `pip install -e .`") from None
# Shapes above the kernels' serial threshold, in both layouts, with ragged blocks (and
# rows wider than one tile of channels, cut into even tiles of whole vectors).
SHAPES = [(5003, 37, 1), (12, 5, 2011), (3, 2, 40000), (701, 300, 1)]
# Rows wider than the gradient sums take at a time (4096 float32, 2048 float64 channels),
# in row tiles that two threads' shares cut in the middle.
WIDE_ROWS = [(300, 5000, 1), (20, 9000, 1)]


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint64 if a.dtype == np.float64 else np.uint32)


def _data(shape, dtype, seed=0, loc=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + loc).astype(dtype)


def test_cython_is_the_default_backend():
    assert fastbn.backends.available()[0] == "cython"
    assert fastbn.backends.get().name == "cython"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("kernels", KERNELS, ids=lambda k: k.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + WIDE_ROWS)
def test_same_bits_for_any_thread_count(kernels, dtype, shape, stream):
    x = _data(shape, dtype)
    scale = np.linspace(0.5, 2, shape[1])
    offset = np.linspace(-1, 1, shape[1]).astype(dtype)
    dy = _data(shape, dtype, seed=1, loc=0.0)
    results = []
    for threads in (1, 2, 16):
        out = np.empty_like(x)
        mean, var = kernels.train_forward(x, out, scale.astype(dtype), offset, 1e-3, False, stream,
                                          threads)
        wmean, wvar = kernels.moments(x, np.broadcast_to(
            np.linspace(0, 1, shape[0] * shape[2]).astype(dtype).reshape(shape[0], 1, shape[2]),
            shape), threads)
        dx = np.empty_like(x)
        sum_dy, sum_dy_xhat = kernels.backward(x, dy, dx, mean, var, scale, 1e-3, True, None,
                                               stream, threads)
        results.append([_bits(a) for a in (mean, var, out, wmean, wvar, dx, sum_dy,
                                           sum_dy_xhat)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_same_bits_through_the_environment():
    """FASTBN_NUM_THREADS and OMP_NUM_THREADS reach the kernels; the bits do not change."""
    code = ("import numpy as np, fastbn, sys; b = fastbn.backends.get('cython'); "
            "x = (np.arange(200003, dtype=np.float32) % 97).reshape(-1, 1) * 0.37 + 1e3; "
            "_, m, v = fastbn.nn.fused_batch_norm(x, [1.0], [0.0]); "
            "sys.stdout.write(f'{b.threads()} {m.view(np.uint32)[0]} {v.view(np.uint32)[0]}')")
    outputs = {}
    for threads in ("1", "2", "16"):
        env = dict(os.environ, FASTBN_NUM_THREADS=threads, OMP_NUM_THREADS="16")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=env)
        assert result.returncode == 0, result.stderr
        used, *bits = result.stdout.split()
        assert used == threads
        outputs[threads] = bits
    assert outputs["1"] == outputs["2"] == outputs["16"]


def test_isa_builds_agree():
    x = _data((4001, 19, 1), np.float32)
    ref_mean, ref_var = KERNELS[0].moments(x, None, 2)
    for kernels in KERNELS[1:]:
        mean, var = kernels.moments(x, None, 2)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
        np.testing.assert_allclose(var, ref_var, rtol=1e-5)


def test_dispatch_can_be_forced(monkeypatch):
    monkeypatch.setenv("FASTBN_CPU_DISPATCH", "baseline")
    backend = cython_backend.CythonBackend()
    assert backend.isa == "baseline" and not backend._wide
    monkeypatch.setenv("FASTBN_CPU_DISPATCH", "sse9")
    with pytest.raises(fastbn.backends.BackendUnavailable, match="FASTBN_CPU_DISPATCH"):
        cython_backend.CythonBackend()
    if len(KERNELS) > 1:
        monkeypatch.setenv("FASTBN_CPU_DISPATCH", "avx2")
        backend = cython_backend.CythonBackend()
        assert backend.isa == "avx2" and not backend._wide
        monkeypatch.setenv("FASTBN_CPU_DISPATCH", "avx512")
        if KERNELS[1].wide_enabled():
            assert cython_backend.CythonBackend()._wide
        else:
            with pytest.raises(fastbn.backends.BackendUnavailable, match="no AVX-512F"):
                cython_backend.CythonBackend()
    # Forced on a CPU without them, the avx2 build would die of an illegal instruction.
    monkeypatch.setattr(cython_backend, "cpu_has_avx2", lambda: False)
    for choice in ("avx2", "avx512"):
        monkeypatch.setenv("FASTBN_CPU_DISPATCH", choice)
        with pytest.raises(fastbn.backends.BackendUnavailable, match="lacks AVX2"):
            cython_backend.CythonBackend()
    monkeypatch.setenv("FASTBN_CPU_DISPATCH", "auto")
    assert cython_backend.CythonBackend().isa == "baseline"
    monkeypatch.undo()
    monkeypatch.delenv("FASTBN_CPU_DISPATCH", raising=False)
    assert cython_backend.CythonBackend()._wide == (len(KERNELS) > 1
                                                    and KERNELS[1].wide_enabled())


@pytest.mark.skipif(len(KERNELS) < 2 or not KERNELS[1].wide_enabled(),
                    reason="needs the avx2 build on a CPU with AVX-512F")
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_activation_bits_do_not_depend_on_the_vector_width(dtype):
    # The AVX-512 loops are the AVX2 loops' source compiled wider: the same bits.
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(70001) * s for s in (1e-6, 1, 30, 800)])
    x = x.astype(dtype)
    x[:4] = [np.nan, -0.0, np.inf, -np.inf]
    for kind in range(5):
        wide, narrow = np.empty_like(x), np.empty_like(x)
        KERNELS[1].activation(x, wide, kind, True, 2)
        KERNELS[1].activation(x, narrow, kind, False, 2)
        np.testing.assert_array_equal(wide.view(np.uint8), narrow.view(np.uint8))
    with pytest.raises(ValueError, match="wide"):
        KERNELS[0].activation(x, x.copy(), 2, True, 1)


@pytest.mark.parametrize("kernels", KERNELS)
def test_activation_kernel_arguments_are_checked(kernels):
    x = np.ones((4, 3, 1), np.float32)
    v = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="kind must be 0 to 4, got 5"):
        kernels.activation(x, x.copy(), 5, False, 1)
    with pytest.raises(ValueError, match="after must be -1 .* got 5"):
        kernels.normalize(x, x.copy(), v, v, v, False, False, 1, after=5)
    with pytest.raises(ValueError, match="after must be -1 .* got -2"):
        kernels.train_forward(x, x.copy(), v, v, 1e-3, False, False, 1, after=-2)
    with pytest.raises(ValueError, match="after must be"):
        kernels.infer_forward(x, x.copy(), v, v, v, v, 1e-3, False, False, 1, after=9)
    if not kernels.wide_enabled():
        with pytest.raises(ValueError, match="wide needs wide_enabled"):
            kernels.normalize(x, x.copy(), v, v, v, False, False, 1, after=2, wide=True)


def test_thread_settings(monkeypatch):
    backend = fastbn.backends.get("cython")
    monkeypatch.setenv("FASTBN_NUM_THREADS", "1")
    assert backend.threads() == 1
    monkeypatch.setenv("FASTBN_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="FASTBN_NUM_THREADS"):
        backend.threads()
    monkeypatch.delenv("FASTBN_NUM_THREADS")
    assert 1 <= backend.threads() <= len(os.sched_getaffinity(0))


def test_stream_threshold_settings(monkeypatch):
    monkeypatch.setenv("FASTBN_STREAM_BYTES", "12345")
    assert cython_backend.CythonBackend().stream_bytes == 12345
    monkeypatch.setenv("FASTBN_STREAM_BYTES", "-1")
    with pytest.raises(ValueError, match="FASTBN_STREAM_BYTES"):
        cython_backend.CythonBackend()
    monkeypatch.delenv("FASTBN_STREAM_BYTES")
    cache = cython_backend.last_level_cache_bytes()
    expected = cache // 2 if cache else cython_backend.DEFAULT_STREAM_BYTES
    assert cython_backend.CythonBackend().stream_bytes == expected


def _misaligned_like(a, shift):
    """An array like `a` whose data starts `shift` elements past an allocation's start."""
    raw = np.empty(a.size + 16, a.dtype)
    return raw[shift:shift + a.size].reshape(a.shape)


# Rows narrower and wider than a cache line and than the kernels' channel tile; runs
# shorter and longer than a line, and ragged.
STREAM_SHAPES = [(301, 7, 1), (97, 64, 1), (9, 1500, 1), (6, 3, 5), (5, 4, 301), (2, 3, 4133)]


@pytest.mark.parametrize("kernels", KERNELS, ids=lambda k: k.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", STREAM_SHAPES)
def test_streamed_outputs_match_plain_stores(kernels, dtype, shape):
    """Non-temporal stores change where values go, not what they are: every elementwise
    kernel, any alignment of the output, with and without weights."""
    x = _data(shape, dtype)
    dy = _data(shape, dtype, seed=1, loc=0.0)
    c = shape[1]
    vectors = [np.linspace(lo, hi, c).astype(dtype) for lo, hi in ((-1, 1), (0.5, 2), (-2, 3),
                                                                   (1, 1.5))]
    scale, offset = np.linspace(0.5, 2, c), np.linspace(-1, 1, c).astype(dtype)
    weights = np.linspace(0, 2, shape[0] * shape[2]).astype(dtype).reshape(shape[0], 1, shape[2])
    mean, var = kernels.moments(x, None, 1)

    def run(stream, out):
        kernels.normalize(x, out[0], *vectors[:3], True, stream, 2)
        kernels.train_forward(x, out[1], scale.astype(dtype), offset, 1e-3, False, stream, 2)
        kernels.grad_input(x, dy, out[2], *vectors, weights, stream, 2)
        sums = kernels.backward(x, dy, out[3], mean, var, scale, 1e-3, True, None, stream, 2)
        return [o.copy() for o in out] + list(sums)

    plain = run(False, [np.empty_like(x) for _ in range(4)])
    for shift in (0, 1, 3):
        streamed = run(True, [_misaligned_like(x, shift) for _ in range(4)])
        for p, q in zip(plain, streamed):
            # The same formulas; only the compiler's choice of fused multiply-adds may
            # differ between the two loops.
            np.testing.assert_allclose(q, p, rtol=4 * np.finfo(dtype).eps,
                                       atol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("kernels", KERNELS, ids=lambda k: k.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", STREAM_SHAPES + [(701, 300, 1), (40, 64, 1)])
def test_same_bits_wherever_the_arrays_start(kernels, dtype, shape):
    """Where the input and the output start moves where the loops switch from their
    heads to whole vectors, not what they compute."""
    x0 = _data(shape, dtype)
    dy0 = _data(shape, dtype, seed=1, loc=0.0)
    c = shape[1]
    m, k, b, a = (np.linspace(lo, hi, c).astype(dtype)
                  for lo, hi in ((-1, 1), (0.5, 2), (-2, 3), (1, 1.5)))
    scale = np.linspace(0.5, 2, c)
    mean, var = kernels.moments(x0, None, 1)

    def run(x_shift, out_shift):
        x, dy = _misaligned_like(x0, x_shift), _misaligned_like(dy0, x_shift)
        x[...], dy[...] = x0, dy0
        out = [_misaligned_like(x0, out_shift) for _ in range(5)]
        kernels.normalize(x, out[0], m, k, b, True, False, 2)
        kernels.infer_forward(x, out[1], m, var, scale, b, 1e-3, False, False, 2)
        stats = kernels.train_forward(x, out[2], scale.astype(dtype), b, 1e-3, False, False, 2)
        kernels.grad_input(x, dy, out[3], m, k, b, a, None, False, 2)
        sums = kernels.backward(x, dy, out[4], mean, var, scale, 1e-3, True, None, False, 2)
        return [_bits(r) for r in [*out, *stats, *sums, *kernels.moments(x, None, 2)]]

    expected = run(0, 0)
    for x_shift, out_shift in ((1, 1), (3, 3), (4, 4), (2, 7), (0, 5)):
        for got, want in zip(run(x_shift, out_shift), expected):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kernels", KERNELS, ids=lambda k: k.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("shape", [(301, 7, 1), (5, 4, 301)])
def test_statistics_vectors_in_the_data_type_or_float64(kernels, shape):
    """Inference and the backward take variance, scale (and mean) as float32 vectors for
    float32 data, converted exactly: the same bits as from float64 vectors of the same
    values.  Anything else is refused, naming the argument."""
    x = _data(shape, np.float32)
    dy = _data(shape, np.float32, seed=1, loc=0.0)
    c = shape[1]
    m, v, s, b = (np.linspace(lo, hi, c).astype(np.float32)
                  for lo, hi in ((2, 4), (0.5, 2), (-1, 1), (0, 1)))
    results = []
    for vec in (lambda a: a, lambda a: a.astype(np.float64)):
        y, dx = np.empty_like(x), np.empty_like(x)
        kernels.infer_forward(x, y, m, vec(v), vec(s), b, 1e-3, False, False, 2)
        sums = kernels.backward(x, dy, dx, vec(m), vec(v), vec(s), 1e-3, True, None, False, 2)
        results.append([_bits(a) for a in (y, dx, *sums)])
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)
    y = np.empty_like(x)
    with pytest.raises(TypeError, match="variance"):
        kernels.infer_forward(x, y, m, v.astype(np.float16), s, b, 1e-3, False, False, 2)
    with pytest.raises(ValueError, match="scale"):
        kernels.backward(x, dy, y, m, v, s[:-1], 1e-3, True, None, False, 2)
    with pytest.raises(TypeError, match="mean"):
        kernels.backward(x.astype(np.float64), dy.astype(np.float64), np.zeros(shape), m, v,
                         s, 1e-3, True, None, False, 2)


@pytest.mark.parametrize("kernels", KERNELS, ids=lambda k: k.__name__.rsplit("_", 1)[-1])
def test_kernels_refuse_arrays_of_other_ranks(kernels):
    """The kernels read the (N, C, M) data's third dimension and the vectors' first without
    bounds: other ranks are refused by name (a 2-D x was read as M = its row stride and
    crashed)."""
    x = _data((301, 7, 1), np.float32)
    flat, m = x[:, :, 0], np.ones(7, np.float32)
    m64, grid = m.astype(np.float64), np.ones((1, 7), np.float32)
    calls = [
        lambda a: kernels.moments(a, None, 2),
        lambda a: kernels.normalize(a, a.copy(), m, m, m, False, False, 2),
        lambda a: kernels.infer_forward(a, a.copy(), m, m, m, m, 1e-3, False, False, 2),
        lambda a: kernels.train_forward(a, a.copy(), m, m, 1e-3, False, False, 2),
        lambda a: kernels.grad_reductions(a, a.copy(), m64, 2),
        lambda a: kernels.grad_input(a, a.copy(), a.copy(), m, m, m, m, None, False, 2),
        lambda a: kernels.backward(a, a.copy(), a.copy(), m, m, m, 1e-3, True, None, False, 2),
    ]
    for call in calls:
        call(x)
        with pytest.raises(ValueError, match="x must have 3 dimensions, got 2"):
            call(flat)
    y = np.empty_like(x)
    with pytest.raises(ValueError, match="mean must have 1 dimensions, got 2"):
        kernels.infer_forward(x, y, grid, m, m, m, 1e-3, False, False, 2)
    with pytest.raises(ValueError, match="scale must have 1 dimensions, got 2"):
        kernels.train_forward(x, y, grid, m, 1e-3, False, False, 2)
    with pytest.raises(ValueError, match="mean must have 1 dimensions, got 2"):
        kernels.grad_reductions(x, x, grid.astype(np.float64), 2)
    with pytest.raises(ValueError, match="b must have 1 dimensions, got 2"):
        kernels.grad_input(x, x, y, m, m, grid, m, None, False, 2)
    with pytest.raises(ValueError, match="out must have 3 dimensions, got 2"):
        kernels.backward(x, x, y[:, :, 0], m, m, m, 1e-3, True, None, False, 2)


def _same_floats(got, want):
    """Equal bit for bit, NaN where NaN (whatever its payload)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(_bits16(got[~nan]), _bits16(want[~nan]))


def _bits16(a):
    return a.view({2: np.uint16, 4: np.uint32}[a.itemsize])


HALF_KERNELS = [k for k in KERNELS if k.f16c_enabled()]


@pytest.mark.skipif(not HALF_KERNELS, reason="no kernels build with float16 conversions here")
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100003])
def test_float16_conversions_match_numpy(n):
    """Exact widening, and rounding to nearest even as NumPy's astype: overflow to inf,
    subnormals, ties, signed zeros, NaN."""
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, -70000,
                        2.0 ** -24, 3 * 2.0 ** -25, 2.0 ** -25, 1e-9, 1 + 2.0 ** -11,
                        1 + 3 * 2.0 ** -11, -(1 + 2.0 ** -11), 6.1e-5, 0.1, 1 / 3],
                       np.float32)
    rng = np.random.default_rng(n)
    floats = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 20, n))).astype(np.float32)
    floats[:min(n, special.size)] = special[:n]
    with np.errstate(over="ignore"):
        halves = floats.astype(np.float16)
    for kernels in HALF_KERNELS:
        got = np.empty(n, np.float16)
        kernels.floats_to_halves(floats, got, 2)
        _same_floats(got, halves)
        wide = np.empty(n, np.float32)
        kernels.halves_to_floats(halves, wide, 2)
        _same_floats(wide, halves.astype(np.float32))


@pytest.mark.skipif(not HALF_KERNELS, reason="no kernels build with float16 conversions here")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(301, 13, 1), (70, 8, 1), (9, 1500, 1), (5, 4, 13),
                                   (3, 2, 40000)])
def test_float16_inference_kernel_is_the_float32_one_rounded(shape, relu):
    """The kernels' own float16 inference: the float32 kernel's bits on the same values,
    rounded to float16, for every value (tails of rows and runs, NaN, infinities, values
    that overflow float16 once normalized), with and without a scale."""
    x = _data(shape, np.float16)
    x.reshape(-1)[:6] = [np.nan, np.inf, -np.inf, 65504, -65504, 0.0]
    c = shape[1]
    mean, offset = np.linspace(2, 4, c, dtype=np.float32), np.linspace(-1, 1, c, dtype=np.float32)
    variance = np.linspace(1e-6, 3, c, dtype=np.float32)
    for kernels in HALF_KERNELS:
        for scale in (None, np.linspace(0.5, 2, c)):
            got = np.empty_like(x)
            kernels.infer_forward(x, got, mean, variance, scale, offset, 1e-3, relu, False, 2)
            want = np.empty(shape, np.float32)
            kernels.infer_forward(x.astype(np.float32), want, mean, variance, scale, offset,
                                  1e-3, relu, False, 2)
            with np.errstate(over="ignore"):
                _same_floats(got, want.astype(np.float16))


@pytest.mark.skipif(not HALF_KERNELS, reason="no kernels build with float16 conversions here")
# Runs cut into chunks, the last of one value: (2, 2, 32769).
@pytest.mark.parametrize("shape", SHAPES + [(3, 2, 70000), (2, 2, 32769), (640, 1500, 1)])
@pytest.mark.parametrize("loc", [3.0, 3000.0])
def test_float16_statistics_are_those_of_the_float32_values(shape, loc):
    """The kernels' float16 statistics (widened block by block): the same bits as from a
    float32 copy, in both layouts, ragged and chunked blocks, wide rows, and data far
    from zero (which the blocks reduce twice), on any thread count."""
    x = _data(shape, np.float16, loc=loc)
    for kernels in HALF_KERNELS:
        want = [_bits(a) for a in kernels.moments(x.astype(np.float32), None, 2)]
        for threads in (1, 2, 16):
            got = [_bits(a) for a in kernels.moments(x, None, threads)]
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
        with pytest.raises(TypeError, match="weights"):
            kernels.moments(x, np.ones(x.shape, np.float16), 2)


@pytest.mark.skipif(not HALF_KERNELS, reason="no kernels build with float16 conversions here")
@pytest.mark.parametrize("shape", [(640, 300, 1), (700, 13, 1), (300, 2, 49), (3, 2, 5000)])
def test_float16_statistics_of_blocks_reduced_twice(shape):
    """Blocks whose first value lies far from their mean are reduced again, centred on
    it: from float16 data too (widened whole, where the first pass widens a piece at a
    time), with the bits of a float32 copy."""
    x = _data(shape, np.float16)
    # The first row (or run) of every channel's first block.
    x[0] = 900.0
    for kernels in HALF_KERNELS:
        want = [_bits(a) for a in kernels.moments(x.astype(np.float32), None, 2)]
        for threads in (1, 2):
            got = [_bits(a) for a in kernels.moments(x, None, threads)]
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


@pytest.mark.skipif(not HALF_KERNELS, reason="no kernels build with float16 conversions here")
# (4, 5, 100000): channel by channel for float16 only (a channel's 800 KB fit in L2).
@pytest.mark.parametrize("shape", SHAPES + [(3, 2, 70000), (4, 5, 100000), (300, 2, 49),
                                   (9, 1500, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_float16_training_kernel_is_the_float32_one_rounded(shape, relu):
    """The kernels' own float16 training forward: the statistics of the float32 values
    (same bits) and the output the float32 kernel computes from them, rounded once, on
    any thread count, blocked or channel by channel."""
    x = _data(shape, np.float16)
    c = shape[1]
    scale = np.linspace(0.5, 2, c, dtype=np.float32)
    offset = np.linspace(-1, 1, c, dtype=np.float32)
    for kernels in HALF_KERNELS:
        want_y = np.empty(shape, np.float32)
        want = kernels.train_forward(x.astype(np.float32), want_y, scale, offset, 1e-3, relu,
                                     False, 2)
        with np.errstate(over="ignore"):
            want_y = want_y.astype(np.float16)
        for threads in (1, 2, 16):
            y = np.empty_like(x)
            got = kernels.train_forward(x, y, scale, offset, 1e-3, relu, True, threads)
            _same_floats(y, want_y)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(_bits(g), _bits(w))
        with pytest.raises(TypeError):
            kernels.train_forward(x, y, scale.astype(np.float16), offset, 1e-3, relu, False, 2)


@pytest.mark.skipif(not HALF_KERNELS, reason="no kernels build with float16 conversions here")
# (4, 5, 60000): channel by channel for float16 only (x and dy of a channel: 960 KB).
@pytest.mark.parametrize("shape", SHAPES + [(3, 2, 70000), (2, 2, 32769), (9, 1500, 1),
                                   (50, 13, 1), (300, 2, 49), (4, 5, 60000)])
@pytest.mark.parametrize("training", [True, False])
def test_float16_backward_kernel_is_the_float32_one_rounded(shape, training):
    """The kernels' own float16 backward: the gradient sums of the float32 values (same
    bits) and dx as the float32 kernel computes it, rounded once, on any thread count."""
    x = _data(shape, np.float16)
    dy = _data(shape, np.float16, seed=1, loc=0.0)
    c = shape[1]
    mean, var = (a.astype(np.float32) for a in HALF_KERNELS[0].moments(x, None, 1))
    scale = np.linspace(0.5, 2, c, dtype=np.float32)
    for kernels in HALF_KERNELS:
        want_dx = np.empty(shape, np.float32)
        want = kernels.backward(x.astype(np.float32), dy.astype(np.float32), want_dx, mean,
                                var, scale, 1e-3, training, None, False, 2)
        with np.errstate(over="ignore"):
            want_dx = want_dx.astype(np.float16)
        for threads in (1, 2, 16):
            dx = np.empty_like(x)
            got = kernels.backward(x, dy, dx, mean, var, scale, 1e-3, training, None, False,
                                   threads)
            _same_floats(dx, want_dx)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(_bits(g), _bits(w))
        with pytest.raises(TypeError, match="weights"):
            kernels.backward(x, dy, dx, mean, var, scale, 1e-3, training,
                             np.ones((shape[0], 1, shape[2]), np.float16), False, 2)


class _NoConversions:
    """The kernels, with float16 <-> float32 array conversions refused."""

    def __init__(self, kernels):
        self._kernels = kernels

    def __getattr__(self, name):
        if name in ("halves_to_floats", "floats_to_halves"):
            raise AssertionError(f"{name} called: float16 went through a float32 copy")
        return getattr(self._kernels, name)


def test_contiguous_float16_is_read_and_written_by_the_kernels(monkeypatch):
    """Every protocol call on C-contiguous float16 data without weights hands it to the
    kernels as it is: no float32 copy in, none out (where the build converts float16)."""
    backend = cython_backend.CythonBackend()
    if not backend._k.f16c_enabled():
        pytest.skip("this build converts float16 through NumPy")
    monkeypatch.setattr(backend, "_k", _NoConversions(backend._k))
    x3 = _data((40, 6, 7), np.float16)
    dy3 = _data(x3.shape, np.float16, seed=1, loc=0.0)
    v32 = np.linspace(0.5, 2, 6, dtype=np.float32)
    out = np.empty_like(x3)
    mean, var = backend.moments(x3)
    for y in (backend.normalize(x3, mean, v32, v32, out=out),
              backend.infer_forward(x3, v32, v32, v32, v32, 1e-3),
              backend.train_forward(x3, v32, v32, 1e-3, out=out)[0],
              backend.backward(x3, dy3, mean, var, v32, 1e-3, True)[0]):
        assert y.dtype == np.float16 and y.shape == x3.shape


def test_float16_conversions_only_where_built():
    for kernels in KERNELS:
        if not kernels.f16c_enabled():
            with pytest.raises(RuntimeError, match="float16"):
                kernels.halves_to_floats(np.ones(4, np.float16), np.empty(4, np.float32), 1)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("with_out", [False, True])
def test_float16_is_float32_arithmetic_rounded_once(data_format, layout, with_out):
    """float16 data (converted by the kernels where they can) gives the float32 results
    on the same values, rounded to float16: training, inference and the gradient."""
    shape = (64, 33, 41, 24) if data_format == "NHWC" else (16, 13, 67, 41)
    x = _data(shape, np.float16)
    dy = _data(x.shape, np.float16, seed=1, loc=0.0)
    if layout == "strided":
        x, dy = x[:, ::2], dy[:, ::2]
    c = x.shape[-1] if data_format == "NHWC" else x.shape[1]
    scale, offset = np.linspace(0.5, 2, c, dtype=np.float32), np.linspace(-1, 1, c,
                                                                          dtype=np.float32)
    mean, var = np.linspace(2, 4, c, dtype=np.float32), np.linspace(1, 3, c, dtype=np.float32)

    def outputs(a, g):
        kw = (lambda: {"out": np.empty(a.shape, a.dtype), "data_format": data_format}
              ) if with_out else (lambda: {"data_format": data_format})
        train = nn.fused_batch_norm(a, scale, offset, **kw())
        infer = nn.fused_batch_norm(a, scale, offset, mean, var, is_training=False, **kw())
        grad = nn.fused_batch_norm_grad(g, a, scale, train[1], var, **kw())
        axis = -1 if data_format == "NHWC" else 1
        shape = [1] * a.ndim
        shape[axis] = c
        normalized = nn.batch_normalization(
            a, mean.reshape(shape), var.reshape(shape), offset.reshape(shape),
            scale.reshape(shape), 1e-3,
            **({"out": np.empty(a.shape, a.dtype)} if with_out else {}))
        return [*train, infer[0], *grad, normalized]

    with fastbn.backends.use("cython"):
        halves = outputs(x, dy)
        floats = outputs(x.astype(np.float32), dy.astype(np.float32))
    for got, want in zip(halves, floats):
        _same_floats(got, want.astype(got.dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("with_scale", [True, False])
def test_fused_inference_matches_the_protocol_composition(dtype, with_scale):
    """The fused inference kernel computes the multiplier as per_channel_multiplier does."""
    backend = fastbn.backends.get("cython")
    x = _data((300, 7, 11), dtype)
    rng = np.random.default_rng(2)
    ct = np.float64 if dtype == np.float64 else np.float32
    mean, offset = (rng.standard_normal(7).astype(ct) for _ in range(2))
    variance = (rng.random(7) + 0.1).astype(ct)
    scale = (rng.random(7) + 0.5).astype(ct) if with_scale else None
    fused = backend.infer_forward(x, mean, variance, scale, offset, 1e-3, relu=True)
    composed = fastbn.backends.base.Backend.infer_forward(backend, x, mean, variance, scale,
                                                          offset, 1e-3, relu=True)
    assert fused.dtype == x.dtype
    np.testing.assert_array_equal(_bits(fused.astype(ct)), _bits(composed.astype(ct)))


def _record_stream_flags(monkeypatch, backend):
    """A list that receives (kernel name, its `stream` argument) for each kernel call."""
    seen = []
    run = backend._run

    def spy(kernel, size, *args, **options):
        seen.append((kernel.__name__, args[-1]))
        return run(kernel, size, *args, **options)

    monkeypatch.setattr(backend, "_run", spy)
    return seen


def test_large_outputs_are_streamed_through_the_backend(monkeypatch):
    """Outputs of at least stream_bytes reach the kernels with stream=True; the values
    are the same either way."""
    backend = fastbn.backends.get("cython")
    x = _data((40, 6, 33), np.float32)
    seen = _record_stream_flags(monkeypatch, backend)
    results = {}
    with fastbn.backends.use("cython"):
        for threshold in (x.nbytes + 1, x.nbytes):
            monkeypatch.setattr(backend, "stream_bytes", threshold)
            results[threshold] = nn.fused_batch_norm(
                x, np.ones(6, np.float32), np.zeros(6, np.float32), data_format="NCHW")
    assert seen == [("train_forward", False), ("train_forward", True)]
    for p, q in zip(results[x.nbytes + 1], results[x.nbytes]):
        np.testing.assert_allclose(q, p, rtol=1e-6, atol=1e-6)


def test_outputs_written_in_place_are_not_streamed(monkeypatch):
    """An output written over its input (out=x, out=dy) is stored plainly, however large:
    its lines are in the cache already."""
    backend = fastbn.backends.get("cython")
    x = _data((40, 6, 33), np.float32)
    dy = _data(x.shape, np.float32, seed=1, loc=0.0)
    seen = _record_stream_flags(monkeypatch, backend)
    monkeypatch.setattr(backend, "stream_bytes", 1)
    ones, zeros = np.ones(6, np.float32), np.zeros(6, np.float32)
    with fastbn.backends.use("cython"):
        ref, mean, var = nn.fused_batch_norm(x, ones, zeros, data_format="NCHW")
        inplace = x.copy()
        y, _, _ = nn.fused_batch_norm(inplace, ones, zeros, data_format="NCHW", out=inplace)
        biased = var * (x.size // 6 - 1) / (x.size // 6)
        dref = nn.fused_batch_norm_grad(dy, x, ones, mean, biased, data_format="NCHW")[0]
        dx = nn.fused_batch_norm_grad(dy.copy(), x, ones, mean, biased, data_format="NCHW",
                                      out=None)[0]
        dy_inplace = dy.copy()
        nn.fused_batch_norm_grad(dy_inplace, x, ones, mean, biased, data_format="NCHW",
                                 out=dy_inplace)
    assert seen == [("train_forward", True), ("train_forward", False), ("backward", True),
                    ("backward", True), ("backward", False)]
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(dx, dref)
    np.testing.assert_array_equal(dy_inplace, dref)


def test_contention_guard_backs_off_to_one_thread_and_recovers():
    guard = cython_backend.ContentionGuard()
    group = ("train_forward", (4096, 64, 1), np.dtype(np.float32))
    slow = 0.001 * guard.SLOW * 1.5
    assert guard.threads(group, 2) == 2
    guard.record(group, 2, 0.001)
    guard.record(group, 2, 0.003)  # slower, but under SLOW x the best: nothing changes
    guard.record(group, 2, slow)  # one hiccup: nothing changes yet
    guard.record(group, 2, 0.001)
    assert guard.threads(group, 2) == 2
    for _ in range(guard.STRIKES):  # slow time after time: back off
        guard.record(group, 2, slow)
    backoff = guard.FIRST_BACKOFF
    assert [guard.threads(group, 2) for _ in range(backoff)] == [1] * backoff
    guard.record(group, 1, 1.0)  # calls on one thread are not judged
    assert guard.threads(group, 2) == 2  # then several threads are tried again
    guard.record(group, 2, slow)  # still slow: at once, twice the backoff
    assert [guard.threads(group, 2) for _ in range(2 * backoff)] == [1] * (2 * backoff)
    assert guard.threads(group, 2) == 2
    guard.record(group, 2, 0.0011)  # fast again: back to normal, backoff reset
    assert guard.threads(group, 2) == 2
    for _ in range(guard.STRIKES):
        guard.record(group, 2, slow)
    assert [guard.threads(group, 2) for _ in range(backoff + 1)] == [1] * backoff + [2]
    other = ("moments", (4096, 64, 1), np.dtype(np.float32))
    assert guard.threads(other, 2) == 2  # groups are independent
    for n in range(guard.MAX_GROUPS + 1):  # shapes that never repeat: bounded memory
        guard.record(("moments", (n, 1, 1), np.dtype(np.float32)), 2, 0.001)
    assert len(guard._groups) <= guard.MAX_GROUPS


def test_contention_guard_leaves_long_calls_on_several_threads():
    guard = cython_backend.ContentionGuard()
    group = ("train_forward", (802816, 64, 1), np.dtype(np.float32))
    guard.record(group, 2, guard.LONG)
    for _ in range(4 * guard.STRIKES):  # page-fault stalls, not contention
        guard.record(group, 2, 100 * guard.LONG)
    assert guard.threads(group, 2) == 2
    short = ("train_forward", (8, 64, 1), np.dtype(np.float32))
    guard.record(short, 2, guard.LONG / 2)
    for _ in range(guard.STRIKES):
        guard.record(short, 2, 100 * guard.LONG)
    assert guard.threads(short, 2) == 1


def test_kernel_calls_take_the_guards_thread_count(monkeypatch):
    backend = cython_backend.CythonBackend()
    monkeypatch.setattr(backend, "threads", lambda size=None: 2)
    seen = []

    def kernel(x, threads):
        seen.append(threads)
        return x

    x = np.zeros((64, 8, 1), np.float32)
    assert backend._run(kernel, x.size, x) is x
    for _ in range(backend.guard.STRIKES):
        backend.guard.record(backend.guard_group(kernel, x), 2, 1e9)
    backend._run(kernel, x.size, x)
    assert seen == [2, 1]


def test_threadpoolctl_sees_and_limits_the_kernels():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    backend = fastbn.backends.get("cython")
    nn.moments(np.ones((4, 2), np.float32), [0])  # the kernels' OpenMP runtime is loaded
    info = threadpoolctl.threadpool_info()
    assert any(pool["user_api"] == "openmp" for pool in info)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert backend.threads() == 1


def test_gil_is_released_while_kernels_run():
    x = np.ones((1 << 25, 1, 1), np.float32)
    kernels = KERNELS[-1]
    done = threading.Event()

    def work():
        for _ in range(3):
            kernels.moments(x, None, 1)
        done.set()

    count = 0
    thread = threading.Thread(target=work)
    thread.start()
    while not done.is_set():
        count += 1
    thread.join()
    # Holding the GIL through a ~100 ms kernel would leave this loop a handful of turns.
    assert count > 10000


# Every way the kernels cut threaded work, above the serial threshold: rows of two channel
# tiles, of tiles of normalization (wider than 1024), wider than the gradient's pieces
# (WIDE_ROWS), of few channels (the elementwise pass in stretches across rows), NCHW runs
# of 49 values, runs cut into chunks, and channels small enough to be normalized one at a
# time right after their statistics.
THREADED_GEOMETRIES = [((300, 257), "NHWC"), ((70, 1100), "NHWC"), ((20000, 7), "NHWC"),
                       ((64, 30, 7, 7), "NCHW"), ((2, 3, 40000), "NCHW"),
                       ((8, 16, 32, 32), "NCHW")] + [(s[:2], "NHWC") for s in WIDE_ROWS]


def _strided(a):
    """a's values, every other row of a larger array."""
    return np.repeat(a, 2, axis=0)[::2]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape, data_format", THREADED_GEOMETRIES)
def test_threaded_results_are_the_references(monkeypatch, dtype, shape, data_format):
    """The forward (with ReLU, and with given statistics) and the gradient (training and
    not) of data laid out contiguously or with strides, on two threads: the values of the
    NumPy reference."""
    monkeypatch.setenv("FASTBN_NUM_THREADS", "2")
    axis = 1 if data_format == "NCHW" else len(shape) - 1
    channels = shape[axis]
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    scale, offset = rng.random(channels) + 0.5, rng.standard_normal(channels)
    mean, variance = nn.moments(x.astype(np.float64), [a for a in range(len(shape)) if a != axis])
    tolerance = 2e-2 if dtype == np.float16 else 2e-5

    def results(x, dy):
        out = np.empty(shape, dtype)
        results = list(nn.fused_batch_norm(x, scale, offset, data_format=data_format,
                                           activation=nn.relu, out=out))
        results.append(nn.fused_batch_norm(x, scale, offset, mean + 0.5, variance * 2,
                                           is_training=False, data_format=data_format)[0])
        for training in (True, False):
            results += nn.fused_batch_norm_grad(dy, x, scale, mean, variance,
                                                data_format=data_format, is_training=training)
        return results

    with fastbn.backends.use("cython"):
        got = results(x, dy) + results(_strided(x), _strided(dy))
    with fastbn.backends.use("numpy"):
        want = results(x, dy)
    for g, w in zip(got, want + want):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=tolerance,
                                   atol=tolerance * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("kernels", KERNELS, ids=lambda k: k.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_runs_of_every_length(kernels, dtype):
    """Runs of 2..40 values, gathered several to a piece by the sums (every length of a
    run's tail after its vector moves and whole steps): the statistics and gradient sums
    of float64 arithmetic."""
    for m in range(2, 41):
        x = _data((9, 3, m), dtype)
        dy = _data((9, 3, m), dtype, seed=1, loc=0.0)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        mean, var = kernels.moments(x, None, 2)
        np.testing.assert_allclose(mean, x64.mean((0, 2)), rtol=1e-6)
        np.testing.assert_allclose(var, x64.var((0, 2)), rtol=1e-5)
        ref_mean = x64.mean((0, 2))
        sum_dy, sum_dy_xc = kernels.grad_reductions(x, dy, ref_mean, 2)
        np.testing.assert_allclose(sum_dy, dy64.sum((0, 2)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sum_dy_xc, (dy64 * (x64 - ref_mean[:, None])).sum((0, 2)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["outlier-first", "sorted", "offset", "constant"])
@pytest.mark.parametrize("layout", ["rows", "wide-rows", "runs", "short-runs"])
def test_statistics_stay_accurate_on_hard_data(backend, case, layout):
    rng = np.random.default_rng(7)
    n = 300_000
    x = rng.standard_normal(n) + 1e4
    if case == "outlier-first":
        x[::1024] = 1e4 + 1e3  # the first element of many blocks sits far out
    elif case == "sorted":
        x = np.sort(x)
    elif case == "offset":
        x[: n // 2] -= 5e3
    elif case == "constant":
        x[:] = 1e4 + 0.25
    x = x.astype(np.float32)
    # wide-rows: 300 channels, more than one tile of them (tiles of uneven data before);
    # short-runs: NCHW 7x7-like runs of 50, gathered several to a piece by the sums.
    data = {"rows": x.reshape(-1, 1), "wide-rows": x.reshape(-1, 300),
            "runs": x.reshape(1, 1, -1), "short-runs": x.reshape(-1, 3, 50)}[layout]
    axes = [0, 2] if layout in ("runs", "short-runs") else [0]
    mean, var = nn.moments(data, axes)
    x64 = data.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=tuple(axes)), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var(axis=tuple(axes)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fused_relu_in_the_kernel(backend, dtype):
    x = _data((64, 5, 6), dtype, loc=0.0)
    y, _, _ = nn.fused_batch_norm(x, np.ones(6), np.full(6, 0.1), activation=nn.relu)
    plain, _, _ = nn.fused_batch_norm(x, np.ones(6), np.full(6, 0.1))
    np.testing.assert_array_equal(y, np.maximum(plain, 0))
    yi, _, _ = nn.fused_batch_norm(x, np.ones(6), np.zeros(6), np.zeros(6), np.ones(6),
                                   is_training=False, activation=nn.relu)
    assert (yi >= 0).all()
    with pytest.raises(ValueError, match="activation must be None or one of fastbn's"):
        nn.fused_batch_norm(x, np.ones(6), np.zeros(6), activation=np.tanh)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["rows", "runs"])
def test_more_than_2_31_elements(layout):
    n = 3 * 715_827_885  # 2**31 + 7 elements, 8.6 GB of float32
    assert n > 2**31
    x = np.empty(n, np.float32)
    x.reshape(-1, 3)[:] = [0.0, 1.0, 2.0]
    data = x.reshape(-1, 1) if layout == "rows" else x.reshape(1, 1, -1)
    axes = [0] if layout == "rows" else [0, 2]
    mean, var = nn.moments(data, axes)
    np.testing.assert_allclose(mean, [1.0], rtol=1e-6)
    np.testing.assert_allclose(var, [2.0 / 3.0], rtol=1e-6)
    y, _, _ = nn.fused_batch_norm(data, [1.0], [0.0], epsilon=0.0,
                                  data_format="NHWC" if layout == "rows" else "NCHW", out=data)
    expected = (np.array([0.0, 1.0, 2.0]) - 1.0) / np.sqrt(2.0 / 3.0 + 1.001e-5)
    np.testing.assert_allclose(x[-6:], np.tile(expected, 2), rtol=1e-5)
    np.testing.assert_allclose(x[n // 2 - (n // 2) % 3:][:3], expected, rtol=1e-5)
