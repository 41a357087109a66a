"""The benchmark behind `python -m fastbn bench`.

Times batch normalization on realistic shapes on every working fastbn
backend and, with `--compare`, on PyTorch's CPU batch norm and TensorFlow's
fused batch norm, all in one process.  Each figure is the median of several
runs; the sides are measured in turns (case by case, repeat by repeat), so
that drift on a noisy machine hits them alike.  The copy bandwidth measured
in the same run gives each case's memory roofline: the bytes its passes must
move (3 for a training forward, 2 for inference) divided by that bandwidth.

Ops: `train` (fused_batch_norm training forward), `infer` (inference),
`infer_inplace` (inference written over its input, `out=x`: what a pipeline
that no longer needs x can ask for; torch's F.batch_norm has no such form, so
it is timed against torch's ordinary inference), `backward`
(fused_batch_norm_grad in training: input, scale and offset gradients, against
torch autograd of F.batch_norm on a retained graph), `backward_inplace` (the
same with dx written over dy, `out=dy`; against torch's backward),
`layer` (the whole fastbn.batch_norm layer with in-place updates, against
torch's F.batch_norm in training mode: what a call costs end to end),
`tape_relu` (GradientTape.gradient of batch_norm(..., scale=True,
activation_fn=relu) for x, gamma and beta, against torch autograd of
F.relu(F.batch_norm(...)): training through the most common activation; its
roofline is the backward's five passes), `sigmoid` (fastbn.nn.sigmoid against
torch.sigmoid, each into a new array: an activation the kernels compute with an
exp of their own; two passes).
Outputs go to preallocated buffers (`out=`) where the side allows it.

`device="cuda"` (`bench --device cuda`) keeps the data on the GPU: the
`numba_cuda` backend on Numba device arrays against torch's CUDA batch norm
(cuDNN) on CUDA tensors, each timed up to a synchronization of the device,
and the roofline from a device-to-device copy.
"""

import contextlib
import json
import os
import sys
import time

import numpy as np

import fastbn

# (name, shape, data_format): the cases the issues name, then NCHW with small images
# (runs of 49 values, the last stage of a ResNet), then the tiny one.
CASES = [
    ("NHWC 32x56x56x64", (32, 56, 56, 64), "NHWC"),
    ("NCHW 32x64x56x56", (32, 64, 56, 56), "NCHW"),
    ("NHWC 32x7x7x512", (32, 7, 7, 512), "NHWC"),
    ("2-D 256x4096", (256, 4096), "NHWC"),
    ("NHWC 64x112x112x64", (64, 112, 112, 64), "NHWC"),
    ("NCHW 32x512x7x7", (32, 512, 7, 7), "NCHW"),
    ("NHWC 4x4x4x8 (tiny)", (4, 4, 4, 8), "NHWC"),
]
QUICK_CASES = [CASES[2], CASES[3], CASES[-1]]
OPS = ("train", "infer", "infer_inplace", "backward", "backward_inplace", "layer", "tape_relu",
       "sigmoid")
PASSES = {"train": 3, "infer": 2, "infer_inplace": 2, "backward": 5, "backward_inplace": 5,
          "layer": 3, "tape_relu": 5, "sigmoid": 2}
COMPARATORS = ("torch", "tf")
DEVICES = ("cpu", "cuda")
SETTLE_SECONDS = 0.02


def _channels(shape, fmt):
    return shape[1] if fmt == "NCHW" else shape[-1]


def _gradient(x):
    """The output gradient the backward cases use: standard normal, in x's dtype."""
    return np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype)


def _fastbn_side(backend, x, fmt, device="cpu"):
    c = _channels(x.shape, fmt)
    # Parameters and statistics in the compute dtype (float32 for float16 data), as TF's.
    ct = fastbn.backends.compute_dtype(x.dtype)
    scale, offset = np.ones(c, ct), np.zeros(c, ct)
    mean, var = np.zeros(c, ct), np.ones(c, ct)
    graph = fastbn.Graph()
    nn = fastbn.nn
    axes = tuple(a for a in range(x.ndim) if a != (1 if fmt == "NCHW" else x.ndim - 1))
    batch_mean, batch_var = x.mean(axis=axes, dtype=ct), x.var(axis=axes, dtype=ct)
    dy = _gradient(x)
    out = np.empty_like(x)
    # Overwritten call after call by the in-place ops, away from the other ops' arrays.
    x_inplace, dy_inplace = x.copy(), dy.copy()
    # With this scale dx is dy less its projections on 1 and x_hat: a second call gives
    # the first's dx again, so the in-place backward's data neither grows nor fades.
    unit_scale = np.sqrt(batch_var.astype(np.float64) + 0.001).astype(ct)
    if device == "cuda":
        from numba import cuda

        x, dy, out, x_inplace, dy_inplace = (
            cuda.to_device(a) for a in (x, dy, out, x_inplace, dy_inplace))

    # (run() times these inside fastbn.backends.use(backend), as a user would pick one.)
    def train():
        nn.fused_batch_norm(x, scale, offset, data_format=fmt, out=out)

    def infer():
        nn.fused_batch_norm(x, scale, offset, mean, var, data_format=fmt, is_training=False,
                            out=out)

    def infer_inplace():
        nn.fused_batch_norm(x_inplace, scale, offset, mean, var, data_format=fmt,
                            is_training=False, out=x_inplace)

    def backward():
        nn.fused_batch_norm_grad(dy, x, scale, batch_mean, batch_var, data_format=fmt, out=out)

    def backward_inplace():
        nn.fused_batch_norm_grad(dy_inplace, x, unit_scale, batch_mean, batch_var,
                                 data_format=fmt, out=dy_inplace)

    def layer():
        with graph.as_default():
            fastbn.batch_norm(x, data_format=fmt, scope="bn", reuse=fastbn.AUTO_REUSE,
                              updates_collections=None)

    with graph.as_default():
        tape = fastbn.GradientTape(persistent=True)
        with tape:
            y_relu = fastbn.batch_norm(x, scale=True, activation_fn=nn.relu, data_format=fmt,
                                       scope="tape")
        trainable = fastbn.GraphKeys.TRAINABLE_VARIABLES
        sources = [x, *fastbn.get_variables("tape", collection=trainable)]  # gamma, beta

    def tape_relu():
        tape.gradient(y_relu, sources, output_gradients=dy)

    def sigmoid():
        nn.sigmoid(x)

    return {"train": train, "infer": infer, "infer_inplace": infer_inplace,
            "backward": backward, "backward_inplace": backward_inplace, "layer": layer,
            "tape_relu": tape_relu, "sigmoid": sigmoid}


def _torch_side(x, fmt, threads, device="cpu"):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    if x.ndim == 4 and fmt == "NHWC":
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        t = t.to(device).contiguous(memory_format=torch.channels_last)
    else:
        t = torch.from_numpy(x).to(device)
    c = _channels(x.shape, fmt)
    # float32 parameters for float16 data (torch's CPU batch norm takes them so).
    pt = torch.float64 if x.dtype == np.float64 else torch.float32
    weight = torch.ones(c, dtype=pt, device=device)
    bias = torch.zeros(c, dtype=pt, device=device)
    running_mean = torch.zeros(c, dtype=pt, device=device)
    running_var = torch.ones(c, dtype=pt, device=device)

    def train():
        with torch.no_grad():
            F.batch_norm(t, running_mean, running_var, weight, bias, training=True)

    def infer():
        with torch.no_grad():
            F.batch_norm(t, running_mean, running_var, weight, bias, training=False)

    tg = t.detach().clone().requires_grad_(True)
    wg, bg = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    y = F.batch_norm(tg, running_mean.clone(), running_var.clone(), wg, bg, training=True)
    dy = torch.from_numpy(_gradient(x)).to(device)
    if x.ndim == 4 and fmt == "NHWC":
        dy = dy.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def backward():
        torch.autograd.grad(y, [tg, wg, bg], dy, retain_graph=True)

    y_relu = F.relu(F.batch_norm(tg, running_mean.clone(), running_var.clone(), wg, bg,
                                 training=True))

    def tape_relu():
        torch.autograd.grad(y_relu, [tg, wg, bg], dy, retain_graph=True)

    def sigmoid():
        with torch.no_grad():
            torch.sigmoid(t)

    return {"train": train, "infer": infer, "infer_inplace": infer, "backward": backward,
            "backward_inplace": backward, "layer": train, "tape_relu": tape_relu,
            "sigmoid": sigmoid}


def _tf_side(x, fmt):
    import tensorflow as tf

    c = _channels(x.shape, fmt)
    shape4 = x.shape if x.ndim == 4 else (x.shape[0], 1, 1, x.shape[1])
    tx = tf.constant(x.reshape(shape4))
    scale, offset = tf.ones(c), tf.zeros(c)
    mean, var = tf.zeros(c), tf.ones(c)
    fused = tf.raw_ops.FusedBatchNormV3

    def train():
        fused(x=tx, scale=scale, offset=offset, mean=mean, variance=var, epsilon=1e-3,
              data_format=fmt, is_training=True)

    def infer():
        fused(x=tx, scale=scale, offset=offset, mean=mean, variance=var, epsilon=1e-3,
              data_format=fmt, is_training=False)

    return {"train": train, "infer": infer}


def available_comparators():
    found = []
    for name, module in (("torch", "torch"), ("tf", "tensorflow")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            pass
    return found


def _copy_rate(copy, nbytes, repeats, wait=None):
    """Bytes per second `copy()` moves (read + write of `nbytes`): the median of `repeats`
    timed copies after one untimed, each ended by `wait()` where given."""
    times = []
    for timed in range(repeats + 1):
        start = time.perf_counter()
        copy()
        if wait is not None:
            wait()
        if timed:
            times.append(time.perf_counter() - start)
    return 2 * nbytes / float(np.median(times))


def copy_bandwidth(megabytes=256, repeats=5):
    """Bytes per second np.copyto moves (read + write) on buffers larger than caches."""
    src = np.ones(megabytes << 18, np.float32)
    dst = np.empty_like(src)
    return _copy_rate(lambda: np.copyto(dst, src), src.nbytes, repeats)


def device_copy_bandwidth(megabytes=1024, repeats=5):
    """Bytes per second a device-to-device copy moves (read + write) on the current GPU."""
    from numba import cuda

    src = cuda.to_device(np.ones(megabytes << 18, np.float32))
    dst = cuda.device_array_like(src)
    return _copy_rate(lambda: dst.copy_to_device(src), src.nbytes, repeats, cuda.synchronize)


def _device_sync(side):
    """Waits for the side's queued GPU work (bench --device cuda)."""
    if side == "torch":
        import torch

        return torch.cuda.synchronize
    from numba import cuda

    return cuda.synchronize


def _side_context(side, backend_names):
    return fastbn.backends.use(side) if side in backend_names else contextlib.nullcontext()


def _time(fn, min_seconds, sync=None):
    """Seconds per call: the mean over enough calls to fill `min_seconds`.

    With `sync` (a GPU side), calls go in doubling batches, each ended by `sync()`, so
    the queue is not drained after every call and the time counts finished work."""
    fn()
    if sync is not None:
        sync()
    calls, batch, start = 0, 1, time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        if sync is not None:
            sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls
        if sync is not None:
            batch *= 2


def run(backend_names=None, compare=(), quick=False, repeats=None, cases=None, ops=OPS,
        progress=None, dtype=np.float32, device="cpu"):
    """Measures every (case, side, op) on data of `dtype` on `device` ("cpu", or "cuda":
    GPU data, the numba_cuda backend against torch on CUDA); returns a dict with
    `results` and `copy_gbps`."""
    dtype = np.dtype(dtype)
    if dtype not in fastbn.nn.FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, float32 or float64, got {dtype}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    on_gpu = device == "cuda"
    if on_gpu:
        backend = fastbn.backends.get("numba_cuda")  # not here: BackendUnavailable says why
        if backend.simulated:
            raise ValueError("device cuda: the numba_cuda backend runs on Numba's simulator "
                             "here; the bench needs a GPU")
        backend_names = backend_names or ["numba_cuda"]
        if backend_names != ["numba_cuda"]:
            raise ValueError(f"device cuda times the numba_cuda backend only, got "
                             f"{backend_names}")
    # (The CUDA simulator is a correctness tool: not timed unless named.)
    backend_names = backend_names or [
        b for b in fastbn.backends.available()
        if not getattr(fastbn.backends.get(b), "simulated", False)]
    if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    cases = cases or (QUICK_CASES if quick else CASES)
    repeats = repeats or (3 if quick else 7)
    min_seconds = 0.01 if quick else 0.05
    threads = max(fastbn.backends.get(b).threads() for b in backend_names)
    if on_gpu:
        bandwidth = device_copy_bandwidth(256 if quick else 1024)
    else:
        bandwidth = copy_bandwidth(64 if quick else 256)
    results = []
    total = len(cases) * repeats
    done = 0
    for name, shape, fmt in cases:
        x = (np.random.default_rng(0).standard_normal(shape) * 2 + 1).astype(dtype)
        sides = {b: _fastbn_side(b, x, fmt, device) for b in backend_names}
        if "torch" in compare:
            sides["torch"] = _torch_side(x, fmt, threads, device)
        if "tf" in compare and x.ndim in (2, 4) and dtype == np.float32 and not on_gpu:
            sides["tf"] = _tf_side(x, fmt)
        samples = {}
        for _ in range(repeats):
            for side, fns in sides.items():
                for op in ops:
                    if op in fns:
                        # Each side's OpenMP threads spin a while after its calls: let them
                        # settle before the next side is timed.
                        time.sleep(SETTLE_SECONDS)
                        sync = _device_sync(side) if on_gpu else None
                        with _side_context(side, backend_names):
                            seconds = _time(fns[op], min_seconds, sync)
                        samples.setdefault((side, op), []).append(seconds)
            done += 1
            if progress:
                progress(done, total, name)
        for (side, op), times in samples.items():
            roofline = PASSES[op] * x.nbytes / bandwidth
            median = float(np.median(times))
            results.append({
                "case": name, "shape": list(shape), "data_format": fmt, "side": side, "op": op,
                "median_ms": 1e3 * median, "runs_ms": [1e3 * t for t in times],
                "roofline_ms": 1e3 * roofline, "of_roofline": median / roofline,
            })
        del sides
    report = {"fastbn": fastbn.__version__, "threads": threads, "copy_gbps": bandwidth / 1e9,
              "dtype": dtype.name, "device": device, "results": results}
    if on_gpu:
        report["gpu"] = backend.description
    return report


def ratios(results, against):
    """{(case, side, op): time of `against` / time of side} for the fastbn sides."""
    by = {(r["case"], r["side"], r["op"]): r["median_ms"] for r in results}
    out = {}
    for (case, side, op), ms in by.items():
        ref = by.get((case, against, op))
        if ref is not None and side != against:
            out[(case, side, op)] = ref / ms
    return out


def table(report):
    results = report["results"]
    sides = list(dict.fromkeys(r["side"] for r in results))
    cases = list(dict.fromkeys(r["case"] for r in results))
    ops = [op for op in OPS if any(r["op"] == op for r in results)]
    by = {(r["case"], r["side"], r["op"]): r for r in results}
    vs_numpy = ratios(results, "numpy")
    vs_torch = ratios(results, "torch")
    where = (f"on {report['gpu']}" if report.get("device") == "cuda"
             else f"{report['threads']} threads")
    lines = [f"median ms, {report.get('dtype', 'float32')}, {where}; "
             f"copy bandwidth "
             f"{report['copy_gbps']:.1f} GB/s; (x faster than numpy / torch; share of roofline)"]
    for op in ops:
        lines.append("")
        lines.append(f"{op}:")
        header = f"  {'case':<22}" + "".join(f"{side:>30}" for side in sides) + f"{'roofline':>10}"
        lines.append(header)
        for case in cases:
            cells = []
            roof = None
            for side in sides:
                r = by.get((case, side, op))
                if r is None:
                    cells.append(f"{'-':>30}")
                    continue
                roof = r["roofline_ms"]
                notes = []
                if (case, side, op) in vs_numpy:
                    notes.append(f"{vs_numpy[(case, side, op)]:.1f}x np")
                if (case, side, op) in vs_torch:
                    notes.append(f"{vs_torch[(case, side, op)]:.2f}x torch")
                if side not in COMPARATORS and op != "layer":
                    notes.append(f"{r['of_roofline']:.2f}R")
                text = f"{r['median_ms']:.3f}" + (f" ({', '.join(notes)})" if notes else "")
                cells.append(f"{text:>30}")
            roof_text = f"{roof:.3f}" if roof is not None and op != "layer" else "-"
            lines.append(f"  {case:<22}" + "".join(cells) + f"{roof_text:>10}")
    return "\n".join(lines)


def summary(reports, side=None, against="torch", ops=("train", "infer", "backward")):
    """A Markdown table over several runs' reports (as `--json` writes them): per case and
    op of `ops` (those the reports measured), `side`'s and `against`'s medians over the
    runs' medians (ms), `side`'s speed-up over `against` (median, and its range over the
    runs) and its share of the roofline.

    `side` defaults to the first fastbn backend in the reports other than numpy.
    """
    if not reports:
        raise ValueError("summary needs at least one report")
    if not all(isinstance(report, dict) and isinstance(report.get("results"), list)
               for report in reports):
        raise ValueError("reports must be bench reports (dicts with a 'results' list, as "
                         "bench --json writes them)")
    results = [r for report in reports for r in report["results"]]
    sides = list(dict.fromkeys(r["side"] for r in results))
    if side is None:
        fastbn_sides = [s for s in sides if s not in COMPARATORS]
        side = next((s for s in fastbn_sides if s != "numpy"), fastbn_sides[0] if fastbn_sides
                    else None)
    for argument, value in (("side", side), ("against", against)):
        if value not in sides:
            raise ValueError(f"{argument} must be a side the reports measured ({', '.join(sides)}),"
                             f" got {value!r}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"ops must be among {', '.join(OPS)}, got {', '.join(unknown)}")
    cases = list(dict.fromkeys(r["case"] for r in results))
    ops = [op for op in ops if any(r["op"] == op for r in results)]
    runs = [{(r["case"], r["side"], r["op"]): r for r in report["results"]}
            for report in reports]

    def ms(v):
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"

    header = ["case"] + [f"{op} | {against} | x | R" for op in ops]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * (1 + 4 * len(ops))]
    for case in cases:
        cells = [case]
        for op in ops:
            pairs = [(run.get((case, side, op)), run.get((case, against, op))) for run in runs]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                cells += ["-"] * 4
                continue
            mine = [a["median_ms"] for a, _ in pairs]
            theirs = [b["median_ms"] for _, b in pairs]
            speedups = [t / m for m, t in zip(mine, theirs)]
            cells += [ms(float(np.median(mine))), ms(float(np.median(theirs))),
                      f"{np.median(speedups):.2f} ({min(speedups):.2f}-{max(speedups):.2f})",
                      f"{np.median([a['of_roofline'] for a, _ in pairs]):.2f}"]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'fastbn[plot]'") from None
    return plt


def plot(report, path):
    plt = _pyplot()
    results = report["results"]
    ops = [op for op in OPS if any(r["op"] == op for r in results)]
    sides = list(dict.fromkeys(r["side"] for r in results))
    cases = list(dict.fromkeys(r["case"] for r in results))
    by = {(r["case"], r["side"], r["op"]): r["median_ms"] for r in results}
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    width = 0.8 / len(sides)
    for ax, op in zip(axes[0], ops):
        for i, side in enumerate(sides):
            ref = [by.get((c, "numpy", op)) for c in cases]
            values = [(r / by[(c, side, op)]) if r and (c, side, op) in by else 0
                      for c, r in zip(cases, ref)]
            ax.bar(np.arange(len(cases)) + i * width, values, width, label=side)
        ax.set_title(f"{op}: speed-up over the NumPy reference")
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _progress(done, total, name):
    if sys.stderr.isatty():
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name:<24}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _check_writable(path, option):
    """Raises ValueError unless `path` can be written: checked before the runs, which take
    minutes, rather than after them."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: there is no folder {folder}")
    if not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise ValueError(f"{option} {path}: cannot write there")


def main(args):
    names = args.backends.split(",") if args.backends else None
    compare = [c for c in (args.compare.split(",") if args.compare else []) if c]
    ops = [op for op in (args.ops.split(",") if args.ops else OPS) if op]
    try:
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops:
            raise ValueError(f"--ops takes {', '.join(OPS)}, got {args.ops!r}")
        for name in names or ():
            fastbn.backends.get(name)  # unknown or unavailable: a clear error now
        for name in compare:
            if name not in COMPARATORS:
                raise ValueError(f"--compare takes {', '.join(COMPARATORS)}, got {name!r}")
            if name not in available_comparators():
                raise ValueError(f"--compare {name}: it is not installed here")
        if args.repeats is not None and args.repeats < 1:
            raise ValueError(f"--repeats must be a positive integer, got {args.repeats}")
        for path, option in ((args.json_path, "--json"), (args.plot_path, "--plot")):
            if path:
                _check_writable(path, option)
        if args.plot_path:
            _pyplot()
    except (ValueError, fastbn.backends.BackendUnavailable) as err:
        print(f"python -m fastbn bench: {err}", file=sys.stderr)
        return 2
    try:
        report = run(names, compare=compare, quick=args.quick, repeats=args.repeats, ops=ops,
                     progress=_progress, dtype=args.dtype, device=args.device)
    except (ValueError, fastbn.backends.BackendUnavailable) as err:
        print(f"python -m fastbn bench: {err}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot_path:
        plot(report, args.plot_path)
    return 0
