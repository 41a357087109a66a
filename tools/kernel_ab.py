"""A/B of two builds of the Cython kernels in one process: is a kernel change faster, and
does it keep the bits?

    cp fastbn/_cy/kernels_*.so /tmp/old/          # before the change
    ... change fastbn/_cy/_kernels.pxi, python setup.py build_ext --inplace ...
    python tools/kernel_ab.py /tmp/old --shape 256x4096 --op backward

`--shape` is NxC (rows: NHWC or 2-D data, C channels last) or NxCxM (runs: NCHW, M values
a channel per image); `--op` backward (fused_batch_norm_grad in training), train or infer;
`--dtype` float16, float32 or float64. Both builds first compute the op on the same data and
their outputs are compared bit for bit (exit status 1 where they differ). Then the two are
timed in rounds, each side the mean over about 60 ms of calls, the order swapped every
round; the figure is the median over the rounds of new / old. On the 2-core VMs the
machines drift by up to 2x within minutes, so only such paired ratios mean anything: the
same build against itself gives 0.95-1.05.
"""

import argparse
import glob
import importlib.util
import os
import sys

import numpy as np

import fastbn
from fastbn import bench
from fastbn.backends import cython_backend

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "fastbn", "_cy")
OPS = ("backward", "train", "infer")
ROUND_SECONDS = 0.06


def load(directory, module, tag):
    """The kernel module `module` (kernels_avx2 or kernels_baseline) built in `directory`,
    imported under a name of its own so that two builds live side by side."""
    found = glob.glob(os.path.join(directory, module + ".*.so"))
    if not found:
        raise SystemExit(f"kernel_ab: no {module} build in {directory}")
    spec = importlib.util.spec_from_file_location(f"{tag}.{module}", found[0])
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    return kernels


def parse_shape(text):
    """'NxC' -> (N, C, 1); 'NxCxM' -> (N, C, M)."""
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"shape must be NxC or NxCxM, got {text!r}")
    return dims if len(dims) == 3 else dims + (1,)


def make_call(kernels, op, data, threads):
    """A call of `op` of `kernels` on `data` (see make_data); returns what it returns."""
    x, dy, out, mean, variance, scale, offset, stream = data
    if op == "backward":
        return lambda: kernels.backward(x, dy, out, mean, variance, scale, 1e-3, True, None,
                                        stream, threads)
    if op == "train":
        return lambda: kernels.train_forward(x, out, scale, offset, 1e-3, False, stream,
                                             threads)
    return lambda: kernels.infer_forward(x, out, mean, variance, scale, offset, 1e-3, False,
                                         stream, threads)


def make_data(shape, dtype):
    """x, dy, out, mean, variance, scale, offset and the backend's streaming choice."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ct = fastbn.backends.compute_dtype(x.dtype)
    wide = x.astype(np.float64)
    mean, variance = wide.mean(axis=(0, 2)).astype(ct), wide.var(axis=(0, 2)).astype(ct)
    channels = shape[1]
    scale = np.linspace(0.5, 2, channels).astype(ct)
    offset = np.linspace(-1, 1, channels).astype(ct)
    stream = x.nbytes >= cython_backend.stream_bytes()
    return x, dy, np.empty_like(x), mean, variance, scale, offset, stream


def results_of(call, out):
    """What a call gives, its output included, as a list of arrays."""
    returned = call()
    returned = [] if returned is None else list(returned)
    return [out.copy()] + [np.asarray(a) for a in returned]


def same_bits(first, second):
    """Whether two lists of arrays hold the same bits, array by array."""
    return len(first) == len(second) and all(
        a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        for a, b in zip(first, second))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="directory holding the other build of the kernels")
    parser.add_argument("--new", default=HERE,
                        help="directory of the build to judge (default: this checkout's)")
    parser.add_argument("--shape", type=parse_shape, default=(256, 4096, 1))
    parser.add_argument("--op", choices=OPS, default="backward")
    parser.add_argument("--dtype", choices=("float16", "float32", "float64"),
                        default="float32")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--isa", choices=("avx2", "baseline"),
                        default="avx2" if cython_backend.cpu_has_avx2() else "baseline")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be a positive integer, got {args.rounds}")
    module = "kernels_" + args.isa
    old, new = load(args.old, module, "old"), load(args.new, module, "new")
    threads = fastbn.backends.get("cython").threads()
    data = make_data(args.shape, np.dtype(args.dtype))
    calls = {"old": make_call(old, args.op, data, threads),
             "new": make_call(new, args.op, data, threads)}
    out = data[2]
    if not same_bits(results_of(calls["old"], out), results_of(calls["new"], out)):
        print(f"kernel_ab: the two builds give different bits ({args.op}, {args.dtype}, "
              f"shape {args.shape})")
        return 1
    times = {"old": [], "new": []}
    for round_ in range(args.rounds):
        for side in ("old", "new") if round_ % 2 else ("new", "old"):
            times[side].append(bench._time(calls[side], ROUND_SECONDS))
    old_t, new_t = np.array(times["old"]), np.array(times["new"])
    shape = "x".join(str(d) for d in args.shape)
    print(f"{args.op} {args.dtype} {shape}, {threads} threads: old {1e3 * np.median(old_t):.3f} "
          f"ms, new {1e3 * np.median(new_t):.3f} ms; median new/old "
          f"{np.median(new_t / old_t):.3f} over {args.rounds} rounds; same bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
