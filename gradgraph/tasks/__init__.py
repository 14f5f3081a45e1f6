"""Stage 6: tasks on gradient graphs. A task is a config dataclass (in :mod:`gradgraph.tasks.configs`, no torch)
that names a :class:`gradgraph.train.Task` class; ``TASKS`` maps task names to configs, loaded when used, and
``gradgraph train <name>`` is generated from the config's fields.

Register your own with ``TASKS.register("mytask", "mypackage.configs:MyConfig", help="...")``, or, for the
command line, with an entry point in your package's pyproject.toml::

    [project.entry-points."gradgraph.tasks"]
    mytask = "mypackage.configs:MyConfig"
"""
from __future__ import annotations

import importlib
import importlib.metadata

from ..registry import Registry

TASKS = Registry("task")
TASKS.register("curvature", "gradgraph.tasks.configs:CurvatureConfig",
               help="predict SIREN Fisher diagonals from 128 gradients (paper Sec. 5.1)")
TASKS.register("curvature-trace", "gradgraph.tasks.configs:TraceConfig",
               help="predict the Fisher trace of a 1M-parameter SIREN from 32 gradients (paper's scaled variant)")
TASKS.register("editing", "gradgraph.tasks.configs:EditingConfig",
               help="edit digit INRs into their dilation: predict a weight change (paper Sec. 5.3)")
# tasks of other installed packages: an entry point "name = package.module:Config" in group "gradgraph.tasks"
for _ep in importlib.metadata.entry_points(group="gradgraph.tasks"):
    if _ep.name not in TASKS:
        TASKS.register(_ep.name, _ep.value)

_LAZY = {"CurvatureConfig": "configs", "CURVATURE_MODELS": "configs", "train_curvature": "curvature",
         "build_model": "curvature", "CurvatureTask": "curvature",
         "TraceConfig": "configs", "TRACE_MODELS": "configs", "TraceTask": "trace", "train_trace": "trace",
         "EditingConfig": "configs", "EDITING_MODELS": "configs", "EditingTask": "editing",
         "train_editing": "editing"}

__all__ = ["TASKS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
