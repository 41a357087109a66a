"""Graphs, collections, variables, variable scopes, arg_scope, initializers, regularizers."""

import numpy as np
import pytest

import fastbn as fb


def test_graph_keys_have_tf_values():
    assert fb.GraphKeys.GLOBAL_VARIABLES == "variables"
    assert fb.GraphKeys.TRAINABLE_VARIABLES == "trainable_variables"
    assert fb.GraphKeys.MODEL_VARIABLES == "model_variables"
    assert fb.GraphKeys.MOVING_AVERAGE_VARIABLES == "moving_average_variables"
    assert fb.GraphKeys.REGULARIZATION_LOSSES == "regularization_losses"
    assert fb.GraphKeys.UPDATE_OPS == "update_ops"


def test_graph_as_default_nests_and_isolates():
    outer = fb.get_default_graph()
    g = fb.Graph()
    with g.as_default() as entered:
        assert entered is g and fb.get_default_graph() is g
        fb.add_to_collection("things", 1)
        with fb.Graph().as_default() as inner:
            assert fb.get_default_graph() is inner
            assert fb.get_collection("things") == []
        assert fb.get_collection("things") == [1]
    assert fb.get_default_graph() is outer
    assert fb.get_collection("things") == []


def test_reset_default_graph():
    fb.add_to_collection("a", 1)
    old = fb.get_default_graph()
    fb.reset_default_graph()
    assert fb.get_default_graph() is not old
    assert fb.get_collection("a") == []
    with fb.Graph().as_default():
        with pytest.raises(AssertionError):
            fb.reset_default_graph()


def test_collections():
    fb.add_to_collections(["a", "b", "a"], "x")
    assert fb.get_collection("a") == ["x"] and fb.get_collection("b") == ["x"]
    copy = fb.get_collection("a")
    copy.append("y")
    assert fb.get_collection("a") == ["x"]
    ref = fb.get_collection_ref("a")
    ref.append("y")
    assert fb.get_collection("a") == ["x", "y"]
    with pytest.raises(TypeError, match="collection name"):
        fb.add_to_collection(3, "x")
    with pytest.raises(TypeError, match="names"):
        fb.add_to_collections(3, "x")


def test_get_collection_scope_filters_by_regex_on_names():
    with fb.variable_scope("outer"):
        a = fb.get_variable("a", (), initializer=fb.zeros_initializer())
    b = fb.get_variable("b", (), initializer=fb.zeros_initializer())
    fb.add_to_collection(fb.GraphKeys.GLOBAL_VARIABLES, "no name")
    assert fb.get_collection(fb.GraphKeys.GLOBAL_VARIABLES, "outer") == [a]
    assert fb.get_collection(fb.GraphKeys.GLOBAL_VARIABLES, "b") == [b]


def test_variable_basics():
    v = fb.Variable([1.0, 2.0], name="v")
    assert v.name == "v:0" and v.op_name == "v"
    assert v.dtype == np.float32  # Python floats become float32, as in TF
    assert v.shape == (2,)
    assert v in fb.global_variables() and v in fb.trainable_variables()
    w = fb.Variable(np.zeros(3, np.float64), name="v", trainable=False)
    assert w.name == "v_1:0"
    assert w in fb.global_variables() and w not in fb.trainable_variables()
    assert fb.Variable(3).dtype == np.int32
    assert fb.Variable(1.0, dtype=np.float64).dtype == np.float64
    assert fb.Variable(lambda: [1.0]).numpy().tolist() == [1.0]
    assert fb.Variable(True).name == "Variable_3:0"  # uniquified, as tf.Variable names are


def test_variable_value_is_isolated_from_caller():
    init = np.array([1.0, 2.0], np.float32)
    v = fb.Variable(init)
    init[0] = 100
    assert v.numpy()[0] == 1.0
    got = v.numpy()
    got[1] = 100
    assert v.numpy()[1] == 2.0
    as_array = np.asarray(v)
    as_array[0] = 5
    assert v.numpy()[0] == 1.0


def test_variable_takes_tf1s_arguments():
    # tf.compat.v1.Variable(initial_value, trainable, collections, validate_shape, ...)
    v = fb.Variable([1.0, 2.0], False, ["mine"])
    assert not v.trainable and fb.get_collection("mine") == [v]
    assert v not in fb.global_variables()
    assert fb.Variable(1.0, trainable=None).trainable  # None means True, as in TF
    w = fb.Variable([1.0, 2.0], name="w", shape=(None,), validate_shape=False,
                    use_resource=True, expected_shape=(2,), synchronization=None,
                    aggregation=None)
    assert w.name == "w:0"
    with pytest.raises(ValueError, match="shape"):
        fb.Variable([1.0, 2.0], shape=(3,))
    with pytest.raises(ValueError, match="initial_value must be specified"):
        fb.Variable()
    for argument in ("caching_device", "variable_def", "import_scope", "constraint"):
        with pytest.raises(ValueError, match=f"{argument} is not supported"):
            fb.Variable(1.0, **{argument: "x"})
    assert w.assign([3.0, 4.0], read_value=False) is None
    assert w.assign_add([1.0, 1.0], use_locking=True, name="add") is w
    assert w.numpy().tolist() == [4.0, 5.0]


def test_get_variable_and_model_variable_take_tfs_arguments():
    init = fb.zeros_initializer()
    v = fb.get_variable("v", [2], initializer=init, trainable=None, validate_shape=True,
                        use_resource=True, synchronization=None, aggregation=None)
    assert v in fb.trainable_variables()  # trainable None means True, as in TF
    m = fb.model_variable("m", [2], initializer=init, device="/cpu:0", use_resource=True)
    assert m in fb.model_variables() and m in fb.trainable_variables()
    for argument in ("caching_device", "partitioner", "custom_getter", "constraint"):
        with pytest.raises(ValueError, match=f"get_variable: {argument} is not supported"):
            fb.get_variable("u", [2], initializer=init, **{argument: lambda *a: None})
    for argument in ("caching_device", "partitioner", "custom_getter"):
        with pytest.raises(ValueError, match=f"model_variable: {argument} is not supported"):
            fb.model_variable("u", [2], initializer=init, **{argument: lambda *a: None})
    with pytest.raises(ValueError, match="VariableScope: partitioner is not supported"):
        fb.VariableScope(False, "s", partitioner=lambda *a: None)
    assert fb.VariableScope(False, "s", dtype=np.float64).dtype == np.float64
    with fb.variable_scope("a"):
        fb.model_variable("gamma", [1], initializer=init)
        fb.model_variable("beta", [1], initializer=init)
    assert [x.name for x in fb.get_model_variables("a", suffix="beta")] == ["a/beta:0"]
    g = fb.get_default_graph()
    assert g.get_collection(name=fb.GraphKeys.MODEL_VARIABLES, scope="a") == \
        fb.get_model_variables("a")
    assert g.get_collection_ref(name="mine") is g.get_collection_ref("mine")


def test_variables_of_big_endian_values_have_native_dtypes():
    # tf.Variable of a '>f4' array is a float32 variable.
    big = np.array([1.5, -2.0], ">f4")
    v = fb.Variable(big)
    assert v.dtype == np.float32 and v.numpy().dtype.isnative
    assert v.numpy().tolist() == [1.5, -2.0]
    assert fb.Variable([1.0], dtype=">f8").dtype == np.float64
    v.assign(np.array([3.0, 4.0], ">f8"))
    assert v.dtype == np.float32 and v.numpy().tolist() == [3.0, 4.0]
    assert fb.get_variable("w", [2], dtype=">f4", initializer=fb.zeros_initializer()).dtype \
        == np.float32


def test_variable_assign_and_arithmetic():
    v = fb.Variable([1.0, 2.0])
    assert v.assign([3, 4]) is v
    assert v.numpy().tolist() == [3.0, 4.0] and v.dtype == np.float32
    v.assign(0.5)  # broadcasts, as tf's assign of a scalar to... a fill
    assert v.numpy().tolist() == [0.5, 0.5]
    v.assign_add([1.0, 1.0])
    v.assign_sub([0.5, 0.0])
    assert v.numpy().tolist() == [1.0, 1.5]
    assert (v * 2).tolist() == [2.0, 3.0]
    assert (1 + v).tolist() == [2.0, 2.5]
    assert np.sqrt(v).dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        v.assign([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="numeric"):
        v.assign(np.array(["a", "b"]))
    flag = fb.Variable(True)
    assert bool(flag) and not bool(flag.assign(False))
    with pytest.raises(ValueError, match="ambiguous"):
        bool(v)


@pytest.mark.parametrize("bad,error", [({"a": 1}, TypeError), ("text", TypeError),
                                       (object(), TypeError)])
def test_variable_rejects_non_arrays(bad, error):
    with pytest.raises(error, match="initial_value"):
        fb.Variable(bad)


def test_variable_argument_types():
    with pytest.raises(TypeError, match="name"):
        fb.Variable(1.0, name=3)
    with pytest.raises(TypeError, match="trainable"):
        fb.Variable(1.0, trainable="yes")


def test_variable_scope_names_and_default_names():
    with fb.variable_scope("a") as sc:
        assert sc.name == "a" and fb.get_variable_scope() is sc
        with fb.variable_scope(None, default_name="BatchNorm") as s1:
            pass
        with fb.variable_scope(None, default_name="BatchNorm") as s2:
            pass
        with fb.variable_scope("b") as inner:
            assert inner.name == "a/b"
    assert (s1.name, s2.name) == ("a/BatchNorm", "a/BatchNorm_1")
    assert fb.get_variable_scope().name == ""


def test_reentering_a_scope_restarts_default_names():
    """As TF: the second time around, `BatchNorm` in scope `a` is the same layer."""
    x = np.random.rand(4, 3).astype(np.float32)
    with fb.variable_scope("a"):
        fb.batch_norm(x)
    with fb.variable_scope("a", reuse=True):
        fb.batch_norm(x)
    assert [v.name for v in fb.global_variables()] == [
        "a/BatchNorm/beta:0", "a/BatchNorm/moving_mean:0", "a/BatchNorm/moving_variance:0"]


def test_default_layer_names_are_unique():
    x = np.random.rand(4, 3).astype(np.float32)
    fb.batch_norm(x)
    fb.batch_norm(x)
    assert {v.op_name.split("/")[0] for v in fb.global_variables()} == {"BatchNorm", "BatchNorm_1"}


def test_reuse_inherits_and_auto_reuse():
    with fb.variable_scope("s"):
        v = fb.get_variable("v", (2,), initializer=fb.ones_initializer())
    with fb.variable_scope("s", reuse=True):
        with fb.variable_scope("inner") as inner:
            assert inner.reuse is True
        assert fb.get_variable("v", (2,)) is v
    with fb.variable_scope("s", reuse=fb.AUTO_REUSE):
        assert fb.get_variable("v", (2,)) is v
        w = fb.get_variable("w", (3,), initializer=fb.zeros_initializer())
        assert w.name == "s/w:0"


def test_scope_object_reopens_the_scope():
    with fb.variable_scope("s") as sc:
        fb.get_variable("v", (), initializer=fb.zeros_initializer())
    with fb.variable_scope("other"):
        with fb.variable_scope(sc, reuse=True) as again:
            assert again.name == "s"
            assert fb.get_variable("v", ()).name == "s/v:0"


def test_scope_defaults_for_initializer_regularizer_and_dtype():
    # As TF: what a scope sets (or inherits) get_variable takes where a call gives none.
    l2 = fb.l2_regularizer(0.5)
    with fb.variable_scope("s", initializer=fb.constant_initializer(3.0), regularizer=l2,
                           dtype=np.float64) as s:
        assert (s.initializer, s.regularizer, s.dtype) == (s.initializer, l2, np.float64)
        v = fb.get_variable("v", (2,))
        assert v.dtype == np.float64 and v.numpy().tolist() == [3.0, 3.0]
        with fb.variable_scope("inner", initializer=fb.zeros_initializer()):
            w = fb.get_variable("w", (2,), dtype=np.float32, regularizer=fb.l1_regularizer(1.0))
        assert w.dtype == np.float32 and w.numpy().tolist() == [0.0, 0.0]
        y = fb.batch_norm(np.ones((4, 3), np.float32), scale=True, is_training=False)
    assert y.shape == (4, 3)
    losses = fb.get_collection(fb.GraphKeys.REGULARIZATION_LOSSES)
    assert [loss.name for loss in losses] == [
        "s/v/Regularizer/l2_regularizer:0", "s/inner/w/Regularizer/l1_regularizer:0",
        "s/BatchNorm/beta/Regularizer/l2_regularizer:0",
        "s/BatchNorm/gamma/Regularizer/l2_regularizer:0",
        "s/BatchNorm/moving_mean/Regularizer/l2_regularizer:0",
        "s/BatchNorm/moving_variance/Regularizer/l2_regularizer:0"]
    assert fb.get_regularization_losses() == [4.5, 0.0, 0.0, 0.75, 0.0, 0.75]
    with fb.variable_scope("t"):
        # A scope object brings its own defaults back, wherever it is reopened.
        with fb.variable_scope(s, reuse=fb.AUTO_REUSE):
            assert fb.get_variable("u", ()).numpy() == 3.0
        assert fb.get_variable_scope().regularizer is None
        # No initializer: TF's default for floats, glorot_uniform (within sqrt(6 / 2) here).
        assert abs(fb.get_variable("u", ()).numpy()) <= np.sqrt(3.0)
        assert fb.get_variable("n", (2,), dtype=np.int32).numpy().tolist() == [0, 0]
    for argument in ("caching_device", "partitioner", "custom_getter", "constraint"):
        with pytest.raises(ValueError, match=f"{argument} is not supported"):
            fb.variable_scope("s", **{argument: object()})
    with pytest.raises(TypeError, match="regularizer must be callable"):
        fb.variable_scope("s", regularizer=0.1)
    with pytest.raises(TypeError):
        fb.variable_scope("s", resue=True)  # a misspelt argument is not swallowed


def test_get_variable_errors():
    with fb.variable_scope("s"):
        fb.get_variable("v", (2,), initializer=fb.zeros_initializer())
        with pytest.raises(ValueError, match="already exists, disallowed"):
            fb.get_variable("v", (2,), initializer=fb.zeros_initializer())
    with fb.variable_scope("s", reuse=True):
        with pytest.raises(ValueError, match="does not exist"):
            fb.get_variable("missing", (2,))
        with pytest.raises(ValueError, match="share variable s/v.*shape"):
            fb.get_variable("v", (3,))
        with pytest.raises(ValueError, match="dtype"):
            fb.get_variable("v", (2,), dtype=np.float64)
    for reuse in (True, fb.AUTO_REUSE):  # (TF tests the argument's truth)
        with pytest.raises(ValueError, match="reuse=True cannot be used without a name_or_scope"):
            with fb.variable_scope(None, default_name="x", reuse=reuse):
                pass
    with pytest.raises(TypeError, match="default_name is None"):
        fb.variable_scope(None)
    with pytest.raises(TypeError, match="reuse"):
        fb.variable_scope("s", reuse="yes")
    with pytest.raises(TypeError, match="name_or_scope"):
        fb.variable_scope(3)
    with pytest.raises(ValueError, match="initializer is required"):
        fb.get_variable("needs_init", (2,), dtype=np.complex64)  # TF has no default either
    with pytest.raises(ValueError, match="shape"):
        fb.get_variable("bad_init", (2,), initializer=lambda shape, dtype: np.zeros(5))


def test_variable_lookup_helpers():
    x = np.random.rand(5, 3, 3, 3).astype(np.float32)
    fb.batch_norm(x, scale=True, scope="bn1")
    fb.batch_norm(x, scale=True, scope="bn2", trainable=False)
    assert [v.name for v in fb.get_variables_by_name("gamma")] == ["bn1/gamma:0", "bn2/gamma:0"]
    assert [v.name for v in fb.get_variables("bn2", suffix="beta")] == ["bn2/beta:0"]
    assert [v.name for v in fb.get_variables_by_suffix("moving_mean")] == [
        "bn1/moving_mean:0", "bn2/moving_mean:0"]
    assert [v.name for v in fb.trainable_variables()] == ["bn1/gamma:0", "bn1/beta:0"]
    assert len(fb.model_variables()) == 8
    assert fb.moving_average_variables() == []  # as TF: batch_norm adds none
    with fb.variable_scope("bn1", reuse=True) as sc:
        assert len(sc.global_variables()) == 4
        assert len(sc.trainable_variables()) == 2


def test_arg_scope():
    x = np.random.rand(6, 2).astype(np.float32) * 4
    with fb.arg_scope([fb.batch_norm], decay=0.5, updates_collections=None) as sc:
        fb.batch_norm(x, scope="bn")
        with fb.arg_scope([fb.batch_norm], decay=0.0):
            fb.batch_norm(x, scope="bn", reuse=True)
    mean = fb.get_variables_by_name("moving_mean")[0].numpy()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5)  # decay 0: the batch mean
    assert fb.get_collection(fb.GraphKeys.UPDATE_OPS) == []
    with fb.arg_scope(sc):  # reopening a scope
        fb.batch_norm(x, scope="bn", reuse=True, decay=1.0)  # explicit wins
    np.testing.assert_allclose(fb.get_variables_by_name("moving_mean")[0].numpy(), mean)
    with pytest.raises(ValueError, match="not decorated"):
        fb.arg_scope([len], a=1)
    with pytest.raises(ValueError, match="kwargs must be empty"):
        fb.arg_scope(sc, decay=0.1)
    with pytest.raises(TypeError):
        fb.arg_scope(fb.batch_norm, decay=0.1)


def test_add_arg_scope_on_user_functions():
    @fb.add_arg_scope
    def layer(x, factor=1):
        return x * factor

    with fb.arg_scope([layer], factor=3):
        assert layer(2) == 6
        assert layer(2, factor=5) == 10
    assert layer(2) == 2


def test_initializers():
    assert fb.zeros_initializer()((2,), np.float64).dtype == np.float64
    assert fb.ones_initializer()((2, 2), None).tolist() == [[1, 1], [1, 1]]
    assert fb.constant_initializer(3.0)((2,), np.float32).tolist() == [3, 3]
    assert fb.constant_initializer([1, 2])((4,), np.float32).tolist() == [1, 2, 2, 2]
    assert fb.constant_initializer([[1, 2], [3, 4]])((2, 2), None).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="too many"):
        fb.constant_initializer([1, 2, 3])((2,), np.float32)
    with pytest.raises(ValueError, match="shape"):
        fb.constant_initializer([1, 2], verify_shape=True)((4,), np.float32)
    with pytest.raises(TypeError, match="value"):
        fb.constant_initializer("a")


def test_regularizers():
    w = np.array([1.0, -2.0, 3.0], np.float32)
    assert fb.l1_regularizer(0.5)(w) == pytest.approx(3.0)
    assert fb.l2_regularizer(0.5)(w) == pytest.approx(0.5 * 14 / 2)
    assert fb.l2_regularizer(0.0)(w) is None
    with pytest.raises(ValueError, match="integer"):
        fb.l1_regularizer(1)
    with pytest.raises(ValueError, match="less than 0"):
        fb.l2_regularizer(-0.1)
    with pytest.raises(TypeError):
        fb.l2_regularizer("0.1")


def test_regularization_losses_follow_current_values():
    x = np.random.rand(5, 3).astype(np.float32)
    fb.batch_norm(x, scale=True, param_regularizers={"gamma": fb.l2_regularizer(0.1)})
    assert fb.get_regularization_losses() == [pytest.approx(0.1 * 3 / 2)]
    fb.get_variables_by_name("gamma")[0].assign([2.0, 2.0, 2.0])
    assert fb.get_regularization_losses() == [pytest.approx(0.1 * 12 / 2)]
    loss = fb.get_collection(fb.GraphKeys.REGULARIZATION_LOSSES)[0]
    assert loss.name == "BatchNorm/gamma/Regularizer/l2_regularizer:0"
    # A disabled regularizer adds nothing, as in TF.
    fb.batch_norm(x, scope="other", param_regularizers={"beta": fb.l1_regularizer(0.0)})
    assert len(fb.get_regularization_losses()) == 1
