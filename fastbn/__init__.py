"""fastbn: TensorFlow 1's `tf.contrib.layers.batch_norm` on NumPy arrays, without TensorFlow.

The same arguments, numbers, variables and collections as
`tf_slim.layers.batch_norm`, computed eagerly by fast kernels.  See
`fastbn.batch_norm`, `fastbn.nn` and `fastbn.backends`.
"""

__version__ = "0.1.0"

from . import backends, initializers, nn, regularizers
from ._graph import (
    Graph,
    GraphKeys,
    add_to_collection,
    add_to_collections,
    get_collection,
    get_collection_ref,
    get_default_graph,
    reset_default_graph,
)
from ._ops import Operation, UpdateOpsWarning, apply_updates, run
from ._tape import GradientTape, UnconnectedGradients
from ._variables import (
    AUTO_REUSE,
    RegularizationLoss,
    Variable,
    VariableScope,
    get_model_variables,
    get_variable,
    get_variable_scope,
    get_variables,
    get_variables_by_name,
    get_variables_by_suffix,
    global_variables,
    local_variables,
    model_variable,
    model_variables,
    moving_average_variables,
    trainable_variables,
    variable_scope,
)
from .arg_scope import add_arg_scope, arg_scope
from .initializers import (constant_initializer, glorot_normal_initializer,
                           glorot_uniform_initializer, ones_initializer,
                           random_normal_initializer, random_uniform_initializer,
                           truncated_normal_initializer, variance_scaling_initializer,
                           zeros_initializer)
from .layers import batch_norm
from .regularizers import l1_regularizer, l2_regularizer


def get_regularization_losses(scope=None):
    """The current value (a float) of each `GraphKeys.REGULARIZATION_LOSSES` entry.

    Entries added by fastbn are evaluated on their variables' current
    values; other entries are converted with `float()`.
    """
    return [float(loss) for loss in get_collection(GraphKeys.REGULARIZATION_LOSSES, scope)]


__all__ = [
    "AUTO_REUSE",
    "GradientTape",
    "Graph",
    "GraphKeys",
    "Operation",
    "RegularizationLoss",
    "UnconnectedGradients",
    "UpdateOpsWarning",
    "Variable",
    "VariableScope",
    "__version__",
    "add_arg_scope",
    "add_to_collection",
    "add_to_collections",
    "apply_updates",
    "arg_scope",
    "backends",
    "batch_norm",
    "constant_initializer",
    "get_collection",
    "get_collection_ref",
    "get_default_graph",
    "get_model_variables",
    "get_regularization_losses",
    "get_variable",
    "get_variable_scope",
    "get_variables",
    "get_variables_by_name",
    "get_variables_by_suffix",
    "global_variables",
    "initializers",
    "l1_regularizer",
    "l2_regularizer",
    "local_variables",
    "model_variable",
    "model_variables",
    "moving_average_variables",
    "nn",
    "ones_initializer",
    "regularizers",
    "reset_default_graph",
    "run",
    "trainable_variables",
    "variable_scope",
    "zeros_initializer",
    "random_normal_initializer",
    "truncated_normal_initializer",
    "random_uniform_initializer",
    "variance_scaling_initializer",
    "glorot_uniform_initializer",
    "glorot_normal_initializer",
]
