"""`python -m fastbn info`, `bench` and `summarize`."""

import json
import os
import subprocess
import sys

import pytest

import fastbn
from fastbn import bench
from fastbn.__main__ import main


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


def test_bench_ops_chooses_what_is_timed(tmp_path):
    path = tmp_path / "bench.json"
    result = _run("bench", "--quick", "--backends", "numpy", "--ops", "sigmoid,infer",
                  "--json", str(path))
    assert result.returncode == 0, result.stderr
    ops = {r["op"] for r in json.loads(path.read_text())["results"]}
    assert ops == {"sigmoid", "infer"}
    result = _run("bench", "--quick", "--ops", "train,softmax")
    assert result.returncode == 2 and "--ops takes" in result.stderr


def test_bench_refuses_bad_repeats_and_unwritable_outputs_before_running(tmp_path):
    for repeats in ("0", "-2"):
        result = _run("bench", "--quick", "--repeats", repeats)
        assert result.returncode == 2 and "--repeats must be a positive integer" in result.stderr
        assert "median ms" not in result.stdout
    for option in ("--json", "--plot"):
        result = _run("bench", "--quick", option, str(tmp_path / "missing" / "out"))
        assert result.returncode == 2 and "there is no folder" in result.stderr
        assert "median ms" not in result.stdout
        result = _run("bench", "--quick", option, str(tmp_path))
        assert result.returncode == 2 and "cannot write there" in result.stderr
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        bench.run(["numpy"], quick=True, repeats=0)


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


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_bench_times_data_of_the_dtype_asked_for(dtype):
    report = bench.run(["cython", "numpy"], quick=True, repeats=1, cases=[bench.CASES[-1]],
                       dtype=dtype)
    assert report["dtype"] == dtype
    assert {(r["side"], r["op"]) for r in report["results"]} == {
        (side, op) for side in ("cython", "numpy") for op in bench.OPS}
    assert bench.table(report).startswith(f"median ms, {dtype},")


def test_bench_dtype_must_be_a_float():
    with pytest.raises(ValueError, match="dtype must be float16, float32 or float64"):
        bench.run(["numpy"], quick=True, repeats=1, cases=[bench.CASES[-1]], dtype="int32")
    result = _run("bench", "--quick", "--dtype", "int8")
    assert result.returncode == 2 and "--dtype" in result.stderr


def test_bench_device_must_be_known_and_usable():
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        bench.run(["numpy"], quick=True, repeats=1, cases=[bench.CASES[-1]], device="tpu")
    status = fastbn.backends.status()["numba_cuda"]
    simulated = status is None and fastbn.backends.get("numba_cuda").simulated
    if status is None and not simulated:
        pytest.skip("a GPU is here: tools/gpu_check.sh runs the device bench")
    result = _run("bench", "--quick", "--device", "cuda")
    assert result.returncode == 2
    assert ("simulator" if simulated else status) in result.stderr


def _report(times):
    """A bench report with one case and the given {(side, op): median ms}."""
    return {"results": [{"case": "c", "side": side, "op": op, "median_ms": ms,
                         "of_roofline": ms / 10.0} for (side, op), ms in times.items()]}


def test_summarize_takes_medians_over_runs_and_the_range_of_speedups():
    reports = [_report({("numpy", "train"): 50.0, ("cython", "train"): a,
                        ("torch", "train"): b}) for a, b in ((1.0, 3.0), (2.0, 3.0), (4.0, 2.0))]
    text = bench.summary(reports)
    header, rule, row = text.splitlines()
    assert header == "| case | train | torch | x | R |"
    assert row == "| c | 2 | 3 | 1.50 (0.50-3.00) | 0.20 |"
    with pytest.raises(ValueError, match="at least one report"):
        bench.summary([])
    with pytest.raises(ValueError, match="'results' list"):
        bench.summary([{"copy_gbps": 20.0}])
    with pytest.raises(ValueError, match="side must be a side the reports measured"):
        bench.summary(reports, side="numba_cuda")
    with pytest.raises(ValueError, match="against must be a side the reports measured"):
        bench.summary(reports, against="tf")


def test_summarize_command_reads_bench_json(tmp_path, capsys):
    paths = []
    for i, ms in enumerate((1.0, 3.0)):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(_report({("cython", "infer"): ms, ("torch", "infer"): 3.0})))
        paths.append(str(path))
    assert main(["summarize", *paths]) == 0
    assert "| c | 2 | 3 | 2.00 (1.00-3.00) | 0.20 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read a bench report"):
        main(["summarize", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="against must be a side"):
        main(["summarize", paths[0], "--against", "tf"])
    assert main(["summarize", *paths, "--ops", "tape_relu,infer"]) == 0
    assert "| case | infer | torch | x | R |" in capsys.readouterr().out  # (measured ops only)
    with pytest.raises(SystemExit, match="ops must be among train, infer"):
        main(["summarize", *paths, "--ops", "inference"])
