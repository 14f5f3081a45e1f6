"""Rule for nn.Embedding: one ``embedding`` op (vocabulary entries are input nodes)."""
from __future__ import annotations

from torch import nn

from ...errors import UnsupportedModuleError
from .registry import register_rule


@register_rule(nn.Embedding)
def embedding_rule(ctx, m: nn.Embedding, input):
    if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        raise UnsupportedModuleError(
            f"module '{ctx.path}' (Embedding) uses max_norm, scale_grad_by_freq or sparse gradients; gradgraph "
            "supports plain lookups (max_norm=None, scale_grad_by_freq=False, sparse=False).")
    return ctx.embedding(input, m.weight, m.padding_idx)
