"""Where a fastbn call on device arrays spends its time: the kernels' device time (from
torch.profiler, which sees every CUDA kernel in the process) against the call's wall time.

Run on a machine with a GPU by tools/gpu_check.sh.
"""

import time

import numpy as np
import torch
from numba import cuda
from torch.profiler import ProfilerActivity, profile

import fastbn
from fastbn import nn

CASES = [("NHWC 64x112x112x64", (64, 112, 112, 64), "NHWC"),
         ("NCHW 32x64x56x56", (32, 64, 56, 56), "NCHW")]
CALLS = 20


def check(x, d_x, scale, offset, fmt):
    """The training forward on the device: the same bits twice, and near the NumPy
    reference (float64 arithmetic)."""
    first = nn.fused_batch_norm(d_x, scale, offset, data_format=fmt)
    second = nn.fused_batch_norm(d_x, scale, offset, data_format=fmt)
    same = all(np.array_equal(a.copy_to_host() if hasattr(a, "copy_to_host") else a,
                              b.copy_to_host() if hasattr(b, "copy_to_host") else b)
               for a, b in zip(first, second))
    with fastbn.backends.use("numpy"):
        ref = nn.fused_batch_norm(x, scale, offset, data_format=fmt)
    y = first[0].copy_to_host()
    error = np.linalg.norm(y - ref[0]) / np.linalg.norm(ref[0])
    mean_error = np.max(np.abs(first[1] - ref[1]) / np.abs(ref[1]))
    print(f"{fmt} {x.shape}: same bits twice: {same}; |y - ref| / |ref| = {error:.2e}; "
          f"mean's largest relative error {mean_error:.2e}")


def main():
    for name, shape, fmt in CASES:
        x = (np.random.default_rng(0).standard_normal(shape) * 2 + 1).astype(np.float32)
        c = shape[1] if fmt == "NCHW" else shape[-1]
        ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
        d_x, d_dy = cuda.to_device(x), cuda.to_device(x[::-1].copy())
        out = cuda.device_array_like(d_x)
        mean, var = nn.moments(d_x, [0, 2, 3] if fmt == "NCHW" else [0, 1, 2])
        check(x, d_x, ones, zeros, fmt)
        ops = {
            "train": lambda: nn.fused_batch_norm(d_x, ones, zeros, data_format=fmt, out=out),
            "infer": lambda: nn.fused_batch_norm(d_x, ones, zeros, mean, var, data_format=fmt,
                                                 is_training=False, out=out),
            "backward": lambda: nn.fused_batch_norm_grad(d_dy, d_x, ones, mean, var,
                                                         data_format=fmt, out=out),
        }
        for op, fn in ops.items():
            fn()
            cuda.synchronize()
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(CALLS):
                    fn()
                cuda.synchronize()
            wall = (time.perf_counter() - start) / CALLS
            print(f"\n{name} {op}: {1e3 * wall:.3f} ms a call (wall, profiled)")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8,
                                            max_name_column_width=60))
    print(fastbn.backends.get("numba_cuda").description)


if __name__ == "__main__":
    main()
