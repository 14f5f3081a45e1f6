"""Stage 6: tasks on gradient graphs. A task is a config dataclass (in :mod:`gradgraph.tasks.configs`, no torch)
that names a :class:`gradgraph.train.Task` class; ``TASKS`` maps task names to configs, loaded when used, and
``gradgraph train <name>`` is generated from the config's fields.

Register your own: ``TASKS.register("mytask", "mypackage.tasks:MyConfig", help="...")``."""
from __future__ import annotations

import importlib

from ..registry import Registry

TASKS = Registry("task")
TASKS.register("curvature", "gradgraph.tasks.configs:CurvatureConfig",
               help="predict SIREN Fisher diagonals from 128 gradients (paper Sec. 5.1)")

_LAZY = {"CurvatureConfig": "configs", "CURVATURE_MODELS": "configs", "train_curvature": "curvature",
         "build_model": "curvature", "CurvatureTask": "curvature"}

__all__ = ["TASKS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
