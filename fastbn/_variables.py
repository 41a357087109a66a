"""Variables, variable scopes and the slim variable helpers, with TF1's names.

A `Variable` holds a NumPy array.  Variables created through `get_variable`
(which is what the layers do) live in the default graph under their full
scoped name, so that `reuse` finds them again, exactly as in TF1.
"""

import itertools
import numbers
import re

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from ._graph import GraphKeys, get_default_graph
from .initializers import glorot_uniform_initializer

__all__ = [
    "AUTO_REUSE",
    "Variable",
    "VariableScope",
    "variable_scope",
    "get_variable_scope",
    "get_variable",
    "model_variable",
    "global_variables",
    "trainable_variables",
    "model_variables",
    "moving_average_variables",
    "local_variables",
    "get_variables",
    "get_variables_by_name",
    "get_variables_by_suffix",
    "get_model_variables",
]

_FLOAT_KINDS = "fc"


class _ReuseMode:
    """The type of `AUTO_REUSE`: create variables if absent, reuse them otherwise."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "fastbn.AUTO_REUSE"

    def __reduce__(self):
        return (_ReuseMode, ())


AUTO_REUSE = _ReuseMode()


def _as_dtype(dtype, argument="dtype"):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{argument} must be a NumPy dtype or dtype name, got {dtype!r}") from None
    # TF's types are the machine's: a big-endian '>f4' is its float32.
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def _refuse_unsupported(function, **arguments):
    """ValueError for the first of TF's `arguments` of `function` that fastbn cannot honour
    and that is given (not None).  (Callers on the layer's path first test that one is
    given, `a is b is ... is None` being true only when all are None: a call with
    keywords costs more than the test, on every batch_norm call.)"""
    for argument, value in arguments.items():
        if value is not None:
            raise ValueError(f"{function}: {argument} is not supported by fastbn")


def _shape_agrees(actual, shape):
    """Whether a value of shape `actual` fits `shape` (a sequence whose None dimensions
    match anything)."""
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    return len(shape) == len(actual) and all(d is None or d == n for d, n in zip(shape, actual))


_SERIALS = itertools.count()


class Variable(NDArrayOperatorsMixin):
    """A mutable array with a TF-style name, like `tf.Variable`.

    Takes `tf.compat.v1.Variable`'s arguments, in its order:

    Args:
      initial_value: an array-like (or a callable returning one) giving the
        initial value and, unless `dtype` is given, the dtype.  Python floats
        become float32 and Python ints int32, as in TensorFlow.
      trainable: if True (or None, the default) the variable is also added to
        `GraphKeys.TRAINABLE_VARIABLES`.
      collections: the graph collections to add the variable to; defaults to
        `[GraphKeys.GLOBAL_VARIABLES]`.
      name: the name; made unique in the default graph's current name scope
        (`'v'`, `'v_1'`, ...).  Defaults to `'Variable'`.
      dtype: if given, the initial value is cast to it.
      shape: if given, the value's shape must agree with it (None for a
        dimension that may be anything).
      caching_device, variable_def, import_scope, constraint: not supported
        (ValueError unless None); validate_shape, expected_shape, use_resource,
        synchronization, aggregation: accepted, no effect (a fastbn Variable
        always has its value's shape and lives in this process).

    `.name` reads as TF prints it (`'bn/moving_mean:0'`), `.numpy()` returns a
    copy of the value, `.assign(value)` replaces it.  A Variable takes part in
    NumPy arithmetic with its current value; `==` compares identity, as TF1's
    variables do.
    """

    __slots__ = ("_value", "_op_name", "_trainable", "_serial", "__weakref__")

    def __init__(self, initial_value=None, trainable=None, collections=None, validate_shape=True,
                 caching_device=None, name=None, variable_def=None, dtype=None,
                 expected_shape=None, import_scope=None, constraint=None, use_resource=None,
                 synchronization=None, aggregation=None, shape=None):
        _refuse_unsupported("Variable", caching_device=caching_device, variable_def=variable_def,
                            import_scope=import_scope, constraint=constraint)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if trainable is None:
            trainable = True
        if not isinstance(trainable, (bool, np.bool_)):
            raise TypeError(f"trainable must be a bool, got {type(trainable).__name__}")
        if initial_value is None:
            raise ValueError("initial_value must be specified")
        if callable(initial_value):
            initial_value = initial_value()
        value = _to_array(initial_value, "initial_value", dtype)
        if shape is not None and not _shape_agrees(value.shape, shape):
            raise ValueError(f"initial_value has shape {value.shape}, not the shape {shape} "
                             "given")
        graph = get_default_graph()
        scope = get_variable_scope().name
        name = name or "Variable"
        self._init(value, graph.unique_name(scope + "/" + name if scope else name),
                   bool(trainable))
        _add_to_graph(graph, self, collections, trainable)

    @classmethod
    def _create(cls, value, op_name, trainable):
        """A variable with an exact op name (no uniquifying); not added to collections."""
        self = cls.__new__(cls)
        self._init(value, op_name, trainable)
        return self

    def _init(self, value, op_name, trainable):
        self._value = value
        self._op_name = op_name
        self._trainable = trainable
        # Creation order (GradientTape.watched_variables sorts by it, as TF by its ids).
        self._serial = next(_SERIALS)

    # -- TF-style attributes ------------------------------------------------
    @property
    def name(self):
        return self._op_name + ":0"

    @property
    def op_name(self):
        """The name without the `:0` output index (`var.op.name` in TF)."""
        return self._op_name

    @property
    def shape(self):
        return self._value.shape

    @property
    def dtype(self):
        return self._value.dtype

    @property
    def trainable(self):
        return self._trainable

    def get_shape(self):
        return self._value.shape

    def numpy(self):
        """A copy of the current value."""
        return self._value.copy()

    def value(self):
        return self._value.copy()

    read_value = value

    def assign(self, value, use_locking=False, name=None, read_value=True):
        """Replaces the value (cast to this variable's dtype; the shape must match).

        Returns the variable, or None with `read_value=False` (as TF's eager
        assign).  `use_locking` and `name` are accepted for TF compatibility.
        """
        new = np.asarray(value)
        if new.shape != self._value.shape:
            try:
                new = np.broadcast_to(new, self._value.shape)
            except ValueError:
                raise ValueError(
                    f"Cannot assign a value of shape {new.shape} to variable {self.name} "
                    f"of shape {self._value.shape}"
                ) from None
        if new.dtype.kind not in "fcbiu":
            raise TypeError(f"value must be numeric to assign to {self.name}, got {new.dtype}")
        self._value = np.array(new, dtype=self._value.dtype, copy=True)
        return self if read_value else None

    def assign_add(self, delta, use_locking=False, name=None, read_value=True):
        return self.assign(self._value + np.asarray(delta, dtype=self._value.dtype),
                           read_value=read_value)

    def assign_sub(self, delta, use_locking=False, name=None, read_value=True):
        return self.assign(self._value - np.asarray(delta, dtype=self._value.dtype),
                           read_value=read_value)

    # -- NumPy interoperability ---------------------------------------------
    def __array__(self, dtype=None, copy=None):
        if dtype is None:
            return self._value.copy()
        return self._value.astype(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(x._value if isinstance(x, Variable) else x for x in inputs)
        if "out" in kwargs:
            if any(isinstance(o, Variable) for o in kwargs["out"]):
                raise TypeError("a fastbn.Variable cannot be an ufunc output; use assign()")
        return getattr(ufunc, method)(*inputs, **kwargs)

    # Identity comparison and hashing, as TF1's Variables: `v in collection` and dict keys
    # work; use np.equal(v, w) for an elementwise comparison.
    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__

    def __bool__(self):
        if self._value.size != 1:
            raise ValueError(
                f"The truth value of variable {self.name} with {self._value.size} "
                "elements is ambiguous"
            )
        return bool(self._value.reshape(()))

    def __float__(self):
        return float(self._value)

    def __len__(self):
        return len(self._value)

    def __getitem__(self, index):
        return np.array(self._value[index])  # a snapshot, as a TF tensor would be

    def __repr__(self):
        return (
            f"<fastbn.Variable '{self.name}' shape={self.shape} dtype={self.dtype.name}, "
            f"numpy={self._value!r}>"
        )


def _to_array(value, argument, dtype=None):
    if isinstance(value, Variable):
        value = value._value
    if dtype is not None:
        dtype = _as_dtype(dtype, "dtype")
    elif isinstance(value, np.ndarray) and not value.dtype.isnative:
        dtype = _as_dtype(value.dtype)
    elif not isinstance(value, np.ndarray) and not hasattr(value, "__array__"):
        # TensorFlow turns Python floats into float32 and ints into int32.
        probe = np.asarray(value)
        if probe.dtype == np.float64:
            dtype = np.dtype(np.float32)
        elif probe.dtype == np.int64:
            dtype = np.dtype(np.int32)
    try:
        array = np.array(value, dtype=dtype, copy=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{argument} must be array-like: {err}") from None
    if array.dtype.kind not in "fcbiu":
        raise TypeError(f"{argument} must be numeric or boolean, got dtype {array.dtype}")
    return array


def _add_to_graph(graph, var, collections, trainable):
    graph._variables[var._op_name] = var
    if collections is None:
        collections = [GraphKeys.GLOBAL_VARIABLES]
    else:
        collections = list(collections)
    if trainable and GraphKeys.TRAINABLE_VARIABLES not in collections:
        collections.append(GraphKeys.TRAINABLE_VARIABLES)
    graph.add_to_collections(collections, var)


# --------------------------------------------------------------------------
# variable scopes


class VariableScope:
    """A variable scope, like `tf.VariableScope`: a name prefix, a reuse mode, and the
    defaults `get_variable` takes inside it for an initializer, a regularizer and (for
    `get_variable` without one) a dtype."""

    __slots__ = ("_name", "_reuse", "_initializer", "_regularizer", "_dtype")

    def __init__(self, reuse, name="", initializer=None, regularizer=None, caching_device=None,
                 partitioner=None, custom_getter=None, name_scope="", dtype=np.float32,
                 use_resource=None, constraint=None):
        if not caching_device is partitioner is custom_getter is constraint is None:
            _refuse_unsupported("VariableScope", caching_device=caching_device,
                                partitioner=partitioner, custom_getter=custom_getter,
                                constraint=constraint)
        self._name = name
        self._reuse = reuse
        self._initializer = initializer
        self._regularizer = regularizer
        self._dtype = _as_dtype(dtype)

    @property
    def name(self):
        return self._name

    @property
    def reuse(self):
        return self._reuse

    @property
    def initializer(self):
        return self._initializer

    @property
    def regularizer(self):
        return self._regularizer

    @property
    def dtype(self):
        return self._dtype

    def set_initializer(self, initializer):
        self._initializer = initializer

    def set_regularizer(self, regularizer):
        self._regularizer = regularizer

    def set_dtype(self, dtype):
        self._dtype = _as_dtype(dtype)

    @property
    def original_name_scope(self):
        return self._name + "/" if self._name else ""

    def reuse_variables(self):
        self._reuse = True

    def global_variables(self):
        return get_default_graph().get_collection(
            GraphKeys.GLOBAL_VARIABLES, _scope_regex(self._name)
        )

    def trainable_variables(self):
        return get_default_graph().get_collection(
            GraphKeys.TRAINABLE_VARIABLES, _scope_regex(self._name)
        )

    def __repr__(self):
        return f"<fastbn.VariableScope name={self._name!r} reuse={self._reuse!r}>"


def _scope_regex(name):
    return (re.escape(name) + "/") if name else None


_ROOT_SCOPE = VariableScope(False)


def get_variable_scope():
    """The current variable scope of the default graph."""
    stack = get_default_graph()._scope_stack
    return stack[-1][0] if stack else _ROOT_SCOPE


def _check_reuse(reuse):
    if reuse is None or reuse is AUTO_REUSE or reuse is True or reuse is False:
        return reuse
    if isinstance(reuse, np.bool_):
        return bool(reuse)
    raise TypeError(f"reuse must be True, False, None or fastbn.AUTO_REUSE, got {reuse!r}")


class variable_scope:
    """A context manager that opens a variable scope, as `tf.variable_scope`.

    Args:
      name_or_scope: a str, a `VariableScope`, or None (then `default_name` is
        used, made unique: `BatchNorm`, `BatchNorm_1`, ...).
      default_name: the name to use when `name_or_scope` is None.
      values: accepted for TF compatibility; unused.
      initializer, regularizer, dtype: defaults for `get_variable` inside the
        scope (and nested ones), used where a call gives none: so, as in TF, a
        scope's regularizer also regularizes the variables batch_norm creates
        without one of their own (its moving statistics included).
      caching_device, partitioner, custom_getter, constraint: not supported
        (ValueError unless None); use_resource, auxiliary_name_scope: accepted,
        no effect.
      reuse: True (variables must exist and are reused), `AUTO_REUSE` (create
        if absent, else reuse), or None/False (inherit the parent's mode).
        Reuse is inherited by nested scopes.

    Entering yields the `VariableScope`.  Leaving a scope named by a string
    forgets which default names were used inside it, as TF does, so that
    re-entering the scope (with `reuse=True`) finds `BatchNorm` again.
    """

    __slots__ = ("_name_or_scope", "_default_name", "_reuse", "_defaults", "_graph",
                 "_saved_counts")

    def __init__(self, name_or_scope, default_name=None, values=None, initializer=None,
                 regularizer=None, caching_device=None, partitioner=None, custom_getter=None,
                 reuse=None, dtype=None, use_resource=None, constraint=None,
                 auxiliary_name_scope=True):
        if not caching_device is partitioner is custom_getter is constraint is None:
            _refuse_unsupported("variable_scope", caching_device=caching_device,
                                partitioner=partitioner, custom_getter=custom_getter,
                                constraint=constraint)
        if regularizer is not None and not callable(regularizer):
            raise TypeError(f"regularizer must be callable, got {type(regularizer).__name__}")
        self._defaults = (initializer, regularizer, None if dtype is None else _as_dtype(dtype))
        if name_or_scope is not None and not isinstance(name_or_scope, (str, VariableScope)):
            raise TypeError(
                "name_or_scope must be a str, a VariableScope or None, got "
                f"{type(name_or_scope).__name__}"
            )
        if name_or_scope is None and default_name is None:
            raise TypeError("If default_name is None then name_or_scope is required")
        if default_name is not None and not isinstance(default_name, str):
            raise TypeError(f"default_name must be a str, got {type(default_name).__name__}")
        self._name_or_scope = name_or_scope
        self._default_name = default_name
        self._reuse = _check_reuse(reuse)

    def __enter__(self):
        graph = self._graph = get_default_graph()
        stack = graph._scope_stack
        parent = stack[-1][0] if stack else _ROOT_SCOPE
        name_or_scope = self._name_or_scope
        reuse = self._reuse
        counts = graph._variable_scope_counts
        self._saved_counts = None
        if isinstance(name_or_scope, VariableScope):
            new_name = name_or_scope.name
            reuse = reuse or name_or_scope.reuse
            self._saved_counts = dict(counts)
            # (A scope object brings its own defaults; a name inherits the parent's.)
            parent = name_or_scope
        else:
            if name_or_scope is None:
                # (AUTO_REUSE too: TF tests the argument's truth.)
                if reuse is True or reuse is AUTO_REUSE:
                    raise ValueError("reuse=True cannot be used without a name_or_scope")
                name_or_scope = _unique_scope_name(counts, parent.name, self._default_name)
            new_name = parent.name + "/" + name_or_scope if parent.name else name_or_scope
            reuse = reuse or parent.reuse
            # Each enclosing scope the name lies under forgets it on exit
            # (TF's close_variable_subscopes), without scanning every name.
            for outer, opened in stack:
                if new_name.startswith(outer.name + "/"):
                    opened.add(new_name)
        counts[new_name] = counts.get(new_name, 0) + 1
        initializer, regularizer, dtype = self._defaults
        scope = VariableScope(reuse if reuse is not None else False, new_name,
                              parent.initializer if initializer is None else initializer,
                              parent.regularizer if regularizer is None else regularizer,
                              dtype=parent.dtype if dtype is None else dtype)
        stack.append((scope, set()))
        return scope

    def __exit__(self, *exc):
        graph = self._graph
        _, opened = graph._scope_stack.pop()
        counts = graph._variable_scope_counts
        if self._saved_counts is not None:
            counts.clear()
            counts.update(self._saved_counts)
        else:
            for name in opened:
                counts[name] = 0
        return False


def _unique_scope_name(counts, parent_name, prefix):
    full = parent_name + "/" + prefix if parent_name else prefix
    if counts.get(full, 0) == 0:
        return prefix
    idx = 1
    while counts.get(f"{full}_{idx}", 0) > 0:
        idx += 1
    return f"{prefix}_{idx}"


# --------------------------------------------------------------------------
# get_variable and the slim helpers


def _normalize_shape(shape):
    if shape is None:
        return None
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must not have negative dimensions, got {shape}")
    return shape


def _initial_value(initializer, shape, dtype, full_name):
    if initializer is None:
        # TF's defaults: glorot_uniform for floats, zeros for integers and bools.
        if dtype.kind == "f":
            initializer = glorot_uniform_initializer()
        elif dtype.kind in "iub":
            return np.zeros(shape, dtype)
        else:
            raise ValueError(f"an initializer is required for variable {full_name} of "
                             f"dtype {dtype}")
    if callable(initializer):
        value = initializer(shape, dtype)
    else:
        value = initializer
    value = np.asarray(value._value if isinstance(value, Variable) else value)
    if value.shape != shape:
        try:
            value = np.broadcast_to(value, shape)
        except ValueError:
            raise ValueError(
                f"the initializer of {full_name} gave shape {value.shape}, expected {shape}"
            ) from None
    if value.dtype.kind not in "fcbiu":
        raise TypeError(f"the initializer of {full_name} gave non-numeric dtype {value.dtype}")
    return np.array(value, dtype=dtype, copy=True)


class RegularizationLoss:
    """An entry of `GraphKeys.REGULARIZATION_LOSSES`: a regularizer bound to a variable.

    `float(loss)` (or `loss.numpy()`) evaluates it on the variable's current value.
    """

    __slots__ = ("name", "variable", "regularizer")

    def __init__(self, name, variable, regularizer):
        self.name = name
        self.variable = variable
        self.regularizer = regularizer

    def numpy(self):
        return np.asarray(self.regularizer(self.variable._value))

    def __float__(self):
        return float(self.numpy())

    def __repr__(self):
        return f"<fastbn.RegularizationLoss '{self.name}' value={float(self):g}>"


def get_variable(name, shape=None, dtype=None, initializer=None, regularizer=None,
                 trainable=None, collections=None, caching_device=None, partitioner=None,
                 validate_shape=True, use_resource=None, custom_getter=None, constraint=None,
                 synchronization=None, aggregation=None):
    """Gets an existing variable of the current scope or creates one, as `tf.get_variable`.

    Creating a variable that exists raises ValueError unless the scope reuses;
    asking a reusing scope (`reuse=True`) for a variable that does not exist
    raises ValueError.  `initializer` is a callable `(shape, dtype) -> array`
    (or an array); `regularizer` a callable `(value) -> scalar or None`, whose
    result is added to `GraphKeys.REGULARIZATION_LOSSES` when the variable is
    created.  Where they (or `dtype`) are None, the scope's defaults apply (see
    `variable_scope`; dtype float32 by default).  `trainable` None means True.
    caching_device, partitioner, custom_getter and constraint are not supported
    (ValueError unless None); validate_shape, use_resource, synchronization and
    aggregation are accepted and have no effect.
    """
    _refuse_unsupported("get_variable", caching_device=caching_device, partitioner=partitioner,
                        custom_getter=custom_getter, constraint=constraint)
    return _get_variable(name, shape, dtype, initializer, regularizer, trainable, collections,
                         False)


def _get_variable(name, shape, dtype, initializer, regularizer, trainable, collections, model):
    if type(name) is not str or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    graph = get_default_graph()
    stack = graph._scope_stack
    scope = stack[-1][0] if stack else _ROOT_SCOPE
    full_name = scope._name + "/" + name if scope._name else name
    if initializer is None:
        initializer = scope._initializer
    if regularizer is None:
        regularizer = scope._regularizer
    if dtype is None:
        dtype = scope._dtype
    existing = graph._variables.get(full_name)
    reuse = scope._reuse
    if existing is not None:
        if not reuse:
            raise ValueError(
                f"Variable {full_name} already exists, disallowed. Did you mean to set "
                "reuse=True or reuse=tf.AUTO_REUSE in VarScope?"
            )
        if shape is not None and existing._value.shape != shape:
            shape = _normalize_shape(shape)
            if existing._value.shape != shape:
                raise ValueError(
                    f"Trying to share variable {full_name}, but specified shape {shape} "
                    f"and found shape {existing.shape}."
                )
        if existing._value.dtype != dtype:
            dtype = _as_dtype(dtype)
            raise ValueError(
                f"Trying to share variable {full_name}, but specified dtype {dtype.name} "
                f"and found dtype {existing.dtype.name}."
            )
        return existing
    if reuse is True:
        raise ValueError(
            f"Variable {full_name} does not exist, or was not created with "
            "tf.get_variable(). Did you mean to set reuse=tf.AUTO_REUSE in VarScope?"
        )
    shape = _normalize_shape(shape)
    dtype = _as_dtype(dtype)
    if shape is None:
        raise ValueError(f"shape is required to create variable {full_name}")
    value = _initial_value(initializer, shape, dtype, full_name)
    trainable = True if trainable is None else bool(trainable)
    var = Variable._create(value, full_name, trainable)
    if model:
        collections = list(collections or ())
        collections += [GraphKeys.GLOBAL_VARIABLES, GraphKeys.MODEL_VARIABLES]
    _add_to_graph(graph, var, collections, trainable)
    if regularizer is not None:
        if not callable(regularizer):
            raise TypeError(f"the regularizer of {full_name} must be callable")
        if regularizer(value) is not None:
            reg_name = getattr(regularizer, "__name__", "regularizer")
            loss = RegularizationLoss(f"{full_name}/Regularizer/{reg_name}:0", var, regularizer)
            graph.add_to_collection(GraphKeys.REGULARIZATION_LOSSES, loss)
    return var


def model_variable(name, shape=None, dtype=np.float32, initializer=None, regularizer=None,
                   trainable=True, collections=None, caching_device=None, device=None,
                   partitioner=None, custom_getter=None, use_resource=None,
                   synchronization=None, aggregation=None):
    """`get_variable` that also adds the variable to `GraphKeys.MODEL_VARIABLES` (slim).

    `device` is accepted and has no effect (the value is a host array); the
    other arguments beyond `get_variable`'s as there.
    """
    if not caching_device is partitioner is custom_getter is None:
        _refuse_unsupported("model_variable", caching_device=caching_device,
                            partitioner=partitioner, custom_getter=custom_getter)
    return _get_variable(name, shape, dtype, initializer, regularizer, trainable, collections,
                         True)


def global_variables(scope=None):
    return get_default_graph().get_collection(GraphKeys.GLOBAL_VARIABLES, scope)


def local_variables(scope=None):
    return get_default_graph().get_collection(GraphKeys.LOCAL_VARIABLES, scope)


def trainable_variables(scope=None):
    return get_default_graph().get_collection(GraphKeys.TRAINABLE_VARIABLES, scope)


def model_variables(scope=None):
    return get_default_graph().get_collection(GraphKeys.MODEL_VARIABLES, scope)


def get_model_variables(scope=None, suffix=None):
    """The model variables matching `scope` and `suffix`, as slim's."""
    return get_variables(scope, suffix, GraphKeys.MODEL_VARIABLES)


def moving_average_variables(scope=None):
    return get_default_graph().get_collection(GraphKeys.MOVING_AVERAGE_VARIABLES, scope)


def get_variables(scope=None, suffix=None, collection=GraphKeys.GLOBAL_VARIABLES):
    """Variables of `collection` whose name matches `scope` and ends with `suffix` (slim)."""
    if isinstance(scope, VariableScope):
        scope = scope.name
    if scope is not None and not isinstance(scope, str):
        raise TypeError(f"scope must be a str, a VariableScope or None, got {scope!r}")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise TypeError(f"suffix must be a str or None, got {suffix!r}")
        if ":" not in suffix:
            suffix += ":"
        scope = (scope or "") + ".*" + suffix
    return get_default_graph().get_collection(collection, scope)


def get_variables_by_suffix(suffix, scope=None):
    return get_variables(scope=scope, suffix=suffix)


def get_variables_by_name(given_name, scope=None):
    """Variables whose base name (the part after the last `/`) is `given_name` (slim)."""
    if not isinstance(given_name, str):
        raise TypeError(f"given_name must be a str, got {given_name!r}")
    suffix = "/" + given_name + ":|^" + given_name + ":"
    return get_variables(scope=scope, suffix=suffix)
