"""Rules for LayerNorm, RMSNorm, GroupNorm and eval-mode BatchNorm: the normalization is glue (computed outside
the tracer), the affine part a ``diag`` op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SampleMixingError, UnsupportedModuleError
from .registry import register_rule


@register_rule(nn.LayerNorm)
def layer_norm_rule(ctx, m: nn.LayerNorm, input):
    if not m.elementwise_affine:
        return F.layer_norm(input, m.normalized_shape, None, None, m.eps)
    if len(m.normalized_shape) != 1:
        raise UnsupportedModuleError(
            f"module '{ctx.path}' (LayerNorm) normalizes over {tuple(m.normalized_shape)}; gradgraph supports "
            "LayerNorm over the last dimension only (normalized_shape=(d,)).")
    with ctx.tracer.suspend():
        x_hat = F.layer_norm(input, m.normalized_shape, None, None, m.eps)
    return ctx.diag(input, x_hat, m.weight, m.bias, axis=-1)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def batch_norm_rule(ctx, m: nn.modules.batchnorm._BatchNorm, input):
    if m.training or m.running_mean is None:
        raise SampleMixingError(
            f"module '{ctx.path}' ({type(m).__name__}) normalizes with the statistics of the current batch "
            "(training mode or track_running_stats=False), so every sample's output depends on the other samples "
            "and per-sample gradients are not defined. Call model.eval() first (running statistics are then "
            "fixed per channel), or use LayerNorm/GroupNorm.")
    with ctx.tracer.suspend():
        x_hat = F.batch_norm(input, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    if not m.affine:
        raise UnsupportedModuleError(f"module '{ctx.path}' ({type(m).__name__}) has affine=False; gradgraph "
                                     "supports eval-mode BatchNorm with affine parameters")
    return ctx.diag(input, x_hat, m.weight, m.bias, axis=1, buffers=(m.running_mean, m.running_var))


@register_rule(nn.GroupNorm)
def group_norm_rule(ctx, m: nn.GroupNorm, input):
    """The normalization per group is glue; the per-channel affine a ``diag`` op. With 1 < groups < channels a
    permutation that moves a channel to another group changes its statistics: the space is cut into the
    groups (channels permute within their group)."""
    G, C = m.num_groups, m.num_channels
    if not m.affine:
        return F.group_norm(input, G, None, None, m.eps)  # no parameters: glue (spaces fixed, safe)
    if 1 < G < C:
        input = torch.cat(torch.chunk(input, G, 1), 1)  # the same values, its channel space cut into the groups
    with ctx.tracer.suspend():
        x_hat = F.group_norm(input, G, None, None, m.eps)
    return ctx.diag(input, x_hat, m.weight, m.bias, axis=1)


@register_rule(*([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
def rms_norm_rule(ctx, m, input):
    if len(m.normalized_shape) != 1:
        raise UnsupportedModuleError(
            f"module '{ctx.path}' (RMSNorm) normalizes over {tuple(m.normalized_shape)}; gradgraph supports "
            "RMSNorm over the last dimension only (normalized_shape=(d,)).")
    if m.weight is None:
        return F.rms_norm(input, m.normalized_shape, None, m.eps)
    with ctx.tracer.suspend():
        x_hat = F.rms_norm(input, m.normalized_shape, None, m.eps)
    return ctx.diag(input, x_hat, m.weight, axis=-1)
