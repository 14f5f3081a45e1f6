"""The per-parameter input features of UNF's published learned-optimizer code, on flat parameter vectors.

Every tensor here is *flat*: the optimizer's parameters flattened and concatenated, [P] or [P, C], with a
segment index ``seg`` [P] (the parameter tensor each entry belongs to) and ``counts`` [T] (entries per tensor).

Features of one step (19 channels, the DS input):

* 8 value channels: the parameter, its gradient and the EMA momenta ``m_d = d m_d + (1 - d) grad`` at the
  decays :data:`DECAYS` (no bias correction), each clipped to [-1, 1] and then divided by its root mean square
  over its parameter tensor (clip first, so one outlier cannot shrink a whole tensor to zero);
* 11 time channels ``tanh(t / tau - 1)`` for tau in :data:`TIMESCALES` (t = steps taken before this one),
  the same for every parameter.

Everything is elementwise or a per-tensor reduction, so the features of a permuted model are the permuted
features: the equivariance of the optimizer rests on that.
"""
from __future__ import annotations

import torch
from torch import Tensor

DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
TIMESCALES = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
NUM_FEATURES = 2 + len(DECAYS) + len(TIMESCALES)  # 19


def segments(sizes: list[int], device=None) -> tuple[Tensor, Tensor]:
    """``seg`` [P] (tensor index of every flat entry) and ``counts`` [T] for tensors of ``sizes`` entries."""
    counts = torch.tensor(sizes, dtype=torch.long, device=device)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
    return seg, counts


def update_momenta(momenta: Tensor, grad: Tensor, decays: Tensor) -> None:
    """In place: ``momenta`` [P, D] <- decays * momenta + (1 - decays) * grad[:, None] (``decays`` [D])."""
    momenta.mul_(decays).add_(grad[:, None] * (1 - decays))


def tensor_rms_normalize(x: Tensor, seg: Tensor, counts: Tensor, eps: float = 1e-12) -> Tensor:
    """``x`` [P, C] divided, per parameter tensor and channel, by its root mean square: [P, C]."""
    sq = x.new_zeros(counts.numel(), x.shape[1]).index_add_(0, seg, x * x)
    rms = (sq / counts[:, None].to(x.dtype)).sqrt_().add_(eps)
    return x / rms.index_select(0, seg)


def time_features(step: int, dtype=torch.float32, device=None) -> Tensor:
    """``tanh(step / tau - 1)`` for tau in :data:`TIMESCALES`: [len(TIMESCALES)]."""
    tau = torch.tensor(TIMESCALES, dtype=dtype, device=device)
    return torch.tanh(step / tau - 1)


def unf_features(param: Tensor, grad: Tensor, momenta: Tensor, step: int, seg: Tensor, counts: Tensor) -> Tensor:
    """The 19 DS features of every parameter entry: [P, 19].

    Args:
        param, grad: [P] flat parameters and their (batch) gradient.
        momenta: [P, len(DECAYS)], already updated with ``grad``.
        step: steps taken before this one (0 at the first step).
        seg, counts: see :func:`segments`.
    """
    values = torch.cat([param[:, None], grad[:, None], momenta], 1).clamp_(-1.0, 1.0)
    values = tensor_rms_normalize(values, seg, counts)
    t = time_features(step, values.dtype, values.device).expand(values.shape[0], -1)
    return torch.cat([values, t], 1)
