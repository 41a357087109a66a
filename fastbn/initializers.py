"""Initializers: callables `(shape, dtype) -> array`, with TF1's names."""

import numbers

import numpy as np

__all__ = ["zeros_initializer", "ones_initializer", "constant_initializer"]


def _dtype(dtype, default):
    return np.dtype(default if dtype is None else dtype)


class zeros_initializer:
    """Initializes to 0, like `tf.zeros_initializer`."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)

    def __call__(self, shape, dtype=None):
        return np.zeros(shape, _dtype(dtype, self.dtype))


class ones_initializer:
    """Initializes to 1, like `tf.ones_initializer`."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)

    def __call__(self, shape, dtype=None):
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

    def __call__(self, shape, dtype=None):
        dtype = _dtype(dtype, self.dtype)
        shape = tuple(shape)
        value = self.value
        if value.ndim == 0:
            return np.full(shape, value, dtype)
        if self.verify_shape and value.shape != shape:
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
