"""fastbn.nn on every backend: against float64 NumPy references, and its argument checks."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastbn as fb
from fastbn import nn

FLOATS = [np.float16, np.float32, np.float64]
RTOL = {np.float16: 2e-2, np.float32: 2e-5, np.float64: 1e-10}


def _data(shape, dtype=np.float32, loc=1.0, scale=2.0, seed=0):
    return (np.random.RandomState(seed).randn(*shape) * scale + loc).astype(dtype)


def _ref_moments(x, axes):
    x64 = x.astype(np.float64)
    return x64.mean(axis=tuple(axes)), x64.var(axis=tuple(axes))


shapes = hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=5)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, data=st.data(), dtype=st.sampled_from(FLOATS))
def test_moments_match_float64_reference(backend, shape, data, dtype):
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape)))
    x = _data(shape, dtype, seed=data.draw(st.integers(0, 1000)))
    mean, var = nn.moments(x, axes)
    ref_mean, ref_var = _ref_moments(x, axes)
    assert mean.dtype == dtype and mean.shape == ref_mean.shape
    np.testing.assert_allclose(mean, ref_mean, rtol=RTOL[dtype], atol=RTOL[dtype])
    np.testing.assert_allclose(var, ref_var, rtol=RTOL[dtype], atol=RTOL[dtype])


def test_moments_keepdims_and_negative_axes(backend):
    x = _data((3, 4, 5))
    mean, var = nn.moments(x, [0, -1], keep_dims=True)
    assert mean.shape == (1, 4, 1)
    mean2, _ = nn.moments(x, [0, 2], keepdims=True)
    np.testing.assert_array_equal(mean, mean2)
    with pytest.raises(ValueError, match="both"):
        nn.moments(x, [0], keep_dims=True, keepdims=True)
    with pytest.raises(ValueError, match="out of range"):
        nn.moments(x, [3])
    with pytest.raises(ValueError, match="twice"):
        nn.moments(x, [0, -3])
    with pytest.raises(TypeError, match="axes"):
        nn.moments(x, "0")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_weighted_moments_match_reference(backend, shape, data, dtype):
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1,
                              max_size=len(shape)))
    x = _data(shape, dtype)
    per_position = data.draw(st.booleans())
    wshape = [s if (per_position or i == 0) else 1 for i, s in enumerate(shape)]
    w = np.random.RandomState(1).uniform(0, 2, wshape)
    mean, var = nn.weighted_moments(x, axes, w)
    wb = np.broadcast_to(w, shape)
    total = wb.sum(axis=tuple(axes))
    ref_mean = (wb * x).sum(axis=tuple(axes)) / total
    centered = x - np.expand_dims(ref_mean, tuple(axes))
    ref_var = (wb * centered ** 2).sum(axis=tuple(axes)) / total
    np.testing.assert_allclose(mean, ref_mean, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)
    np.testing.assert_allclose(var, ref_var, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)


def test_weighted_moments_zero_weights_give_zero(backend):
    x = _data((4, 3))
    mean, var = nn.weighted_moments(x, [0], np.zeros((4, 1)))
    assert mean.tolist() == [0, 0, 0] and var.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="frequency_weights"):
        nn.weighted_moments(x, [0], np.ones(4))  # (4,) aligns with the channels, not the batch
    with pytest.raises(TypeError, match="frequency_weights"):
        nn.weighted_moments(x, [0], np.array(["a"]))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 5, 3), (2, 3, 4, 3), (2, 3, 2, 2, 3)])
def test_fused_batch_norm_training(backend, dtype, data_format, shape):
    x = _data(shape, dtype, loc=3.0)
    axis = 1 if data_format == "NCHW" else len(shape) - 1
    c = shape[axis]
    scale = np.linspace(0.5, 2.0, c).astype(np.float32)
    offset = np.linspace(-1.0, 1.0, c).astype(np.float32)
    y, mean, var = nn.fused_batch_norm(x, scale, offset, epsilon=0.01, data_format=data_format)
    axes = tuple(a for a in range(len(shape)) if a != axis)
    ref_mean, ref_var = _ref_moments(x, axes)
    n = x.size // c
    bshape = [1] * len(shape)
    bshape[axis] = c
    ref_y = ((x.astype(np.float64) - ref_mean.reshape(bshape)) / np.sqrt(ref_var.reshape(bshape)
             + 0.01) * scale.reshape(bshape) + offset.reshape(bshape))
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_allclose(y, ref_y, rtol=RTOL[dtype], atol=RTOL[dtype] * 5)
    np.testing.assert_allclose(mean, ref_mean, rtol=RTOL[dtype], atol=RTOL[dtype])
    np.testing.assert_allclose(var, ref_var * n / (n - 1), rtol=RTOL[dtype] * 5)


def test_fused_batch_norm_inference_and_average_factor(backend):
    x = _data((4, 2, 3, 5))
    scale, offset = np.full(5, 2.0), np.full(5, 0.5)
    mean, var = np.linspace(0, 1, 5), np.linspace(1, 2, 5)
    y, m, v = nn.fused_batch_norm(x, scale, offset, mean, var, epsilon=0.1, is_training=False)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 0.1) * 2.0 + 0.5, rtol=1e-5)
    np.testing.assert_array_equal(m, mean.astype(np.float32))
    _, bm, bv = nn.fused_batch_norm(x, scale, offset)
    _, am, av = nn.fused_batch_norm(x, scale, offset, mean, var, exponential_avg_factor=0.25)
    np.testing.assert_allclose(am, 0.75 * mean + 0.25 * bm, rtol=1e-6)
    np.testing.assert_allclose(av, 0.75 * var + 0.25 * bv, rtol=1e-6)
    with pytest.raises(ValueError, match="mean.*variance"):
        nn.fused_batch_norm(x, scale, offset, is_training=False)


def test_fused_epsilon_floor_is_tf1s(backend):
    x = _data((8, 3))
    ones, zeros = np.ones(3), np.zeros(3)
    tiny, _, _ = nn.fused_batch_norm(x, ones, zeros, epsilon=1e-9)
    floor, _, _ = nn.fused_batch_norm(x, ones, zeros, epsilon=1.001e-5)
    np.testing.assert_array_equal(tiny, floor)
    plain = nn.batch_normalization(x, x.mean(0), x.var(0), None, None, 1e-9)
    assert not np.array_equal(plain, floor)


def test_single_element_batch_has_zero_variance(backend):
    _, mean, var = nn.fused_batch_norm(np.array([[1.0, 2.0]], np.float32), [1, 1], [0, 0])
    assert var.tolist() == [0, 0] and mean.tolist() == [1, 2]


@pytest.mark.parametrize("dtype", FLOATS)
def test_out_buffer(backend, dtype):
    x = _data((4, 3, 2, 5), dtype)
    out = np.empty_like(x)
    y, _, _ = nn.fused_batch_norm(x, np.ones(5), np.zeros(5), out=out)
    assert y is out
    ref, _, _ = nn.fused_batch_norm(x, np.ones(5), np.zeros(5))
    np.testing.assert_array_equal(out, ref)
    out_nc = np.empty((4, 3, 2, 10), dtype)[..., ::2]  # a non-contiguous buffer works too
    y2 = nn.batch_normalization(x, 0.5, 2.0, None, None, 0.0, out=out_nc)
    assert y2 is out_nc
    np.testing.assert_allclose(out_nc, (x.astype(np.float64) - 0.5) / np.sqrt(2.0),
                               rtol=RTOL[dtype], atol=RTOL[dtype])
    inplace = x.copy()
    nn.fused_batch_norm(inplace, np.ones(5), np.zeros(5), out=inplace)
    np.testing.assert_array_equal(inplace, ref)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_non_contiguous_out_of_the_fused_ops(backend, dtype, data_format):
    """An out= buffer the kernels cannot write through is filled from their result."""
    x = _data((6, 4, 3, 5), dtype)
    c = x.shape[-1] if data_format == "NHWC" else x.shape[1]
    dy = _data(x.shape, dtype, loc=0.0, seed=1)
    ref, mean, var = nn.fused_batch_norm(x, np.ones(c), np.zeros(c), data_format=data_format)
    out = np.empty((6, 4, 3, 10), dtype)[..., ::2]
    y, _, _ = nn.fused_batch_norm(x, np.ones(c), np.zeros(c), data_format=data_format, out=out)
    assert y is out
    np.testing.assert_array_equal(out, ref)
    biased = var.astype(np.float64) * (x.size // c - 1) / (x.size // c)
    dref, _, _ = nn.fused_batch_norm_grad(dy, x, np.ones(c), mean, biased,
                                          data_format=data_format)
    dout = np.empty((6, 4, 3, 10), dtype)[..., 1::2]
    dx, _, _ = nn.fused_batch_norm_grad(dy, x, np.ones(c), mean, biased,
                                        data_format=data_format, out=dout)
    assert dx is dout
    np.testing.assert_array_equal(dout, dref)


@pytest.mark.parametrize("shift", [1, -1, 0], ids=["after", "before", "same"])
def test_out_overlapping_the_inputs(backend, shift):
    """An out= that overlaps x (or dy) gives what a separate buffer gives: written through
    where it is x itself (in place), computed aside and copied where it is shifted."""
    # Several work items and threads in the CPU kernels (the simulator is slow).
    rows, c = (300 if getattr(backend, "simulated", False) else 20000), 8
    buf = _data((rows + 1, c))
    x = buf[:-1] if shift >= 0 else buf[1:]
    out = x if shift == 0 else (buf[1:] if shift > 0 else buf[:-1])
    x_values = x.copy()
    dy = _data((rows, c), loc=0.0, seed=2)
    ref, mean, var = nn.fused_batch_norm(x_values, np.ones(c), np.zeros(c))
    y, _, _ = nn.fused_batch_norm(x, np.ones(c), np.zeros(c), out=out)
    assert y is out
    np.testing.assert_array_equal(y, ref)
    stats = (np.full(c, 0.5, np.float32), np.full(c, 2.0, np.float32))
    for op in ("inference", "batch_normalization"):
        buf[...] = np.concatenate([x_values, x_values[:1]]) if shift >= 0 else \
            np.concatenate([x_values[:1], x_values])
        if op == "inference":
            ref = nn.fused_batch_norm(x_values, np.ones(c), np.zeros(c), *stats,
                                      is_training=False)[0]
            y = nn.fused_batch_norm(x, np.ones(c), np.zeros(c), *stats, is_training=False,
                                    out=out)[0]
        else:
            ref = nn.batch_normalization(x_values, *stats, None, None, 1e-3)
            y = nn.batch_normalization(x, *stats, None, None, 1e-3, out=out)
        np.testing.assert_array_equal(y, ref)
    buf[...] = np.concatenate([x_values, x_values[:1]]) if shift >= 0 else \
        np.concatenate([x_values[:1], x_values])
    biased = var.astype(np.float64) * (rows - 1) / rows
    ref = nn.fused_batch_norm_grad(dy, x_values, np.ones(c), mean, biased)
    got = nn.fused_batch_norm_grad(dy, x, np.ones(c), mean, biased, out=out)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    dy_copy = dy.copy()
    got = nn.fused_batch_norm_grad(dy_copy, x_values, np.ones(c), mean, biased, out=dy_copy)
    np.testing.assert_array_equal(got[0], ref[0])  # in place over dy


def test_out_buffer_checks():
    x = _data((4, 3))
    with pytest.raises(ValueError, match="out must have the input's shape"):
        nn.fused_batch_norm(x, np.ones(3), np.zeros(3), out=np.empty((3, 4), np.float32))
    with pytest.raises(TypeError, match="out must have the input's dtype"):
        nn.fused_batch_norm(x, np.ones(3), np.zeros(3), out=np.empty((4, 3)))
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        nn.fused_batch_norm(x, np.ones(3), np.zeros(3), out=[0])
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        nn.fused_batch_norm(x, np.ones(3), np.zeros(3), out=ro)


def test_any_strides(backend):
    base = _data((6, 8, 10))
    x = base[::2, 1::2, ::-3]  # non-contiguous, negative strides
    assert not x.flags.c_contiguous
    y, mean, var = nn.fused_batch_norm(x, np.ones(x.shape[-1]), np.zeros(x.shape[-1]))
    yc, mc, vc = nn.fused_batch_norm(np.ascontiguousarray(x), np.ones(x.shape[-1]),
                                     np.zeros(x.shape[-1]))
    np.testing.assert_allclose(y, yc, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, mc, rtol=1e-6)
    n = x.size // x.shape[-1]
    _, biased = nn.moments(x, [0, 1])
    np.testing.assert_allclose(biased, vc * (n - 1) / n, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accurate_when_mean_dwarfs_std(backend, dtype):
    x = _data((64, 8, 8, 4), dtype, loc=1e4, scale=1.0, seed=3)
    ref_mean, ref_var = _ref_moments(x, (0, 1, 2))
    mean, var = nn.moments(x, [0, 1, 2])
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)
    y, _, _ = nn.fused_batch_norm(x, np.ones(4), np.zeros(4), epsilon=0.0)
    ref_y = (x.astype(np.float64) - ref_mean) / np.sqrt(ref_var + 1.001e-5)
    np.testing.assert_allclose(y, ref_y, atol=2e-3)
    bn = nn.batch_normalization(x, ref_mean, ref_var, None, None, 0.0)
    np.testing.assert_allclose(bn, (x.astype(np.float64) - ref_mean) / np.sqrt(ref_var),
                               atol=2e-3)


def test_batch_normalization_broadcast_layouts(backend):
    x = _data((3, 4, 2, 5))
    for shape in [(5,), (1, 4, 1, 1), (4, 1, 1), ()]:
        p = np.random.RandomState(2).uniform(0.5, 1.5, shape)
        y = nn.batch_normalization(x, p, p, p, p, 0.01)
        ref = (x.astype(np.float64) - p) / np.sqrt(p + 0.01) * p + p
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    mixed = np.random.RandomState(3).uniform(0.5, 1.5, (4, 1, 5))  # varies along two axes
    y = nn.batch_normalization(x, mixed, mixed, None, None, 0.01)
    np.testing.assert_allclose(y, (x - mixed) / np.sqrt(mixed + 0.01), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="broadcast"):
        nn.batch_normalization(x, np.ones(3), 1.0, None, None, 0.0)
    with pytest.raises(TypeError, match="mean and variance"):
        nn.batch_normalization(x, None, 1.0, None, None, 0.0)
    with pytest.raises(ValueError, match="variance_epsilon"):
        nn.batch_normalization(x, 0.0, 1.0, None, None, -1.0)


@pytest.mark.parametrize("bad,error", [([1, 2], ValueError), ("a", TypeError),
                                       (np.ones((2, 2)), ValueError)])
def test_fused_batch_norm_parameter_checks(bad, error):
    x = _data((4, 3))
    with pytest.raises(error, match="scale"):
        nn.fused_batch_norm(x, bad, np.zeros(3))
    with pytest.raises(ValueError, match="data_format"):
        nn.fused_batch_norm(x, np.ones(3), np.zeros(3), data_format="HWCN")
    with pytest.raises(ValueError, match="rank"):
        nn.fused_batch_norm(np.ones(3, np.float32), np.ones(3), np.zeros(3))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        nn.fused_batch_norm(np.ones((3, 3), np.int32), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="exponential_avg_factor"):
        nn.fused_batch_norm(x, np.ones(3), np.zeros(3), exponential_avg_factor=2.0)
    with pytest.raises(TypeError, match="is_training"):
        nn.fused_batch_norm(x, np.ones(3), np.zeros(3), is_training="no")
    with pytest.raises(ValueError, match="no elements"):
        nn.fused_batch_norm(np.zeros((0, 3), np.float32), np.ones(3), np.zeros(3))


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0, 3, 4), (2, 0, 4), (2, 3, 0),
                                   (2, 3, 2, 0), (2, 2, 0, 3)])
def test_empty_reductions_and_normalizations(backend, shape):
    # Nothing to reduce over: tf.nn.moments gives NaN (0 / 0), weighted_moments 0 (its
    # div_no_nan); an empty array normalizes to an empty array.  (An empty last axis
    # with others kept once divided by zero in the Cython kernels' block layout.)
    x = np.zeros(shape, np.float32)
    for axes in ([0], [x.ndim - 1], list(range(x.ndim))):
        kept = [a for a in range(x.ndim) if a not in axes]
        empty = any(x.shape[a] == 0 for a in axes)
        mean, var = nn.moments(x, axes)
        wmean, wvar = nn.weighted_moments(x, axes, np.ones(shape, np.float32))
        assert mean.shape == var.shape == wmean.shape == tuple(x.shape[a] for a in kept)
        if mean.size and empty:
            assert np.isnan(mean).all() and np.isnan(var).all()
            assert (wmean == 0).all() and (wvar == 0).all()
    assert nn.batch_normalization(x, 0.0, 1.0, None, None, 1e-3).shape == shape
    assert nn.sigmoid(x).shape == shape
    channels = shape[1]
    if channels == 0:
        return  # (refused: the fused op needs a channel)
    y, _, _ = nn.fused_batch_norm(x, np.ones(channels), np.zeros(channels), np.zeros(channels),
                                  np.ones(channels), data_format="NCHW", is_training=False)
    dx, dscale, doffset = nn.fused_batch_norm_grad(x, x, np.ones(channels), np.zeros(channels),
                                                   np.ones(channels), data_format="NCHW")
    assert y.shape == dx.shape == shape and (dscale == 0).all() and (doffset == 0).all()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_data_gives_nan_quietly(backend, value):
    # As TF: NaN (or the infinity itself) where the data is not finite, finite numbers in
    # the other channels, and no warning (pytest turns warnings into errors here).
    x = _data((6, 3), np.float32)
    x[2, 1] = value
    others = [0, 2]
    with warnings.catch_warnings():
        if getattr(backend, "simulated", False):
            # The simulator computes in NumPy scalars, which warn; a GPU does not.
            warnings.simplefilter("ignore", RuntimeWarning)
        y, mean, var = nn.fused_batch_norm(x, np.ones(3), np.zeros(3))
        z = nn.fused_batch_norm(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3),
                                is_training=False)[0]
        dx = nn.fused_batch_norm_grad(np.ones_like(x), x, np.ones(3), mean, var)[0]
    assert np.isnan(y[:, 1]).all() and np.isnan(var[1]) and not np.isfinite(mean[1])
    assert np.isfinite(y[:, others]).all() and np.isfinite([mean[others], var[others]]).all()
    np.testing.assert_array_equal(np.isfinite(z), np.isfinite(x))
    assert np.isnan(dx[:, 1]).all() and np.isfinite(dx[:, others]).all()


def test_nothing_the_caller_owns_is_modified(backend):
    x = _data((4, 3, 2, 5))
    params = [np.ones(5), np.zeros(5), np.full(5, 0.1), np.full(5, 2.0)]
    copies = [x.copy()] + [p.copy() for p in params]
    nn.fused_batch_norm(x, *params[:2])
    nn.fused_batch_norm(x, *params, is_training=False)
    nn.batch_normalization(x, params[2], params[3], params[1], params[0], 0.1)
    nn.moments(x, [0, 1, 2])
    nn.weighted_moments(x, [0, 1, 2], np.ones((4, 1, 1, 1)))
    for after, before in zip([x] + params, copies):
        np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("dtype", FLOATS)
def test_activations(backend, dtype):
    x = np.array([-2.0, -0.5, 0.0, 0.5, 7.0, -0.0, np.nan], dtype)
    # NaN passes; relu(-0.0) is TF's (and NumPy's): +0.0, but -0.0 in float16; elu's -0.0.
    zero = -0.0 if dtype == np.float16 else 0.0
    for fn, want in ((nn.relu, [0, 0, 0, 0.5, 7, zero, np.nan]),
                     (nn.relu6, [0, 0, 0, 0.5, 6, zero, np.nan]),
                     (nn.elu, [np.expm1(-2.0), np.expm1(-0.5), 0, 0.5, 7, -0.0, np.nan])):
        got = np.asarray(fn(x))
        assert got.dtype == dtype
        np.testing.assert_allclose(got, np.array(want, dtype), rtol=RTOL[dtype])
        np.testing.assert_array_equal(np.signbit(got[:6]), np.signbit(np.array(want[:6])))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(nn.sigmoid(x), 1 / (1 + np.exp(-x64)), rtol=RTOL[dtype])
    assert np.asarray(nn.sigmoid(np.array([-1000.0, 1000.0]))).tolist() == [0.0, 1.0]
    np.testing.assert_allclose(nn.tanh(x), np.tanh(x64), rtol=RTOL[dtype])
    for fn in (nn.relu, nn.relu6, nn.sigmoid, nn.tanh, nn.elu):
        assert np.asarray(fn(x)).dtype == dtype
    with pytest.raises(TypeError, match="features must be a floating-point array"):
        nn.relu("x")


def _activation_reference(kind, x):
    v = x.astype(np.longdouble)
    with np.errstate(over="ignore"):
        return {"sigmoid": lambda: 1 / (1 + np.exp(-v)), "tanh": lambda: np.tanh(v),
                "elu": lambda: np.where(v < 0, np.expm1(np.minimum(v, 0)), v)}[kind]()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "elu"])
def test_activations_within_ulps(backend, dtype, kind):
    # Every scale from subnormal to overflowing, near the points where exp's argument
    # reduction changes step (multiples of ln2 / 2), and where the results underflow.
    rng = np.random.default_rng(7)
    top = float(np.log(np.finfo(dtype).max)) * 1.1
    scales = np.geomspace(np.finfo(dtype).smallest_normal, top, 60)
    x = np.concatenate([rng.uniform(-1, 1, (60, 500)).ravel() * scales.repeat(500),
                        np.arange(-600, 601) * np.log(2) / 2 * 0.5,
                        np.linspace(-top, -top * 0.8, 400)])
    x = x[np.abs(x) < top].astype(dtype)
    x = x[:len(x) // 7 * 7].reshape(-1, 7)
    got = np.asarray(getattr(nn, kind)(x))
    want = _activation_reference(kind, x)
    rounded = want.astype(dtype)
    # float16 is computed in float32 and rounded once: at most one of its ulps (a tie
    # in float32 may round either way); float32 and float64 within 3 of theirs.
    ulps = np.abs(got.astype(np.longdouble) - want) / np.spacing(np.abs(rounded)).astype(
        np.longdouble)
    assert got.dtype == dtype
    assert np.nanmax(ulps) <= (1 if dtype == np.float16 else 3), \
        (kind, x.ravel()[np.nanargmax(ulps)], np.nanmax(ulps))
    # Saturation and underflow come out exact.
    ends = np.array([-np.inf, np.inf, -top, top], dtype)
    np.testing.assert_array_equal(np.asarray(getattr(nn, kind)(ends)),
                                  _activation_reference(kind, ends).astype(dtype))
    # The threaded kernels give each element the bits it gets alone.
    parts = [np.asarray(getattr(nn, kind)(x[i:i + 999])) for i in range(0, len(x), 999)]
    np.testing.assert_array_equal(got, np.concatenate(parts))


# Layouts through every way the normalization writes its output: rows in stretches, rows
# wider than a tile, runs a few at a time (7x7), long runs, runs channel by channel, and
# rows of 3 channels (the CUDA backend's flat kernel; its rows and runs kernels: the
# first and third).
NORMALIZATION_PATHS = [((64, 9, 9, 16), "NHWC"), ((40, 1300), "NHWC"), ((16, 24, 7, 7), "NCHW"),
                       ((2, 3, 150, 190), "NCHW"), ((8, 4, 64, 64), "NCHW"), ((50, 3), "NHWC")]
CUDA_PATHS = [NORMALIZATION_PATHS[i][0] for i in (0, 2, 5)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,data_format", NORMALIZATION_PATHS)
def test_activations_applied_by_the_normalizations_give_their_own_bits(
        backend, dtype, shape, data_format, monkeypatch):
    if backend.name == "numba_cuda":
        # Its rows, runs and flat kernels, on few rows (Numba's simulator is slow).
        if shape not in CUDA_PATHS:
            pytest.skip("the CUDA kernels' layouts are those of CUDA_PATHS")
        shape = (2,) + shape[1:]
    x = _data(shape, dtype, loc=0.5, scale=3.0, seed=8)
    channels = shape[1] if data_format == "NCHW" else shape[-1]
    scale = np.linspace(0.5, 2.0, channels).astype(np.float32)
    offset = np.linspace(-1.0, 1.0, channels).astype(np.float32)
    mean, variance = np.full(channels, 0.4, np.float32), np.full(channels, 2.5, np.float32)
    ct = np.float64 if dtype == np.float64 else np.float32
    vector_shape = [1] * len(shape)
    vector_shape[1 if data_format == "NCHW" else -1] = channels
    if hasattr(backend, "stream_bytes"):
        monkeypatch.setattr(backend, "stream_bytes", 1)  # (streamed, but for the activation)
    for fn in (nn.relu6, nn.sigmoid, nn.tanh, nn.elu):
        for training in (True, False):
            args = (x, scale, offset) + (() if training else (mean, variance))
            kwargs = dict(data_format=data_format, is_training=training)
            want = np.asarray(fn(nn.fused_batch_norm(*args, **kwargs)[0]))
            np.testing.assert_array_equal(
                np.asarray(nn.fused_batch_norm(*args, activation=fn, **kwargs)[0]), want)
            out = np.empty_like(x)
            assert nn.fused_batch_norm(*args, activation=fn, out=out, **kwargs)[0] is out
            np.testing.assert_array_equal(out, want)
            inplace = x.copy()
            nn.fused_batch_norm(inplace, *args[1:], activation=fn, out=inplace, **kwargs)
            np.testing.assert_array_equal(inplace, want)
        vectors = [v.astype(ct).reshape(vector_shape) for v in (mean, variance, offset, scale)]
        want = np.asarray(fn(nn.batch_normalization(x, *vectors, 1e-3)))
        np.testing.assert_array_equal(
            np.asarray(nn.batch_normalization(x, *vectors, 1e-3, activation=fn)), want)
    # Parameters varying along several axes (NumPy's broadcasting path).
    varying = np.linspace(0.5, 1.5, x.shape[0] * channels).astype(ct)
    varying = varying.reshape((x.shape[0],) + tuple(vector_shape[1:]))
    want = np.asarray(nn.elu(nn.batch_normalization(x, 0.0, 1.0, None, varying, 1e-3)))
    got = np.empty_like(x)
    nn.batch_normalization(x, 0.0, 1.0, None, varying, 1e-3, out=got, activation=nn.elu)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="activation must be None or one of fastbn's"):
        nn.batch_normalization(x, *vectors, 1e-3, activation=np.tanh)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_activations_of_strided_input_land_in_out(backend, dtype, data_format):
    # Strided data goes to the kernels as a copy (float16 as float32, the activation
    # applied after rounding): with out= the activated result is written there.
    x = _data((6, 3, 4, 5), dtype, loc=0.5, scale=3.0, seed=9)[::-2]
    assert not x.flags.c_contiguous
    channels = x.shape[1] if data_format == "NCHW" else x.shape[-1]
    scale, offset = np.linspace(0.5, 2.0, channels), np.linspace(-1.0, 1.0, channels)
    scale, offset = (v.astype(np.float64 if dtype == np.float64 else np.float32)
                     for v in (scale, offset))
    for fn in (nn.relu, nn.relu6, nn.sigmoid, nn.tanh, nn.elu):
        for training in (True, False):
            args = (x, scale, offset) + (() if training else (offset, scale))
            kwargs = dict(data_format=data_format, is_training=training, activation=fn)
            want = np.asarray(nn.fused_batch_norm(*args, **kwargs)[0])
            np.testing.assert_array_equal(want, np.asarray(fn(nn.fused_batch_norm(
                *args, data_format=data_format, is_training=training)[0])))
            out = np.empty(x.shape, dtype)
            assert nn.fused_batch_norm(*args, out=out, **kwargs)[0] is out
            np.testing.assert_array_equal(out, want)


def _laid_out(a, layout):
    """a's values in another memory layout: Fortran order, every other row of a larger
    array, or rows reversed."""
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "step":
        return np.repeat(a, 2, axis=0)[::2]
    if layout == "reversed":
        return a[::-1].copy()[::-1]
    return a


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=6),
       dtype=st.sampled_from(FLOATS), data_format=st.sampled_from(["NHWC", "NCHW"]),
       training=st.booleans(), layouts=st.tuples(*[st.sampled_from(["C", "F", "step",
                                                                      "reversed"])] * 2),
       out=st.sampled_from([None, "new", "over"]),
       activation=st.sampled_from([None, nn.relu, nn.relu6, nn.sigmoid, nn.tanh, nn.elu]),
       seed=st.integers(0, 1000))
def test_fused_ops_agree_with_the_reference_in_any_layout(
        backend, shape, dtype, data_format, training, layouts, out, activation, seed):
    # The forward (with an activation) and the gradient of data in any memory layout,
    # returned, written into a given array or written over the input: the NumPy
    # reference's values, and no other array of the caller's touched.
    channels = shape[1] if data_format == "NCHW" else shape[-1]
    ct = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(seed)
    scale, offset = (rng.random(channels) + 0.5).astype(ct), rng.standard_normal(channels)
    mean, variance = rng.standard_normal(channels).astype(ct), rng.random(channels) + 0.1
    offset, variance = offset.astype(ct), variance.astype(ct)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    stats = () if training else (mean, variance)

    def run():
        xc, dyc = _laid_out(x.copy(), layouts[0]), _laid_out(dy.copy(), layouts[1])
        dest = {None: None, "new": np.empty(shape, dtype), "over": xc}[out]
        y = nn.fused_batch_norm(xc, scale, offset, *stats, data_format=data_format,
                                is_training=training, activation=activation, out=dest)[0]
        dest = {None: None, "new": np.empty(shape, dtype), "over": dyc}[out]
        grads = nn.fused_batch_norm_grad(dyc, _laid_out(x, layouts[0]), scale, mean,
                                         variance, data_format=data_format,
                                         is_training=training, out=dest)
        if out != "over":
            np.testing.assert_array_equal(xc, x)
            np.testing.assert_array_equal(dyc, dy)
        return [np.asarray(y)] + [np.asarray(g) for g in grads]

    got = run()
    with fb.backends.use("numpy"):
        want = run()
    for g, w in zip(got, want):
        w = w.astype(np.float64)
        np.testing.assert_allclose(g, w, rtol=RTOL[dtype],
                                   atol=RTOL[dtype] * max(1.0, np.abs(w).max()))


def test_python_lists_are_float32():
    mean, var = nn.moments([[1.0, 2.0], [3.0, 4.0]], [0])
    assert mean.dtype == np.float32 and mean.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("dtype", FLOATS)
def test_big_endian_data_gives_the_native_results(backend, dtype):
    # As read from a big-endian file: TF converts such arrays to its native types.
    x = _data((4, 5, 6), dtype)
    dy = _data((4, 5, 6), dtype, seed=1)
    swapped = x.astype(x.dtype.newbyteorder("S"))
    kept = swapped.copy()
    assert not swapped.dtype.isnative
    c = np.ones(6, np.float32 if dtype == np.float16 else dtype)
    mean, var = (v.astype(c.dtype) for v in nn.moments(x, [0, 1]))
    for op in (lambda a: nn.fused_batch_norm(a, c, c)[0],
               lambda a: nn.fused_batch_norm(a, c, c, mean, var, is_training=False)[0],
               lambda a: nn.moments(a, [0, 1])[1],
               lambda a: nn.batch_normalization(a, mean, var, c, c, 1e-3),
               lambda a: nn.fused_batch_norm_grad(dy, a, c, mean, var)[0],
               lambda a: nn.relu(a)):
        got, want = np.asarray(op(swapped)), np.asarray(op(x))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    with fb.Graph().as_default():
        np.testing.assert_array_equal(fb.batch_norm(swapped), fb.batch_norm(x))
    assert swapped.dtype == kept.dtype
    np.testing.assert_array_equal(swapped, kept)
    with pytest.raises(TypeError, match="out must have the input's dtype .* byte order"):
        nn.fused_batch_norm(x, c, c, out=np.empty_like(swapped))


def test_variables_are_accepted_as_arrays(backend):
    v = fb.Variable(_data((4, 3)))
    mean, _ = nn.moments(v, [0])
    np.testing.assert_allclose(mean, v.numpy().mean(0), rtol=1e-6)


def _activation_grad_reference(op, dy, y, ct=None):
    """TF's formulas in `ct`, by default the compute dtype (float32 for float16), rounded
    once."""
    ct = ct or (np.float64 if dy.dtype == np.float64 else np.float32)
    d, v = dy.astype(ct), y.astype(ct)
    with np.errstate(invalid="ignore", over="ignore"):
        g = {"relu_grad": lambda: d * (v > 0), "relu6_grad": lambda: d * ((v > 0) & (v < 6)),
             "sigmoid_grad": lambda: d * (v * (1 - v)), "tanh_grad": lambda: d * (1 - v * v),
             "elu_grad": lambda: np.where(v < 0, d * (v + 1), d)}[op]()
    return g.astype(dy.dtype)


def _activation_grad(op, dy, y, **kwargs):
    args = (y, dy) if op in ("sigmoid_grad", "tanh_grad") else (dy, y)
    return getattr(nn, op)(*args, **kwargs)


def _assert_activation_grad(backend, got, op, dy, y):
    got = np.asarray(got)
    if backend.name == "numba_cuda":
        # float64 arithmetic, rounded once.  The device contracts tanh's 1 - y*y into a
        # multiply-add, which leaves out the rounding of y*y: for float64 data the two
        # evaluations differ by up to half an ulp of dy*y*y (more than an ulp of the
        # result where 1 - y*y cancels) and four half-ulps of the result.
        want = _activation_grad_reference(op, dy, y, np.float64)
        eps = np.finfo(want.dtype).eps
        rtol = atol = eps
        if op == "tanh_grad":
            d, v = dy.astype(np.float64), y.astype(np.float64)
            with np.errstate(invalid="ignore", over="ignore"):
                atol = eps + np.abs(d * v * v) * np.finfo(np.float64).eps / 2
            rtol = 2 * eps
        close = np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        assert close.all(), (got[~close], want[~close])
    else:
        np.testing.assert_array_equal(got, _activation_grad_reference(op, dy, y))


ACTIVATION_GRADS = ["relu_grad", "relu6_grad", "sigmoid_grad", "tanh_grad", "elu_grad"]
SMOOTH_OUTPUTS = {"sigmoid_grad": (0.5, 0.3), "tanh_grad": (0.0, 0.6), "elu_grad": (0.0, 1.5)}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ACTIVATION_GRADS)
def test_activation_grads(backend, dtype, op):
    # Large enough for the threaded kernels; strided inputs too.
    loc, scale = SMOOTH_OUTPUTS.get(op, (2.0, 4.0))
    y = _data((300, 7, 40), dtype, loc=loc, scale=scale, seed=3)
    y.flat[::7] = 0
    y.flat[1::7] = 6
    y.flat[2::7] = -1
    dy = _data(y.shape, dtype, seed=4)
    saved = (y.copy(), dy.copy())
    out = _activation_grad(op, dy, y)
    assert out.dtype == dtype and out.shape == y.shape
    _assert_activation_grad(backend, out, op, dy, y)
    _assert_activation_grad(backend, _activation_grad(op, dy[:, ::2], y[:, ::2]), op,
                            dy[:, ::2], y[:, ::2])
    d32, y32 = dy.astype(np.float32), y.astype(np.float32)
    _assert_activation_grad(backend, _activation_grad(op, d32.tolist(), y32.tolist()), op,
                            d32, y32)
    for a, b in zip((y, dy), saved):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", ACTIVATION_GRADS)
def test_activation_grads_out(backend, op):
    y = _data((200, 3, 30), np.float32, loc=0.5, scale=4.0, seed=5)
    dy = _data(y.shape, np.float32, seed=6)
    out = np.empty_like(dy)
    assert _activation_grad(op, dy, y, out=out) is out
    _assert_activation_grad(backend, out, op, dy, y)
    # Over either input, in place.
    d2, y2 = dy.copy(), y.copy()
    assert _activation_grad(op, d2, y2, out=d2) is d2
    _assert_activation_grad(backend, d2, op, dy, y)
    d2 = dy.copy()
    assert _activation_grad(op, d2, y2, out=y2) is y2
    _assert_activation_grad(backend, y2, op, dy, y)
    # Strided, and overlapping an input one element off.
    wide = np.zeros((200, 3, 60), np.float32)
    assert _activation_grad(op, dy, y, out=wide[:, :, ::2]) is not None
    _assert_activation_grad(backend, wide[:, :, ::2], op, dy, y)
    np.testing.assert_array_equal(wide[:, :, 1::2], 0)
    buffer = np.zeros(dy.size + 1, np.float32)
    buffer[:-1] = dy.ravel()
    shifted = buffer[1:].reshape(dy.shape)
    _activation_grad(op, buffer[:-1].reshape(dy.shape), y, out=shifted)
    _assert_activation_grad(backend, shifted, op, dy, y)


def test_activation_grad_argument_checks():
    y = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="features must have the shape of gradients"):
        nn.relu_grad(np.ones((4, 2), np.float32), y)
    with pytest.raises(ValueError, match=r"y must have the shape of dy \(4, 2\)"):
        nn.sigmoid_grad(y, np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="features must have the dtype of gradients"):
        nn.relu6_grad(np.ones((4, 3), np.float64), y)
    with pytest.raises(TypeError, match="outputs must have the dtype of gradients"):
        nn.elu_grad(np.ones((4, 3), np.float64), y)
    with pytest.raises(TypeError, match="gradients must be a floating-point array"):
        nn.relu_grad(np.ones((4, 3), np.int32), y)
    with pytest.raises(TypeError, match="dy must be a floating-point array"):
        nn.tanh_grad(y, "dy")
    with pytest.raises(ValueError, match="out must have the input's shape"):
        nn.relu_grad(y, y, out=np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="out must have the input's dtype"):
        nn.tanh_grad(y, y, out=np.ones((4, 3), np.float64))
