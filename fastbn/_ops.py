"""Update operations: deferred variable updates that run when asked, as in TF1.

A layer with `updates_collections` set does not touch its moving statistics;
it adds `Operation`s to the collection instead.  Running one applies its
update (again each time it runs, as a TF op does).  `run([...])` runs a list
of them, each of their dependencies once; `apply_updates()` runs and removes
every operation of a collection, the eager stand-in for
`tf.control_dependencies(update_ops)`.
"""

import sys
import warnings

from ._graph import GraphKeys, get_default_graph

__all__ = ["Operation", "run", "apply_updates", "UpdateOpsWarning"]

# More never-run update ops than this in one graph means nobody runs them.
PENDING_UPDATE_OPS_LIMIT = 500


class UpdateOpsWarning(UserWarning):
    """Update ops were collected but never run: moving statistics are not moving."""


class Operation:
    """A deferred update, like a TF op in a collection.

    Attributes:
      name: the op's name in its graph (`'bn/AssignMovingAvg'`).
      run_count: how many times it has run.
    """

    __slots__ = ("name", "_fn", "_deps", "_tracker", "run_count")

    def __init__(self, name, fn, deps=(), tracker=None):
        self.name = name
        self._fn = fn
        self._deps = tuple(deps)
        self._tracker = tracker
        self.run_count = 0
        if tracker is not None:
            tracker.created()

    @property
    def deps(self):
        """The operations that run (once per `run` call) before this one."""
        return self._deps

    def run(self):
        """Runs this operation (and its dependencies), as `session.run(op)`."""
        run(self)

    def _execute(self):
        self._fn()
        self.run_count += 1
        if self.run_count == 1 and self._tracker is not None:
            self._tracker.ran()

    def __repr__(self):
        return f"<fastbn.Operation '{self.name}' runs={self.run_count}>"


class UpdateTracker:
    """Counts a layer's update ops that were created and never run."""

    __slots__ = ("graph", "layer_name", "unrun", "ever_ran")

    def __init__(self, graph, layer_name):
        self.graph = graph
        self.layer_name = layer_name
        self.unrun = 0
        self.ever_ran = False

    def created(self):
        self.unrun += 1
        graph = self.graph
        graph._unrun_update_ops += 1
        if graph._unrun_update_ops > PENDING_UPDATE_OPS_LIMIT:
            _warn_once(
                graph,
                "pile-up",
                f"{graph._unrun_update_ops} batch_norm update ops have been created and "
                "never run, so the moving mean and variance are not being updated. "
                "Call fastbn.apply_updates() after each training step (or pass "
                "updates_collections=None to update them during the call).",
            )

    def ran(self):
        self.unrun -= 1
        self.ever_ran = True
        self.graph._unrun_update_ops -= 1

    def check_inference(self):
        """Warns when a layer is evaluated on moving statistics nobody ever updated."""
        if self.unrun and not self.ever_ran:
            _warn_once(
                self.graph,
                ("stale", self.layer_name),
                f"batch_norm '{self.layer_name}' is evaluated with is_training=False, but "
                f"the {self.unrun} update ops it collected while training were never run: "
                "its moving mean and variance still hold their initial values. Call "
                "fastbn.apply_updates() after each training step (or pass "
                "updates_collections=None to update them during the call).",
            )


def _warn_once(graph, key, message):
    if key not in graph._warned:
        graph._warned.add(key)
        warnings.warn(message, UpdateOpsWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel():
    """The stacklevel of the first frame outside fastbn: the warning points at user code."""
    frame = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("fastbn."):
        frame = frame.f_back
        level += 1
    return level


def _flatten(fetches, out):
    if isinstance(fetches, Operation):
        out.append(fetches)
    elif isinstance(fetches, (list, tuple)):
        for item in fetches:
            _flatten(item, out)
    else:
        raise TypeError(
            "fetches must be a fastbn.Operation or a list of them, got "
            f"{type(fetches).__name__}"
        )
    return out


def run(fetches):
    """Runs an operation or a (nested) list of operations, as `session.run`.

    Each operation runs once per call, after its dependencies; a dependency
    shared by several fetched operations also runs once.
    """
    ops = dict.fromkeys(_flatten(fetches, []))  # once each, in order
    order = {}
    for op in ops:
        if op._deps:
            _with_deps(op, order)
        else:
            order[op] = None
    for op in order:
        op._execute()


def _with_deps(op, order):
    for dep in op._deps:
        if dep not in order:
            _with_deps(dep, order)
    order[op] = None


def apply_updates(collection=GraphKeys.UPDATE_OPS, graph=None):
    """Runs every pending operation of `collection` in one `run`, then removes them.

    The one-liner for eager training loops: call it after each training step
    to apply the moving-average updates that batch_norm collected.  Returns
    the number of operations run.  Items of the collection that are not
    operations are left in it.
    """
    graph = graph if graph is not None else get_default_graph()
    ref = graph.get_collection_ref(collection)
    ops = [item for item in ref if isinstance(item, Operation)]
    if not ops:
        return 0
    run(ops)
    ref[:] = [item for item in ref if not isinstance(item, Operation)]
    return len(ops)
