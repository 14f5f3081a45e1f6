"""Turn capture records into a GradientGraph: decide which op outputs and op inputs share nodes, lay out
the entries (node x element features), and check that every trainable parameter is represented."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..capture.records import CaptureRecords, InSite, OutSite
from ..errors import UnsupportedModuleError
from .spec import BlockSpec, GraphSpec, LayerSpec, OpSpec, ParamSpec, ParamUse, SpaceSpec


def build_spaces(rec: CaptureRecords) -> tuple[tuple[SpaceSpec, ...], dict[int, int]]:
    """Final neuron spaces (union-find roots, in creation order) and the map raw space id -> index."""
    table = rec.spaces
    roots = table.roots()
    index = {r: i for i, r in enumerate(roots)}
    group_index: dict[int, int] = {}
    members: dict[int, list[int]] = defaultdict(list)
    for r in roots:
        members[table.head_group(r)].append(r)

    def permutable(r):
        return table.fixed[r] is None and table.kind[r] == "hidden" and not table.output[r]

    spaces = []
    for r in roots:
        role = "input" if table.kind[r] == "input" else "output" if table.output[r] else "hidden"
        hg = table.head_group(r)
        heads = table.heads[r] or 1
        spaces.append(SpaceSpec(
            key=table.name[r], size=table.size[r], role=role, permutable=permutable(r), heads=heads,
            head_group=group_index.setdefault(hg, len(group_index)),
            heads_permutable=heads > 1 and all(permutable(m) for m in members[hg]),
            reason=table.fixed[r]))
    return tuple(spaces), {s: index[table.find(s)] for s in range(len(table.size))}


def build_spec(rec: CaptureRecords) -> tuple[GraphSpec, list[tuple[InSite | None, OutSite | None]]]:
    """The graph's structure from the records' shapes alone (no gradient needed), and per layer the
    in-site (a) and out-site (g) it takes its features from."""
    spaces, space_of = build_spaces(rec)

    # an op output and the one op input computed from it by elementwise ops share a node (g and a)
    consumers: dict[int, list[InSite]] = defaultdict(list)
    for site in rec.insites:
        if site.origin is not None:
            consumers[site.origin].append(site)
    merged = {oid: sites[0] for oid, sites in consumers.items()
              if len(sites) == 1 and space_of[sites[0].space] == space_of[rec.outsites[oid].space]}

    layer_sites: list[tuple[InSite | None, OutSite | None]] = []
    layer_of_in: dict[tuple, int] = {}
    layer_of_out: dict[int, int] = {}
    for op in rec.ops:
        s, o = op.insite, op.outsite
        if s.key not in layer_of_in:
            layer_of_in[s.key] = len(layer_sites)
            layer_sites.append((s, None))
        if o.id not in layer_of_out:
            layer_of_out[o.id] = len(layer_sites)
            partner = merged.get(o.id)
            layer_sites.append((partner, o))
            if partner is not None:
                layer_of_in[partner.key] = layer_of_out[o.id]

    groups: list[tuple[int, ...]] = []

    def group_id(shape):
        if shape not in groups:
            groups.append(shape)
        return groups.index(shape)

    layers = []
    node_start = entry_start = 0
    for s, o in layer_sites:
        n = (o or s).n
        space = space_of[(o or s).space]
        ga = group_id(s.elem_shape) if s is not None else None
        gg = group_id(o.elem_shape) if o is not None else None
        a_blk = g_blk = None
        if s is not None and o is not None and ga == gg and s.kind == "dense":
            a_blk = g_blk = BlockSpec("ag", "dense", entry_start, ga, math.prod(s.elem_shape) * n)
            entry_start += a_blk.count
        else:
            if s is not None:
                count = math.prod(s.elem_shape) * (n if s.kind == "dense" else 1)
                a_blk = BlockSpec("a", s.kind, entry_start, ga, count)
                entry_start += count
            if o is not None:
                g_blk = BlockSpec("g", "dense", entry_start, gg, math.prod(o.elem_shape) * n)
                entry_start += g_blk.count
        layers.append(LayerSpec(key=(o.name if o is not None else s.name), size=n, space=space,
                                role=spaces[space].role, node_start=node_start, a=a_blk, g=g_blk))
        node_start += n

    params, offset = [], 0
    for name, shape, trainable in rec.params:
        params.append(ParamSpec(name, tuple(shape), offset if trainable else None))
        if trainable:
            offset += math.prod(shape)

    def use(ref):
        return None if ref is None else ParamUse(ref.name, ref.rows)

    ops = []
    for op in rec.ops:
        geo = op.geometry
        ops.append(OpSpec(
            name=op.name, kind=op.kind, in_layer=layer_of_in[op.insite.key], out_layer=layer_of_out[op.outsite.id],
            weight=use(op.weight), bias=use(op.bias), kernel=tuple(geo.get("kernel", geo.get("spatial", ()))),
            stride=tuple(geo.get("stride", ())), dilation=tuple(geo.get("dilation", ())),
            padding=tuple(geo.get("padding", ())), padding_idx=geo.get("padding_idx"),
            buffers=tuple(geo.get("buffers", ()))))

    spec = GraphSpec(tuple(spaces), tuple(layers), tuple(ops), tuple(groups), tuple(params), tuple(rec.buffers.items()))
    check_coverage(spec)
    return spec, layer_sites


def build_graph(rec: CaptureRecords):
    """The GradientGraph of one capture: the spec plus the entry features, laid out block by block."""
    from .gradient_graph import GradientGraph

    spec, layer_sites = build_spec(rec)
    dtype = rec.dtype or torch.get_default_dtype()
    device = next((s.a.device for s, _ in layer_sites if s is not None), None)
    x_parts, mask_parts, node_parts, elem_parts = [], [], [], []
    offsets = spec.group_offsets
    for layer, (s, o) in zip(spec.layers, layer_sites):
        n = layer.size
        if layer.a is layer.g:
            blocks = [(layer.a, s.a, o.g)]
        else:
            blocks = [(blk, a, g) for blk, a, g in ((layer.a, s and s.a, None), (layer.g, None, o and o.g))
                      if blk is not None]
        for blk, a, g in blocks:
            M = math.prod(spec.groups[blk.group])
            if blk.kind == "onehot":
                x = torch.zeros(M, 2, dtype=dtype, device=device)
                x[:, 0] = 1
                has = (True, False)
                nodes = layer.node_start + a.reshape(-1).to(device)
                elems = torch.arange(M, device=device)
            else:
                av = a.reshape(M * n).to(dtype) if a is not None else torch.zeros(M * n, dtype=dtype, device=device)
                gv = (g.reshape(M * n).to(dtype) * rec.grad_scale if g is not None
                      else torch.zeros(M * n, dtype=dtype, device=device))
                x = torch.stack([av, gv], -1)
                has = (a is not None, g is not None)
                nodes = layer.node_start + torch.arange(n, device=device).repeat(M)
                elems = torch.arange(M, device=device).repeat_interleave(n)
            x_parts.append(x)
            mask_parts.append(torch.tensor([has], device=device).expand(x.shape[0], 2))
            node_parts.append(nodes)
            elem_parts.append(offsets[blk.group] + elems)
    return GradientGraph.from_parts(
        spec,
        entry_x=torch.cat(x_parts) if x_parts else torch.zeros(0, 2, dtype=dtype),
        entry_mask=torch.cat(mask_parts) if mask_parts else torch.zeros(0, 2, dtype=torch.bool),
        entry_node=torch.cat(node_parts) if node_parts else torch.zeros(0, dtype=torch.long),
        entry_elem=torch.cat(elem_parts) if elem_parts else torch.zeros(0, dtype=torch.long),
    )


def check_coverage(spec: GraphSpec) -> None:
    """Every trainable scalar must be the weight or bias of exactly one op."""
    intervals = []
    for op in spec.ops:
        for use in (op.weight, op.bias):
            r = spec.theta_range(use)
            if r is not None:
                intervals.append((r[0], r[1], use.name, op.name))
    intervals.sort()
    pos = 0
    for lo, hi, pname, opname in intervals:
        if lo < pos:
            users = sorted({o for l2, h2, p2, o in intervals if p2 == pname})
            raise UnsupportedModuleError(
                f"parameter '{pname}' is used by more than one op ({', '.join(users)}): gradgraph does not support "
                "weight sharing (a module called twice, tied weights) because every weight must be one edge.")
        if lo > pos:
            _raise_missing(spec, pos, lo)
        pos = hi
    if pos < spec.num_params:
        _raise_missing(spec, pos, spec.num_params)


def _raise_missing(spec: GraphSpec, lo: int, hi: int) -> None:
    names = [p.name for p in spec.trainable if p.offset < hi and p.offset + p.numel > lo]
    raise UnsupportedModuleError(
        f"trainable parameter(s) {names} took no part in the recorded forward pass (the module was never "
        "called, or a custom forward used the parameter without a gradgraph rule), so their gradient cannot be "
        "represented. Freeze unused parameters with requires_grad_(False) or register a rule for the module.")
