"""gradgraph: gradient graphs and equivariant metanetworks for learning on gradients.

    graph = gradgraph.capture(model, x, y, loss_fn)   # neurons as nodes, per-sample (a, g) as features
    graph.per_sample_grads()                          # {name: [b, *shape]}, rebuilt from the graph
    s = gradgraph.random_symmetry(model)              # a neuron permutation that preserves the function

The public names are loaded when first used (PEP 562), so ``import gradgraph`` and ``gradgraph --help`` do
not import torch; ``gradgraph.errors`` is loaded at once (plain Python).
"""
from __future__ import annotations

import importlib
import sys
import types

from .errors import (
    FileFormatError,
    GradGraphError,
    LossShapeError,
    NonFiniteGradientError,
    SampleMixingError,
    SetSizeMismatchError,
    StructureMismatchError,
    UnknownNameError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

_LAZY = {
    "capture": "api", "GradientRecorder": "api", "model_spec": "api", "random_symmetry": "api", "coverage": "api",
    "register_rule": "capture", "register_glue": "capture", "supported_modules": "capture",
    "GradientGraph": "graph", "Symmetry": "graph", "apply_symmetry": "graph",
}

__all__ = [*_LAZY, "GradGraphError", "UnsupportedModuleError", "SampleMixingError", "NonFiniteGradientError",
           "LossShapeError", "SetSizeMismatchError", "StructureMismatchError", "UnknownNameError",
           "FileFormatError"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # cached: later lookups do not come here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``gradgraph.capture`` names the function (the public API) and also a subpackage (stage 1). Importing the
    subpackage makes Python set the package attribute ``capture`` to it; this keeps that one attribute for the
    function (the subpackage stays importable as ``gradgraph.capture.<module>`` / ``from gradgraph.capture
    import ...``, which go through ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name == "capture" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
