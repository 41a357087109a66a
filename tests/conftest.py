import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

if os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0"):
    import threading

    from numba.cuda.simulator import kernelapi

    # Numba's CUDA simulator runs every CUDA thread as a Python thread and meets them at
    # barriers: a short switch interval makes those meetings quick.
    sys.setswitchinterval(1e-4)
    # Its cuda.shared.array looks an allocation up (by the calling line), then creates it,
    # without a lock: two threads of a block can end up with different arrays, one of them
    # uninitialised.  The same lookup, under a lock (fastbn uses static shared arrays only).
    import traceback

    import numpy as np
    from numba.core import types
    from numba.np import numpy_support

    _shared_lock = threading.Lock()

    def _locked_shared_array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            raise RuntimeError("fastbn's tests patch the simulator for static shared arrays")
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[-1][0:2])
        with _shared_lock:
            array = self._allocations.get(caller)
            if array is None:
                array = self._allocations[caller] = np.empty(shape, dtype)
        return array

    kernelapi.FakeCUDAShared.array = _locked_shared_array

import fastbn  # noqa: E402

# FASTBN_TEST_BACKENDS=name[,name]: run only the backend-generic tests, on those
# backends (CI runs the CUDA backend this way under the simulator).
ONLY = [b for b in os.environ.get("FASTBN_TEST_BACKENDS", "").split(",") if b]
BACKENDS = ONLY or fastbn.backends.available()


def pytest_report_header(config):
    return f"fastbn backends under test: {', '.join(BACKENDS)}"


def pytest_collection_modifyitems(config, items):
    if not ONLY:
        return
    missing = [b for b in ONLY if b not in fastbn.backends.available()]
    if missing:
        raise pytest.UsageError(
            f"FASTBN_TEST_BACKENDS names backends that do not work here: {missing} "
            f"({fastbn.backends.status()})")
    selected = [item for item in items if "backend" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test once per working backend, with that backend selected."""
    with fastbn.backends.use(request.param) as selected:
        yield selected


@pytest.fixture(autouse=True)
def fresh_graph():
    """Each test starts with an empty default graph."""
    fastbn.reset_default_graph()
    yield fastbn.get_default_graph()
