#!/usr/bin/env python
"""Records TensorFlow's batch-norm results into fixture files for the test suite.

Runs `tf_slim.layers.batch_norm` (tf-slim 1.1, the living descendant of
tf.contrib.layers.batch_norm) and TF's nn ops in graph mode over the grid of
`tests/tf_cases.py`, and saves outputs, variable values after each step,
variable names, collection memberships and update-op counts, so that the
suite checks fastbn against TensorFlow without TensorFlow installed.

Run it in a venv of its own (see ../shared/REFERENCE.md):

    python3 -m venv ../tfref
    ../tfref/bin/pip install tensorflow-cpu==2.21.0 tf-slim==1.1.0 tf-keras==2.21.0
    ../tfref/bin/python tools/record_tf_fixtures.py

It writes tests/fixtures/tf_layer.{json,npz} (layer outputs, variables and
collections over several steps), tests/fixtures/tf_grad.{json,npz}
(tf.gradients of the layer), tests/fixtures/tf_nn.{json,npz} (the nn
ops, FusedBatchNormGrad and the activations' gradients included) and
tests/fixtures/tf_scopes.json (programs of nested scopes and batch_norm calls:
the variable names, collections and errors scoping gives) and
tests/fixtures/tf_signatures.json (the parameters of TF's counterpart of each of
fastbn's public callables) and tests/fixtures/tf_initializers.json (the statistics
of TF's random initializers' values).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain Eigen kernels: reproducible sums

import numpy as np
import tensorflow as tf
import tf_keras.src.legacy_tf_layers as _legacy_layers
import tf_keras.src.legacy_tf_layers.normalization as _legacy_norm

# tf-slim 1.1 names three things that TF 2.21 moved.
sys.modules["tf_keras.legacy_tf_layers"] = _legacy_layers
sys.modules["tf_keras.legacy_tf_layers.normalization"] = _legacy_norm
tf.compat.v1.disable_eager_execution()
from tensorflow.python.framework import ops as _ops  # noqa: E402

_ops.Tensor = tf.Tensor
from tensorflow.python.ops import cond as _cond, control_flow_ops as _cfo  # noqa: E402

_cfo.cond = _cond.cond
import tf_slim as slim  # noqa: E402

tf1 = tf.compat.v1
GK = tf1.GraphKeys
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import tf_cases  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures")
ACTIVATIONS = {"relu": tf.nn.relu, "relu6": tf.nn.relu6, "tanh": tf.tanh,
               "sigmoid": tf.sigmoid, "elu": tf.nn.elu}
VARIABLE_KEYS = (GK.GLOBAL_VARIABLES, GK.TRAINABLE_VARIABLES, GK.MODEL_VARIABLES,
                 GK.MOVING_AVERAGE_VARIABLES, GK.LOCAL_VARIABLES)


class _TFLib:
    """The TF side of `tf_cases.decode`."""

    def __init__(self, param_dtype):
        self.param_dtype = param_dtype
        self.constant_initializer = tf1.constant_initializer
        self.l1_regularizer = slim.l1_regularizer
        self.l2_regularizer = slim.l2_regularizer

    def adjustment(self, scale, bias):
        dtype = self.param_dtype

        def adjust(shape):
            return tf.constant(scale, dtype), tf.constant(bias, dtype)

        return adjust


def _names(items):
    return [getattr(item, "name", str(item)) for item in items]


def record_layer_case(case, arrays):
    dtype = case.get("tf_dtype", case["dtype"])
    param_dtype = tf.float64 if dtype == "float64" else tf.float32
    kwargs = tf_cases.decode({**case["kwargs"], **case.get("tf_kwargs", {})},
                             _TFLib(param_dtype), ACTIVATIONS)
    shapes = case["shapes"]
    training = case["training"]
    g = tf.Graph()
    with g.as_default():
        x_ph = tf1.placeholder(dtype, [None] + shapes[0][1:], name="x")
        feed_w = None
        if case["batch_weights"]:
            feed_w = tf1.placeholder(dtype, [None], name="batch_weights")
            kwargs["batch_weights"] = feed_w
        is_training = training
        if isinstance(training, list):
            is_training = tf1.Variable(True, trainable=False, name="is_training")
        ys = [slim.batch_norm(x_ph, is_training=is_training, **kwargs)
              for _ in range(case.get("layers", 1))]
        expected = {
            "variables": _names(g.get_collection(GK.GLOBAL_VARIABLES)),
            "collections": {},
            "op_counts": {},
            "regularization_losses": _names(g.get_collection(GK.REGULARIZATION_LOSSES)),
        }
        variable_keys = set(VARIABLE_KEYS)
        requested = case["kwargs"].get("variables_collections") or []
        for names in requested.values() if isinstance(requested, dict) else [requested]:
            variable_keys.update(names)
        for key in g.get_all_collection_keys():
            items = g.get_collection(key)
            if key in variable_keys:
                expected["collections"][key] = _names(items)
            elif not key.endswith("_context"):  # TF's control-flow bookkeeping
                expected["op_counts"][key] = len(items)
        updates = kwargs.get("updates_collections", GK.UPDATE_OPS)
        update_ops = []
        if updates is not None:
            for name in [updates] if isinstance(updates, str) else updates:
                update_ops += g.get_collection(name)
        variables = g.get_collection(GK.GLOBAL_VARIABLES)
        losses = g.get_collection(GK.REGULARIZATION_LOSSES)
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            for step in range(len(shapes)):
                x, w = tf_cases.make_inputs(case, step, dtype)
                feed = {x_ph: x}
                if feed_w is not None:
                    feed[feed_w] = w
                if isinstance(training, list):
                    is_training.load(training[step], sess)
                outs = sess.run(ys, feed)
                if update_ops:
                    sess.run(update_ops, feed)
                for layer, y in enumerate(outs):
                    arrays[f"{case['id']}|y|{step}|{layer}"] = y
                for var, value in zip(variables, sess.run(variables)):
                    arrays[f"{case['id']}|var|{var.name}|{step}"] = np.asarray(value)
                if losses:
                    arrays[f"{case['id']}|reg|{step}"] = np.array(sess.run(losses), np.float64)
    return expected


# --------------------------------------------------------------------------
# nn ops


def nn_cases():
    out = []
    rng_shapes = {2: [5, 3], 3: [4, 5, 3], 4: [3, 4, 2, 3], 5: [2, 3, 2, 2, 3]}
    for rank, dtype in [(r, d) for r in (2, 3, 4, 5) for d in ("float16", "float32", "float64")]:
        shape = rng_shapes[rank]
        axes_options = {(0,), tuple(range(rank - 1)), (0, *range(2, rank)), tuple(range(rank)),
                        (rank - 1,), (1,), (0, rank - 1)}
        for axes in map(list, sorted(axes_options)):
            for keepdims in (False, True):
                out.append({"op": "moments", "shape": shape, "dtype": dtype, "axes": axes,
                            "keepdims": keepdims})
                wshape = [shape[0]] + [1] * (rank - 1)
                out.append({"op": "weighted_moments", "shape": shape, "dtype": dtype,
                            "axes": axes, "keepdims": keepdims, "wshape": wshape})
        out.append({"op": "weighted_moments", "shape": shape, "dtype": dtype,
                    "axes": list(range(rank - 1)), "keepdims": False, "wshape": shape})
        out.append({"op": "weighted_moments", "shape": shape, "dtype": dtype,
                    "axes": list(range(rank - 1)), "keepdims": False, "wshape": shape,
                    "zero_weights": True})
        for fmt in ("NHWC", "NCHW"):
            pshape = [1] * rank
            pshape[1 if fmt == "NCHW" else rank - 1] = shape[1 if fmt == "NCHW" else rank - 1]
            for with_params in (True, False):
                out.append({"op": "batch_normalization", "shape": shape, "dtype": dtype,
                            "pshape": pshape, "with_params": with_params, "epsilon": 0.01})
            if dtype != "float64":
                for training in (True, False):
                    for factor in (1.0, 0.25) if training else (1.0,):
                        out.append({"op": "fused_batch_norm", "shape": shape, "dtype": dtype,
                                    "data_format": fmt, "is_training": training,
                                    "exponential_avg_factor": factor, "epsilon": 0.001})
                    out.append({"op": "fused_batch_norm_grad", "shape": shape, "dtype": dtype,
                                "data_format": fmt, "is_training": training, "epsilon": 0.01,
                                "exponential_avg_factor": 1.0})
    out.append({"op": "batch_normalization", "shape": [3, 4, 2, 3], "dtype": "float32",
                "pshape": [4, 1, 3], "with_params": True, "epsilon": 0.001})
    out.append({"op": "batch_normalization", "shape": [3, 4, 2, 3], "dtype": "float32",
                "pshape": [], "with_params": True, "epsilon": 0.001})
    for op in ("relu_grad", "relu6_grad", "sigmoid_grad", "tanh_grad", "elu_grad"):
        for dtype in ("float16", "float32", "float64"):
            out.append({"op": op, "shape": [4, 5, 6], "dtype": dtype})
    for op in ("relu", "relu6", "sigmoid", "tanh", "elu"):
        for dtype in ("float16", "float32", "float64"):
            out.append({"op": op, "shape": [4, 5, 6], "dtype": dtype})
    for i, case in enumerate(out):
        case["id"] = f"{case['op']}-{i}"
    return out


# Where the activations' gradients change, and what a product with 0 keeps (the sign of
# zero, NaN from infinities).
GATE_FEATURES = [0.0, -0.0, 6.0, 5.99, 6.01, 1e-30, -1e-30, np.inf, -np.inf, np.nan]
GATE_GRADIENTS = [-1.5, np.inf, -np.inf, np.nan, -0.0, 0.0]
# Where the activations themselves change, and what they do with zeros and NaN.
ACTIVATION_INPUTS = [0.0, -0.0, 6.0, 5.99, 6.01, 1e-30, -1e-30, 20.0, -20.0, 1e4, -1e4,
                     np.inf, -np.inf, np.nan]
# ... and where sigmoid's, tanh's and elu's gradients do.
SMOOTH_OUTPUTS = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-30, np.inf, -np.inf, np.nan]
SMOOTH_ACTIVATIONS = {"sigmoid_grad": lambda x: 1 / (1 + np.exp(-x)), "tanh_grad": np.tanh,
                      "elu_grad": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0)))}


def nn_inputs(case):
    rng = np.random.RandomState(tf_cases.hash_id(case["id"]) % (2**31))
    shape = case["shape"]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2.0) + rng.uniform(-2, 2))
    inputs = {"x": x.astype(case["dtype"])}
    if case["op"] == "weighted_moments":
        w = rng.uniform(0, 2, case["wshape"])
        if case.get("zero_weights"):
            w[..., 0] = 0.0
        inputs["w"] = w.astype(case["dtype"])
    if case["op"] == "batch_normalization":
        pshape = case["pshape"]
        pdtype = "float32" if case["dtype"] == "float16" else case["dtype"]
        inputs["mean"] = rng.uniform(-1, 1, pshape).astype(case["dtype"])
        inputs["variance"] = rng.uniform(0.5, 2, pshape).astype(case["dtype"])
        inputs["offset"] = rng.uniform(-1, 1, pshape).astype(case["dtype"])
        inputs["scale"] = rng.uniform(0.5, 2, pshape).astype(case["dtype"])
        del pdtype
    if case["op"] == "fused_batch_norm_grad":
        inputs["dy"] = rng.standard_normal(shape).astype(case["dtype"])
    if case["op"] in ("relu_grad", "relu6_grad"):
        # x: the features; the gradients: random, then every special value against
        # every special feature.
        x = (rng.standard_normal(shape) * 4 + 1).ravel()
        dy = rng.standard_normal(shape).ravel()
        grid = np.array([(f, g) for f in GATE_FEATURES for g in GATE_GRADIENTS])
    if case["op"] in SMOOTH_ACTIVATIONS:
        # x: outputs of the activation (what the op takes), then the special values.
        x = SMOOTH_ACTIVATIONS[case["op"]](rng.standard_normal(shape) * 3).ravel()
        dy = rng.standard_normal(shape).ravel()
        grid = np.array([(f, g) for f in SMOOTH_OUTPUTS for g in GATE_GRADIENTS])
    if case["op"] in ACTIVATIONS:
        x = (rng.standard_normal(shape) * 4).ravel()
        x[:len(ACTIVATION_INPUTS)] = ACTIVATION_INPUTS
        inputs = {"x": x.reshape(shape).astype(case["dtype"])}
    if case["op"].endswith("_grad") and case["op"] != "fused_batch_norm_grad":
        x[:len(grid)], dy[:len(grid)] = grid[:, 0], grid[:, 1]
        inputs = {"x": x.reshape(shape).astype(case["dtype"]),
                  "dy": dy.reshape(shape).astype(case["dtype"])}
    if case["op"] in ("fused_batch_norm", "fused_batch_norm_grad"):
        c = shape[1] if case["data_format"] == "NCHW" else shape[-1]
        for name, lo, hi in (("scale", 0.5, 2), ("offset", -1, 1), ("mean", -1, 1),
                             ("variance", 0.5, 2)):
            inputs[name] = rng.uniform(lo, hi, [c]).astype(np.float32)
    return inputs


def _fused_4d(x, fmt):
    """TF's fused kernel takes rank 4 (or 5): fold ranks 2 and 3 into rank 4."""
    shape = x.shape
    if len(shape) == 2:
        return ([shape[0], 1, 1, shape[1]] if fmt == "NHWC" else [shape[0], shape[1], 1, 1])
    if len(shape) == 3:
        return ([shape[0], shape[1], 1, shape[2]] if fmt == "NHWC"
                else [shape[0], shape[1], shape[2], 1])
    return list(shape)


def record_nn_case(case, arrays):
    inputs = nn_inputs(case)
    g = tf.Graph()
    with g.as_default():
        # Placeholders, not constants: grappler folds constant FusedBatchNorm nodes
        # into a single-output Const and breaks fetching the statistics.
        ph = {k: tf1.placeholder(v.dtype, v.shape, name=k) for k, v in inputs.items()}
        x = ph["x"]
        op = case["op"]
        if op == "moments":
            outs = tf1.nn.moments(x, case["axes"], keep_dims=case["keepdims"])
        elif op == "weighted_moments":
            outs = tf1.nn.weighted_moments(x, case["axes"], ph["w"], keep_dims=case["keepdims"])
        elif op in ACTIVATIONS:
            outs = [ACTIVATIONS[op](x)]
        elif op == "relu_grad":
            outs = [tf.raw_ops.ReluGrad(gradients=ph["dy"], features=x)]
        elif op == "relu6_grad":
            outs = [tf.raw_ops.Relu6Grad(gradients=ph["dy"], features=x)]
        elif op == "sigmoid_grad":
            outs = [tf.raw_ops.SigmoidGrad(y=x, dy=ph["dy"])]
        elif op == "tanh_grad":
            outs = [tf.raw_ops.TanhGrad(y=x, dy=ph["dy"])]
        elif op == "elu_grad":
            outs = [tf.raw_ops.EluGrad(gradients=ph["dy"], outputs=x)]
        elif op == "batch_normalization":
            with_params = case["with_params"]
            outs = [tf.nn.batch_normalization(
                x, ph["mean"], ph["variance"], ph["offset"] if with_params else None,
                ph["scale"] if with_params else None, case["epsilon"])]
        else:
            shape4 = _fused_4d(inputs["x"], case["data_format"])
            fmt = case["data_format"]
            if len(shape4) == 5:
                fmt = "NDHWC" if fmt == "NHWC" else "NCDHW"
            training = case["is_training"]
            factor = case["exponential_avg_factor"]
            use_stats = not training or factor != 1.0
            y, m, v = tf1.nn.fused_batch_norm(
                tf.reshape(x, shape4), ph["scale"], ph["offset"],
                mean=ph["mean"] if use_stats else None,
                variance=ph["variance"] if use_stats else None,
                epsilon=case["epsilon"], data_format=fmt, is_training=training,
                exponential_avg_factor=factor)
            outs = [tf.reshape(y, inputs["x"].shape), m, v]
            if op == "fused_batch_norm_grad":
                dx, dscale, doffset = tf.gradients(
                    y, [x, ph["scale"], ph["offset"]],
                    grad_ys=tf.reshape(ph["dy"], shape4))
                outs = [dx, dscale, doffset]
        with tf1.Session(graph=g) as sess:
            values = sess.run(list(outs), {ph[k]: v for k, v in inputs.items()})
    for name, value in inputs.items():
        arrays[f"{case['id']}|in|{name}"] = value
    for i, value in enumerate(values):
        arrays[f"{case['id']}|out|{i}"] = np.asarray(value)


def record_grad_case(case, arrays):
    """tf.gradients of the layer's output (times dy) for the input and its variables."""
    dtype = case.get("tf_dtype", case["dtype"])
    param_dtype = tf.float64 if dtype == "float64" else tf.float32
    kwargs = tf_cases.decode(case["kwargs"], _TFLib(param_dtype), ACTIVATIONS)
    shape = case["shapes"][0]
    training = case["training"]
    g = tf.Graph()
    with g.as_default():
        x_ph = tf1.placeholder(dtype, shape, name="x")
        feed_w = None
        if case["batch_weights"]:
            feed_w = tf1.placeholder(dtype, [shape[0]], name="batch_weights")
            kwargs["batch_weights"] = feed_w
        is_training = training
        if isinstance(training, list):
            is_training = tf1.Variable(training[0], trainable=False, name="is_training")
        y = slim.batch_norm(x_ph, is_training=is_training, **kwargs)
        by_name = {v.op.name.rsplit("/", 1)[-1]: v for v in g.get_collection(GK.GLOBAL_VARIABLES)
                   if v.op.name.startswith(tf_cases.SCOPE + "/")}
        names = [n for n in tf_cases.GRAD_SOURCES if n == "x" or n in by_name]
        sources = [x_ph if n == "x" else by_name[n] for n in names]
        dy = tf_cases.make_output_gradient(case, dtype)
        grads = tf.gradients(y, sources, grad_ys=tf.constant(dy))
        x, w = tf_cases.make_inputs(case, 0, dtype)
        feed = {x_ph: x}
        if feed_w is not None:
            feed[feed_w] = w
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            values = sess.run([gr for gr in grads if gr is not None], feed)
    it = iter(values)
    expected = {"sources": names, "none": []}
    for name, gr in zip(names, grads):
        if gr is None:
            expected["none"].append(name)
        else:
            arrays[f"{case['id']}|grad|{name}"] = np.asarray(next(it))
    return expected


SCOPE_STATE_KEYS = (GK.GLOBAL_VARIABLES, GK.TRAINABLE_VARIABLES, GK.MODEL_VARIABLES,
                    GK.MOVING_AVERAGE_VARIABLES, GK.REGULARIZATION_LOSSES)


def record_scope_programs():
    """The log of each of tf_cases.scope_programs() run on TF (see run_scope_program)."""
    logs = []
    for program in tf_cases.scope_programs():
        g = tf.Graph()
        with g.as_default():
            def state():
                return [_names(g.get_collection(key)) for key in SCOPE_STATE_KEYS] + [
                    len(g.get_collection(GK.UPDATE_OPS))]

            logs.append(tf_cases.run_scope_program(
                program, tf1.variable_scope, lambda x, **kw: slim.batch_norm(tf.constant(x), **kw),
                slim.l2_regularizer, tf1.AUTO_REUSE, state))
    return logs


def record_signatures():
    """TF's parameters of each of tf_cases.SIGNATURES: [name, has a default, default]
    (tf_cases.plain_default), in order, self left out."""
    import inspect

    spaces = {"tf": tf, "tf1": tf1, "slim": slim, "raw": tf.raw_ops}
    recorded = {}
    for ours, theirs in tf_cases.SIGNATURES:
        head, *path = theirs.split(".")
        target = spaces[head]
        for part in path:
            target = getattr(target, part)
        params = []
        for p in inspect.signature(target).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            has_default = p.default is not p.empty
            params.append([p.name, has_default,
                           tf_cases.plain_default(p.default) if has_default else None])
        recorded[ours] = {"tf": theirs, "parameters": params}
    return recorded


def record_initializers():
    """Statistics of TF's values for each of tf_cases.INITIALIZER_CASES."""
    recorded = {}
    for case_id, name, kwargs, shape, dtype, _ in tf_cases.INITIALIZER_CASES:
        g = tf.Graph()
        with g.as_default():
            init = getattr(tf1, name)(seed=1, **kwargs)
            values = init(list(shape), dtype=tf.as_dtype(dtype))
            with tf1.Session(graph=g) as sess:
                v = sess.run(values).astype(np.float64)
        recorded[case_id] = {"mean": float(v.mean()), "std": float(v.std()),
                             "min": float(v.min()), "max": float(v.max())}
    return recorded


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "tf_initializers.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "statistics": record_initializers()}, f,
                  indent=0)
    with open(os.path.join(OUT, "tf_signatures.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "tf_slim": "1.1.0",
                   "signatures": record_signatures()}, f, indent=0)
    with open(os.path.join(OUT, "tf_scopes.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "tf_slim": "1.1.0",
                   "logs": record_scope_programs()}, f, indent=0)
    layer_arrays, layer_cases = {}, []
    cases = tf_cases.cases()
    for i, case in enumerate(cases):
        case = dict(case)
        case["expected"] = record_layer_case(case, layer_arrays)
        layer_cases.append(case)
        if i % 50 == 0:
            print(f"layer {i}/{len(cases)} {case['id']}", flush=True)
    meta = {"tensorflow": tf.__version__, "tf_slim": "1.1.0", "cases": layer_cases}
    with open(os.path.join(OUT, "tf_layer.json"), "w") as f:
        json.dump(meta, f, indent=0, sort_keys=True)
    np.savez_compressed(os.path.join(OUT, "tf_layer.npz"), **layer_arrays)

    grad_arrays, gcases = {}, []
    for case in tf_cases.grad_cases():
        case = dict(case)
        case["expected"] = record_grad_case(case, grad_arrays)
        gcases.append(case)
    with open(os.path.join(OUT, "tf_grad.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "cases": gcases}, f, indent=0, sort_keys=True)
    np.savez_compressed(os.path.join(OUT, "tf_grad.npz"), **grad_arrays)
    print(f"recorded {len(gcases)} gradient cases", flush=True)

    nn_arrays, ncases = {}, nn_cases()
    for case in ncases:
        record_nn_case(case, nn_arrays)
    with open(os.path.join(OUT, "tf_nn.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "cases": ncases}, f, indent=0, sort_keys=True)
    np.savez_compressed(os.path.join(OUT, "tf_nn.npz"), **nn_arrays)
    print(f"recorded {len(layer_cases)} layer cases and {len(ncases)} nn cases into {OUT}")


if __name__ == "__main__":
    main()
