"""The Numba CUDA backend: availability, and device arrays in and out.

Run under Numba's simulator in CI (NUMBA_ENABLE_CUDASIM=1
FASTBN_TEST_BACKENDS=numba_cuda), and on a real GPU where one is at hand.
The backend-generic tests and the TF fixtures cover its numbers.
"""

import numpy as np
import pytest

import fastbn as fb
from fastbn import nn


@pytest.fixture
def cuda(backend):
    if backend.name != "numba_cuda":
        pytest.skip("device arrays need the numba_cuda backend")
    from numba import cuda as numba_cuda

    return numba_cuda


def _host(a):
    return a.copy_to_host()


def _data(shape, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def test_the_backend_says_why_it_is_not_available_here():
    reason = fb.backends.status()["numba_cuda"]
    if reason is None:
        assert fb.backends.get("numba_cuda").accepts_device_arrays
    else:
        assert "numba-cuda is not installed" in reason or "CUDA" in reason
    assert fb.backends.get("auto").name != "numba_cuda"  # auto never picks it for NumPy


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fused_batch_norm_on_device_arrays(cuda, data_format, dtype):
    x = _data((4, 3, 5), dtype=dtype)
    c = x.shape[1] if data_format == "NCHW" else x.shape[-1]
    d_x = cuda.to_device(x)
    y, mean, var = nn.fused_batch_norm(d_x, np.ones(c), np.zeros(c), data_format=data_format)
    assert fb.backends.is_device_array(y) and isinstance(mean, np.ndarray)
    assert y.dtype == dtype and tuple(y.shape) == x.shape
    ref, ref_mean, ref_var = nn.fused_batch_norm(x, np.ones(c), np.zeros(c),
                                                 data_format=data_format)
    tol = 2e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(_host(y), ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    d_out = cuda.device_array(x.shape, dtype)
    got, _, _ = nn.fused_batch_norm(d_x, np.ones(c), np.zeros(c), data_format=data_format,
                                    out=d_out)
    assert got is d_out
    np.testing.assert_allclose(_host(d_out), ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(_host(d_x), x)  # the input is untouched


@pytest.mark.parametrize("shape, data_format", [((64, 40), "NHWC"), ((4, 6, 33), "NCHW"),
                                                ((50, 7), "NHWC")])
def test_float16_device_arrays_are_computed_on_the_device(cuda, monkeypatch, shape,
                                                          data_format):
    x = _data(shape, dtype=np.float16)
    dy = _data(shape, seed=4, dtype=np.float16)
    c = shape[1] if data_format == "NCHW" else shape[-1]
    scale = np.linspace(0.5, 2, c).astype(np.float32)
    offset = np.linspace(-1, 1, c).astype(np.float32)
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)
    device_array = type(d_x)
    copies = []

    def counted(method):
        def call(*args, **kwargs):
            copies.append(method.__name__)
            return method(*args, **kwargs)
        return call

    monkeypatch.setattr(device_array, "copy_to_host", counted(device_array.copy_to_host))
    monkeypatch.setattr(cuda, "to_device", counted(cuda.to_device))
    y, mean, var = nn.fused_batch_norm(d_x, scale, offset, data_format=data_format)
    z, _, _ = nn.fused_batch_norm(d_x, scale, offset, mean, var, data_format=data_format,
                                  is_training=False, activation=nn.relu)
    dx, dscale, doffset = nn.fused_batch_norm_grad(d_dy, d_x, scale, mean, var,
                                                   data_format=data_format)
    moments = nn.moments(d_x, [0, 2] if data_format == "NCHW" else [0])
    assert copies == []  # no data went through the host
    monkeypatch.undo()
    for result in (y, z, dx):
        assert fb.backends.is_device_array(result) and result.dtype == np.float16
    with fb.backends.use("numpy"):  # float16 computed in float32 and rounded once
        ref = nn.fused_batch_norm(x, scale, offset, data_format=data_format)
        ref_z = nn.fused_batch_norm(x, scale, offset, ref[1], ref[2], data_format=data_format,
                                    is_training=False, activation=nn.relu)[0]
        ref_grad = nn.fused_batch_norm_grad(dy, x, scale, ref[1], ref[2],
                                            data_format=data_format)
        ref_moments = nn.moments(x, [0, 2] if data_format == "NCHW" else [0])
    half = dict(rtol=2e-3, atol=2e-3)  # a float16 rounding or two
    np.testing.assert_allclose(_host(y), ref[0], **half)
    np.testing.assert_allclose(_host(z), ref_z, **half)
    np.testing.assert_allclose(_host(dx), ref_grad[0], **half)
    for got, want in [(mean, ref[1]), (var, ref[2]), (dscale, ref_grad[1]),
                      (doffset, ref_grad[2]), *zip(moments, ref_moments)]:
        np.testing.assert_allclose(np.asarray(got, np.float32).ravel(),
                                   np.asarray(want, np.float32).ravel(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shift", [1, -1])
def test_device_out_overlapping_the_input(cuda, shift):
    buf = _data((41, 6))
    d_buf = cuda.to_device(buf)
    x, out = (d_buf[:-1], d_buf[1:]) if shift > 0 else (d_buf[1:], d_buf[:-1])
    x_values = _host(x)
    ref = nn.fused_batch_norm(x_values, np.ones(6), np.zeros(6))[0]
    y = nn.fused_batch_norm(x, np.ones(6), np.zeros(6), out=out)[0]
    assert y is out
    np.testing.assert_allclose(_host(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("op", ["relu_grad", "relu6_grad", "sigmoid_grad", "tanh_grad",
                                "elu_grad"])
def test_activation_grads_on_device_arrays(cuda, monkeypatch, dtype, op):
    y = _data((30, 7), seed=3, dtype=dtype) / 4
    y[0, :5] = [0, 6, -0.0, np.inf, 1]
    dy = _data((30, 7), seed=4, dtype=dtype)
    dy[1, :3] = [np.inf, np.nan, -1]
    y[1, :3] = [-1, -1, -1]
    with fb.backends.use("numpy"):
        args = (y, dy) if op in ("sigmoid_grad", "tanh_grad") else (dy, y)
        ref = getattr(nn, op)(*args)
    d_y, d_dy = cuda.to_device(y), cuda.to_device(dy)
    device_array = type(d_y)
    copies = []
    monkeypatch.setattr(device_array, "copy_to_host",
                        lambda *a, **k: copies.append(a) or pytest.fail("copied to the host"))
    grad = getattr(nn, op)

    def call(d_dy, d_y, **kwargs):
        return grad(*((d_y, d_dy) if op in ("sigmoid_grad", "tanh_grad") else (d_dy, d_y)),
                    **kwargs)

    got = call(d_dy, d_y)
    d_out = cuda.device_array(y.shape, dtype)
    assert call(d_dy, d_y, out=d_out) is d_out
    assert call(d_dy, d_y, out=d_dy) is d_dy  # in place
    with pytest.raises(ValueError, match="must be C-contiguous on the device"):
        call(cuda.to_device(_data((30, 14), dtype=dtype))[:, ::2], d_y)
    with pytest.raises(TypeError, match="must live where"):
        call(d_out, y)
    monkeypatch.undo()
    assert copies == []
    assert fb.backends.is_device_array(got) and got.dtype == dtype
    eps = np.finfo(dtype).eps  # float64 arithmetic here, the compute dtype's on the host
    for result in (got, d_out, d_dy):
        np.testing.assert_allclose(_host(result), ref, rtol=eps, atol=eps, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_activations_and_the_layer_keep_device_arrays_on_the_device(cuda, monkeypatch, dtype):
    x = _data((40, 6), seed=5, dtype=dtype)
    x[0, :3] = [-0.0, np.nan, 7]
    d_x = cuda.to_device(x)
    device_array = type(d_x)
    monkeypatch.setattr(device_array, "copy_to_host",
                        lambda *a, **k: pytest.fail("copied to the host"))
    results = {fn: fn(d_x) for fn in (nn.relu, nn.relu6, nn.sigmoid, nn.tanh, nn.elu)}
    layers = [fb.batch_norm(d_x, activation_fn=fn, scope=fn.__name__)
              for fn in (nn.relu6, nn.sigmoid, nn.tanh, nn.elu)]
    with pytest.raises(ValueError, match="x must be C-contiguous on the device"):
        nn.tanh(cuda.to_device(_data((40, 12), dtype=dtype))[:, ::2])
    monkeypatch.undo()
    eps = np.finfo(dtype).eps  # float64 arithmetic, rounded once
    with fb.backends.use("numpy"):
        for fn, got in results.items():
            assert fb.backends.is_device_array(got) and got.dtype == dtype
            want = fn(x)
            np.testing.assert_allclose(_host(got), want, rtol=2 * eps, atol=eps, equal_nan=True)
            np.testing.assert_array_equal(np.signbit(_host(got)[0, 0]), np.signbit(want[0, 0]))
    assert all(fb.backends.is_device_array(y) and y.dtype == dtype for y in layers)


def test_moments_and_gradients_on_device_arrays(cuda):
    x = _data((6, 4))
    dy = _data((6, 4), seed=1)
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)
    mean, var = nn.moments(d_x, [0])
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-5)
    dx, dscale, doffset = nn.fused_batch_norm_grad(d_dy, d_x, np.ones(4), mean, var)
    ref = nn.fused_batch_norm_grad(dy, x, np.ones(4), mean, var)
    np.testing.assert_allclose(_host(dx), ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale, ref[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(40, 5, 1), (3, 4, 70), (60, 40, 1)])
def test_fused_backward_gives_the_protocols_bits(cuda, backend, monkeypatch, shape, training,
                                                 weighted):
    x = _data(shape)
    dy = _data(shape, seed=5)
    c = shape[1]
    mean, var = x.mean((0, 2)), x.var((0, 2)).astype(np.float32)
    scale = np.linspace(0.5, 2, c).astype(np.float32)
    weights = None
    if weighted:
        weights = np.linspace(0, 1, shape[0] * shape[2]).reshape(shape[0], 1, shape[2])
    waits = []
    monkeypatch.setattr(backend, "_wait", lambda: waits.append(1) or cuda.synchronize())
    dx, sum_dy, sum_dy_xhat = backend.backward(cuda.to_device(x), cuda.to_device(dy), mean,
                                               var, scale, 1e-3, training, weights)
    assert len(waits) == 1  # the coefficients are computed on the device
    # Backend.backward: the sums, the coefficients on the host, then the input gradient.
    ref = fb.backends.base.Backend.backward(backend, x, dy, mean, var, scale, 1e-3, training,
                                            weights)
    np.testing.assert_array_equal(_host(dx), ref[0])
    np.testing.assert_array_equal(sum_dy, ref[1])
    np.testing.assert_array_equal(sum_dy_xhat, ref[2])


@pytest.mark.parametrize("kwargs", [dict(), dict(fused=False), dict(updates_collections=None),
                                    dict(is_training=False), dict(batch_weights=np.ones(4))])
def test_layer_on_device_arrays(cuda, kwargs):
    x = _data((4, 3, 2, 5))
    with fb.Graph().as_default():
        ref = fb.batch_norm(x, scale=True, data_format="NCHW", **kwargs)
    with fb.Graph().as_default():
        y = fb.batch_norm(cuda.to_device(x), scale=True, data_format="NCHW", **kwargs)
        fb.apply_updates()
        assert fb.get_variables_by_name("moving_mean")[0].numpy().shape == (3,)
    assert fb.backends.is_device_array(y)
    np.testing.assert_allclose(_host(y), ref, rtol=1e-5, atol=1e-5)


def test_tape_on_device_arrays(cuda):
    x = _data((5, 3))
    dy = _data((5, 3), seed=2)
    d_x = cuda.to_device(x)
    with fb.GradientTape() as tape:
        y = fb.batch_norm(d_x, scale=True, activation_fn=fb.nn.relu, scope="bn")
    gamma = fb.get_variables_by_name("gamma")[0]
    dx, dgamma = tape.gradient(y, [d_x, gamma], output_gradients=dy)
    with fb.Graph().as_default():
        with fb.GradientTape() as tape:
            y_ref = fb.batch_norm(x, scale=True, activation_fn=fb.nn.relu, scope="bn")
        ref = tape.gradient(y_ref, [x, fb.get_variables_by_name("gamma")[0]],
                            output_gradients=dy)
    np.testing.assert_allclose(_host(dx), ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma, ref[1], rtol=1e-4, atol=1e-5)


def test_device_arrays_reach_the_cuda_backend_from_any_selection(cuda):
    d_x = cuda.to_device(_data((4, 2)))
    with fb.backends.use("auto"):
        y, _, _ = nn.fused_batch_norm(d_x, np.ones(2), np.zeros(2))
    assert fb.backends.is_device_array(y)
    with fb.backends.use("numpy"):
        with pytest.raises(TypeError, match="numba_cuda"):
            nn.fused_batch_norm(d_x, np.ones(2), np.zeros(2))
    with pytest.raises(TypeError, match="where x lives"):
        nn.fused_batch_norm(d_x, np.ones(2), np.zeros(2), out=np.empty((4, 2), np.float32))


class _PackedArray:
    """What DirectLaunches reads of a Numba device array."""

    def __init__(self, pointer, shape):
        self.size = int(np.prod(shape))
        self.dtype = np.dtype(np.float32)
        self.device_ctypes_pointer = type("Pointer", (), {"value": pointer})()
        self.shape = shape
        self.strides = tuple(4 * int(np.prod(shape[i + 1:])) for i in range(len(shape)))


def test_direct_launches_pack_arguments_as_numba_does():
    # Runs anywhere: the launch itself is replaced by a recording (on a GPU, the test
    # below checks the bits of real launches).
    import ctypes

    from fastbn.backends.numba_cuda_backend import ARRAY, AS_IS, DirectLaunches

    direct = object.__new__(DirectLaunches)  # without cuda.core
    launched = []
    direct._compiled, direct._configs, direct._stream = {}, {}, "default stream"
    direct._config = lambda grid, block: ("config", grid, block)
    direct._launch = lambda stream, config, function, *params: launched.append(
        (stream, config, function, params))
    direct._compile = lambda name, args: ("compiled " + name,
                                          [ARRAY, ARRAY, ARRAY, ctypes.c_double, AS_IS])
    through_numba = []
    x, y = _PackedArray(1000, (2, 3, 4)), _PackedArray(2000, (2, 3, 4))
    args = (x, x, y, 0.5, True)  # x twice: a stand-in for an absent array
    for _ in range(2):
        direct("kernel", (4, 1), 32, args, lambda *a: through_numba.append(a))
    assert through_numba == [args]  # the first launch compiles, through Numba
    (stream, config, function, params), = launched
    assert (stream, config, function) == ("default stream", ("config", (4, 1), 32),
                                          "compiled kernel")
    # meminfo, parent, size, itemsize, data pointer, shape, strides (bytes)
    x_fields, y_fields = [(0, 0, 24, 4, p, 2, 3, 4, 48, 16, 4) for p in (1000, 2000)]
    assert tuple(params[:33]) == x_fields * 2 + y_fields
    assert isinstance(params[33], ctypes.c_double) and params[33].value == 0.5
    assert params[34] is True

    def refused(*launch):
        raise RuntimeError("no current context in this thread")

    direct._launch = refused  # a launch that fails goes through Numba
    direct("kernel", (4, 1), 32, args, lambda *a: through_numba.append(a))
    assert through_numba == [args, args]


def _numba_arrays():
    """Numba device arrays of many layouts on no memory (nothing reads their data), and
    a mapped one; skips where Numba's own device arrays cannot be made (no numba-cuda,
    or the simulator, whose arrays are others)."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0"):
        pytest.skip("the simulator's arrays are not Numba's device arrays")
    devicearray = pytest.importorskip("numba.cuda.cudadrv.devicearray")

    class NoMemory:
        device_ctypes_pointer = type("Pointer", (), {"value": 4096})()

    def array(shape, strides, dtype=np.float32):
        return devicearray.DeviceNDArray(shape, strides, dtype, gpu_data=NoMemory())

    mapped = np.zeros((2, 3, 4), np.float32).view(devicearray.MappedNDArray)
    mapped.device_setup(NoMemory())

    return [array((2, 3, 4), (48, 16, 4)), array((2, 3, 4), (4, 8, 24)),  # C, F
            array((2, 3, 4), (96, 32, 8)), array((2, 3, 4), (96, 32, 8), np.float64),
            array((2, 3, 4), (24, 8, 2), np.float16),  # strided; other dtypes
            array((1, 4), (16, 4)), array((1, 4), (0, 4)),  # C and F; broadcast
            array((3, 4), (0, 4)), array((4,), (4,)), array((4,), (0,)), mapped]


def test_launch_keys_tell_apart_what_numba_types_apart():
    from fastbn.backends.numba_cuda_backend import _argument_kind

    arrays = _numba_arrays()
    for a in arrays:
        for b in arrays:
            if _argument_kind(a) == _argument_kind(b):
                assert type(a) is type(b) and a._numba_type_ == b._numba_type_, (a, b)
    # All told apart but the two 2-D broadcasts, which Numba types alike.
    assert len({_argument_kind(a) for a in arrays}) == len(arrays) - 1
    assert _argument_kind(0.5) is float and _argument_kind(True) is bool


def test_device_arrays_are_told_from_others():
    arrays = _numba_arrays()

    class Foreign:  # such as a CuPy array
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (4096, False),
                                    "version": 3}

    class HostTensor:  # such as a PyTorch CPU tensor
        @property
        def __cuda_array_interface__(self):
            raise AttributeError("not on a GPU")

    assert all(fb.backends.is_device_array(a) for a in arrays)
    assert fb.backends.is_device_array(Foreign())
    assert not any(fb.backends.is_device_array(a) for a in (np.ones(2), [1.0], HostTensor()))
    assert all(fb.backends.as_numba_array(a) is a for a in arrays)


@pytest.mark.parametrize("shape, data_format", [((300, 40), "NHWC"), ((6, 5, 77), "NCHW"),
                                                ((50, 7), "NHWC")])
def test_direct_launches_give_the_bits_of_numbas_launches(cuda, backend, shape, data_format):
    if backend.direct_launches is None:
        pytest.skip("every kernel launches through Numba here")
    x = _data(shape)
    dy = _data(shape, seed=3)
    c = shape[1] if data_format == "NCHW" else shape[-1]
    scale = np.linspace(0.5, 2, c).astype(np.float32)
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)

    def run():
        y, mean, var = nn.fused_batch_norm(d_x, scale, np.ones(c), data_format=data_format)
        z, _, _ = nn.fused_batch_norm(d_x, scale, np.ones(c), mean, var,
                                      data_format=data_format, is_training=False)
        grads = nn.fused_batch_norm_grad(d_dy, d_x, scale, mean, var, data_format=data_format)
        return [_host(y), mean, var, _host(z), _host(grads[0]), grads[1], grads[2]]

    run()  # the first launch of each kind goes through Numba, which compiles it
    direct = run()
    compiled = backend.direct_launches._compiled
    assert compiled and all(entry is not False for entry in compiled.values())
    launches, backend.direct_launches = backend.direct_launches, None
    try:
        through_numba = run()
    finally:
        backend.direct_launches = launches
    for got, want in zip(direct, through_numba):
        np.testing.assert_array_equal(got, want)


def test_threads_calling_at_once_keep_to_their_own_scratch(cuda, backend):
    """Each thread has its own scratch and mapped buffers: calls from several threads at
    once give what each gives alone."""
    import threading

    if backend.simulated:
        pytest.skip("Numba's simulator cannot run launches from several threads at once")

    xs = [_data((40, 6), seed=seed) * (seed + 1) for seed in range(4)]
    alone = [nn.fused_batch_norm(cuda.to_device(x), np.ones(6), np.zeros(6)) for x in xs]
    got = [None] * len(xs)
    start = threading.Barrier(len(xs))

    def work(i):
        start.wait()
        for _ in range(3):
            got[i] = nn.fused_batch_norm(cuda.to_device(xs[i]), np.ones(6), np.zeros(6))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (y, mean, var), (y_alone, mean_alone, var_alone) in zip(got, alone):
        np.testing.assert_array_equal(_host(y), _host(y_alone))
        np.testing.assert_array_equal(mean, mean_alone)
        np.testing.assert_array_equal(var, var_alone)
