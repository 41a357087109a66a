"""slim's `arg_scope`: default keyword arguments for decorated functions."""

import functools
import threading

__all__ = ["arg_scope", "add_arg_scope", "current_arg_scope", "has_arg_scope",
           "arg_scoped_arguments"]


class _ArgScopeState(threading.local):
    def __init__(self):
        self.stack = [{}]


_state = _ArgScopeState()


def _key(func):
    return getattr(func, "_fastbn_arg_scope_key", None)


def current_arg_scope():
    return _state.stack[-1]


class arg_scope:
    """Sets default keyword arguments for the listed functions inside the block.

        with fastbn.arg_scope([fastbn.batch_norm], decay=0.9, updates_collections=None):
            y = fastbn.batch_norm(x)          # decay=0.9, updated in place

    Arguments given explicitly at a call win; nested scopes add to and
    override outer ones.  Passing the dict yielded by an earlier `arg_scope`
    (and no keyword arguments) reopens that scope.
    """

    __slots__ = ("_scope",)

    def __init__(self, list_ops_or_scope, **kwargs):
        if isinstance(list_ops_or_scope, dict):
            if kwargs:
                raise ValueError("When attempting to re-use a scope by suppling a "
                                 "dictionary, kwargs must be empty.")
            self._scope = list_ops_or_scope
            return
        if not isinstance(list_ops_or_scope, (list, tuple)):
            raise TypeError("list_ops_or_scope must either be a list/tuple or reused "
                            "scope (i.e. dict)")
        scope = dict(current_arg_scope())
        for op in list_ops_or_scope:
            key = _key(op)
            if key is None:
                raise ValueError(f"{getattr(op, '__name__', op)} is not decorated with "
                                 "@add_arg_scope")
            merged = dict(scope.get(key, {}))
            merged.update(kwargs)
            scope[key] = merged
        self._scope = scope

    def __enter__(self):
        _state.stack.append(self._scope)
        return self._scope

    def __exit__(self, *exc):
        _state.stack.pop()
        return False


def add_arg_scope(func):
    """Decorates a function so that `arg_scope` can supply its keyword arguments."""
    key = (func.__module__, func.__qualname__)

    @functools.wraps(func)
    def func_with_args(*args, **kwargs):
        defaults = _state.stack[-1].get(key)
        if defaults:
            merged = dict(defaults)
            merged.update(kwargs)
            kwargs = merged
        return func(*args, **kwargs)

    func_with_args._fastbn_arg_scope_key = key
    return func_with_args


def has_arg_scope(func):
    return _key(func) is not None


def arg_scoped_arguments(func):
    import inspect

    return list(inspect.signature(func).parameters)
