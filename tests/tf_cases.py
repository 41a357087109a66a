"""The grid of batch_norm configurations checked against TensorFlow.

Shared by the recorder (`tools/record_tf_fixtures.py`, run with TensorFlow)
and the test suite (`tests/test_tf_fixtures.py`, run without it): each
case is plain data, so both sides build the same call from it.

A case is a dict:
  id:            unique name
  shapes:        the input shape of each step (the batch size may change)
  dtype:         input dtype name
  kwargs:        batch_norm arguments, in a serializable form (see `decode`)
  training:      a bool constant, or a list of bools: an is_training
                 Variable set to each value before its step
  batch_weights: True to pass per-step batch weights
  tf_dtype:      the dtype TensorFlow ran it in, where TF cannot run `dtype`
  tf_kwargs:     overrides for the TF side (TF1 behaviour TF2 dropped)
"""

import itertools
import random

import numpy as np

SCOPE = "bn"
CUSTOM_UPDATES = "my_update_ops"


def _shapes(rank, data_format, channels=3, batches=(4, 6, 3)):
    spatial = {2: (), 3: (5,), 4: (4, 3), 5: (3, 2, 2)}[rank]
    if data_format == "NHWC":
        return [[b, *spatial, channels] for b in batches]
    return [[b, channels, *spatial] for b in batches]


def _param_shape(rank, data_format, channels=3):
    """How an adjustment shapes its per-channel values: TF broadcasts them as given."""
    if data_format == "NHWC":
        return [channels]
    return [1, channels] + [1] * (rank - 2)


def _updates_kw(mode):
    if mode == "default":
        return {}
    if mode == "inplace":
        return {"updates_collections": None}
    return {"updates_collections": [CUSTOM_UPDATES]}


def _tf_runs(case):
    """Whether TensorFlow 2.21 can run the case in its own dtype."""
    kw = case["kwargs"]
    if case["dtype"] != "float64":
        return True
    rank = len(case["shapes"][0])
    fused = kw.get("fused")
    updates_default = "updates_collections" not in kw
    if kw.get("renorm"):
        return False
    possible = not case.get("batch_weights") and rank in (2, 4) and "adjustment" not in kw
    slim_fused = fused is not False and possible and (
        kw.get("zero_debias_moving_mean") or rank == 2 or not updates_default)
    return not slim_fused


def cases():
    out = []

    def add(case):
        case.setdefault("training", True)
        case.setdefault("batch_weights", False)
        if not _tf_runs(case):
            case["tf_dtype"] = "float32"
        out.append(case)

    # The path-selecting grid: fused x rank x format x dtype x updates x zero-debias.
    for fused, rank, fmt, dtype, mode, zd in itertools.product(
            (None, True, False), (2, 3, 4, 5), ("NHWC", "NCHW"),
            ("float16", "float32", "float64"), ("default", "inplace", "custom"), (False, True)):
        kw = {"scope": SCOPE, "data_format": fmt, "scale": True, "decay": 0.9,
              **_updates_kw(mode)}
        if fused is not None:
            kw["fused"] = fused
        if zd:
            kw["zero_debias_moving_mean"] = True
        add({"id": f"grid-f{fused}-r{rank}-{fmt}-{dtype}-{mode}-zd{int(zd)}",
             "shapes": _shapes(rank, fmt), "dtype": dtype, "kwargs": kw})

    # is_training as a Variable switched between steps, and constant False.
    for (fused, rank, fmt, mode, zd), training in itertools.product(
            [(None, 4, "NHWC", "default", False), (None, 4, "NCHW", "default", False),
             (False, 4, "NHWC", "default", False), (None, 2, "NHWC", "default", False),
             (None, 4, "NHWC", "inplace", False), (None, 4, "NCHW", "custom", False),
             (False, 3, "NCHW", "inplace", False), (False, 4, "NHWC", "custom", True),
             (None, 2, "NCHW", "inplace", True), (None, 5, "NHWC", "default", False)],
            ([True, False, True, False], False)):
        kw = {"scope": SCOPE, "data_format": fmt, "scale": True, "decay": 0.8,
              **_updates_kw(mode)}
        if fused is not None:
            kw["fused"] = fused
        if zd:
            kw["zero_debias_moving_mean"] = True
        tid = "var" if isinstance(training, list) else "false"
        add({"id": f"training-{tid}-f{fused}-r{rank}-{fmt}-{mode}-zd{int(zd)}",
             "shapes": _shapes(rank, fmt), "dtype": "float32", "kwargs": kw,
             "training": training})

    # Every other argument, on a configuration of each path.
    paths = {
        "slimfused": ({"updates_collections": None}, 4),
        "core": ({}, 4),
        "corenonfused": ({"fused": False}, 4),
        "legacy": ({"updates_collections": [CUSTOM_UPDATES], "fused": False}, 4),
        "rank2": ({}, 2),
    }
    features = {
        "center0": {"center": False},
        "center0-scale0": {"center": False, "scale": False},
        "relu": {"activation_fn": "relu", "scale": True},
        "relu6": {"activation_fn": "relu6"},
        "tanh": {"activation_fn": "tanh"},
        "sigmoid": {"activation_fn": "sigmoid"},
        "elu": {"activation_fn": "elu"},
        "init": {"scale": True, "param_initializers": {
            "beta": ["constant", [0.5, -1.0, 2.0]], "gamma": ["constant", [1.5, 0.5, 2.0]],
            "moving_mean": ["constant", [0.1, 0.2, 0.3]],
            "moving_variance": ["constant", [2.0, 0.5, 1.0]]}},
        "reg": {"scale": True, "param_regularizers": {"beta": ["l2", 0.1], "gamma": ["l1", 0.2]},
                "param_initializers": {"beta": ["constant", [0.5, -1.0, 2.0]]}},
        "reg-beta": {"param_regularizers": {"beta": ["l1", 0.3]},
                     "param_initializers": {"beta": ["constant", [0.5, -1.0, 2.0]]}},
        "untrainable": {"trainable": False, "scale": True},
        "varcoll-list": {"scale": True, "variables_collections": ["my_vars"],
                         "outputs_collections": ["my_outputs"]},
        "varcoll-dict": {"scale": True, "variables_collections": {
            "beta": ["betas"], "moving_mean": ["means", "stats"],
            "moving_variance": ["stats"], "gamma": ["betas"]}},
        "decay0": {"decay": 0.0},
        "decay1": {"decay": 1.0},
        "eps": {"epsilon": 0.5, "scale": True},
        "eps-tiny": {"epsilon": 1e-8, "scale": True},
        "inference": {"scale": True, "param_initializers": {
            "moving_mean": ["constant", [0.1, 0.2, 0.3]],
            "moving_variance": ["constant", [2.0, 0.5, 1.0]]}, "__training": False},
    }
    for (pname, (pkw, rank)), (fname, fkw) in itertools.product(paths.items(), features.items()):
        for dtype in ("float32", "float16") if fname in ("relu", "init", "eps") else ("float32",):
            fkw = dict(fkw)
            training = fkw.pop("__training", True)
            kw = {"scope": SCOPE, "decay": 0.9, **pkw, **fkw}
            case = {"id": f"feature-{pname}-{fname}-{dtype}", "shapes": _shapes(rank, "NHWC"),
                    "dtype": dtype, "kwargs": kw, "training": training}
            if fname == "eps-tiny" and _is_fused(kw, rank):
                # TF1's fused_batch_norm raised epsilon to 1.001e-5; TF 2 does not.
                case["tf_kwargs"] = {"epsilon": 1.001e-5}
            add(case)

    # Batch weights (the legacy path), renorm, adjustment.
    for rank, fmt, dtype, mode in itertools.product(
            (2, 3, 4, 5), ("NHWC", "NCHW"), ("float16", "float32", "float64"),
            ("default", "inplace", "custom")):
        kw = {"scope": SCOPE, "data_format": fmt, "scale": True, "decay": 0.7,
              **_updates_kw(mode)}
        add({"id": f"weights-r{rank}-{fmt}-{dtype}-{mode}", "shapes": _shapes(rank, fmt),
             "dtype": dtype, "kwargs": kw, "batch_weights": True})
    # fused=True means "where possible": with batch weights TF takes the legacy path.
    for rank, fmt, mode in itertools.product((2, 4), ("NHWC", "NCHW"), ("default", "inplace")):
        kw = {"scope": SCOPE, "data_format": fmt, "scale": True, "decay": 0.7, "fused": True,
              **_updates_kw(mode)}
        add({"id": f"weights-fused-r{rank}-{fmt}-{mode}", "shapes": _shapes(rank, fmt),
             "dtype": "float32", "kwargs": kw, "batch_weights": True})
    add({"id": "weights-zd-training-var", "shapes": _shapes(4, "NCHW"), "dtype": "float32",
         "kwargs": {"scope": SCOPE, "data_format": "NCHW", "decay": 0.7,
                    "zero_debias_moving_mean": True},
         "batch_weights": True, "training": [True, False, True]})
    clippings = {"noclip": None, "clip": {"rmin": 0.9, "rmax": 1.1, "dmax": 0.05},
                 "rmax": {"rmax": 1.05}}
    for rank, fmt, dtype, (cname, clip) in itertools.product(
            (2, 3, 4, 5), ("NHWC", "NCHW"), ("float16", "float32", "float64"),
            clippings.items()):
        kw = {"scope": SCOPE, "data_format": fmt, "scale": True, "renorm": True,
              "renorm_decay": 0.6, "decay": 0.8,
              "param_initializers": {"moving_variance": ["constant", [2.0, 0.5, 1.0]]}}
        if clip is not None:
            kw["renorm_clipping"] = clip
        add({"id": f"renorm-r{rank}-{fmt}-{dtype}-{cname}", "shapes": _shapes(rank, fmt),
             "dtype": dtype, "kwargs": kw})
    add({"id": "renorm-training-var", "shapes": _shapes(4, "NHWC"), "dtype": "float32",
         "kwargs": {"scope": SCOPE, "renorm": True, "renorm_decay": 0.5, "decay": 0.5,
                    "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}},
         "training": [True, False, True, True]})
    for rank, fmt, dtype in itertools.product((2, 3, 4, 5), ("NHWC", "NCHW"),
                                              ("float16", "float32", "float64")):
        kw = {"scope": SCOPE, "data_format": fmt, "scale": True,
              "param_initializers": {"beta": ["constant", [0.5, -1.0, 2.0]],
                                     "gamma": ["constant", [1.5, 0.5, 2.0]]},
              "adjustment": {"scale": [1.05, 0.95, 1.0], "bias": [0.1, -0.05, 0.0],
                             "shape": _param_shape(rank, fmt)}}
        add({"id": f"adjust-r{rank}-{fmt}-{dtype}", "shapes": _shapes(rank, fmt),
             "dtype": dtype, "kwargs": kw})
    add({"id": "adjust-training-var", "shapes": _shapes(4, "NCHW"), "dtype": "float32",
         "kwargs": {"scope": SCOPE, "data_format": "NCHW", "renorm": True,
                    "adjustment": {"scale": [1.05, 0.95, 1.0], "bias": [0.1, -0.05, 0.0],
                                   "shape": _param_shape(4, "NCHW")}},
         "training": [True, False, True]})

    # Every argument at once, drawn.
    for i, (kw, rank, fmt, dtype, training, weighted) in enumerate(_mixed(2026, 40)):
        add({"id": f"mixed-{i}", "shapes": _shapes(rank, fmt), "dtype": dtype, "kwargs": kw,
             "training": training, "batch_weights": weighted})

    # Default scope names and a second layer beside the first.
    for pname, (pkw, rank) in paths.items():
        add({"id": f"noscope-{pname}", "shapes": _shapes(rank, "NHWC")[:1], "dtype": "float32",
             "kwargs": {**pkw, "scale": True}, "layers": 2})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return out


def _mixed(seed, count):
    """`count` configurations mixing every argument at once (a seeded draw, the same on
    both sides), where the grids above vary a few at a time: (kwargs, rank, data format,
    dtype, training, batch weights).  Only combinations TF accepts: renorm with the
    default updates and neither zero-debias nor batch weights."""
    draw = random.Random(seed)
    out = []
    for _ in range(count):
        rank, fmt = draw.choice((2, 3, 4, 5)), draw.choice(("NHWC", "NCHW"))
        dtype = draw.choice(("float16", "float32", "float64"))
        kw = {"scope": SCOPE, "data_format": fmt, "decay": draw.choice((0.9, 0.5, 0.0)),
              **_updates_kw(draw.choice(("default", "inplace", "custom")))}
        for key, value, chance in (("fused", draw.choice((True, False)), 0.5),
                                   ("zero_debias_moving_mean", True, 0.25),
                                   ("scale", True, 0.6), ("center", False, 0.15),
                                   ("epsilon", draw.choice((0.5, 1e-4, 0.01)), 0.3),
                                   ("activation_fn", draw.choice(
                                       ("relu", "relu6", "tanh", "sigmoid", "elu")), 0.4)):
            if draw.random() < chance:
                kw[key] = value
        inits = {name: ["constant", [round(draw.uniform(0.3, 2.0), 2) for _ in range(3)]]
                 for name in ("beta", "gamma", "moving_mean", "moving_variance")
                 if draw.random() < 0.25}
        if inits:
            kw["param_initializers"] = inits
        if draw.random() < 0.15:
            kw["param_regularizers"] = draw.choice(({"beta": ["l2", 0.1]},
                                                    {"gamma": ["l1", 0.2]}))
        weighted = draw.random() < 0.15
        if draw.random() < 0.15 and not weighted and "updates_collections" not in kw \
                and "zero_debias_moving_mean" not in kw:
            kw.update(renorm=True, renorm_decay=draw.choice((0.6, 0.99)))
            if draw.random() < 0.6:
                kw["renorm_clipping"] = draw.choice(({"rmin": 0.9, "rmax": 1.1, "dmax": 0.05},
                                                     {"rmax": 1.05}, {"dmax": 0.3}))
        if draw.random() < 0.1:
            kw["adjustment"] = {"scale": [1.05, 0.95, 1.0], "bias": [0.1, -0.05, 0.0],
                                "shape": _param_shape(rank, fmt)}
        training = draw.choice((True, True, False, [True, False, True], [False, True, True]))
        out.append((kw, rank, fmt, dtype, training, weighted))
    return out


def _is_fused(kw, rank):
    fused = kw.get("fused")
    if fused is False:
        return False
    if "updates_collections" not in kw and rank in (4, 5):
        return True  # the core layer fuses
    return rank in (2, 4)


def decode(kwargs, lib, activations):
    """Turns a case's serializable kwargs into real arguments.

    `lib` supplies `constant_initializer`, `l1_regularizer`, `l2_regularizer`
    and `adjustment(scale, bias)`; `activations` maps names to functions.
    """
    kw = dict(kwargs)
    if "param_initializers" in kw:
        kw["param_initializers"] = {
            k: lib.constant_initializer(v[1]) for k, v in kw["param_initializers"].items()}
    if "param_regularizers" in kw:
        kw["param_regularizers"] = {
            k: (lib.l1_regularizer if v[0] == "l1" else lib.l2_regularizer)(v[1])
            for k, v in kw["param_regularizers"].items()}
    if "activation_fn" in kw:
        kw["activation_fn"] = activations[kw["activation_fn"]]
    if "adjustment" in kw:
        adj = kw["adjustment"]
        kw["adjustment"] = lib.adjustment(np.reshape(adj["scale"], adj["shape"]),
                                          np.reshape(adj["bias"], adj["shape"]))
    return kw


def make_inputs(case, step, dtype=None):
    """Deterministic inputs of one step: per-channel means and scales that differ."""
    shape = case["shapes"][step]
    rng = np.random.RandomState(abs(hash_id(case["id"])) % (2**31) + step)
    fmt = case["kwargs"].get("data_format", "NHWC")
    axis = 1 if fmt == "NCHW" else len(shape) - 1
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    loc = rng.uniform(-3, 3, bshape)
    scale = rng.uniform(0.5, 2.5, bshape)
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype or case["dtype"])
    weights = rng.uniform(0.0, 2.0, shape[0]).astype(dtype or case["dtype"])
    return x, weights


def hash_id(text):
    """A stable string hash (Python's own is salted per process)."""
    h = 2166136261
    for ch in text.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h


# --------------------------------------------------------------------------
# gradients: tf.gradients of the layer's output, with respect to the input
# and every variable it reads

GRAD_PATHS = {
    "slimfused": {"updates_collections": None},
    "core": {},
    "corenonfused": {"fused": False},
    "legacy": {"updates_collections": [CUSTOM_UPDATES], "fused": False},
    "weights": {"_batch_weights": True},
}
# is_training: a constant, or a Variable reading True or False ("varT", "varF").
TRAININGS = (True, False, "varT", "varF")


def grad_cases():
    out = []

    def add(case):
        case.setdefault("batch_weights", False)
        case["shapes"] = case["shapes"][:1]
        training = case["training"]
        case["training"] = ([training == "varT"] if isinstance(training, str) else training)
        if not _tf_runs(case):
            case["tf_dtype"] = "float32"
        out.append(case)

    def kw_for(path, extra):
        kw = {"scope": SCOPE, "scale": True, **GRAD_PATHS[path], **extra}
        weighted = kw.pop("_batch_weights", False)
        return kw, weighted

    for path, training, fmt, rank, dtype in itertools.product(
            GRAD_PATHS, TRAININGS, ("NHWC", "NCHW"), (2, 3, 4, 5),
            ("float16", "float32", "float64")):
        kw, weighted = kw_for(path, {"data_format": fmt})
        add({"id": f"grad-{path}-t{training}-r{rank}-{fmt}-{dtype}",
             "shapes": _shapes(rank, fmt), "dtype": dtype, "kwargs": kw, "training": training,
             "batch_weights": weighted})
    for path, training, (center, scale) in itertools.product(
            GRAD_PATHS, (True, False), ((True, False), (False, True), (False, False))):
        kw, weighted = kw_for(path, {"center": center, "scale": scale})
        add({"id": f"grad-{path}-t{training}-c{int(center)}s{int(scale)}",
             "shapes": _shapes(4, "NHWC"), "dtype": "float32", "kwargs": kw,
             "training": training, "batch_weights": weighted})
    for path, training, act in itertools.product(
            GRAD_PATHS, (True, False), ("relu", "relu6", "sigmoid", "tanh", "elu")):
        kw, weighted = kw_for(path, {"activation_fn": act})
        add({"id": f"grad-{path}-t{training}-{act}", "shapes": _shapes(4, "NCHW"),
             "dtype": "float32", "kwargs": {**kw, "data_format": "NCHW"}, "training": training,
             "batch_weights": weighted})
    clippings = {"noclip": None, "clip": {"rmin": 0.9, "rmax": 1.1, "dmax": 0.05}}
    for training, fmt, rank, dtype, (cname, clip) in itertools.product(
            TRAININGS, ("NHWC", "NCHW"), (2, 4), ("float16", "float32", "float64"),
            clippings.items()):
        kw = {"scope": SCOPE, "scale": True, "renorm": True, "data_format": fmt,
              "param_initializers": {"moving_variance": ["constant", [2.0, 0.5, 1.0]],
                                     "gamma": ["constant", [1.5, 0.5, 2.0]]}}
        if clip is not None:
            kw["renorm_clipping"] = clip
        add({"id": f"grad-renorm-t{training}-r{rank}-{fmt}-{dtype}-{cname}",
             "shapes": _shapes(rank, fmt), "dtype": dtype, "kwargs": kw, "training": training})
    for training, fmt, rank in itertools.product(TRAININGS, ("NHWC", "NCHW"), (2, 4)):
        kw = {"scope": SCOPE, "scale": True, "data_format": fmt,
              "adjustment": {"scale": [1.05, 0.95, 1.0], "bias": [0.1, -0.05, 0.0],
                             "shape": _param_shape(rank, fmt)}}
        add({"id": f"grad-adjust-t{training}-r{rank}-{fmt}", "shapes": _shapes(rank, fmt),
             "dtype": "float32", "kwargs": kw, "training": training})
        kw = dict(kw, renorm=True, renorm_clipping={"rmax": 1.05})
        add({"id": f"grad-adjust-renorm-t{training}-r{rank}-{fmt}", "shapes": _shapes(rank, fmt),
             "dtype": "float32", "kwargs": kw, "training": training})
    for i, (kw, rank, fmt, dtype, training, weighted) in enumerate(_mixed(2027, 40)):
        add({"id": f"grad-mixed-{i}", "shapes": _shapes(rank, fmt), "dtype": dtype,
             "kwargs": kw, "training": training[:1] if isinstance(training, list) else training,
             "batch_weights": weighted})
    for path, training in itertools.product(("slimfused", "legacy"), TRAININGS):
        kw, weighted = kw_for(path, {"zero_debias_moving_mean": True})
        add({"id": f"grad-{path}-zd-t{training}", "shapes": _shapes(4, "NHWC"),
             "dtype": "float32", "kwargs": kw, "training": training})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return out


def make_output_gradient(case, dtype=None):
    """The gradient fed back into the output: deterministic, per case."""
    rng = np.random.RandomState(hash_id(case["id"] + "|dy") % (2**31))
    return rng.standard_normal(case["shapes"][0]).astype(dtype or case["dtype"])


# The sources whose gradients are recorded, in this order.
GRAD_SOURCES = ("x", "beta", "gamma", "moving_mean", "moving_variance")


# --------------------------------------------------------------------------
# Programs of nested variable scopes and batch_norm calls: the names, collections and
# errors that scoping gives, recorded from TF and replayed on fastbn.

def scope_programs(seed=2026, count=100):
    """`count` random programs (a seeded draw): lists of statements, each
    ["scope", name_or_scope, default_name, reuse, l2 scale or None, [statements]] or
    ["bn", kwargs, rank, is_training]; reuse "auto" for AUTO_REUSE; a scope's l2 scale
    gives it an l2 regularizer, the default of the variables created inside it."""
    draw = random.Random(seed)

    def body(depth):
        out = []
        for _ in range(draw.randint(1, 3)):
            if depth < 3 and draw.random() < 0.45:
                name = draw.choice((None, "a", "b", "BatchNorm", SCOPE))
                if name is None:
                    default, reuse = draw.choice(("BatchNorm", "blk")), draw.choice((None, "auto"))
                else:
                    default = draw.choice((None, "blk"))
                    reuse = draw.choice((None, None, None, True, "auto"))
                l2 = draw.choice((0.5, 2.0)) if draw.random() < 0.25 else None
                out.append(["scope", name, default, reuse, l2, body(depth + 1)])
                continue
            kw = {"scope": draw.choice((None, None, SCOPE, "BatchNorm", "x/y")),
                  "reuse": draw.choice((None, None, None, None, True, "auto"))}
            if kw["scope"] is None and draw.random() < 0.85:
                kw["reuse"] = None  # (a truthy reuse needs a scope name: mostly not tried)
            for key, value, chance in (("fused", draw.choice((True, False)), 0.4),
                                       ("zero_debias_moving_mean", True, 0.2),
                                       ("updates_collections", None, 0.3), ("scale", True, 0.5),
                                       ("center", False, 0.1), ("trainable", False, 0.1),
                                       ("renorm", True, 0.05)):
                if draw.random() < chance:
                    kw[key] = value
            out.append(["bn", kw, draw.choice((2, 4)), draw.choice((True, False))])
        return out

    return [body(0) for _ in range(count)]


def run_scope_program(program, variable_scope, batch_norm, l2_regularizer, auto_reuse,
                      state):
    """Runs `program` with a library's variable_scope, batch_norm and l2_regularizer;
    returns its log: ["enter", scope name] per scope, state() after each batch_norm call,
    and at the first ValueError or TypeError ["error", its type name] (the program stops
    there)."""
    log = []

    def run(statements):
        for statement in statements:
            if statement[0] == "scope":
                _, name, default, reuse, l2, inner = statement
                reuse = auto_reuse if reuse == "auto" else reuse
                regularizer = None if l2 is None else l2_regularizer(l2)
                with variable_scope(name, default_name=default, reuse=reuse,
                                    regularizer=regularizer) as scope:
                    log.append(["enter", scope.name])
                    run(inner)
            else:
                _, kw, rank, training = statement
                kw = dict(kw, reuse=auto_reuse if kw["reuse"] == "auto" else kw["reuse"])
                x = np.ones([4, 3] if rank == 2 else [2, 2, 2, 3], np.float32)
                batch_norm(x, is_training=training, **kw)
                log.append(["bn", *state()])

    try:
        run(program)
    except (ValueError, TypeError) as err:
        log.append(["error", type(err).__name__])
    return log


# fastbn's public callables with a TF counterpart: (fastbn's name, TF's), each a dotted
# path, TF's from `tf`, `tf1` (tf.compat.v1), `slim` or `raw` (tf.raw_ops).  Code ported
# from TF passes their arguments by name and by position: fastbn takes TF's parameters
# in TF's order (its own extras, such as `out=`, after them).
SIGNATURES = [
    ("batch_norm", "slim.batch_norm"),
    ("nn.moments", "tf1.nn.moments"),
    ("nn.weighted_moments", "tf1.nn.weighted_moments"),
    ("nn.batch_normalization", "tf1.nn.batch_normalization"),
    ("nn.fused_batch_norm", "tf1.nn.fused_batch_norm"),
    ("nn.relu", "tf.nn.relu"),
    ("nn.relu6", "tf.nn.relu6"),
    ("nn.sigmoid", "tf.nn.sigmoid"),
    ("nn.tanh", "tf.nn.tanh"),
    ("nn.elu", "tf.nn.elu"),
    ("nn.relu_grad", "raw.ReluGrad"),
    ("nn.relu6_grad", "raw.Relu6Grad"),
    ("nn.sigmoid_grad", "raw.SigmoidGrad"),
    ("nn.tanh_grad", "raw.TanhGrad"),
    ("nn.elu_grad", "raw.EluGrad"),
    ("Variable", "tf1.Variable.__init__"),
    ("Variable.assign", "tf1.Variable.assign"),
    ("Variable.assign_add", "tf1.Variable.assign_add"),
    ("Variable.assign_sub", "tf1.Variable.assign_sub"),
    ("VariableScope", "tf1.VariableScope.__init__"),
    ("variable_scope", "tf1.variable_scope.__init__"),
    ("get_variable", "tf1.get_variable"),
    ("get_variable_scope", "tf1.get_variable_scope"),
    ("Graph.get_collection", "tf1.Graph.get_collection"),
    ("Graph.get_collection_ref", "tf1.Graph.get_collection_ref"),
    ("Graph.add_to_collection", "tf1.Graph.add_to_collection"),
    ("Graph.add_to_collections", "tf1.Graph.add_to_collections"),
    ("get_collection", "tf1.get_collection"),
    ("get_collection_ref", "tf1.get_collection_ref"),
    ("add_to_collection", "tf1.add_to_collection"),
    ("add_to_collections", "tf1.add_to_collections"),
    ("global_variables", "tf1.global_variables"),
    ("local_variables", "tf1.local_variables"),
    ("trainable_variables", "tf1.trainable_variables"),
    ("model_variables", "tf1.model_variables"),
    ("moving_average_variables", "tf1.moving_average_variables"),
    ("get_regularization_losses", "tf1.losses.get_regularization_losses"),
    ("reset_default_graph", "tf1.reset_default_graph"),
    ("GradientTape", "tf.GradientTape.__init__"),
    ("GradientTape.gradient", "tf.GradientTape.gradient"),
    ("GradientTape.watch", "tf.GradientTape.watch"),
    ("GradientTape.watched_variables", "tf.GradientTape.watched_variables"),
    ("GradientTape.stop_recording", "tf.GradientTape.stop_recording"),
    ("GradientTape.reset", "tf.GradientTape.reset"),
    ("arg_scope", "slim.arg_scope"),
    ("add_arg_scope", "slim.add_arg_scope"),
    ("model_variable", "slim.model_variable"),
    ("get_variables", "slim.get_variables"),
    ("get_model_variables", "slim.get_model_variables"),
    ("get_variables_by_name", "slim.get_variables_by_name"),
    ("get_variables_by_suffix", "slim.get_variables_by_suffix"),
    ("l1_regularizer", "slim.l1_regularizer"),
    ("l2_regularizer", "slim.l2_regularizer"),
    ("constant_initializer", "tf1.constant_initializer.__init__"),
    ("zeros_initializer", "tf1.zeros_initializer.__init__"),
    ("ones_initializer", "tf1.ones_initializer.__init__"),
    ("random_normal_initializer", "tf1.random_normal_initializer.__init__"),
    ("truncated_normal_initializer", "tf1.truncated_normal_initializer.__init__"),
    ("random_uniform_initializer", "tf1.random_uniform_initializer.__init__"),
    ("variance_scaling_initializer", "tf1.variance_scaling_initializer.__init__"),
    ("glorot_uniform_initializer", "tf1.glorot_uniform_initializer.__init__"),
    ("glorot_normal_initializer", "tf1.glorot_normal_initializer.__init__"),
    ("zeros_initializer.__call__", "tf1.zeros_initializer.__call__"),
    ("constant_initializer.__call__", "tf1.constant_initializer.__call__"),
    ("random_normal_initializer.__call__", "tf1.random_normal_initializer.__call__"),
    ("variance_scaling_initializer.__call__", "tf1.variance_scaling_initializer.__call__"),
]


def plain_default(value):
    """A parameter's default as the fixtures hold it: None, a bool, a number or a str as
    itself; anything else (a TF dtype, an enum member) as the marker '<object>'."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "<object>"


# Random initializers: (id, TF1 name, arguments, shape, dtype, bounded). TF's random
# numbers are its own; what fastbn must share is the distribution: the recorder keeps
# the mean, standard deviation, minimum and maximum of TF's values (bounded: the
# distribution has hard bounds, which a large sample reaches).
INITIALIZER_CASES = [
    ("normal", "random_normal_initializer", {"mean": 1.0, "stddev": 0.02}, (300, 400),
     "float32", False),
    ("truncated", "truncated_normal_initializer", {"mean": -0.5, "stddev": 2.0}, (300, 400),
     "float32", True),
    ("uniform", "random_uniform_initializer", {"minval": -0.3, "maxval": 0.7}, (300, 400),
     "float32", True),
    ("uniform-default", "random_uniform_initializer", {}, (300, 400), "float64", True),
    ("scaling-default", "variance_scaling_initializer", {}, (3, 3, 64, 128), "float32", True),
    ("scaling-fan-out-uniform", "variance_scaling_initializer",
     {"scale": 2.0, "mode": "fan_out", "distribution": "uniform"}, (3, 3, 32, 64), "float32",
     True),
    ("scaling-fan-avg-untruncated", "variance_scaling_initializer",
     {"mode": "fan_avg", "distribution": "untruncated_normal"}, (500, 300), "float32", False),
    ("scaling-normal-alias", "variance_scaling_initializer", {"distribution": "normal"},
     (400, 250), "float32", True),
    ("scaling-rank-1", "variance_scaling_initializer", {"distribution": "uniform"}, (100000,),
     "float32", True),
    ("glorot-uniform", "glorot_uniform_initializer", {}, (300, 700), "float32", True),
    ("glorot-uniform-conv", "glorot_uniform_initializer", {}, (5, 5, 16, 32), "float64", True),
    ("glorot-normal", "glorot_normal_initializer", {}, (300, 700), "float32", True),
]
