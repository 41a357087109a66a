"""Initializers: callables `(shape, dtype) -> array`, with TF1's names and arguments.

The random ones draw from NumPy's generator seeded with `seed` (fresh entropy
where it is None): TF's distributions and bounds, not TF's random numbers.  As
in TF1, an initializer with a seed gives the same values on every call.
"""

import math
import numbers

import numpy as np

__all__ = ["zeros_initializer", "ones_initializer", "constant_initializer",
           "random_normal_initializer", "truncated_normal_initializer",
           "random_uniform_initializer", "variance_scaling_initializer",
           "glorot_uniform_initializer", "glorot_normal_initializer"]


def _dtype(dtype, default):
    return np.dtype(default if dtype is None else dtype)


def _float_dtype(dtype, argument="dtype"):
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"{argument} must be a floating-point dtype, got {dtype}")
    return dtype


def _shape(shape):
    try:
        return tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None


def _normal(rng, shape, mean, stddev, truncated):
    """Normal draws in float64; `truncated`: those beyond two standard deviations drawn
    again, as TF's truncated_normal."""
    z = rng.standard_normal(shape)
    if truncated:
        outside = np.abs(z) > 2.0
        while outside.any():
            z[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(z) > 2.0
    return z * stddev + mean


class zeros_initializer:
    """Initializes to 0, like `tf.zeros_initializer`."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)

    def __call__(self, shape, dtype=None, partition_info=None):
        return np.zeros(shape, _dtype(dtype, self.dtype))


class ones_initializer:
    """Initializes to 1, like `tf.ones_initializer`."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)

    def __call__(self, shape, dtype=None, partition_info=None):
        return np.ones(shape, _dtype(dtype, self.dtype))


class constant_initializer:
    """Initializes to a constant, like TF1's `tf.constant_initializer`.

    `value` is a scalar (every element takes it) or an array-like of at most
    as many elements as the variable; a shorter list is padded with its last
    element, as TF1 does.  With `verify_shape=True` its shape must match.
    """

    def __init__(self, value=0, dtype=np.float32, verify_shape=False):
        if not isinstance(value, (numbers.Number, np.generic, np.ndarray, list, tuple)):
            raise TypeError(
                "value must be a number, a list or an array, got " f"{type(value).__name__}"
            )
        self.value = np.asarray(value)
        if self.value.dtype.kind not in "fcbiu":
            raise TypeError(f"value must be numeric, got dtype {self.value.dtype}")
        self.dtype = np.dtype(dtype)
        self.verify_shape = verify_shape

    def __call__(self, shape, dtype=None, partition_info=None, verify_shape=None):
        dtype = _dtype(dtype, self.dtype)
        shape = tuple(shape)
        value = self.value
        if verify_shape is None:
            verify_shape = self.verify_shape
        if value.ndim == 0:
            return np.full(shape, value, dtype)
        if verify_shape and value.shape != shape:
            raise ValueError(f"constant_initializer value has shape {value.shape}, expected {shape}")
        flat = value.reshape(-1)
        size = int(np.prod(shape, dtype=np.int64))
        if flat.size > size:
            raise ValueError(
                f"constant_initializer has {flat.size} values, too many for shape {shape}"
            )
        if flat.size < size:
            flat = np.concatenate([flat, np.full(size - flat.size, flat[-1])])
        return flat.astype(dtype).reshape(shape)


class random_normal_initializer:
    """Normal values, like TF1's `tf.random_normal_initializer`."""

    _truncated = False

    def __init__(self, mean=0.0, stddev=1.0, seed=None, dtype=np.float32):
        self.mean, self.stddev, self.seed = mean, stddev, seed
        self.dtype = _float_dtype(dtype)

    def __call__(self, shape, dtype=None, partition_info=None):
        dtype = _float_dtype(_dtype(dtype, self.dtype))
        rng = np.random.default_rng(self.seed)
        values = _normal(rng, _shape(shape), self.mean, self.stddev, self._truncated)
        return values.astype(dtype)


class truncated_normal_initializer(random_normal_initializer):
    """Normal values within two standard deviations of the mean (others drawn again),
    like TF1's `tf.truncated_normal_initializer`."""

    _truncated = True


class random_uniform_initializer:
    """Uniform values in [minval, maxval), like TF1's `tf.random_uniform_initializer`:
    maxval defaults to 1 for floats and is required for integers."""

    def __init__(self, minval=0.0, maxval=None, seed=None, dtype=np.float32):
        self.minval, self.maxval, self.seed = minval, maxval, seed
        self.dtype = np.dtype(dtype)

    def __call__(self, shape, dtype=None, partition_info=None):
        dtype = _dtype(dtype, self.dtype)
        rng = np.random.default_rng(self.seed)
        if dtype.kind in "iu":
            if self.maxval is None:
                raise ValueError(f"maxval is required for integer dtype {dtype}")
            return rng.integers(self.minval, self.maxval, _shape(shape)).astype(dtype)
        dtype = _float_dtype(dtype)
        maxval = 1.0 if self.maxval is None else self.maxval
        return rng.uniform(self.minval, maxval, _shape(shape)).astype(dtype)


def _fans(shape):
    """TF's fan-in and fan-out of a weight shape (convolution kernels: (..., in, out))."""
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class variance_scaling_initializer:
    """Values scaled to the weight shape, like TF1's `tf.variance_scaling_initializer`.

    The variance is `scale / n`, n being the fan-in, the fan-out or their mean
    (`mode`, at least 1); `distribution` 'truncated_normal' (or its old alias
    'normal': within two standard deviations, the deviation corrected so that
    the variance is the one asked for), 'untruncated_normal' or 'uniform'.
    """

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None,
                 dtype=np.float32):
        if not scale > 0.0:
            raise ValueError(f"scale must be a positive float, got {scale!r}")
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
        distribution = str(distribution).lower()
        if distribution not in ("normal", "uniform", "truncated_normal", "untruncated_normal"):
            raise ValueError("distribution must be 'truncated_normal', 'untruncated_normal', "
                             f"'uniform' or 'normal', got {distribution!r}")
        self.scale, self.mode, self.distribution, self.seed = scale, mode, distribution, seed
        self.dtype = _float_dtype(dtype)

    def __call__(self, shape, dtype=None, partition_info=None):
        dtype = _float_dtype(_dtype(dtype, self.dtype))
        shape = _shape(shape)
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}
        scale = self.scale / max(1.0, n[self.mode])
        rng = np.random.default_rng(self.seed)
        if self.distribution == "uniform":
            limit = math.sqrt(3.0 * scale)
            return rng.uniform(-limit, limit, shape).astype(dtype)
        if self.distribution == "untruncated_normal":
            return _normal(rng, shape, 0.0, math.sqrt(scale), False).astype(dtype)
        # The standard deviation of a unit normal truncated to [-2, 2] (TF's constant).
        stddev = math.sqrt(scale) / 0.87962566103423978
        return _normal(rng, shape, 0.0, stddev, True).astype(dtype)


class glorot_uniform_initializer(variance_scaling_initializer):
    """Xavier/Glorot uniform values, like TF1's `tf.glorot_uniform_initializer`:
    within +-sqrt(6 / (fan_in + fan_out)).  `get_variable`'s default for floats."""

    def __init__(self, seed=None, dtype=np.float32):
        super().__init__(1.0, "fan_avg", "uniform", seed, dtype)


class glorot_normal_initializer(variance_scaling_initializer):
    """Xavier/Glorot truncated normal values, like TF1's `tf.glorot_normal_initializer`."""

    def __init__(self, seed=None, dtype=np.float32):
        super().__init__(1.0, "fan_avg", "truncated_normal", seed, dtype)
