"""The static structure of a gradient graph: neuron spaces, layers of nodes, ops (weights), element groups
and the parameter layout. A :class:`GraphSpec` is plain Python data shared by all graphs captured from the
same model and input shape; the tensors of a :class:`~gradgraph.graph.GradientGraph` index into it.

Vocabulary
----------
* element: one member of the set (a sample, a (sample, token) or a (sample, position) pair). Elements come in
  groups of equal shape ``(b, *spatial)``, numbered sample-major.
* node: a neuron (a channel for convs). Nodes come in layers: the output neurons of an op (carrying ``g``)
  merged with the input neurons of the op that consumes them elementwise (carrying ``a``).
* space: the neurons one permutation acts on; tied layers (a residual stream) share a space.
* op: one parameterized map between two layers; its weight entries are the graph's edges.
* theta: the trainable parameters flattened and concatenated in ``model.named_parameters()`` order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property

ROLES = ("input", "hidden", "output")
OP_KINDS = ("linear", "conv", "diag", "embedding")


@dataclass(frozen=True)
class SpaceSpec:
    """A neuron space. ``heads > 1`` splits it into attention heads of ``size // heads`` neurons; spaces
    with the same ``head_group`` permute their heads together. ``reason`` says why it is not permutable."""

    key: str
    size: int
    role: str
    permutable: bool
    heads: int = 1
    head_group: int = -1
    heads_permutable: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class BlockSpec:
    """A contiguous run of entries: ``channels`` is "ag" (paired a and g on the same elements), "a" or "g";
    ``kind`` "dense" holds ``M * n`` entries (element-major), "onehot" holds ``M`` entries (one per element,
    on the node of its token)."""

    channels: str
    kind: str
    start: int
    group: int
    count: int


@dataclass(frozen=True)
class LayerSpec:
    key: str
    size: int
    space: int
    role: str
    node_start: int
    a: BlockSpec | None
    g: BlockSpec | None

    @property
    def nodes(self) -> range:
        return range(self.node_start, self.node_start + self.size)


@dataclass(frozen=True)
class ParamUse:
    """A parameter, or rows ``start:stop`` of it, used by one op."""

    name: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ParamSpec:
    """``offset`` is the parameter's position in theta (None for frozen parameters, which are not in theta)."""

    name: str
    shape: tuple[int, ...]
    offset: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OpSpec:
    """A parameterized op between ``in_layer`` and ``out_layer``.

    ``kernel`` is the spatial extent one edge covers: the conv kernel, the map size for a linear layer on a
    flattened conv map, ``()`` otherwise. Every edge (in-node, out-node) carries ``prod(kernel)`` weights.
    """

    name: str
    kind: str
    in_layer: int
    out_layer: int
    weight: ParamUse | None
    bias: ParamUse | None
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    padding_idx: int | None = None
    buffers: tuple[str, ...] = ()

    @property
    def entries_per_edge(self) -> int:
        return math.prod(self.kernel)


@dataclass(frozen=True, repr=False)
class GraphSpec:
    spaces: tuple[SpaceSpec, ...]
    layers: tuple[LayerSpec, ...]
    ops: tuple[OpSpec, ...]
    groups: tuple[tuple[int, ...], ...]
    params: tuple[ParamSpec, ...]
    buffers: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __repr__(self) -> str:
        return (f"GraphSpec({len(self.spaces)} spaces, {len(self.layers)} layers, {len(self.ops)} ops, "
                f"{self.num_samples} samples, {self.num_params} parameters)")

    def __getstate__(self):  # drop cached tables and edges: they are rebuilt on demand
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

    @property
    def num_samples(self) -> int:
        return self.groups[0][0] if self.groups else 0

    @property
    def num_nodes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def num_entries(self) -> int:
        return sum(b.count for layer in self.layers for b in {layer.a, layer.g} if b is not None)

    @cached_property
    def group_offsets(self) -> tuple[int, ...]:
        offs, o = [], 0
        for shape in self.groups:
            offs.append(o)
            o += math.prod(shape)
        return tuple(offs)

    @property
    def num_elements(self) -> int:
        return sum(math.prod(s) for s in self.groups)

    @cached_property
    def param_by_name(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params}

    @property
    def trainable(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.offset is not None)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.trainable)

    def theta_range(self, use: ParamUse | None) -> tuple[int, int] | None:
        """The theta interval a (trainable) parameter use covers, or None for frozen/absent ones."""
        if use is None:
            return None
        p = self.param_by_name[use.name]
        if p.offset is None:
            return None
        row = p.numel // p.shape[0] if p.shape else 1
        lo, hi = use.rows if use.rows is not None else (0, p.shape[0] if p.shape else 1)
        return p.offset + lo * row, p.offset + hi * row

    def use_shape(self, use: ParamUse) -> tuple[int, ...]:
        shape = self.param_by_name[use.name].shape
        if use.rows is None:
            return shape
        return (use.rows[1] - use.rows[0],) + shape[1:]

    def num_edges(self) -> int:
        total = 0
        for op in self.ops:
            n_in, n_out = self.layers[op.in_layer].size, self.layers[op.out_layer].size
            total += n_out if op.kind == "diag" else n_in * n_out
        return total

    def structure_key(self) -> tuple:
        """Equal for graphs of the same architecture (whatever the batch): used to check that a symmetry or
        a parameter dict belongs to this graph."""
        return (tuple((s.key, s.size) for s in self.spaces), tuple(p.name for p in self.params))
