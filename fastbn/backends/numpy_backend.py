"""The NumPy reference backend: plain, exact, and the yardstick for the others."""

import numpy as np

from .base import Backend, compute_dtype

_REDUCE = (0, 2)


class NumpyBackend(Backend):
    name = "numpy"
    description = "NumPy reference (two-pass statistics in float64)"

    def moments(self, x, weights=None):
        with np.errstate(invalid="ignore", divide="ignore"):
            if weights is None:
                count = x.shape[0] * x.shape[2]
                mean = x.sum(axis=_REDUCE, dtype=np.float64) / count
                centered = x - mean[None, :, None]
                variance = np.einsum("ncm,ncm->c", centered, centered) / count
                return mean, variance
            w = np.asarray(weights, np.float64)
            total = np.broadcast_to(w, x.shape).sum(axis=_REDUCE)
            safe = np.where(total == 0, 1.0, total)
            mean = np.where(total == 0, 0.0, (w * x).sum(axis=_REDUCE) / safe)
            centered = x - mean[None, :, None]
            distsq = (w * centered * centered).sum(axis=_REDUCE)
            variance = np.where(total == 0, 0.0, distsq / safe)
            return mean, variance

    def normalize(self, x, mean, multiplier, offset, out=None, relu=False):
        ct = compute_dtype(x.dtype)
        m = np.asarray(mean, ct)[None, :, None]
        k = np.asarray(multiplier, ct)[None, :, None]
        b = np.asarray(offset, ct)[None, :, None]
        # Non-finite data gives NaN and infinities quietly, as TF and the kernels do.
        with np.errstate(invalid="ignore", over="ignore"):
            if out is not None and x.dtype == ct:
                np.subtract(x, m, out=out)
                out *= k
                out += b
                y = out
            else:
                y = (x.astype(ct, copy=False) - m) * k + b
        if relu:
            np.maximum(y, 0, out=y)
        if y.dtype != x.dtype:
            y = y.astype(x.dtype)
        if out is not None and y is not out:
            np.copyto(out, y)
            y = out
        return y

    def grad_reductions(self, x, dy, mean):
        dy64 = dy.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            centered = x - np.asarray(mean, np.float64)[None, :, None]
            return dy64.sum(axis=_REDUCE), np.einsum("ncm,ncm->c", dy64, centered)

    def grad_input(self, x, dy, mean, a, b, c, weights=None, out=None):
        ct = compute_dtype(dy.dtype)

        def col(v):
            return np.asarray(v, ct)[None, :, None]

        with np.errstate(invalid="ignore", over="ignore"):
            term = col(b) * (x.astype(ct, copy=False) - col(mean)) + col(c)
            if weights is not None:
                term *= np.asarray(weights, ct)
            dx = col(a) * dy.astype(ct, copy=False) + term
        if out is not None:
            np.copyto(out, dx, casting="unsafe")
            return out
        return dx.astype(dy.dtype, copy=False)


def create():
    return NumpyBackend()
