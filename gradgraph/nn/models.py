"""GradMetaNet and GradMetaNet++ (Gelberg et al., NeurIPS 2025) on gradient graphs."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter

from ..graph.gradient_graph import GradientGraph
from .encoding import EntryEncoder
from .heads import GraphHead, NodeHead, PairwiseSetHead, ParamHead, mlp
from .layers import SET_POOLS, AttentionBlock, NeuronBlock, SetBlock, SetPooling
from .layout import BatchLayout

OUT_LEVELS = ("param", "node", "graph")


def _check(graph, out_level: str) -> None:
    if not isinstance(graph, GradientGraph):
        raise TypeError(f"metanetworks take a GradientGraph or a PyG batch of them, got {type(graph).__name__}")
    if out_level not in OUT_LEVELS:
        raise ValueError(f"out_level must be one of {OUT_LEVELS}, got {out_level!r}")


class GradMetaNet(nn.Module):
    r"""GradMetaNet: PE -> set x neuron layers -> set pooling -> neuron layers -> head (paper Eq. 9).

    Args:
        hidden_channels: width f of every layer.
        num_layers: equivariant layers in all; the first ``set_layers`` (default half, rounded up) act on the
            set-valued entries [E, f] (L_Gamma_b), the rest on pooled node embeddings [N, f] (L_Gamma).
        out_level: ``"param"`` -> [P, C] in theta order (decode with ``graph.graph_to_params``; a batch
            concatenates its graphs' blocks and ``batch.graph_to_params`` returns one dict per graph),
            ``"node"`` -> [N, C], ``"graph"`` -> [num_graphs, C].
        out_channels: C.
        pools: pooling axes of the set layers (see ``BatchLayout.pool_index``).
        bilinear_channels: channels of the weight-gradient-shaped head (0 disables it); see ``ParamHead``.
        edge_messages: add messages along weight edges in the neuron layers.
        param_features: F > 0 if ``forward`` gets per-parameter features [P, F] (e.g. the weights).
        head_init: ``"gradient"`` or ``"fisher"`` starts the parameter head as that classical estimator (in
            running-scale units, see ``MomentTerms``); None (default) starts from a random combination.
        norm_by: input normalization of (a, g) per ``"layer"`` (default) or per neuron ``"space"`` (see
            ``scale_normalize``).
        graph_pool: ``out_level="graph"``'s pooling, ``"mean"`` over nodes (the paper) or ``"layer"`` (each
            layer weighs the same, see ``GraphHead``).
        standardize_scales: also feed each layer's log scales standardized across the training graphs
            (calibrated by ``calibrate_scales``, see ``EntryEncoder``).

    Input sizes come from the graph: any architecture, any set size, one net. Equivariant to reordering
    the samples and to every neuron permutation of the graph's symmetry group. Cost: O(E f^2) per set layer,
    O(N f^2) per neuron layer, O(P f) for the parameter head; no edges x set tensor is ever built.
    """

    def __init__(self, hidden_channels: int = 64, num_layers: int = 4, out_level: str = "param",
                 out_channels: int = 1, set_layers: int | None = None, pools: tuple[str, ...] = SET_POOLS,
                 pe_dim: int = 16, bilinear_channels: int = 8, edge_messages: bool = False,
                 param_features: int = 0, head_init: str | None = None, norm_by: str = "layer",
                 graph_pool: str = "mean", standardize_scales: bool = False) -> None:
        super().__init__()
        _check(GradientGraph(), out_level)
        f = hidden_channels
        k1 = (num_layers + 1) // 2 if set_layers is None else set_layers
        if not 0 < k1 <= num_layers:
            raise ValueError(f"set_layers must be in 1..num_layers={num_layers}, got {k1}")
        self.out_level, self.out_channels = out_level, out_channels
        self.encoder = EntryEncoder(f, pe_dim, norm_by, standardize_scales)
        self.set_blocks = nn.ModuleList(SetBlock(f, pools) for _ in range(k1))
        self.pool = SetPooling(f, f)
        self.neuron_blocks = nn.ModuleList(NeuronBlock(f, edge_messages) for _ in range(num_layers - k1))
        self.norm = nn.LayerNorm(f)
        if out_level == "param":
            self.head = ParamHead(f, out_channels, entry_channels=f, bilinear_channels=bilinear_channels,
                                  param_features=param_features, moment_init=head_init)
        elif out_level == "node":
            self.head = NodeHead(f, out_channels)
        else:
            self.head = GraphHead(f, out_channels, graph_pool)

    def forward(self, graph: GradientGraph, param_features: Tensor | None = None) -> Tensor:
        _check(graph, self.out_level)
        layout = BatchLayout(graph)
        h = self.encoder(graph, layout)
        for block in self.set_blocks:
            h = block(h, layout)
        u = self.pool(F.gelu(h), layout)
        for block in self.neuron_blocks:
            u = block(u, layout)
        u = F.gelu(self.norm(u))
        if self.out_level == "param":
            return self.head(u, layout, h=h, param_features=param_features)
        return self.head(u, layout)


class GradMetaNetPlusPlus(nn.Module):
    """GradMetaNet++: no pooling layer; every block attends across the set (per node) and across neurons
    (per element); the parameter head is applied per set element and summed (``PairwiseSetHead``).

    Same arguments as :class:`GradMetaNet` (plus ``heads``; ``bilinear_channels`` adds GradMetaNet's moment
    terms to the pairwise head, 0 by default as in the paper). Cost O((N b^2 + b N^2) f) per block and
    O(P b f) for the parameter head, which builds an edges x set-elements tensor (chunked)."""

    def __init__(self, hidden_channels: int = 64, num_layers: int = 4, out_level: str = "param",
                 out_channels: int = 1, heads: int = 4, pe_dim: int = 16, head_hidden: int | None = None,
                 bilinear_channels: int = 0, head_init: str | None = None, standardize_scales: bool = False) -> None:
        super().__init__()
        _check(GradientGraph(), out_level)
        f = hidden_channels
        self.out_level, self.out_channels = out_level, out_channels
        self.encoder = EntryEncoder(f, pe_dim, standardize_scales=standardize_scales)
        self.blocks = nn.ModuleList(AttentionBlock(f, heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(f)
        if out_level == "param":
            self.head = PairwiseSetHead(f, out_channels, head_hidden, bilinear_channels=bilinear_channels,
                                        moment_init=head_init)
        else:
            self.head = mlp(f, f, out_channels)

    def forward(self, graph: GradientGraph) -> Tensor:
        _check(graph, self.out_level)
        layout = BatchLayout(graph)
        h = self.encoder(graph, layout)
        for block in self.blocks:
            h = block(h, layout)
        h = self.norm(h)
        if self.out_level == "param":
            return self.head(h, layout)
        idx, size = layout.pool_index("node" if self.out_level == "node" else "graph")
        return self.head(scatter(h, idx, 0, dim_size=size, reduce="mean"))
