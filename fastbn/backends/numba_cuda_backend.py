"""The Numba CUDA backend: fastbn's kernels on NVIDIA GPUs (the `numba-cuda` package).

Every protocol operation runs as CUDA kernels.  Reductions write one float64
partial per (block, channel) of shifted sums; a second kernel adds each
channel's partials in block order (a tree of fixed shape), so results do not
depend on scheduling or on the device, and turns them into statistics, in
training into the normalization's coefficients, and in the backward into the
input gradient's, on the device.  Elementwise kernels normalize (with the
optional ReLU) and form the input gradient; the rows layout (channels last)
gives each thread one channel, the runs layout (channels first) each block
whole runs of one channel, so no element pays for index arithmetic.

What a call costs on the host matters as much as the kernels: Numba spends
tens of microseconds on each allocation, copy and array argument.  So scratch
buffers are kept per thread and reused, per-channel vectors travel through
mapped (pinned, device-visible) host memory that the host reads and writes
as NumPy arrays, and each operation ends by waiting for its kernels, which
makes that reuse safe.

Arrays: device arrays (anything with `__cuda_array_interface__`: Numba
device arrays, CuPy arrays, PyTorch CUDA tensors) are used in place and the
results stay on the device, as Numba device arrays (`fastbn.nn` hands them
back as the caller's kind where that costs no copy).  NumPy arrays are
copied to the device and the results copied back.  float16 data stays float16:
the kernels compute in float32 (sums in float64) and round once.  Per-channel
vectors (statistics, parameters) live on the host: they are C numbers.

Available where a CUDA device is present, or under Numba's simulator
(`NUMBA_ENABLE_CUDASIM=1`, for tests); `auto` never picks it without a device.
"""

import math
import os
import threading
import warnings

import numpy as np

from . import as_numba_array, is_device_array, is_numba_array, to_numba_device
from .base import (ACTIVATIONS, Backend, BackendUnavailable, compute_dtype, environ_get,
                   position_weights)

SIMULATOR_VAR = "NUMBA_ENABLE_CUDASIM"
# FASTBN_CUDA_DIRECT_LAUNCH=0: every launch through Numba (see DirectLaunches).
DIRECT_LAUNCH_VAR = "FASTBN_CUDA_DIRECT_LAUNCH"


def _simulated():
    return os.environ.get(SIMULATOR_VAR, "") not in ("", "0")


# Reductions.  Rows layout (M == 1): a block is CHANNELS_PER_BLOCK threads across
# channels times ROW_THREADS threads down the rows.  Runs layout: RUN_THREADS threads
# along the positions of one channel.  The combine: CHANNELS_PER_BLOCK channels times
# COMBINE_THREADS threads across the partials.
# Elementwise kernels: ROW_THREADS rows of CHANNELS_PER_BLOCK channels, or up to
# RUN_THREADS threads along each run, in grid-stride loops over at most
# ELEMENTWISE_BLOCKS blocks.
# The simulator runs every thread as a Python thread: there, blocks are tiny.
if _simulated():
    CHANNELS_PER_BLOCK, ROW_THREADS, RUN_THREADS, COMBINE_THREADS = 4, 2, 8, 2
    ELEMENTWISE_BLOCKS = 2
else:
    CHANNELS_PER_BLOCK, ROW_THREADS, RUN_THREADS, COMBINE_THREADS = 32, 8, 256, 8
    ELEMENTWISE_BLOCKS = 2048
# Elements a reduction block covers per channel, at least (fixed by the shape, not the
# device); rows blocks grow so that no more than ROW_PARTIALS of them share a channel,
# which keeps the combine short.
BLOCK_ELEMENTS = 16384
ROW_PARTIALS = 256
# The kernels load UNROLL elements before they use any: each thread then keeps several
# loads in flight, which the memory system needs to reach its bandwidth.
UNROLL = 4
# Rows layouts with fewer channels than this go through the flat elementwise kernels
# (a warp across so few channels would leave most of its lanes idle).
MIN_ROW_CHANNELS = CHANNELS_PER_BLOCK

# What the combine kernel leaves: the three sums only (gradients), the statistics too,
# also the normalization's coefficients (training), or the gradient sums and the input
# gradient's coefficients (the backward).
SUMS, STATISTICS, COEFFICIENTS, GRADIENT = 0, 1, 2, 3

try:
    from numba import cuda

    try:
        from numba.cuda.core.errors import NumbaPerformanceWarning
    except ImportError:  # numba-cuda before its own copy of Numba's core
        from numba.core.errors import NumbaPerformanceWarning
except ImportError:  # the backend then says so (BackendUnavailable)
    cuda = None
# Numba warns of launches of fewer blocks than this (its low-occupancy warning).
FEW_BLOCKS = 128

float64 = np.float64
# A value as float64 for the activations' arithmetic.  On a device Numba's float() keeps
# a float32 or float16 in its type; under the simulator a NumPy float64 would warn of
# inf * 0 where a Python float does not.
wide = float if _simulated() else np.float64


def _jit(fn):
    return cuda.jit(fn) if cuda is not None else fn


def _device(fn):
    return cuda.jit(device=True)(fn) if cuda is not None else fn


@_device
def _column_sums(s0, s1, s2, a0, a1, a2):
    """A thread's three values into its (threadIdx.y, threadIdx.x) place in the shared
    arrays; once the block has met, the sums down its column in row order (the bits of
    a plain loop), for the threads of row 0 (zeros for the others).  Every thread of the
    block must call it."""
    ty = cuda.threadIdx.y
    tx = cuda.threadIdx.x
    s0[ty, tx] = a0
    s1[ty, tx] = a1
    s2[ty, tx] = a2
    cuda.syncthreads()
    t0 = 0.0
    t1 = 0.0
    t2 = 0.0
    if ty == 0:
        for k in range(s0.shape[0]):
            t0 += s0[k, tx]
            t1 += s1[k, tx]
            t2 += s2[k, tx]
    return t0, t1, t2


@_device
def _add(a0, a1, a2, w, v):
    """a0 + w, a1 + w * v, a2 + w * v * v."""
    return a0 + w, a1 + w * v, a2 + w * v * v


@_device
def _add_four(a0, a1, a2, w0, v0, w1, v1, w2, v2, w3, v3):
    """`_add` of four (w, v), one after the other (the bits of a plain loop over them)."""
    a0, a1, a2 = _add(a0, a1, a2, w0, v0)
    a0, a1, a2 = _add(a0, a1, a2, w1, v1)
    a0, a1, a2 = _add(a0, a1, a2, w2, v2)
    return _add(a0, a1, a2, w3, v3)


@_jit
def rows_sums(x, a, parts, has_a, a_c, rows_per_block, centre_from_data):
    """Per-channel partials of a rows block: sum(a), sum(a*d), sum(a*d*d), d = x - centre.

    a is `a[r, c * a_c, 0]` (weights shared by the channels: a_c = 0), or 1 without
    it.  The centre is parts[0, c], or with `centre_from_data` each channel's first
    element, then written there.  Partial k of block b goes to
    parts[1 + k * blocks + b, c].
    """
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * CHANNELS_PER_BLOCK + tx
    b = cuda.blockIdx.y
    blocks = cuda.gridDim.y
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
                parts[0, c] = ce
        else:
            ce = parts[0, c]
        start = b * rows_per_block
        end = min(start + rows_per_block, n_rows)
        # UNROLL rows loaded, then added in row order (the bits of a plain loop).
        r = start + ty
        while r + (UNROLL - 1) * ROW_THREADS < end:
            v0 = float64(x[r, c, 0]) - ce
            v1 = float64(x[r + ROW_THREADS, c, 0]) - ce
            v2 = float64(x[r + 2 * ROW_THREADS, c, 0]) - ce
            v3 = float64(x[r + 3 * ROW_THREADS, c, 0]) - ce
            w0 = w1 = w2 = w3 = 1.0
            if has_a:
                w0 = float64(a[r, c * a_c, 0])
                w1 = float64(a[r + ROW_THREADS, c * a_c, 0])
                w2 = float64(a[r + 2 * ROW_THREADS, c * a_c, 0])
                w3 = float64(a[r + 3 * ROW_THREADS, c * a_c, 0])
            a0, a1, a2 = _add_four(a0, a1, a2, w0, v0, w1, v1, w2, v2, w3, v3)
            r += UNROLL * ROW_THREADS
        while r < end:
            v = float64(x[r, c, 0]) - ce
            wt = 1.0
            if has_a:
                wt = float64(a[r, c * a_c, 0])
            a0, a1, a2 = _add(a0, a1, a2, wt, v)
            r += ROW_THREADS
    t0, t1, t2 = _column_sums(s0, s1, s2, a0, a1, a2)
    if ty == 0 and c < channels:
        parts[1 + b, c] = t0
        parts[1 + blocks + b, c] = t1
        parts[1 + 2 * blocks + b, c] = t2


@_jit
def runs_sums(x, a, parts, has_a, a_c, positions_per_block, centre_from_data):
    """`rows_sums` for a runs block of channel blockIdx.x, over positions p = n * M + m."""
    c = cuda.blockIdx.x
    b = cuda.blockIdx.y
    blocks = cuda.gridDim.y
    tid = cuda.threadIdx.x
    m_size = x.shape[2]
    total = x.shape[0] * m_size
    s0 = cuda.shared.array(RUN_THREADS, float64)
    s1 = cuda.shared.array(RUN_THREADS, float64)
    s2 = cuda.shared.array(RUN_THREADS, float64)
    if centre_from_data:
        ce = float64(x[0, c, 0])
        if b == 0 and tid == 0:
            parts[0, c] = ce
    else:
        ce = parts[0, c]
    start = b * positions_per_block
    end = min(start + positions_per_block, total)
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    # UNROLL positions loaded, then added in position order (the bits of a plain loop).
    # One load in flight a thread: NCHW 32x64x56x56's sums took 40 us on an H200 (0.64
    # TB/s), 27 us so.
    p = start + tid
    while p + (UNROLL - 1) * RUN_THREADS < end:
        n0 = p // m_size
        n1 = (p + RUN_THREADS) // m_size
        n2 = (p + 2 * RUN_THREADS) // m_size
        n3 = (p + 3 * RUN_THREADS) // m_size
        m0 = p - n0 * m_size
        m1 = p + RUN_THREADS - n1 * m_size
        m2 = p + 2 * RUN_THREADS - n2 * m_size
        m3 = p + 3 * RUN_THREADS - n3 * m_size
        v0 = float64(x[n0, c, m0]) - ce
        v1 = float64(x[n1, c, m1]) - ce
        v2 = float64(x[n2, c, m2]) - ce
        v3 = float64(x[n3, c, m3]) - ce
        w0 = w1 = w2 = w3 = 1.0
        if has_a:
            w0 = float64(a[n0, c * a_c, m0])
            w1 = float64(a[n1, c * a_c, m1])
            w2 = float64(a[n2, c * a_c, m2])
            w3 = float64(a[n3, c * a_c, m3])
        a0, a1, a2 = _add_four(a0, a1, a2, w0, v0, w1, v1, w2, v2, w3, v3)
        p += UNROLL * RUN_THREADS
    while p < end:
        n = p // m_size
        m = p - n * m_size
        v = float64(x[n, c, m]) - ce
        wt = 1.0
        if has_a:
            wt = float64(a[n, c * a_c, m])
        a0, a1, a2 = _add(a0, a1, a2, wt, v)
        p += RUN_THREADS
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
        parts[1 + b, c] = s0[0]
        parts[1 + blocks + b, c] = s1[0]
        parts[1 + 2 * blocks + b, c] = s2[0]


@_jit
def combine(parts, io, coef, epsilon, total, result):
    """Each channel's partials (parts as the sums kernels leave it) added in block
    order, then what `result` asks for.

    SUMS: io[0, c], io[1, c] = sum(a), sum(a*d).  STATISTICS: the mean and biased
    variance in io[2, c], io[3, c] (0 where sum(a) is 0).  COEFFICIENTS: those, and
    coef[:, c] = mean, scale / sqrt(variance + epsilon), offset, from the scale and
    offset in io[0, c], io[1, c].  GRADIENT (a = dy, the centre the mean): with the
    variance and scale in io[2, c], io[3, c], io[0, c] = sum(dy), io[1, c] =
    sum(dy * x_hat), and coef[:, c] = mean, b, c, a of dx = a * dy + w * (b * (x -
    mean) + c) as Backend.backward computes them (`total`: the count or the weights'
    sum in training, 0 for constant statistics).
    """
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * CHANNELS_PER_BLOCK + tx
    channels = parts.shape[1]
    blocks = (parts.shape[0] - 1) // 3
    s0 = cuda.shared.array((COMBINE_THREADS, CHANNELS_PER_BLOCK), float64)
    s1 = cuda.shared.array((COMBINE_THREADS, CHANNELS_PER_BLOCK), float64)
    s2 = cuda.shared.array((COMBINE_THREADS, CHANNELS_PER_BLOCK), float64)
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    if c < channels:
        for b in range(ty, blocks, COMBINE_THREADS):
            a0 += parts[1 + b, c]
            a1 += parts[1 + blocks + b, c]
            a2 += parts[1 + 2 * blocks + b, c]
    t0, t1, t2 = _column_sums(s0, s1, s2, a0, a1, a2)
    if ty == 0 and c < channels:
        if result == SUMS:
            io[0, c] = t0
            io[1, c] = t1
        elif result == GRADIENT:
            inv = 1.0 / math.sqrt(io[2, c] + epsilon)
            k = io[3, c] * inv
            sum_dy_xhat = t1 * inv
            b = 0.0
            cc = 0.0
            if total != 0:
                b = -k * inv * sum_dy_xhat / total
                cc = -k * t0 / total
            io[0, c] = t0
            io[1, c] = sum_dy_xhat
            coef[0, c] = parts[0, c]
            coef[1, c] = b
            coef[2, c] = cc
            coef[3, c] = k
        else:
            mean = 0.0
            variance = 0.0
            if t0 != 0:
                rel = t1 / t0
                mean = parts[0, c] + rel
                variance = t2 / t0 - rel * rel
                # (Not max(): NaN stays NaN here on every device.)
                if variance < 0.0:
                    variance = 0.0
            io[2, c] = mean
            io[3, c] = variance
            if result == COEFFICIENTS:
                coef[0, c] = mean
                coef[1, c] = io[0, c] / math.sqrt(variance + epsilon)
                coef[2, c] = io[1, c]


@_jit
def stage(source, target):
    """target[:R] = source for an (R, C) source: per-channel vectors from mapped host
    memory into device memory, read there by every block."""
    rows, channels = source.shape
    for i in range(cuda.grid(1), rows * channels, cuda.gridsize(1)):
        r = i // channels
        c = i - r * channels
        target[r, c] = source[r, c]


@_device
def _activation_value(v, kind, half):
    """The activation `kind` (its index in ACTIVATIONS) of the float64 v, with the host's
    zeros and NaNs: NaN passes, relu(-0.0) is -0.0 for float16 data (`half`) and +0.0
    otherwise, elu(-0.0) is -0.0."""
    if kind == 0 or kind == 1:
        r = v if v > 0.0 or v != v or (half and v == 0.0) else 0.0
        if kind == 1 and r > 6.0:
            r = 6.0
    elif kind == 2:
        e = math.exp(-abs(v))
        r = 1.0 / (1.0 + e) if v >= 0.0 else e / (1.0 + e)
    elif kind == 3:
        r = math.tanh(v)
    else:
        r = math.expm1(v) if v < 0.0 else v
    return r


@_jit
def activation(x, y, kind, half):
    """y = the activation `kind` of x (see _activation_value), over 1-D arrays, in float64
    rounded once."""
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[i] = _activation_value(wide(x[i]), kind, half)


@_jit
def activation_grad(dy, y, out, kind):
    """out = the gradient through activation `kind` (its index in ACTIVATIONS) from its
    output y, over 1-D arrays.  The arithmetic is float64, rounded once."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = wide(y[i])
        d = wide(dy[i])
        if kind == 0:
            g = d * (1.0 if v > 0.0 else 0.0)
        elif kind == 1:
            g = d * (1.0 if v > 0.0 and v < 6.0 else 0.0)
        elif kind == 2:
            g = d * (v * (1.0 - v))
        elif kind == 3:
            g = d * (1.0 - v * v)
        else:
            g = d * (v + 1.0) if v < 0.0 else d
        out[i] = g


@_device
def _affine_value(v, d, wv, mean, k, b, a, has_dy, has_w, relu):
    t = (v - mean) * k + b
    if has_w:
        t *= wv
    if has_dy:
        t = a * d + t
    if relu and t < 0:
        t = 0
    return t


@_device
def _put(y, i, j, m, t, after, half):
    """y[i, j, m] = t, then the activation `after` (none where negative) of the value
    stored: the bits the activation gives that output on its own."""
    y[i, j, m] = t
    if after >= 0:
        y[i, j, m] = _activation_value(wide(y[i, j, m]), after, half)


# The four loads take the first index and the step, not the four indices: with the
# indices computed by the caller, sm_90 code needs 8 more registers.
@_device
def _rows_of(a, r, step, c):
    return a[r, c, 0], a[r + step, c, 0], a[r + 2 * step, c, 0], a[r + 3 * step, c, 0]


@_device
def _positions_of(a, n, c, m, step):
    return a[n, c, m], a[n, c, m + step], a[n, c, m + 2 * step], a[n, c, m + 3 * step]


def _affine_kernels(kind, has_dy, activates=False):
    """The elementwise kernels of one pass, one per layout (kind_rows, kind_runs,
    kind_flat), all with the arguments (x, dy, y, coef, w, has_w, relu, after, half):
      normalization (has_dy False)  y = (x - mean) * k + b, then max(y, 0) with `relu`,
                                    then, in the kernels that `activate`, the
                                    activation `after` (see _put)
      input gradient (has_dy True)  y = a * dy + w * ((x - mean) * k + b)
    coef holds mean, k, b (and a) per channel; w is one weight per position, or 1
    without `has_w`.  dy without has_dy, and w without has_w, are never read: any
    array of the right dtype stands in.  What a pass never varies is fixed when its
    kernels are compiled (dy, the weights and relu by has_dy, the activation by
    `activates`): code a kernel would skip costs it registers all the same, and with
    them blocks per multiprocessor (an H200's normalization went 40 -> 56 registers
    and 118 -> 139 us on 206 MB when one family carried it all)."""
    weighted = has_dy
    rectifies = not has_dy

    @_device
    def fixed(has_w, relu, after):
        return weighted and has_w, rectifies and relu, after if activates else -1

    def rows(x, dy, y, coef, w, has_w, relu, after, half):
        has_w, relu, after = fixed(has_w, relu, after)
        # A thread per channel of a tile of CHANNELS_PER_BLOCK, stepping down the rows.
        c = cuda.blockIdx.x * CHANNELS_PER_BLOCK + cuda.threadIdx.x
        if c < x.shape[1]:
            mean = coef[0, c]
            k = coef[1, c]
            b = coef[2, c]
            a = coef[3, c] if has_dy else k
            n = x.shape[0]
            step = cuda.gridDim.y * ROW_THREADS
            r = cuda.blockIdx.y * ROW_THREADS + cuda.threadIdx.y
            while r + (UNROLL - 1) * step < n:
                v0, v1, v2, v3 = _rows_of(x, r, step, c)
                d0 = d1 = d2 = d3 = v0
                if has_dy:
                    d0, d1, d2, d3 = _rows_of(dy, r, step, c)
                w0 = w1 = w2 = w3 = k
                if has_w:
                    w0, w1, w2, w3 = _rows_of(w, r, step, 0)
                _put(y, r, c, 0, _affine_value(v0, d0, w0, mean, k, b, a, has_dy, has_w, relu),
                     after, half)
                _put(y, r + step, c, 0, _affine_value(v1, d1, w1, mean, k, b, a, has_dy, has_w,
                                                      relu), after, half)
                _put(y, r + 2 * step, c, 0, _affine_value(v2, d2, w2, mean, k, b, a, has_dy, has_w,
                                                          relu), after, half)
                _put(y, r + 3 * step, c, 0, _affine_value(v3, d3, w3, mean, k, b, a, has_dy, has_w,
                                                          relu), after, half)
                r += UNROLL * step
            while r < n:
                v = x[r, c, 0]
                d = dy[r, c, 0] if has_dy else v
                wv = w[r, 0, 0] if has_w else k
                _put(y, r, c, 0, _affine_value(v, d, wv, mean, k, b, a, has_dy, has_w, relu),
                     after, half)
                r += step

    def runs(x, dy, y, coef, w, has_w, relu, after, half):
        has_w, relu, after = fixed(has_w, relu, after)
        # A block per (n, c) run at a time, its threads along the run.
        channels = x.shape[1]
        size = x.shape[2]
        step = cuda.blockDim.x
        for p in range(cuda.blockIdx.x, x.shape[0] * channels, cuda.gridDim.x):
            n = p // channels
            c = p - n * channels
            mean = coef[0, c]
            k = coef[1, c]
            b = coef[2, c]
            a = coef[3, c] if has_dy else k
            m = cuda.threadIdx.x
            while m + (UNROLL - 1) * step < size:
                v0, v1, v2, v3 = _positions_of(x, n, c, m, step)
                d0 = d1 = d2 = d3 = v0
                if has_dy:
                    d0, d1, d2, d3 = _positions_of(dy, n, c, m, step)
                w0 = w1 = w2 = w3 = k
                if has_w:
                    w0, w1, w2, w3 = _positions_of(w, n, 0, m, step)
                _put(y, n, c, m, _affine_value(v0, d0, w0, mean, k, b, a, has_dy, has_w, relu),
                     after, half)
                _put(y, n, c, m + step, _affine_value(v1, d1, w1, mean, k, b, a, has_dy, has_w,
                                                      relu), after, half)
                _put(y, n, c, m + 2 * step, _affine_value(v2, d2, w2, mean, k, b, a, has_dy, has_w,
                                                          relu), after, half)
                _put(y, n, c, m + 3 * step, _affine_value(v3, d3, w3, mean, k, b, a, has_dy, has_w,
                                                          relu), after, half)
                m += UNROLL * step
            while m < size:
                v = x[n, c, m]
                d = dy[n, c, m] if has_dy else v
                wv = w[n, 0, m] if has_w else k
                _put(y, n, c, m, _affine_value(v, d, wv, mean, k, b, a, has_dy, has_w, relu),
                     after, half)
                m += step

    def flat(x, dy, y, coef, w, has_w, relu, after, half):
        has_w, relu, after = fixed(has_w, relu, after)
        # Rows of few channels: a thread per element.
        channels = x.shape[1]
        for i in range(cuda.grid(1), x.shape[0] * channels, cuda.gridsize(1)):
            n = i // channels
            c = i - n * channels
            k = coef[1, c]
            v = x[n, c, 0]
            d = dy[n, c, 0] if has_dy else v
            wv = w[n, 0, 0] if has_w else k
            a = coef[3, c] if has_dy else k
            _put(y, n, c, 0, _affine_value(v, d, wv, coef[0, c], k, coef[2, c], a, has_dy,
                                           has_w, relu), after, half)

    kernels = {}
    for layout, fn in (("rows", rows), ("runs", runs), ("flat", flat)):
        # Named for what they are in profiles and in Numba's messages.
        fn.__name__ = fn.__qualname__ = f"{kind}_{layout}"
        kernels[fn.__name__] = _jit(fn)
    return kernels


KERNELS = {"rows_sums": rows_sums, "runs_sums": runs_sums, "combine": combine, "stage": stage,
           "activation": activation, "activation_grad": activation_grad,
           **_affine_kernels("normalize", False),
           **_affine_kernels("normalize_activated", False, activates=True),
           **_affine_kernels("grad", True)}

# Launch configurations kept (Numba builds one per launch otherwise); beyond this
# many, the cache starts again.
LAUNCHES_KEPT = 256
# How DirectLaunches packs an argument: an array, or a scalar passed as it is.
ARRAY, AS_IS = "array", None


def _flat(a):
    """A C-contiguous device array as a 1-D view."""
    return a.reshape(a.size)


def _flat_launch(size):
    """(grid, block) of a kernel with a thread per element of `size` in a grid-stride
    loop."""
    threads = CHANNELS_PER_BLOCK * ROW_THREADS
    return max(1, min(math.ceil(size / threads), ELEMENTWISE_BLOCKS)), threads


def _host_copy(row):
    """A NumPy copy of a row of a mapped buffer (which the next call overwrites)."""
    return np.array(row, np.float64)


def _argument_kind(a):
    """What Numba types a kernel argument by: a Numba array's class, dtype, rank and
    layout (C, F or neither; broadcast is neither), anything else's class.  (Its Numba
    type itself takes 16 us to build on each new array, and a call's views are new.)"""
    if not is_numba_array(a):
        return type(a)
    flags = a.flags
    broadcast = a.size != 0 and 0 in a.strides
    return (type(a), a.dtype, a.ndim, flags["C_CONTIGUOUS"] and not broadcast,
            flags["F_CONTIGUOUS"] and not broadcast)


class DirectLaunches:
    """Launches of kernels Numba has compiled, straight through cuda.core.

    Numba spends 10-15 us of Python on each array argument of a launch
    (contexts, pointer objects, per-argument dispatch).  A kernel's first
    launch with a new combination of argument types goes through Numba, which
    compiles it; later ones pack the arguments as Numba packs them (an array
    is meminfo, parent, size, itemsize, data pointer, shape, strides) and
    launch the compiled function on the default stream.  This leans on
    numba-cuda's internals: where they are not as expected, Numba launches.
    """

    def __init__(self, kernels):
        import ctypes

        from cuda.core import LaunchConfig, launch
        from numba.cuda.cudadrv.driver import _to_core_stream

        self._kernels = kernels
        self._launch = launch
        self._config = LaunchConfig
        self._stream = _to_core_stream(0)
        self._compiled = {}
        self._configs = {}
        self._scalars = {"int64": ctypes.c_int64, "int32": ctypes.c_int32,
                         "float64": ctypes.c_double, "float32": ctypes.c_float,
                         "bool": AS_IS}

    def __call__(self, name, grid, block, args, numba_launch):
        key = (name, *map(_argument_kind, args))
        compiled = self._compiled.get(key)
        if compiled is None or compiled is False:
            numba_launch(*args)
            if compiled is None:
                try:
                    self._compiled[key] = self._compile(name, args)
                except Exception:  # not a kernel we can launch ourselves: Numba does
                    self._compiled[key] = False
            return
        function, packings = compiled
        params = []
        # An array passed twice (a stand-in for an absent one) is packed once.
        packed = {}
        for packing, a in zip(packings, args):
            if packing is ARRAY:
                fields = packed.get(id(a))
                if fields is None:
                    fields = packed[id(a)] = (0, 0, a.size, a.dtype.itemsize,
                                              a.device_ctypes_pointer.value, *a.shape,
                                              *a.strides)
                params += fields
            elif packing is AS_IS:
                params.append(a)
            else:
                params.append(packing(a))
        config = self._configs.get((grid, block))
        if config is None:
            if len(self._configs) >= LAUNCHES_KEPT:
                self._configs.clear()
            config = self._configs[(grid, block)] = self._config(grid=grid, block=block)
        try:
            self._launch(self._stream, config, function, *params)
        except Exception:
            # Such as a thread where Numba has not made the context current yet: Numba's
            # launch sees to that (and raises the error again if it is the launch's own).
            numba_launch(*args)

    def _compile(self, name, args):
        """(the compiled function, how to pack each argument) of kernel `name` for
        arguments like `args`, which Numba has just launched it with."""
        dispatcher = self._kernels[name]
        kernel = dispatcher.overloads[tuple(dispatcher.typeof_pyval(a) for a in args)]
        if getattr(kernel, "extensions", None) or getattr(kernel, "debug", False):
            raise RuntimeError("kernel launched with extensions or in debug mode")
        packings = [ARRAY if hasattr(argument_type, "ndim") else
                    self._scalars[str(argument_type)] for argument_type in kernel.argument_types]
        return kernel._codelibrary.get_cufunc().kernel, packings


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
        self._launches = {}
        self._local = threading.local()
        self.direct_launches = None
        if not self.simulated and environ_get(DIRECT_LAUNCH_VAR) != "0":
            try:
                self.direct_launches = DirectLaunches(KERNELS)
            except Exception:  # an older numba-cuda: its own launches
                pass
        where = "Numba's CUDA simulator" if self.simulated else cuda.get_current_device().name
        if isinstance(where, bytes):
            where = where.decode()
        self.description = f"Numba CUDA kernels ({where})"

    # -- launches and buffers ------------------------------------------------------
    def _launch(self, name, grid, block):
        """The kernel `name` configured for (grid, block), built once.

        Numba's low-occupancy warning is kept from callers: the launch shape is
        fastbn's choice, and nothing a caller could act on."""
        if self.simulated:  # (the simulator configures the kernel object itself)
            return self._k[name][grid, block]
        key = (name, grid, block)
        configured = self._launches.get(key)
        if configured is None:
            if len(self._launches) >= LAUNCHES_KEPT:
                self._launches.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NumbaPerformanceWarning)
                configured = self._k[name][grid, block]
            self._launches[key] = configured
        return configured

    def _run(self, name, grid, block, *args):
        """Launches kernel `name` on (grid, block) with `args`."""
        numba_launch = self._launch(name, grid, block)
        direct = self.direct_launches
        if direct is None:
            numba_launch(*args)
        else:
            direct(name, grid, block, args, numba_launch)

    def _buffer(self, role, shape, dtype, mapped=False):
        """A scratch array for `role`, kept for this thread and reused by later calls
        (each operation waits for its kernels before it returns).  Mapped buffers are
        host memory the device reads and writes: NumPy arrays on the host."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        key = (role, shape, np.dtype(dtype).char, mapped)
        found = buffers.get(key)
        if found is None:
            if len(buffers) >= 64:
                buffers.clear()
            make = self._cuda.mapped_array if mapped else self._cuda.device_array
            found = buffers[key] = make(shape, dtype)
        return found

    def _wait(self):
        self._cuda.synchronize()

    # -- arrays ----------------------------------------------------------------
    def _compute_input(self, x):
        """(x on the device in its own dtype, whether it came from the host).

        The kernels read and write float16 themselves and compute in float32."""
        if is_device_array(x):
            return as_numba_array(x), False
        return to_numba_device(x), True

    def _output(self, d_x, out):
        """Where a kernel writes a result of d_x's shape: `out` when it is a device
        array of that dtype, else a new device array."""
        if out is not None and is_device_array(out) and out.dtype == d_x.dtype:
            return as_numba_array(out)
        return self._cuda.device_array(d_x.shape, d_x.dtype)

    def _finish_output(self, d_out, x, on_host, out):
        """The result where the caller expects it: `out`, a host array, or on the device."""
        if out is not None:
            if not is_device_array(out):
                np.copyto(out, d_out.copy_to_host(), casting="unsafe")
            return out
        if on_host:
            return d_out.copy_to_host().astype(x.dtype, copy=False)
        return d_out

    # -- kernels -------------------------------------------------------------------
    def _parts(self, d_x):
        """(kernel, grid, block, elements per block, blocks) of d_x's reductions."""
        n, c, m = d_x.shape
        if m == 1:
            per_block = max(BLOCK_ELEMENTS // CHANNELS_PER_BLOCK,
                            ROW_THREADS * math.ceil(n / (ROW_PARTIALS * ROW_THREADS)))
            blocks = max(1, math.ceil(n / per_block))
            return "rows_sums", (math.ceil(c / CHANNELS_PER_BLOCK), blocks), (
                CHANNELS_PER_BLOCK, ROW_THREADS), per_block, blocks
        blocks = max(1, math.ceil(n * m / BLOCK_ELEMENTS))
        return "runs_sums", (c, blocks), RUN_THREADS, BLOCK_ELEMENTS, blocks

    def _parts_buffer(self, d_x):
        """The reductions' float64 scratch: the centre in row 0, then the partials."""
        blocks = self._parts(d_x)[4]
        return self._buffer("parts", (1 + 3 * blocks, d_x.shape[1]), np.float64)

    def _sums(self, d_x, d_a, a_c, parts, centre_from_data, io, coef, epsilon, result,
              total=0.0):
        """The per-channel sums of `rows_sums`, combined by `combine` as `result` asks."""
        c = d_x.shape[1]
        kernel, grid, block, per_block, _ = self._parts(d_x)
        has_a = d_a is not None
        if not has_a:
            d_a = self._buffer("no weights", (1, 1, 1), d_x.dtype)
        self._run(kernel, grid, block, d_x, d_a, parts, has_a, a_c, per_block,
                  centre_from_data)
        self._run("combine", math.ceil(c / CHANNELS_PER_BLOCK),
                  (CHANNELS_PER_BLOCK, COMBINE_THREADS), parts, io, coef, float(epsilon),
                  float(total), result)

    def _statistics(self, d_x, weights, io, coef=None, epsilon=0.0):
        """Mean and biased variance into io[2], io[3] (and the coefficients into coef)."""
        n, c, m = d_x.shape
        d_w, w_c = None, 0
        if weights is not None:
            w = np.asarray(weights, np.float64)
            w_c = 1 if w.shape[1] == c and c > 1 else 0
            d_w = to_numba_device(np.broadcast_to(w, (n, w.shape[1], m)))
        if coef is None:
            coef = self._buffer("no coefficients", (1, 1), compute_dtype(d_x.dtype))
            result = STATISTICS
        else:
            result = COEFFICIENTS
        self._sums(d_x, d_w, w_c, self._parts_buffer(d_x), True, io, coef, epsilon, result)

    def _affine(self, d_x, d_dy, d_out, coef, d_w=None, relu=False, activation=None):
        """The elementwise kernel for d_x's layout: d_out = the normalization of d_x with
        coef's mean, k and b (then `activation`, a name of ACTIVATIONS, where given), or
        with d_dy the input gradient (coef's a too; weights d_w where given).  An array
        absent is never read: d_x stands in for it."""
        n, c, m = d_x.shape
        if m > 1:
            threads = min(RUN_THREADS, 32 * math.ceil(m / 32))
            grid, block, layout = min(n * c, ELEMENTWISE_BLOCKS), threads, "runs"
        elif c >= MIN_ROW_CHANNELS:
            tiles = math.ceil(c / CHANNELS_PER_BLOCK)
            down = max(1, min(math.ceil(n / ROW_THREADS), ELEMENTWISE_BLOCKS // tiles))
            grid, block, layout = (tiles, down), (CHANNELS_PER_BLOCK, ROW_THREADS), "rows"
        else:
            (grid, block), layout = _flat_launch(n * c), "flat"
        kind = ("grad" if d_dy is not None else "normalize" if activation is None
                else "normalize_activated")
        after = -1 if activation is None else ACTIVATIONS.index(activation)
        self._run(f"{kind}_{layout}", grid, block, d_x, d_x if d_dy is None else d_dy, d_out,
                  coef, d_x if d_w is None else d_w, d_w is not None, bool(relu), after,
                  d_out.dtype == np.float16)

    def _on_device(self, vectors, dtype, device=None):
        """The per-channel `vectors` as the first rows of a device array of `dtype`
        (`device`, or one of their shape): written into mapped host memory, then
        staged by one kernel."""
        shape = (len(vectors), len(vectors[0]))
        host = self._buffer("rows in", shape, dtype, mapped=True)
        for row, vector in zip(host, vectors):
            row[...] = vector
        if device is None:
            device = self._buffer("rows", shape, dtype)
        self._run("stage", *_flat_launch(shape[0] * shape[1]), host, device)
        return device

    # -- the protocol ----------------------------------------------------------------
    def moments(self, x, weights=None):
        n, c, m = x.shape
        if n * m == 0 or c == 0:
            return np.full(c, np.nan), np.full(c, np.nan)
        d_x = self._compute_input(x)[0]
        io = self._buffer("io", (4, c), np.float64, mapped=True)
        self._statistics(d_x, weights, io)
        self._wait()
        return _host_copy(io[2]), _host_copy(io[3])

    # The normalizations apply `activation` as they store each value.
    fuses_activations = True

    def normalize(self, x, mean, multiplier, offset, out=None, relu=False, activation=None):
        d_x, on_host = self._compute_input(x)
        ct = compute_dtype(d_x.dtype)
        d_out = self._output(d_x, out)
        if d_x.size:
            coef = self._on_device((mean, multiplier, offset), ct)
            self._affine(d_x, None, d_out, coef, relu=relu, activation=activation)
            self._wait()
        return self._finish_output(d_out, x, on_host, out)

    def activation(self, kind, x):
        d_x, on_host = self._compute_input(x)
        d_y = self._cuda.device_array(d_x.shape, d_x.dtype)
        if d_x.size:
            self._run("activation", *_flat_launch(d_x.size), _flat(d_x), _flat(d_y),
                      ACTIVATIONS.index(kind), d_x.dtype == np.float16)
            self._wait()
        return self._finish_output(d_y, x, on_host, None)

    def activation_grad(self, kind, dy, y, out=None):
        d_dy, on_host = self._compute_input(dy)
        d_y = self._compute_input(y)[0]
        d_out = self._output(d_dy, out)
        if d_dy.size:
            self._run("activation_grad", *_flat_launch(d_dy.size),
                      *(_flat(a) for a in (d_dy, d_y, d_out)), ACTIVATIONS.index(kind))
            self._wait()
        return self._finish_output(d_out, dy, on_host, out)

    def train_forward(self, x, scale, offset, epsilon, weights=None, out=None, relu=False,
                      activation=None):
        n, c, m = x.shape
        if n * m == 0 or c == 0:
            return super().train_forward(x, scale, offset, epsilon, weights, out, relu,
                                         activation=activation)
        d_x, on_host = self._compute_input(x)
        ct = compute_dtype(d_x.dtype)
        io = self._buffer("io", (4, c), np.float64, mapped=True)
        io[0] = scale
        io[1] = offset
        coef = self._buffer("coefficients", (3, c), ct)
        self._statistics(d_x, weights, io, coef, epsilon)
        d_out = self._output(d_x, out)
        self._affine(d_x, None, d_out, coef, relu=relu, activation=activation)
        self._wait()
        mean, variance = _host_copy(io[2]), _host_copy(io[3])
        return self._finish_output(d_out, x, on_host, out), mean, variance

    def _gradient_sums(self, d_x, d_dy, mean, io, coef, epsilon=0.0, total=0.0,
                       result=SUMS):
        """sum(dy) and sum(dy * (x - mean)) per channel, combined as `result` asks."""
        parts = self._on_device((mean,), np.float64, self._parts_buffer(d_x))
        self._sums(d_x, d_dy, 1, parts, False, io, coef, epsilon, result, total)

    def grad_reductions(self, x, dy, mean):
        n, c, m = x.shape
        if x.size == 0:
            return np.zeros(c), np.zeros(c)
        d_x, _ = self._compute_input(x)
        d_dy, _ = self._compute_input(dy)
        io = self._buffer("io", (4, c), np.float64, mapped=True)
        self._gradient_sums(d_x, d_dy, mean, io,
                            self._buffer("no coefficients", (1, 1), compute_dtype(d_x.dtype)))
        self._wait()
        return _host_copy(io[0]), _host_copy(io[1])

    def backward(self, x, dy, mean, variance, scale, epsilon, training, weights=None,
                 out=None):
        # Backend.backward's arithmetic, with the coefficients computed on the device
        # by the combine: one wait instead of two, no vectors through the host between.
        n, c, m = x.shape
        if x.size == 0:
            return super().backward(x, dy, mean, variance, scale, epsilon, training, weights,
                                    out)
        d_x, _ = self._compute_input(x)
        d_dy, on_host = self._compute_input(dy)
        ct = compute_dtype(d_dy.dtype)
        total = 0.0
        if training:
            total = float(n * m if weights is None else np.sum(weights, dtype=np.float64))
        io = self._buffer("io", (4, c), np.float64, mapped=True)
        io[2] = variance
        io[3] = scale
        coef = self._buffer("gradient coefficients", (4, c), ct)
        self._gradient_sums(d_x, d_dy, mean, io, coef, epsilon, total, GRADIENT)
        d_w = None
        if weights is not None:
            d_w = to_numba_device(position_weights(weights, d_dy, ct))
        d_out = self._output(d_dy, out)
        self._affine(d_x, d_dy, d_out, coef, d_w)
        self._wait()
        return (self._finish_output(d_out, dy, on_host, out), _host_copy(io[0]),
                _host_copy(io[1]))

    def grad_input(self, x, dy, mean, a, b, c, weights=None, out=None):
        d_x, _ = self._compute_input(x)
        d_dy, on_host = self._compute_input(dy)
        ct = compute_dtype(d_dy.dtype)
        d_w = None
        if weights is not None:
            d_w = to_numba_device(position_weights(weights, d_dy, ct))
        d_out = self._output(d_dy, out)
        if d_dy.size:
            coef = self._on_device((mean, b, c, a), ct)
            self._affine(d_x, d_dy, d_out, coef, d_w)
            self._wait()
        return self._finish_output(d_out, dy, on_host, out)


def create():
    return NumbaCudaBackend()
