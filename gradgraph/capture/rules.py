"""Capture rules: how a module's forward maps onto gradgraph's parameterized ops.

A rule replaces ``module.forward`` while a capture runs. It receives the capture session as ``ctx`` and
computes the module's output with ``ctx.linear``, ``ctx.conv``, ``ctx.diag`` or ``ctx.embedding`` (ordinary
torch code may sit in between; the tracer follows it). Register one for your own module type::

    @gradgraph.register_rule(MyPackedLinear)
    def my_rule(ctx, module, x):
        h = ctx.linear(x, ctx.rows(module.weight, 0, module.d), name="first")
        return ctx.linear(h, ctx.rows(module.weight, module.d, 2 * module.d), name="second")

A subclass of a registered type uses its parent's rule only if it does not override ``forward``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SampleMixingError, UnsupportedModuleError

__all__ = ["register_rule", "find_rule", "supported_modules"]

_RULES: dict[type, Callable] = {}


def register_rule(*module_types: type) -> Callable:
    """Decorator registering ``fn(ctx, module, *args, **kwargs) -> output`` as the capture rule of
    ``module_types`` (replacing an existing rule for the same type)."""
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise TypeError("register_rule takes one or more nn.Module subclasses, e.g. @register_rule(nn.Linear)")

    def decorate(fn: Callable) -> Callable:
        for t in module_types:
            _RULES[t] = fn
        return fn

    return decorate


def find_rule(module: nn.Module) -> Callable | None:
    """The rule for ``module``'s type, or for a base type whose ``forward`` it does not override."""
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    for base in cls.__mro__[1:]:
        if base in _RULES:
            return _RULES[base] if cls.forward is base.forward else None
    return None


def supported_modules() -> list[str]:
    return sorted(t.__name__ for t in _RULES)


@register_rule(nn.Linear)
def linear_rule(ctx, m: nn.Linear, input):
    return ctx.linear(input, m.weight, m.bias)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(ctx, m: nn.Conv1d | nn.Conv2d, input):
    padding = m.padding
    if m.padding_mode != "zeros":  # reflect/replicate/circular: pad first (a per-channel op), then a plain conv
        input = F.pad(input, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = 0
    return ctx.conv(input, m.weight, m.bias, m.stride, padding, m.dilation, m.groups)


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


@register_rule(nn.Embedding)
def embedding_rule(ctx, m: nn.Embedding, input):
    if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        raise UnsupportedModuleError(
            f"module '{ctx.path}' (Embedding) uses max_norm, scale_grad_by_freq or sparse gradients; gradgraph "
            "supports plain lookups (max_norm=None, scale_grad_by_freq=False, sparse=False).")
    return ctx.embedding(input, m.weight, m.padding_idx)


def _float_mask(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@register_rule(nn.MultiheadAttention)
def multihead_attention_rule(ctx, m: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                             need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """Self- or cross-attention as four linear ops (q, k, v from the packed ``in_proj_weight`` rows, and
    ``out_proj``) around ``scaled_dot_product_attention``, which the tracer reads as the head structure."""
    if not m.batch_first or query.dim() != 3:
        raise UnsupportedModuleError(
            f"module '{ctx.path}' (MultiheadAttention) needs batch_first=True and batched [b, T, E] inputs: "
            "gradgraph keeps the batch as the first axis of every op.")
    if m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedModuleError(f"module '{ctx.path}' (MultiheadAttention) uses add_bias_kv or "
                                     "add_zero_attn, which gradgraph does not support")
    E, H = m.embed_dim, m.num_heads
    dh = E // H
    if m._qkv_same_embed_dim:
        wq, wk, wv = (ctx.rows(m.in_proj_weight, i * E, (i + 1) * E) for i in range(3))
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = (ctx.rows(m.in_proj_bias, i * E, (i + 1) * E) for i in range(3))
    q = ctx.linear(query, wq, bq, name="q")
    k = ctx.linear(key, wk, bk, name="k")
    v = ctx.linear(value, wv, bv, name="v")
    B, T, S = query.shape[0], query.shape[1], key.shape[1]
    q = q.view(B, T, H, dh).transpose(1, 2)
    k = k.view(B, S, H, dh).transpose(1, 2)
    v = v.view(B, S, H, dh).transpose(1, 2)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention does)")
    use_causal = is_causal and key_padding_mask is None and not need_weights
    mask = None
    if not use_causal:
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(1, 1, T, S) if mask.dim() == 2 else mask.view(B, H, T, S)
        kpm = _float_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
    dropout = m.dropout if m.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=use_causal)
    y = y.transpose(1, 2).reshape(B, T, E)
    out = ctx.linear(y, m.out_proj.weight, m.out_proj.bias, name="out_proj")
    if not need_weights:
        return out, None
    # head-averaged weights are invariant under head and within-head permutations: computing them outside
    # the tracer keeps those symmetries; per-head weights are traced (and fix the q/k spaces)
    with ctx.tracer.suspend() if average_attn_weights else contextlib.nullcontext():
        scores = q @ k.transpose(-2, -1) / math.sqrt(dh)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        if average_attn_weights:
            weights = weights.mean(1)
    return out, weights
