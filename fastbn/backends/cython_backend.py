"""The Cython + OpenMP CPU backend: fastbn's default.

The kernels (fastbn/_cy/_kernels.pxi) are built twice; the AVX2/FMA build is
used where the CPU has both (FASTBN_CPU_DISPATCH=baseline forces the other).
Its activations (sigmoid, tanh, elu: bound by arithmetic, not memory) also have
AVX-512 loops, used where the CPU has AVX-512F (FASTBN_CPU_DISPATCH=avx2 keeps to
AVX2; =avx512 requires them).
Threads: FASTBN_NUM_THREADS if set, else the cores this process may use;
never more than OpenMP's limit (OMP_NUM_THREADS, or threadpoolctl's).
When other processes keep the cores busy, an OpenMP call can wait whole
scheduler time slices for its own threads (tens of times slower, seen here):
calls on several threads that keep taking far longer than the best seen for
their kernel and shape make the next ones of that kind run on one thread for
a while, then several again (the bits are the same either way).
Outputs of at least FASTBN_STREAM_BYTES (default: half the last-level cache)
are written with non-temporal stores: they cannot stay cached anyway, and
writing around the cache saves the read of each line before it is written
and keeps the input cached for the passes that read it again.
float16 data is computed in float32 and rounded once.  The avx2 build (F16C)
reads and writes C-contiguous float16 in the kernels themselves; strided
float16, float16 with weights, and the baseline build go through float32
copies.  The bits are the same either way.
"""

import glob
import importlib
import os
import threading
import time

import numpy as np

from .base import (ACTIVATIONS, Backend, BackendUnavailable, environ_get, position_weights,
                   usable_cores)

NUM_THREADS_VAR = "FASTBN_NUM_THREADS"
DISPATCH_VAR = "FASTBN_CPU_DISPATCH"
STREAM_BYTES_VAR = "FASTBN_STREAM_BYTES"
# Where the cache size cannot be read.
DEFAULT_STREAM_BYTES = 16 << 20
_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)


def cpu_has_avx2():
    """Whether this CPU has AVX2, FMA and F16C, what the avx2 build uses (as NumPy's own
    dispatcher sees it)."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            features = importlib.import_module(module).__cpu_features__
        except (ImportError, AttributeError):
            continue
        return bool(features.get("AVX2") and features.get("FMA3") and features.get("F16C"))
    return False


def last_level_cache_bytes():
    """The largest CPU cache cpu0 shares (Linux sysfs), or None where unknown."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def _integer_setting(name, minimum, kind):
    """The integer in environment variable `name`, None where unset; at least `minimum`,
    else ValueError saying it must be a `kind` integer."""
    requested = environ_get(name)
    if not requested:
        return None
    try:
        n = int(requested)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise ValueError(f"{name} must be a {kind} integer, got {requested!r}")
    return n


def stream_bytes():
    """The output size from which the kernels write with non-temporal stores."""
    n = _integer_setting(STREAM_BYTES_VAR, 0, "non-negative")
    if n is not None:
        return n
    cache = last_level_cache_bytes()
    return cache // 2 if cache else DEFAULT_STREAM_BYTES


class ContentionGuard:
    """Picks the thread count of each multi-threaded kernel call, falling back to one
    thread where calls on several have become far slower than they were.

    Calls are grouped by kernel and shape.  STRIKES calls in a row on several threads,
    each more than SLOW times the fastest seen for the group (a machine's ordinary
    hiccups rarely do that twice running; contention does it every time), send the
    next `backoff` calls of the group to one thread; then several are tried again, and
    a still-slow try doubles the backoff (up to MAX_BACKOFF), a fast one resets it.

    Groups whose fastest call took LONG seconds or more are never backed off: contention
    costs such a call a few scheduler time slices, far from SLOW times its length, so
    when one is that slow the cause is elsewhere (a fresh output's first-touch page
    faults, the kernel compacting memory for huge pages), and one thread does not help.
    """

    SLOW = 8.0
    STRIKES = 2
    LONG = 0.005
    FIRST_BACKOFF = 8
    MAX_BACKOFF = 1024
    # Forget everything past this many groups (shapes that vary from call to call).
    MAX_GROUPS = 4096

    def __init__(self):
        self._lock = threading.Lock()
        # group -> [fastest seconds on several threads, calls left on one thread,
        #           backoff, slow calls in a row]
        self._groups = {}

    def threads(self, group, n):
        """The threads for the next call of `group`, `n` being the configured count."""
        state = self._groups.get(group)
        if state is None or state[1] <= 0:
            return n
        with self._lock:
            state[1] -= 1
        return 1

    def _ordinary(self, state, seconds):
        """Whether a call of `seconds` is not slow for its group's `state`."""
        return seconds <= self.SLOW * state[0] or state[0] >= self.LONG

    def record(self, group, used, seconds):
        """Accounts a call of `group` on `used` threads that took `seconds`."""
        if used <= 1:
            return
        state = self._groups.get(group)
        if (state is not None and state[3] == 0 and state[2] == self.FIRST_BACKOFF
                and self._ordinary(state, seconds)):
            # An ordinary call, nothing to reset: no lock (a race could lose a new best
            # time, never back a group off).
            if seconds < state[0]:
                state[0] = seconds
            return
        with self._lock:
            if len(self._groups) >= self.MAX_GROUPS and group not in self._groups:
                self._groups.clear()
            state = self._groups.setdefault(group, [seconds, 0, self.FIRST_BACKOFF, 0])
            if self._ordinary(state, seconds):
                state[0] = min(state[0], seconds)
                state[2] = self.FIRST_BACKOFF
                state[3] = 0
                return
            state[3] += 1
            # After a backoff one slow try is enough to back off again.
            if state[3] >= self.STRIKES or state[2] > self.FIRST_BACKOFF:
                state[1] = state[2]
                state[2] = min(2 * state[2], self.MAX_BACKOFF)
                state[3] = 0


def _load_kernels():
    """(the kernel module, its name, whether the activations run in AVX-512)."""
    choice = os.environ.get(DISPATCH_VAR, "auto")
    if choice not in ("auto", "avx512", "avx2", "baseline"):
        raise BackendUnavailable(
            f"{DISPATCH_VAR} must be auto, avx512, avx2 or baseline, got {choice!r}")
    has_avx2 = cpu_has_avx2()
    if choice in ("avx512", "avx2") and not has_avx2:
        # (The avx2 build would stop the process with an illegal instruction.)
        raise BackendUnavailable(f"{DISPATCH_VAR}={choice}: this CPU lacks AVX2, FMA or F16C")
    if choice != "baseline" and has_avx2:
        try:
            kernels = importlib.import_module("fastbn._cy.kernels_avx2")
        except ImportError:
            if choice != "auto":
                raise
        else:
            wide = choice != "avx2" and kernels.wide_enabled()
            if choice == "avx512" and not wide:
                raise BackendUnavailable(f"{DISPATCH_VAR}=avx512: this CPU has no AVX-512F")
            return kernels, "avx2", wide
    return importlib.import_module("fastbn._cy.kernels_baseline"), "baseline", False


class CythonBackend(Backend):
    name = "cython"

    def __init__(self):
        try:
            self._k, self.isa, self._wide = _load_kernels()
        except ImportError as err:
            raise BackendUnavailable(
                f"its compiled kernels are missing ({err}); reinstall fastbn with a C "
                "compiler (pip install .)") from None
        self.openmp = self._k.openmp_enabled()
        self._serial_below = self._k.serial_below
        # float16 data converted by the kernels (the avx2 build), else by NumPy.
        self._halves = self._k.f16c_enabled()
        mode = "OpenMP" if self.openmp else "serial: built without OpenMP"
        self.stream_bytes = stream_bytes()
        self.guard = ContentionGuard()
        halves = "float16 read and written by the kernels" if self._halves else \
            "float16 through float32 copies"
        wide = "; activations in AVX-512" if self._wide else ""
        self.description = (f"Cython fused kernels ({self.isa}, {mode}; {halves}{wide}; "
                            f"outputs from {self.stream_bytes / 2**20:g} MiB streamed)")

    def threads(self, size=None):
        """Threads for a kernel call (on `size` elements: small ones run on one)."""
        if not self.openmp or (size is not None and size < self._serial_below):
            return 1
        n = _integer_setting(NUM_THREADS_VAR, 1, "positive") or usable_cores()
        limit = self._k.omp_max_threads()
        return n if n <= limit else max(1, limit)

    # -- helpers -----------------------------------------------------------------
    @staticmethod
    def guard_group(kernel, x):
        """The contention guard's group of a call of `kernel` on `x`."""
        return kernel, x.shape, x.dtype.char

    def _run(self, kernel, size, *args, **options):
        """kernel(*args, threads, **options), with the thread count `threads(size)` and the
        guard's."""
        n = self.threads(size)
        if n <= 1:
            return kernel(*args, 1, **options)
        group = self.guard_group(kernel, args[0])
        guard = self.guard
        used = guard.threads(group, n)
        start = time.perf_counter()
        result = kernel(*args, used, **options)
        guard.record(group, used, time.perf_counter() - start)
        return result

    def _input(self, x):
        """x as the C-contiguous float32/float64 array the kernels read."""
        if x.dtype == _F16:
            if self._reads_halves(x):
                xk = np.empty(x.shape, np.float32)
                self._run(self._k.halves_to_floats, x.size, x, xk)
                return xk
            return np.ascontiguousarray(x, np.float32)
        return np.ascontiguousarray(x)

    @staticmethod
    def _output(x, xk, out):
        """Where the kernels write: `out` itself when they can, else over xk where it is
        a copy of x made for them (float16 or strided data: one temporary instead of
        two), else a new array."""
        if out is not None and out.dtype == xk.dtype and out.flags.c_contiguous:
            return out
        if xk is not x:
            return xk
        return np.empty(xk.shape, xk.dtype)

    def _reads_halves(self, x, dy=None):
        """Whether the kernels read x (and dy, of x's dtype) as they are: float16,
        C-contiguous, and a build whose kernels convert float16 themselves."""
        return (x.dtype == _F16 and self._halves and x.flags.c_contiguous
                and (dy is None or dy.flags.c_contiguous))

    @staticmethod
    def _half_output(x, out):
        """Where the kernels write a float16 result of x's shape: `out` if they can."""
        return out if out is not None and out.flags.c_contiguous else np.empty(x.shape, _F16)

    def _operands(self, x, out):
        """(what the kernels read, their compute dtype, where they write) for x and out."""
        if self._reads_halves(x):
            # Read and written as float16 by the kernel itself: no float32 copies.
            return x, _F32, self._half_output(x, out)
        xk = self._input(x)
        return xk, xk.dtype, self._output(x, xk, out)

    def _stream(self, y, *inputs):
        """Whether to write y with non-temporal stores: it is too large to stay cached,
        and not written over one of the `inputs` (in place, its lines are in the cache,
        read just before: plain stores are faster there, measured)."""
        return y.nbytes >= self.stream_bytes and not any(
            np.may_share_memory(y, a) for a in inputs)

    def _finish(self, x, y, out):
        """The kernels' output y (C-contiguous) as the result: in `out` where given, else
        in x's dtype."""
        if out is None:
            if y.dtype == x.dtype:
                return y
            out = np.empty(y.shape, x.dtype)
        elif y is out:
            return out
        if out.dtype == _F16 and self._halves and out.flags.c_contiguous:
            self._run(self._k.floats_to_halves, y.size, y, out)
        else:
            np.copyto(out, y, casting="unsafe")
        return out

    # -- protocol ----------------------------------------------------------------
    def moments(self, x, weights=None):
        if weights is None and self._reads_halves(x):
            # Widened by the kernel a block at a time: no float32 copy.
            return self._run(self._k.moments, x.size, x, None)
        xk = self._input(x)
        w = None
        if weights is not None:
            w = np.asarray(weights, xk.dtype)
            if w.size and w.min() < 0:
                # Negative frequency weights break block-wise merging: reference formula.
                from .numpy_backend import NumpyBackend
                return NumpyBackend().moments(x, weights)
            w = np.broadcast_to(np.ascontiguousarray(w), xk.shape)
        return self._run(self._k.moments, xk.size, xk, w)

    # The normalizations take `activation` (a name of ACTIVATIONS, or None): applied to
    # the output as the kernels write it, or after where they write a float32 copy of
    # float16 data (an activation of the rounded values, as applied on its own).
    fuses_activations = True

    def _after(self, activation, x, y):
        """The kernels' code for `activation` on y as they write it, else -1."""
        return -1 if activation is None or y.dtype != x.dtype else ACTIVATIONS.index(activation)

    def _activated(self, activation, after, result, out):
        """`result` (in `out` where given) through `activation` where the kernels did not
        apply it."""
        if activation is None or after >= 0:
            return result
        activated = self.activation(activation, result)
        if out is None:
            return activated
        # (Not _finish: that converts the kernels' float32 copies, and this is x's dtype.)
        np.copyto(out, activated)
        return out

    def normalize(self, x, mean, multiplier, offset, out=None, relu=False, activation=None):
        xk, ct, y = self._operands(x, out)
        after = self._after(activation, x, y)
        self._run(self._k.normalize, xk.size, xk, y, np.ascontiguousarray(mean, ct),
                  np.ascontiguousarray(multiplier, ct), np.ascontiguousarray(offset, ct),
                  bool(relu), self._stream(y, xk), after=after, wide=self._wide)
        return self._activated(activation, after, self._finish(x, y, out), out)

    def infer_forward(self, x, mean, variance, scale, offset, epsilon, out=None, relu=False,
                      activation=None):
        xk, ct, y = self._operands(x, out)
        after = self._after(activation, x, y)
        self._run(
            self._k.infer_forward, xk.size, xk, y, np.ascontiguousarray(mean, ct),
            np.ascontiguousarray(variance, ct),
            None if scale is None else np.ascontiguousarray(scale, ct),
            np.ascontiguousarray(offset, ct), float(epsilon), bool(relu), self._stream(y, xk),
            after=after, wide=self._wide)
        return self._activated(activation, after, self._finish(x, y, out), out)

    def activation(self, kind, x):
        if not (kind in ACTIVATIONS and x.flags.c_contiguous
                and (x.dtype != _F16 or self._halves)):
            # Strided data, and float16 in the baseline build: NumPy's loops.
            return super().activation(kind, x)
        y = np.empty(x.shape, x.dtype)
        self._run(self._k.activation, x.size, x, y, ACTIVATIONS.index(kind), self._wide)
        return y

    def activation_grad(self, kind, dy, y, out=None):
        if not ((dy.dtype != _F16 or self._halves) and y.dtype == dy.dtype
                and dy.flags.c_contiguous and y.flags.c_contiguous
                and (out is None or out.flags.c_contiguous)):
            # Strided data, and float16 in the baseline build: NumPy's loops.
            return super().activation_grad(kind, dy, y, out=out)
        result = np.empty(dy.shape, dy.dtype) if out is None else out
        self._run(self._k.activation_grad, dy.size, dy, y, result, ACTIVATIONS.index(kind))
        return result

    def train_forward(self, x, scale, offset, epsilon, weights=None, out=None, relu=False,
                      activation=None):
        if weights is not None:
            # Weighted statistics, then normalize (which applies the activation).
            return super().train_forward(x, scale, offset, epsilon, weights, out, relu,
                                         activation=activation)
        xk, ct, y = self._operands(x, out)
        after = self._after(activation, x, y)
        mean, var = self._run(
            self._k.train_forward, xk.size, xk, y, np.ascontiguousarray(scale, ct),
            np.ascontiguousarray(offset, ct), float(epsilon), bool(relu), self._stream(y, xk),
            after=after, wide=self._wide)
        return self._activated(activation, after, self._finish(x, y, out), out), mean, var

    def grad_reductions(self, x, dy, mean):
        xk = self._input(x)
        dk = self._input(dy)
        return self._run(self._k.grad_reductions, xk.size, xk, dk,
                         np.ascontiguousarray(mean, np.float64))

    def grad_input(self, x, dy, mean, a, b, c, weights=None, out=None):
        xk = self._input(x)
        dk = self._input(dy)
        ct = dk.dtype
        y = self._output(dy, dk, out)
        w = position_weights(weights, dk)
        self._run(self._k.grad_input, dk.size, xk, dk, y,
                  *(np.ascontiguousarray(v, ct) for v in (mean, a, b, c)), w,
                  self._stream(y, xk, dk))
        return self._finish(dy, y, out)

    def backward(self, x, dy, mean, variance, scale, epsilon, training, weights=None,
                 out=None):
        if weights is None and self._reads_halves(x, dy):
            # Read and written as float16 by the kernel itself: no float32 copies.
            xk, dk, w = x, dy, None
            y = self._half_output(x, out)
        else:
            xk = self._input(x)
            dk = self._input(dy)
            y = self._output(dy, dk, out)
            w = position_weights(weights, dk)
        # mean, variance and scale as Backend.backward has them are what the kernel takes.
        sum_dy, sum_dy_xhat = self._run(
            self._k.backward, dk.size, xk, dk, y, mean, variance, scale, float(epsilon),
            bool(training), w, self._stream(y, xk, dk))
        return self._finish(dy, y, out), sum_dy, sum_dy_xhat


def create():
    return CythonBackend()

