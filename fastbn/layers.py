"""`batch_norm`: tf.contrib.layers.batch_norm (tf_slim 1.1), computed eagerly.

tf_slim picks one of three implementations from the arguments, and each has
its own numbers, variables and collections; this module reproduces each:

* the *fused* path (`_slim_fused`): fused is True or None, rank 2 or 4, no
  batch_weights, renorm or adjustment, and zero-debias, rank 2 or a
  non-default updates collection.  float32 variables whatever the input
  dtype, TF1's epsilon floor, the moving variance fed with the
  Bessel-corrected batch variance.
* the *core-layer* path (`_core_layer`): no batch_weights, the default
  updates collection, no zero-debias.  Keras's BatchNormalization (V1):
  fused where Keras fuses (rank 4 or 5, float16/32, no renorm or
  adjustment), renorm, adjustment.
* the *legacy* path (`_legacy`): everything else.  `nn.moments` or
  `nn.weighted_moments`, variables in the input's dtype.
"""

import functools
import numbers

import numpy as np

from . import _tape, nn
from ._graph import GraphKeys, get_default_graph
from ._ops import Operation, UpdateTracker
from ._variables import Variable, get_variable, model_variable, variable_scope
from .arg_scope import add_arg_scope
from .backends.base import compute_dtype
from .initializers import ones_initializer, zeros_initializer

__all__ = ["batch_norm", "DATA_FORMAT_NHWC", "DATA_FORMAT_NCHW"]

DATA_FORMAT_NHWC = "NHWC"
DATA_FORMAT_NCHW = "NCHW"
_PARAM_NAMES = ("beta", "gamma", "moving_mean", "moving_variance")
_REGULARIZED = ("beta", "gamma")
_RENORM_KEYS = ("rmax", "rmin", "dmax")
_ZEROS = zeros_initializer()
_ONES = ones_initializer()
_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


# --------------------------------------------------------------------------
# argument checks


def _check_unit_interval(value, argument):
    if type(value) is float and 0.0 <= value <= 1.0:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating)):
        raise TypeError(f"{argument} must be a float in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument} must be in [0, 1], got {value}")
    return value


def _check_param_dict(value, argument, allowed):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{argument} must be a dict or None, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(
            f"{argument} has unknown keys {unknown}; expected some of {list(allowed)}"
        )
    for key, fn in value.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{argument}[{key!r}] must be callable, got {type(fn).__name__}")
    return value


def _check_collections(value, argument):
    """None, a collection name, or a list (tuple, set) of names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(
            isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else value
    raise TypeError(f"{argument} must be None, a collection name or a list of names, got {value!r}")


def _is_flag(value):
    """Whether `value` is a bool as TF takes one: a bool, or 1 or 0."""
    return isinstance(value, (bool, np.bool_)) or (
        isinstance(value, numbers.Real) and value in (0, 1))


def _shown(value):
    return repr(value) if isinstance(value, numbers.Real) else type(value).__name__


def _check_variables_collections(value):
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_PARAM_NAMES) - {"moving_stddev", "renorm_mean",
                                                           "renorm_stddev"})
        if unknown:
            raise ValueError(
                f"variables_collections has unknown keys {unknown}; expected some of "
                f"{list(_PARAM_NAMES)}"
            )
        for key, names in value.items():
            _check_collections(names, f"variables_collections[{key!r}]")
        return value
    return _check_collections(value, "variables_collections")


def _collections_for(variables_collections, name):
    """slim's utils.get_variable_collections."""
    if isinstance(variables_collections, dict):
        names = variables_collections.get(name)
    else:
        names = variables_collections
    if isinstance(names, str):
        names = [names]
    return names


def _add_to_variables_collections(graph, var, variables_collections, name):
    names = _collections_for(variables_collections, name)
    if names:
        graph.add_to_collections(names, var)


class _Training:
    """`is_training` as a bool constant or a boolean Variable read when needed."""

    __slots__ = ("constant", "variable")

    def __init__(self, is_training):
        if isinstance(is_training, Variable):
            if is_training.shape != () or is_training.dtype.kind not in "bi":
                raise TypeError(
                    "is_training must be a bool or a scalar boolean fastbn.Variable, got "
                    f"a Variable of shape {is_training.shape} and dtype {is_training.dtype}"
                )
            self.constant = None
            self.variable = is_training
        elif _is_flag(is_training) or (
            isinstance(is_training, np.ndarray) and is_training.shape == ()
            and is_training.dtype == np.bool_
        ):
            self.constant = bool(is_training)
            self.variable = None
        else:
            raise TypeError("is_training must be a bool (or 1 or 0) or a boolean "
                            f"fastbn.Variable, got {_shown(is_training)}")

    def now(self):
        if self.variable is None:
            return self.constant
        return bool(self.variable._value)

    @property
    def may_train(self):
        return self.constant is None or self.constant


# --------------------------------------------------------------------------
# moving averages, as training/moving_averages.py and Keras compute them


@functools.lru_cache(maxsize=256)
def _ema_rate(decay, dtype):
    """TF's `1 - decay`: a float32 constant (convert_to_tensor of a Python float), cast."""
    return dtype.type(np.float32(1.0 - decay))


def _ema(var, value, decay):
    """var -= (var - value) * (1 - decay), in the variable's dtype (in place: the
    variable owns its array)."""
    v = var._value
    delta = v - value.astype(v.dtype, copy=False)
    delta *= _ema_rate(decay, v.dtype)
    v -= delta


def _zero_debias_vars(var, model):
    """The `biased` and `local_step` shadow variables of TF's zero-debiased EMA."""
    make = model_variable if model else get_variable
    with variable_scope(var.op_name):
        biased = make("biased", shape=var.shape, dtype=var.dtype,
                      initializer=_ZEROS, trainable=False)
        local_step = make("local_step", shape=(), dtype=var.dtype,
                          initializer=_ZEROS, trainable=False)
    return biased, local_step


def _ema_zero_debias(var, biased, local_step, value, decay):
    dtype = var.dtype.type
    rate = _ema_rate(decay, var.dtype)
    b = biased._value
    biased._value = b - (b - np.asarray(value, var.dtype)) * rate
    local_step._value = local_step._value + dtype(1)
    bias_factor = dtype(1) - np.power(dtype(1) - rate, local_step._value)
    var._value = (biased._value / bias_factor).astype(var.dtype)


class _Updates:
    """Builds a layer's moving-average updates: applied now, or as collected ops."""

    __slots__ = ("graph", "training", "collections", "tracker", "prefix", "names")

    def __init__(self, graph, training, collections, layer_name):
        self.graph = graph
        self.training = training
        self.collections = collections
        self.prefix = layer_name + "/"
        self.names = {}
        self.tracker = None
        if collections is not None:
            trackers = graph._update_trackers
            self.tracker = trackers.get(layer_name)
            if self.tracker is None:
                self.tracker = trackers[layer_name] = UpdateTracker(graph, layer_name)

    def op(self, name, apply, deps=(), collected=True):
        """An update op that applies `apply()` if is_training reads True when it runs.

        `collected=False` makes a dependency of collected ops, which is not
        itself counted as pending.
        """
        training = self.training

        def run_if_training():
            if training.now():
                apply()

        tracker = self.tracker if collected else None
        return Operation(self.name(name), run_if_training, deps, tracker)

    def name(self, base):
        """TF's name for the call's next op called `base`: bn/AssignMovingAvg, ..._1, ..."""
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        return f"{self.prefix}{base}_{n}" if n else self.prefix + base

    def collect(self, *ops):
        for op in ops:
            self.graph.add_to_collections(self.collections, op)


# --------------------------------------------------------------------------
# the layer


@add_arg_scope
def batch_norm(inputs,
               decay=0.999,
               center=True,
               scale=False,
               epsilon=0.001,
               activation_fn=None,
               param_initializers=None,
               param_regularizers=None,
               updates_collections=GraphKeys.UPDATE_OPS,
               is_training=True,
               reuse=None,
               variables_collections=None,
               outputs_collections=None,
               trainable=True,
               batch_weights=None,
               fused=None,
               data_format=DATA_FORMAT_NHWC,
               zero_debias_moving_mean=False,
               scope=None,
               renorm=False,
               renorm_clipping=None,
               renorm_decay=0.99,
               adjustment=None):
    """Adds a Batch Normalization layer from http://arxiv.org/abs/1502.03167.

      "Batch Normalization: Accelerating Deep Network Training by Reducing
      Internal Covariate Shift", Sergey Ioffe, Christian Szegedy.

    `tf.contrib.layers.batch_norm` (tf_slim 1.1) on NumPy arrays, computed
    when called: it returns the normalized array, and creates or reuses the
    variables `beta`, `gamma`, `moving_mean` and `moving_variance` (and, by
    configuration, `moving_stddev`, `renorm_mean`, `renorm_stddev` and the
    zero-debias shadows) in the default graph, with TF's names and
    collections.

    Can be used as a normalizer function for conv2d and fully_connected. The
    normalization is over all but the last dimension if `data_format` is
    `NHWC` and all but the second dimension if `data_format` is `NCHW`.  In
    case of a 2D tensor this corresponds to the batch dimension, while in case
    of a 4D tensor this corresponds to the batch and space dimensions.

    Note: when training, the moving_mean and moving_variance need to be
    updated.  By default the update ops are placed in `GraphKeys.UPDATE_OPS`
    and must be run: in TF1 as a dependency of the train op, here with
    `fastbn.apply_updates()` after each step (or `fastbn.run(ops)`):

      y = fastbn.batch_norm(x, is_training=True, scope='bn', reuse=fastbn.AUTO_REUSE)
      ...
      fastbn.apply_updates()

    One can set updates_collections=None to update them in place, during the
    call.

    Args:
      inputs: An array with 2 or more dimensions, where the first dimension
        has `batch_size`.  float16, float32 or float64.  The normalization is
        over all but the last dimension if `data_format` is `NHWC` and the
        second dimension if `data_format` is `NCHW`.
      decay: Decay for the moving average.  Reasonable values for `decay` are
        close to 1.0, typically in the multiple-nines range: 0.999, 0.99,
        0.9, etc.  Lower `decay` value (recommend trying `decay`=0.9) if model
        experiences reasonably good training performance but poor validation
        and/or test performance.  Try zero_debias_moving_mean=True for
        improved stability.
      center: If True, add offset of `beta` to normalized tensor.  If False,
        `beta` is ignored.
      scale: If True, multiply by `gamma`.  If False, `gamma` is not used.
        When the next layer is linear (also e.g. `nn.relu`), this can be
        disabled since the scaling can be done by the next layer.
      epsilon: Small float added to variance to avoid dividing by zero.  The
        fused implementation raises it to at least 1.001e-5, as TF1 does.
      activation_fn: Activation function, default set to None to skip it and
        maintain a linear activation.  fastbn's own (`fastbn.nn.relu`, `relu6`,
        `sigmoid`, `tanh`, `elu`) are applied as the normalization writes its
        output where the backend can (relu on every backend), with the bits
        they give on their own.
      param_initializers: Optional initializers for beta, gamma, moving mean
        and moving variance: a dict of callables `(shape, dtype) -> array`.
      param_regularizers: Optional regularizer for beta and gamma: a dict of
        callables `(value) -> scalar`.  (As in tf_slim, the legacy path, taken
        with batch_weights or a custom updates collection without fusing,
        ignores them.)
      updates_collections: Collections to collect the update ops for
        computation.  The update ops need to be run after the step (see
        `fastbn.apply_updates`).  If None, the updates are computed in place.
      is_training: Whether or not the layer is in training mode: a bool or a
        boolean `fastbn.Variable`, read when the output is computed and again
        when an update op runs.  In training mode it would accumulate the
        statistics of the moments into `moving_mean` and `moving_variance`
        using an exponential moving average with the given `decay`.  When it
        is not in training mode then it would use the values of the
        `moving_mean` and the `moving_variance`.
      reuse: Whether or not the layer and its variables should be reused.  To
        be able to reuse the layer scope must be given.
      variables_collections: Optional collections for the variables (a list,
        or a dict from variable name to a list).
      outputs_collections: Collections to add the outputs to.
      trainable: If `True` also add variables to the graph collection
        `GraphKeys.TRAINABLE_VARIABLES`.
      batch_weights: An optional array of shape `[batch_size]`, containing a
        frequency weight for each batch item.  If present, then the batch
        normalization uses weighted mean and variance.  (This can be used to
        correct for bias in training example selection.)
      fused: if `None` or `True`, use a faster, fused implementation if
        possible.  If `False`, use the system recommended implementation.
      data_format: A string.  `NHWC` (default) and `NCHW` are supported.
      zero_debias_moving_mean: Use zero_debias for moving_mean.  It creates a
        new pair of variables 'moving_mean/biased' and 'moving_mean/local_step'.
      scope: Optional scope for `variable_scope`.
      renorm: Whether to use Batch Renormalization
        (https://arxiv.org/abs/1702.03275).  This adds extra variables during
        training.  The inference is the same for either value of this
        parameter.
      renorm_clipping: A dictionary that may map keys 'rmax', 'rmin', 'dmax'
        to scalars used to clip the renorm correction.  The correction `(r,
        d)` is used as `corrected_value = normalized_value * r + d`, with `r`
        clipped to [rmin, rmax], and `d` to [-dmax, dmax].  Missing rmax,
        rmin, dmax are set to inf, 0, inf, respectively.
      renorm_decay: Momentum used to update the moving means and standard
        deviations with renorm.  Unlike `momentum`, this affects training and
        should be neither too small (which would add noise) nor too large
        (which would give stale estimates).  Note that `decay` is still
        applied to get the means and variances for inference.
      adjustment: A function taking the shape of the input (a 1-D int array)
        and returning a pair (scale, bias) to apply to the normalized values
        (before gamma and beta), only during training.  For example,
        `adjustment = lambda shape: (
            np.random.uniform(0.93, 1.07, shape[-1:]),
            np.random.uniform(-0.1, 0.1, shape[-1:]))`
        will scale the normalized value by up to 7% up or down, then shift
        the result by up to 0.1 (with independent scaling and bias for each
        feature but shared across all examples), and finally apply gamma
        and/or beta.  If `None`, no adjustment is applied.

    Returns:
      An ndarray of the input's shape and dtype, the output of the layer.

    Raises:
      ValueError: If `data_format` is neither `NHWC` nor `NCHW`.
      ValueError: If the rank of `inputs` is below 2, or its channels
        dimension is empty.
      ValueError: If `batch_weights` is not None and `fused` is True.
      ValueError: If renorm is combined with batch_weights, a custom
        updates_collections or zero_debias_moving_mean.
      ValueError: If `reuse` is True and the variables do not exist, or
        they exist and the scope does not reuse.
      TypeError: For arguments of the wrong type.
    """
    x = nn.as_float_array(inputs, "inputs")
    if data_format not in (DATA_FORMAT_NHWC, DATA_FORMAT_NCHW):
        raise ValueError("data_format has to be either NCHW or NHWC.")
    if x.ndim < 2:
        raise ValueError(f"Inputs has unsupported rank {x.ndim}: expected rank >= 2 "
                         f"(shape {x.shape})")
    axis = 1 if data_format == DATA_FORMAT_NCHW else x.ndim - 1
    if x.shape[axis] == 0:
        raise ValueError(f"Inputs has an empty channels dimension (shape {x.shape}, "
                         f"data_format {data_format})")
    decay = _check_unit_interval(decay, "decay")
    renorm_decay = _check_unit_interval(renorm_decay, "renorm_decay")
    epsilon = nn._check_epsilon(epsilon)
    if activation_fn is not None and not callable(activation_fn):
        raise TypeError(f"activation_fn must be callable or None, got {activation_fn!r}")
    if adjustment is not None and not callable(adjustment):
        raise TypeError(f"adjustment must be callable or None, got {adjustment!r}")
    if fused not in (None, True, False):
        raise TypeError(f"fused must be True, False or None, got {fused!r}")
    for flag, argument in ((center, "center"), (scale, "scale"), (trainable, "trainable"),
                           (renorm, "renorm"),
                           (zero_debias_moving_mean, "zero_debias_moving_mean")):
        if not _is_flag(flag):
            raise TypeError(f"{argument} must be a bool (or 1 or 0), got {_shown(flag)}")
    center, scale, trainable, renorm, zero_debias_moving_mean = (
        bool(center), bool(scale), bool(trainable), bool(renorm),
        bool(zero_debias_moving_mean))
    initializers = _check_param_dict(param_initializers, "param_initializers", _PARAM_NAMES)
    regularizers = _check_param_dict(param_regularizers, "param_regularizers", _REGULARIZED)
    updates_collections = _check_collections(updates_collections, "updates_collections")
    variables_collections = _check_variables_collections(variables_collections)
    outputs_collections = _check_collections(outputs_collections, "outputs_collections")
    training = _Training(is_training)
    if batch_weights is not None:
        # (fused=True means "where possible", as in TF: with batch weights it is not, and
        # the call takes the legacy path.)
        batch_weights = _check_batch_weights(batch_weights, x)
    if renorm:
        clipping = renorm_clipping or {}
        if not isinstance(clipping, dict):
            raise TypeError(f"renorm_clipping must be a dict, got {type(clipping).__name__}")
        bad = set(clipping) - set(_RENORM_KEYS)
        if bad:
            raise ValueError(f"Received invalid keys for `renorm_clipping` argument: "
                             f"{clipping}. Supported values: {list(_RENORM_KEYS)}.")
        renorm_clipping = {k: float(v) for k, v in clipping.items() if v is not None}

    args = dict(
        x=x, axis=axis, decay=decay, center=center, scale=scale, epsilon=epsilon,
        initializers=initializers, regularizers=regularizers,
        updates_collections=updates_collections, training=training, reuse=reuse,
        variables_collections=variables_collections, trainable=trainable, scope=scope,
        # fastbn's own activations are applied as the normalization writes the output.
        activation=activation_fn if nn.activation_kind(activation_fn) else None,
    )
    default_updates = updates_collections == GraphKeys.UPDATE_OPS
    possible_to_fuse = (batch_weights is None and not renorm and x.ndim in (2, 4)
                        and adjustment is None)
    if fused is not False and possible_to_fuse and (
            zero_debias_moving_mean or x.ndim == 2 or not default_updates):
        outputs, node = _slim_fused(zero_debias=zero_debias_moving_mean, **args)
    elif batch_weights is None and default_updates and not zero_debias_moving_mean:
        outputs, node = _core_layer(
            fused=fused is not False, renorm=renorm, renorm_clipping=renorm_clipping,
            renorm_decay=renorm_decay, adjustment=adjustment, **args)
    else:
        if renorm:
            raise ValueError("renorm is not supported with batch_weights, "
                             "updates_collections or zero_debias_moving_mean")
        outputs, node = _legacy(batch_weights=batch_weights,
                                zero_debias=zero_debias_moving_mean, **args)
    outputs = nn.as_caller_kind(outputs, inputs)
    if activation_fn is not None and args["activation"] is None:
        outputs = activation_fn(outputs)
    if node is not None:
        node.inputs = inputs
        node.output = outputs
        node.activation = activation_fn
        for tape in _tape.recording():
            tape._record(node)
    if outputs_collections:
        get_default_graph().add_to_collections(outputs_collections, outputs)
    return outputs


def _node(x, axis, mean, variance, epsilon, training, gamma, beta, moving_mean,
          moving_variance, moving_grads, weights=None, adj=(1.0, 0.0), rd=(1.0, 0.0)):
    """A tape record of one call (see fastbn._tape._Node); vectors copied to float64."""
    node = _tape._Node()
    node.x = x
    node.axis = axis
    node.mean = np.array(mean, np.float64)
    node.variance = np.array(variance, np.float64)
    node.epsilon = epsilon
    node.training = training
    node.weights = weights
    node.gamma = gamma
    node.beta = beta
    node.gamma_value = 1.0 if gamma is None else gamma._value.astype(np.float64)
    node.adj_scale, node.adj_bias = (np.array(v, np.float64) for v in adj)
    node.r, node.d = (np.array(v, np.float64) for v in rd)
    node.moving_mean = moving_mean
    node.moving_variance = moving_variance
    node.moving_grads = moving_grads
    return node


def _fused_node(x, axis, gamma, beta, moving_mean, moving_variance, epsilon, training_now,
                mean, variance, moving_grads=None):
    """The record of a call through the fused op, which gives the moving statistics None.

    (Keras picks its fused op's statistics with a cond when is_training is a
    Variable: TF then gives them zeros, `moving_grads="zeros"`.)
    """
    if training_now:
        # The fused op returns the Bessel-corrected variance; it normalised with the biased.
        count = x.size // x.shape[axis]
        mean, variance = mean, np.asarray(variance, np.float64) / nn.bessel_factor(count)
    else:
        mean, variance = moving_mean._value, moving_variance._value
    return _node(x, axis, mean, variance, max(epsilon, nn.FUSED_MIN_EPSILON), training_now,
                 gamma, beta, moving_mean, moving_variance, moving_grads)


def _moving_grads(training, training_now):
    """What TF's non-fused paths give the moving statistics: None, zeros or values."""
    if training.constant is True:
        return None
    if training.constant is None and training_now:
        return "zeros"  # the cond's other branch
    return "values"


def _check_batch_weights(batch_weights, x):
    w = nn.as_numeric_array(batch_weights, "batch_weights")
    if w.shape != (x.shape[0],):
        raise ValueError(
            f"batch_weights must have shape [batch_size] = ({x.shape[0]},), got {w.shape}"
        )
    return w.astype(compute_dtype(x.dtype))


def _init(initializers, name, default):
    init = initializers.get(name)
    return default if init is None else init


def _normalize(x, axis, mean, variance, offset, scale, epsilon, activation):
    """The layer's output from per-channel statistics and parameters, through
    `activation` (one of fastbn's, or None)."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]

    def b(v):
        return None if v is None else np.asarray(v).reshape(shape)

    return nn.batch_normalization(x, b(mean), b(variance), b(offset), b(scale), epsilon,
                                  activation=activation)


def _fused_forward(x, axis, gamma, beta, mean, variance, epsilon, training_now, activation):
    """TF's fused kernel, as tf_slim and Keras call it (float32 parameters), through
    `activation` (one of fastbn's, or None)."""
    kind = nn.activation_kind(activation)
    channels = x.shape[axis]
    ct = compute_dtype(x.dtype)
    scale_v = gamma._value.astype(ct, copy=False) if gamma is not None else _filled(channels, ct, 1)
    offset_v = beta._value.astype(ct, copy=False) if beta is not None else _filled(channels, ct, 0)
    epsilon = max(epsilon, nn.FUSED_MIN_EPSILON)
    if training_now:
        return nn.fused_batch_norm_checked(x, axis, scale_v, offset_v, None, None, epsilon, True,
                                           activation=kind)
    return nn.fused_batch_norm_checked(
        x, axis, scale_v, offset_v, mean._value.astype(ct, copy=False),
        variance._value.astype(ct, copy=False), epsilon, False, activation=kind)


@functools.lru_cache(maxsize=64)
def _filled(channels, dtype, value):
    """A read-only vector of `value`s: the constant gamma or beta TF uses when absent."""
    vector = np.full(channels, value, dtype)
    vector.flags.writeable = False
    return vector


def _bessel_corrected_moments(x, axis):
    """The batch statistics the fused kernel would return (Bessel-corrected variance)."""
    ct = compute_dtype(x.dtype)
    mean, var = nn.channel_moments(x, axis)
    count = x.size // x.shape[axis]
    return mean.astype(ct), (var * nn.bessel_factor(count)).astype(ct)


def _check_training_input(x, training_now):
    if training_now and x.size == 0:
        raise ValueError(f"Inputs has no elements per channel to compute batch statistics "
                         f"from (shape {x.shape}) while is_training is True")


def _slim_fused(x, axis, decay, center, scale, epsilon, initializers, regularizers,
                updates_collections, training, reuse, variables_collections, trainable,
                scope, activation, zero_debias):
    """tf_slim's `_fused_batch_norm`."""
    graph = get_default_graph()
    channels = (x.shape[axis],)
    with variable_scope(scope, "BatchNorm", reuse=reuse) as sc:
        # float32 whatever the input, to avoid losing precision with float16 (as tf_slim).
        beta, gamma, moving_mean, moving_variance = _slim_variables(
            channels, _F32, center, scale, initializers, regularizers, variables_collections,
            trainable)
        training_now = training.now()
        _check_training_input(x, training_now)
        if not training_now and updates_collections is not None:
            _check_stale(graph, sc.name)
        outputs, mean, variance = _fused_forward(
            x, axis, gamma, beta, moving_mean, moving_variance, epsilon, training_now,
            activation)
        node = None
        if _tape.recording():
            node = _fused_node(x, axis, gamma, beta, moving_mean, moving_variance, epsilon,
                               training_now, mean, variance)
        if training.may_train:
            if not training_now and updates_collections is not None:
                # An is_training Variable that reads False now may read True when a
                # collected update op runs: capture this batch's statistics for it.
                mean, variance = _bessel_corrected_moments(x, axis)
            _update_moving_statistics(graph, training, updates_collections, sc.name,
                                      training_now, moving_mean, mean, moving_variance,
                                      variance, decay, zero_debias, False)
    return outputs, node


def _slim_variables(channels, dtype, center, scale, initializers, regularizers,
                    variables_collections, trainable):
    """beta, gamma (None unless center / scale), moving_mean, moving_variance, as tf_slim
    creates them: model variables, in this order, each in its variables_collections."""

    def make(name, default, trainable_, regularizer=None):
        return model_variable(name, channels, dtype, _init(initializers, name, default),
                              regularizer=regularizer, trainable=trainable_,
                              collections=_collections_for(variables_collections, name))

    beta = make("beta", _ZEROS, trainable, regularizers.get("beta")) if center else None
    gamma = make("gamma", _ONES, trainable, regularizers.get("gamma")) if scale else None
    return beta, gamma, make("moving_mean", _ZEROS, False), make("moving_variance", _ONES, False)


def _ema_fn(var, value, decay):
    return lambda: _ema(var, value, decay)


def _zero_debias_update(moving_mean, mean, decay, model):
    """The zero-debiased EMA of moving_mean, creating its shadow variables now."""
    biased, local_step = _zero_debias_vars(moving_mean, model)
    return lambda: _ema_zero_debias(moving_mean, biased, local_step, mean, decay)


def _update_moving_statistics(graph, training, collections, layer_name, training_now,
                              moving_mean, mean, moving_variance, variance, decay,
                              zero_debias, model):
    """The call's two moving-average updates: applied now (collections None, and only if
    training now), else collected as update ops.  Zero-debias shadows are created either
    way, as TF creates them with the layer."""
    update_mean = _zero_debias_update(moving_mean, mean, decay, model) if zero_debias else None
    if collections is None:
        # Applied directly: no closures or ops to build on the common in-place path.
        if training_now:
            if update_mean is None:
                _ema(moving_mean, mean, decay)
            else:
                update_mean()
            _ema(moving_variance, variance, decay)
        return
    if update_mean is None:
        update_mean = _ema_fn(moving_mean, mean, decay)
    updates = _Updates(graph, training, collections, layer_name)
    updates.collect(updates.op("AssignMovingAvg", update_mean),
                    updates.op("AssignMovingAvg", _ema_fn(moving_variance, variance, decay)))


def _check_stale(graph, layer_name):
    tracker = graph._update_trackers.get(layer_name)
    if tracker is not None:
        tracker.check_inference()


def _core_layer(x, axis, decay, center, scale, epsilon, initializers, regularizers,
                updates_collections, training, reuse, variables_collections, trainable,
                scope, activation, fused, renorm, renorm_clipping, renorm_decay, adjustment):
    """tf_slim's use of the core layer: Keras BatchNormalization (V1 behaviour)."""
    graph = get_default_graph()
    channels = (x.shape[axis],)
    param_dtype = _F32 if x.dtype == _F16 else x.dtype
    fused = (fused and x.ndim in (4, 5) and not renorm and adjustment is None
             and x.dtype != _F64)
    with variable_scope(scope, "BatchNorm", reuse=reuse) as sc:
        gamma = beta = None
        if scale:
            gamma = model_variable(
                "gamma", channels, param_dtype,
                _init(initializers, "gamma", _ONES),
                regularizer=regularizers.get("gamma"), trainable=trainable)
        if center:
            beta = model_variable(
                "beta", channels, param_dtype, _init(initializers, "beta", _ZEROS),
                regularizer=regularizers.get("beta"), trainable=trainable)
        mean_init = _init(initializers, "moving_mean", _ZEROS)
        var_init = _init(initializers, "moving_variance", _ONES)
        moving_mean = model_variable("moving_mean", channels, param_dtype, mean_init,
                                     trainable=False)
        moving_variance = model_variable("moving_variance", channels, param_dtype, var_init,
                                         trainable=False)
        if renorm:
            def stddev_init(shape, dtype):
                return np.sqrt(np.asarray(var_init(shape, dtype), dtype))

            moving_stddev = model_variable("moving_stddev", channels, param_dtype, stddev_init,
                                           trainable=False)
            renorm_mean = model_variable("renorm_mean", channels, param_dtype, mean_init,
                                         trainable=False)
            renorm_stddev = model_variable("renorm_stddev", channels, param_dtype, stddev_init,
                                           trainable=False)
        if variables_collections:
            # After creation, and on every call as tf_slim does.
            for var, name in ((moving_mean, "moving_mean"), (moving_variance, "moving_variance"),
                              (beta, "beta"), (gamma, "gamma")):
                if var is not None:
                    _add_to_variables_collections(graph, var, variables_collections, name)

        # Keras adds no updates for a frozen (non-trainable) layer.
        collect = trainable and training.may_train
        training_now = training.now() if training.may_train else False
        _check_training_input(x, training_now)
        if not training_now:
            _check_stale(graph, sc.name)
        if fused:
            outputs, mean, variance = _fused_forward(
                x, axis, gamma, beta, moving_mean, moving_variance, epsilon, training_now,
                activation)
            if collect:
                if not training_now:
                    mean, variance = _bessel_corrected_moments(x, axis)
                updates = _Updates(graph, training, updates_collections, sc.name)
            node = None
            if _tape.recording():
                node = _fused_node(x, axis, gamma, beta, moving_mean, moving_variance, epsilon,
                                   training_now, mean, variance,
                                   "zeros" if training.constant is None else None)
            if collect:
                if not training_now:
                    mean, variance = _bessel_corrected_moments(x, axis)
                updates = _Updates(graph, training, updates_collections, sc.name)
                updates.collect(updates.op("AssignMovingAvg", _ema_fn(moving_mean, mean, decay)),
                                updates.op("AssignMovingAvg",
                                           _ema_fn(moving_variance, variance, decay)))
            return outputs, node

        ct = compute_dtype(x.dtype)
        scale_v = None if gamma is None else gamma._value.astype(ct)
        offset_v = None if beta is None else beta._value.astype(ct)
        adj = rd = (1.0, 0.0)
        if not training.may_train:
            mean, variance = moving_mean._value, moving_variance._value
        else:
            if adjustment is not None:
                adj_scale, adj_bias = adjustment(np.array(x.shape, dtype=np.int32))
                if not training_now:
                    adj_scale, adj_bias = 1.0, 0.0
                adj = (_per_channel(adj_scale, channels[0], ct, "scale"),
                       _per_channel(adj_bias, channels[0], ct, "bias"))
                scale_v, offset_v = _compose(adj[0], adj[1], scale_v, offset_v)
            batch_mean, batch_var = (v.astype(param_dtype) for v in nn.channel_moments(x, axis))
            if training_now:
                mean, variance = batch_mean, batch_var
            else:
                mean, variance = moving_mean._value, moving_variance._value
            deps = ()
            updates = _Updates(graph, training, updates_collections, sc.name)
            if renorm:
                r, d, renorm_op = _renorm_correction(
                    batch_mean, batch_var, renorm_mean, renorm_stddev, epsilon, renorm_clipping,
                    renorm_decay, training_now, updates)
                scale_v, offset_v = _compose(r.astype(ct), d.astype(ct), scale_v, offset_v)
                rd = (r, d)
                deps = (renorm_op,)
            if collect:
                update_mean = updates.op("AssignMovingAvg",
                                         _ema_fn(moving_mean, batch_mean, decay), deps)
                if renorm:
                    def update_variance_fn():
                        _ema(moving_stddev, np.sqrt(batch_var + param_dtype.type(epsilon)), decay)
                        ms = moving_stddev._value
                        moving_variance._value = np.maximum(
                            ms * ms - param_dtype.type(epsilon), 0).astype(param_dtype)
                    update_variance = updates.op("AssignNewValue", update_variance_fn, deps)
                else:
                    update_variance = updates.op(
                        "AssignMovingAvg", _ema_fn(moving_variance, batch_var, decay), deps)
                updates.collect(update_mean, update_variance)
        outputs = _normalize(x, axis, mean, variance, offset_v, scale_v, epsilon, activation)
        node = None
        if _tape.recording():
            node = _node(x, axis, mean, variance, epsilon, training_now, gamma, beta, moving_mean,
                         moving_variance, _moving_grads(training, training_now), adj=adj, rd=rd)
    return outputs, node


def _per_channel(value, channels, dtype, what):
    try:
        return nn.as_channel_vector(np.asarray(value).reshape(-1) if np.size(value) > 1
                                    else np.asarray(value).reshape(()), channels, dtype,
                                    f"the adjustment's {what}")
    except ValueError:
        raise ValueError(f"adjustment must return a (scale, bias) pair broadcastable to the "
                         f"{channels} channels") from None


def _compose(scale, offset, then_scale, then_offset):
    """Keras's _compose_transforms: (x * scale + offset) * then_scale + then_offset."""
    if then_scale is not None:
        scale = scale * then_scale
        offset = offset * then_scale
    if then_offset is not None:
        offset = offset + then_offset
    return scale, offset


def _renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping,
                       renorm_decay, training_now, updates):
    """Keras's _renorm_correction_and_moments: (r, d) and the renorm-variable update."""
    dtype = renorm_mean.dtype.type
    stddev = np.sqrt(variance + dtype(epsilon))
    rstd = np.maximum(renorm_stddev._value, np.sqrt(dtype(epsilon)))
    r = stddev / rstd
    d = (mean - renorm_mean._value) / rstd
    if "rmin" in clipping:
        r = np.maximum(r, dtype(clipping["rmin"]))
    if "rmax" in clipping:
        r = np.minimum(r, dtype(clipping["rmax"]))
    if "dmax" in clipping:
        d = np.clip(d, -dtype(clipping["dmax"]), dtype(clipping["dmax"]))
    if not training_now:
        r, d = np.ones_like(r), np.zeros_like(d)

    def update_renorm_vars():
        _ema(renorm_mean, mean, renorm_decay)
        _ema(renorm_stddev, stddev, renorm_decay)

    # Keras builds the two renorm EMAs first: they take AssignMovingAvg and _1.
    updates.name("AssignMovingAvg")
    return r, d, updates.op("AssignMovingAvg", update_renorm_vars, collected=False)


def _legacy(x, axis, decay, center, scale, epsilon, initializers, regularizers,
            updates_collections, training, reuse, variables_collections, trainable, scope,
            activation, batch_weights, zero_debias):
    """tf_slim's own implementation: nn.moments / nn.weighted_moments."""
    graph = get_default_graph()
    channels = (x.shape[axis],)
    dtype = x.dtype
    with variable_scope(scope, "BatchNorm", reuse=reuse) as sc:
        # tf_slim's own path creates its variables without the regularizers.
        beta, gamma, moving_mean, moving_variance = _slim_variables(
            channels, dtype, center, scale, initializers, {}, variables_collections, trainable)
        training_now = training.now()
        if not training_now and updates_collections is not None:
            _check_stale(graph, sc.name)
        if training.may_train:
            _check_training_input(x, training_now)
            reduce_axes = [a for a in range(x.ndim) if a != axis]
            if batch_weights is None:
                batch_mean, batch_var = nn.moments(x, reduce_axes)
            else:
                w = batch_weights.reshape((-1,) + (1,) * (x.ndim - 1))
                batch_mean, batch_var = nn.weighted_moments(x, reduce_axes, w)
            _update_moving_statistics(graph, training, updates_collections, sc.name,
                                      training_now, moving_mean, batch_mean, moving_variance,
                                      batch_var, decay, zero_debias, True)
            if training_now:
                mean, variance = batch_mean, batch_var
            else:
                mean, variance = moving_mean._value, moving_variance._value
        else:
            mean, variance = moving_mean._value, moving_variance._value
        outputs = _normalize(x, axis, mean, variance,
                             None if beta is None else beta._value,
                             None if gamma is None else gamma._value, epsilon, activation)
        node = None
        if _tape.recording():
            weights = None
            if batch_weights is not None and training_now:
                weights = _position_weights(batch_weights, x, axis)
            node = _node(x, axis, mean, variance, epsilon, training_now, gamma, beta, moving_mean,
                         moving_variance, _moving_grads(training, training_now), weights=weights)
    return outputs, node


def _position_weights(batch_weights, x, axis):
    """Per-example weights laid out as (N, 1, M), the channel view's positions."""
    per_example = batch_weights.reshape((-1,) + (1,) * (x.ndim - 1))
    shape = list(x.shape)
    shape[axis] = 1
    n = int(np.prod(x.shape[:axis], dtype=np.int64))
    return np.ascontiguousarray(np.broadcast_to(per_example, shape)).reshape(n, 1, -1)
