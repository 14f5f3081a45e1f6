"""Rule for nn.Conv1d/nn.Conv2d: one ``conv`` op (non-zero padding modes pad first, a per-channel op)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_rule


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(ctx, m: nn.Conv1d | nn.Conv2d, input):
    padding = m.padding
    if m.padding_mode != "zeros":  # reflect/replicate/circular: pad first (a per-channel op), then a plain conv
        input = F.pad(input, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = 0
    return ctx.conv(input, m.weight, m.bias, m.stride, padding, m.dilation, m.groups)
