"""Rule for nn.Linear: one ``linear`` op."""
from __future__ import annotations

from torch import nn

from .registry import register_rule


@register_rule(nn.Linear)
def linear_rule(ctx, m: nn.Linear, input):
    return ctx.linear(input, m.weight, m.bias)
