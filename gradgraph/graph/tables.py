"""Index tables of a GraphSpec (node, layer, op, space and element tables; explicit edges and parameter
entries), computed once per spec and cached on it: every graph of one structure shares them."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kinds import kind_of
from .spec import ROLES, GraphSpec


def structure_tensors(spec: GraphSpec, device) -> dict[str, Tensor]:
    """Node/layer/op/space/element tables of a spec (cached on the spec, moved to ``device``)."""
    cached = spec.__dict__.get("_tables")
    if cached is None:
        node = {k: [] for k in ("layer", "space", "pos", "role", "permutable", "head")}
        for li, lay in enumerate(spec.layers):
            space = spec.spaces[lay.space]
            n = lay.size
            pos = torch.arange(n)
            node["layer"].append(torch.full((n,), li))
            node["space"].append(torch.full((n,), lay.space))
            node["pos"].append(pos)
            node["role"].append(torch.full((n,), ROLES.index(lay.role)))
            node["permutable"].append(torch.full((n,), space.permutable))
            node["head"].append(pos // (n // space.heads) if space.heads > 1 else torch.full((n,), -1))
        t = {f"node_{k}": torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in node.items()}
        t["node_depth"] = t["node_layer"].clone()
        t["layer_size"] = torch.tensor([lay.size for lay in spec.layers], dtype=torch.long)
        t["layer_node_start"] = torch.tensor([lay.node_start for lay in spec.layers], dtype=torch.long)
        t["layer_space"] = torch.tensor([lay.space for lay in spec.layers], dtype=torch.long)
        t["layer_role"] = torch.tensor([ROLES.index(lay.role) for lay in spec.layers], dtype=torch.long)
        t["op_kind"] = torch.tensor([kind_of(op).code for op in spec.ops], dtype=torch.long)
        t["op_in_layer"] = torch.tensor([op.in_layer for op in spec.ops], dtype=torch.long)
        t["op_out_layer"] = torch.tensor([op.out_layer for op in spec.ops], dtype=torch.long)
        t["op_kernel"] = torch.tensor([op.entries_per_edge for op in spec.ops], dtype=torch.long)
        t["space_size"] = torch.tensor([s.size for s in spec.spaces], dtype=torch.long)
        t["space_permutable"] = torch.tensor([s.permutable for s in spec.spaces], dtype=torch.bool)
        sample, group, pos = [], [], []
        for gi, shape in enumerate(spec.groups):
            per = math.prod(shape[1:])
            sample.append(torch.arange(shape[0]).repeat_interleave(per))
            group.append(torch.full((shape[0] * per,), gi))
            pos.append(torch.arange(per).repeat(shape[0]))
        t["elem_sample"] = torch.cat(sample) if sample else torch.zeros(0, dtype=torch.long)
        t["elem_group"] = torch.cat(group) if group else torch.zeros(0, dtype=torch.long)
        t["elem_pos"] = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
        object.__setattr__(spec, "_tables", t)
        cached = t
    return {k: v.to(device) for k, v in cached.items()}


def edge_tensors(spec: GraphSpec) -> dict[str, Tensor]:
    """The explicit edges and parameter entries of a spec (see ``GradientGraph.materialize_edges``), cached."""
    cached = spec.__dict__.get("_edges")
    if cached is not None:
        return cached
    ei, eop, we, wo, wt, bn, bt = [], [], [], [], [], [], []
    n_edges = 0
    for k, op in enumerate(spec.ops):
        lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
        w_range = spec.theta_range(op.weight)
        src, dst, theta = kind_of(op).edges(op, lin.size, lout.size, w_range[0] if w_range else 0)
        ei.append(torch.stack([src + lin.node_start, dst + lout.node_start]))
        eop.append(torch.full((src.numel(),), k))
        if w_range is not None:
            K = theta.shape[1]
            we.append((n_edges + torch.arange(src.numel())).repeat_interleave(K))
            wo.append(torch.arange(K).repeat(src.numel()))
            wt.append(theta.reshape(-1))
        b_range = spec.theta_range(op.bias)
        if b_range is not None:
            bn.append(lout.node_start + torch.arange(lout.size))
            bt.append(torch.arange(*b_range))
        n_edges += src.numel()

    def cat(xs, dim=0):
        return torch.cat(xs, dim) if xs else torch.zeros((2, 0) if dim == 1 else 0, dtype=torch.long)

    cached = {"edge_index": cat(ei, 1), "edge_op": cat(eop), "wentry_edge": cat(we), "wentry_offset": cat(wo),
              "wentry_theta": cat(wt), "bentry_node": cat(bn), "bentry_theta": cat(bt)}
    object.__setattr__(spec, "_edges", cached)
    return cached
