"""Regularizers: callables `(value) -> scalar`, with slim's names and formulas."""

import numbers

import numpy as np

__all__ = ["l1_regularizer", "l2_regularizer"]


def _check_scale(scale):
    if isinstance(scale, (bool, np.bool_)) or isinstance(scale, numbers.Integral):
        raise ValueError(f"scale cannot be an integer: {scale}")
    if not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if scale < 0.0:
        raise ValueError(f"Setting a scale less than 0 on a regularizer: {scale:g}")
    return float(scale)


def _disabled(_):
    return None


def l1_regularizer(scale, scope=None):
    """`scale * sum(|w|)`; a scale of 0 disables it (it returns None)."""
    scale = _check_scale(scale)
    if scale == 0.0:
        return _disabled

    def l1_regularizer(weights):
        w = np.asarray(weights)
        return w.dtype.type(scale) * np.sum(np.abs(w))

    return l1_regularizer


def l2_regularizer(scale, scope=None):
    """`scale * sum(w**2) / 2` (TF's `l2_loss`); a scale of 0 disables it."""
    scale = _check_scale(scale)
    if scale == 0.0:
        return _disabled

    def l2_regularizer(weights):
        w = np.asarray(weights)
        return w.dtype.type(scale) * (np.sum(w * w) / w.dtype.type(2))

    return l2_regularizer
