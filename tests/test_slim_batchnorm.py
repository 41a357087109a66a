"""The intent of tf_slim's own `BatchNormTest` (tf_slim/layers/layers_test.py), ported.

TF runs a graph many times in a session; fastbn computes eagerly, so "run the
train op N times" becomes "call the layer N times on the same scope and run
its update ops" (`fastbn.apply_updates()`).  Tests that only exercise TF's
graph machinery (unknown shapes, op names) become the nearest eager check.
"""

import numpy as np
import pytest

import fastbn as fb

HEIGHT = WIDTH = 3


def _bessel(sample_size, expected_var):
    factor = sample_size / (sample_size - 1)
    return expected_var * factor, factor


def _images(shape=(5, HEIGHT, WIDTH, 3), dtype=np.float32, seed=1):
    return np.random.RandomState(seed).uniform(size=shape).astype(dtype)


def _steps(images, n, scope="BatchNorm", **kwargs):
    """Calls the layer n times on one scope, running its updates after each call."""
    out = None
    for i in range(n):
        out = fb.batch_norm(images, scope=scope, reuse=True if i else None, **kwargs)
        fb.apply_updates()
    return out


def _moving(scope="BatchNorm"):
    return (fb.get_variables(f"{scope}/moving_mean")[0],
            fb.get_variables(f"{scope}/moving_variance")[0])


def _format(data_format, batch_size=10, channels=3, height=2, width=2):
    if data_format == "NHWC":
        return (batch_size, height, width, channels), (0, 1, 2)
    return (batch_size, channels, height, width), (0, 2, 3)


def test_center_false_builds():
    a = np.zeros((10, 10, 10, 10), np.float32)
    fb.batch_norm(a, center=False, data_format="NCHW", zero_debias_moving_mean=True)


def test_unknown_rank_is_an_error():
    with pytest.raises(ValueError, match="rank"):
        fb.batch_norm(np.float32(1.0))


def test_invalid_data_format():
    with pytest.raises(ValueError, match="data_format has to be either NCHW or NHWC."):
        fb.batch_norm(_images(), data_format="CHWN")


@pytest.mark.parametrize("data_format,shape", [("NHWC", (5, 3, 3, 0)), ("NCHW", (5, 0, 3, 3))])
def test_empty_channels_dim(data_format, shape):
    with pytest.raises(ValueError, match="channels"):
        fb.batch_norm(np.zeros(shape, np.float32), data_format=data_format)


@pytest.mark.parametrize("fused,dtype", [(False, np.float32), (True, np.float32),
                                         (True, np.float16)])
def test_create_op(fused, dtype, backend):
    images = _images(dtype=dtype)
    output = fb.batch_norm(images, fused=fused)
    assert output.shape == (5, HEIGHT, WIDTH, 3)
    assert output.dtype == dtype
    assert fb.get_collection(fb.GraphKeys.REGULARIZATION_LOSSES) == []


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("param", ["beta", "gamma"])
def test_create_op_regularizer(fused, param):
    def reg(x):
        return 0.1 * np.sum(x)

    fb.batch_norm(_images(), param_regularizers={param: reg}, scale=True, fused=fused)
    losses = fb.get_collection(fb.GraphKeys.REGULARIZATION_LOSSES)
    assert len(losses) == 1
    assert losses[0].name.startswith(f"BatchNorm/{param}/Regularizer/")
    expected = 0.1 * (3.0 if param == "gamma" else 0.0)
    assert fb.get_regularization_losses() == [pytest.approx(expected)]


def test_create_variables():
    fb.batch_norm(_images(), scale=True)
    assert fb.get_variables_by_name("beta")[0].op_name == "BatchNorm/beta"
    assert fb.get_variables_by_name("gamma")[0].op_name == "BatchNorm/gamma"
    assert fb.get_variables_by_name("moving_mean")[0].op_name == "BatchNorm/moving_mean"
    assert fb.get_variables_by_name("moving_variance")[0].op_name == "BatchNorm/moving_variance"


def test_moving_average_variables():
    fb.batch_norm(_images(), scale=True)
    assert len(fb.get_model_variables()) == 4


def test_moving_average_variables_zero_debias():
    fb.batch_norm(_images(), scale=True, zero_debias_moving_mean=True, fused=False)
    assert len(fb.get_model_variables()) == 6
    assert fb.get_variables_by_name("biased")[0].op_name == "BatchNorm/BatchNorm/moving_mean/biased"
    assert (fb.get_variables_by_name("local_step")[0].op_name
            == "BatchNorm/BatchNorm/moving_mean/local_step")


def test_updates_collection():
    fb.batch_norm(_images(), updates_collections="my_update_ops")
    update_mean, update_variance = fb.get_collection("my_update_ops")
    assert update_mean.name.startswith("BatchNorm/AssignMovingAvg")
    assert update_variance.name.startswith("BatchNorm/AssignMovingAvg_1")


def test_variables_collections():
    collections = {"beta": ["beta"], "gamma": ["gamma"], "moving_mean": ["moving_mean"],
                   "moving_variance": ["moving_variance"]}
    fb.batch_norm(_images((5, 5, 5, 3)), scale=True, variables_collections=collections)
    for var_name, names in collections.items():
        collection = fb.get_collection(names[0])
        assert len(collection) == 1
        assert collection[0].op_name == "BatchNorm/" + var_name


def test_reuse_variables():
    images = _images()
    fb.batch_norm(images, scale=True, scope="bn")
    fb.batch_norm(images, scale=True, scope="bn", reuse=True)
    assert len(fb.get_variables_by_name("beta")) == 1
    assert len(fb.get_variables_by_name("gamma")) == 1
    assert len(fb.get_variables_by_name("moving_mean") +
               fb.get_variables_by_name("moving_variance")) == 2


def test_reuse_update_ops():
    images = _images()
    with fb.arg_scope([fb.batch_norm], updates_collections="update_ops"):
        fb.batch_norm(images, scope="bn")
        assert len(fb.get_collection("update_ops")) == 2
        fb.batch_norm(images, scope="bn", reuse=True)
        assert len(fb.get_collection("update_ops")) == 4


def test_create_moving_vars():
    fb.batch_norm(_images())
    moving_mean = fb.get_variables("BatchNorm/moving_mean")
    assert [v.op_name for v in moving_mean] == ["BatchNorm/moving_mean"]
    moving_variance = fb.get_variables("BatchNorm/moving_variance")
    assert [v.op_name for v in moving_variance] == ["BatchNorm/moving_variance"]


def test_zero_debias_moving_mean(backend):
    np.random.seed(1)
    image_values = np.random.rand(10, HEIGHT, WIDTH, 3)
    expected_mean = image_values.mean(axis=(0, 1, 2))
    expected_var = image_values.var(axis=(0, 1, 2))
    images = image_values.astype(np.float32)
    kwargs = dict(decay=0.1, updates_collections=None, zero_debias_moving_mean=True, fused=False)
    fb.batch_norm(images, scope="BatchNorm", **kwargs)
    moving_mean = fb.get_variables_by_name("moving_mean")[0]
    moving_variance = fb.get_variables_by_name("moving_variance")[0]
    biased = fb.get_variables_by_name("biased")[0]
    local_step = fb.get_variables_by_name("local_step")[0]
    for i in range(1, 10):
        assert local_step.numpy() == i
        np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
        fb.batch_norm(images, scope="BatchNorm", reuse=True, **kwargs)
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(moving_variance.numpy(), expected_var, rtol=1e-5)
    np.testing.assert_allclose(biased.numpy(), expected_mean, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("zero_debias", [False, True])
@pytest.mark.parametrize("delayed", [False, True], ids=["inplace", "delayed"])
def test_updates_converge(fused, data_format, zero_debias, delayed, backend):
    """testNoneUpdatesCollections* and testDelayedUpdateMovingVars*."""
    shape, axis = _format(data_format)
    np.random.seed(1)
    image_values = np.random.rand(*shape)
    expected_mean = image_values.mean(axis=axis)
    expected_var = image_values.var(axis=axis)
    if fused:
        expected_var, _ = _bessel(10 * 2 * 2, expected_var)
    images = image_values.astype(np.float32)
    kwargs = dict(decay=0.1, fused=fused, data_format=data_format,
                  zero_debias_moving_mean=zero_debias)
    if not delayed:
        kwargs["updates_collections"] = None
    fb.batch_norm(images, scope="BatchNorm", **kwargs)
    assert len(fb.get_collection(fb.GraphKeys.UPDATE_OPS)) == (2 if delayed else 0)
    fb.apply_updates()
    moving_mean, moving_variance = _moving()
    for _ in range(9):
        if zero_debias:
            np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
        fb.batch_norm(images, scope="BatchNorm", reuse=True, **kwargs)
        fb.apply_updates()
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(moving_variance.numpy(), expected_var, rtol=1e-5)


@pytest.mark.parametrize("zero_debias", [False, True])
def test_eval_moving_vars(zero_debias):
    image_shape = (10, HEIGHT, WIDTH, 3)
    image_values = np.random.rand(*image_shape)
    expected_mean = image_values.mean(axis=(0, 1, 2))
    expected_var = image_values.var(axis=(0, 1, 2))
    kwargs = dict(decay=0.1, is_training=False, zero_debias_moving_mean=zero_debias)
    fb.batch_norm(image_values.astype(np.float32), scope="BatchNorm", **kwargs)
    assert fb.get_collection(fb.GraphKeys.UPDATE_OPS) == []
    moving_mean, moving_variance = _moving()
    np.testing.assert_array_equal(moving_mean.numpy(), [0] * 3)
    np.testing.assert_array_equal(moving_variance.numpy(), [1] * 3)
    moving_mean.assign(expected_mean)
    moving_variance.assign(expected_var)
    for _ in range(10):
        fb.batch_norm(np.random.rand(*image_shape).astype(np.float32), scope="BatchNorm",
                      reuse=True, **kwargs)
        fb.apply_updates()
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-6)
    np.testing.assert_allclose(moving_variance.numpy(), expected_var, rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("zero_debias", [False, True])
def test_reuse_vars(fused, zero_debias, backend):
    image_values = np.random.rand(10, HEIGHT, WIDTH, 3)
    expected_mean = image_values.mean(axis=(0, 1, 2))
    expected_var = image_values.var(axis=(0, 1, 2))
    if fused:
        expected_var, factor = _bessel(10 * HEIGHT * WIDTH, expected_var)
    images = image_values.astype(np.float32)
    kwargs = dict(decay=0.1, scope="BN", fused=fused, zero_debias_moving_mean=zero_debias)
    output_train = fb.batch_norm(images, is_training=True, **kwargs)
    with pytest.warns(fb.UpdateOpsWarning, match="never run"):
        output_eval = fb.batch_norm(images, is_training=False, reuse=True, **kwargs)
    moving_mean, moving_variance = _moving("BN")
    np.testing.assert_array_equal(moving_mean.numpy(), [0] * 3)
    np.testing.assert_array_equal(moving_variance.numpy(), [1] * 3)
    assert not np.allclose(output_train, output_eval)
    for _ in range(10):
        fb.batch_norm(images, is_training=True, reuse=True, **kwargs)
        fb.apply_updates()
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(moving_variance.numpy(), expected_var, rtol=1e-5)
    if fused:
        moving_variance.assign(moving_variance.numpy() / factor)
    output_train = fb.batch_norm(images, is_training=True, reuse=True, **kwargs)
    fb.get_collection_ref(fb.GraphKeys.UPDATE_OPS).clear()
    output_eval = fb.batch_norm(images, is_training=False, reuse=True, **kwargs)
    np.testing.assert_allclose(output_train, output_eval, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("zero_debias", [False, True])
def test_is_training_variable(fused, data_format, zero_debias, backend):
    shape, axis = _format(data_format)
    np.random.seed(1)
    image_values = np.random.rand(*shape)
    expected_mean = image_values.mean(axis=axis)
    expected_var = image_values.var(axis=axis)
    if fused:
        expected_var, factor = _bessel(10 * 2 * 2, expected_var)
    images = image_values.astype(np.float32)
    is_training = fb.Variable(True)
    kwargs = dict(decay=0.1, is_training=is_training, fused=fused, data_format=data_format,
                  zero_debias_moving_mean=zero_debias, scope="BatchNorm")
    output_true = fb.batch_norm(images, **kwargs)
    moving_mean, moving_variance = _moving()
    np.testing.assert_array_equal(moving_mean.numpy(), [0] * 3)
    np.testing.assert_array_equal(moving_variance.numpy(), [1] * 3)
    is_training.assign(False)
    with pytest.warns(fb.UpdateOpsWarning, match="never run"):
        output_false = fb.batch_norm(images, reuse=True, **kwargs)
    assert not np.allclose(output_true, output_false)
    # The ops collected while is_training read False do nothing when it still does.
    fb.apply_updates()
    np.testing.assert_array_equal(moving_mean.numpy(), [0] * 3)
    is_training.assign(True)
    for _ in range(10):
        fb.batch_norm(images, reuse=True, **kwargs)
        fb.apply_updates()
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(moving_variance.numpy(), expected_var, rtol=1e-5)
    output_true = fb.batch_norm(images, reuse=True, **kwargs)
    fb.get_collection_ref(fb.GraphKeys.UPDATE_OPS).clear()
    if fused:
        moving_variance.assign(moving_variance.numpy() / factor)
    is_training.assign(False)
    output_false = fb.batch_norm(images, reuse=True, **kwargs)
    np.testing.assert_allclose(output_true, output_false, rtol=1e-4, atol=1e-4)


def test_no_updates_when_is_training_false():
    images = np.random.rand(10, HEIGHT, WIDTH, 3).astype(np.float32)
    fb.batch_norm(images, decay=0.1, is_training=False)
    assert len(fb.get_collection(fb.GraphKeys.UPDATE_OPS)) == 0
    moving_mean, moving_variance = _moving()
    for _ in range(10):
        fb.batch_norm(images, decay=0.1, is_training=False, scope="BatchNorm", reuse=True)
    np.testing.assert_array_equal(moving_mean.numpy(), [0] * 3)
    np.testing.assert_array_equal(moving_variance.numpy(), [1] * 3)


def test_none_updates_collection_no_training():
    images = np.random.rand(10, HEIGHT, WIDTH, 3).astype(np.float32)
    kwargs = dict(decay=0.1, updates_collections=None, is_training=False, scope="BatchNorm")
    fb.batch_norm(images, **kwargs)
    assert fb.get_collection(fb.GraphKeys.UPDATE_OPS) == []
    for _ in range(10):
        fb.batch_norm(images, reuse=True, **kwargs)
    moving_mean, moving_variance = _moving()
    np.testing.assert_array_equal(moving_mean.numpy(), [0] * 3)
    np.testing.assert_array_equal(moving_variance.numpy(), [1] * 3)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_none_updates_collection_is_training_variable(fused, data_format, backend):
    shape, axis = _format(data_format)
    np.random.seed(1)
    image_values = np.random.rand(*shape)
    expected_mean = image_values.mean(axis=axis)
    expected_var = image_values.var(axis=axis)
    if fused:
        expected_var, factor = _bessel(10 * 2 * 2, expected_var)
    images = image_values.astype(np.float32)
    is_training = fb.Variable(True)
    kwargs = dict(decay=0.1, updates_collections=None, is_training=is_training, fused=fused,
                  data_format=data_format, scope="BatchNorm", reuse=fb.AUTO_REUSE)
    is_training.assign(False)
    for _ in range(10):
        fb.batch_norm(images, **kwargs)
    assert fb.get_collection(fb.GraphKeys.UPDATE_OPS) == []
    moving_mean, moving_variance = _moving()
    np.testing.assert_array_equal(moving_mean.numpy(), [0] * 3)
    np.testing.assert_array_equal(moving_variance.numpy(), [1] * 3)
    output_false = fb.batch_norm(images, **kwargs)
    is_training.assign(True)
    output_true = fb.batch_norm(images, **kwargs)  # (this call updates, once)
    assert not np.allclose(output_true, output_false)
    for _ in range(9):
        fb.batch_norm(images, **kwargs)
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(moving_variance.numpy(), expected_var, rtol=1e-5)
    output_true = fb.batch_norm(images, **kwargs)
    if fused:
        moving_variance.assign(moving_variance.numpy() / factor)
    is_training.assign(False)
    output_false = fb.batch_norm(images, **kwargs)
    np.testing.assert_allclose(output_true, output_false, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_train_moving_vars(fused, data_format, backend):
    """Outputs stay normalized while the moving mean of data near 256 converges."""
    shape, axis = _format(data_format, channels=32, height=7, width=7)
    np.random.seed(1)
    image_values = np.random.rand(*shape) + 256
    expected_mean = image_values.mean(axis=axis)
    expected_var = image_values.var(axis=axis)
    if fused:
        expected_var, _ = _bessel(10 * 7 * 7, expected_var)
    images = image_values.astype(np.float32)
    kwargs = dict(decay=0.2, updates_collections=None, is_training=True, fused=fused,
                  data_format=data_format, scope="BatchNorm", reuse=fb.AUTO_REUSE)
    for _ in range(10):
        out = fb.batch_norm(images, **kwargs)
        np.testing.assert_allclose(out.mean(axis=axis), [0] * 32, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(out.var(axis=axis), [1] * 32, rtol=1e-2, atol=1e-2)
    moving_mean, moving_variance = _moving()
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(moving_variance.numpy(), expected_var, rtol=1e-3)


def test_custom_initializer(backend):
    channels = 3
    images = (np.ones((5, HEIGHT, WIDTH, channels)) * 9.0).astype("f")
    output = fb.batch_norm(
        images, is_training=False, scale=True, epsilon=0.0,
        param_initializers={
            "beta": fb.constant_initializer(np.ones(channels) * 5.0),
            "gamma": fb.constant_initializer(np.ones(channels) * 2.0),
            "moving_mean": fb.constant_initializer(np.ones(channels) * 5.0),
            "moving_variance": fb.constant_initializer(np.ones(channels) * 4.0),
        })
    # TF's assertAllClose tolerances: the fused path raises epsilon to 1.001e-5.
    np.testing.assert_allclose(output, images, rtol=1e-6, atol=1e-6)


def _run_with_format(shape, data_format, is_training):
    channels = shape[-1]
    images = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    if data_format == "NCHW":
        images = np.transpose(images, [0, len(shape) - 1] + list(range(1, len(shape) - 1)))
    with fb.Graph().as_default():
        output = fb.batch_norm(
            images, is_training=is_training, scale=True, epsilon=0.5, data_format=data_format,
            param_initializers={
                "beta": fb.constant_initializer(np.arange(2, channels + 2)),
                "gamma": fb.constant_initializer(np.arange(10, channels + 10) * 2.0),
                "moving_mean": fb.constant_initializer(np.arange(3, channels + 3) * 5.0),
                "moving_variance": fb.constant_initializer(np.arange(1, channels + 1) * 4.0),
            })
    if data_format == "NCHW":
        output = np.transpose(output, [0] + list(range(2, len(shape))) + [1])
    return output


@pytest.mark.parametrize("is_training", [False, True])
@pytest.mark.parametrize("shape", [[7, 3, 5], [5, 2, 3, 4], [11, 3, 2, 4, 5]])
def test_nhwc_and_nchw_produce_same_output(shape, is_training, backend):
    nhwc = _run_with_format(shape, "NHWC", is_training)
    nchw = _run_with_format(shape, "NCHW", is_training)
    np.testing.assert_allclose(nhwc, nchw, atol=1e-4, rtol=1e-4)


def test_batch_norm_beta():
    for dtype in (np.float32, np.float16):
        fb.batch_norm(np.zeros((10, 10, 10, 10), dtype), center=False, data_format="NCHW",
                      zero_debias_moving_mean=True)


def test_variables_are_float32_for_float16_input():
    fb.batch_norm(_images(dtype=np.float16), scale=True)
    for name in ("beta", "gamma", "moving_mean", "moving_variance"):
        assert fb.get_variables_by_name(name)[0].dtype == np.float32


def _fused_nchw(shape, dtype):
    channels = shape[1]
    images = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    with fb.Graph().as_default():
        return fb.batch_norm(
            images, fused=True, is_training=True, scale=True, epsilon=0.5, data_format="NCHW",
            param_initializers={
                "beta": fb.constant_initializer(np.arange(2, channels + 2)),
                "gamma": fb.constant_initializer(np.arange(10, channels + 10) * 2.0),
                "moving_mean": fb.constant_initializer(np.arange(3, channels + 3) * 5.0),
                "moving_variance": fb.constant_initializer(np.arange(1, channels + 1) * 4.0),
            })


def test_fused_float16_matches_float32(backend):
    shape = [5, 4, 2, 3]
    np.testing.assert_allclose(_fused_nchw(shape, np.float32), _fused_nchw(shape, np.float16),
                               rtol=1e-3, atol=2e-2)


def test_adjustment_created():
    all_adjustments = []

    def create_adjustment(shape):
        adjustments = [np.ones(shape[-1:]), np.zeros(shape[-1:])]
        all_adjustments.extend(adjustments)
        return adjustments

    depth = 8
    images = np.zeros([10, 5, 5, depth], np.float32)
    output = fb.batch_norm(images, is_training=True, adjustment=create_adjustment)
    assert output.shape == images.shape
    assert len(all_adjustments) == 2
    assert all_adjustments[0].shape == (depth,)
    assert all_adjustments[1].shape == (depth,)
