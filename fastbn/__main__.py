"""`python -m fastbn info`, `python -m fastbn bench` and `python -m fastbn summarize`."""

import argparse
import json
import os
import platform
import sys

import numpy as np

import fastbn


def info(args):
    print(f"fastbn {fastbn.__version__} (numpy {np.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()})")
    env = os.environ.get(fastbn.backends.ENV_VAR)
    try:
        chosen = fastbn.backends.get().name
    except Exception as err:  # an unknown FASTBN_BACKEND still lets info report it
        chosen = f"error: {err}"
    print(f"backend: {chosen}  ({fastbn.backends.ENV_VAR}={env or '<unset>, auto'})")
    print(f"cores this process may use: {fastbn.backends.usable_cores()}")
    print("backends:")
    for name, reason in fastbn.backends.status().items():
        if reason is None:
            backend = fastbn.backends.get(name)
            detail = f"{backend.description}; threads: {backend.threads()}"
            print(f"  {name:<12} works   {detail}")
        else:
            print(f"  {name:<12} no      {reason}")
    return 0


def bench(args):
    from . import bench as bench_module

    return bench_module.main(args)


def summarize(args):
    from . import bench as bench_module

    reports = []
    for path in args.reports:
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as err:
            raise SystemExit(f"cannot read a bench report from {path}: {err}") from None
    try:
        ops = args.ops.split(",") if args.ops else ("train", "infer", "backward")
        print(bench_module.summary(reports, side=args.side, against=args.against, ops=ops))
    except ValueError as err:
        raise SystemExit(f"summarize: {err}") from None
    return 0


def main(argv=None):
    from .bench import OPS

    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="version, backends and whether they work here, threads")
    b = sub.add_parser("bench", help="time batch norm on realistic shapes on every backend")
    b.add_argument("--quick", action="store_true", help="a run of a few seconds")
    b.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    b.add_argument("--backends", default=None,
                   help="comma-separated backends to time (default: all that work)")
    b.add_argument("--compare", default=None,
                   help="also time these, where installed: torch, tf (comma-separated)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float16", "float64"),
                   help="the data's dtype (default float32; the parameters are float32 for "
                        "float16 data, as TF's)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the data lives: cpu (default), or cuda (the numba_cuda backend "
                        "on device arrays against torch on CUDA tensors; needs a GPU)")
    b.add_argument("--ops", default=None,
                   help=f"comma-separated ops to time (default: all of them: {','.join(OPS)})")
    b.add_argument("--json", dest="json_path", default=None, help="write the raw figures here")
    b.add_argument("--plot", dest="plot_path", default=None,
                   help="write a bar chart here (PNG; needs matplotlib)")
    t = sub.add_parser("summarize", help="a Markdown table over several `bench --json` runs")
    t.add_argument("reports", nargs="+", help="JSON files written by bench --json")
    t.add_argument("--side", default=None,
                   help="the fastbn backend to report (default: the first but numpy)")
    t.add_argument("--against", default="torch", help="the side to compare it with")
    t.add_argument("--ops", default=None,
                   help="comma-separated ops to show (default: train,infer,backward)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(args)
    if args.command == "bench":
        return bench(args)
    if args.command == "summarize":
        return summarize(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
