"""The paper's baselines, with the same interface as GradMetaNet (``net(graph)`` -> param / node / graph
outputs). Which symmetries each respects:

================== ================== ===================
model              sample reordering  neuron permutations
================== ================== ===================
MLPConcat          no                 no
NeuronAsymmetric   yes                no
BatchAsymmetric    no                 yes
WeightSpaceGMN avg yes                yes
WeightSpaceGMN cat no                 yes
================== ================== ===================

Models that flatten a fixed layout into features need every graph to share one architecture (and set size,
where the set is flattened); they build their layers on the first graph they see, in that graph's dtype and
device (pass ``example_graph=`` or run one forward before creating the optimizer or loading a checkpoint,
as with torch's lazy modules).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter

from ..errors import SetSizeMismatchError, StructureMismatchError
from ..graph.gradient_graph import GradientGraph, require_set_size
from ..graph.kinds import kind_of
from .encoding import NodeEncoding, scale_normalize
from .heads import GraphHead, NodeHead, ParamHead, mlp
from .layers import NeuronBlock, kind_embedding
from .layout import BatchLayout
from .models import _check


def _deep_mlp(in_channels: int, hidden: int, out_channels: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    c = in_channels
    for _ in range(max(layers - 1, 0)):
        mods += [nn.Linear(c, hidden), nn.GELU()]
        c = hidden
    mods.append(nn.Linear(c, out_channels))
    return nn.Sequential(*mods)


def _normalized_entries(graph, layout) -> Tensor:
    """(a, g) scaled per layer, with the log scales and masks: [E, 6]."""
    x_norm, log_scale = scale_normalize(graph, layout)
    return torch.cat([x_norm, log_scale / 10, graph.entry_mask.to(x_norm.dtype)], -1)


class _FixedLayout(nn.Module):
    """Shared machinery of the baselines that need one architecture (and set size) for the whole batch."""

    def __init__(self, out_level: str, out_channels: int, example_graph=None) -> None:
        super().__init__()
        _check(GradientGraph(), out_level)
        self.out_level, self.out_channels = out_level, out_channels
        self._signature = None
        if example_graph is not None:
            self._build(example_graph, BatchLayout(example_graph))

    def _out_size(self, spec) -> int:
        return {"param": spec.num_params, "node": spec.num_nodes, "graph": 1}[self.out_level] * self.out_channels

    def _layout(self, graph) -> BatchLayout:
        _check(graph, self.out_level)
        layout = BatchLayout(graph)
        if len(layout.groups) != 1:
            raise StructureMismatchError(f"{type(self).__name__} flattens one fixed graph layout into features: "
                                         "every graph in the batch must come from the same architecture and set "
                                         "size (GradMetaNet accepts any mix)")
        sig = (layout.groups[0].spec.structure_key(), layout.groups[0].spec.groups)
        if self._signature is None:
            self._build(graph, layout)
        elif sig != self._signature:
            raise StructureMismatchError(f"{type(self).__name__} was built for another architecture or set size; "
                                         "it cannot take graphs of a different layout")
        return layout

    def _build(self, graph, layout) -> None:
        group = layout.groups[0]
        self._signature = (group.spec.structure_key(), group.spec.groups)
        self.build(group.spec, layout)
        self.to(graph.entry_x.device, graph.entry_x.dtype)  # built layers follow the graph they were built on

    def _reshape_out(self, y: Tensor) -> Tensor:
        return y.reshape(-1, self.out_channels)


class MLPConcat(_FixedLayout):
    """An MLP on the whole flattened gradient graph: every (a, g) of every node and set element concatenated,
    [G, E_g * 6] -> [G, out]. Neither sample- nor neuron-equivariant; needs one architecture and set size."""

    def __init__(self, hidden_channels: int = 64, num_layers: int = 3, out_level: str = "param",
                 out_channels: int = 1, example_graph=None) -> None:
        self.hidden, self.num_layers = hidden_channels, num_layers
        super().__init__(out_level, out_channels, example_graph)

    def build(self, spec, layout) -> None:
        self.mlp = _deep_mlp(spec.num_entries * 6, self.hidden, self._out_size(spec), self.num_layers)

    def forward(self, graph) -> Tensor:
        layout = self._layout(graph)
        x = _normalized_entries(graph, layout).to(self.mlp[0].weight.dtype)
        return self._reshape_out(self.mlp(x.reshape(layout.num_graphs, -1)))


class NeuronAsymmetric(_FixedLayout):
    """DeepSets over the set, each element being the concatenation of all neuron features of one sample:
    phi(sample's entries [D]) -> mean over samples -> rho -> [G, out]. Invariant to sample order, not
    equivariant to neuron permutations; needs one architecture (any set size)."""

    def __init__(self, hidden_channels: int = 64, num_layers: int = 3, out_level: str = "param",
                 out_channels: int = 1, example_graph=None) -> None:
        self.hidden, self.num_layers = hidden_channels, num_layers
        super().__init__(out_level, out_channels, example_graph)

    def _layout(self, graph) -> BatchLayout:  # any set size: compare the architecture only
        _check(graph, self.out_level)
        layout = BatchLayout(graph)
        keys = {s.structure_key() for s in layout.specs}
        if len(keys) != 1 or (self._signature is not None and keys.pop() != self._signature[0]):
            raise StructureMismatchError("NeuronAsymmetric needs every graph to come from the architecture it "
                                         "was built for")
        if self._signature is None:
            self._build(graph, layout)
        return layout

    def build(self, spec, layout) -> None:
        per_sample = spec.num_entries // spec.num_samples
        self.phi = _deep_mlp(per_sample * 6, self.hidden, self.hidden, max(self.num_layers - 1, 1))
        self.rho = _deep_mlp(self.hidden, self.hidden, self._out_size(spec), 2)

    def forward(self, graph) -> Tensor:
        layout = self._layout(graph)
        x = _normalized_entries(graph, layout).to(self.rho[0].weight.dtype)
        order = torch.argsort(layout.entry_sample, stable=True)  # each sample's entries, in graph order
        per_sample = x[order].reshape(layout.num_samples, -1)
        pooled = scatter(self.phi(per_sample), layout.sample_graph, 0, dim_size=layout.num_graphs, reduce="mean")
        return self._reshape_out(self.rho(F.gelu(pooled)))


class BatchAsymmetric(_FixedLayout):
    """GradMetaNet with the set axis flattened into features (the paper's Gamma_1[2b]): each node's entries,
    in element order, form one feature vector; then PE, equivariant neuron layers and the same heads.
    Equivariant to neuron permutations, not to sample order; needs one set layout."""

    def __init__(self, hidden_channels: int = 64, num_layers: int = 4, out_level: str = "param",
                 out_channels: int = 1, pe_dim: int = 16, example_graph=None) -> None:
        self.hidden, self.num_layers, self.pe_dim = hidden_channels, num_layers, pe_dim
        super().__init__(out_level, out_channels, example_graph)

    def build(self, spec, layout) -> None:
        counts = torch.bincount(layout.graph.entry_node[: spec.num_entries], minlength=spec.num_nodes)
        self.width = int(counts.max())
        f = self.hidden
        self.pe = NodeEncoding(self.pe_dim)
        self.embed = nn.Linear(self.width * 6 + 3 * self.pe_dim, f)
        self.blocks = nn.ModuleList(NeuronBlock(f) for _ in range(self.num_layers))
        self.norm = nn.LayerNorm(f)
        head = {"param": lambda: ParamHead(f, self.out_channels), "node": lambda: NodeHead(f, self.out_channels),
                "graph": lambda: GraphHead(f, self.out_channels)}
        self.head = head[self.out_level]()

    def forward(self, graph) -> Tensor:
        layout = self._layout(graph)
        require_set_size(graph)
        x = _normalized_entries(graph, layout).to(self.embed.weight.dtype)
        order = torch.argsort(graph.entry_node, stable=True)  # each node's entries in element order
        node = graph.entry_node[order]
        counts = torch.bincount(node, minlength=layout.num_nodes)
        if int(counts.max()) > self.width:
            raise SetSizeMismatchError(f"BatchAsymmetric was built for at most {self.width} entries per node")
        slot = torch.arange(node.numel(), device=node.device) - (torch.cumsum(counts, 0) - counts)[node]
        feats = x.new_zeros(layout.num_nodes, self.width, 6)
        feats[node, slot] = x[order]
        u = self.embed(torch.cat([feats.reshape(layout.num_nodes, -1), self.pe(graph)], -1))
        for block in self.blocks:
            u = block(u, layout)
        u = F.gelu(self.norm(u))
        return self.head(u, layout)


class WeightSpaceGMN(nn.Module):
    """A weight-space graph metanetwork (GMN-style message passing on the parameter graph) fed gradients:

    * ``mode="average"``: each weight's batch-mean gradient (Theta[1]); invariant to sample order;
    * ``mode="concat"``: each weight's b per-sample gradients (Theta[b]); needs one set size and is not
      invariant to sample order. It materializes the per-sample weight gradients: O(P b) memory and time,
      the cost gradient graphs avoid.

    Every weight entry is an edge carrying a state; nodes carry states initialized from their bias gradients
    and the PE. A layer updates edges from their endpoints, then nodes from the mean of incoming and outgoing
    edges. Equivariant to neuron permutations.

    Extra inputs (off by default; the defaults give exactly the gradient-only model): ``weight_features=F``
    adds per-parameter features [P, F] in theta order (e.g. the weights theta, as in GMN / ScaleGMN) to the
    edge and bias inputs, ``node_features=F`` adds per-node features [N, F] (e.g. probe activations), both
    passed to ``forward``; ``gradient_input=False`` drops the gradients (a weight-space-only model)."""

    def __init__(self, hidden_channels: int = 64, num_layers: int = 3, out_level: str = "param",
                 out_channels: int = 1, mode: str = "average", set_size: int | None = None, pe_dim: int = 16,
                 weight_features: int = 0, node_features: int = 0, gradient_input: bool = True) -> None:
        super().__init__()
        _check(GradientGraph(), out_level)
        if mode not in ("average", "concat"):
            raise ValueError(f"mode must be 'average' or 'concat', got {mode!r}")
        if mode == "concat" and set_size is None:
            raise ValueError("WeightSpaceGMN(mode='concat') needs set_size=b (its input has one feature per sample)")
        f = hidden_channels
        self.mode, self.set_size, self.out_level, self.out_channels = mode, set_size, out_level, out_channels
        d = ((1 if mode == "average" else set_size) + 1) if gradient_input else 0  # gradients and their log scale
        self.gradient_input, self.weight_features, self.node_features = gradient_input, weight_features, node_features
        d += weight_features
        self.pe = NodeEncoding(pe_dim)
        self.node_in = nn.Linear(3 * pe_dim + d + node_features + 1, f)
        self.edge_in = nn.Linear(d + 2, f)
        self.kind = kind_embedding(f)
        self.edge_mlps = nn.ModuleList(mlp(3 * f, f, f) for _ in range(num_layers))
        self.node_mlps = nn.ModuleList(mlp(3 * f, f, f) for _ in range(num_layers))
        self.edge_norms = nn.ModuleList(nn.LayerNorm(f) for _ in range(num_layers))
        self.node_norms = nn.ModuleList(nn.LayerNorm(f) for _ in range(num_layers))
        self.edge_out, self.bias_out = nn.Linear(f, out_channels), nn.Linear(f, out_channels)
        self.node_head = NodeHead(f, out_channels) if out_level == "node" else None
        self.graph_head = GraphHead(f, out_channels) if out_level == "graph" else None

    def gradient_features(self, graph, layout) -> Tensor:
        """[P, d]: per-weight gradient features in theta order, normalized per graph (log scale appended)."""
        graphs = graph.to_data_list() if graph.is_batch else [graph]
        feats = []
        for gr in graphs:
            psg = gr.per_sample_grads()
            theta = gr.params_to_graph({k: v.movedim(0, -1) for k, v in psg.items()})  # [P, b]
            if self.mode == "average":
                theta = theta.mean(1, keepdim=True)
            elif theta.shape[1] != self.set_size:
                raise SetSizeMismatchError(f"WeightSpaceGMN(mode='concat') was built for sets of {self.set_size} "
                                           f"samples, got {theta.shape[1]}")
            rms = theta.pow(2).mean().sqrt().clamp_min(1e-12)
            feats.append(torch.cat([theta / rms, torch.log(rms).expand(theta.shape[0], 1) / 10], 1))
        return torch.cat(feats).to(self.edge_in.weight.dtype)

    def forward(self, graph, weights: Tensor | None = None, node_features: Tensor | None = None) -> Tensor:
        _check(graph, self.out_level)
        layout = BatchLayout(graph)
        graph.materialize_edges()
        dtype = self.edge_in.weight.dtype
        theta = self._inputs(graph, layout, weights)
        src, dst = graph.edge_index[:, graph.wentry_edge]
        op = graph.edge_op[graph.wentry_edge]
        coords = _entry_coords(graph, layout).to(dtype)
        e = self.edge_in(torch.cat([theta[graph.wentry_theta], coords], -1)) + self.kind(graph.op_kind[op])
        bias = theta.new_zeros(layout.num_nodes, theta.shape[1])
        bias[graph.bentry_node] = theta[graph.bentry_theta]
        has_bias = torch.zeros(layout.num_nodes, 1, dtype=dtype, device=bias.device)
        has_bias[graph.bentry_node] = 1
        extra = ([_checked(node_features, self.node_features, layout.num_nodes, "node_features").to(dtype)]
                 if self.node_features else [])
        u = self.node_in(torch.cat([self.pe(graph), bias, *extra, has_bias], -1))
        N = layout.num_nodes
        for emlp, nmlp, en, nn_ in zip(self.edge_mlps, self.node_mlps, self.edge_norms, self.node_norms):
            e = e + emlp(torch.cat([en(e), u[src], u[dst]], -1))
            incoming = scatter(e, dst, 0, dim_size=N, reduce="mean")
            outgoing = scatter(e, src, 0, dim_size=N, reduce="mean")
            u = u + nmlp(torch.cat([nn_(u), incoming, outgoing], -1))
        if self.out_level == "node":
            return self.node_head(u, layout)
        if self.out_level == "graph":
            return self.graph_head(u, layout)
        out = e.new_zeros(layout.num_params, self.out_channels)
        out[graph.wentry_theta] = self.edge_out(F.gelu(e))
        out[graph.bentry_theta] = self.bias_out(F.gelu(u[graph.bentry_node]))
        return out


    def _inputs(self, graph, layout, weights: Tensor | None) -> Tensor:
        """[P, d]: the per-parameter input (gradient features, then the extra weight features)."""
        parts = [self.gradient_features(graph, layout)] if self.gradient_input else []
        if self.weight_features:
            parts.append(_checked(weights, self.weight_features, layout.num_params, "weights"))
        if not parts:
            return self.edge_in.weight.new_zeros(layout.num_params, 0)
        return torch.cat([p.to(self.edge_in.weight.dtype) for p in parts], -1)


def _checked(x: Tensor | None, width: int, rows: int, name: str) -> Tensor | None:
    if not width:
        return x
    if x is None or x.shape != (rows, width):
        got = None if x is None else tuple(x.shape)
        raise ValueError(f"WeightSpaceGMN was built with {name}={width}: forward needs {name} of shape "
                         f"{(rows, width)}, got {got}")
    return x


def _entry_coords(graph, layout) -> Tensor:
    """[W, 2] kernel-offset coordinates of every weight entry of a (batched) graph."""
    parts = []
    for spec in graph.specs:
        for op in spec.ops:
            if spec.theta_range(op.weight) is None:
                continue
            parts.append(kind_of(op).kernel_coords(op).repeat(spec.op_edges(op), 1))
    return torch.cat(parts).to(graph.entry_x.device) if parts else graph.entry_x.new_zeros(0, 2)
