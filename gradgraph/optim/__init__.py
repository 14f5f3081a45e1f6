"""Stage 7: learned optimizers on gradient graphs (issue #13).

* :class:`LearnedOptimizer` (``optimizer.py``): a ``torch.optim.Optimizer`` whose update is learned;
* :data:`VARIANTS` (``variants.py``): ``sgdm``, ``ds``, ``ds+gradmetanet``;
* :data:`OPT_TASKS` (``tasks.py``): the meta-training and evaluation tasks;
* ``meta.py``: PES meta-training; ``metatrain.py``: ``gradgraph meta-train``;
* :func:`available` (``pretrained.py``): the shipped checkpoints, loaded by ``LearnedOptimizer.from_pretrained``.
"""
from __future__ import annotations

from .optimizer import LearnedOptimizer, RecordError
from .pretrained import available, load_rule
from .variants import VARIANTS, LearnedRule

__all__ = ["LearnedOptimizer", "RecordError", "VARIANTS", "LearnedRule", "available", "load_rule"]
