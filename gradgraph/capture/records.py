"""What one capture records: per parameterized op, where its input activations live (an in-site) and where
its output gradient lives (an out-site). The graph builder turns these records into a GradientGraph."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..errors import NonFiniteGradientError
from .spaces import SpaceTable


@dataclass
class ParamRef:
    """A parameter, or a block of its rows (``rows=(start, stop)``, e.g. the query rows of a packed
    ``in_proj_weight``), used by one op."""

    name: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None


@dataclass
class InSite:
    """Neurons at an op's input. ``a`` holds the op's effective input with the neuron axis last:
    ``[b, *elem_shape[1:], n]`` (dense) or token ids ``[b, *elem_shape[1:]]`` (``kind="onehot"``)."""

    key: tuple
    name: str
    a: Tensor
    n: int
    elem_shape: tuple[int, ...]
    space: int
    origin: int | None
    kind: str = "dense"


@dataclass
class OutSite:
    """Neurons at an op's output; ``g`` (filled after backward) is ``[b, *elem_shape[1:], n]``."""

    id: int
    name: str
    n: int
    elem_shape: tuple[int, ...]
    space: int
    axis: int
    grad_edge: object = None
    g: Tensor | None = None


@dataclass
class OpRecord:
    """One parameterized op: ``kind`` is ``linear``, ``conv``, ``diag`` (LayerNorm/BatchNorm affine) or
    ``embedding``. ``geometry`` holds kind-specific settings (conv stride/padding/dilation, the kernel,
    spatial sizes of a flattened input, the embedding's padding_idx, per-neuron buffers)."""

    name: str
    kind: str
    insite: InSite
    outsite: OutSite
    weight: ParamRef | None
    bias: ParamRef | None
    geometry: dict = field(default_factory=dict)


@dataclass
class CaptureRecords:
    """Everything one forward/backward recorded, before it becomes a graph."""

    ops: list[OpRecord]
    insites: list[InSite]
    outsites: list[OutSite]
    spaces: SpaceTable
    batch_size: int
    params: list[tuple[str, tuple[int, ...], bool]]  # (name, shape, trainable) in named_parameters order
    buffers: dict[str, tuple[int, ...]]
    dtype: object = None
    grad_scale: float = 1.0  # multiplies every g (undoes a mean-reduced loss in a training loop)

    def first_samples(self, k: int) -> "CaptureRecords":
        """The same records restricted to the batch's first ``k`` samples (every site's leading axis sliced, the
        tensors shared, not copied): the graph they build is the graph of a capture on those ``k`` samples
        alone, since each sample's (a, g) depends on that sample only. For a set model that should see a fixed
        number of gradients whatever the batch size (the learned optimizer's GradMetaNet)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"first_samples needs a positive number of samples, got {k!r}")
        if k >= self.batch_size:
            return self
        ins = {id(s): replace(s, a=s.a[:k], elem_shape=(k, *s.elem_shape[1:])) for s in self.insites}
        outs = {id(s): replace(s, g=None if s.g is None else s.g[:k], elem_shape=(k, *s.elem_shape[1:]))
                for s in self.outsites}
        ops = [replace(op, insite=ins[id(op.insite)], outsite=outs[id(op.outsite)]) for op in self.ops]
        return replace(self, ops=ops, insites=list(ins.values()), outsites=list(outs.values()), batch_size=k)

    def check_finite(self) -> None:
        """Raise :class:`~gradgraph.NonFiniteGradientError` naming the first op whose output gradient (then
        input activation) contains inf or NaN. One pass per site: the graph builder calls it only after a
        single check over all features failed."""
        for site in self.outsites:
            if site.g is not None and not torch.isfinite(site.g).all():
                raise NonFiniteGradientError(
                    f"the output gradient of op '{site.name[:-4]}' contains inf or NaN; check the loss and the "
                    "inputs (a gradient graph of non-finite values cannot be learned from)")
        for site in self.insites:
            if site.kind == "dense" and not torch.isfinite(site.a).all():
                raise NonFiniteGradientError(f"the input activation of op '{site.name[:-3]}' contains inf or NaN")


# which neuron space each axis of an op's weight indexes: "in" (the in-site's) or "out" (the out-site's)
WEIGHT_AXES = {"linear": ("out", "in"), "conv": ("out", "in"), "transposed_linear": ("in", "out"),
               "embedding": ("in", "out"), "diag": ("out",)}


def tie_shared(ops: list[OpRecord], spaces: SpaceTable) -> None:
    """Weight sharing: a parameter (or the same rows of it) used by several ops is one set of weights, so the
    neurons its axes index are the same neurons in every use. Tie the spaces of the uses axis by axis (a
    weight used by a ``linear`` and by an ``embedding`` of the same table: its rows are the linear's outputs
    and the vocabulary entries). Uses of a kind this table does not know fix the spaces involved."""
    first: dict[tuple, tuple[OpRecord, tuple[str, ...]]] = {}
    for op in ops:
        for ref, axes in ((op.weight, WEIGHT_AXES.get(op.kind)), (op.bias, ("out",))):
            if ref is None:
                continue
            key = (ref.name, ref.rows)
            if key not in first:
                first[key] = (op, axes)
                continue
            op0, axes0 = first[key]
            why = f"parameter '{ref.name}' shared by ops '{op0.name}' and '{op.name}'"
            if axes is None or axes0 is None or len(axes) != len(axes0):
                for o in (op0, op):
                    spaces.fix(o.insite.space, f"{why} (a use gradgraph cannot align)")
                    spaces.fix(o.outsite.space, f"{why} (a use gradgraph cannot align)")
                continue
            for a0, a in zip(axes0, axes):
                s0 = op0.insite.space if a0 == "in" else op0.outsite.space
                s1 = op.insite.space if a == "in" else op.outsite.space
                spaces.tie(s0, s1, why)
