"""The backend registry: selection, errors, plugins."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fastbn
from fastbn import backends
from fastbn.backends.base import Backend, BackendUnavailable


class _Doubling(backends.get("numpy").__class__):
    """The NumPy backend with every output doubled: easy to recognise."""

    name = "doubling"

    def normalize(self, x, mean, multiplier, offset, out=None, relu=False):
        y = super().normalize(x, mean, multiplier, offset, out=out, relu=relu)
        y *= 2
        return y


@pytest.fixture
def registry_snapshot():
    entries = dict(backends._entries)
    yield
    backends._entries.clear()
    backends._entries.update(entries)
    backends._auto_cache.clear()


def test_numpy_is_always_available():
    assert "numpy" in backends.available()
    assert backends.get("numpy").name == "numpy"
    assert backends.status()["numpy"] is None


def test_auto_picks_the_first_available():
    assert backends.get("auto") is backends.get(backends.available()[0])


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown fastbn backend 'nope'.*numpy"):
        backends.get("nope")
    with pytest.raises(ValueError, match="numpy"):
        with backends.use("nope"):
            pass
    with pytest.raises(TypeError):
        backends.get(3)


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "numpy")
    assert backends.get().name == "numpy"
    monkeypatch.setenv("FASTBN_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastbn backend 'nope'"):
        fastbn.nn.moments(np.zeros((2, 2), np.float32), [0])


def test_use_is_a_nesting_context_manager(registry_snapshot):
    backends.register("doubling", _Doubling)
    x = np.random.rand(6, 3).astype(np.float32)
    plain = fastbn.nn.batch_normalization(x, 0.5, 2.0, None, None, 0.0)
    with backends.use("doubling") as b:
        assert b.name == "doubling" and backends.get() is b
        doubled = fastbn.nn.batch_normalization(x, 0.5, 2.0, None, None, 0.0)
        with backends.use("numpy"):
            assert backends.get().name == "numpy"
        assert backends.get().name == "doubling"
    np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-6)
    assert backends.get("auto").name != "doubling"  # plugins rank below built-ins


def test_register_rules(registry_snapshot):
    with pytest.raises(ValueError, match="already registered"):
        backends.register("numpy", _Doubling)
    with pytest.raises(ValueError):
        backends.register("auto", _Doubling)
    with pytest.raises(TypeError, match="callable"):
        backends.register("x", 3)
    backends.register("first", _Doubling, priority=1000)
    assert backends.available()[0] == "first"
    assert backends.get("auto").name == "doubling"


def test_unavailable_backend_says_why(registry_snapshot):
    def factory():
        raise BackendUnavailable("needs a frobnicator")

    backends.register("broken", factory)
    assert "broken" not in backends.available()
    assert backends.status()["broken"] == "needs a frobnicator"
    with pytest.raises(BackendUnavailable, match="frobnicator"):
        backends.get("broken")

    backends.register("wrong", lambda: object())
    assert "not a Backend" in backends.status()["wrong"]


def test_protocol_defaults_compose_moments_and_normalize():
    class Minimal(Backend):
        name = "minimal"

        def moments(self, x, weights=None):
            return backends.get("numpy").moments(x, weights)

        def normalize(self, x, mean, multiplier, offset, out=None, relu=False):
            return backends.get("numpy").normalize(x, mean, multiplier, offset, out, relu)

    x = np.random.rand(5, 2, 3).astype(np.float32)
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    y, mean, var = Minimal().train_forward(x, ones, zeros, 1e-3)
    ref = (x - x.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x.var(axis=(0, 2), keepdims=True)
                                                            + 1e-3)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError):
        Backend().moments(x)


def test_entry_point_plugin(tmp_path):
    """A package declaring an entry point in `fastbn.backends` is found and usable."""
    pkg = tmp_path / "fastbn_plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from fastbn.backends.numpy_backend import NumpyBackend
        class Demo(NumpyBackend):
            name = "demo"
            description = "a demo plugin"
        def create():
            return Demo()
    """))
    dist = tmp_path / "fastbn_plugin_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastbn-plugin-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fastbn.backends]\ndemo = fastbn_plugin_demo:create\n")
    code = textwrap.dedent("""
        import sys, numpy as np, fastbn
        sys.path.insert(0, sys.argv[1])
        assert "demo" in fastbn.backends.available(), fastbn.backends.status()
        with fastbn.backends.use("demo") as b:
            assert b.name == "demo"
            fastbn.batch_norm(np.ones((3, 2), np.float32))
        print("ok")
    """)
    env_path = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code, env_path], capture_output=True, text=True,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_environ_get_sees_every_change(monkeypatch):
    """The name's encoding is kept between calls, never the value."""
    from fastbn.backends.base import environ_get

    monkeypatch.delenv("FASTBN_TEST_SETTING", raising=False)
    assert environ_get("FASTBN_TEST_SETTING") is None
    monkeypatch.setenv("FASTBN_TEST_SETTING", "3")
    assert environ_get("FASTBN_TEST_SETTING") == "3"
    monkeypatch.setenv("FASTBN_TEST_SETTING", "4")
    assert environ_get("FASTBN_TEST_SETTING") == "4"
    monkeypatch.delenv("FASTBN_TEST_SETTING")
    assert environ_get("FASTBN_TEST_SETTING") is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_usable_cores_follows_the_affinity():
    """The count is re-read at most CORES_READ_EVERY seconds after the last reading."""
    from fastbn.backends import base

    allowed = os.sched_getaffinity(0)
    time.sleep(base.CORES_READ_EVERY)
    assert backends.usable_cores() == len(allowed)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        time.sleep(base.CORES_READ_EVERY)
        assert backends.usable_cores() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    time.sleep(base.CORES_READ_EVERY)
    assert backends.usable_cores() == len(allowed)


def test_host_arrays_go_to_numba_with_strides_it_can_index(monkeypatch):
    # NumPy leaves any stride on a C-contiguous array's axes of length 1; numba-cuda
    # takes a negative one there for an empty axis (an H200 refused such a copy).
    cuda = pytest.importorskip("numba.cuda")
    dummyarray = pytest.importorskip("numba.cuda.cudadrv.dummyarray")
    sent = []
    monkeypatch.setattr(cuda, "to_device", lambda a: sent.append(a) or a)
    arrays = [np.ones((1, 1, 1), np.float16)[::-1], np.arange(15.0).reshape(5, 1, 3)[:, ::-1],
              np.arange(6.0).reshape(2, 3).T]
    wanted = [(x, None) for x in arrays] + [(arrays[0], np.float32)]
    for x, dtype in wanted:
        backends.to_numba_device(x, dtype)
    for a, (x, dtype) in zip(sent, wanted):
        assert a.flags.c_contiguous and a.dtype == (dtype or x.dtype)
        np.testing.assert_array_equal(a, x)
        core = dummyarray.Array.from_desc(0, a.shape, a.strides, a.itemsize)
        assert core[(slice(None),) * a.ndim].shape == a.shape
