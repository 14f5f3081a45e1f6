"""Shipped learned-optimizer checkpoints: small files inside the package, nothing downloaded.

Each checkpoint is a ``rule.pt`` written by ``gradgraph meta-train`` (kind ``"lopt-rule"``: the variant, its
constructor arguments, its meta-parameters, the task it was meta-trained on, the meta-steps, the CPU time and
the exact command), copied into ``gradgraph/optim/pretrained/NAME.pt``. The checkpoint meta-trained on
``digits-mlp`` for a variant is named after the variant (``"ds"``, ``"ds+gradmetanet"``); its update rule
works on any model the variant can step (any width and depth; for graph variants any model gradgraph
captures), since every input is per-parameter or per-neuron.

    from gradgraph.optim import LearnedOptimizer, available
    available()                                   # ['ds', 'sgdm', ...]
    opt = LearnedOptimizer.from_pretrained("ds", model)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnknownNameError
from ..io import load_file
from .variants import VARIANTS, LearnedRule

__all__ = ["PRETRAINED_DIR", "available", "checkpoint_info", "load_rule", "rule_from_payload"]

PRETRAINED_DIR = Path(__file__).with_name("pretrained")
KIND = "lopt-rule"


def available() -> list[str]:
    """The names of the shipped checkpoints, sorted."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))


def _path(name: str) -> Path:
    if name not in available():
        raise UnknownNameError(f"no shipped learned-optimizer checkpoint named {name!r}; shipped: {available()} "
                               f"(a run folder of `gradgraph meta-train` holds a rule.pt: load it with "
                               f"gradgraph.optim.pretrained.load_rule(path))")
    return PRETRAINED_DIR / f"{name}.pt"


def checkpoint_info(name_or_path: str | Path) -> dict:
    """What a checkpoint records besides its weights (variant, task, meta-steps, CPU seconds, command, ...) and
    its learned step sizes ``alpha``, ``mu``, ``beta`` as numbers."""
    payload = _load(name_or_path)
    rule = rule_from_payload(payload)
    with torch.no_grad():
        steps = {"alpha": float(rule.alpha), "mu": float(rule.mu), "beta": float(rule.beta)}
    return {**{k: v for k, v in payload.items() if k not in ("state", "hyper")}, **steps}


def _load(name_or_path: str | Path) -> dict:
    path = Path(name_or_path) if str(name_or_path).endswith(".pt") else _path(str(name_or_path))
    return load_file(path, KIND, remedy="reinstall gradgraph, or rerun the command that made it")


def rule_from_payload(payload: dict) -> LearnedRule:
    """The :class:`LearnedRule` a ``lopt-rule`` payload describes, its meta-parameters loaded."""
    rule = VARIANTS.build(payload["variant"], **payload["hyper"])
    rule.load_state_dict(payload["state"])
    return rule


def load_rule(name_or_path: str | Path) -> LearnedRule:
    """A shipped checkpoint by name (see :func:`available`), or any ``rule.pt`` by path."""
    return rule_from_payload(_load(name_or_path))
