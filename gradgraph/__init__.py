"""gradgraph: gradient graphs and equivariant metanetworks for learning on gradients.

    graph = gradgraph.capture(model, x, y, loss_fn)   # neurons as nodes, per-sample (a, g) as features
    graph.per_sample_grads()                          # {name: [b, *shape]}, rebuilt from the graph
    s = gradgraph.random_symmetry(model)              # a neuron permutation that preserves the function
"""
from .api import GradientRecorder, capture, random_symmetry
from .capture import register_glue, register_rule, supported_modules
from .errors import (
                     GradGraphError,
                     LossShapeError,
                     NonFiniteGradientError,
                     SampleMixingError,
                     SetSizeMismatchError,
                     StructureMismatchError,
                     UnsupportedModuleError,
)
from .graph import GradientGraph, Symmetry, apply_symmetry

__version__ = "0.1.0"

__all__ = ["capture", "GradientRecorder", "GradientGraph", "register_rule", "register_glue", "supported_modules",
           "random_symmetry", "apply_symmetry", "Symmetry", "GradGraphError", "UnsupportedModuleError",
           "SampleMixingError", "NonFiniteGradientError", "LossShapeError", "SetSizeMismatchError",
           "StructureMismatchError"]
