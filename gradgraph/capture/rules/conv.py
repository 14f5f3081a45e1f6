"""Rule for nn.Conv1d/nn.Conv2d: one ``conv`` op (non-zero padding modes pad first, a per-channel op); a grouped
or depthwise conv is one ``conv`` op per group."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_rule


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(ctx, m: nn.Conv1d | nn.Conv2d, input):
    padding = m.padding
    if m.padding_mode != "zeros":  # reflect/replicate/circular: pad first (a per-channel op), then a plain conv
        input = F.pad(input, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = 0
    G = m.groups
    if G == 1:
        return ctx.conv(input, m.weight, m.bias, m.stride, padding, m.dilation)
    # grouped/depthwise: one conv per group on its block of channels (rows of the weight), joined along the
    # channels; the glue permutes the channels group by group (a group's channels among themselves)
    o = m.out_channels // G
    outs = [ctx.conv(x, ctx.rows(m.weight, g * o, (g + 1) * o), None if m.bias is None else
                     ctx.rows(m.bias, g * o, (g + 1) * o), m.stride, padding, m.dilation, name=f"group{g}")
            for g, x in enumerate(torch.chunk(input, G, 1))]
    return torch.cat(outs, 1)
