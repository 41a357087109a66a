"""tools/memory_floor.py's C loops compute what they say, for any length and thread count
(the tool's floors are only worth something if its loops do the work)."""

import importlib.util
import os
import shutil

import numpy as np
import pytest

from fastbn.backends import cython_backend

TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "memory_floor.py")


@pytest.fixture(scope="module")
def floor(tmp_path_factory):
    if not cython_backend.cpu_has_avx2() or shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("the floor's loops need AVX2 and a C compiler")
    spec = importlib.util.spec_from_file_location("memory_floor", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.build(str(tmp_path_factory.mktemp("floor")))


@pytest.mark.parametrize("n", [1, 37, 4096, 100_003])
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("block", [0, 16, 1000])
def test_floor_loops_write_every_element(floor, n, threads, block):
    module, lib = floor
    rng = np.random.default_rng(n)
    x = module.aligned_copy(rng.standard_normal(n).astype(np.float32))
    d = module.aligned_copy(rng.standard_normal(n).astype(np.float32))
    for passes in (0, 1):
        for stream in (0, 1):
            for with_d in (False, True):
                y = module.aligned_copy(np.full(n, np.nan, np.float32))
                total = lib.floor_run(y.ctypes.data, x.ctypes.data,
                                      d.ctypes.data if with_d else None, n, passes, stream,
                                      threads, block)
                want = 1.5 * x + 0.5 + (d if with_d else 0)
                np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
                assert np.isfinite(total)
                if passes == 1 and threads == 1:
                    # The read pass really reads every element (of every piece).
                    read = np.sum(x.astype(np.float64) * (d if with_d else 1))
                    assert abs(total - read) <= 1e-4 * np.sum(np.abs(x)) + 1e-5
