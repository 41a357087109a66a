"""Gradients: fastbn.GradientTape through batch_norm, and nn.fused_batch_norm_grad.

Checked against TensorFlow's own tf.gradients of the tf_slim layer (recorded
by tools/record_tf_fixtures.py) on every backend, and against central finite
differences in float64.
"""

import json
import os

import numpy as np
import pytest

import fastbn as fb
from tf_cases import GRAD_SOURCES, SCOPE, decode, make_inputs, make_output_gradient
from test_tf_fixtures import ACTIVATIONS, _Lib, _close, tolerance

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
with open(os.path.join(FIXTURES, "tf_grad.json")) as f:
    GRAD = json.load(f)
GRAD_ARRAYS = np.load(os.path.join(FIXTURES, "tf_grad.npz"))


def _sources(x):
    by_name = {v.op_name.rsplit("/", 1)[-1]: v for v in fb.global_variables()
               if v.op_name.startswith(SCOPE + "/")}
    names = [n for n in GRAD_SOURCES if n == "x" or n in by_name]
    return names, [x if n == "x" else by_name[n] for n in names]


@pytest.mark.parametrize("case", GRAD["cases"], ids=lambda c: c["id"])
def test_layer_gradients_match_tensorflow(case, backend):
    kwargs = decode(case["kwargs"], _Lib, ACTIVATIONS)
    training = case["training"]
    is_training = fb.Variable(training[0], trainable=False) if isinstance(training, list) \
        else training
    x, w = make_inputs(case, 0)
    if case["batch_weights"]:
        kwargs["batch_weights"] = w
    dy = make_output_gradient(case)
    with fb.GradientTape() as tape:
        y = fb.batch_norm(x, is_training=is_training, **kwargs)
    names, sources = _sources(x)
    assert names == case["expected"]["sources"]
    grads = tape.gradient(y, sources, output_gradients=dy)
    rtol, atol = tolerance(case["dtype"], case.get("tf_dtype"))
    scale = np.abs(dy).sum() / dy.size ** 0.5  # sums of many terms: scale the tolerance
    for name, source, grad in zip(names, sources, grads):
        if name in case["expected"]["none"]:
            assert grad is None, f"{name}: TF gives None"
            continue
        assert grad is not None, f"{name}: TF gives a gradient"
        assert grad.shape == source.shape and grad.dtype == source.dtype, name
        _close(grad, GRAD_ARRAYS[f"{case['id']}|grad|{name}"], rtol * 10, atol * 10 * scale,
               f"gradient for {name}")


def _loss(x, dy, kwargs):
    with fb.Graph().as_default():
        y = fb.batch_norm(x, **kwargs)
    return float(np.sum(y * dy))


@pytest.mark.parametrize("kwargs", [
    dict(scale=True),
    dict(scale=True, fused=False, data_format="NCHW"),
    dict(scale=True, updates_collections=None),
    dict(scale=True, batch_weights=np.array([0.5, 1.5, 1.0, 2.0])),
    # (renorm is left out: TF holds r and d constant, so its gradient is not the
    # derivative of the function; the TF fixtures check it.)
    dict(scale=True, renorm=True, is_training=False),
    dict(scale=True, is_training=False, fused=False),
    dict(scale=True, is_training=False),
    dict(scale=True, activation_fn=fb.nn.tanh, center=False),
    dict(scale=True, activation_fn=fb.nn.elu, data_format="NCHW"),
    dict(scale=False, activation_fn=fb.nn.sigmoid, zero_debias_moving_mean=True),
], ids=lambda kw: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()
                            if not isinstance(v, np.ndarray)))
def test_input_gradient_matches_finite_differences(kwargs, backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 2, 3)) * 1.5 + 0.5
    dy = rng.standard_normal(x.shape)
    with fb.Graph().as_default():
        with fb.GradientTape() as tape:
            y = fb.batch_norm(x, **kwargs)
        (dx,) = tape.gradient(y, [x], output_gradients=dy)
    numeric = np.zeros_like(x)
    step = 1e-6
    for index in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[index] += step
        xm[index] -= step
        numeric[index] = (_loss(xp, dy, kwargs) - _loss(xm, dy, kwargs)) / (2 * step)
    np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["beta", "gamma", "moving_mean", "moving_variance"])
def test_variable_gradients_match_finite_differences(name, backend):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 4)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    inits = {"gamma": fb.constant_initializer([1.5, 0.5, 2.0, 1.0]),
             "beta": fb.constant_initializer([0.1, 0.2, -0.3, 0.0]),
             "moving_mean": fb.constant_initializer([0.5, 1.0, 1.5, 0.0]),
             "moving_variance": fb.constant_initializer([2.0, 3.0, 4.0, 1.0])}
    kwargs = dict(scale=True, fused=False, is_training=False, param_initializers=inits,
                  scope="bn", reuse=fb.AUTO_REUSE)
    with fb.GradientTape() as tape:
        y = fb.batch_norm(x, **kwargs)
    var = fb.get_variables_by_name(name)[0]
    (grad,) = tape.gradient(y, [var], output_gradients=dy)
    base = var.numpy()
    numeric = np.zeros_like(base)
    for i in range(base.size):
        for sign in (1, -1):
            shifted = base.copy()
            shifted[i] += sign * 1e-6
            var.assign(shifted)
            numeric[i] += sign * float(np.sum(fb.batch_norm(x, **kwargs) * dy)) / 2e-6
    var.assign(base)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_several_calls_chain_and_accumulate(backend):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 3)) + 2
    dy = rng.standard_normal(x.shape)

    def loss(x_):
        with fb.Graph().as_default():
            h = fb.batch_norm(x_, scale=True, scope="a", activation_fn=fb.nn.relu)
            y = fb.batch_norm(h, scale=True, scope="b") + fb.batch_norm(x_, scope="c")
        return float(np.sum(y * dy))

    with fb.GradientTape(persistent=True) as tape:
        h = fb.batch_norm(x, scale=True, scope="a", activation_fn=fb.nn.relu)
        y1 = fb.batch_norm(h, scale=True, scope="b")
        y2 = fb.batch_norm(x, scope="c")
    dx = tape.gradient([y1, y2], x, output_gradients=[dy, dy])
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[index] += 1e-6
        xm[index] -= 1e-6
        numeric[index] = (loss(xp) - loss(xm)) / 2e-6
    np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-6)
    # persistent: a second gradient works, here of y1 alone.
    gamma_b = fb.get_variables("b/gamma")[0]
    dgamma, dh = tape.gradient(y1, [gamma_b, h], output_gradients=dy)
    assert dgamma.shape == (3,) and dh.shape == h.shape


@pytest.mark.parametrize("activation", [None, "relu", "relu6", "sigmoid"])
@pytest.mark.parametrize("dy_dtype", [np.float32, np.float64])
def test_gradient_leaves_what_the_caller_owns_alone(backend, activation, dy_dtype):
    # The tape writes dx over the dy it makes itself (an activation's derivative, a
    # conversion), never over the caller's arrays; gradients are the same every time.
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((300, 4, 5)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(dy_dtype)
    act = None if activation is None else getattr(fb.nn, activation)
    with fb.Graph().as_default():
        with fb.GradientTape(persistent=True) as tape:
            h = fb.batch_norm(x, scale=True, scope="a", activation_fn=act)
            y = fb.batch_norm(h, scope="b", activation_fn=act)
        saved = [a.copy() for a in (x, dy, h, y)]
        first = tape.gradient(y, [x, h], output_gradients=dy)
        for a, b in zip((x, dy, h, y), saved):
            np.testing.assert_array_equal(a, b)
        second = tape.gradient(y, [x, h], output_gradients=dy)
    for a, b in zip(first, second):
        assert a is not b
        np.testing.assert_array_equal(a, b)
    assert not np.may_share_memory(first[0], first[1])


def test_unconnected_sources_and_defaults():
    x = np.random.default_rng(8).standard_normal((5, 2)).astype(np.float32)
    other = np.ones((5, 2), np.float32)
    with fb.GradientTape() as tape:
        y = fb.batch_norm(x, scope="bn")
    moving_mean = fb.get_variables_by_name("moving_mean")[0]
    grads = tape.gradient(y, [x, other, moving_mean])
    assert grads[1] is None and grads[2] is None  # training: moving stats unused, as in TF
    # output_gradients defaults to ones: the gradient of sum(y), zero for batch norm's x
    np.testing.assert_allclose(grads[0], 0, atol=1e-5)
    with pytest.raises(RuntimeError, match="non-persistent"):
        tape.gradient(y, [x])


def test_watched_variables_and_stop_recording():
    x = np.random.default_rng(11).standard_normal((6, 3)).astype(np.float32)
    with fb.GradientTape() as tape:
        y = fb.batch_norm(x, scale=True, scope="bn")
        with tape.stop_recording():
            fb.batch_norm(y, scale=True, scope="ignored")
        fb.batch_norm(y, center=False, trainable=False, scope="frozen")
        moving_mean = fb.get_variables_by_name("moving_mean")[0]
        moving_variance = fb.get_variables_by_name("moving_variance")[0]
        tape.watch([moving_mean])
        # (A nest with a dict, as gradient's sources and TF's watch take.)
        tape.watch({"statistics": (moving_variance,)})
    # TF's: the watched variables in the order they were created -- beta before gamma,
    # as slim creates them -- and the trainable ones only, of what was recorded.
    assert [v.name for v in tape.watched_variables()] == [
        "bn/beta:0", "bn/gamma:0", "bn/moving_mean:0", "bn/moving_variance:0"]
    with pytest.raises(RuntimeError, match="not recording"):
        with tape.stop_recording():
            pass
    quiet = fb.GradientTape(watch_accessed_variables=False)
    with quiet:
        fb.batch_norm(x, scope="bn2")
    assert quiet.watched_variables() == ()
    tape.reset()
    assert tape.watched_variables() == ()


def test_sources_in_a_dict():
    x = np.random.default_rng(12).standard_normal((6, 3)).astype(np.float32)
    dy = np.random.default_rng(13).standard_normal((6, 3)).astype(np.float32)
    with fb.GradientTape(persistent=True) as tape:
        y = fb.batch_norm(x, scale=True, scope="bn")
    beta, gamma = fb.trainable_variables()
    assert (beta.name, gamma.name) == ("bn/beta:0", "bn/gamma:0")
    got = tape.gradient(y, {"x": x, "params": (beta, [gamma])}, output_gradients=dy)
    dx, dbeta, dgamma = tape.gradient(y, [x, beta, gamma], output_gradients=dy)
    assert set(got) == {"x", "params"} and isinstance(got["params"], tuple)
    np.testing.assert_array_equal(got["x"], dx)
    np.testing.assert_array_equal(got["params"][0], dbeta)
    np.testing.assert_array_equal(got["params"][1][0], dgamma)


def test_big_endian_sources_get_native_gradients():
    x = np.random.default_rng(10).standard_normal((5, 2)).astype(np.float32)
    big = x.astype(">f4")
    with fb.GradientTape() as tape:
        y = fb.batch_norm(big, scale=True)
    dy = np.arange(10, dtype=">f4").reshape(5, 2)
    got = tape.gradient(y, [big, np.zeros(2, ">f4")], output_gradients=dy,
                        unconnected_gradients="zero")
    with fb.GradientTape() as tape:
        y = fb.batch_norm(x, scale=True)
    (want,) = tape.gradient(y, [x], output_gradients=dy.astype(np.float32))
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32
    np.testing.assert_array_equal(got[0], want)


def test_unconnected_gradients_zero():
    x = np.random.default_rng(9).standard_normal((5, 2))
    with fb.GradientTape() as tape:
        y = fb.batch_norm(x)
    (grad,) = tape.gradient(y, [np.zeros(3)], unconnected_gradients="zero")
    assert grad.tolist() == [0, 0, 0]
    # TF's enum, as tf.UnconnectedGradients.ZERO / NONE.
    with fb.GradientTape(persistent=True) as tape:
        y = fb.batch_norm(x)
    (grad,) = tape.gradient(y, [np.zeros(3)], unconnected_gradients=fb.UnconnectedGradients.ZERO)
    assert grad.tolist() == [0, 0, 0]
    assert tape.gradient(y, [np.zeros(3)],
                         unconnected_gradients=fb.UnconnectedGradients.NONE) == [None]


def test_arbitrary_activation_is_a_clear_error_at_gradient_time():
    x = np.random.default_rng(10).standard_normal((5, 2))

    def swish(t):
        return t / (1 + np.exp(-t))

    with fb.GradientTape() as tape:
        y = fb.batch_norm(x, activation_fn=swish)
    assert y.shape == x.shape  # the forward works
    with pytest.raises(ValueError, match="swish"):
        tape.gradient(y, [x])


def test_tape_argument_errors():
    x = np.random.default_rng(11).standard_normal((5, 2))
    with fb.GradientTape(persistent=True) as tape:
        y = fb.batch_norm(x)
    with pytest.raises(ValueError, match="target"):
        tape.gradient(x, [x])
    with pytest.raises(ValueError, match="output_gradients"):
        tape.gradient(y, [x], output_gradients=np.ones(3))
    with pytest.raises(TypeError, match="sources"):
        tape.gradient(y, ["x"])
    with pytest.raises(ValueError, match="unconnected_gradients"):
        tape.gradient(y, [x], unconnected_gradients="nan")
    with pytest.raises(RuntimeError, match="already recording"):
        with tape:
            with tape:
                pass


def test_nothing_is_recorded_outside_a_tape():
    x = np.random.default_rng(12).standard_normal((5, 2))
    with fb.GradientTape() as tape:
        pass
    fb.batch_norm(x)
    assert tape._nodes == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_fused_batch_norm_grad_inverts_the_forward_shape(backend, dtype, data_format):
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((4, 3, 5)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    axis = 1 if data_format == "NCHW" else 2
    c = x.shape[axis]
    axes = tuple(a for a in range(3) if a != axis)
    mean, var = x.astype(np.float64).mean(axes), x.astype(np.float64).var(axes)
    out = np.empty_like(x)
    dx, dscale, doffset = fb.nn.fused_batch_norm_grad(dy, x, np.ones(c), mean, var,
                                                      data_format=data_format, out=out)
    assert dx is out and dx.dtype == dtype
    assert dscale.shape == doffset.shape == (c,)
    # the gradient of a normalisation is orthogonal to constant and linear shifts of x
    np.testing.assert_allclose(dx.astype(np.float64).sum(axis=axes), 0, atol=5e-2 if dtype ==
                               np.float16 else 1e-4)


def test_fused_batch_norm_grad_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="dy must have x's shape"):
        fb.nn.fused_batch_norm_grad(np.ones((3, 4), np.float32), x, [1] * 3, [0] * 3, [1] * 3)
    with pytest.raises(TypeError, match="dy must have x's dtype"):
        fb.nn.fused_batch_norm_grad(np.ones((4, 3)), x, [1] * 3, [0] * 3, [1] * 3)
    with pytest.raises(ValueError, match="mean"):
        fb.nn.fused_batch_norm_grad(x, x, [1] * 3, [0] * 2, [1] * 3)
    with pytest.raises(TypeError, match="is_training"):
        fb.nn.fused_batch_norm_grad(x, x, [1] * 3, [0] * 3, [1] * 3, is_training="yes")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(40, 6, 7, 7), (3, 4, 14, 14), (2, 3, 45, 45)])
def test_fused_batch_norm_grad_matches_float64_on_nchw(backend, dtype, shape):
    """NCHW with small images (runs of 49 or 196 values, gathered several to a piece
    by the kernels' sums, or one run in pieces): the gradient of float64 arithmetic."""
    rng = np.random.default_rng(14)
    x = (rng.standard_normal(shape) * 3 + 100).astype(dtype)
    dy = (rng.standard_normal(shape) + 0.5).astype(dtype)
    axes = (0, 2, 3)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean, var = x64.mean(axes), x64.var(axes)
    scale = np.linspace(0.5, 2, shape[1])
    inv = 1 / np.sqrt(var + 1e-3)
    c = (slice(None), None, None)
    xhat = (x64 - mean[c]) * inv[c]
    want_doffset = dy64.sum(axes)
    want_dscale = (dy64 * xhat).sum(axes)
    want_dx = (scale * inv)[c] * (dy64 - want_doffset[c] / (x.size / shape[1])
                                  - xhat * want_dscale[c] / (x.size / shape[1]))
    dx, dscale, doffset = fb.nn.fused_batch_norm_grad(dy, x, scale, mean, var, epsilon=1e-3,
                                                      data_format="NCHW")
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(doffset, want_doffset, rtol=rtol, atol=rtol * x.size ** 0.5)
    np.testing.assert_allclose(dscale, want_dscale, rtol=rtol, atol=rtol * x.size ** 0.5)
    np.testing.assert_allclose(dx, want_dx, rtol=rtol, atol=rtol)
