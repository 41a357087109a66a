"""The benchmark behind `python -m fastbn bench`.

Times `fastbn.nn.fused_batch_norm` (training forward and inference) and
the whole `fastbn.batch_norm` layer on realistic shapes, on every working
backend, in one process: each measurement is the median of several runs,
the sides taken in turns so that drift hits them alike.
"""

import json
import sys
import time

import numpy as np

import fastbn

# (name, shape, data_format)
CASES = [
    ("NHWC 32x56x56x64", (32, 56, 56, 64), "NHWC"),
    ("NCHW 32x64x56x56", (32, 64, 56, 56), "NCHW"),
    ("NHWC 32x7x7x512", (32, 7, 7, 512), "NHWC"),
    ("2-D 256x4096", (256, 4096), "NHWC"),
    ("NHWC 64x112x112x64", (64, 112, 112, 64), "NHWC"),
    ("NHWC 4x4x4x8 (tiny)", (4, 4, 4, 8), "NHWC"),
]
QUICK_CASES = [CASES[2], CASES[3], CASES[5]]


def _ops(x, fmt):
    c = x.shape[1] if fmt == "NCHW" else x.shape[-1]
    scale = np.ones(c, np.float32)
    offset = np.zeros(c, np.float32)
    mean = np.zeros(c, np.float32)
    var = np.ones(c, np.float32)
    out = np.empty_like(x)
    graph = fastbn.Graph()

    def layer():
        with graph.as_default():
            fastbn.batch_norm(x, data_format=fmt, scope="bn", reuse=fastbn.AUTO_REUSE,
                              updates_collections=None)

    return {
        "train": lambda: fastbn.nn.fused_batch_norm(x, scale, offset, data_format=fmt, out=out),
        "infer": lambda: fastbn.nn.fused_batch_norm(x, scale, offset, mean, var, data_format=fmt,
                                                    is_training=False, out=out),
        "layer": layer,
    }


def _time(fn, min_seconds):
    """Seconds per call: enough calls to fill `min_seconds`, at least one."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def run(backend_names=None, quick=False, repeats=None, progress=None):
    backend_names = backend_names or fastbn.backends.available()
    cases = QUICK_CASES if quick else CASES
    repeats = repeats or (3 if quick else 7)
    min_seconds = 0.02 if quick else 0.1
    results = []
    steps = len(cases) * repeats
    done = 0
    for name, shape, fmt in cases:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 2 + 1
        samples = {}
        for _ in range(repeats):
            for backend in backend_names:
                with fastbn.backends.use(backend):
                    for op, fn in _ops(x, fmt).items():
                        samples.setdefault((backend, op), []).append(_time(fn, min_seconds))
            done += 1
            if progress:
                progress(done, steps, name)
        for (backend, op), times in samples.items():
            results.append({"case": name, "shape": list(shape), "data_format": fmt,
                            "backend": backend, "op": op, "median_ms": 1e3 * float(np.median(times)),
                            "runs_ms": [1e3 * t for t in times]})
    return results


def table(results):
    backends = list(dict.fromkeys(r["backend"] for r in results))
    ops = list(dict.fromkeys(r["op"] for r in results))
    cases = list(dict.fromkeys(r["case"] for r in results))
    by = {(r["case"], r["backend"], r["op"]): r["median_ms"] for r in results}
    cols = [f"{b} {op}" for op in ops for b in backends]
    lines = ["median ms, float32 | " + " | ".join(cols)]
    for case in cases:
        cells = []
        for op in ops:
            for b in backends:
                ms = by.get((case, b, op))
                ref = by.get((case, "numpy", op))
                cell = f"{ms:.3f}" if ms is not None else "-"
                if ms is not None and ref is not None and b != "numpy":
                    cell += f" ({ref / ms:.1f}x)"
                cells.append(cell)
        lines.append(f"{case} | " + " | ".join(cells))
    return "\n".join(lines)


def _progress(done, total, name):
    if sys.stderr.isatty():
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name:<24}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def main(args):
    names = args.backends.split(",") if args.backends else None
    try:
        for name in names or ():
            fastbn.backends.get(name)  # unknown or unavailable: a clear error now
    except (ValueError, fastbn.backends.BackendUnavailable) as err:
        print(f"python -m fastbn bench: {err}", file=sys.stderr)
        return 2
    results = run(names, quick=args.quick, repeats=args.repeats, progress=_progress)
    print(table(results))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"fastbn": fastbn.__version__, "results": results}, f, indent=1)
    return 0
