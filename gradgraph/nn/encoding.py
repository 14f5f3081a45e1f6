"""Input encoding: scale normalization of the (a, g) features and positional encodings of the nodes."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layout import BatchLayout


def sinusoidal(x: Tensor, dim: int) -> Tensor:
    """Sinusoidal encoding of integer positions: [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / max(half, 1))
    ang = x.to(torch.float32)[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1)


def raw_monomials(entry_x: Tensor, entry_mask: Tensor) -> Tensor:
    """Unnormalized products a heads needs to be exact for gradients and Fisher diagonals:
    [a, g, a^2, g^2, a*g, has_a, has_g], [E, 7]."""
    a, g = entry_x[:, 0:1], entry_x[:, 1:2]
    return torch.cat([a, g, a * a, g * g, a * g, entry_mask.to(entry_x.dtype)], -1)


def scale_normalize(graph, layout: BatchLayout, by: str = "layer") -> tuple[Tensor, Tensor]:
    """Per (graph, layer) and channel, divide a and g by their root mean square over the layer's entries
    (``by="space"``: over the neuron space's entries, which for a transformer's residual stream pools layers at
    every depth; per layer is finer and the default). Returns the normalized features [E, 2] and the log of the
    scales [E, 2] (0 where a channel is absent), so magnitudes stay visible to the network without dominating
    it. Invariant to sample order and equivariant to neuron permutations (one scale per layer or space)."""
    rms = layout.layer_scales(graph.entry_x, graph.entry_mask, by=by)
    return graph.entry_x / rms, torch.log(rms) * graph.entry_mask.to(rms.dtype)


class NodeEncoding(nn.Module):
    """Per-node identifiers (the paper's PE): a sinusoidal layer identifier for every node, a sinusoidal
    neuron identifier for non-permutable nodes only (model inputs and outputs keep their position), and a
    learned role embedding (input / hidden / output). Attention-head membership is not encoded as an absolute
    index, because heads are permutable: it would break equivariance. Output: [N, 3 * dim]."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.role = nn.Embedding(3, dim)

    def forward(self, graph) -> Tensor:
        layer = sinusoidal(graph.node_depth, self.dim)
        neuron = sinusoidal(graph.node_pos, self.dim) * (~graph.node_permutable).unsqueeze(-1)
        dtype = self.role.weight.dtype
        return torch.cat([layer.to(dtype), neuron.to(dtype), self.role(graph.node_role)], -1)


class EntryEncoder(nn.Module):
    """Embed every entry (node x set element): normalized (a, g), which of them exist, the layer's log scales,
    signed-log magnitudes, and the node's positional encoding -> [E, channels].

    ``standardize_scales=True`` adds the layer's log scales centred and divided by their spread across the
    training graphs (:class:`LogScaleStandardizer`, per layer depth): across models of one architecture a
    layer's log RMS varies by a few hundredths, invisible next to its absolute value, yet that variation is
    what a graph-level target such as tr(F) depends on."""

    def __init__(self, channels: int, pe_dim: int = 16, norm_by: str = "layer",
                 standardize_scales: bool = False) -> None:
        super().__init__()
        self.norm_by = norm_by
        self.pe = NodeEncoding(pe_dim)
        self.standardizer = LogScaleStandardizer() if standardize_scales else None
        self.lin = nn.Linear(2 + 2 + 2 + 2 + (2 if standardize_scales else 0), channels)
        self.lin_pe = nn.Linear(3 * pe_dim, channels, bias=False)  # applied per node, then gathered

    def forward(self, graph, layout: BatchLayout) -> Tensor:
        x_norm, log_scale = scale_normalize(graph, layout, self.norm_by)
        dtype = self.lin.weight.dtype
        slog = torch.sign(graph.entry_x) * torch.log1p(graph.entry_x.abs())
        parts = [x_norm, graph.entry_mask.to(x_norm.dtype), log_scale / 10, slog / 10]
        if self.standardizer is not None:
            parts.append(self.standardizer(log_scale, graph.node_depth.index_select(0, graph.entry_node),
                                           graph.entry_mask))
        feats = torch.cat(parts, -1).to(dtype)
        return self.lin(feats) + self.lin_pe(self.pe(graph)).index_select(0, graph.entry_node)


class CalibratedStatistics(nn.Module):
    """A module holding dataset-level input statistics: accumulated in training mode until frozen, and set
    once from training data by :func:`calibrate_scales` (``reset`` starts a plain cumulative average, then
    the statistics are frozen). Subclasses keep their statistics in float buffers listed by ``statistics``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @property
    def observing(self) -> bool:
        """Whether the statistics would be updated by a forward (training mode, not frozen)."""
        return self.training and not bool(self.frozen)

    def statistics(self) -> list[Tensor]:
        """The float buffers :func:`sync_scales` averages over ranks."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the statistics and unfreeze, for a calibration pass (a plain cumulative average)."""
        self.batches.zero_()
        self.frozen.fill_(False)


class LogScaleStandardizer(CalibratedStatistics):
    """Standardize per-layer log scales [E, 2] (see :func:`scale_normalize`) by their mean and standard
    deviation over the training graphs, per layer depth (``node_depth``, clamped to ``slots - 1``) and channel
    (a, g): the output is (log_scale - mean) / max(std, ``min_std``), clipped to +-``clip``, 0 where the
    channel is absent or the depth was never observed. One constant pair per depth is the same for every
    neuron of a layer, so the output stays invariant to sample order and equivariant to neuron permutations."""

    def __init__(self, slots: int = 64, channels: int = 2, min_std: float = 1e-3, clip: float = 10.0) -> None:
        super().__init__()
        self.slots, self.min_std, self.clip = slots, min_std, clip
        for name in ("count", "total", "total_sq"):
            self.register_buffer(name, torch.zeros(slots, channels, dtype=torch.float64))

    def statistics(self) -> list[Tensor]:
        return [self.count, self.total, self.total_sq]

    def reset(self) -> None:
        super().reset()
        for t in self.statistics():
            t.zero_()

    def forward(self, log_scale: Tensor, depth: Tensor, mask: Tensor) -> Tensor:
        """log_scale [E, c], depth [E] (each entry's layer depth), mask [E, c] -> [E, c]."""
        slot = depth.clamp_max(self.slots - 1)
        m = mask.to(log_scale.dtype)
        if self.observing:
            with torch.no_grad():
                x, w = log_scale.detach().double(), m.double()
                self.count.index_add_(0, slot, w)
                self.total.index_add_(0, slot, x * w)
                self.total_sq.index_add_(0, slot, x * x * w)
                self.batches += 1
        n = self.count.clamp_min(1)
        mean = self.total / n
        std = (self.total_sq / n - mean * mean).clamp_min(0).sqrt().clamp_min(self.min_std)
        seen = (self.count > 0).to(log_scale.dtype)
        z = (log_scale - mean.to(log_scale.dtype)[slot]) / std.to(log_scale.dtype)[slot]
        return z.clamp(-self.clip, self.clip) * m * seen[slot]


class RunningScale(CalibratedStatistics):
    """Divide features by their running root mean square (a dataset-level constant per column), as
    BatchNorm does without centering: statistics are accumulated in training mode (cumulative average over
    the first ``warmup`` batches, then an exponential average) and frozen in eval mode. One constant per
    column keeps relative magnitudes (so exact products stay representable) while bringing raw gradient
    scales, which can be 1e6 or more, to O(1). As with BatchNorm, a training-mode output depends on the
    other graphs of the batch; evaluation and equivariance checks use ``eval()``. ``calibrate_scales``
    computes the statistics once from training data and freezes them (recommended: heavy-tailed gradient
    statistics make a running estimate noisy).

    Under torch.distributed the statistics are local to each process: nothing is synchronized inside
    ``forward``. Calibrate every rank on the same batches (identical statistics, no communication), or call
    :func:`sync_scales` explicitly after calibrating each rank on its own shard."""

    def __init__(self, num_features: int, momentum: float = 0.01, warmup: int = 100, eps: float = 1e-12) -> None:
        super().__init__()
        self.momentum, self.warmup, self.eps = momentum, warmup, eps
        self.register_buffer("mean_square", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        self.observe(x)
        return x / self.scale(x)

    def statistics(self) -> list[Tensor]:
        return [self.mean_square]

    def reset(self) -> None:
        super().reset()
        self.mean_square.fill_(1.0)
        self.warmup = 1 << 30  # a plain cumulative average over the calibration batches

    def observe(self, x: Tensor) -> None:
        """In training mode, fold the mean square of ``x`` [N, C] (this batch) into the running statistics."""
        if not self.observing:
            return
        with torch.no_grad():
            self._fold(self._batch_mean_square(x.detach()))

    def observe_sums(self, sum_squares: Tensor, count: int) -> None:
        """:meth:`observe` from the per-column sum of squares of a batch's ``count`` rows (for callers that
        never build the [N, C] tensor, see ``MomentTerms``)."""
        if not self.observing:
            return
        with torch.no_grad():
            self._fold(sum_squares.detach().to(self.mean_square.dtype) / max(count, 1))

    def _fold(self, ms: Tensor) -> None:
        n = int(self.batches)
        w = 1.0 / (n + 1) if n < self.warmup else self.momentum
        self.mean_square.mul_(1 - w).add_(w * ms) if n else self.mean_square.copy_(ms)
        self.batches += 1

    def scale(self, like: Tensor) -> Tensor:
        """The running root mean square per column, [C], in ``like``'s dtype."""
        return (self.mean_square.to(like.dtype) + self.eps).sqrt()

    def _batch_mean_square(self, x: Tensor) -> Tensor:
        """Mean square per column over this batch (this process only: no collective runs inside forward, so
        ranks that run different numbers of forwards cannot deadlock; see :func:`sync_scales`)."""
        sums = torch.cat([x.pow(2).sum(0), x.new_tensor([x.shape[0]])]).to(self.mean_square.dtype)
        return sums[:-1] / sums[-1].clamp_min(1)


@torch.no_grad()
def calibrate_scales(model: nn.Module, batches) -> int:
    """Data-dependent initialization of every ``CalibratedStatistics`` in ``model`` (``RunningScale``,
    ``LogScaleStandardizer``): the plain average of the statistics over ``batches`` (an iterable of graph
    batches; targets are not used), then frozen, so that training starts from, and keeps, one fixed
    normalization. Returns the number of batches used."""
    scales = [m for m in model.modules() if isinstance(m, CalibratedStatistics)]
    if not scales:
        return 0
    for m in scales:
        m.reset()
    was_training = model.training
    model.train()
    n = 0
    for batch in batches:
        model(batch)
        n += 1
    for m in scales:
        m.frozen.fill_(True)
    model.train(was_training)
    return n


@torch.no_grad()
def sync_scales(model: nn.Module) -> int:
    """Average the statistics of every ``CalibratedStatistics`` in ``model`` over the torch.distributed ranks
    (an explicit collective: every rank must call it, once). Returns the number of modules synchronized (0
    without a process group)."""
    scales = [m for m in model.modules() if isinstance(m, CalibratedStatistics)]
    if not scales or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    stats = [t for m in scales for t in m.statistics()]
    flat = torch.cat([t.reshape(-1).double() for t in stats])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, part in zip(stats, flat.split([t.numel() for t in stats])):
        t.copy_(part.view_as(t))
    return len(scales)
