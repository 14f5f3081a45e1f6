"""Rules for nn.RNN, nn.GRU and nn.LSTM: the recurrence unrolled over time, one ``linear`` op per weight and
time step. Every step uses the same parameters, so this is weight sharing (docs/capture.md): the per-sample
gradient of a weight is the sum over its time steps, and its axes tie the hidden spaces of every step (the
recurrent weight ties the hidden space to itself). The gates are one packed projection cut into its gates by
the ``chunk`` glue; the elementwise gate products tie the gates to the hidden neurons, so the symmetry permutes
the hidden units, every gate block alike.

Supported: batched input ``[b, T, in]`` (``batch_first=True``) or ``[T, b, in]``, any number of layers, with or
without biases, an initial state or none, eval mode (or ``dropout=0``). Refused, naming the module: packed
sequences, unbatched input, ``bidirectional=True``, LSTM ``proj_size > 0``, dropout between layers in training.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ...errors import UnsupportedModuleError
from ..tracer import Label
from .registry import register_rule


def _refuse(ctx, m, what: str):
    raise UnsupportedModuleError(
        f"module '{ctx.path}' ({type(m).__module__}.{type(m).__qualname__}): {what} is not supported. gradgraph "
        "captures nn.RNN/nn.GRU/nn.LSTM unrolled over time (one op per weight and step) for batched tensor "
        "input, unidirectional, without LSTM projections and without dropout in training mode; write the "
        "recurrence as a loop over nn.Linear modules (each call is a use of the same weights) for other variants.")


def _zeros(ctx, b: int, H: int, like: torch.Tensor) -> torch.Tensor:
    """A zero initial state in a hidden space of its own (zeros are permuted into zeros: no constraint); the
    recurrent weight ties it to the hidden units."""
    z = torch.zeros(b, H, dtype=like.dtype, device=like.device)
    ctx.tracer.set_label(z, Label(ctx.tracer.fresh_space(f"{ctx.path}.h0", H, None), (1,), 0))
    return z


def _cell(m, mode: str, gi, gh, h, c):
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ri, zi, ni = gi.chunk(3, 1)
        rh, zh, nh = gh.chunk(3, 1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        n = torch.tanh(ni + r * nh)
        return (1 - z) * n + z * h, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gi + gh), None


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
def recurrent_rule(ctx, m: nn.RNNBase, input, hx=None):
    if isinstance(input, PackedSequence):
        _refuse(ctx, m, "a PackedSequence input")
    if input.dim() != 3:
        _refuse(ctx, m, f"an unbatched input of shape {tuple(input.shape)}")
    if m.bidirectional:
        _refuse(ctx, m, "bidirectional=True")
    if getattr(m, "proj_size", 0):
        _refuse(ctx, m, "proj_size > 0")
    if m.training and m.dropout > 0 and m.num_layers > 1:
        _refuse(ctx, m, "dropout between layers in training mode")
    x = input if m.batch_first else input.transpose(0, 1)  # [b, T, in]
    b, T, H = x.shape[0], x.shape[1], m.hidden_size
    lstm = m.mode == "LSTM"
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    hn, cn = [], []
    for layer in range(m.num_layers):
        w_ih, w_hh = getattr(m, f"weight_ih_l{layer}"), getattr(m, f"weight_hh_l{layer}")
        b_ih, b_hh = (getattr(m, f"bias_ih_l{layer}"), getattr(m, f"bias_hh_l{layer}")) if m.bias else (None, None)
        outs, h, c = [], None if h0 is None else h0[layer], None if c0 is None else c0[layer]
        for t in range(T):
            gi = ctx.linear(x[:, t], w_ih, b_ih, name=f"ih_l{layer}")
            if h is None:
                h = _zeros(ctx, b, H, x)
            if lstm and c is None:
                c = _zeros(ctx, b, H, x)
            gh = ctx.linear(h, w_hh, b_hh, name=f"hh_l{layer}")
            h, c = _cell(m, m.mode, gi, gh, h, c)
            outs.append(h)
        x = torch.stack(outs, 1)
        hn.append(h)
        cn.append(c)
    out = x if m.batch_first else x.transpose(0, 1)
    h_n = torch.stack(hn, 0)
    return (out, (h_n, torch.stack(cn, 0))) if lstm else (out, h_n)
