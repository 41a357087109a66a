"""How fast the benchmark's ops could be on this machine: beside torch and fastbn, the time
plain C takes to move the bytes each op must move (its memory floor), all in one process.

    python tools/memory_floor.py [--repeats 7]

For each of the issues' five float32 cases it prints, in ms: torch, the 1.5x-over-torch
target (torch / 1.5), fastbn (the bench's calls: `out=` given), and the floor with plain
and with non-temporal stores (tools/memory_floor.c, on fastbn's thread count: inference one
write pass; training a read pass, then the write pass; backward a read pass over x and dy,
then a write pass reading both).  On NCHW the two passes go channel by channel (a
channel's elements read, then written while they are still cached), as fastbn's kernels go
there; elsewhere a channel spans the whole array, and each pass goes over all of it.

Inference must read x and write y, all of them: its floor is the fastest way we know to
move those bytes, and a target under it is out of reach for any implementation (under the
streamed floor, even for one that leaves its output out of the caches, which the next op
then pays for).  Training and the backward cannot write a channel's output before they
have read all of the channel: their floors are those of the two passes done back to back
on each channel (or on everything), the second from what the first left in the caches.
Needs gcc (or $CC) with OpenMP, an AVX2 CPU and torch.
"""

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import fastbn
from fastbn import bench
from fastbn.backends import cython_backend

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_floor.c")
OPS = ("train", "infer", "backward")


def build(directory):
    library = os.path.join(directory, "memory_floor.so")
    compiler = os.environ.get("CC", "gcc")
    subprocess.run([compiler, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC",
                    SOURCE, "-o", library], check=True)
    lib = ctypes.CDLL(library)
    pointer, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.floor_run.argtypes = [pointer, pointer, pointer, long_, int_, int_, int_, long_]
    lib.floor_run.restype = ctypes.c_float
    return lib


def aligned_copy(a):
    """a's values in a C-contiguous array that starts on a 64-byte boundary."""
    raw = np.empty(a.size + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    out = raw[start:start + a.size].reshape(a.shape)
    out[...] = a
    return out


def floor_calls(lib, x, dy, threads, channel_size=0):
    """{(op, streamed): a call moving op's bytes}; the two-pass ops a channel of
    channel_size elements at a time where it is given."""
    x, dy = aligned_copy(x), aligned_copy(dy)
    y = aligned_copy(np.zeros_like(x))
    passes = {"infer": (None, 0), "train": (None, 1), "backward": (dy, 1)}

    def call(d, n_passes, stream):
        # (The arrays stay referenced here: the library gets their addresses only.)
        return lambda: lib.floor_run(y.ctypes.data, x.ctypes.data,
                                     None if d is None else d.ctypes.data, x.size, n_passes,
                                     stream, threads, channel_size)

    return {(op, stream): call(d, n_passes, stream)
            for op, (d, n_passes) in passes.items() for stream in (0, 1)}


def measure(lib, repeats):
    threads = fastbn.backends.get("cython").threads()
    rows = []
    for name, shape, fmt in bench.CASES[:5]:
        x = (np.random.default_rng(0).standard_normal(shape) * 2 + 1).astype(np.float32)
        calls = {("fastbn", op): f for op, f in bench._fastbn_side("cython", x, fmt).items()
                 if op in OPS}
        calls.update({("torch", op): f for op, f in bench._torch_side(x, fmt, threads).items()
                      if op in OPS})
        channel_size = x.size // shape[1] if fmt == "NCHW" else 0
        calls.update({("floor", key): f for key, f in
                      floor_calls(lib, x, bench._gradient(x), threads, channel_size).items()})
        times = {key: [] for key in calls}
        for _ in range(repeats):
            for key, call in calls.items():
                time.sleep(bench.SETTLE_SECONDS)
                times[key].append(bench._time(call, 0.05))
        ms = {key: 1e3 * float(np.median(t)) for key, t in times.items()}
        for op in OPS:
            rows.append((name, op, ms[("torch", op)], ms[("fastbn", op)],
                         ms[("floor", (op, 0))], ms[("floor", (op, 1))]))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    return threads, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not cython_backend.cpu_has_avx2():
        sys.exit("memory_floor: the floor's C loops need AVX2 and FMA")
    with tempfile.TemporaryDirectory() as directory, fastbn.backends.use("cython"):
        lib = build(directory)
        threads, rows = measure(lib, args.repeats)
    print(f"median ms, float32, {threads} threads; target = torch / 1.5")
    print(f"{'case':24s} {'op':9s} {'torch':>8s} {'target':>8s} {'fastbn':>8s} "
          f"{'floor':>8s} {'streamed':>8s}")
    for name, op, torch_ms, fastbn_ms, plain, streamed in rows:
        target = torch_ms / 1.5
        verdict = ("target under both floors" if target < streamed
                   else "target under the floor" if target < plain else "")
        print(f"{name:24s} {op:9s} {torch_ms:8.3f} {target:8.3f} {fastbn_ms:8.3f} "
              f"{plain:8.3f} {streamed:8.3f}  {verdict}")


if __name__ == "__main__":
    main()
