"""What one capture records: per parameterized op, where its input activations live (an in-site) and where
its output gradient lives (an out-site). The graph builder turns these records into a GradientGraph."""
from __future__ import annotations

from dataclasses import dataclass, field

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
