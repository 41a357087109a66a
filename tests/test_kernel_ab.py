"""tools/kernel_ab.py, the A/B of two kernel builds: it runs each op on both, and its bit
comparison tells different results apart (its verdict is only worth something if so)."""

import importlib.util
import os

import numpy as np
import pytest

TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "kernel_ab.py")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("kernel_ab", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("op", ["backward", "train", "infer"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", ["70x300", "3x4x500"])
def test_a_build_against_itself_keeps_its_bits(tool, capsys, op, dtype, shape):
    isa = "avx2" if tool.cython_backend.cpu_has_avx2() else "baseline"
    assert tool.main([tool.HERE, "--op", op, "--dtype", dtype, "--shape", shape,
                      "--rounds", "1", "--isa", isa]) == 0
    assert "same bits" in capsys.readouterr().out


def test_bit_comparison_sees_one_flipped_bit(tool):
    a = [np.linspace(0, 1, 7, dtype=np.float32), np.arange(3.0)]
    b = [x.copy() for x in a]
    assert tool.same_bits(a, b)
    b[0].view(np.uint32)[3] ^= 1
    assert not tool.same_bits(a, b)
    assert not tool.same_bits(a, a[:1])


def test_shapes_are_read_as_rows_or_runs(tool):
    assert tool.parse_shape("256x4096") == (256, 4096, 1)
    assert tool.parse_shape("32x64x3136") == (32, 64, 3136)
    for bad in ("256", "0x5", "axb", "1x2x3x4"):
        with pytest.raises(Exception, match="NxC"):
            tool.parse_shape(bad)


def test_a_missing_build_is_named(tool, tmp_path):
    with pytest.raises(SystemExit, match="no kernels_"):
        tool.main([str(tmp_path)])


@pytest.mark.parametrize("rounds", ["0", "-3"])
def test_rounds_must_be_positive(tool, capsys, rounds):
    with pytest.raises(SystemExit):
        tool.main([tool.HERE, "--rounds", rounds])
    assert "--rounds must be a positive integer" in capsys.readouterr().err
