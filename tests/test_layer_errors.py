"""Bad input to batch_norm: a clear ValueError/TypeError naming the argument, nothing else."""

import numpy as np
import pytest

import fastbn as fb

X = np.random.RandomState(0).rand(4, 3, 3, 2).astype(np.float32)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(data_format="CHWN"), ValueError, "data_format has to be either NCHW or NHWC"),
    (dict(renorm=True, batch_weights=np.ones(4)), ValueError,
     "renorm is not supported with batch_weights"),
    (dict(renorm=True, updates_collections=None), ValueError, "renorm is not supported"),
    (dict(renorm=True, updates_collections=["mine"]), ValueError, "renorm is not supported"),
    (dict(renorm=True, zero_debias_moving_mean=True), ValueError, "renorm is not supported"),
    (dict(renorm=True, renorm_clipping={"rmxa": 1.0}), ValueError, "renorm_clipping"),
    (dict(renorm=True, renorm_clipping=[1.0]), TypeError, "renorm_clipping"),
    (dict(batch_weights=np.ones(3)), ValueError, "batch_weights must have shape"),
    (dict(batch_weights=np.ones((4, 1))), ValueError, "batch_weights must have shape"),
    (dict(batch_weights=np.array(["a"] * 4)), TypeError, "batch_weights must be numeric"),
    (dict(decay=1.5), ValueError, "decay"),
    (dict(decay="0.9"), TypeError, "decay"),
    (dict(renorm_decay=-0.1), ValueError, "renorm_decay"),
    (dict(epsilon=-1e-3), ValueError, "epsilon"),
    (dict(epsilon=None), TypeError, "epsilon"),
    (dict(activation_fn="relu"), TypeError, "activation_fn"),
    (dict(adjustment=3), TypeError, "adjustment"),
    (dict(fused="yes"), TypeError, "fused"),
    (dict(center=2), TypeError, "center must be a bool .or 1 or 0., got 2"),
    (dict(renorm="yes"), TypeError, "renorm must be a bool .or 1 or 0., got str"),
    (dict(scale=None), TypeError, "scale"),
    (dict(is_training="True"), TypeError, "is_training"),
    (dict(is_training=2), TypeError, "is_training must be a bool .or 1 or 0.*got 2"),
    (dict(param_initializers={"gama": fb.ones_initializer()}), ValueError, "param_initializers"),
    (dict(param_initializers=[1]), TypeError, "param_initializers"),
    (dict(param_initializers={"beta": 3}), TypeError, "param_initializers"),
    (dict(param_regularizers={"moving_mean": fb.l2_regularizer(0.1)}), ValueError,
     "param_regularizers"),
    (dict(updates_collections=3), TypeError, "updates_collections"),
    (dict(variables_collections={"bta": ["x"]}), ValueError, "variables_collections"),
    (dict(variables_collections=5), TypeError, "variables_collections"),
    (dict(outputs_collections=[1]), TypeError, "outputs_collections"),
    (dict(reuse=True), ValueError, "reuse=True cannot be used without a name_or_scope"),
    (dict(reuse=fb.AUTO_REUSE), ValueError, "reuse=True cannot be used without a name_or_scope"),
    (dict(reuse=True, scope="nope"), ValueError, "does not exist"),
    (dict(reuse="yes", scope="s"), TypeError, "reuse"),
    (dict(scope=3), TypeError, "name_or_scope"),
])
def test_bad_arguments(kwargs, error, match):
    x = X.copy()
    with pytest.raises(error, match=match):
        fb.batch_norm(x, **kwargs)
    np.testing.assert_array_equal(x, X)


@pytest.mark.parametrize("inputs,error,match", [
    (np.zeros(4, np.float32), ValueError, "rank"),
    (np.float32(1), ValueError, "rank"),
    (np.zeros((4, 0), np.float32), ValueError, "channels"),
    (np.zeros((4, 3), np.int64), TypeError, "inputs must be a floating-point"),
    (np.zeros((4, 3), np.complex64), TypeError, "inputs must be a floating-point"),
    (np.array([["a", "b"]]), TypeError, "inputs"),
    ("text", TypeError, "inputs"),
    (None, TypeError, "inputs"),
    ({"a": 1}, TypeError, "inputs"),
    ([[1, 2], [3]], TypeError, "inputs"),
])
def test_bad_inputs(inputs, error, match):
    with pytest.raises(error, match=match):
        fb.batch_norm(inputs)


def test_empty_channel_nchw():
    with pytest.raises(ValueError, match="channels"):
        fb.batch_norm(np.zeros((4, 0, 2, 2), np.float32), data_format="NCHW")


def test_training_on_an_empty_batch_is_an_error_inference_is_not():
    empty = np.zeros((0, 3), np.float32)
    with pytest.raises(ValueError, match="no elements"):
        fb.batch_norm(empty)
    with pytest.raises(ValueError, match="no elements"):
        fb.batch_norm(empty, fused=False, scope="b")
    assert fb.batch_norm(empty, is_training=False, scope="c").shape == (0, 3)


def test_existing_variables_without_reuse():
    fb.batch_norm(X, scope="bn")
    with pytest.raises(ValueError, match="already exists, disallowed"):
        fb.batch_norm(X, scope="bn")


def test_reuse_with_other_channel_count():
    fb.batch_norm(X, scope="bn")
    with pytest.raises(ValueError, match="shape"):
        fb.batch_norm(np.zeros((4, 5), np.float32), scope="bn", reuse=True)


def test_batch_weights_with_fused_none_takes_the_weighted_path():
    w = np.array([1.0, 0.0, 0.0, 0.0])
    y = fb.batch_norm(X, batch_weights=w, updates_collections=None, decay=0.0)
    np.testing.assert_allclose(fb.get_variables_by_name("moving_mean")[0].numpy(),
                               X[0].reshape(-1, 2).mean(axis=0), rtol=1e-5)
    assert y.shape == X.shape


def test_bad_is_training_variable():
    with pytest.raises(TypeError, match="is_training"):
        fb.batch_norm(X, is_training=fb.Variable([True, False]))
    with pytest.raises(TypeError, match="is_training"):
        fb.batch_norm(X, is_training=fb.Variable(0.5))


def test_adjustment_returning_wrong_shape():
    with pytest.raises(ValueError, match="adjustment"):
        fb.batch_norm(X, adjustment=lambda shape: (np.ones(5), np.zeros(5)))


def test_list_inputs_become_float32():
    y = fb.batch_norm([[1.0, 2.0], [3.0, 5.0]], updates_collections=None)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[:, 0], [-1, 1], atol=1e-3)


def test_outputs_collections_and_activation():
    y = fb.batch_norm(X, activation_fn=fb.nn.relu, outputs_collections=["outs"])
    assert (y >= 0).all()
    assert fb.get_collection("outs")[0] is y
    y2 = fb.batch_norm(X, activation_fn=lambda t: t * 0 + 7, scope="b")
    assert (y2 == 7).all()


def test_flags_take_1_and_0_as_tf_does():
    # TF takes 1 and 0 for True and False in is_training (its predicates' rule) and in
    # the other flags (tested for truth), on every path of batch_norm.
    for fused, updates in ((None, None), (None, fb.GraphKeys.UPDATE_OPS), (False, ["mine"])):
        for number, flag in ((1, True), (0, False), (1.0, True)):
            kwargs = dict(fused=fused, updates_collections=updates)
            flags = ("is_training", "scale", "center", "zero_debias_moving_mean", "trainable")
            with fb.Graph().as_default():
                want = fb.batch_norm(X, **kwargs, **{name: flag for name in flags})
                names = [v.name for v in fb.global_variables()]
            with fb.Graph().as_default():
                got = fb.batch_norm(X, **kwargs, **{name: number for name in flags})
                assert [v.name for v in fb.global_variables()] == names
            np.testing.assert_array_equal(got, want)


def test_updates_collections_may_be_a_set():
    with fb.Graph().as_default():
        fb.batch_norm(X, updates_collections={"b_updates", "a_updates"})
        assert len(fb.get_collection("a_updates")) == len(fb.get_collection("b_updates")) == 2
