"""Stage 5: gradient-based training of metanetworks, one loop for every task (see :mod:`gradgraph.train.loop`).

``gradgraph.train.config`` imports no torch (the command line reads the config dataclasses without it); the rest
is loaded when first used."""
from __future__ import annotations

import importlib

_LAZY = {"Task": "loop", "train": "loop", "epoch_order": "loop", "progress_bar": "loop", "RunDir": "checkpoint",
         "TrainConfig": "config", "option": "config"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
