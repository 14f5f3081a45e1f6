"""The learned-optimizer variants: the meta-parameters and the learned term ``F`` of the update

    m   <- mu m + (1 - mu) grad                       (EMA momentum, UNF's code: no bias correction)
    theta <- theta - lr alpha (m + beta F(features))

with ``alpha = exp(log_alpha)``, ``mu = sigmoid(logit_mu)`` and ``beta = exp(log_beta)`` (positive, and mu in
(0, 1), whatever PES does to the raw numbers). Shipped initialisation: alpha = 0.1, mu = 0.9, beta = 1e-3 (the
paper's). UNF's code fixes beta = 1e-4; we learn it from the paper's larger value because the last layer of F
starts at zero (so every untrained variant *is* SGDM with these constants and a larger beta costs nothing at
the start), while PES perturbations of the MLP (sigma = 0.01) then move the trajectory by alpha beta sigma per
step: ten times more signal against the loss noise than UNF's 1e-4.

Variants (:data:`VARIANTS`, ``factory(**hyper) -> LearnedRule``):

* ``sgdm``: F = 0 (learned alpha and mu only).
* ``ds``: F = per-parameter MLP 19 -> 32 -> 32 -> 32 -> 1 (ReLU) on :func:`~gradgraph.optim.features.unf_features`.
* ``ds+gradmetanet``: the MLP also sees, per parameter, the ``gnn_channels`` outputs of a GradMetaNet on the
  step's gradient graph and 4 *pooled-neuron averages*: per neuron, the set-mean of a^2 and of g^2 (invariant
  to the batch's order and content layout, unlike a batch-slot EMA, which would average unrelated samples),
  EMA'd over steps at decays 0.9 and 0.99; a weight sees its out-neuron's g^2 averages and its in-neuron's a^2
  averages (the two factors of its per-sample gradient g a^T), a bias its neuron's g^2 averages and a^2 = 1.
  These channels are square-rooted and, like the GradMetaNet outputs, divided by their per-tensor RMS.

Everything F sees is per-parameter and permutation-equivariant (elementwise features, per-tensor reductions,
an equivariant metanetwork, neuron statistics gathered along the parameter's own neurons), so the update of a
permuted model is the permuted update.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..graph.gradient_graph import GradientGraph
from ..graph.kinds import kind_of
from ..nn.layout import BatchLayout
from ..nn.models import GradMetaNet
from ..registry import Registry
from .features import NUM_FEATURES, tensor_rms_normalize

__all__ = ["VARIANTS", "LearnedRule", "SGDM", "DS", "DSGradMetaNet", "param_neurons", "NODE_DECAYS"]

VARIANTS = Registry("learned-optimizer variant")
NODE_DECAYS = (0.9, 0.99)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    with torch.no_grad():  # F starts at zero: an untrained variant is SGDM(alpha, mu)
        layers[-1].weight.zero_()
        layers[-1].bias.zero_()
    return nn.Sequential(*layers)


class LearnedRule(nn.Module):
    """The meta-parameters of one variant. ``needs_graph``: F reads the step's gradient graph."""

    needs_graph = False
    variant = "sgdm"

    def __init__(self, alpha: float = 0.1, mu: float = 0.9, beta: float = 1e-3) -> None:
        super().__init__()
        if not (alpha > 0 and 0 < mu < 1 and beta > 0):
            raise ValueError(f"need alpha > 0, 0 < mu < 1 and beta > 0, got alpha={alpha}, mu={mu}, beta={beta}")
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.logit_mu = nn.Parameter(torch.tensor(math.log(mu / (1 - mu))))
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    @property
    def mu(self) -> Tensor:
        return torch.sigmoid(self.logit_mu)

    @property
    def beta(self) -> Tensor:
        return self.log_beta.exp()

    def hyper(self) -> dict:
        """The constructor arguments that rebuild this rule (saved beside its weights)."""
        return {}

    def learned_term(self, features: Tensor, ctx: dict) -> Tensor | None:
        """F [P] from the DS features [P, 19] and, for graph variants, ``ctx`` (see LearnedOptimizer); None: F = 0."""
        return None

    @torch.no_grad()
    def warm_start(self, other: "LearnedRule") -> None:
        """Start from a meta-trained rule of a simpler variant so that this rule computes exactly ``other``'s
        update: its step sizes; for a DS MLP, ``other``'s MLP with zero weights on the inputs ``other`` does
        not have (a ds+gradmetanet rule warm-started from ``ds`` *is* that ds rule until PES moves the new
        columns). Raises ValueError when the MLPs' widths differ."""
        for name in ("log_alpha", "logit_mu", "log_beta"):
            getattr(self, name).copy_(getattr(other, name))
        mine, theirs = getattr(self, "mlp", None), getattr(other, "mlp", None)
        if theirs is None:
            return
        if mine is None or len(mine) != len(theirs):
            raise ValueError(f"cannot warm-start variant '{self.variant}' from '{other.variant}': "
                             f"its MLP has another depth ({len(mine or [])} layers against {len(theirs)})")
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if not isinstance(a, nn.Linear):
                continue
            wider_input = a.in_features > b.in_features and i == 0  # only the first layer gains inputs
            if a.out_features != b.out_features or (a.in_features != b.in_features and not wider_input):
                raise ValueError(f"cannot warm-start variant '{self.variant}' from '{other.variant}': layer mlp.{i} "
                                 f"is {a.in_features}->{a.out_features} here and {b.in_features}->{b.out_features} "
                                 "there (use the same --hidden widths)")
            a.weight.zero_()[:, : b.in_features] = b.weight
            a.bias.copy_(b.bias)


@VARIANTS.register("sgdm")
class SGDM(LearnedRule):
    """Learned SGD with EMA momentum: F = 0."""


@VARIANTS.register("ds")
class DS(LearnedRule):
    """F = per-parameter MLP on the 19 UNF features (``hidden`` widths, ReLU, output layer zero-initialised)."""

    variant = "ds"

    def __init__(self, hidden: tuple[int, ...] = (32, 32, 32), extra_features: int = 0, **kw) -> None:
        super().__init__(**kw)
        self._hidden = tuple(hidden)
        self.mlp = _mlp([NUM_FEATURES + extra_features, *hidden, 1])

    def hyper(self) -> dict:
        return {"hidden": list(self._hidden)}

    def learned_term(self, features: Tensor, ctx: dict) -> Tensor:
        return self.mlp(features).squeeze(-1)


def param_neurons(graph: GradientGraph) -> tuple[Tensor, Tensor]:
    """For every trainable scalar in theta order, its out-neuron and its in-neuron: ``out`` [P], ``inp`` [P]
    (node ids; ``inp`` = N for a bias, whose input is the constant 1; both N + 1 for a scalar no op uses).
    Computed once per structure by passing node ids through the same op-by-op layout the parameter heads use."""
    layout = BatchLayout(graph)
    N, P = layout.num_nodes, layout.num_params
    ids = torch.arange(N, dtype=torch.float64, device=layout.device)[:, None]
    out = torch.full((P,), N + 1, dtype=torch.long, device=layout.device)
    inp = out.clone()
    for group in layout.groups:
        spec = group.spec
        for op in spec.ops:
            lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
            tidx = group.theta_index(op)
            if tidx is not None:
                d = group.nodes(ids, lout)[:, :, None, None]
                s = kind_of(op).align_source(group.nodes(ids, lin))
                out[tidx.reshape(-1)] = d.expand(*tidx.shape, 1).reshape(-1).long()
                inp[tidx.reshape(-1)] = s.expand(*tidx.shape, 1).reshape(-1).long()
            bidx = group.bias_index(op)
            if bidx is not None:
                out[bidx.reshape(-1)] = group.nodes(ids, lout).reshape(-1).long()
                inp[bidx.reshape(-1)] = N
    return out, inp


def neuron_moments(graph: GradientGraph) -> Tensor:
    """Per node, the set-mean of a^2 and of g^2 over the entries that hold them: [N, 2]."""
    x, m = graph.entry_x, graph.entry_mask.to(graph.entry_x.dtype)
    N = graph.num_nodes
    sums = x.new_zeros(N, 4).index_add_(0, graph.entry_node, torch.cat([x * x * m, m], 1))
    return sums[:, :2] / sums[:, 2:].clamp_min(1)


@VARIANTS.register("ds+gradmetanet")
class DSGradMetaNet(DS):
    """DS whose MLP also sees GradMetaNet's per-parameter outputs on the step's graph and pooled-neuron averages
    (see the module docstring). ``gnn`` holds GradMetaNet's hyperparameters (small by default: it runs every step);
    ``set_size`` caps the samples of the step's graph it reads (the first ``set_size`` of the batch)."""

    needs_graph = True
    variant = "ds+gradmetanet"
    GNN_DEFAULTS = dict(hidden_channels=16, num_layers=2, out_channels=4, pe_dim=8, bilinear_channels=4)

    def __init__(self, hidden: tuple[int, ...] = (32, 32, 32), gnn: dict | None = None, set_size: int | None = None,
                 **kw) -> None:
        gnn = {**self.GNN_DEFAULTS, **(gnn or {})}
        if set_size is not None and (not isinstance(set_size, int) or set_size < 1):
            raise ValueError(f"set_size must be a positive number of samples or None (the whole batch), "
                             f"got {set_size!r}")
        super().__init__(hidden, extra_features=gnn["out_channels"] + 2 * len(NODE_DECAYS), **kw)
        self._gnn = gnn
        # GradMetaNet and the pooled-neuron averages see the step's first set_size samples (None: all of them).
        # Its cost is linear in the set size; the batch is a random draw, so its first samples are one too.
        self.set_size = set_size
        self.gnn = GradMetaNet(out_level="param", **gnn).eval()

    def hyper(self) -> dict:
        return {**super().hyper(), "gnn": dict(self._gnn), "set_size": self.set_size}

    def train(self, mode: bool = True):
        super().train(mode)
        self.gnn.eval()  # frozen running scales: the update must not depend on other steps' statistics
        return self

    def learned_term(self, features: Tensor, ctx: dict) -> Tensor:
        """``ctx``: ``graph`` (this step's), ``neurons`` = param_neurons(graph), ``node_avg`` [N + 2, 2 * D] (the
        optimizer's EMA state, updated here in place), ``first`` (no average yet), ``theta_of_flat`` ([P] index
        from the optimizer's flat order into theta order, or None when they agree), ``seg``, ``counts``, and
        optionally ``gnn`` (the function to call instead of ``self.gnn``, e.g. its torch.compile'd forward)."""
        extra = tensor_rms_normalize(self.extra_columns(ctx, features.dtype), ctx["seg"], ctx["counts"])
        return self.mlp(torch.cat([features, extra], 1)).squeeze(-1)

    def extra_columns(self, ctx: dict, dtype=torch.float32) -> Tensor:
        """The MLP's extra inputs before their per-tensor RMS normalisation, in the optimizer's flat order:
        GradMetaNet's outputs and the pooled-neuron averages, [P, out_channels + 2 * D] (updates ``node_avg``)."""
        graph = ctx["graph"]
        gnn = ctx.get("gnn", self.gnn)(graph)  # [P, c] in theta order (ctx["gnn"]: a compiled forward)
        out_n, in_n = ctx["neurons"]
        avg = ctx["node_avg"]
        mom = neuron_moments(graph)  # [N, 2]
        N, D = mom.shape[0], len(NODE_DECAYS)
        for k, d in enumerate(NODE_DECAYS):
            cols = slice(2 * k, 2 * k + 2)
            if ctx["first"]:
                avg[:N, cols] = mom
            else:
                avg[:N, cols].mul_(d).add_(mom, alpha=1 - d)
        avg[N] = torch.tensor([1.0, 0.0] * D, dtype=avg.dtype)  # the constant input of a bias
        avg[N + 1] = 0
        # square roots on the [N + 2, D] tables, then one gather per side straight into the result (the same
        # values as gathering first; at 1.86M parameters the [P, 2 D] intermediates cost ~40 ms a step)
        g_out, a_in = (avg[:, c::2].clamp_min(0).sqrt().to(dtype) for c in (1, 0))  # g^2 out, a^2 in
        extra = torch.cat([gnn.to(dtype), g_out.index_select(0, out_n), a_in.index_select(0, in_n)], 1)
        if ctx["theta_of_flat"] is not None:
            extra = extra.index_select(0, ctx["theta_of_flat"])
        return extra
