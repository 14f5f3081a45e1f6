"""Metanetworks that edit a network: from its weights theta (and, optionally, probe activations, target
values or the gradient graph of an editing loss) predict a weight change Delta theta per parameter
(GradMetaNet paper, Sec. 5.3, INR editing).

:class:`WeightEditor` is one class for every learned row of the editing benchmark:

* ``ws``: a weight-space graph metanetwork (:class:`~gradgraph.nn.baselines.WeightSpaceGMN`, GMN-style edge
  network) taking theta as edge and bias features;
* ``probe=True``: plus probe features, every neuron's activation at the graph's fixed points (the ``a`` of the
  gradient graph; the output neurons get the network's outputs ``graph.probe_out`` there) as node features;
* ``target=True``: plus the target values at the same points (``graph.point_target``), broadcast to every node;
* ``grad_net="gradmetanet"`` / ``"gradmetanet++"``: GradMetaNet(++) on the gradient graph produces
  ``grad_channels`` per-parameter channels, concatenated with theta as the weight-space network's input;
* ``edits=k``: k edits per parameter (output capacity expansion: the task averages the k edited networks'
  outputs).

The graph must carry ``theta`` [P] (theta order), and ``probe_out`` / ``point_target`` [b] when used. Weights and
edits are measured in per-tensor units (``theta_scale``: the RMS of each parameter tensor over calibration data,
set by :meth:`WeightEditor.calibrate`), which keeps every layer's input and output at one scale and is
equivariant (one number per tensor). With one edit the output layer starts at zero, so training starts from
Delta theta = 0; with k > 1 it keeps its random initialization (k edits started at zero would get identical
gradients and stay identical, which makes averaging them pointless).
Equivariant to every neuron permutation of the edited network.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import StructureMismatchError
from .baselines import WeightSpaceGMN
from .layout import BatchLayout
from .models import GradMetaNet, GradMetaNetPlusPlus

__all__ = ["WeightEditor", "param_tensor_index", "probe_features"]

GRAD_NETS = ("gradmetanet", "gradmetanet++")


def param_tensor_index(graph) -> Tensor:
    """[P] the index (in ``spec.trainable``) of the parameter tensor of every theta row of a graph or batch."""
    parts = [torch.repeat_interleave(torch.arange(len(s.trainable)), torch.tensor([p.numel for p in s.trainable]))
             for s in graph.specs]
    return torch.cat(parts).to(graph.entry_x.device)


def probe_features(graph, layout: BatchLayout) -> Tensor:
    """[N, b]: each neuron's activation ``a`` at each of the graph's b points; neurons without ``a`` (the
    outputs) get the network's outputs ``graph.probe_out`` at those points. Needs one set size and one output
    neuron per graph."""
    b = graph.set_size
    has_a = graph.entry_mask[:, 0].bool()
    sample = layout.entry_sample
    col = sample - layout.sample_ptr[layout.sample_graph[sample]]
    dense = graph.entry_x.new_zeros(layout.num_nodes, b)
    dense[graph.entry_node[has_a], col[has_a]] = graph.entry_x[has_a, 0]
    seen = torch.zeros(layout.num_nodes, dtype=torch.bool, device=dense.device)
    seen[graph.entry_node[has_a]] = True
    outputs = torch.nonzero(~seen).flatten()
    if outputs.numel() != layout.num_graphs:
        raise StructureMismatchError("probe_features needs exactly one output neuron per graph")
    dense[outputs] = graph.probe_out.reshape(layout.num_graphs, b)[layout.node_graph[outputs]].to(dense.dtype)
    return dense


class WeightEditor(nn.Module):
    """theta (+ probe, + target, + GradMetaNet channels) -> Delta theta [P, edits]; see the module docstring.

    Args:
        num_tensors: parameter tensors of the edited architecture (``len(spec.trainable)``).
        num_points: the set size b (probe and target widths).
        hidden_channels, num_layers, pe_dim: the weight-space network.
        grad_hidden, grad_layers, grad_channels: the GradMetaNet(++) feeding it (``grad_net`` set).
        out_gain: Delta theta = out_gain * theta_scale * network output.
    """

    def __init__(self, num_tensors: int, num_points: int, hidden_channels: int = 32, num_layers: int = 3,
                 probe: bool = False, target: bool = False, grad_net: str | None = None, grad_channels: int = 4,
                 grad_hidden: int = 16, grad_layers: int = 2, edits: int = 1, pe_dim: int = 16,
                 out_gain: float = 0.1) -> None:
        super().__init__()
        if grad_net not in (None, *GRAD_NETS):
            raise ValueError(f"grad_net must be None or one of {GRAD_NETS}, got {grad_net!r}")
        self.probe, self.target, self.edits, self.out_gain = probe, target, edits, out_gain
        self.grad = None
        if grad_net == "gradmetanet":
            self.grad = GradMetaNet(grad_hidden, grad_layers, "param", grad_channels, bilinear_channels=4)
        elif grad_net == "gradmetanet++":
            self.grad = GradMetaNetPlusPlus(grad_hidden, grad_layers, "param", grad_channels, heads=1,
                                            head_hidden=grad_hidden)
        width = 1 + (grad_channels if self.grad is not None else 0)
        self.ws = WeightSpaceGMN(hidden_channels, num_layers, "param", edits, pe_dim=pe_dim, gradient_input=False,
                                 weight_features=width, node_features=num_points * (int(probe) + int(target)))
        if edits == 1:  # start from Delta theta = 0; k > 1 edits keep torch's random init: k zero-initialized
            for lin in (self.ws.edge_out, self.ws.bias_out):  # edits get identical gradients and stay identical
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.register_buffer("theta_scale", torch.ones(num_tensors))

    @torch.no_grad()
    def calibrate(self, graphs) -> None:
        """Set ``theta_scale`` to each parameter tensor's RMS over ``graphs`` (an iterable of batches)."""
        sq = count = 0
        for graph in graphs:
            tid = param_tensor_index(graph)
            theta = graph.theta.to(self.theta_scale.dtype)
            sq = sq + torch.zeros_like(self.theta_scale).index_add_(0, tid, theta.pow(2))
            count = count + torch.bincount(tid, minlength=self.theta_scale.numel())
        self.theta_scale.copy_((sq / count.clamp_min(1)).sqrt().clamp_min(1e-8))

    def forward(self, graph) -> Tensor:
        layout = BatchLayout(graph)
        dtype = self.theta_scale.dtype
        scale = self.theta_scale[param_tensor_index(graph)].unsqueeze(-1)
        weights = [graph.theta.to(dtype).unsqueeze(-1) / scale]
        if self.grad is not None:
            weights.append(self.grad(graph).to(dtype))
        nodes = []
        if self.probe:
            nodes.append(probe_features(graph, layout))
        if self.target:
            b = graph.set_size
            nodes.append(graph.point_target.reshape(layout.num_graphs, b)[layout.node_graph])
        node_features = torch.cat(nodes, -1).to(dtype) if nodes else None
        out = self.ws(graph, weights=torch.cat(weights, -1), node_features=node_features)
        return out * (self.out_gain * scale)

