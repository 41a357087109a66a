"""fastbn against TensorFlow: results recorded by tools/record_tf_fixtures.py.

Each layer case replays the recorded steps: the same inputs, is_training
values and update runs, then compares outputs and every variable after each
step, the variable names and collections, and the number of update ops.
"""

import inspect
import json
import os

import numpy as np
import pytest

import fastbn as fb
from tf_cases import (CUSTOM_UPDATES, INITIALIZER_CASES, decode, make_inputs, plain_default,
                      run_scope_program, scope_programs)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _load(name):
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(FIXTURES, f"{name}.npz"))


LAYER, LAYER_ARRAYS = _load("tf_layer")
NN, NN_ARRAYS = _load("tf_nn")
ACTIVATIONS = {"relu": fb.nn.relu, "relu6": fb.nn.relu6, "tanh": fb.nn.tanh,
               "sigmoid": fb.nn.sigmoid, "elu": fb.nn.elu}


class _Lib:
    constant_initializer = staticmethod(fb.constant_initializer)
    l1_regularizer = staticmethod(fb.l1_regularizer)
    l2_regularizer = staticmethod(fb.l2_regularizer)

    @staticmethod
    def adjustment(scale, bias):
        return lambda shape: (scale, bias)


def tolerance(dtype, tf_dtype=None):
    """(rtol, atol) for comparing with TF: its sums run in another order."""
    worst = "float16" if "float16" in (dtype, tf_dtype) else (tf_dtype or dtype)
    return {"float16": (1e-2, 2e-2), "float32": (2e-5, 2e-5), "float64": (1e-9, 1e-9)}[worst]


def _close(actual, expected, rtol, atol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("case", LAYER["cases"], ids=lambda c: c["id"])
def test_layer_matches_tensorflow(case, backend):
    kwargs = decode(case["kwargs"], _Lib, ACTIVATIONS)
    expected = case["expected"]
    training = case["training"]
    is_training = training
    if isinstance(training, list):
        is_training = fb.Variable(True, trainable=False, name="is_training")
    updates = kwargs.get("updates_collections", fb.GraphKeys.UPDATE_OPS)
    update_keys = [] if updates is None else [updates] if isinstance(updates, str) else updates
    rtol, atol = tolerance(case["dtype"], case.get("tf_dtype"))
    graph = fb.get_default_graph()
    for step in range(len(case["shapes"])):
        x, w = make_inputs(case, step)
        x_before = x.copy()
        if isinstance(training, list):
            is_training.assign(training[step])
        kw = dict(kwargs)
        if step:
            kw["reuse"] = True
        if case["batch_weights"]:
            kw["batch_weights"] = w
        ys = [fb.batch_norm(x, is_training=is_training, **kw)
              for _ in range(case.get("layers", 1))]
        np.testing.assert_array_equal(x, x_before, err_msg="the input was modified")
        if step == 0:
            assert [v.name for v in fb.global_variables()] == expected["variables"]
            for key, names in expected["collections"].items():
                assert [v.name for v in fb.get_collection(key)] == names, key
            for key, count in expected["op_counts"].items():
                assert len(fb.get_collection(key)) == count, key
            for key in (fb.GraphKeys.UPDATE_OPS, CUSTOM_UPDATES):
                assert len(fb.get_collection(key)) == expected["op_counts"].get(key, 0), key
            assert ([loss.name for loss in fb.get_collection(fb.GraphKeys.REGULARIZATION_LOSSES)]
                    == expected["regularization_losses"])
        for key in update_keys:
            fb.apply_updates(key)
        for layer, y in enumerate(ys):
            assert y.dtype == np.dtype(case["dtype"]) and y.shape == x.shape
            _close(y, LAYER_ARRAYS[f"{case['id']}|y|{step}|{layer}"], rtol, atol,
                   f"output of layer {layer}, step {step}")
        for var in fb.global_variables():
            ref = LAYER_ARRAYS[f"{case['id']}|var|{var.name}|{step}"]
            if case.get("tf_dtype") is None:
                assert var.dtype == ref.dtype, var.name
            _close(var.numpy(), ref, rtol, atol, f"{var.name} after step {step}")
        if expected["regularization_losses"]:
            _close(fb.get_regularization_losses(), LAYER_ARRAYS[f"{case['id']}|reg|{step}"],
                   rtol, atol, "regularization losses")
    assert graph is fb.get_default_graph()


def _forward_statistics(case, inputs):
    """What the forward normalized with: batch mean and biased variance, or the given ones."""
    if not case["is_training"]:
        return inputs["mean"], inputs["variance"]
    x = inputs["x"].astype(np.float64)
    axis = 1 if case["data_format"] == "NCHW" else x.ndim - 1
    axes = tuple(a for a in range(x.ndim) if a != axis)
    return x.mean(axis=axes), x.var(axis=axes)


def _nn_inputs(case):
    prefix = f"{case['id']}|in|"
    return {k[len(prefix):]: NN_ARRAYS[k] for k in NN_ARRAYS.files if k.startswith(prefix)}


@pytest.mark.parametrize("case", NN["cases"], ids=lambda c: c["id"])
def test_nn_op_matches_tensorflow(case, backend):
    inputs = _nn_inputs(case)
    before = {k: v.copy() for k, v in inputs.items()}
    x = inputs["x"]
    op = case["op"]
    if op == "moments":
        outs = fb.nn.moments(x, case["axes"], keep_dims=case["keepdims"])
    elif op == "weighted_moments":
        outs = fb.nn.weighted_moments(x, case["axes"], inputs["w"], keepdims=case["keepdims"])
    elif op == "batch_normalization":
        p = case["with_params"]
        outs = [fb.nn.batch_normalization(x, inputs["mean"], inputs["variance"],
                                          inputs["offset"] if p else None,
                                          inputs["scale"] if p else None, case["epsilon"])]
    elif op in ("relu", "relu6", "sigmoid", "tanh", "elu"):
        out = np.asarray(getattr(fb.nn, op)(x))
        ref = NN_ARRAYS[f"{case['id']}|out|0"]
        assert out.dtype == ref.dtype
        numbers = ~np.isnan(ref)
        if op in ("relu", "relu6"):  # exact, zeros' signs included
            np.testing.assert_array_equal(out, ref)
        else:  # TF's own approximations of exp and tanh (Eigen's), NumPy's here
            rtol, atol = tolerance(case["dtype"])
            np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol, equal_nan=True)
        zeros = numbers & (ref == 0) & (out == 0)  # (TF's elu(-1e-30) is 0, NumPy's not)
        np.testing.assert_array_equal(np.signbit(out[zeros]), np.signbit(ref[zeros]))
        outs = []
    elif op.endswith("_grad") and op != "fused_batch_norm_grad":
        # TF's activation gradients: (gradients, features/outputs), or (y, dy).
        dy = inputs["dy"]
        args = (x, dy) if op in ("sigmoid_grad", "tanh_grad") else (dy, x)
        out = np.asarray(getattr(fb.nn, op)(*args))
        ref = NN_ARRAYS[f"{case['id']}|out|0"]
        assert out.dtype == ref.dtype
        numbers = ~np.isnan(ref)
        # TF's bits on the CPU; TF rounds float16 after each operation where fastbn
        # rounds once, and the CUDA backend computes in float64: an ulp or so there.
        if op in ("relu_grad", "relu6_grad") or (
                ref.dtype != np.float16 and backend.name != "numba_cuda"):
            np.testing.assert_array_equal(out, ref)
            np.testing.assert_array_equal(np.signbit(out[numbers]), np.signbit(ref[numbers]))
        else:
            # (Absolute too: 1 - y * y cancels near y = +-1, in TF's rounding as in ours.)
            eps = np.finfo(ref.dtype).eps
            np.testing.assert_allclose(out, ref, rtol=2 * eps, atol=16 * eps, equal_nan=True)
        outs = []
    elif op == "fused_batch_norm_grad":
        outs = fb.nn.fused_batch_norm_grad(
            inputs["dy"], x, inputs["scale"], *_forward_statistics(case, inputs),
            epsilon=case["epsilon"], data_format=case["data_format"],
            is_training=case["is_training"])
    else:
        use_stats = not case["is_training"] or case["exponential_avg_factor"] != 1.0
        outs = fb.nn.fused_batch_norm(
            x, inputs["scale"], inputs["offset"],
            mean=inputs["mean"] if use_stats else None,
            variance=inputs["variance"] if use_stats else None,
            epsilon=case["epsilon"], data_format=case["data_format"],
            is_training=case["is_training"],
            exponential_avg_factor=case["exponential_avg_factor"])
    rtol, atol = tolerance(case["dtype"])
    for i, out in enumerate(outs):
        ref = NN_ARRAYS[f"{case['id']}|out|{i}"]
        assert np.asarray(out).dtype == ref.dtype, f"output {i} dtype"
        _close(out, ref, rtol, atol, f"output {i}")
    for k, v in inputs.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was modified")


with open(os.path.join(FIXTURES, "tf_scopes.json")) as _f:
    SCOPE_LOGS = json.load(_f)["logs"]
SCOPE_STATE_KEYS = (fb.GraphKeys.GLOBAL_VARIABLES, fb.GraphKeys.TRAINABLE_VARIABLES,
                    fb.GraphKeys.MODEL_VARIABLES, fb.GraphKeys.MOVING_AVERAGE_VARIABLES,
                    fb.GraphKeys.REGULARIZATION_LOSSES)


@pytest.mark.parametrize("index", range(len(SCOPE_LOGS)))
@pytest.mark.filterwarnings("ignore::fastbn.UpdateOpsWarning")  # (fastbn's own reminder)
def test_scope_program_matches_tensorflow(index):
    # Nested scopes (named, default-named, reused, regularizing) around batch_norm calls:
    # after each call the names in each variable collection, the regularization losses'
    # names and the update ops, and the first error's type, as TF gave them.
    def state():
        return [[v.name for v in fb.get_collection(key)] for key in SCOPE_STATE_KEYS] + [
            len(fb.get_collection(fb.GraphKeys.UPDATE_OPS))]

    program = scope_programs()[index]
    log = run_scope_program(program, fb.variable_scope, fb.batch_norm, fb.l2_regularizer,
                            fb.AUTO_REUSE, state)
    assert json.loads(json.dumps(log)) == SCOPE_LOGS[index]


with open(os.path.join(FIXTURES, "tf_signatures.json")) as _f:
    SIGNATURES = json.load(_f)["signatures"]


def _fastbn_callable(dotted):
    target = fb
    for part in dotted.split("."):
        target = getattr(target, part)
    return target.__init__ if inspect.isclass(target) else target


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_tensorflows(name):
    # TF's parameters, in TF's order, with TF's defaults where they are plain values (a
    # TF dtype or enum default only has to be a default); fastbn's own after them.
    ours = [p for p in inspect.signature(_fastbn_callable(name)).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    theirs = SIGNATURES[name]["parameters"]
    assert [p.name for p in ours[:len(theirs)]] == [t[0] for t in theirs], SIGNATURES[name]["tf"]
    for p, (param, has_default, default) in zip(ours, theirs):
        if has_default:
            assert p.default is not p.empty, f"{param} needs a default"
            if default != "<object>":
                assert plain_default(p.default) == default, f"{param} default"
    for p in ours[len(theirs):]:
        assert p.default is not p.empty, f"fastbn's own {p.name} needs a default"


with open(os.path.join(FIXTURES, "tf_initializers.json")) as _f:
    INITIALIZER_STATISTICS = json.load(_f)["statistics"]


@pytest.mark.parametrize("case", INITIALIZER_CASES, ids=[c[0] for c in INITIALIZER_CASES])
def test_random_initializer_draws_from_tensorflows_distribution(case):
    case_id, name, kwargs, shape, dtype, bounded = case
    init = getattr(fb, name)(seed=3, **kwargs)
    values = init(shape, dtype=np.dtype(dtype))
    assert values.shape == shape and values.dtype == dtype
    np.testing.assert_array_equal(values, init(shape, dtype=np.dtype(dtype)))  # a seed repeats
    want = INITIALIZER_STATISTICS[case_id]
    v = values.astype(np.float64)
    std = want["std"]
    assert abs(v.mean() - want["mean"]) < 5 * std / np.sqrt(v.size)
    assert abs(v.std() - std) < 0.02 * std
    if bounded:  # a large sample reaches the bounds: TF's and fastbn's agree
        assert abs(v.min() - want["min"]) < 0.01 * std
        assert abs(v.max() - want["max"]) < 0.01 * std


def test_random_initializer_arguments():
    with pytest.raises(ValueError, match="floating-point"):
        fb.random_normal_initializer(dtype=np.int32)
    with pytest.raises(ValueError, match="maxval is required"):
        fb.random_uniform_initializer()((3,), np.int32)
    ints = fb.random_uniform_initializer(2, 5, seed=0)((1000,), np.int32)
    assert ints.dtype == np.int32 and set(ints.tolist()) == {2, 3, 4}
    with pytest.raises(ValueError, match="mode"):
        fb.variance_scaling_initializer(mode="fan")
    with pytest.raises(ValueError, match="distribution"):
        fb.variance_scaling_initializer(distribution="cauchy")
    with pytest.raises(ValueError, match="scale"):
        fb.variance_scaling_initializer(scale=0.0)
    a, b = fb.glorot_uniform_initializer()((50,)), fb.glorot_uniform_initializer()((50,))
    assert not np.array_equal(a, b)  # no seed: fresh values, as TF without one
    # TF's slim idiom for GAN-style batch norm: gamma drawn around 1.
    with fb.Graph().as_default():
        fb.batch_norm(np.ones((4, 3), np.float32), scale=True, param_initializers={
            "gamma": fb.random_normal_initializer(1.0, 0.02, seed=0)})
        (gamma,) = fb.get_variables_by_name("gamma")
        assert gamma.dtype == np.float32 and np.all(np.abs(gamma.numpy() - 1.0) < 0.2)
