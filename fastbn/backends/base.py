"""The backend protocol: the array kernels every fastbn backend provides.

A backend is array math and nothing else.  Every kernel works on a 3-D
*channel view* `x` of shape `(N, C, M)`: the channel axis in the middle,
everything before it folded into `N` and everything after it into `M`.
NHWC data of shape (B, H, W, C) is viewed as (B*H*W, C, 1); NCHW data of
shape (B, C, H, W) as (B, C, H*W); any rank >= 2 folds the same way.
`fastbn.nn` builds these views, validates arguments and holds the TF
semantics (Bessel's correction, epsilon rules, dtypes); a backend only
computes.

Dtypes: `x` is float16, float32 or float64; the *compute dtype* is float64
for float64 input and float32 otherwise.  Per-channel vectors passed in
(`mean`, `multiplier`, `offset`, `scale`, `variance`) are contiguous 1-D
arrays of length C in the compute dtype.  Outputs have the dtype of `x`;
`out`, when given, is a C-contiguous array of x's shape and dtype to write
the result into (it may be `x` itself).  Statistics are accumulated in at
least float32 and must stay accurate when |mean| >> std.

`weights`, when given, are frequency weights broadcastable to `x`, of shape
`(N, 1, M)` (one weight per position, shared by all channels) or
`(N, C, M)`, in the compute dtype; zero strides are allowed.  Weighted
statistics divide by the sum of the broadcast weights and are 0 where that
sum is 0.

A backend subclasses `Backend` and implements `moments`, `normalize`,
`grad_reductions` and `grad_input`; `train_forward`, `infer_forward` and
`backward` have reference compositions here that a fast backend overrides
with fused kernels.
"""

import os
import time

import numpy as np

__all__ = ["Backend", "BackendUnavailable", "compute_dtype", "environ_get",
           "per_channel_multiplier", "position_weights", "usable_cores"]


class BackendUnavailable(RuntimeError):
    """Raised by a backend factory when the backend cannot work here; says why."""


_ENCODED_NAMES = {}


def environ_get(name):
    """`os.environ.get(name)`, without the KeyError os.environ raises and catches on a
    miss (a microsecond or two per call, on every call of every op), and with the name
    encoded once."""
    data = getattr(os.environ, "_data", None)
    if data is None:
        return os.environ.get(name)
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = os.environ.encodekey(name)
    value = data.get(key)
    return None if value is None else os.environ.decodevalue(value)


# Seconds for which usable_cores() trusts its last reading: asked on every kernel call,
# the affinity's system call costs about a microsecond after a kernel has run.
CORES_READ_EVERY = 0.1
_cores_read = [0, -CORES_READ_EVERY]


def usable_cores():
    """The CPU cores this process may run on (its affinity, as read within the last
    CORES_READ_EVERY seconds), else the machine's count."""
    now = time.monotonic()
    if now - _cores_read[1] < CORES_READ_EVERY:
        return _cores_read[0]
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    _cores_read[0], _cores_read[1] = n, now
    return n


def position_weights(weights, like, dtype=None):
    """Per-position weights as kernels read them: (N, 1, M) for an (N, C, M) `like`,
    contiguous, in `dtype` (like's by default); None stays None."""
    if weights is None:
        return None
    return np.ascontiguousarray(np.broadcast_to(weights, (like.shape[0], 1, like.shape[2])),
                                like.dtype if dtype is None else dtype)


_COMPUTE_DTYPES = {np.dtype(np.float16): np.dtype(np.float32),
                   np.dtype(np.float32): np.dtype(np.float32),
                   np.dtype(np.float64): np.dtype(np.float64)}


# The activations the backends compute (activation) and differentiate (activation_grad),
# in the order of the kernels' codes.
ACTIVATIONS = ("relu", "relu6", "sigmoid", "tanh", "elu")


def compute_dtype(dtype):
    """float64 for float64 data, float32 for float16 and float32 data."""
    found = _COMPUTE_DTYPES.get(dtype)
    if found is not None:
        return found
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def per_channel_multiplier(variance, scale, epsilon, dtype):
    """`scale / sqrt(variance + epsilon)` per channel, computed in float64, in `dtype`."""
    inv = 1.0 / np.sqrt(np.asarray(variance, np.float64) + float(epsilon))
    if scale is not None:
        inv = inv * np.asarray(scale, np.float64)
    return inv.astype(dtype)


class Backend:
    """Base class and protocol of fastbn backends (see the module docstring).

    Attributes:
      name: the registry name of the backend.
      description: one line for `python -m fastbn info`.
    """

    name = None
    description = ""
    # Whether the kernels take device (__cuda_array_interface__) arrays.
    accepts_device_arrays = False
    # Whether normalize, infer_forward and train_forward take `activation=` (a name of
    # ACTIVATIONS, applied to their output with the bits `activation` gives it); where
    # not, fastbn.nn applies it after them.
    fuses_activations = False

    def threads(self):
        """How many threads the backend's kernels use (1 when serial)."""
        return 1

    def moments(self, x, weights=None):
        """Per-channel mean and biased variance of `x` over axes 0 and 2.

        Returns `(mean, variance)`, 1-D arrays of length C in float32 or
        float64 (at least the accuracy of float32).  With no element to
        reduce over (N*M == 0) both are NaN.
        """
        raise NotImplementedError

    def normalize(self, x, mean, multiplier, offset, out=None, relu=False):
        """`y = (x - mean) * multiplier + offset` per channel, then max(y, 0) if `relu`."""
        raise NotImplementedError

    def grad_reductions(self, x, dy, mean):
        """Per-channel `(sum(dy), sum(dy * (x - mean)))` over axes 0 and 2, as float64.

        `x` and `dy` have the same shape and dtype; `mean` is a float64 vector.
        """
        raise NotImplementedError

    def grad_input(self, x, dy, mean, a, b, c, weights=None, out=None):
        """`dx = a * dy + w * (b * (x - mean) + c)` per channel, in dy's dtype.

        `w` is 1, or `weights` of shape (N, 1, M) (one per position).  `out`
        may be `dy` itself.
        """
        raise NotImplementedError

    def activation(self, kind, x):
        """The activation `kind` (one of ACTIVATIONS) of x, elementwise, a new array of x's
        shape and dtype (float16 computed in float32, rounded once)."""
        if kind in ("relu", "relu6"):
            # In x's dtype, exact: NaN passes, and max(-0.0, 0) is +0.0 in float32 and
            # float64 but -0.0 in float16, in NumPy's loops as in TF's (checked).
            y = np.maximum(x, x.dtype.type(0))
            return y if kind == "relu" else np.minimum(y, x.dtype.type(6), out=y)
        ct = compute_dtype(x.dtype)
        v = x.astype(ct, copy=False)
        zero = ct.type(0)
        # Whole-array ufuncs into reused buffers, no np.where: a choice by a mask runs
        # ten times slower than NumPy's vector loops (sigmoid 26 MB 86 ms, elu 49).
        if kind == "sigmoid":
            # 1 / (1 + e) for x >= 0, e / (1 + e) below, e = exp(-|x|) (which cannot
            # overflow): the numerator is max(e, x >= 0), as e <= 1.
            e = np.abs(v)
            np.negative(e, out=e)
            np.exp(e, out=e)
            y = np.add(e, ct.type(1))
            np.divide(np.maximum(e, v >= 0, out=e), y, out=y)
        elif kind == "tanh":
            y = np.tanh(v)
        elif kind == "elu":
            # expm1(min(x, 0)) + max(x, 0) with x's sign: -0.0 and NaN pass, as in TF.
            y = np.minimum(v, zero)
            np.expm1(y, out=y)
            y += np.maximum(v, zero)
            np.copysign(y, v, out=y)
        else:
            raise ValueError(f"kind must be one of {ACTIVATIONS}, got {kind!r}")
        return y.astype(x.dtype, copy=False)

    def activation_grad(self, kind, dy, y, out=None):
        """The gradient through activation `kind` (one of ACTIVATIONS) given the output
        gradient `dy` and the activation's output `y`, elementwise, as TF's ReluGrad,
        Relu6Grad, SigmoidGrad, TanhGrad and EluGrad compute it (float16 in float32,
        rounded once); of dy's shape and dtype.  `out` may be dy or y itself."""
        ct = compute_dtype(dy.dtype)
        d, v = dy.astype(ct, copy=False), y.astype(ct, copy=False)
        one = ct.type(1)
        with np.errstate(invalid="ignore", over="ignore"):
            if kind == "relu":
                g = d * (v > 0)
            elif kind == "relu6":
                g = d * ((v > 0) & (v < 6))
            elif kind == "sigmoid":
                g = d * (v * (one - v))
            elif kind == "tanh":
                g = d * (one - v * v)
            elif kind == "elu":
                g = np.where(v < 0, d * (v + one), d)
            else:
                raise ValueError(f"kind must be one of {ACTIVATIONS}, got {kind!r}")
        if out is None:
            return g.astype(dy.dtype, copy=False)
        np.copyto(out, g, casting="unsafe")
        return out

    def train_forward(self, x, scale, offset, epsilon, weights=None, out=None, relu=False,
                      **activation):
        """Batch statistics and the output normalized with them, in one call.

        Returns `(y, mean, variance)` with the biased variance.  `scale` and
        `offset` are per-channel vectors.  `activation=` goes to normalize (where the
        backend fuses activations).
        """
        mean, variance = self.moments(x, weights)
        ct = compute_dtype(x.dtype)
        multiplier = per_channel_multiplier(variance, scale, epsilon, ct)
        y = self.normalize(x, mean.astype(ct), multiplier, offset, out=out, relu=relu,
                           **activation)
        return y, mean, variance

    def backward(self, x, dy, mean, variance, scale, epsilon, training, weights=None,
                 out=None):
        """The input gradient of y = (x - mean) * scale / sqrt(variance + epsilon) + ...

        With `training`, mean and variance are the batch's (weighted by `weights`
        per position when given) and the gradient flows through them; otherwise
        they are constants.  mean, variance and scale are C-contiguous vectors in the
        compute dtype or in float64; the arithmetic on them is float64.
        Returns `(dx, sum_dy, sum_dy_xhat)`: dx in dy's dtype, the sums float64.
        """
        mean, variance, scale = (np.asarray(v, np.float64) for v in (mean, variance, scale))
        sum_dy, sum_dy_xc = self.grad_reductions(x, dy, mean)
        # Non-finite statistics or sums give NaN quietly, as the kernels do.
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            inv = 1.0 / np.sqrt(variance + epsilon)
            sum_dy_xhat = sum_dy_xc * inv
            k = scale * inv
            b = c = np.zeros_like(k)
            if training:
                total = (x.shape[0] * x.shape[2] if weights is None
                         else float(np.sum(weights, dtype=np.float64)))
                if total:
                    b = -k * inv * sum_dy_xhat / total
                    c = -k * sum_dy / total
        ct = compute_dtype(dy.dtype)
        dx = self.grad_input(x, dy, mean.astype(ct), k.astype(ct), b.astype(ct), c.astype(ct),
                             weights=weights, out=out)
        return dx, sum_dy, sum_dy_xhat

    def infer_forward(self, x, mean, variance, scale, offset, epsilon, out=None, relu=False,
                      **activation):
        """The output normalized with given statistics (inference); `activation=` as
        for train_forward."""
        ct = compute_dtype(x.dtype)
        multiplier = per_channel_multiplier(variance, scale, epsilon, ct)
        return self.normalize(x, mean, multiplier, offset, out=out, relu=relu, **activation)

    def __repr__(self):
        return f"<fastbn backend {self.name!r}>"
