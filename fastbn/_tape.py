"""`GradientTape`: gradients of batch_norm layers, as TF 2 users know them.

While a tape is active, every `fastbn.batch_norm` call records what its
backward needs (a `_Node`).  `tape.gradient(target, sources)` walks the
recorded calls backwards from `target`, an array a recorded call returned,
and gives the gradient of `sum(target * output_gradients)` with respect to
each source: an array given to a recorded call as `inputs`, or a
`fastbn.Variable` (beta, gamma, the moving statistics).  Arrays flow from one
recorded call to the next as they are; computation outside batch_norm is not
seen by the tape.  Recorded arrays must not be modified before `gradient`.
"""

import contextlib
import enum
import threading

import numpy as np

from . import backends, nn
from ._variables import Variable

__all__ = ["GradientTape", "UnconnectedGradients"]


class UnconnectedGradients(enum.Enum):
    """What `GradientTape.gradient` gives a source the target does not depend on, as
    `tf.UnconnectedGradients`: None, or zeros of the source's shape."""

    NONE = "none"
    ZERO = "zero"


class _State(threading.local):
    def __init__(self):
        self.tapes = []


_state = _State()


def recording():
    """The tapes recording in this thread (an empty list, usually)."""
    return _state.tapes


# The activations the tape differentiates: TF's gradient op of each, which fastbn.nn
# computes where the data lives, grad(dy, y, out=None) from the activation's output y.
ACTIVATION_GRAD_OPS = {
    nn.relu: nn.relu_grad,
    nn.relu6: nn.relu6_grad,
    nn.sigmoid: lambda dy, y, out=None: nn.sigmoid_grad(y, dy, out=out),
    nn.tanh: lambda dy, y, out=None: nn.tanh_grad(y, dy, out=out),
    nn.elu: nn.elu_grad,
}


class _Node:
    """One batch_norm call: enough to give the gradient of its output.

    The forward computed, per channel, y = act(z * gamma + beta) with
    z = adj_scale * (r * x_hat + d) + adj_bias and x_hat = (x - mean) * inv_std,
    mean and variance the batch's (`training`) or the moving ones.
    """

    __slots__ = ("inputs", "x", "output", "axis", "mean", "variance", "epsilon", "training",
                 "weights", "gamma", "beta", "gamma_value", "adj_scale", "adj_bias", "r", "d",
                 "moving_mean", "moving_variance", "moving_grads", "activation")

    def backward(self, dy):
        """{id(inputs) or Variable: gradient} for the sources this call touched."""
        act = self.activation
        on_device = nn.is_device_array(self.x)
        given = dy
        grad_op = ACTIVATION_GRAD_OPS.get(act)
        if act is not None and grad_op is None:
            name = getattr(act, "__qualname__", None) or repr(act)
            raise ValueError(
                f"GradientTape cannot differentiate through activation_fn={name}: only "
                "fastbn.nn.relu, relu6, sigmoid, tanh and elu have known derivatives "
                "(apply other activations outside batch_norm)")
        if on_device:
            dy = _device(dy, self.x.dtype)
        else:
            dy = np.ascontiguousarray(dy, self.x.dtype)
        # A dy the tape made itself (through the activation's gradient, or a conversion
        # on the host) is nobody else's: results are written over it, which spares new
        # arrays (whose page faults cost more than the arithmetic on large inputs).
        made_here = not on_device and not np.may_share_memory(dy, given)
        if grad_op is not None:
            dy = grad_op(dy, self.output, out=dy if made_here else None)
            made_here = True
        gamma = self.gamma_value
        eff_scale = gamma * self.adj_scale * self.r
        dx, sum_dy, sum_dy_xhat = nn.batch_norm_backward(
            self.x, dy, self.axis, self.mean, self.variance, self.epsilon, eff_scale,
            self.training, weights=self.weights, out=dy if made_here else None)
        inputs = self.inputs
        grads = {inputs if isinstance(inputs, Variable) else id(inputs): dx}
        if self.gamma is not None:
            z_sum = self.adj_scale * (self.r * sum_dy_xhat + self.d * sum_dy) + \
                self.adj_bias * sum_dy
            grads[self.gamma] = z_sum.astype(self.gamma.dtype)
        if self.beta is not None:
            grads[self.beta] = sum_dy.astype(self.beta.dtype)
        if self.moving_grads == "values":
            # Inference through nn.batch_normalization: the moving statistics are inputs.
            inv = 1.0 / np.sqrt(self.variance + self.epsilon)
            grads[self.moving_mean] = (-eff_scale * inv * sum_dy).astype(self.moving_mean.dtype)
            grads[self.moving_variance] = (-0.5 * eff_scale * inv ** 2 * sum_dy_xhat).astype(
                self.moving_variance.dtype)
        elif self.moving_grads == "zeros":
            # An is_training Variable made TF take a cond; the unused branch gives zeros.
            grads[self.moving_mean] = np.zeros(self.moving_mean.shape, self.moving_mean.dtype)
            grads[self.moving_variance] = np.zeros(self.moving_variance.shape,
                                                   self.moving_variance.dtype)
        return grads


class GradientTape:
    """Records batch_norm calls for `gradient`, as `tf.GradientTape`.

        with fastbn.GradientTape() as tape:
            y = fastbn.batch_norm(x, scale=True, scope="bn")
        dx, dbeta, dgamma = tape.gradient(y, [x, beta, gamma], output_gradients=dy)

    Args:
      persistent: allow several `gradient` calls (otherwise one, after which
        the recorded calls are released).
      watch_accessed_variables: whether the trainable variables recorded calls
        use are watched (`watched_variables`).  Every variable a recorded call
        uses can be a source either way.
    """

    def __init__(self, persistent=False, watch_accessed_variables=True):
        self._persistent = bool(persistent)
        self._watch_accessed = bool(watch_accessed_variables)
        self._nodes = []
        self._watched = []
        self._used = False
        self._recording = False

    def __enter__(self):
        if self._recording:
            raise RuntimeError("This GradientTape is already recording")
        _state.tapes.append(self)
        self._recording = True
        return self

    def __exit__(self, *exc):
        _state.tapes.remove(self)
        self._recording = False
        return False

    def watch(self, tensor):
        """Watches the `fastbn.Variable`s in `tensor` (one, or a nest of lists, tuples and
        dicts, as `gradient`'s sources): they are among `watched_variables()`.  Arrays
        need no watching: recorded calls are watched already."""
        _map_sources(tensor, self._watch_one)

    def _watch_one(self, item):
        if isinstance(item, Variable) and item not in self._watched:
            self._watched.append(item)

    def watched_variables(self):
        """The variables this tape watches, in the order they were created, as TF's: those
        given to `watch`, and (with watch_accessed_variables) the trainable variables
        the recorded calls used."""
        watched = list(self._watched)
        if self._watch_accessed:
            for node in self._nodes:
                for var in (node.beta, node.gamma):
                    if var is not None and var.trainable and var not in watched:
                        watched.append(var)
        return tuple(sorted(watched, key=lambda var: var._serial))

    @contextlib.contextmanager
    def stop_recording(self):
        """A context inside which this tape records nothing, as TF's."""
        if not self._recording:
            raise RuntimeError("Trying to stop recording a tape which is not recording.")
        _state.tapes.remove(self)
        self._recording = False
        try:
            yield
        finally:
            _state.tapes.append(self)
            self._recording = True

    def reset(self):
        """Forgets everything recorded (and watched) so far."""
        self._nodes = []
        self._watched = []
        self._used = False

    def _record(self, node):
        self._nodes.append(node)

    def gradient(self, target, sources, output_gradients=None,
                 unconnected_gradients=UnconnectedGradients.NONE):
        """The gradient of sum(target * output_gradients) with respect to each source.

        Args:
          target: an array returned by a batch_norm call recorded on this tape
            (or a list of them).
          sources: an array given to a recorded call, a `fastbn.Variable`, or a
            (nested) list, tuple or dict of them, as TF's nests.
          output_gradients: the gradient with respect to `target` (a list for a
            list of targets); ones by default.
          unconnected_gradients: 'none' (default: None for a source the target
            does not depend on) or 'zero' (zeros of its shape), or the
            `UnconnectedGradients` member of that value, as TF takes either.

        Returns:
          Gradients in the structure of `sources`.
        """
        if self._used and not self._persistent:
            raise RuntimeError("A non-persistent GradientTape can only be used to compute one "
                               "set of gradients (or jacobians)")
        if isinstance(unconnected_gradients, UnconnectedGradients):
            unconnected_gradients = unconnected_gradients.value
        if unconnected_gradients not in (None, "none", "zero"):
            raise ValueError(f"unconnected_gradients must be 'none' or 'zero', got "
                             f"{unconnected_gradients!r}")
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        if output_gradients is None:
            seeds = [None] * len(targets)
        elif isinstance(target, (list, tuple)):
            seeds = list(output_gradients)
            if len(seeds) != len(targets):
                raise ValueError("output_gradients must have one entry per target")
        else:
            seeds = [output_gradients]
        produced = {id(node.output): node for node in self._nodes}
        grads = {}
        for t, seed in zip(targets, seeds):
            if id(t) not in produced:
                raise ValueError("target must be an array returned by a fastbn.batch_norm call "
                                 "recorded on this tape")
            if seed is None:
                seed = np.ones(tuple(t.shape), t.dtype)
            elif nn.is_device_array(seed):
                if tuple(seed.shape) != tuple(t.shape):
                    raise ValueError(f"output_gradients has shape {tuple(seed.shape)}, the "
                                     f"target {tuple(t.shape)}")
            else:
                seed = np.asarray(seed)
                if seed.shape != t.shape:
                    raise ValueError(f"output_gradients has shape {seed.shape}, the target "
                                     f"{t.shape}")
                if seed.dtype.kind not in "fiu":
                    raise TypeError(f"output_gradients must be numeric, got {seed.dtype}")
            _accumulate(grads, id(t), seed)
        # Recording order is a topological order: walking it backwards, a call's output
        # gradient is complete (every consumer done) before the call itself.
        for node in reversed(self._nodes):
            dy = grads.get(id(node.output))
            if dy is None:
                continue
            for key, value in node.backward(dy).items():
                _accumulate(grads, key, value)
        if not self._persistent:
            self._nodes = []
            self._used = True
        zero = unconnected_gradients == "zero"
        return _map_sources(sources, lambda s: _lookup(grads, s, zero))


def _host(a):
    return a.copy_to_host() if nn.is_device_array(a) else np.asarray(a)


def _device(a, dtype):
    if nn.is_device_array(a):
        return nn._device_view(a, "output_gradients")
    return backends.to_numba_device(a, dtype)


def _accumulate(grads, key, value):
    if key not in grads:
        grads[key] = value
    elif nn.is_device_array(value) or nn.is_device_array(grads[key]):
        grads[key] = _device(_host(grads[key]) + _host(value), _host(value).dtype)
    else:
        grads[key] = grads[key] + value


def _lookup(grads, source, zero):
    if isinstance(source, Variable):
        grad = grads.get(source)
        shape, dtype = source.shape, source.dtype
    elif isinstance(source, np.ndarray):
        grad = grads.get(id(source))
        shape, dtype = source.shape, source.dtype
    elif nn.is_device_array(source):
        grad = grads.get(id(source))
        if grad is None and zero:
            return _device(np.zeros(tuple(source.shape), source.dtype), source.dtype)
        return nn.as_caller_kind(grad, source)
    else:
        raise TypeError(f"sources must be arrays given to batch_norm or fastbn.Variables, got "
                        f"{type(source).__name__}")
    dtype = dtype.newbyteorder("=")  # (a big-endian source's gradient: TF's native type)
    if grad is None:
        return np.zeros(shape, dtype) if zero else None
    return np.asarray(grad).astype(dtype, copy=False)


def _map_sources(sources, fn):
    if isinstance(sources, (list, tuple)):
        return type(sources)(_map_sources(s, fn) for s in sources)
    if isinstance(sources, dict):
        return {key: _map_sources(s, fn) for key, s in sources.items()}
    return fn(sources)
