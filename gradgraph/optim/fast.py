"""The fast per-parameter path of the learned step: the DS features and MLP, chunked, without [P, 19] tensors.

The reference path (:func:`~gradgraph.optim.features.unf_features` then ``rule.mlp``) builds [P, 19] features
and [P, 32] activations: at 1.86M parameters each is 150-240 MB, first-touched (page faults) and streamed
through memory several times per step, which made ``ds`` 8x its FLOP floor. Here the same function is computed
in two passes over chunks of ``CHUNK`` entries, every buffer preallocated once per layout and small enough to
stay in cache:

1. *statistics*: per chunk, update the feature EMAs in place, fill the chunk's value columns (parameter,
   gradient, the 6 momenta clipped to [-1, 1], then the variant's extra columns) and add their squares into
   per-tensor sums (``sum(0)`` when the chunk lies inside one tensor, ``index_add_`` across a boundary);
2. *MLP*: per chunk, refill the columns and run the MLP with the per-tensor RMS *folded into the first
   layer's weights* (x / r) W^T = x (W / r)^T, and the 11 time channels, the same for every entry, folded into
   its bias. A chunk that crosses a tensor boundary divides its rows by their tensor's RMS instead.

The result equals the reference up to float rounding (tested); the equivariance is untouched (per-tensor
reductions, elementwise columns). The time features are never materialised per entry.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .features import DECAYS, time_features

__all__ = ["FlatPlan", "ds_term"]

CHUNK = 4096  # rows per chunk: x [9, 4096] and two [33, 4096] activations, ~1.2 MB, stay in L2
EPS = 1e-12  # as tensor_rms_normalize


class FlatPlan:
    """The chunking of a flat vector of tensors of ``sizes`` entries, and the step's reusable buffers."""

    def __init__(self, sizes: list[int], dtype, device, chunk: int | None = None) -> None:
        chunk = chunk or CHUNK
        self.sizes, self.dtype, self.device = list(sizes), dtype, device
        self.P, self.T = sum(sizes), len(sizes)
        self.counts = torch.tensor(sizes, dtype=torch.long, device=device)
        self.seg = torch.repeat_interleave(torch.arange(self.T, device=device), self.counts)
        ends, e = [], 0
        for n in sizes:
            e += n
            ends.append(e)
        self.chunks: list[tuple[int, int, int]] = []  # (start, end, tensor index or -1 when it crosses tensors)
        s, t = 0, 0
        while s < self.P:
            e = min(s + chunk, self.P)
            while ends[t] <= s:
                t += 1
            self.chunks.append((s, e, t if e <= ends[t] else -1))
            s = e
        self.flat_p = torch.empty(self.P, dtype=dtype, device=device)
        self.flat_g = torch.empty(self.P, dtype=dtype, device=device)
        self.update = torch.empty(self.P, dtype=dtype, device=device)
        self.decays = torch.tensor(DECAYS, dtype=dtype, device=device)[:, None]
        self.one_minus = 1 - self.decays
        self._bufs: dict = {}

    def buf(self, name: str, rows: int, n: int, ones: bool = False) -> Tensor:
        """A cached [rows (+ 1 row of ones), n] buffer."""
        key = (name, rows, n, ones)
        b = self._bufs.get(key)
        if b is None:
            b = self._bufs[key] = torch.empty(rows + ones, n, dtype=self.dtype, device=self.device)
            if ones:
                b[rows] = 1
        return b

    def gather(self, tensors: list[Tensor], out: Tensor) -> Tensor:
        torch.cat([t.reshape(-1) for t in tensors], out=out)
        return out


def _fill(x: Tensor, plan: FlatPlan, s: int, e: int, momenta_t: Tensor, extra: Tensor | None) -> None:
    """Rows of x [K(+1), e - s]: param, grad, the momenta, clipped to [-1, 1], then ``extra`` (unclipped)."""
    nv = 2 + len(DECAYS)
    x[0] = plan.flat_p[s:e]
    x[1] = plan.flat_g[s:e]
    x[2:nv] = momenta_t[:, s:e]
    x[:nv].clamp_(-1.0, 1.0)
    if extra is not None:
        x[nv:nv + extra.shape[1]] = extra[s:e].t()


def ds_term(plan: FlatPlan, mlp: nn.Sequential, momenta_t: Tensor, step: int, extra: Tensor | None,
            out: Tensor) -> Tensor:
    """F [P] into ``out`` for the DS MLP ``mlp`` (Linear/ReLU layers; input = 8 value channels, 11 time
    channels, then ``extra`` [P, X] channels, each value and extra channel divided by its per-tensor RMS).

    Also updates the feature EMAs ``momenta_t`` [6, P] (decays x entries) with ``plan.flat_g``, chunk by chunk
    in pass 1. Activations are kept transposed ([width, chunk], one row of ones appended so that every bias is
    a column of its weight matrix: no bias copies)."""
    nv = 2 + len(DECAYS)
    K = nv + (0 if extra is None else extra.shape[1])
    lins = [m for m in mlp if isinstance(m, nn.Linear)]
    acts = [type(m) for m in mlp if not isinstance(m, nn.Linear)]
    if any(a is not nn.ReLU for a in acts) or len(acts) != len(lins) - 1:
        raise TypeError("ds_term runs Linear/ReLU MLPs only")
    # pass 1: the EMAs, and per-tensor sums of squares of the (clipped) columns
    sums = torch.zeros(plan.T, K, dtype=plan.dtype, device=plan.device)
    for s, e, t in plan.chunks:
        n = e - s
        m = momenta_t[:, s:e]
        m.mul_(plan.decays).addcmul_(plan.flat_g[None, s:e], plan.one_minus)
        x = plan.buf("x", K, n)
        _fill(x, plan, s, e, momenta_t, extra)
        if t >= 0:
            sums[t] += torch.linalg.vecdot(x, x)
        else:
            sums.index_add_(0, plan.seg[s:e], x.square_().t())
    inv = (sums / plan.counts[:, None].to(plan.dtype)).sqrt_().add_(EPS).reciprocal_()  # [T, K]
    # the first layer: value and extra columns scaled per tensor, time columns folded into the bias column
    W1 = lins[0].weight.detach().to(plan.dtype)
    nt = W1.shape[1] - K
    b1 = lins[0].bias.detach().to(plan.dtype) + W1[:, nv:nv + nt] @ time_features(step, plan.dtype, plan.device)
    W1x = torch.cat([W1[:, :nv], W1[:, nv + nt:]], 1)  # [H, K]
    Wt = torch.cat([W1x[None] * inv[:, None, :], b1[None, :, None].expand(plan.T, -1, 1)], 2)  # [T, H, K + 1]
    W1a = torch.cat([W1x, b1[:, None]], 1)
    rest = [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1).to(plan.dtype) for m in lins[1:]]
    for s, e, t in plan.chunks:
        n = e - s
        x = plan.buf("x1", K, n, ones=True)
        _fill(x, plan, s, e, momenta_t, extra)
        if t >= 0:
            w = Wt[t]
        else:
            x[:K].mul_(inv.t().index_select(1, plan.seg[s:e]))
            w = W1a
        for i, w_next in enumerate(rest):
            h = plan.buf(f"h{i % 2}", w.shape[0], n, ones=True)
            torch.mm(w, x, out=h[:-1])
            x = h
            x[:-1].relu_()
            w = w_next
        torch.mm(w, x, out=out[None, s:e])
    return out
