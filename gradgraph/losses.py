"""Per-sample losses (one value per sample, shape [b]) for :func:`gradgraph.capture`."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def per_sample_mse(output: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over each sample's outputs: [b, ...] -> [b]."""
    return (output - target).pow(2).reshape(output.shape[0], -1).sum(1)


def per_sample_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy summed over each sample's positions: logits [b, C] or [b, T, C], target [b] or [b, T]
    -> [b]."""
    if logits.ndim == 2:
        return F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view(target.shape).sum(1)
