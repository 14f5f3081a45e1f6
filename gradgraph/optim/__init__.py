"""Stage 7: learned optimizers on gradient graphs (issue #13).

* :class:`LearnedOptimizer` (``optimizer.py``): a ``torch.optim.Optimizer`` whose update is learned;
* :data:`VARIANTS` (``variants.py``): ``sgdm``, ``ds``, ``ds+gradmetanet``;
* :data:`OPT_TASKS` (``tasks.py``): the meta-training and evaluation tasks;
* ``meta.py``: PES meta-training.
"""
from __future__ import annotations

from .optimizer import LearnedOptimizer, RecordError
from .variants import VARIANTS, LearnedRule

__all__ = ["LearnedOptimizer", "RecordError", "VARIANTS", "LearnedRule"]
