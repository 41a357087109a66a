"""`python -m fastbn info` and `python -m fastbn bench`."""

import json
import os
import subprocess
import sys

import pytest

import fastbn
from fastbn import bench


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastbn", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_lists_every_backend_and_why_not():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert f"fastbn {fastbn.__version__}" in result.stdout
    for name, reason in fastbn.backends.status().items():
        assert name in result.stdout
        if reason:
            assert reason in result.stdout


def test_info_says_from_what_size_outputs_are_streamed():
    if "cython" not in fastbn.backends.available():
        pytest.skip("the Cython backend is not built here")
    env = dict(os.environ, FASTBN_STREAM_BYTES=str(3 << 20))
    result = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "outputs from 3 MiB streamed" in result.stdout


def test_bench_quick_writes_every_case_and_backend(tmp_path):
    path = tmp_path / "bench.json"
    result = _run("bench", "--quick", "--json", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    seen = {(r["case"], r["side"], r["op"]) for r in data["results"]}
    for case, _, _ in bench.QUICK_CASES:
        for backend in fastbn.backends.available():
            for op in bench.OPS:
                assert (case, backend, op) in seen
    assert all(r["median_ms"] > 0 and r["roofline_ms"] > 0 for r in data["results"])
    assert data["copy_gbps"] > 0
    assert "median ms" in result.stdout


def test_bench_unknown_backend_is_a_clear_error():
    result = _run("bench", "--quick", "--backends", "nope")
    assert result.returncode != 0
    assert "unknown fastbn backend 'nope'" in result.stderr


def test_bench_compare_must_be_known():
    result = _run("bench", "--quick", "--compare", "mxnet")
    assert result.returncode == 2 and "--compare" in result.stderr


def test_no_command_prints_help():
    result = _run()
    assert result.returncode == 2 and "bench" in result.stdout


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    report = bench.run(["numpy"], quick=True, repeats=1, cases=[bench.CASES[-1]])
    path = tmp_path / "bench.png"
    bench.plot(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_table_shows_ratios_and_roofline():
    report = bench.run(["numpy"], quick=True, repeats=1, cases=[bench.CASES[-1]],
                       ops=("train", "backward"))
    text = bench.table(report)
    assert "train:" in text and "backward:" in text and "roofline" in text
    assert report["results"][0]["of_roofline"] > 0
