"""Graphs and collections with TF1's names and behaviour.

fastbn computes eagerly, so a `Graph` holds no computation: it is the
namespace TF1 code expects around its layers (collections, variables, name
and variable scopes, update ops).  One graph is the default at any time.
"""

import re
import threading

__all__ = [
    "GraphKeys",
    "Graph",
    "get_default_graph",
    "reset_default_graph",
    "get_collection",
    "get_collection_ref",
    "add_to_collection",
    "add_to_collections",
]


class GraphKeys:
    """Standard collection names, with the string values TF1 uses."""

    GLOBAL_VARIABLES = "variables"
    LOCAL_VARIABLES = "local_variables"
    TRAINABLE_VARIABLES = "trainable_variables"
    MODEL_VARIABLES = "model_variables"
    MOVING_AVERAGE_VARIABLES = "moving_average_variables"
    REGULARIZATION_LOSSES = "regularization_losses"
    UPDATE_OPS = "update_ops"
    # TF1 aliases kept for ported code.
    VARIABLES = GLOBAL_VARIABLES


def _check_collection_name(name, argument="name"):
    if not isinstance(name, str):
        raise TypeError(
            f"{argument} must be a collection name (a str), got {type(name).__name__}"
        )


class Graph:
    """A namespace of collections, variables and scopes, like `tf.Graph`."""

    def __init__(self):
        self._collections = {}
        self._variables = {}  # op name ("bn/beta") -> Variable
        self._names_in_use = {}  # name uniquifier for standalone Variables
        self._variable_scope_counts = {}  # variable scope name -> times opened
        # Open variable scopes, innermost last: (VariableScope, names opened inside it).
        self._scope_stack = []
        # Update-op bookkeeping for the "statistics never move" warning.
        self._unrun_update_ops = 0
        self._update_trackers = {}  # layer scope name -> UpdateTracker
        self._warned = set()

    # -- default graph -----------------------------------------------------
    def as_default(self):
        """A context manager that makes this graph the default graph."""
        return _DefaultGraphContext(self)

    # -- collections -------------------------------------------------------
    def add_to_collection(self, name, value):
        _check_collection_name(name)
        self._collections.setdefault(name, []).append(value)

    def add_to_collections(self, names, value):
        """Adds `value` to each collection in `names` (a name or a list of names)."""
        if isinstance(names, str):
            names = (names,)
        elif not isinstance(names, (list, tuple, set, frozenset)):
            raise TypeError(
                "names must be a collection name or a list of names, got "
                f"{type(names).__name__}"
            )
        # TF adds once per distinct name, in a stable order.
        seen = set()
        for name in names:
            if name not in seen:
                seen.add(name)
                self.add_to_collection(name, value)

    def get_collection_ref(self, name):
        """The list behind a collection itself: changes to it change the collection."""
        _check_collection_name(name)
        return self._collections.setdefault(name, [])

    def get_collection(self, name, scope=None):
        """A copy of a collection, filtered by `re.match(scope, item.name)` when given."""
        _check_collection_name(name)
        items = self._collections.get(name, ())
        if scope is None:
            return list(items)
        if not isinstance(scope, str):
            scope = getattr(scope, "name", None)
            if not isinstance(scope, str):
                raise TypeError("scope must be a str, a VariableScope or None")
        pattern = re.compile(scope)
        return [
            item
            for item in items
            if isinstance(getattr(item, "name", None), str) and pattern.match(item.name)
        ]

    def get_all_collection_keys(self):
        return [key for key, items in self._collections.items() if items]

    def clear_collection(self, name):
        self._collections.pop(name, None)

    # -- names ---------------------------------------------------------------
    def unique_name(self, name, mark_as_used=True):
        """`name` made unique in this graph by a `_N` suffix, as tf.Graph does."""
        key = name.lower()
        count = self._names_in_use.get(key, 0)
        if mark_as_used:
            self._names_in_use[key] = count + 1
        if count > 0:
            base = key
            while key in self._names_in_use:
                key = f"{base}_{count}"
                count += 1
            if mark_as_used:
                self._names_in_use[key] = 1
            name = f"{name}_{count - 1}"
        return name


class _DefaultGraphContext:
    __slots__ = ("_graph",)

    def __init__(self, graph):
        self._graph = graph

    def __enter__(self):
        stack = _state.stack
        stack.append(self._graph)
        return self._graph

    def __exit__(self, *exc):
        _state.stack.pop()
        return False


class _DefaultGraphState(threading.local):
    def __init__(self):
        self.stack = []


_state = _DefaultGraphState()
_global_default = [Graph()]


def get_default_graph():
    """The graph of the innermost `Graph.as_default()` block, else the global one."""
    stack = _state.stack
    return stack[-1] if stack else _global_default[0]


def reset_default_graph():
    """Replaces the global default graph with a new, empty one."""
    if _state.stack:
        raise AssertionError(
            "Do not use reset_default_graph() inside a `with graph.as_default():` block"
        )
    _global_default[0] = Graph()


def get_collection(key, scope=None):
    """`get_default_graph().get_collection(key, scope)`."""
    _check_collection_name(key, "key")
    return get_default_graph().get_collection(key, scope)


def get_collection_ref(key):
    _check_collection_name(key, "key")
    return get_default_graph().get_collection_ref(key)


def add_to_collection(name, value):
    get_default_graph().add_to_collection(name, value)


def add_to_collections(names, value):
    get_default_graph().add_to_collections(names, value)
