"""GradientGraph: a model's batch gradient as a PyTorch Geometric graph of neurons."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
from torch_geometric.data.storage import GlobalStorage

from ..errors import SetSizeMismatchError, StructureMismatchError
from ..io import load_file, save_file
from . import spec as _spec
from . import stats
from .kinds import kind_of
from .spec import GraphSpec
from .tables import edge_tensors, structure_tensors

# attribute -> the per-graph count it is offset by when graphs are batched
_INC = {
    "entry_node": "num_nodes", "entry_elem": "num_elements", "elem_sample": "num_samples",
    "elem_group": "num_groups", "node_layer": "num_layers", "node_space": "num_spaces",
    "layer_node_start": "num_nodes", "layer_space": "num_spaces", "op_in_layer": "num_layers",
    "op_out_layer": "num_layers", "edge_index": "num_nodes", "edge_op": "num_ops", "wentry_edge": "num_edges",
    "wentry_theta": "num_params", "bentry_node": "num_nodes", "bentry_theta": "num_params",
}
_PREFIXES = ("entry_", "elem_", "node_", "layer_", "op_", "space_", "wentry_", "bentry_", "edge_op")
_ENTRY_KEYS = ("entry_x", "entry_mask", "entry_node", "entry_elem")  # from_parts' arguments, in order
_DERIVED = ("num_nodes", "num_samples", "num_elements", "num_groups", "num_layers", "num_ops", "num_spaces",
            "num_params")
EDGE_KEYS = ("edge_index", "edge_op", "wentry_edge", "wentry_offset", "wentry_theta", "bentry_node", "bentry_theta")


class _GraphStore(GlobalStorage):
    """A graph's attribute store whose edge tensors appear on first access: they depend on the structure only,
    so reading ``edge_index`` of an un-materialized graph materializes it (what PyG's collation does when a
    materialized graph is batched with a fresh one) instead of raising KeyError."""

    def __getitem__(self, key: str):
        mapping = self.__dict__["_mapping"]
        if key in EDGE_KEYS and key not in mapping and "spec" in mapping:
            self._parent().materialize_edges()
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:  # what is stored (Mapping's default would materialize through getitem)
        return key in self.__dict__["_mapping"]


class GradientGraph(Data):
    r"""A batch's gradient as a graph: neurons are nodes, weights are edges, and every node carries, for
    each element of the set (sample, or sample x token/position), its activation ``a`` and pre-activation
    gradient ``g``. For a linear op the per-sample weight gradient is :math:`\sum_{e \in n} g_e a_e^\top`,
    so the graph holds the whole gradient in O(neurons x elements) numbers, not O(parameters x samples).

    Built by :func:`gradgraph.capture` or :class:`gradgraph.GradientRecorder`. Shapes (``E`` entries,
    ``M`` elements, ``N`` nodes, ``L`` layers, ``K`` ops, ``S`` spaces, ``P`` trainable scalars):

    * ``entry_x`` [E, 2]: (a, g) of one node on one element; ``entry_mask`` [E, 2] which of the two exist
      (input nodes have only ``a``, output nodes only ``g``; a node whose ``a`` and ``g`` live on different
      elements, e.g. across a pooling layer, has separate a-entries and g-entries).
    * ``entry_node`` [E], ``entry_elem`` [E]: the entry's node and element.
    * ``elem_sample`` [M] (the element's sample), ``elem_group`` [M] (its resolution/sequence group),
      ``elem_pos`` [M] (its position within the sample's spatial grid or sequence).
    * ``node_layer``, ``node_space``, ``node_pos`` (index within its layer), ``node_depth`` (layer index,
      not offset by batching), ``node_role`` (0 input, 1 hidden, 2 output), ``node_permutable`` (bool;
      non-permutable nodes are identified by (depth, pos)), ``node_head`` (attention head within its space,
      -1 if none): all [N].
    * ``layer_size``/``layer_node_start``/``layer_space``/``layer_role`` [L]; ``op_kind``/``op_in_layer``/
      ``op_out_layer``/``op_kernel`` (weights per edge) [K]; ``space_size``/``space_permutable`` [S].
    * ``spec``: the :class:`~gradgraph.graph.spec.GraphSpec` (names, shapes, parameter layout).

    Edges are implicit until :meth:`materialize_edges` (a dense layer has n_in x n_out of them, which would
    cost more than the features): it adds ``edge_index`` [2, E_w], ``edge_op`` [E_w], the weight entries
    ``wentry_edge``/``wentry_offset``/``wentry_theta`` [W] and the bias entries ``bentry_node``/
    ``bentry_theta`` [B] (W + B = P). Datasets store materialized graphs; call it before batching raw
    captures if you need edges.

    Parameter-level data lives in *theta order*: the trainable parameters flattened and concatenated in
    ``model.named_parameters()`` order, ``[P]`` or ``[P, C]`` (:meth:`params_to_graph`/:meth:`graph_to_params`).

    Graphs of different architectures batch with ``torch_geometric.loader.DataLoader``; the batch keeps
    ``spec`` as a list.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        store = _GraphStore(_parent=self)
        store._mapping.update(self.__dict__["_store"]._mapping)
        self.__dict__["_store"] = store

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, spec: GraphSpec, entry_x: Tensor, entry_mask: Tensor, entry_node: Tensor,
                   entry_elem: Tensor) -> "GradientGraph":
        attrs = dict(entry_x=entry_x, entry_mask=entry_mask, entry_node=entry_node, entry_elem=entry_elem,
                     spec=spec, num_nodes=spec.num_nodes, num_samples=spec.num_samples,
                     num_elements=spec.num_elements, num_groups=len(spec.groups), num_layers=len(spec.layers),
                     num_ops=len(spec.ops), num_spaces=len(spec.spaces), num_params=spec.num_params,
                     **structure_tensors(spec, entry_x.device))
        graph = cls()
        # every attribute is a tensor or an int gradgraph built itself: filling the store at once skips PyG's
        # per-attribute setattr checks (~165 us for these 33 attributes, a third of a small model's capture)
        graph._store._mapping.update(attrs)
        return graph

    def __inc__(self, key, value, *args, **kwargs):
        if key in _INC:
            return getattr(self, _INC[key])
        return super().__inc__(key, value, *args, **kwargs)

    def __cat_dim__(self, key, value, *args, **kwargs):
        if key == "edge_index":
            return -1
        if key.startswith(_PREFIXES):
            return 0
        return super().__cat_dim__(key, value, *args, **kwargs)

    @property
    def num_edges(self) -> int:
        """Number of weight edges (materialized or not)."""
        if "edge_index" in self._store:
            return self._store["edge_index"].size(1)
        return sum(s.num_edges() for s in self.specs)

    @property
    def specs(self) -> list[GraphSpec]:
        """The spec of every graph (one for a single graph, one per graph for a batch)."""
        return list(self.spec) if isinstance(self.spec, (list, tuple)) else [self.spec]

    @property
    def is_batch(self) -> bool:
        return isinstance(self, Batch)

    @property
    def set_size(self) -> int:
        """Samples in the set (for a batch: the common set size; raises if graphs differ)."""
        sizes = {s.num_samples for s in self.specs}
        if len(sizes) != 1:
            raise SetSizeMismatchError(f"the graphs in this batch have different set sizes {sorted(sizes)}")
        return sizes.pop()

    # -- features ---------------------------------------------------------------------------------------
    def layer_features(self, layer: int, which: str) -> Tensor:
        """Dense ``a`` or ``g`` of one layer: [b, *spatial, n] (token ids [b, *spatial] for a vocabulary)."""
        self._single("layer_features")
        spec = self.spec
        lay = spec.layers[layer]
        blk = lay.a if which == "a" else lay.g
        if blk is None:
            raise ValueError(f"layer '{lay.key}' has no '{which}' (input layers carry only a, output only g)")
        shape = spec.groups[blk.group]
        if blk.kind == "onehot":
            return (self.entry_node[blk.start:blk.start + blk.count] - lay.node_start).view(shape)
        ch = 0 if which == "a" else 1
        return self.entry_x[blk.start:blk.start + blk.count, ch].view(*shape, lay.size)

    def per_sample_grads(self) -> dict[str, Tensor]:
        """Per-sample gradient of every trainable parameter, rebuilt from the graph: name -> [b, *shape]."""
        return self._grads(per_sample=True)

    def grads(self) -> dict[str, Tensor]:
        """Gradient of the summed loss (what autograd puts in ``.grad``): name -> [*shape]."""
        return self._grads(per_sample=False)

    def _grads(self, per_sample: bool) -> dict[str, Tensor]:
        self._single("per_sample_grads/grads")
        spec = self.spec
        b = spec.num_samples
        lead = (b,) if per_sample else ()
        out = {p.name: self.entry_x.new_zeros(lead + p.shape) for p in spec.trainable}
        seen: set = set()  # a shared parameter's gradient is the sum over its uses
        for op in spec.ops:
            A = self.layer_features(op.in_layer, "a")
            G = self.layer_features(op.out_layer, "g")
            kind = kind_of(op)
            if spec.theta_range(op.weight) is not None:
                grad = kind.per_sample_grad(op, A, G, spec.layers[op.in_layer].size, spec.layers[op.out_layer].size)
                grad = grad.reshape((b,) + spec.use_shape(op.weight))
                _put(out[op.weight.name], op.weight.rows, grad if per_sample else grad.sum(0), per_sample, seen)
            if spec.theta_range(op.bias) is not None:
                grad = kind.bias_grad(op, G)
                _put(out[op.bias.name], op.bias.rows, grad if per_sample else grad.sum(0), per_sample, seen)
        return out

    def per_sample_grad_norms(self) -> Tensor:
        """Norm of each sample's gradient over all trainable parameters, from (a, g): [b] (see graph.stats)."""
        return stats.per_sample_grad_norms(self)

    def per_sample_gram(self) -> Tensor:
        """Inner products of the samples' gradients, ``K[i, j] = <grad_i, grad_j>``: [b, b] (see graph.stats)."""
        return stats.per_sample_gram(self)

    # -- parameters <-> graph -----------------------------------------------------------------------------
    def params_to_graph(self, params: Mapping[str, Tensor]) -> Tensor:
        """Encode parameter-shaped tensors in theta order: ``{name: [*shape, *extra]} -> [P, *extra]``.
        Row ``wentry_theta[w]`` is the weight on edge ``wentry_edge[w]`` (kernel offset ``wentry_offset[w]``),
        row ``bentry_theta[j]`` the bias of node ``bentry_node[j]``."""
        self._single("params_to_graph")
        parts = []
        for p in self.spec.trainable:
            if p.name not in params:
                raise StructureMismatchError(f"params_to_graph: no tensor for parameter '{p.name}' (shape "
                                             f"{p.shape}); the dict must hold every trainable parameter")
            t = params[p.name]
            if tuple(t.shape[:len(p.shape)]) != p.shape:
                raise StructureMismatchError(f"params_to_graph: '{p.name}' has shape {tuple(t.shape)}, expected "
                                             f"{p.shape} (optionally followed by channel dims)")
            parts.append(t.reshape(p.numel, *t.shape[len(p.shape):]))
        return torch.cat(parts) if parts else self.entry_x.new_zeros(0)

    def graph_to_params(self, theta: Tensor) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Decode theta-order values ``[P]`` or ``[P, C]`` into ``{name: [*shape]}`` (``[*shape, C]`` when
        C > 1; a trailing channel of size 1 is dropped). On a batch, ``theta`` is every graph's block
        concatenated (``[sum P, C]``, as a metanetwork returns it) and the result is one dict per graph."""
        if self.is_batch:
            sizes = [s.num_params for s in self.specs]
            if theta.shape[0] != sum(sizes):
                raise StructureMismatchError(f"graph_to_params: the batch has {sum(sizes)} parameters in all, "
                                             f"got a tensor with {theta.shape[0]} rows")
            return [_decode(s, t) for s, t in zip(self.specs, theta.split(sizes))]
        return _decode(self.spec, theta)

    # -- edges --------------------------------------------------------------------------------------------
    def materialize_edges(self) -> "GradientGraph":
        """Store the explicit edge and parameter-entry tensors (see the class docstring); returns self."""
        if "edge_index" in self._store:
            return self
        parts = [edge_tensors(s) for s in self.specs]
        if len(parts) == 1:
            merged = parts[0]
        else:  # a batch of un-materialized graphs: offset each graph's indices
            merged = {k: [] for k in EDGE_KEYS}
            offs = {"num_nodes": 0, "num_edges": 0, "num_params": 0, "num_ops": 0}
            for s, p in zip(self.specs, parts):
                for k in EDGE_KEYS:
                    v = p[k]
                    if k in _INC:
                        v = v + offs[_INC[k]]
                    merged[k].append(v)
                offs["num_nodes"] += s.num_nodes
                offs["num_edges"] += s.num_edges()
                offs["num_params"] += s.num_params
                offs["num_ops"] += len(s.ops)
            merged = {k: torch.cat(v, dim=-1 if k == "edge_index" else 0) for k, v in merged.items()}
        device = self.entry_x.device
        for k, v in merged.items():
            self[k] = v.to(device)
        return self

    # -- plain data -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The graph as plain data: ``spec.to_dict()``, the entry tensors, whether edges are materialized, and
        any further attributes (e.g. a dataset's targets) under ``"attrs"``. Index tables are not stored: they
        are rebuilt from the spec. Read back with :meth:`from_dict`; survives ``torch.load(weights_only=True)``."""
        self._single("to_dict")
        store = self._store
        derived = set(_INC) | set(_DERIVED) | set(structure_tensors(self.spec, "cpu")) | {"spec"} | set(EDGE_KEYS)
        attrs = {k: v for k, v in store.items() if k not in derived and k not in _ENTRY_KEYS}
        bad = sorted(k for k, v in attrs.items() if not isinstance(v, (Tensor, int, float, bool, str, type(None))))
        if bad:
            raise TypeError(f"GradientGraph.to_dict stores tensors, numbers and strings only; {bad} are not")
        return {"spec": self.spec.to_dict(), **{k: store[k] for k in _ENTRY_KEYS},
                "edges": "edge_index" in store, "attrs": attrs}

    @classmethod
    def from_dict(cls, d: dict) -> "GradientGraph":
        """The graph :meth:`to_dict` described (same features, spec, edges and attributes)."""
        graph = cls.from_parts(GraphSpec.from_dict(d["spec"]), *(d[k] for k in _ENTRY_KEYS))
        if d.get("edges"):
            graph.materialize_edges()
        for k, v in d.get("attrs", {}).items():
            graph[k] = v
        return graph

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path`` (atomic, versioned: :func:`gradgraph.io.save_file`)."""
        save_file(self.to_dict(), path, "graph")

    @classmethod
    def load(cls, path: str | Path, map_location=None) -> "GradientGraph":
        """A graph written by :meth:`save`."""
        return cls.from_dict(load_file(path, "graph", map_location=map_location))

    # -- views ----------------------------------------------------------------------------------------------
    def to_networkx(self):
        """A ``networkx.DiGraph``: nodes with their layer, space, role, position and permutability; one edge
        per (in-neuron, out-neuron) weight pair with the op name and kind."""
        import networkx as nx

        self._single("to_networkx")
        spec = self.spec
        G = nx.DiGraph()
        for li, layer in enumerate(spec.layers):
            space = spec.spaces[layer.space]
            for i, node in enumerate(layer.nodes):
                G.add_node(node, layer=layer.key, depth=li, space=space.key, role=layer.role, pos=i,
                           permutable=space.permutable)
        for op in spec.ops:
            src, dst, _ = kind_of(op).edges(op, spec.layers[op.in_layer].size, spec.layers[op.out_layer].size, 0)
            s0, d0 = spec.layers[op.in_layer].node_start, spec.layers[op.out_layer].node_start
            G.add_edges_from(zip((src + s0).tolist(), (dst + d0).tolist()), op=op.name, kind=op.kind,
                             weights=op.entries_per_edge)
        return G

    def feature_bytes(self) -> int:
        """Bytes of the (a, g) features (``entry_x``)."""
        return self.entry_x.numel() * self.entry_x.element_size()

    def per_sample_grad_bytes(self) -> int:
        """Bytes that per-sample gradients of every trainable parameter would take (b x P values)."""
        return sum(s.num_samples * s.num_params for s in self.specs) * self.entry_x.element_size()

    def summary(self) -> str:
        """A table of neuron spaces, layers and ops, with sizes and memory."""
        self._single("summary")
        spec = self.spec
        lines = [f"GradientGraph: {spec.num_nodes} nodes, {self.num_edges} edges (in-neuron, out-neuron pairs), "
                 f"{spec.num_samples} samples, {spec.num_elements} set elements, {self.entry_x.shape[0]} entries, "
                 f"{spec.num_params} trainable parameters", "",
                 f"{'neuron space':38s} {'size':>5s} {'role':>7s} {'perm':>4s} {'heads':>5s} {'layers':>6s} "
                 f"{'nodes':>6s} {'edges in':>8s}"]
        edges_into = [0] * len(spec.spaces)
        for op in spec.ops:
            edges_into[spec.layers[op.out_layer].space] += spec.op_edges(op)
        for si, s in enumerate(spec.spaces):
            lays = [lay for lay in spec.layers if lay.space == si]
            lines.append(f"{s.key:38s} {s.size:5d} {s.role:>7s} {'yes' if s.permutable else 'no':>4s} "
                         f"{s.heads:5d} {len(lays):6d} {sum(lay.size for lay in lays):6d} {edges_into[si]:8d}")
        lines += ["", f"{'layer':38s} {'nodes':>6s} {'a elements':>14s} {'g elements':>14s}"]
        for lay in spec.layers:
            def els(blk):
                return "-" if blk is None else "x".join(map(str, spec.groups[blk.group]))
            lines.append(f"{lay.key:38s} {lay.size:6d} {els(lay.a):>14s} {els(lay.g):>14s}")
        lines += ["", f"{'op':38s} {'kind':>9s} {'edges':>8s} {'w/edge':>6s}"]
        for op in spec.ops:
            lines.append(f"{op.name:38s} {op.kind:>9s} {spec.op_edges(op):8d} {op.entries_per_edge:6d}")
        fb, pb = self.feature_bytes(), self.per_sample_grad_bytes()
        lines += ["", f"feature bytes {fb:,} vs per-sample gradient bytes {pb:,} (ratio {fb / max(pb, 1):.4f})"]
        return "\n".join(lines)

    def _single(self, what: str) -> None:
        if self.is_batch:
            raise ValueError(f"{what} works on one graph; use batch.to_data_list() or batch.get_example(i)")


def _put(target: Tensor, rows, value: Tensor, per_sample: bool, seen: set) -> None:
    """Write one use's gradient into its parameter (its rows), or add it when the parameter was used before."""
    key = (id(target), rows)
    if rows is None:
        view = target
    else:
        view = target[:, rows[0]:rows[1]] if per_sample else target[rows[0]:rows[1]]
    if key in seen:
        view.add_(value)
    else:
        view.copy_(value)
        seen.add(key)


def _decode(spec: GraphSpec, theta: Tensor) -> dict[str, Tensor]:
    if theta.shape[0] != spec.num_params:
        raise StructureMismatchError(f"graph_to_params: the graph has {spec.num_params} trainable parameters, "
                                     f"got a tensor with {theta.shape[0]} rows")
    extra = tuple(theta.shape[1:])
    if extra == (1,):
        extra = ()
    return {p.name: theta[p.offset:p.offset + p.numel].reshape(p.shape + extra) for p in spec.trainable}


def require_set_size(graph: GradientGraph, size: int | None = None) -> int:
    """The common set size of a graph or batch; raises :class:`SetSizeMismatchError` if the graphs differ or
    differ from ``size``. Models that flatten the set into features need one fixed size."""
    b = graph.set_size
    if size is not None and b != size:
        raise SetSizeMismatchError(f"this model was built for sets of {size} samples, got graphs with {b}; "
                                   "capture every graph with the same batch size (or use an equivariant model, "
                                   "which accepts any set size)")
    return b


def shallow_copy(graph: GradientGraph) -> GradientGraph:
    return copy.copy(graph)


# torch.load's default (weights_only=True) unpickles allow-listed classes only: a graph saved with plain
# torch.save loads safely once its classes are listed. They hold data only (tensors, ints, strings, tuples)
# and run no code when unpickled. (GradientGraph.save/load write a versioned, hashed file instead.)
torch.serialization.add_safe_globals([
    GradientGraph, _GraphStore, DataEdgeAttr, DataTensorAttr, GlobalStorage, _spec.GraphSpec, _spec.SpaceSpec,
    _spec.LayerSpec, _spec.BlockSpec, _spec.OpSpec, _spec.ParamUse, _spec.ParamSpec])
