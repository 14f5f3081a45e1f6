"""Rule for nn.MultiheadAttention: packed q/k/v projections (``ctx.rows``) and ``out_proj`` as four
``linear`` ops around ``scaled_dot_product_attention``."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedModuleError
from .registry import register_rule


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
