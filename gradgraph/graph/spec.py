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
from typing import Any, ClassVar

from .kinds import kind_of

ROLES = ("input", "hidden", "output")


def _plain(v):
    """Tuples (nested) as lists, specs as their dicts: plain data that ``torch.load(weights_only=True)`` reads."""
    if isinstance(v, _Plain):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def _tuple(v):
    return tuple(v)


def _tuples(v):
    return tuple(tuple(x) for x in v)


def _optional(decode):
    return lambda v: None if v is None else decode(v)


class _Plain:
    """``to_dict``/``from_dict`` for the frozen spec dataclasses: plain dicts of lists, strs, ints, floats, bools and
    None (no gradgraph classes), so stored structures survive renaming or moving a class. ``_DECODE`` maps the
    fields that are not plain scalars to the function that rebuilds them; missing keys take the field's
    default, unknown keys raise ``TypeError``."""

    _DECODE: ClassVar[dict] = {}
    _OPTIONAL: ClassVar[frozenset] = frozenset()  # fields added later: left out of the dict at their default

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not (f.name in self._OPTIONAL and getattr(self, f.name) == f.default)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**{k: cls._DECODE[k](v) if k in cls._DECODE else v for k, v in d.items()})


@dataclass(frozen=True)
class SpaceSpec(_Plain):
    """A neuron space. ``heads > 1`` splits it into attention heads of ``size // heads`` neurons; spaces
    with the same ``head_group`` permute their heads together. ``reason`` says why it is not permutable.
    ``parts`` (indices of other spaces): the space is cut into those pieces along its neurons (a packed q/k/v
    projection split by glue), and its permutation is theirs, block by block. ``within_heads``: why the neurons
    within each head keep their order (rotary position embeddings); its permutations then move whole heads
    only (None: they may also permute within heads)."""

    key: str
    size: int
    role: str
    permutable: bool
    heads: int = 1
    head_group: int = -1
    heads_permutable: bool = False
    reason: str | None = None
    parts: tuple[int, ...] = ()
    within_heads: str | None = None

    _DECODE = {"parts": _tuple}
    _OPTIONAL = frozenset({"parts", "within_heads"})


@dataclass(frozen=True)
class BlockSpec(_Plain):
    """A contiguous run of entries: ``channels`` is "ag" (paired a and g on the same elements), "a" or "g";
    ``kind`` "dense" holds ``M * n`` entries (element-major), "onehot" holds ``M`` entries (one per element,
    on the node of its token)."""

    channels: str
    kind: str
    start: int
    group: int
    count: int


@dataclass(frozen=True)
class LayerSpec(_Plain):
    key: str
    size: int
    space: int
    role: str
    node_start: int
    a: BlockSpec | None
    g: BlockSpec | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerSpec":
        a = None if d["a"] is None else BlockSpec.from_dict(d["a"])
        # a paired "ag" block is one object shared by a and g (layouts test ``layer.a is layer.g``)
        g = a if d["g"] is not None and d["g"] == d["a"] else None if d["g"] is None else BlockSpec.from_dict(d["g"])
        return cls(**{**d, "a": a, "g": g})

    @property
    def nodes(self) -> range:
        return range(self.node_start, self.node_start + self.size)


@dataclass(frozen=True)
class ParamUse(_Plain):
    """A parameter, or rows ``start:stop`` of it, used by one op."""

    name: str
    rows: tuple[int, int] | None = None

    _DECODE = {"rows": _optional(_tuple)}


@dataclass(frozen=True)
class ParamSpec(_Plain):
    """``offset`` is the parameter's position in theta (None for frozen parameters, which are not in theta)."""

    name: str
    shape: tuple[int, ...]
    offset: int | None

    _DECODE = {"shape": _tuple}

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OpSpec(_Plain):
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

    _DECODE = {"weight": _optional(ParamUse.from_dict), "bias": _optional(ParamUse.from_dict), "kernel": _tuple,
               "stride": _tuple, "dilation": _tuple, "padding": _tuples, "buffers": _tuple}

    @property
    def entries_per_edge(self) -> int:
        return math.prod(self.kernel)


@dataclass(frozen=True, repr=False)
class GraphSpec(_Plain):
    spaces: tuple[SpaceSpec, ...]
    layers: tuple[LayerSpec, ...]
    ops: tuple[OpSpec, ...]
    groups: tuple[tuple[int, ...], ...]
    params: tuple[ParamSpec, ...]
    buffers: tuple[tuple[str, tuple[int, ...]], ...] = ()

    _DECODE = {"spaces": lambda v: tuple(SpaceSpec.from_dict(x) for x in v),
               "layers": lambda v: tuple(LayerSpec.from_dict(x) for x in v),
               "ops": lambda v: tuple(OpSpec.from_dict(x) for x in v), "groups": _tuples,
               "params": lambda v: tuple(ParamSpec.from_dict(x) for x in v),
               "buffers": lambda v: tuple((name, tuple(shape)) for name, shape in v)}

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
        return sum(self.op_edges(op) for op in self.ops)

    def op_edges(self, op: OpSpec) -> int:
        """Number of weight edges of one op (its kind decides)."""
        return kind_of(op).num_edges(op, self.layers[op.in_layer].size, self.layers[op.out_layer].size)

    def structure_key(self) -> tuple:
        """Equal for graphs of the same architecture (whatever the batch): used to check that a symmetry or
        a parameter dict belongs to this graph."""
        return (tuple((s.key, s.size) for s in self.spaces), tuple(p.name for p in self.params))
