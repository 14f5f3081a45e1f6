"""Per-sample losses (one value per sample, shape [b]) for :func:`gradgraph.capture`. Shapes are checked, never
broadcast: a target of another shape would silently pair every output with every target."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .errors import LossShapeError


def per_sample_mse(output: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over each sample's outputs: output and target [b, ...] of the same shape -> [b]."""
    if output.shape != target.shape:
        raise LossShapeError(f"per_sample_mse: output {tuple(output.shape)} and target {tuple(target.shape)} differ; "
                             "they must have the same shape (broadcasting would mix samples), e.g. "
                             f"target.view({', '.join(map(str, output.shape))})")
    return (output - target).pow(2).reshape(output.shape[0], -1).sum(1)


def per_sample_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy summed over each sample's positions: logits [b, C] or [b, T, C], target [b] or [b, T]
    (class indices) -> [b]."""
    if logits.ndim < 2 or tuple(target.shape) != tuple(logits.shape[:-1]):
        raise LossShapeError(f"per_sample_cross_entropy: logits {tuple(logits.shape)} need class-index targets of "
                             f"shape {tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    if logits.ndim == 2:
        return F.cross_entropy(logits, target, reduction="none")
    flat = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none")
    return flat.view(target.shape).reshape(target.shape[0], -1).sum(1)
