"""The user-facing entry points that compose stage 1 (capture: :class:`~gradgraph.capture.CaptureSession`
and its records) with stage 2 (graph: :func:`~gradgraph.graph.build.build_graph`,
:func:`~gradgraph.graph.build.build_spec`): :func:`capture` (one call), :class:`GradientRecorder` (inside
an existing training loop), :func:`model_spec` (structure only), :func:`random_symmetry` (of a module,
a graph or a spec) and :func:`coverage` (what gradgraph makes of each module, before any capture).

They live here, above both stages, so that the data flow runs one way: ``capture/`` never imports
``graph/``; ``graph/`` reads capture's records.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .capture import CaptureSession, find_rule
from .errors import GradGraphError, LossShapeError, SampleMixingError, UnsupportedModuleError
from .graph import symmetry as _symmetry
from .graph.build import build_graph, build_spec
from .graph.gradient_graph import GradientGraph
from .graph.spec import GraphSpec

__all__ = ["capture", "GradientRecorder", "model_spec", "per_sample_losses", "random_symmetry", "coverage", "Coverage",
           "ModuleCoverage"]


def _call_args(inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def per_sample_losses(output, targets, loss_fn: Callable | None, batch_size: int) -> Tensor:
    """The per-sample quantity whose gradient the graph holds: ``loss_fn(output, targets)`` (shape [b]),
    or the sum of each sample's outputs when ``loss_fn`` is None."""
    if loss_fn is None:
        if not isinstance(output, Tensor):
            raise LossShapeError("the model returned a " + type(output).__name__ + "; with loss_fn=None gradgraph "
                                 "differentiates the sum of each sample's outputs, which needs a tensor output. "
                                 "Pass loss_fn=lambda out, y: ... returning one value per sample.")
        return output.reshape(output.shape[0], -1).sum(1)
    losses = loss_fn(output, targets)
    if not isinstance(losses, Tensor) or losses.shape != (batch_size,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise LossShapeError(
            f"loss_fn returned {shape}; it must return one loss per sample, shape [{batch_size}]. Use "
            "reduction='none' and sum over non-batch axes, e.g. "
            "lambda out, y: F.cross_entropy(out, y, reduction='none'), or gradgraph.losses.per_sample_*.")
    return losses


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size: the first dimension of the first input tensor that has one (0-d tensors are constants)."""
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, Tensor) and t.ndim:
            return int(t.shape[0])
    return None


def check_capture_inputs(model, args: tuple, kwargs: dict, targets, loss_fn) -> None:
    """The validation layer of capture's entry: every bad input gets an error naming it and what works."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradgraph.capture needs a torch.nn.Module, got {type(model).__name__}")
    if torch.is_inference_mode_enabled():
        raise GradGraphError("gradgraph.capture was called inside torch.inference_mode(), which disables autograd "
                             "for good; call it outside the inference_mode block (no_grad is fine)")
    if targets is not None and loss_fn is None:
        raise LossShapeError("targets were given without a loss_fn, so they would be ignored (with loss_fn=None the "
                             "graph holds gradients of the sum of each sample's outputs); pass loss_fn, e.g. "
                             "gradgraph.losses.per_sample_cross_entropy, or drop the targets")
    b = _batch_size(args, kwargs)
    if b is None:
        raise GradGraphError("the inputs contain no tensor with a batch axis; gradgraph needs the batch as the "
                             "first dimension of the inputs")
    if b == 0:
        raise GradGraphError("the batch is empty (its first dimension is 0): a gradient graph needs at least one "
                             "sample")
    leaves = [t for t in tree_flatten(targets)[0] if isinstance(t, Tensor) and t.ndim]
    if leaves and any(t.shape[0] != b for t in leaves):
        raise LossShapeError(f"the targets have {[int(t.shape[0]) for t in leaves]} rows but the batch has {b} "
                             "samples; give one target per sample")


def capture(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None) -> GradientGraph:
    """Run one forward and one backward pass of ``model`` on a batch and return its
    :class:`~gradgraph.GradientGraph`.

    Args:
        model: any module built from supported modules (see :func:`gradgraph.capture.supported_modules`)
            and ordinary torch code in between.
        inputs: the batch (batch first): a tensor, a tuple of positional arguments or a dict of keyword
            arguments.
        targets: passed to ``loss_fn``.
        loss_fn: ``loss_fn(output, targets) -> [b]``, one loss per sample. With None, the per-sample quantity
            is the sum of the sample's outputs (gradients of the model output, as for the regression Fisher).

    The graph's ``g`` is the gradient of each sample's own loss (the losses are summed before the backward
    pass, so nothing is scaled by 1/b). Parameter ``.grad`` is left untouched: capture differentiates with
    respect to the op outputs only, which also skips the weight-gradient products. The model is left as it
    was (forwards restored, no hooks remain).
    """
    args, kwargs = _call_args(inputs)
    check_capture_inputs(model, args, kwargs, targets, loss_fn)
    session = CaptureSession(model, use_hooks=False)
    with session:
        output = model(*args, **kwargs)
    with torch.enable_grad():
        losses = per_sample_losses(output, targets, loss_fn, session.batch_size)
        if not losses.requires_grad:
            raise LossShapeError("the per-sample losses do not depend on the model's output (loss_fn returned a "
                                 "tensor without a gradient), so there is no gradient to capture")
        session.collect_grads(losses.sum())
    return build_graph(session.records())


def model_spec(model: nn.Module, example_inputs) -> GraphSpec:
    """The :class:`~gradgraph.graph.spec.GraphSpec` (structure only) of ``model`` on inputs shaped like
    ``example_inputs``: a forward pass, no backward."""
    args, kwargs = _call_args(example_inputs)
    session = CaptureSession(model, use_hooks=False)
    with session:
        model(*args, **kwargs)
    return build_spec(session.records(structure_only=True))[0]


def random_symmetry(obj, generator: torch.Generator | None = None, example_inputs=None) -> _symmetry.Symmetry:
    """Draw a uniformly random element of the neuron-permutation group of a model (traced with
    :func:`model_spec` on ``example_inputs`` or ``model.example_inputs()``), of a GradientGraph's model, or
    of a GraphSpec. See :func:`gradgraph.graph.symmetry.random_symmetry` for the group."""
    if isinstance(obj, nn.Module):
        if example_inputs is None:
            if not hasattr(obj, "example_inputs"):
                raise ValueError(
                    f"random_symmetry needs the structure of {type(obj).__name__}: pass example_inputs=<a batch> "
                    "(or a GradientGraph captured from the model); gradgraph's reference models provide "
                    "example_inputs() themselves")
            example_inputs = obj.example_inputs()
        obj = model_spec(obj, example_inputs)
    return _symmetry.random_symmetry(obj, generator)


class GradientRecorder:
    """Record the gradient graph of one step of an existing training loop::

        with gradgraph.GradientRecorder(model) as rec:
            loss = criterion(model(x), y)      # one forward ...
            loss.backward()                    # ... and one backward
        graph = rec.graph(grad_scale=len(x))   # undo a mean-reduced loss
        optimizer.step()

    ``g`` is whatever your ``backward`` propagates: with a mean-reduced loss every ``g`` is scaled by 1/b,
    so pass ``grad_scale=b`` to get each sample's own gradient (a sum-reduced loss needs no scale).
    Parameter ``.grad`` is filled by your backward as usual; the recorder only adds tensor hooks, which are
    gone with the recorded tensors. The model's forwards are restored when the ``with`` block ends.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._session: CaptureSession | None = None

    def __enter__(self) -> "GradientRecorder":
        self._session = CaptureSession(self.model, use_hooks=True)
        self._session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._session.__exit__(*exc)

    def graph(self, grad_scale: float = 1.0) -> GradientGraph:
        """The recorded graph; ``grad_scale`` multiplies every ``g`` (``b`` for a mean-reduced loss)."""
        if self._session is None:
            raise RuntimeError("use GradientRecorder as a context manager around one forward and backward pass")
        return build_graph(self._session.records(grad_scale=grad_scale))


@dataclass
class ModuleCoverage:
    """One module of a :func:`coverage` report. ``status``: ``"captured"`` (a rule records its ops),
    ``"bare"`` (the model's own code uses its parameters: class/position tokens, layer scales, recorded as
    ops), ``"glue"`` (no trainable parameters of its own: what the tracer follows between ops), ``"frozen"``
    (parameters, none trainable), ``"refused"`` (``reason`` says why). ``ops``: the op names it recorded;
    ``spaces``: ``(key, size, permutable, reason)`` of the neuron spaces of those ops."""

    path: str
    cls: str
    status: str
    reason: str | None = None
    ops: list[str] = field(default_factory=list)
    spaces: list[tuple[str, int, bool, str | None]] = field(default_factory=list)


@dataclass
class Coverage:
    """What gradgraph makes of a model (:func:`coverage`): per module, and the neuron spaces found."""

    modules: list[ModuleCoverage]
    spaces: list[tuple[str, int, bool, str | None]]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        lines = [f"{'module':40s} {'class':28s} {'status':9s} ops  spaces (permutable/total)"]
        for m in self.modules:
            perm = sum(s[2] for s in m.spaces)
            note = f"  <- {m.reason}" if m.reason else ""
            lines.append(f"{(m.path or '<root>')[:40]:40s} {m.cls[:28]:28s} {m.status:9s} {len(m.ops):3d}  "
                         f"{perm}/{len(m.spaces)}{note}")
        lines.append(f"neuron spaces: {len(self.spaces)}, permutable: {sum(s[2] for s in self.spaces)}")
        for key, size, permutable, why in self.spaces:
            lines.append(f"  {key} [{size}] " + ("permutable" if permutable else f"fixed: {why}"))
        if self.error:
            lines.append(f"refused: {self.error}")
        return "\n".join(lines)


def coverage(model: nn.Module, example_inputs) -> Coverage:
    """Which modules of ``model`` gradgraph captures, which are glue, which are refused and why, and the neuron
    spaces it finds (with the reason of every fixed one), from one forward pass on ``example_inputs`` (no
    backward, no graph). A refusal does not raise: it is the report's ``error``, attributed to the module it
    names."""
    error, spec = None, None
    try:
        spec = model_spec(model, example_inputs)
    except (UnsupportedModuleError, SampleMixingError) as e:
        error = str(e)
    refused = set(re.findall(r"module '([^']*)'", error)) if error else set()
    param_names = {n for n, _ in model.named_parameters()}
    by_module: dict[str, tuple[list, list]] = {}
    for op in spec.ops if spec is not None else ():
        path = op.name.split(":")[0].split("#")[0]
        if path in param_names:  # a bare parameter's op is named by the parameter: it belongs to its module
            path = path.rpartition(".")[0]
        ops, spaces = by_module.setdefault("" if path == "<root>" else path, ([], []))
        ops.append(op.name)
        for layer in (op.in_layer, op.out_layer):
            sp = spec.spaces[spec.layers[layer].space]
            if (row := (sp.key, sp.size, sp.permutable, sp.reason)) not in spaces:
                spaces.append(row)
    out = []
    for path, module in model.named_modules():
        own = [p for p in module._parameters.values() if p is not None]
        ops, spaces = by_module.get(path, ([], []))
        status, why = ("captured" if find_rule(module) is not None else "bare" if ops else
                       "frozen" if own and not any(p.requires_grad for p in own) else "glue" if not own else
                       "refused"), None
        if (path or "<root>") in refused:
            status, why = "refused", error
        elif status == "refused":
            why = error or "its trainable parameters took no part in the forward pass"
        cls = type(module)
        out.append(ModuleCoverage(path, f"{cls.__module__}.{cls.__qualname__}", status, why, ops, spaces))
    rows = [(s.key, s.size, s.permutable, s.reason) for s in spec.spaces] if spec is not None else []
    return Coverage(out, rows, error)
