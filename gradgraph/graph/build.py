"""Turn capture records into a GradientGraph: decide which op outputs and op inputs share nodes, lay out
the entries (node x element features), and check that every trainable parameter is represented."""
from __future__ import annotations

import collections
import functools
import math
import threading
import weakref
from collections import defaultdict

import torch

from ..capture.records import CaptureRecords, InSite, OutSite
from ..errors import NonFiniteGradientError, UnsupportedModuleError
from .gradient_graph import GradientGraph
from .spec import BlockSpec, GraphSpec, LayerSpec, OpSpec, ParamSpec, ParamUse, SpaceSpec


def build_spaces(rec: CaptureRecords) -> tuple[tuple[SpaceSpec, ...], dict[int, int]]:
    """Final neuron spaces (union-find roots, in creation order) and the map raw space id -> index."""
    table = rec.spaces
    parts = table.resolve_parts()
    roots = table.roots()
    index = {r: i for i, r in enumerate(roots)}
    group_index: dict[int, int] = {}
    members: dict[int, list[int]] = defaultdict(list)
    for r in roots:
        members[table.head_group(r)].append(r)

    def permutable(r):  # a space whose neurons keep their order within heads moves only if it has heads
        return table.fixed[r] is None and table.kind[r] == "hidden" and not table.output[r] and (
            table.within[r] is None or (table.heads[r] or 1) > 1)

    spaces = []
    for r in roots:
        role = "input" if table.kind[r] == "input" else "output" if table.output[r] else "hidden"
        hg = table.head_group(r)
        heads = table.heads[r] or 1
        spaces.append(SpaceSpec(
            key=table.name[r], size=table.size[r], role=role, permutable=permutable(r), heads=heads,
            head_group=group_index.setdefault(hg, len(group_index)),
            heads_permutable=heads > 1 and all(permutable(m) for m in members[hg]),
            reason=table.fixed[r] or (table.within[r] if not permutable(r) else None),
            parts=tuple(index[p] for p in parts.get(r, ())), within_heads=table.within[r]))
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
    return _intern(spec), layer_sites


def _intern(spec: GraphSpec) -> GraphSpec:
    """The one live GraphSpec equal to ``spec``: graphs captured from the same model on inputs of the same
    shape share their spec object, and with it the tables cached on it (structure tensors, entry indices).

    Specs are held weakly (keyed by their hash, so the table holds no spec strongly), except the most recent
    one: a loop that captures batch after batch and drops each graph before the next capture still reuses the
    cached tables. Memory held beyond the graphs' lifetime: one spec's tables (about 18 bytes per entry)."""
    key = hash(spec)
    live = _SPECS.get(key)
    if live is None or live != spec:
        _SPECS[key] = live = spec
    _RECENT.append(live)
    return live


_SPECS: weakref.WeakValueDictionary[int, GraphSpec] = weakref.WeakValueDictionary()
_RECENT: collections.deque = collections.deque(maxlen=1)


def entry_index(spec: GraphSpec, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The structural entry tensors of ``spec``: ``entry_mask`` [E, 2], ``entry_node`` [E] and
    ``entry_elem`` [E]. Dense blocks are element-major (entry of element m and node i at row m * n + i).
    Computed once per spec and device and shared by every graph of that spec (like the node and layer
    tables), so treat them as read-only. The rows of one-hot (vocabulary) blocks in ``entry_node`` hold
    ``node_start`` here; :func:`build_graph` adds the token ids of each capture to a copy."""
    cache = spec.__dict__.setdefault("_entry_index", {})
    key = str(device)
    if key not in cache:
        E = spec.num_entries
        mask = torch.empty(E, 2, dtype=torch.bool, device=device)
        node = torch.empty(E, dtype=torch.long, device=device)
        elem = torch.empty(E, dtype=torch.long, device=device)
        arange = functools.partial(torch.arange, dtype=torch.long, device=device)
        for layer in spec.layers:
            for blk in {id(b): b for b in (layer.a, layer.g) if b is not None}.values():
                M, n = math.prod(spec.groups[blk.group]), layer.size
                rows, elem0 = slice(blk.start, blk.start + blk.count), spec.group_offsets[blk.group]
                mask[rows, 0], mask[rows, 1] = "a" in blk.channels, "g" in blk.channels
                if blk.kind == "onehot":  # one entry per element, on the node of its token
                    node[rows] = layer.node_start
                    torch.arange(elem0, elem0 + M, out=elem[rows])
                else:
                    node[rows].view(M, n).copy_(arange(layer.node_start, layer.node_start + n))
                    elem[rows].view(M, n).copy_(arange(elem0, elem0 + M)[:, None])
        cache[key] = (mask, node, elem)
    return cache[key]


_BUFFER_LOCK = threading.Lock()


def _reusable_buffer(spec: GraphSpec, name: str, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    """A buffer for a per-capture tensor of ``spec`` (the one an earlier, dropped graph used, when possible).

    Why: a large capture's ``entry_x`` (117 MB for a 2-block GPT-2 at batch 8 x 128 tokens) is a fresh
    allocation each time, and the kernel's page faults on first touch cost about as much as writing it. So the
    spec keeps the last buffer and hands it out again, but only when nothing else refers to its memory: the
    graph gets a *view* of the cached tensor, so while that graph, its ``entry_x`` or any view of it (a slice,
    a numpy array) is alive the storage has more than the cache's one user and a new buffer is allocated.
    The check and the claim happen under one lock, so threads capturing at once never share a buffer."""
    cache = spec.__dict__.setdefault("_buffers", {})
    key = (name, str(device), dtype, shape)
    with _BUFFER_LOCK:
        buf = cache.get(key)
        # 2: the cached tensor, plus the temporary storage object of this very call
        if buf is None or torch._C._storage_Use_Count(buf.untyped_storage()._cdata) != 2:
            buf = torch.empty(shape, dtype=dtype, device=device)
            cache[key] = buf
        return buf.view(shape)


def release_buffers() -> None:
    """Drop the feature buffers every spec keeps for reuse (see :func:`_reusable_buffer`): the memory goes back
    once no graph uses it, and the next capture allocates afresh (the capture benchmark's memory measurement
    calls this, so that a step's peak counts the graph's features)."""
    with _BUFFER_LOCK:
        for spec in list(_SPECS.values()):
            spec.__dict__.pop("_buffers", None)


def _interleave(out: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> None:
    """``out[..., 0] = a; out[..., 1] = g`` in one pass (out [M, n, 2] contiguous, a and g [M, n], any strides).
    For float32/64 the pair is written as one complex number (``torch.complex`` into a complex view of ``out``):
    about 7x faster on CPU than ``torch.stack(..., dim=-1, out=out)`` and 2x faster than two strided copies."""
    if out.dtype in (torch.float32, torch.float64):
        torch.complex(a, g, out=torch.view_as_complex(out))
    else:
        out[..., 0].copy_(a)
        out[..., 1].copy_(g)


def build_graph(rec: CaptureRecords):
    """The GradientGraph of one capture: the spec plus the entry features, laid out block by block.

    Per capture only ``entry_x`` [E, 2] is written (each block once, in place: no intermediate stacks or
    concatenations); the structural entry tensors come from :func:`entry_index` (cached per spec), and only
    ``entry_node`` is copied when the model has an embedding (its one-hot rows hold this batch's token ids).
    Non-finite values are caught by one reduction over ``entry_x`` (a sum is finite only if every summand
    is); only then are the sites searched for the culprit (:meth:`CaptureRecords.check_finite`), so the
    error names the op.
    """
    spec, layer_sites = build_spec(rec)
    dtype = rec.dtype or torch.get_default_dtype()
    device = next((s.a.device for s, _ in layer_sites if s is not None), None)
    entry_mask, entry_node, entry_elem = entry_index(spec, device)
    entry_x = _reusable_buffer(spec, "entry_x", (spec.num_entries, 2), dtype, device)
    zero = torch.zeros((), dtype=dtype, device=device)
    node_copied = False
    for layer, (s, o) in zip(spec.layers, layer_sites):
        if layer.a is layer.g:
            blocks = [(layer.a, s.a, o.g)]
        else:
            blocks = [(blk, a, g) for blk, a, g in ((layer.a, s and s.a, None), (layer.g, None, o and o.g))
                      if blk is not None]
        for blk, a, g in blocks:
            M, n = math.prod(spec.groups[blk.group]), layer.size
            rows = slice(blk.start, blk.start + blk.count)
            if blk.kind == "onehot":  # a = 1 on the token's node, no g
                entry_x[rows, 0], entry_x[rows, 1] = 1, 0
                if not node_copied:  # this capture's own copy (rewritten whole: a user may have edited the last)
                    base, node_copied = entry_node, True
                    entry_node = _reusable_buffer(spec, "entry_node", tuple(base.shape), base.dtype, device)
                    entry_node.copy_(base)
                torch.add(base[rows], a.reshape(-1).to(device), out=entry_node[rows])
                continue
            # element-major, as in entry_index; a missing a or g is a broadcast zero
            av, gv = (zero.expand(M, n) if t is None else t.reshape(M, n).to(device=device, dtype=dtype)
                      for t in (a, g))
            _interleave(entry_x[rows].view(M, n, 2), av, gv)
            if g is not None and rec.grad_scale != 1.0:
                entry_x[rows, 1].mul_(rec.grad_scale)
    if not bool(torch.isfinite(entry_x.sum())) and not bool(torch.isfinite(entry_x).all()):
        rec.check_finite()
        raise NonFiniteGradientError(f"multiplying the output gradients by grad_scale={rec.grad_scale} overflowed "
                                     f"{dtype}; use a smaller scale or a wider dtype")
    return GradientGraph.from_parts(spec, entry_x=entry_x, entry_mask=entry_mask, entry_node=entry_node,
                                    entry_elem=entry_elem)


def check_coverage(spec: GraphSpec) -> None:
    """Every trainable scalar must be the weight or bias of at least one op. A parameter (or the same rows of
    it) used by several ops is weight sharing: its gradient is the sum over its uses (the uses' spaces were
    tied at capture). Uses that overlap without being the same rows are refused."""
    intervals = {}
    for op in spec.ops:
        for use in (op.weight, op.bias):
            r = spec.theta_range(use)
            if r is not None:
                intervals.setdefault(r, (use.name, []))[1].append(op.name)
    pos = 0
    for (lo, hi), (pname, _) in sorted(intervals.items()):
        if lo < pos:
            users = sorted({o for (l2, h2), (p2, ops) in intervals.items() if p2 == pname for o in ops})
            raise UnsupportedModuleError(
                f"parameter '{pname}' is used by ops {', '.join(users)} through overlapping but different blocks "
                "of its rows; gradgraph supports sharing a whole parameter (or the same rows of it) between ops, "
                "not partly overlapping blocks.")
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
