"""The Numba CUDA backend: fastbn's kernels on NVIDIA GPUs (the `numba-cuda` package).

Every protocol operation runs as CUDA kernels.  Reductions (moments,
weighted moments, gradient sums) write one partial per (block, channel) in
float64; the partials are combined on the host in block order, so results
do not depend on scheduling.  Elementwise kernels normalize, apply the ReLU,
and form the input gradient.

Arrays: device arrays (anything with `__cuda_array_interface__`: Numba
device arrays, CuPy arrays, PyTorch CUDA tensors) are used in place and the
results stay on the device, as Numba device arrays (`fastbn.nn` hands them
back as the caller's kind where that costs no copy).  NumPy arrays are
copied to the device and the results copied back.  Per-channel vectors
(statistics, parameters) live on the host: they are C numbers.

Available where a CUDA device is present, or under Numba's simulator
(`NUMBA_ENABLE_CUDASIM=1`, for tests); `auto` never picks it without a device.
"""

import math
import os

import numpy as np

from .base import (Backend, BackendUnavailable, compute_dtype, per_channel_multiplier,
                   position_weights)

SIMULATOR_VAR = "NUMBA_ENABLE_CUDASIM"


def _simulated():
    return os.environ.get(SIMULATOR_VAR, "") not in ("", "0")


# Rows layout (M == 1): a block is CHANNELS_PER_BLOCK threads across channels times
# ROW_THREADS threads down the rows.  Runs layout: RUN_THREADS threads along a run.
# Elementwise kernels: grid-stride loops over at most ELEMENTWISE_BLOCKS blocks.
# The simulator runs every thread as a Python thread: there, blocks are tiny.
if _simulated():
    CHANNELS_PER_BLOCK, ROW_THREADS, RUN_THREADS = 4, 2, 8
    ELEMENTWISE_THREADS, ELEMENTWISE_BLOCKS = 16, 1
else:
    CHANNELS_PER_BLOCK, ROW_THREADS, RUN_THREADS = 32, 8, 256
    ELEMENTWISE_THREADS, ELEMENTWISE_BLOCKS = 256, 4096
# Elements a reduction block covers per channel (fixed by the shape, not the device).
BLOCK_ELEMENTS = 16384


try:
    from numba import cuda
except ImportError:  # the backend then says so (BackendUnavailable)
    cuda = None

float64 = np.float64


def _jit(fn):
    return cuda.jit(fn) if cuda is not None else fn


@_jit
def rows_sums(x, a, has_a, a_c, rows_per_block, centre, centre_from_data, out0, out1, out2):
    """Per-channel partials of a rows block: sum(a), sum(a*d), sum(a*d*d), d = x - centre.

    a is `a[r, c * a_c, 0]` (weights shared by the channels: a_c = 0), or 1 without it.
    The centre is centre[c], or with `centre_from_data` each channel's first element,
    then written to centre[c].
    """
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * CHANNELS_PER_BLOCK + tx
    b = cuda.blockIdx.y
    n_rows = x.shape[0]
    channels = x.shape[1]
    s0 = cuda.shared.array((ROW_THREADS, CHANNELS_PER_BLOCK), float64)
    s1 = cuda.shared.array((ROW_THREADS, CHANNELS_PER_BLOCK), float64)
    s2 = cuda.shared.array((ROW_THREADS, CHANNELS_PER_BLOCK), float64)
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    if c < channels:
        if centre_from_data:
            ce = float64(x[0, c, 0])
            if b == 0 and ty == 0:
                centre[c] = ce
        else:
            ce = centre[c]
        start = b * rows_per_block
        end = min(start + rows_per_block, n_rows)
        for r in range(start + ty, end, ROW_THREADS):
            v = float64(x[r, c, 0]) - ce
            wt = 1.0
            if has_a:
                wt = float64(a[r, c * a_c, 0])
            a0 += wt
            a1 += wt * v
            a2 += wt * v * v
    s0[ty, tx] = a0
    s1[ty, tx] = a1
    s2[ty, tx] = a2
    cuda.syncthreads()
    if ty == 0 and c < channels:
        t0 = 0.0
        t1 = 0.0
        t2 = 0.0
        for k in range(ROW_THREADS):
            t0 += s0[k, tx]
            t1 += s1[k, tx]
            t2 += s2[k, tx]
        out0[b, c] = t0
        out1[b, c] = t1
        out2[b, c] = t2


@_jit
def runs_sums(x, a, has_a, a_c, positions_per_block, centre, centre_from_data, out0, out1,
              out2):
    """`rows_sums` for a runs block of channel blockIdx.x, over positions p = n * M + m."""
    c = cuda.blockIdx.x
    b = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    m_size = x.shape[2]
    total = x.shape[0] * m_size
    s0 = cuda.shared.array(RUN_THREADS, float64)
    s1 = cuda.shared.array(RUN_THREADS, float64)
    s2 = cuda.shared.array(RUN_THREADS, float64)
    if centre_from_data:
        ce = float64(x[0, c, 0])
        if b == 0 and tid == 0:
            centre[c] = ce
    else:
        ce = centre[c]
    start = b * positions_per_block
    end = min(start + positions_per_block, total)
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    for p in range(start + tid, end, RUN_THREADS):
        n = p // m_size
        m = p - n * m_size
        v = float64(x[n, c, m]) - ce
        wt = 1.0
        if has_a:
            wt = float64(a[n, c * a_c, m])
        a0 += wt
        a1 += wt * v
        a2 += wt * v * v
    s0[tid] = a0
    s1[tid] = a1
    s2[tid] = a2
    cuda.syncthreads()
    step = RUN_THREADS // 2
    while step > 0:
        if tid < step:
            s0[tid] += s0[tid + step]
            s1[tid] += s1[tid + step]
            s2[tid] += s2[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        out0[b, c] = s0[0]
        out1[b, c] = s1[0]
        out2[b, c] = s2[0]

@_jit
def normalize(x, y, mean, k, b, relu):
    m_size = x.shape[2]
    channels = x.shape[1]
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        m = i % m_size
        c = (i // m_size) % channels
        n = i // (m_size * channels)
        v = (x[n, c, m] - mean[c]) * k[c] + b[c]
        if relu and v < 0:
            v = 0
        y[n, c, m] = v

@_jit
def grad_input(x, dy, dx, mean, a, bb, cc, w, has_w):
    m_size = x.shape[2]
    channels = x.shape[1]
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        m = i % m_size
        c = (i // m_size) % channels
        n = i // (m_size * channels)
        term = bb[c] * (x[n, c, m] - mean[c]) + cc[c]
        if has_w:
            term = term * w[n, 0, m]
        dx[n, c, m] = a[c] * dy[n, c, m] + term


KERNELS = {name: globals()[name] for name in ("rows_sums", "runs_sums", "normalize",
                                              "grad_input")}


def _elementwise_blocks(size):
    return max(1, min(ELEMENTWISE_BLOCKS, math.ceil(size / ELEMENTWISE_THREADS)))


def _sum_blocks(partial):
    """Block partials (B, C) summed in block order, on the host."""
    host = partial.copy_to_host() if hasattr(partial, "copy_to_host") else np.asarray(partial)
    total = host[0].copy()
    for row in host[1:]:
        total += row
    return total


class NumbaCudaBackend(Backend):
    name = "numba_cuda"
    accepts_device_arrays = True

    def __init__(self):
        if cuda is None:
            raise BackendUnavailable(
                "numba-cuda is not installed (pip install 'fastbn[cuda]')")
        self.simulated = _simulated()
        if not self.simulated:
            try:
                available = cuda.is_available()
            except Exception as err:  # a broken driver reads as "not here"
                raise BackendUnavailable(f"CUDA is not usable here: {err}") from None
            if not available:
                raise BackendUnavailable(
                    "no CUDA device here (numba.cuda.is_available() is False); "
                    f"{SIMULATOR_VAR}=1 runs it on Numba's simulator")
        self._cuda = cuda
        self._k = KERNELS
        where = "Numba's CUDA simulator" if self.simulated else cuda.get_current_device().name
        if isinstance(where, bytes):
            where = where.decode()
        self.description = f"Numba CUDA kernels ({where})"

    # -- arrays ----------------------------------------------------------------
    @staticmethod
    def is_device_array(a):
        # (The simulator's device arrays have no __cuda_array_interface__.)
        return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"

    def _device(self, a, dtype=None):
        """(device array, was on the host) for an (N, C, M) array or vector."""
        cuda = self._cuda
        if self.is_device_array(a):
            d = a if type(a).__name__ == "FakeCUDAArray" else cuda.as_cuda_array(a)
            if dtype is not None and d.dtype != dtype:
                raise TypeError(f"device arrays must already be {np.dtype(dtype)}, got {d.dtype}")
            return d, False
        host = np.ascontiguousarray(a, dtype)
        return cuda.to_device(host), True

    def _vector(self, v, dtype):
        return self._cuda.to_device(np.ascontiguousarray(v, dtype))

    def _result(self, d_out, on_host, dtype, out):
        """The result where the caller expects it: `out`, a host array, or on the device."""
        if out is not None:
            if self.is_device_array(out):
                if d_out is not out:
                    out.copy_to_device(d_out)
                return out
            np.copyto(out, d_out.copy_to_host(), casting="unsafe")
            return out
        if on_host:
            return d_out.copy_to_host().astype(dtype, copy=False)
        return d_out

    def _compute_input(self, x):
        """x on the device in its compute dtype (float16 is computed in float32)."""
        ct = compute_dtype(x.dtype)
        if self.is_device_array(x):
            if x.dtype != ct:
                host = np.asarray(x.copy_to_host(), ct)
                return self._cuda.to_device(host), False
            return self._device(x)[0], False
        return self._cuda.to_device(np.ascontiguousarray(x, ct)), True

    def _sums(self, d_x, d_a, a_c, centre, centre_from_data):
        """Per-channel sum(a), sum(a*d), sum(a*d*d) (d = x - centre), float64 on the host.

        Block partials are summed on the host in block order.  d_a: None for a = 1.
        """
        n, c, m = d_x.shape
        cuda = self._cuda
        if m == 1:
            per_block = max(1, BLOCK_ELEMENTS // CHANNELS_PER_BLOCK)
            blocks = max(1, math.ceil(n / per_block))
            kernel = self._k["rows_sums"]
            grid, block = (math.ceil(c / CHANNELS_PER_BLOCK), blocks), (CHANNELS_PER_BLOCK,
                                                                        ROW_THREADS)
        else:
            per_block = BLOCK_ELEMENTS
            blocks = max(1, math.ceil(n * m / per_block))
            kernel, grid, block = self._k["runs_sums"], (c, blocks), RUN_THREADS
        parts = [cuda.device_array((blocks, c), np.float64) for _ in range(3)]
        has_a = d_a is not None
        if not has_a:
            d_a = cuda.to_device(np.zeros((1, 1, 1)))
        kernel[grid, block](d_x, d_a, has_a, a_c, per_block, centre, centre_from_data, *parts)
        return tuple(_sum_blocks(p) for p in parts)

    def moments(self, x, weights=None):
        n, c, m = x.shape
        if n * m == 0 or c == 0:
            return np.full(c, np.nan), np.full(c, np.nan)
        return self._moments(self._compute_input(x)[0], weights)

    def _moments(self, d_x, weights):
        n, c, m = d_x.shape
        d_w, w_c = None, 0
        if weights is not None:
            w = np.asarray(weights, np.float64)
            w_c = 1 if w.shape[1] == c and c > 1 else 0
            d_w = self._cuda.to_device(np.ascontiguousarray(np.broadcast_to(
                w, (n, w.shape[1], m))))
        d_shift = self._cuda.device_array(c, np.float64)
        s0, s1, s2 = self._sums(d_x, d_w, w_c, d_shift, True)
        shift = d_shift.copy_to_host()
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(s0 == 0, 1.0, s0)
            rel = s1 / safe
            mean = np.where(s0 == 0, 0.0, shift + rel)
            var = np.where(s0 == 0, 0.0, np.maximum(s2 / safe - rel * rel, 0.0))
        return mean, var

    def normalize(self, x, mean, multiplier, offset, out=None, relu=False):
        d_x, on_host = self._compute_input(x)
        d_out = self._normalize(d_x, mean, multiplier, offset, relu)
        return self._finish_output(d_out, x, on_host, out)

    def _normalize(self, d_x, mean, multiplier, offset, relu):
        ct = d_x.dtype
        d_out = self._cuda.device_array(d_x.shape, ct)
        blocks = _elementwise_blocks(d_x.size)
        if d_x.size:
            self._k["normalize"][blocks, ELEMENTWISE_THREADS](
                d_x, d_out, self._vector(mean, ct), self._vector(multiplier, ct),
                self._vector(offset, ct), bool(relu))
        return d_out

    def train_forward(self, x, scale, offset, epsilon, weights=None, out=None, relu=False):
        # One upload of x for both kernels (the base composition would make two).
        d_x, on_host = self._compute_input(x)
        mean, variance = self._moments(d_x, weights)
        ct = d_x.dtype
        multiplier = per_channel_multiplier(variance, scale, epsilon, ct)
        d_out = self._normalize(d_x, mean.astype(ct), multiplier, offset, relu)
        return self._finish_output(d_out, x, on_host, out), mean, variance

    def _finish_output(self, d_out, x, on_host, out):
        if not on_host and x.dtype != d_out.dtype:
            # float16 device input: the result goes back in float16.
            return self._cuda.to_device(d_out.copy_to_host().astype(x.dtype))
        return self._result(d_out, on_host, x.dtype, out)

    def grad_reductions(self, x, dy, mean):
        n, c, m = x.shape
        if x.size == 0:
            return np.zeros(c), np.zeros(c)
        d_x, _ = self._compute_input(x)
        d_dy, _ = self._compute_input(dy)
        sum_dy, sum_dy_xc, _ = self._sums(d_x, d_dy, 1, self._vector(mean, np.float64), False)
        return sum_dy, sum_dy_xc

    def grad_input(self, x, dy, mean, a, b, c, weights=None, out=None):
        d_x, _ = self._compute_input(x)
        d_dy, on_host = self._compute_input(dy)
        ct = d_dy.dtype
        cuda = self._cuda
        if weights is not None:
            d_w = cuda.to_device(position_weights(weights, d_dy))
        else:
            d_w = cuda.to_device(np.zeros((1, 1, 1), ct))
        d_out = cuda.device_array(d_dy.shape, ct)
        blocks = _elementwise_blocks(d_dy.size)
        if d_dy.size:
            self._k["grad_input"][blocks, ELEMENTWISE_THREADS](
                d_x, d_dy, d_out, *(self._vector(v, ct) for v in (mean, a, b, c)), d_w,
                weights is not None)
        return self._finish_output(d_out, dy, on_host, out)


def create():
    return NumbaCudaBackend()
