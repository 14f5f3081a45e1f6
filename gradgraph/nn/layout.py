"""Index tensors a metanetwork needs for one (batched) GradientGraph, computed once per forward.

Set-level features live on entries (one per node and set element, ``[E, f]``); node-level features on nodes
(``[N, f]``). Pooling is a scatter-mean over one of the index vectors below. Parameter-level heads work op by
op on dense blocks: graphs of identical structure in a batch are grouped so that one op of a group is a
single batched tensor operation, whatever the number of graphs.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from ..graph.gradient_graph import GradientGraph
from ..graph.kinds import kind_of
from ..graph.spec import GraphSpec, LayerSpec, OpSpec
from .compiled import cached_property


def _ptr(sizes: list[int], device) -> Tensor:
    return torch.tensor([0] + sizes, device=device).cumsum(0)


def _signature(spec: GraphSpec):
    sig = spec.__dict__.get("_signature")
    if sig is None:
        sig = (spec.structure_key(), spec.groups, tuple((lay.a, lay.g) for lay in spec.layers),
               tuple((op.kind, op.in_layer, op.out_layer, op.kernel, op.stride, op.padding, op.dilation,
                      op.padding_idx, spec.theta_range(op.weight), spec.theta_range(op.bias)) for op in spec.ops))
        object.__setattr__(spec, "_signature", sig)
    return sig


class StructureGroup:
    """Graphs of one batch that share their architecture and set layout."""

    def __init__(self, layout: "BatchLayout", spec: GraphSpec, graphs: Tensor, index: int = 0) -> None:
        self.layout, self.spec, self.graphs, self.index = layout, spec, graphs, index
        self.entry_off, self.node_off, self.theta_off = layout.memo(("offsets", index), lambda: (
            layout.entry_ptr[graphs], layout.node_ptr[graphs], layout.theta_ptr[graphs]))
        self._dev = graphs.device

    @property
    def size(self) -> int:
        return self.graphs.numel()

    def block(self, h: Tensor, layer: LayerSpec, which: str) -> Tensor:
        """Entry features of one layer's a- or g-block, dense: [G, b, *spatial, n, f] ("onehot" blocks:
        [G, b, *spatial, f], one entry per element)."""
        blk = layer.a if which == "a" else layer.g
        shape = self.spec.groups[blk.group]
        if self.layout.uniform:  # graphs are consecutive blocks of entries: a view, no gather
            out = h.view(self.size, -1, h.shape[-1])[:, blk.start:blk.start + blk.count]
        else:
            idx = self.entry_off[:, None] + blk.start + torch.arange(blk.count, device=self._dev)
            out = h.index_select(0, idx.reshape(-1)).view(self.size, blk.count, h.shape[-1])
        if blk.kind == "onehot":
            return out.view(self.size, *shape, h.shape[-1])
        return out.view(self.size, *shape, layer.size, h.shape[-1])

    def tokens(self, layer: LayerSpec) -> Tensor:
        """Token ids of a vocabulary layer's one-hot block: [G, b, *spatial]."""
        blk = layer.a
        idx = self.entry_off[:, None] + blk.start + torch.arange(blk.count, device=self._dev)
        ids = self.layout.graph.entry_node[idx] - (self.node_off[:, None] + layer.node_start)
        return ids.view(self.size, *self.spec.groups[blk.group])

    def nodes(self, u: Tensor, layer: LayerSpec) -> Tensor:
        """Node features of one layer: [G, n, f]."""
        if self.layout.uniform:
            return u.view(self.size, -1, u.shape[-1])[:, layer.node_start:layer.node_start + layer.size]
        idx = self.node_off[:, None] + layer.node_start + torch.arange(layer.size, device=self._dev)
        return u.index_select(0, idx.reshape(-1)).view(self.size, layer.size, u.shape[-1])

    def theta_index(self, op: OpSpec) -> Tensor | None:
        """Global theta rows of the op's weights in its kind's canonical layout [G, n_out, n_in', K] (None if
        the weight is frozen). Structure only: computed once per structure (see ``BatchLayout.memo``)."""
        return self.layout.memo(("theta", self.index, id(op)), lambda: self._theta_index(op))

    def _theta_index(self, op: OpSpec) -> Tensor | None:
        r = self.spec.theta_range(op.weight)
        if r is None:
            return None
        n_in, n_out = self.spec.layers[op.in_layer].size, self.spec.layers[op.out_layer].size
        local = kind_of(op).theta_index(op, n_in, n_out, r[0]).to(self._dev)
        return self.theta_off.view(-1, 1, 1, 1) + local

    def bias_index(self, op: OpSpec) -> Tensor | None:
        """Global theta rows of the op's biases: [G, n_out] (None if there is no trainable bias)."""
        return self.layout.memo(("bias", self.index, id(op)), lambda: self._bias_index(op))

    def _bias_index(self, op: OpSpec) -> Tensor | None:
        r = self.spec.theta_range(op.bias)
        if r is None:
            return None
        return self.theta_off[:, None] + torch.arange(r[0], r[1], device=self._dev)

    def param_rows(self, out: Tensor, op: OpSpec, bias: bool = False) -> Tensor | None:
        """The rows of ``out`` [P, C] (theta order) holding the op's weights (or biases), as a view
        [G, n, C] in canonical order, when the op's rows are one contiguous range of every graph's block (a
        linear or conv weight in theta order, any bias) and the group's graphs are evenly spaced (a single
        graph or a uniform batch): then a head writes them with a copy instead of an indexed scatter. None
        otherwise (frozen, or rows in another order: use ``theta_index``/``bias_index``)."""
        rows = self.layout.memo(("rows", self.index, id(op), bias), lambda: self._param_rows(op, bias))
        if rows is None:
            return None
        lo, hi = rows
        if self.size == 1:
            off = self.layout.theta_starts[self.layout.group_members[self.index][0]]
            return out[off + lo:off + hi][None]
        if self.layout.uniform:
            return out.view(self.size, -1, out.shape[-1])[:, lo:hi]
        return None

    def _param_rows(self, op: OpSpec, bias: bool):
        r = self.spec.theta_range(op.bias if bias else op.weight)
        if r is None:
            return None
        if not bias:
            n_in, n_out = self.spec.layers[op.in_layer].size, self.spec.layers[op.out_layer].size
            local = kind_of(op).theta_index(op, n_in, n_out, r[0]).reshape(-1)
            if not torch.equal(local, torch.arange(r[0], r[0] + local.numel())):
                return None
        return r


class _Structure:
    """What a layout needs that depends on the specs alone: offsets (as tensors and Python ints), the
    structure groups, and a memo of structure-only tensors (index tensors, positional encodings...).

    One per forward would rebuild them every call (small tensor ops, ``int()`` reads, ``torch.unique``),
    which dominated GradMetaNet's cost on small models; when every graph of the layout has the same spec
    object (a single graph, or a batch of graphs of one interned spec, as in a learned optimizer's steps),
    it is cached on that spec (like the spec's entry tables, see ``gradgraph.graph.build``), per number of
    graphs and device."""

    def __init__(self, specs: list[GraphSpec], device) -> None:
        self.memo: dict = {}
        counts = {name: [getattr(s, name) for s in specs]
                  for name in ("num_entries", "num_nodes", "num_params", "num_samples")}
        self.ptrs = {name: _ptr(sizes, device) for name, sizes in counts.items()}
        self.totals = {name: sum(sizes) for name, sizes in counts.items()}
        starts = [0]
        for n in counts["num_params"]:
            starts.append(starts[-1] + n)
        self.theta_starts = starts
        by_sig: dict = {}
        for gi, spec in enumerate(specs):
            by_sig.setdefault(_signature(spec), []).append(gi)
        self.group_members = list(by_sig.values())
        self.group_graphs = [torch.tensor(gis, device=device) for gis in self.group_members]

    @classmethod
    def of(cls, specs: list[GraphSpec], device) -> "_Structure":
        if not all(s is specs[0] for s in specs):
            return cls(specs, device)
        cache = specs[0].__dict__.setdefault("_layout_structure", {})
        key = (len(specs), str(device))
        if key not in cache:
            cache[key] = cls(specs, device)
        return cache[key]


class BatchLayout:
    """Offsets and pooling indices of a GradientGraph or a PyG batch of them."""

    def __init__(self, graph: GradientGraph) -> None:
        self.graph = graph
        self.specs = graph.specs
        dev = graph.entry_x.device
        self.device = dev
        self.num_graphs = len(self.specs)
        st = self._structure = _Structure.of(self.specs, dev)
        self.entry_ptr, self.node_ptr = st.ptrs["num_entries"], st.ptrs["num_nodes"]
        self.theta_ptr, self.sample_ptr = st.ptrs["num_params"], st.ptrs["num_samples"]
        self.num_entries, self.num_nodes = st.totals["num_entries"], st.totals["num_nodes"]
        self.num_params, self.num_samples = st.totals["num_params"], st.totals["num_samples"]
        self.theta_starts, self.group_members = st.theta_starts, st.group_members

    def memo(self, key, fn):
        """``fn()``, computed once per structure (cached with the spec, see ``_Structure``): only for values that
        depend on the specs alone, never on the graph's features or on parameters."""
        memo = self._structure.memo
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    # -- per-entry indices --------------------------------------------------------------------------
    @cached_property
    def node_graph(self) -> Tensor:
        """[N] graph of each node."""
        if "batch" in self.graph._store:
            return self.graph.batch
        return torch.zeros(self.num_nodes, dtype=torch.long, device=self.device)

    @cached_property
    def entry_sample(self) -> Tensor:
        return self.graph.elem_sample[self.graph.entry_elem]

    @cached_property
    def entry_graph(self) -> Tensor:
        return self.node_graph[self.graph.entry_node]

    @cached_property
    def entry_layer(self) -> Tensor:
        return self.graph.node_layer[self.graph.entry_node]

    @cached_property
    def sample_graph(self) -> Tensor:
        """[B] graph of each sample."""
        sizes = torch.diff(self.sample_ptr)
        return torch.repeat_interleave(torch.arange(self.num_graphs, device=self.device), sizes)

    def pool_index(self, axis: str) -> tuple[Tensor, int]:
        """Segment index of every entry for a pooling axis, and the number of segments:

        * ``node``: the node's own set elements (the set axis).
        * ``layer``: the entries of the node's layer at the same element (neurons of one layer).
        * ``element``: all neurons at the same element (sample, or sample x token/position).
        * ``sample``: all entries of the same sample in its graph (the neuron axis).
        * ``graph``: everything in the graph.
        """
        cache = self.__dict__.setdefault("_pool", {})
        if axis not in cache:
            g = self.graph
            if axis == "node":
                cache[axis] = (g.entry_node, self.num_nodes)
            elif axis == "element":
                cache[axis] = (g.entry_elem, int(g.elem_sample.numel()))
            elif axis == "sample":
                cache[axis] = (self.entry_sample, self.num_samples)
            elif axis == "graph":
                cache[axis] = (self.entry_graph, self.num_graphs)
            elif axis == "layer":  # structure only (torch.unique: once per structure, never in compiled code)
                cache[axis] = self.memo(("pool", "layer"), self._layer_pool)
            else:
                raise ValueError(f"unknown pooling axis {axis!r}: use node, layer, element, sample or graph")
        return cache[axis]

    def _layer_pool(self) -> tuple[Tensor, int]:
        g = self.graph
        key = self.entry_layer * max(int(g.elem_sample.numel()), 1) + g.entry_elem
        uniq, inv = torch.unique(key, return_inverse=True)
        return inv, uniq.numel()

    @cached_property
    def uniform(self) -> bool:
        """True when every graph of the batch has the same structure and only dense blocks: then entries
        are [G, E_g, f] and every pool is a reshape and a sum (no index ops)."""
        return len(self.group_members) == 1 and all(
            blk.kind == "dense" for lay in self.specs[0].layers for blk in (lay.a, lay.g) if blk is not None)

    def pool_apply(self, h: Tensor, axis: str, fn=None) -> Tensor:
        """Mean of ``h`` [E, f] over each segment of ``axis`` (see pool_index), ``fn`` applied per segment,
        broadcast back to every entry: [E, f_out]."""
        return self.pool_sum(h, [(axis, fn)])

    def pool_sum(self, h: Tensor, terms, base: Tensor | None = None) -> Tensor:
        """``base + sum_i fn_i(mean of h over axis_i)``, each term broadcast back to the entries, for
        ``terms = [(axis_i, fn_i), ...]``: [E, f_out]. On uniform batches every block is written once."""
        if not self.uniform:
            out = base
            for axis, fn in terms:
                idx, size = self.pool_index(axis)
                pooled = scatter(h, idx, 0, dim_size=size, reduce="mean")
                t = (fn(pooled) if fn is not None else pooled).index_select(0, idx)
                out = t if out is None else out + t
            return out
        spec, G = self.specs[0], self.num_graphs
        blocks = [(lay, blk) for lay in spec.layers for blk in self._blocks(lay)]
        dense = {id(blk): self._dense(h, blk, lay.size) for lay, blk in blocks}
        pieces = [self._dense_pieces(h, dense, blocks, axis, fn) for axis, fn in terms]
        f_out = pieces[0][id(blocks[0][1])].shape[-1]
        out = h.new_empty(G, spec.num_entries, f_out)
        for lay, blk in blocks:
            acc = sum(p[id(blk)] for p in pieces)
            if base is not None:
                acc = acc + self._dense(base, blk, lay.size)
            out[:, blk.start:blk.start + blk.count] = acc.expand(G, dense[id(blk)].shape[1], lay.size,
                                                                 f_out).reshape(G, -1, f_out)
        return out.view(-1, f_out)

    def node_mean(self, h: Tensor) -> Tensor:
        """Mean of entry features over each node's set elements: [E, f] -> [N, f]."""
        if not self.uniform:
            idx, size = self.pool_index("node")
            return scatter(h, idx, 0, dim_size=size, reduce="mean")
        spec, G = self.specs[0], self.num_graphs
        parts = []
        for lay in spec.layers:
            sums, count = None, 0
            for blk in self._blocks(lay):
                x = self._dense(h, blk, lay.size)
                s = x.sum(1)
                sums = s if sums is None else sums + s
                count += x.shape[1]
            parts.append(sums / count)
        return torch.cat(parts, 1).reshape(G * spec.num_nodes, -1)

    def graph_mean(self, h: Tensor) -> Tensor:
        """Mean of entry features per graph: [E, f] -> [num_graphs, f]."""
        if self.uniform:
            return h.view(self.num_graphs, -1, h.shape[-1]).mean(1)
        idx, size = self.pool_index("graph")
        return scatter(h, idx, 0, dim_size=size, reduce="mean")

    def layer_scales(self, x: Tensor, mask: Tensor, eps: float = 1e-12, by: str = "layer") -> Tensor:
        """Root mean square of each channel over each (graph, layer) or, with ``by="space"``, each (graph,
        neuron space), masked, broadcast back to the entries: x, mask [E, c] -> [E, c]."""
        m = mask.to(x.dtype)
        if by not in ("layer", "space"):
            raise ValueError(f"scales are taken per 'layer' or per 'space', not {by!r}")
        if by == "space" or not self.uniform:
            g = self.graph
            idx = self.entry_layer if by == "layer" else g.node_space.index_select(0, g.entry_node)
            size = int((g.layer_size if by == "layer" else g.space_size).numel())
            ms = scatter(x * x * m, idx, 0, dim_size=size, reduce="sum") / scatter(
                m, idx, 0, dim_size=size, reduce="sum").clamp_min(1)
            return (ms.sqrt() + eps).index_select(0, idx)
        spec, G, c = self.specs[0], self.num_graphs, x.shape[-1]
        out = x.new_empty(G, spec.num_entries, c)
        for lay in spec.layers:
            blocks = self._blocks(lay)
            xs = [self._dense(x, b, lay.size) for b in blocks]
            ms = [self._dense(m, b, lay.size) for b in blocks]
            total = sum((xb * xb * mb).sum((1, 2)) for xb, mb in zip(xs, ms))
            count = sum(mb.sum((1, 2)) for mb in ms).clamp_min(1)
            rms = (total / count).sqrt() + eps  # [G, c]
            for b in blocks:
                out[:, b.start:b.start + b.count] = rms[:, None, :]
        return out.view(-1, c)

    # -- dense fast path (uniform batches) ---------------------------------------------------------------
    @staticmethod
    def _blocks(lay: LayerSpec):
        return [lay.a] if lay.a is lay.g else [blk for blk in (lay.a, lay.g) if blk is not None]

    def _dense(self, h: Tensor, blk, n: int) -> Tensor:
        """A block as [G, M, n, f] (a view when h is contiguous)."""
        G, f = self.num_graphs, h.shape[-1]
        return h.view(G, -1, f)[:, blk.start:blk.start + blk.count].reshape(G, -1, n, f)

    def _dense_pieces(self, h: Tensor, dense: dict, blocks, axis: str, fn) -> dict:
        """Per block, the pooled (and mapped) values of one axis, broadcastable to [G, M, n, f_out]."""
        spec, G = self.specs[0], self.num_graphs
        apply = fn if fn is not None else (lambda t: t)
        pieces: dict[int, Tensor] = {}  # block -> pooled values broadcastable to [G, M, n, f_out]
        if axis == "layer":
            for _, blk in blocks:
                pieces[id(blk)] = apply(dense[id(blk)].mean(2, keepdim=True))
        elif axis == "node":
            for lay in spec.layers:
                bl = self._blocks(lay)
                mean = sum(dense[id(b)].sum(1, keepdim=True) for b in bl) / sum(dense[id(b)].shape[1] for b in bl)
                out = apply(mean)
                for b in bl:
                    pieces[id(b)] = out
        elif axis == "graph":
            out = apply(h.view(G, -1, h.shape[-1]).mean(1))[:, None, None]
            for _, blk in blocks:
                pieces[id(blk)] = out
        elif axis in ("sample", "element"):
            key = (lambda blk: 0) if axis == "sample" else (lambda blk: blk.group)
            sums: dict[int, Tensor] = {}
            counts: dict[int, int] = {}
            for _, blk in blocks:
                b = spec.groups[blk.group][0]
                x = dense[id(blk)]
                x = x.reshape(G, b, -1, x.shape[-1]) if axis == "sample" else x
                s = x.sum(2)
                k = key(blk)
                sums[k] = s if k not in sums else sums[k] + s
                counts[k] = counts.get(k, 0) + (x.shape[2])
            means = {k: apply(sums[k] / counts[k]) for k in sums}
            for _, blk in blocks:
                m = means[key(blk)]
                if axis == "sample":
                    per = dense[id(blk)].shape[1] // m.shape[1]
                    m = m.repeat_interleave(per, 1) if per > 1 else m
                pieces[id(blk)] = m[:, :, None]
        else:
            raise ValueError(f"unknown pooling axis {axis!r}: use node, layer, element, sample or graph")
        return pieces

    @cached_property
    def groups(self) -> list[StructureGroup]:
        st = self._structure
        return [StructureGroup(self, self.specs[gis[0]], graphs, i)
                for i, (gis, graphs) in enumerate(zip(st.group_members, st.group_graphs))]
