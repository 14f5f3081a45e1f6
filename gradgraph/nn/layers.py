"""Equivariant layers on gradient graphs, all scatter ops over index vectors (see BatchLayout)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter, to_dense_batch

from ..graph.kinds import num_kinds
from .layout import BatchLayout

SET_POOLS = ("node", "layer", "sample", "graph")
_GLOBAL_RNG_KINDS = 4  # linear, conv, diag, embedding: the kinds whose embedding rows come from the global RNG


def kind_embedding(dim: int) -> nn.Embedding:
    """A learned embedding of every registered op kind (row ``kind.code``): [num_kinds(), dim], N(0, 1) like
    ``nn.Embedding``. The rows of the four original kinds are drawn from the global RNG exactly as
    ``nn.Embedding(4, dim)`` drew them; the row of each later kind from its own generator (seeded by
    ``torch.initial_seed()`` and its code), so registering a kind changes neither these rows nor the
    initialization of any module built after this one (a seed keeps giving the same numbers)."""
    weight = torch.empty(num_kinds(), dim)
    nn.init.normal_(weight[:_GLOBAL_RNG_KINDS])
    for code in range(_GLOBAL_RNG_KINDS, num_kinds()):
        gen = torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + code) % 2**63)
        weight[code].normal_(generator=gen)
    return nn.Embedding(num_kinds(), dim, _weight=weight)


class SetNeuronLayer(nn.Module):
    """The set x neuron layer (L_Gamma_b, after Hartford et al. 2018) on entries [E, f] -> [E, f_out]:

        out_e = W_0 h_e + sum_p W_p mean_{e' in pool_p(e)} h_e'

    with pools over the node's set elements (``node``), the neurons of its layer at the same element
    (``layer``), the sample's neurons (``sample``) and the whole graph (``graph``); see
    ``BatchLayout.pool_index``. Every pool is invariant to reordering samples and to permuting neurons
    within a space, so the layer is equivariant to both. Cost: O(E f^2)."""

    def __init__(self, in_channels: int, out_channels: int, pools: tuple[str, ...] = SET_POOLS) -> None:
        super().__init__()
        self.pools = tuple(pools)
        self.lin = nn.Linear(in_channels, out_channels)
        self.pool_lins = nn.ModuleList(nn.Linear(in_channels, out_channels, bias=False) for _ in self.pools)

    def forward(self, h: Tensor, layout: BatchLayout) -> Tensor:
        return layout.pool_sum(h, list(zip(self.pools, self.pool_lins)), base=self.lin(h))


class SetBlock(nn.Module):
    """Pre-norm residual block around a SetNeuronLayer: h + L(GELU(LayerNorm(h)))."""

    def __init__(self, channels: int, pools: tuple[str, ...] = SET_POOLS) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.layer = SetNeuronLayer(channels, channels, pools)

    def forward(self, h: Tensor, layout: BatchLayout) -> Tensor:
        return h + self.layer(F.gelu(self.norm(h)), layout)


class SetPooling(nn.Module):
    """L_Pool, the only place the set axis disappears: node embedding from the mean over the node's set
    elements and the mean over its graph, [E, f] -> [N, f_out]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.node = nn.Linear(in_channels, out_channels)
        self.graph = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, h: Tensor, layout: BatchLayout) -> Tensor:
        return self.node(layout.node_mean(h)) + self.graph(layout.graph_mean(h)).index_select(0, layout.node_graph)


class NeuronLayer(nn.Module):
    """L_Gamma, DeepSets over neurons: u_n -> W_0 u_n + W_1 mean(layer of n) + W_2 mean(graph of n),
    [N, f] -> [N, f_out]; optional messages along weight edges (``edge_messages=True``)."""

    def __init__(self, in_channels: int, out_channels: int, edge_messages: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels)
        self.layer = nn.Linear(in_channels, out_channels, bias=False)
        self.graph = nn.Linear(in_channels, out_channels, bias=False)
        self.messages = WeightMessages(in_channels, out_channels) if edge_messages else None

    def forward(self, u: Tensor, layout: BatchLayout) -> Tensor:
        g = layout.graph
        lidx, gidx = g.node_layer, layout.node_graph
        out = self.lin(u) + self.layer(scatter(u, lidx, 0, dim_size=int(g.layer_size.numel()), reduce="mean"))[lidx]
        out = out + self.graph(scatter(u, gidx, 0, dim_size=layout.num_graphs, reduce="mean"))[gidx]
        if self.messages is not None:
            out = out + self.messages(u, layout)
        return out


class NeuronBlock(nn.Module):
    """Pre-norm residual block around a NeuronLayer."""

    def __init__(self, channels: int, edge_messages: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.layer = NeuronLayer(channels, channels, edge_messages)

    def forward(self, u: Tensor, layout: BatchLayout) -> Tensor:
        return u + self.layer(F.gelu(self.norm(u)), layout)


class WeightMessages(MessagePassing):
    """Messages along weight edges in both directions (in-neuron -> out-neuron and back), each a linear map of
    the sender plus a learned embedding of the op kind, mean-aggregated. Needs the graph's edges
    (materialized on demand). Cost O(edges x f)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(aggr="mean", node_dim=0)
        self.fwd = nn.Linear(in_channels, out_channels)
        self.bwd = nn.Linear(in_channels, out_channels)
        self.kind = kind_embedding(out_channels)

    def forward(self, u: Tensor, layout: BatchLayout) -> Tensor:
        g = layout.graph.materialize_edges()
        kind = self.kind(g.op_kind[g.edge_op])
        down = self.propagate(g.edge_index, x=self.fwd(u), kind=kind)
        up = self.propagate(g.edge_index.flip(0), x=self.bwd(u), kind=kind)
        return down + up

    def message(self, x_j: Tensor, kind: Tensor) -> Tensor:
        return x_j + kind


class SegmentAttention(nn.Module):
    """Multi-head self-attention among the entries of each segment: the entries of one node (``axis="node"``,
    attention across the set) or of one element (``axis="element"``, attention across neurons). Uniform
    batches attend on dense blocks (one call per layer or element group); otherwise segments are sorted and
    padded into a dense batch. Cost O(sum of segment lengths^2 f)."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def _attend(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [S, L, f] -> [S, L, f]; ``mask`` [S, L] marks real entries (None: all)."""
        S, L, f = x.shape
        q, k, v = self.qkv(x).view(S, L, 3, self.heads, f // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(S, L, f))

    def forward(self, h: Tensor, layout: BatchLayout, axis: str) -> Tensor:
        if layout.uniform:
            return self._uniform(h, layout, axis)
        segment, num_segments = layout.pool_index(axis)
        order = torch.argsort(segment, stable=True)
        x, mask = to_dense_batch(h[order], segment[order], batch_size=num_segments)
        y = self._attend(x, None if bool(mask.all()) else mask)[mask]
        out = torch.empty_like(h)
        out[order] = y
        return out

    def _uniform(self, h: Tensor, layout: BatchLayout, axis: str) -> Tensor:
        spec, G, f = layout.specs[0], layout.num_graphs, h.shape[-1]
        h3, out = h.view(G, -1, f), torch.empty_like(h).view(G, -1, f)
        if axis == "node":  # per layer: [G, M_layer, n, f], sequences along the set
            units = [[(lay, blk) for blk in layout._blocks(lay)] for lay in spec.layers]
            cat_dim = 1
        elif axis == "element":  # per element group: [G, M, N_group, f], sequences along the neurons
            groups: dict[int, list] = {}
            for lay in spec.layers:
                for blk in layout._blocks(lay):
                    groups.setdefault(blk.group, []).append((lay, blk))
            units, cat_dim = list(groups.values()), 2
        else:
            raise ValueError(f"attention runs across 'node' or 'element' segments, not {axis!r}")
        for unit in units:
            parts = [h3[:, blk.start:blk.start + blk.count].reshape(G, -1, lay.size, f) for lay, blk in unit]
            x = torch.cat(parts, cat_dim)  # [G, M, n, f]
            if cat_dim == 1:
                M, n = x.shape[1], x.shape[2]
                y = self._attend(x.transpose(1, 2).reshape(G * n, M, f)).view(G, n, M, f).transpose(1, 2)
            else:
                M, N = x.shape[1], x.shape[2]
                y = self._attend(x.reshape(G * M, N, f)).view(G, M, N, f)
            for (_, blk), piece in zip(unit, y.split([p.shape[cat_dim] for p in parts], cat_dim)):
                out[:, blk.start:blk.start + blk.count] = piece.reshape(G, -1, f)
        return out.view(-1, f)


class AttentionBlock(nn.Module):
    """GradMetaNet++ block: attention across the set (per node), attention across neurons (per element), and a
    pointwise MLP, each pre-norm residual."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.norm_set, self.norm_neuron, self.norm_mlp = (nn.LayerNorm(channels) for _ in range(3))
        self.set_attn = SegmentAttention(channels, heads)
        self.neuron_attn = SegmentAttention(channels, heads)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, h: Tensor, layout: BatchLayout) -> Tensor:
        h = h + self.set_attn(self.norm_set(h), layout, "node")
        h = h + self.neuron_attn(self.norm_neuron(h), layout, "element")
        return h + self.mlp(self.norm_mlp(h))
