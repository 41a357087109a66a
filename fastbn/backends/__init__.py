"""The backend registry.

Backends are chosen by name: the `name` argument of `get`, else the
innermost `use(name)` block, else the environment variable
`FASTBN_BACKEND`, else `"auto"`: the fastest backend that works here.
Built-in backends are registered here; third-party ones join through the
entry-point group `fastbn.backends` (each entry point names a factory), or
at run time through `register`.

A factory is a callable taking no arguments that returns a
`fastbn.backends.base.Backend`, or raises `BackendUnavailable` saying why
the backend cannot work on this machine.  A factory may carry a `priority`
attribute (an int, higher first) for `auto`; plugins default to -1, so
`auto` prefers the built-in backends unless a plugin says otherwise.
"""

import contextvars
import importlib
import threading

import numpy as np

from .base import (Backend, BackendUnavailable, compute_dtype, environ_get,
                   per_channel_multiplier, usable_cores)

__all__ = [
    "Backend",
    "BackendUnavailable",
    "ENV_VAR",
    "ENTRY_POINT_GROUP",
    "as_numba_array",
    "available",
    "compute_dtype",
    "get",
    "get_for",
    "is_device_array",
    "per_channel_multiplier",
    "register",
    "registered",
    "status",
    "usable_cores",
    "use",
]

ENV_VAR = "FASTBN_BACKEND"
ENTRY_POINT_GROUP = "fastbn.backends"
AUTO = "auto"


class _Entry:
    __slots__ = ("factory", "priority", "instance", "reason", "probed")

    def __init__(self, factory, priority):
        self.factory = factory
        self.priority = priority
        self.instance = None
        self.reason = None
        self.probed = False


def _builtin_factory(module_name):
    def factory():
        module = importlib.import_module(f"{__name__}.{module_name}")
        return module.create()

    return factory


# name -> (module, priority for auto)
_BUILTINS = {
    "cython": ("cython_backend", 100),
    # Below the CPU backends: NumPy inputs would cross the bus on every call.
    "numba_cuda": ("numba_cuda_backend", 50),
    "numpy": ("numpy_backend", 0),
}

_lock = threading.RLock()
_entries = {name: _Entry(_builtin_factory(mod), prio) for name, (mod, prio) in _BUILTINS.items()}
_plugins_loaded = False
_override = contextvars.ContextVar("fastbn_backend_override", default=None)
_auto_cache = {}


def _load_plugins():
    global _plugins_loaded
    if _plugins_loaded:
        return
    with _lock:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        try:
            from importlib.metadata import entry_points

            eps = entry_points(group=ENTRY_POINT_GROUP)
        except Exception:  # a broken environment must not break fastbn itself
            eps = ()
        for ep in eps:
            if ep.name in _entries:
                continue
            _entries[ep.name] = _Entry(_plugin_factory(ep), -1)


def _plugin_factory(ep):
    def factory():
        try:
            target = ep.load()
        except Exception as err:
            raise BackendUnavailable(f"entry point {ep.value!r} failed to load: {err}") from err
        backend = target() if callable(target) and not isinstance(target, Backend) else target
        if not isinstance(backend, Backend):
            raise BackendUnavailable(
                f"entry point {ep.value!r} did not give a fastbn Backend"
            )
        return backend

    return factory


def register(name, factory, priority=None, replace=False):
    """Registers a backend factory under `name`.

    `factory()` must return a `Backend` or raise `BackendUnavailable`.
    `priority` ranks it for `auto` (higher first; default: the factory's
    `priority` attribute, else -1).  Registering a name that exists raises
    ValueError unless `replace=True`.
    """
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(f"name must be a non-empty str other than 'auto', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    if priority is None:
        priority = getattr(factory, "priority", -1)
    if not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {priority!r}")
    _load_plugins()
    with _lock:
        if name in _entries and not replace:
            raise ValueError(f"a backend named {name!r} is already registered")
        _entries[name] = _Entry(factory, priority)
        _auto_cache.clear()


def _probe(name):
    entry = _entries[name]
    if not entry.probed:
        with _lock:
            if not entry.probed:
                try:
                    backend = entry.factory()
                    if not isinstance(backend, Backend):
                        raise BackendUnavailable(
                            f"its factory returned {type(backend).__name__}, not a Backend"
                        )
                    if backend.name is None:
                        backend.name = name
                    entry.instance = backend
                except BackendUnavailable as err:
                    entry.reason = str(err) or "unavailable"
                except ImportError as err:
                    entry.reason = f"cannot be imported: {err}"
                entry.probed = True
    return entry


def registered():
    """The names of all registered backends, working here or not."""
    _load_plugins()
    return list(_entries)


def status():
    """`{name: None if it works here, else the reason why not}` for every backend."""
    _load_plugins()
    return {name: _probe(name).reason for name in list(_entries)}


def available():
    """The names of the backends that work here, fastest first."""
    _load_plugins()
    names = [name for name in list(_entries) if _probe(name).instance is not None]
    return sorted(names, key=lambda n: -_entries[n].priority)


def _unknown(name):
    return ValueError(
        f"unknown fastbn backend {name!r}; available here: {', '.join(available())} "
        f"(or 'auto'). Set it with {ENV_VAR}=<name> or fastbn.backends.use(<name>)."
    )


def _resolve(name):
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    _load_plugins()
    if name == AUTO:
        backend = _auto_cache.get(AUTO)
        if backend is None:
            # Probe in priority order and stop at the first that works: a backend
            # further down (and its imports) is not touched.
            for candidate in sorted(_entries, key=lambda n: -_entries[n].priority):
                if _probe(candidate).instance is not None:
                    backend = _auto_cache[AUTO] = _entries[candidate].instance
                    break
            else:
                raise RuntimeError("no fastbn backend works here")
        return backend
    entry = _entries.get(name)
    if entry is None:
        raise _unknown(name)
    _probe(name)
    if entry.instance is None:
        raise BackendUnavailable(
            f"fastbn backend {name!r} does not work here: {entry.reason}. "
            f"Available: {', '.join(available())}."
        )
    return entry.instance


def get(name=None):
    """The backend object for `name` (default: `use()` block, `FASTBN_BACKEND`, else auto)."""
    if name is None:
        name = _override.get() or environ_get(ENV_VAR) or AUTO
    if name == AUTO:
        backend = _auto_cache.get(AUTO)
        if backend is not None:
            return backend
    else:
        entry = _entries.get(name)
        if entry is not None and entry.instance is not None:
            return entry.instance
    return _resolve(name)


def is_numba_array(array):
    """Whether `array` is a Numba device array (or the CUDA simulator's): Numba marks
    their class."""
    return getattr(type(array), "__cuda_ndarray__", False)


def is_device_array(array):
    """Whether `array` lives on a GPU (`__cuda_array_interface__`, or the CUDA simulator's)."""
    # Asked several times a call: hasattr's failed lookup costs a microsecond an ndarray
    # need not pay, and on a Numba array it builds the whole interface (3 us).
    if type(array) is np.ndarray:
        return False
    return is_numba_array(array) or hasattr(array, "__cuda_array_interface__")


def as_numba_array(array):
    """A device array as a Numba device array, without a copy: Numba's own (and the
    simulator's) as they are, anything else with `__cuda_array_interface__` through a
    view (which costs ~20 us).  Raises ImportError without numba-cuda."""
    if is_numba_array(array):
        return array
    from numba import cuda

    return cuda.as_cuda_array(array)


def to_numba_device(array, dtype=None):
    """A host array copied to a new Numba device array, C-contiguous, in `dtype` (its
    own by default).  NumPy leaves any stride on a C-contiguous array's axes of length
    1, and numba-cuda takes a negative one there for an empty axis: such an array is
    copied on the host first."""
    from numba import cuda

    host = np.ascontiguousarray(array, dtype)
    if min(host.strides, default=0) < 0:
        host = host.copy()
    return cuda.to_device(host)


def get_for(array, name=None):
    """The backend for `array`: as `get`, but device arrays go to a backend that takes them.

    With `auto` a device array selects `numba_cuda`; a backend chosen by name
    that cannot take device arrays raises TypeError.
    """
    backend = get(name)
    if backend.accepts_device_arrays or type(array) is np.ndarray or not is_device_array(array):
        return backend
    selected = name or _override.get() or environ_get(ENV_VAR) or AUTO
    if selected == AUTO:
        return get("numba_cuda")
    raise TypeError(
        f"backend {backend.name!r} takes NumPy arrays; device arrays need the numba_cuda "
        "backend (or FASTBN_BACKEND=auto)")


class use:
    """A context manager that makes `name` the backend inside the block.

        with fastbn.backends.use("numpy"):
            y = fastbn.batch_norm(x)

    The name is checked on entry: an unknown or unavailable backend raises
    there.  Blocks nest; the setting is per thread and per async context.
    """

    __slots__ = ("_name", "_token")

    def __init__(self, name):
        self._name = name

    def __enter__(self):
        backend = get(self._name)
        self._token = _override.set(self._name)
        return backend

    def __exit__(self, *exc):
        _override.reset(self._token)
        return False
