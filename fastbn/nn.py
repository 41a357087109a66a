"""Array ops with TensorFlow's signatures: moments, batch normalization, activations.

These are what `fastbn.batch_norm` is made of, and usable on their own.
Every op takes NumPy arrays (or `fastbn.Variable`s, or array-likes), any
rank >= 2 where a channel axis is involved, and returns NumPy arrays; the
arithmetic runs on the current backend (`fastbn.backends.get()`).
Python lists and scalars become float32, as `tf.convert_to_tensor` makes them.

Device arrays (`__cuda_array_interface__`: Numba, CuPy, PyTorch CUDA
tensors) stay on the device: they go to the CUDA backend (`auto` picks it
for them) and full-size results come back as the caller's kind (a CuPy array
for CuPy input, a tensor for a tensor; otherwise a Numba device array).
Per-channel results (statistics, parameter gradients) are NumPy arrays.
"""

import math
import numbers

import numpy as np

from . import backends
from ._variables import Variable
from .backends.base import compute_dtype

__all__ = [
    "moments",
    "weighted_moments",
    "batch_normalization",
    "fused_batch_norm",
    "fused_batch_norm_grad",
    "relu",
    "relu6",
    "sigmoid",
    "tanh",
    "elu",
    "relu_grad",
    "relu6_grad",
    "sigmoid_grad",
    "tanh_grad",
    "elu_grad",
]

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# TF1's nn.fused_batch_norm raised epsilon to this (cuDNN's minimum, plus a margin).
FUSED_MIN_EPSILON = 1.001e-5
_F64 = np.dtype(np.float64)
_CHANNELS_LAST = ("NHWC", "NDHWC", "NWC")
_CHANNELS_FIRST = ("NCHW", "NCDHW", "NCW")


# --------------------------------------------------------------------------
# argument handling shared with the layer


is_device_array = backends.is_device_array


def _device_view(value, argument):
    """A device array as Numba sees it (zero-copy), for the CUDA backend."""
    try:
        return backends.as_numba_array(value)
    except ImportError:
        raise TypeError(f"{argument} is a device array: that needs the numba_cuda backend "
                        "(pip install 'fastbn[cuda]')") from None


def as_caller_kind(result, original):
    """A device result as the kind of array the caller passed in, where no copy is needed."""
    if result is None or type(result) is np.ndarray or not is_device_array(result):
        return result
    module = type(original).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy.asarray(result)
    if module == "torch":
        import torch

        return torch.as_tensor(result, device=original.device)
    return result


def as_float_array(value, argument):
    """`value` as a float16/32/64 ndarray (no copy when it is one already).

    Raises TypeError naming `argument` for anything else.  Python lists and
    scalars of floats become float32, as TensorFlow converts them.  Device
    arrays are returned as device arrays.
    """
    if isinstance(value, np.ndarray):
        array = value
    elif is_device_array(value):
        array = _device_view(value, argument)
        if np.dtype(array.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{argument} must be a floating-point array (float16, float32 or "
                            f"float64), got dtype {array.dtype}")
        return array
    elif isinstance(value, Variable):
        array = value._value
    else:
        if value is None or isinstance(value, (str, bytes, dict, set)):
            raise TypeError(
                f"{argument} must be a floating-point array, got {type(value).__name__}"
            )
        native = not hasattr(value, "__array__") and not hasattr(value, "__array_interface__")
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{argument} must be a floating-point array: {err}") from None
        if native and array.dtype == np.float64:
            array = array.astype(np.float32)
    if not array.dtype.isnative and array.dtype.kind == "f":
        # Data read from a big-endian file: TF takes it in its native type; so do we,
        # on a copy, the kernels computing in the machine's order only.
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{argument} must be a floating-point array (float16, float32 or float64), "
            f"got dtype {array.dtype}"
        )
    return array


def as_numeric_array(value, argument):
    """`value` (an array-like or a Variable) as a NumPy array of numbers, else TypeError."""
    if isinstance(value, Variable):
        value = value._value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{argument} must be an array of numbers: {err}") from None
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{argument} must be numeric, got dtype {array.dtype}")
    return array


def _is_channel_vector(value, channels, *dtypes):
    """Whether `value` is already a contiguous 1-D ndarray of `channels` in one of `dtypes`."""
    return (type(value) is np.ndarray and value.dtype in dtypes
            and value.shape == (channels,) and value.flags.c_contiguous)


def as_channel_vector(value, channels, dtype, argument):
    """A per-channel parameter as a contiguous 1-D array of `channels` in `dtype`.

    A Variable's value is copied: what is returned may be handed back to the caller.
    """
    if type(value) is np.ndarray and value.shape == (channels,) and value.dtype.kind == "f":
        # The usual case, a float vector: at most a conversion.
        return np.ascontiguousarray(value, dtype)
    if isinstance(value, Variable):
        value = value._value.copy()
    if _is_channel_vector(value, channels, dtype):
        return value
    array = as_numeric_array(value, argument)
    if array.ndim == 0:
        return np.full(channels, array, dtype)
    if array.shape != (channels,):
        raise ValueError(
            f"{argument} must have one value per channel ({channels}), got shape {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=dtype)


def channel_axis(data_format, ndim, argument="data_format"):
    """The channel axis (1 or ndim-1) of a data format name."""
    if data_format in _CHANNELS_LAST:
        return ndim - 1
    if data_format in _CHANNELS_FIRST:
        return 1
    raise ValueError(
        f"{argument} has to be either NCHW or NHWC (or NCDHW/NDHWC), got {data_format!r}"
    )


def channel_shape(shape, axis):
    """The (N, C, M) shape that puts the channel axis `axis` of `shape` in the middle."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def channel_view(x, axis):
    """`x` as an (N, C, M) array with the channel axis `axis` in the middle."""
    return x.reshape(channel_shape(x.shape, axis))


def check_out(out, x, argument="out"):
    """Validates an `out=` buffer for a result of x's shape and dtype."""
    if is_device_array(x) or is_device_array(out):
        if not (is_device_array(x) and is_device_array(out)):
            raise TypeError(f"{argument} must live where x lives (both NumPy, or both on the "
                            "device)")
        out = _device_view(out, argument)
        if tuple(out.shape) != tuple(x.shape) or np.dtype(out.dtype) != np.dtype(x.dtype):
            raise ValueError(f"{argument} must have x's shape {x.shape} and dtype {x.dtype}")
        return out
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{argument} must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{argument} must have the input's shape {x.shape}, got {out.shape}")
    if out.dtype != x.dtype:
        order = "" if out.dtype.isnative else " in the machine's byte order"
        raise TypeError(f"{argument} must have the input's dtype {x.dtype}{order}, got "
                        f"{out.dtype.str if order else out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{argument} must be writeable")
    return out


def _memory_layout(a):
    """(data pointer, strides, lowest byte, highest byte + 1) of a host or device array,
    from its array interface; the bytes None where it has no elements."""
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:
        # A NumPy array, or Numba's simulator's device array (a NumPy array inside).
        iface = getattr(a, "_ary", a).__array_interface__
    shape = tuple(iface["shape"])
    itemsize = np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides")
    if strides is None:
        strides = tuple(itemsize * math.prod(shape[i + 1:]) for i in range(len(shape)))
    pointer = iface["data"][0]
    if 0 in shape:
        return pointer, tuple(strides), None, None
    low = pointer + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    high = pointer + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0) + itemsize
    return pointer, tuple(strides), low, high


def _c_contiguous(a):
    """Whether a host or device array's elements lie in C order without gaps."""
    _, strides, _, _ = _memory_layout(a)
    itemsize = np.dtype(a.dtype).itemsize
    expected = itemsize
    for n, stride in zip(reversed(tuple(a.shape)), reversed(strides)):
        if n > 1 and stride != expected:
            return False
        expected *= n
    return True


def _check_flat_on_device(a, argument):
    """The elementwise device kernels run over an array's elements as one flat run:
    a device array `a` (None passes) must be C-contiguous."""
    if a is not None and is_device_array(a) and not _c_contiguous(a):
        raise ValueError(f"{argument} must be C-contiguous on the device")


def _writes_over(out, a):
    """Whether writing `out` (of a's shape) could change elements of `a` other than the
    one at the same index: they share memory and are not the same elements.  The kernels
    read each element before writing the one at its index, so `out` may be `a` itself."""
    if out is a:
        return False
    if type(out) is np.ndarray and not np.may_share_memory(out, a):
        return False  # (the usual answer on the host, without building interfaces)
    out_pointer, out_strides, out_low, out_high = _memory_layout(out)
    pointer, strides, low, high = _memory_layout(a)
    if out_low is None or low is None or out_high <= low or high <= out_low:
        return False
    return (out_pointer, out_strides) != (pointer, strides)


def _out_view(out, shape3, *inputs):
    """`out` reshaped to the channel shape `shape3` if the kernels can write through such
    a view, else None: where it is not contiguous, or where writing it would change one
    of the full-size `inputs` under the kernels (overlapping them, but not exactly)."""
    if out is None:
        return None
    for a in inputs:
        if _writes_over(out, a):
            return None
    if is_device_array(out):
        return _device_view(out, "out").reshape(shape3)
    if not out.flags.c_contiguous:
        return None
    return out.reshape(shape3)


def _finish(y3, x, out, out3):
    """The result in x's shape: `out` when given (out3 being its (N, C, M) view, or None
    where the backend was given none and `out` still has to be filled)."""
    if out is None:
        return y3.reshape(x.shape)
    if y3 is not out3:
        if is_device_array(out):
            # A device-to-device copy: Numba's device arrays take no `[...] =`.
            _device_view(out, "out").copy_to_device(y3.reshape(x.shape))
        else:
            np.copyto(out, y3.reshape(x.shape))
    return out


def channel_moments(x, axis):
    """Per-channel batch mean and biased variance as float64 host vectors."""
    return backends.get_for(x).moments(channel_view(x, axis))


def _check_epsilon(epsilon, argument="epsilon"):
    if type(epsilon) is float and epsilon >= 0.0:
        return epsilon
    if isinstance(epsilon, (bool, np.bool_)) or not isinstance(epsilon, (numbers.Real, np.floating)):
        raise TypeError(f"{argument} must be a non-negative float, got {epsilon!r}")
    epsilon = float(epsilon)
    if not epsilon >= 0.0:
        raise ValueError(f"{argument} must be a non-negative float, got {epsilon!r}")
    return epsilon


def _keepdims(keep_dims, keepdims):
    if keep_dims is not None and keepdims is not None:
        raise ValueError("Cannot specify both 'keep_dims' and 'keepdims'")
    value = keepdims if keepdims is not None else keep_dims
    return bool(value) if value is not None else False


def _normalize_axes(axes, ndim):
    if isinstance(axes, (numbers.Integral, np.integer)):
        axes = [axes]
    if isinstance(axes, (str, bytes)):
        raise TypeError(f"axes must be an int or a list of ints, got {axes!r}")
    try:
        axes = [int(a) for a in axes]
    except TypeError:
        raise TypeError(f"axes must be an int or a list of ints, got {axes!r}") from None
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axes has {a}, out of range for an input of rank {ndim}")
        a %= ndim
        if a in out:
            raise ValueError(f"axes lists axis {a} twice")
        out.append(a)
    return sorted(out)


def _reduction_layout(shape, axes):
    """How to view x as (N, C, M) so that reducing `axes` is reducing N and M.

    Returns (perm, kept): `perm` is None when the kept axes are contiguous (a
    plain reshape does), else the transposition that makes them so.
    """
    ndim = len(shape)
    kept = [a for a in range(ndim) if a not in axes]
    if not kept or kept == list(range(kept[0], kept[-1] + 1)):
        return None, kept
    return axes + kept, kept


def _reduced_view(x, axes):
    perm, kept = _reduction_layout(x.shape, axes)
    if perm is not None:
        x = x.transpose(perm)
        lo = len(axes)
    else:
        lo = kept[0] if kept else x.ndim
    hi = lo + len(kept)
    shape = x.shape
    n = int(np.prod(shape[:lo], dtype=np.int64))
    c = int(np.prod(shape[lo:hi], dtype=np.int64))
    m = int(np.prod(shape[hi:], dtype=np.int64))
    return x.reshape(n, c, m), perm, kept


def _moments_result(x, axes, kept, mean, variance, keep_dims, dtype):
    shape = x.shape
    if keep_dims:
        out_shape = tuple(1 if a in axes else shape[a] for a in range(x.ndim))
    else:
        out_shape = tuple(shape[a] for a in kept)
    return mean.reshape(out_shape).astype(dtype), variance.reshape(out_shape).astype(dtype)


# --------------------------------------------------------------------------
# moments


def moments(x, axes, shift=None, name=None, keep_dims=None, keepdims=None):
    """Mean and (biased) variance of `x` over `axes`, as `tf.nn.moments`.

    Args:
      x: a float16, float32 or float64 array.
      axes: the axes to reduce over (an int or a list).
      shift: unused, as in TF.
      keep_dims / keepdims: keep the reduced axes with length 1.

    Returns:
      `(mean, variance)` in x's dtype (float16 input is reduced in float32).
    """
    x = as_float_array(x, "x")
    axes = _normalize_axes(axes, x.ndim)
    keep = _keepdims(keep_dims, keepdims)
    x3, _, kept = _reduced_view(x, axes)
    mean, variance = backends.get_for(x).moments(x3)
    return _moments_result(x, axes, kept, mean, variance, keep, x.dtype)


def weighted_moments(x, axes, frequency_weights, name=None, keep_dims=None, keepdims=None):
    """Frequency-weighted mean and variance, as `tf.nn.weighted_moments`.

    `frequency_weights` must broadcast to x's shape; the statistics divide
    by the sum of the broadcast weights over `axes` and are 0 where it is 0.
    """
    x = as_float_array(x, "x")
    axes = _normalize_axes(axes, x.ndim)
    keep = _keepdims(keep_dims, keepdims)
    w = as_numeric_array(frequency_weights, "frequency_weights")
    try:
        np.broadcast_shapes(w.shape, x.shape)
    except ValueError:
        raise ValueError(
            f"frequency_weights of shape {w.shape} does not broadcast to x's shape {x.shape}"
        ) from None
    if w.ndim > x.ndim or np.broadcast_shapes(w.shape, x.shape) != x.shape:
        raise ValueError(
            f"frequency_weights of shape {w.shape} must broadcast to x's shape {x.shape}"
        )
    x3, perm, kept = _reduced_view(x, axes)
    if x3.shape[0] * x3.shape[2] == 0:
        # No values: a total weight of 0, and TF's div_no_nan gives 0.
        mean = variance = np.zeros(x3.shape[1])
    else:
        w3 = _weights_view(w, x, x3, perm, kept, compute_dtype(x.dtype))
        mean, variance = backends.get_for(x).moments(x3, w3)
    return _moments_result(x, axes, kept, mean, variance, keep, x.dtype)


def _weights_view(w, x, x3, perm, kept, dtype):
    """Weights in the (N, 1, M) or (N, C, M) layout of `x3`."""
    full = w.reshape((1,) * (x.ndim - w.ndim) + w.shape)
    if all(full.shape[a] == 1 for a in kept):
        # Shared by all channels: one weight per (N, M) position.
        target = tuple(1 if a in kept else x.shape[a] for a in range(x.ndim))
        wb = np.broadcast_to(full, target)
        if perm is not None:
            wb = wb.transpose(perm)
        return np.ascontiguousarray(wb, dtype=dtype).reshape(x3.shape[0], 1, x3.shape[2])
    wb = np.broadcast_to(full, x.shape)
    if perm is not None:
        wb = wb.transpose(perm)
    return np.ascontiguousarray(wb, dtype=dtype).reshape(x3.shape)


# --------------------------------------------------------------------------
# normalization


def _param_layout(x, params):
    """The channel axis of broadcastable per-channel parameters, or None if generic.

    Returns (axis, C): the single axis along which the parameters vary
    (-1 when all are scalars).  None when they vary along several axes.
    """
    axis = -1
    for name, p in params:
        if p is None:
            continue
        if p.ndim > x.ndim:
            raise ValueError(f"{name} of shape {p.shape} has a higher rank than x {x.shape}")
        aligned = (1,) * (x.ndim - p.ndim) + p.shape
        for a, d in enumerate(aligned):
            if d == 1:
                continue
            if d != x.shape[a]:
                raise ValueError(f"{name} of shape {p.shape} does not broadcast to x {x.shape}")
            if axis not in (-1, a):
                return None
            axis = a
    return axis


def _param_array(value, argument):
    return None if value is None else as_numeric_array(value, argument)


def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, name=None,
                        out=None, activation=None):
    """`(x - mean) * scale / sqrt(variance + variance_epsilon) + offset`, as TF's op.

    `mean`, `variance`, `offset` and `scale` broadcast against `x`
    (typically per-channel vectors, shaped `(1, C, 1, 1)` for NCHW);
    `offset` and `scale` may be None.  Computed as `(x - mean) * k + b`,
    which stays accurate when |mean| >> std (TF's `x * k + (offset - mean*k)`
    does not).  `out` takes an array of x's shape and dtype to write into (x
    itself works: in place; one that overlaps x otherwise is filled from a
    separate result); `activation` (one of fastbn's activations, e.g.
    `fastbn.nn.relu`) is applied as the output is written, with the bits it
    gives on its own.
    """
    original = x
    x = as_float_array(x, "x")
    epsilon = _check_epsilon(variance_epsilon, "variance_epsilon")
    kind = _fused_activation(activation)
    if out is not None:
        check_out(out, x)
    params = [
        ("mean", _param_array(mean, "mean")),
        ("variance", _param_array(variance, "variance")),
        ("offset", _param_array(offset, "offset")),
        ("scale", _param_array(scale, "scale")),
    ]
    if params[0][1] is None or params[1][1] is None:
        raise TypeError("mean and variance are required")
    axis = _param_layout(x, params)
    if axis is None:
        if is_device_array(x):
            raise TypeError("batch_normalization of a device array takes per-channel "
                            "parameters (varying along one axis)")
        y = _generic_batch_normalization(x, params, epsilon, out)
        return _finish(_activated(backends.get_for(y), kind, y), x, out, out)
    if axis == -1:
        shape3 = (x.size, 1, 1)
        channels = 1
    else:
        shape3 = channel_shape(x.shape, axis)
        channels = x.shape[axis]
    x3 = x.reshape(shape3)
    out3 = _out_view(out, shape3, x)
    ct = compute_dtype(x.dtype)
    vec = {
        name: (None if p is None else
               as_channel_vector(p.reshape(()) if p.size == 1 else p.reshape(-1), channels, ct, name))
        for name, p in params
    }
    offset_v = vec["offset"] if vec["offset"] is not None else np.zeros(channels, ct)
    backend = backends.get_for(x)
    options, left = _activation_options(backend, kind)
    y3 = backend.infer_forward(x3, vec["mean"], vec["variance"], vec["scale"], offset_v,
                               epsilon, out=out3, **options)
    y3 = _activated(backend, left, y3)
    return as_caller_kind(_finish(y3, x, out, out3), original)


def activation_kind(activation):
    """The name (in fastbn.backends.ACTIVATIONS) of `activation` where it is one of
    fastbn's activations (relu, relu6, sigmoid, tanh, elu), else None."""
    if activation is None:
        return None  # (asked twice on every batch_norm call, mostly of None)
    return next((kind for kind, fn in _ACTIVATIONS.items() if fn is activation), None)


def _fused_activation(activation):
    """The name of the activation a normalization applies in its own pass, or None."""
    if activation is None:
        return None
    kind = activation_kind(activation)
    if kind is None:
        raise ValueError(f"activation must be None or one of fastbn's activations "
                         f"(fastbn.nn.relu, relu6, sigmoid, tanh, elu), got {activation!r}")
    return kind


def _activation_options(backend, kind):
    """(keyword arguments that make `backend`'s normalizations apply activation `kind`,
    the activation still to apply after them): relu is fused everywhere; the others
    where the backend fuses activations."""
    if kind is None:
        return {}, None
    if kind == "relu":
        return {"relu": True}, None
    if backend.fuses_activations:
        return {"activation": kind}, None
    return {}, kind


def _activated(backend, kind, y):
    """y through activation `kind` (None: y itself), a new array."""
    return y if kind is None else backend.activation(kind, y)


def _generic_batch_normalization(x, params, epsilon, out):
    """Parameters that vary along several axes: plain broadcasting, in float64."""
    p = {name: (None if a is None else a.astype(np.float64)) for name, a in params}
    inv = 1.0 / np.sqrt(p["variance"] + epsilon)
    if p["scale"] is not None:
        inv = inv * p["scale"]
    y = (x.astype(np.float64) - p["mean"]) * inv
    if p["offset"] is not None:
        y = y + p["offset"]
    y = y.astype(x.dtype)
    if out is not None:
        np.copyto(out, y)
        return out
    return y


def bessel_factor(count):
    """`n / (n - 1)`, and 1 for n <= 1, as TF's fused kernel corrects the variance."""
    return count / (count - 1.0) if count > 1 else 1.0


def _fused_arguments(x, data_format, epsilon, is_training):
    """The checks the fused op and its gradient share: (axis, channels, epsilon, is_training).

    epsilon comes back raised to TF1's floor.
    """
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2, got shape {x.shape}")
    axis = channel_axis(data_format, x.ndim)
    channels = x.shape[axis]
    if channels == 0:
        raise ValueError(f"x has an empty channel dimension (shape {x.shape})")
    epsilon = max(_check_epsilon(epsilon), FUSED_MIN_EPSILON)
    if is_training is not True and is_training is not False:
        if not isinstance(is_training, np.bool_):
            raise TypeError(f"is_training must be a bool, got {type(is_training).__name__}")
        is_training = bool(is_training)
    return axis, channels, epsilon, is_training


def fused_batch_norm(x, scale, offset, mean=None, variance=None, epsilon=0.001,
                     data_format="NHWC", is_training=True, name=None,
                     exponential_avg_factor=1.0, out=None, activation=None):
    """Batch normalization in one call, as TF1's `tf.nn.fused_batch_norm`.

    Args:
      x: a float16/32/64 array of rank >= 2.
      scale, offset: per-channel vectors (length C).
      mean, variance: per-channel statistics; required for inference (and
        when `exponential_avg_factor != 1`).
      epsilon: added to the variance; raised to at least 1.001e-5 as TF1 did.
      data_format: 'NHWC' (channels last) or 'NCHW' (channels second), for
        any rank ('NDHWC'/'NCDHW' are accepted as aliases).
      is_training: True to normalize with the batch statistics.
      exponential_avg_factor: in training, the returned statistics are
        `(1 - f) * given + f * batch` (f = 1: the batch statistics).
      out: an array of x's shape and dtype to write the output into.  It
        may be x itself: in place, which on data that fits in the cache
        saves much of an inference's time (no separate output to bring into
        the cache); one overlapping x otherwise is filled from a separate
        result.
      activation: None, or one of fastbn's activations (`fastbn.nn.relu`,
        `relu6`, `sigmoid`, `tanh`, `elu`), applied as the output is written
        (with the bits it gives on its own).

    Returns:
      `(y, mean, variance)`.  In training, the batch mean and the batch
      variance with Bessel's correction (`n / (n - 1)`), as TF returns them
      for moving averages; the output itself is normalized with the biased
      variance.  In inference, the given statistics.  Statistics are float32
      (float64 for float64 input).
    """
    original = x
    x = as_float_array(x, "x")
    axis, channels, epsilon, is_training = _fused_arguments(x, data_format, epsilon,
                                                            is_training)
    kind = _fused_activation(activation)
    factor = float(exponential_avg_factor)
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"exponential_avg_factor must be in [0, 1], got {factor}")
    ct = compute_dtype(x.dtype)
    scale_v = as_channel_vector(scale, channels, ct, "scale")
    offset_v = as_channel_vector(offset, channels, ct, "offset")
    needs_stats = not is_training or factor != 1.0
    if needs_stats and (mean is None or variance is None):
        raise ValueError(
            "Both `mean` and `variance` must be a 1D tensor when `is_training` is False "
            "or `exponential_avg_factor` != 1.0."
        )
    mean_v = None if mean is None else as_channel_vector(mean, channels, ct, "mean")
    var_v = None if variance is None else as_channel_vector(variance, channels, ct, "variance")
    if out is not None:
        check_out(out, x)
    if is_training and x.size == 0:
        raise ValueError(f"x has no elements per channel to compute batch statistics from "
                         f"(shape {x.shape})")
    y, batch_mean, batch_var = fused_batch_norm_checked(
        x, axis, scale_v, offset_v, mean_v, var_v, epsilon, is_training, factor, out, kind)
    return as_caller_kind(y, original), batch_mean, batch_var


def fused_batch_norm_checked(x, axis, scale, offset, mean, variance, epsilon, is_training,
                             factor=1.0, out=None, activation=None):
    """`fused_batch_norm` on arguments already checked: the layer's way in.

    `scale`, `offset` (and `mean`, `variance` where needed) are contiguous
    vectors in x's compute dtype; epsilon has its floor applied; training
    input is not empty; `activation` is the name of one of fastbn's activations,
    or None.
    """
    shape3 = channel_shape(x.shape, axis)
    x3 = x.reshape(shape3)
    out3 = _out_view(out, shape3, x)
    backend = backends.get_for(x)
    options, left = _activation_options(backend, activation)
    if not is_training:
        y3 = backend.infer_forward(x3, mean, variance, scale, offset, epsilon, out=out3,
                                   **options)
        return _finish(_activated(backend, left, y3), x, out, out3), mean, variance
    ct = scale.dtype
    y3, batch_mean, batch_var = backend.train_forward(x3, scale, offset, epsilon, out=out3,
                                                      **options)
    y3 = _activated(backend, left, y3)
    count = x3.shape[0] * x3.shape[2]
    batch_mean = batch_mean.astype(ct)
    batch_var = (batch_var * bessel_factor(count)).astype(ct)
    if factor != 1.0:
        batch_mean = ((1.0 - factor) * mean + factor * batch_mean).astype(ct)
        batch_var = ((1.0 - factor) * variance + factor * batch_var).astype(ct)
    return _finish(y3, x, out, out3), batch_mean, batch_var


# --------------------------------------------------------------------------
# gradients


def batch_norm_backward(x, dy, axis, mean, variance, epsilon, scale, training, weights=None,
                        out=None):
    """The gradient of y = (x - mean) / sqrt(variance + epsilon) * scale + ..., per channel.

    With `training`, mean and variance are the batch's (weighted by `weights`,
    one per position of the (N, 1, M) channel view, when given) and the
    gradient flows through them; otherwise they are constants.  `scale` is the
    effective per-channel factor on the normalized value.  Returns
    `(dx, sum_dy, sum_dy_xhat)`: dx in dy's dtype, and the float64 per-channel
    sums the parameter gradients are made of.
    """
    shape3 = channel_shape(x.shape, axis)
    out3 = _out_view(out, shape3, x, dy)
    channels = shape3[1]
    ct = compute_dtype(x.dtype)
    dx3, sum_dy, sum_dy_xhat = backends.get_for(x).backward(
        x.reshape(shape3), dy.reshape(shape3), _backward_vector(mean, channels, ct),
        _backward_vector(variance, channels, ct), _backward_vector(scale, channels, ct),
        float(epsilon), bool(training), weights=weights, out=out3)
    return _finish(dx3, dy, out, out3), sum_dy, sum_dy_xhat


def _backward_vector(value, channels, ct):
    """A per-channel value (a vector, or a scalar for all channels) as a backend's
    backward takes it: a contiguous vector in float64, or in the compute dtype `ct`
    where it is one already."""
    if _is_channel_vector(value, channels, ct, _F64):
        return value
    return np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.float64), (channels,)))


def fused_batch_norm_grad(dy, x, scale, mean, variance, epsilon=0.001, data_format="NHWC",
                          is_training=True, out=None):
    """The gradient of `fused_batch_norm`, as TF's FusedBatchNormGrad.

    Args:
      dy: the gradient with respect to the output, of x's shape and dtype.
      x: the input the forward normalized.
      scale: the per-channel scale (gamma) the forward used.
      mean, variance: in training, the batch mean and the *biased* batch
        variance the forward normalized with (not the Bessel-corrected one it
        returns); in inference, the moving statistics it used.
      epsilon: as given to the forward (raised to at least 1.001e-5 likewise).
      data_format: 'NHWC' or 'NCHW', any rank >= 2.
      is_training: whether the forward used batch statistics.
      out: an array of x's shape and dtype to write dx into (dy or x
        itself works: in place).

    Returns:
      `(dx, dscale, doffset)`: dx in x's dtype; dscale = sum(dy * x_hat) and
      doffset = sum(dy) per channel, float32 (float64 for float64 input).
      In training dx = scale / sqrt(var + eps) * (dy - mean(dy) - x_hat *
      mean(dy * x_hat)); in inference dx = dy * scale / sqrt(var + eps).
    """
    original = dy
    x = as_float_array(x, "x")
    dy = as_float_array(dy, "dy")
    axis, channels, epsilon, is_training = _fused_arguments(x, data_format, epsilon,
                                                            is_training)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    # In the compute dtype, as given (the backends compute in float64 from them).
    ct = compute_dtype(x.dtype)
    scale_v = as_channel_vector(scale, channels, ct, "scale")
    mean_v = as_channel_vector(mean, channels, ct, "mean")
    var_v = as_channel_vector(variance, channels, ct, "variance")
    if out is not None:
        check_out(out, x)
    dx, sum_dy, sum_dy_xhat = batch_norm_backward(x, dy, axis, mean_v, var_v, epsilon, scale_v,
                                                  is_training, out=out)
    return as_caller_kind(dx, original), sum_dy_xhat.astype(ct), sum_dy.astype(ct)


# --------------------------------------------------------------------------
# activations (fastbn's own, with known derivatives)


def relu(features, name=None):
    """max(features, 0)."""
    return _activation("relu", features, "features")


def relu6(features, name=None):
    """min(max(features, 0), 6)."""
    return _activation("relu6", features, "features")


def sigmoid(x, name=None):
    """1 / (1 + exp(-x)), without overflow for large |x|."""
    return _activation("sigmoid", x, "x")


def tanh(x, name=None):
    return _activation("tanh", x, "x")


def elu(features, name=None):
    """features if > 0, else exp(features) - 1."""
    return _activation("elu", features, "features")


_ACTIVATIONS = {"relu": relu, "relu6": relu6, "sigmoid": sigmoid, "tanh": tanh, "elu": elu}


def _activation(kind, value, argument):
    """An activation of fastbn's, where the data lives (float16 in float32, rounded once)."""
    x = as_float_array(value, argument)
    _check_flat_on_device(x, argument)
    return as_caller_kind(backends.get_for(x).activation(kind, x), value)


def relu_grad(gradients, features, name=None, out=None):
    """TF's ReluGrad: `gradients * (features > 0)`, the gradient through `relu` from its
    output (or its input: the same signs).

    Arrays of one shape and float dtype (host or device); `name`, accepted for TF
    compatibility (unused); `out`, an array of that
    shape and dtype to write into (either input itself works).  As every activation
    gradient here: computed in the data's dtype, as TF does (float16 in float32,
    rounded once).
    """
    return _activation_grad("relu", gradients, features, out, "gradients", "features")


def relu6_grad(gradients, features, name=None, out=None):
    """TF's Relu6Grad: `gradients * ((features > 0) & (features < 6))`, the gradient
    through `relu6` from its output (or its input).  Arguments as `relu_grad`'s."""
    return _activation_grad("relu6", gradients, features, out, "gradients", "features")


def sigmoid_grad(y, dy, name=None, out=None):
    """TF's SigmoidGrad: `dy * (y * (1 - y))`, the gradient through `sigmoid` from its
    output y.  Arguments as `relu_grad`'s."""
    return _activation_grad("sigmoid", dy, y, out, "dy", "y")


def tanh_grad(y, dy, name=None, out=None):
    """TF's TanhGrad: `dy * (1 - y * y)`, the gradient through `tanh` from its output y.
    Arguments as `relu_grad`'s."""
    return _activation_grad("tanh", dy, y, out, "dy", "y")


def elu_grad(gradients, outputs, name=None, out=None):
    """TF's EluGrad: `gradients * (outputs + 1)` where outputs < 0, else `gradients`,
    the gradient through `elu` from its output.  Arguments as `relu_grad`'s."""
    return _activation_grad("elu", gradients, outputs, out, "gradients", "outputs")


def _activation_grad(kind, gradients, values, out, gradients_name, values_name):
    dy = as_float_array(gradients, gradients_name)
    y = as_float_array(values, values_name)
    if tuple(y.shape) != tuple(dy.shape):
        raise ValueError(f"{values_name} must have the shape of {gradients_name} "
                         f"{tuple(dy.shape)}, got {tuple(y.shape)}")
    if np.dtype(y.dtype) != np.dtype(dy.dtype):
        raise TypeError(f"{values_name} must have the dtype of {gradients_name} {dy.dtype}, "
                        f"got {y.dtype}")
    if is_device_array(dy) != is_device_array(y):
        raise TypeError(f"{values_name} must live where {gradients_name} live (both NumPy, "
                        "or both on the device)")
    if out is not None:
        check_out(out, dy)
    for a, argument in ((dy, gradients_name), (y, values_name), (out, "out")):
        _check_flat_on_device(a, argument)
    # Elementwise: out may be either input itself; one overlapping an input elsewhere
    # is filled from a separate result.
    out_view = _out_view(out, dy.shape, dy, y)
    result = backends.get_for(dy).activation_grad(kind, dy, y, out=out_view)
    return as_caller_kind(_finish(result, dy, out, out_view), gradients)
