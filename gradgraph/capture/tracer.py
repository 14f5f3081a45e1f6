"""Dataflow discovery by tracing the real forward pass.

A :class:`DataflowTracer` is a ``TorchFunctionMode`` that sees every torch function called between the
parameterized ops (the "glue": activations, residual additions, pooling, reshapes, attention). It gives every
tensor that carries neurons a :class:`Label` (which neuron space, which axis, which op output it came from)
and records in a :class:`~gradgraph.capture.spaces.SpaceTable` which spaces must be permuted together
(residual additions, attention heads) and which cannot be permuted at all (model inputs and outputs, spaces
that reach an op it does not understand).

What the tracer does with an op is a table: :func:`register_glue` maps torch function names to handlers
(the built-in ones are in :mod:`gradgraph.capture.glue`). A handler is called after the op ran, as
``handler(tracer, call) -> Label | list[Label | None] | None``, with a :class:`GlueCall`; it returns the
label of the (first) output, one label per output tensor, or None when the outputs carry no known neurons.

Correctness does not depend on knowing every op: an op without a handler marks the spaces of its inputs as
fixed (non-permutable), which only shrinks the symmetry group. Gradients never depend on the tracer at all.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import SampleMixingError, UnsupportedModuleError
from .spaces import SpaceTable

__all__ = ["Label", "GlueCall", "DataflowTracer", "SpaceTable", "register_glue", "glue_ops"]


@dataclass(frozen=True)
class Label:
    """What the tracer knows about a tensor.

    ``space`` is None for tensors that carry no tracked neurons: derived from the model inputs only, or
    contracted over all their neurons (attention scores). ``axes`` is ``(axis,)`` for a flat neuron axis,
    ``(head_axis, dim_axis)`` for a space split into attention heads, ``()`` when unknown. ``batch_axis`` is
    the axis of the samples (None: the tensor is shared by all samples). ``origin`` is the out-site id of the
    op output this tensor was computed from by per-neuron elementwise ops only (so that output and this
    tensor can share one node: g from the op, a from its consumer). ``group`` lists the sizes of spatial
    dims flattened into the neuron axis after it (channel-major), as in ``conv -> flatten -> linear``.
    ``rows`` is how many rows of each sample the batch axis holds, sample-major: ``h.reshape(-1, d)`` of a
    [b, T, d] activation is [b*T, d] with ``rows == T`` (Hugging Face's OPT runs its MLP so). The parameterized
    ops see such a tensor as [b, rows, ...], so they still run per sample.
    """

    space: int | None
    axes: tuple[int, ...]
    batch_axis: int | None
    origin: int | None = None
    group: tuple[int, ...] = ()
    rows: int = 1


class GlueCall:
    """One traced call of a torch function, as a glue handler sees it (after the call ran).

    ``name``: the normalized op name (``"add"`` for ``Tensor.__iadd__``, ``"relu"`` for ``relu_``);
    ``func``, ``args``, ``kwargs``: the call itself; ``inplace``: whether it modified ``args[0]``;
    ``inputs``: every tensor among the arguments (also inside lists and tuples); ``labeled``: the
    ``(tensor, Label)`` pairs of the inputs the tracer follows (never empty); ``out``: what ``func``
    returned; ``outputs``: the tensors in ``out`` (``out`` itself, or the tensors of a returned tuple/list).
    """

    __slots__ = ("name", "func", "args", "kwargs", "inplace", "inputs", "labeled", "out", "outputs")

    def __init__(self, name, func, args, kwargs, inplace, inputs, labeled, out, outputs) -> None:
        self.name, self.func, self.args, self.kwargs, self.inplace = name, func, args, kwargs, inplace
        self.inputs, self.labeled, self.out, self.outputs = inputs, labeled, out, outputs

    def arg(self, pos: int, key: str, default=None):
        """Argument ``pos`` (positional) or ``key`` (keyword), else ``default``."""
        return self.args[pos] if len(self.args) > pos else self.kwargs.get(key, default)


GlueHandler = Callable[["DataflowTracer", GlueCall], "Label | list[Label | None] | None"]
_GLUE: dict[str, GlueHandler] = {}


def register_glue(*op_names: str) -> Callable[[GlueHandler], GlueHandler]:
    """Decorator registering ``handler(tracer, call) -> Label | list[Label | None] | None`` for the torch
    functions named ``op_names`` (their ``__name__`` after normalization: ``"add"`` covers ``torch.add``,
    ``Tensor.add``, ``Tensor.add_``, ``+`` and ``+=``; ``"__matmul__"`` is ``@``), replacing an existing
    handler of the same name. See :class:`GlueCall` for what a handler receives and docs/capture.md."""
    if not op_names or not all(isinstance(n, str) and n for n in op_names):
        raise TypeError("register_glue takes one or more torch function names, e.g. @register_glue('cumsum')")

    def decorate(fn: GlueHandler) -> GlueHandler:
        for n in op_names:
            _GLUE[n] = fn
        return fn

    return decorate


def glue_ops() -> list[str]:
    """Names of the torch functions that have a glue handler, sorted."""
    return sorted(_GLUE)


# calls that neither create neuron-carrying tensors nor constrain spaces: metadata, hooks, device moves
_IGNORED = {
    "__get__", "size", "dim", "numel", "item", "tolist", "__len__", "__format__", "__repr__", "is_floating_point",
    "is_contiguous", "stride", "data_ptr", "element_size", "__bool__", "__index__", "requires_grad_",
    "requires_grad", "retain_grad", "register_hook", "backward", "__setstate__", "__reduce_ex__", "__deepcopy__",
    "storage_offset", "untyped_storage", "get_device", "__array__", "numpy", "cpu",
}

# ignored ops whose raw name is already normalized (no trailing in-place "_"): skipped before any other work
_PASS_THROUGH = frozenset(n for n in _IGNORED if not (n.endswith("_") and not n.endswith("__")))

# the transposing properties (x.T, x.mT, ...) reach the mode as their descriptor's __get__, like a shape read:
# they are ops, named by the property (handlers register "T", "mT", "H", "mH")
_PROPERTY_OPS = {vars(torch._C.TensorBase)[n]: n for n in ("T", "mT", "H", "mH") if n in vars(torch._C.TensorBase)}


def _normalize_name(func) -> tuple[str, bool]:
    """The op name without dunders, reflected 'r' or in-place markers, and whether it is in-place."""
    name = getattr(func, "__name__", "")
    inplace = False
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith("i") and core[1:] in {"add", "sub", "mul", "truediv", "div", "pow", "and", "or"}:
            return ("div" if core[1:] == "truediv" else core[1:]), True
        if core.startswith("r") and core[1:] in {"add", "sub", "mul", "truediv", "div", "pow"}:
            core = core[1:]
        if core in {"add", "sub", "mul", "truediv", "div", "pow", "neg", "abs"}:
            return ("div" if core == "truediv" else core), False
        return name, False
    if name.endswith("_") and not name.endswith("__"):
        inplace, name = True, name[:-1]
    return name, inplace


def _tensors(args, kwargs) -> list[Tensor]:
    out = []
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, Tensor))
    return out


class DataflowTracer(TorchFunctionMode):
    """Labels tensors during a forward pass and records ties between neuron spaces.

    ``suspend()`` turns tracing off (used inside the parameterized ops, which label their outputs
    themselves). ``before_inplace`` is called with a tensor about to be modified in place. The methods
    below the dispatch are the helpers glue handlers use (with ``tracer.spaces.tie`` / ``.fix``).
    """

    def __init__(self, spaces: SpaceTable, batch_size: int, before_inplace=None,
                 parameters: dict[int, str] | None = None, bare=None) -> None:
        super().__init__()
        self.parameters = parameters or {}  # id -> name of the model's trainable parameters
        self.bare = bare  # records bare parameter uses (capture/bare.py), or None: every such use is refused
        self.refused: UnsupportedModuleError | None = None  # the first refused use, raised after the forward
        self.spaces = spaces
        self.batch_size = batch_size
        self.before_inplace = before_inplace
        self._labels: dict[int, Label] = {}
        self._keep: list[Tensor] = []  # keeps labeled tensors alive so that their ids stay unique
        self._suspended = 0
        self._fresh: Counter = Counter()

    # -- labels ---------------------------------------------------------------------------------------
    def set_label(self, t: Tensor, label: Label) -> None:
        self._labels[id(t)] = label
        self._keep.append(t)

    def get_label(self, t: Tensor) -> Label | None:
        return self._labels.get(id(t))

    def forget(self, t: Tensor) -> None:
        """Treat ``t`` as a constant from now on (a broadcast scalar)."""
        self._labels.pop(id(t), None)

    @contextlib.contextmanager
    def suspend(self):
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def release(self) -> None:
        self._labels.clear()
        self._keep.clear()

    # -- dispatch ---------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._suspended:
            return func(*args, **kwargs)
        raw = getattr(func, "__name__", None)
        if raw in _PASS_THROUGH and (raw != "__get__" or func.__self__ not in _PROPERTY_OPS):
            return func(*args, **kwargs)  # most calls are attribute reads (Tensor.shape.__get__ & co.)
        ins = _tensors(args, kwargs)
        labeled = [(t, self._labels[id(t)]) for t in ins if id(t) in self._labels]
        uses = [t for t in ins if id(t) in self.parameters] if self.parameters else ()
        if not labeled and not uses:
            return func(*args, **kwargs)
        name, inplace = _normalize_name(func)
        if name == "__get__":
            name = _PROPERTY_OPS[func.__self__]
        elif name in _IGNORED:
            return func(*args, **kwargs)
        if uses:
            bare = self.bare.use(self, name, inplace, args, kwargs, uses) if self.bare is not None else None
            if bare is None:  # raised after the forward: inside an operator, torch turns a TypeError into
                self.refused = self.refused or self._refusal(name, uses)  # NotImplemented
                return func(*args, **kwargs)
            if bare[0] == "out":  # the call became a recorded op (a layer scale): its output is the op's
                return bare[1]
            args, kwargs = bare[1], bare[2]  # the parameters replaced by recorded ops' outputs
            ins = _tensors(args, kwargs)
            labeled = [(t, self._labels[id(t)]) for t in ins if id(t) in self._labels]
        if kwargs.get("inplace") is True:
            inplace = True
        if inplace and self.before_inplace is not None and args and isinstance(args[0], Tensor):
            self.before_inplace(args[0])
        out = func(*args, **kwargs)
        outs = [out] if isinstance(out, Tensor) else [o for o in (out if isinstance(out, (tuple, list)) else ())
                                                     if isinstance(o, Tensor)]
        if outs:
            self._propagate(GlueCall(name, func, args, kwargs, inplace, ins, labeled, out, outs))
        return out

    def _refusal(self, name: str, params: list[Tensor]) -> UnsupportedModuleError:
        """A trainable parameter entering a torch function between rules: its gradient through this use would
        be missing from the graph (a silent wrong gradient), so refuse."""
        names = sorted({self.parameters[id(p)] for p in params})
        owners = f" (parameters of {self.bare.owners(names)})" if self.bare is not None else ""
        return UnsupportedModuleError(
            f"trainable parameter(s) {names} are used by the torch function '{name}' in the model's own "
            f"code{owners}, outside a capture rule, so the gradient through that use cannot be represented "
            "(bare parameters are captured when added to, multiplied with or expanded to an activation with a "
            "batch axis, as class/position tokens and layer scales: see docs/capture.md). Use the parameter "
            "through a module (tie modules by assignment, e.g. head.weight = emb.weight), write a rule for the "
            "module that uses it with @gradgraph.register_rule (ctx.linear(x, W) for x @ W.T, ctx.linear(x, W, "
            "transposed=True) for x @ W; see docs/capture.md), or freeze it with requires_grad_(False)."
            + (self.bare.hint() if self.bare is not None else ""))

    def _propagate(self, call: GlueCall) -> None:
        handler = _GLUE.get(call.name)
        lab = handler(self, call) if handler is not None else self.unknown(call)
        if lab.__class__ is Label:  # the common case: one label for the first output
            self.set_label(call.outputs[0], lab)
            return
        for o, lb in zip(call.outputs, lab) if isinstance(lab, list) else ((call.outputs[0], lab),):
            if lb is not None:
                self.set_label(o, lb)
            elif id(o) in self._labels and any(t is o for t, _ in call.labeled):
                # an in-place op we could not follow: the tensor no longer has a known layout
                del self._labels[id(o)]

    # -- helpers for glue handlers --------------------------------------------------------------------
    def unknown(self, call: GlueCall, labeled=None) -> Label | None:
        """The safe answer for an op the tracer cannot follow: fix the spaces of ``labeled`` (default: all
        labeled inputs of ``call``). Returns the label for its output (input data of unknown layout, or
        None when a hidden space took part)."""
        labeled = call.labeled if labeled is None else labeled
        hidden = [lab for _, lab in labeled if lab.space is not None]
        why = f"reaches op '{call.name}', which gradgraph cannot prove equivariant"
        if call.name not in _GLUE:
            why += (f" (teach it to the tracer: from gradgraph.capture import register_glue; "
                    f"@register_glue('{call.name}'), see docs/capture.md)")
        for lab in hidden:
            self.spaces.fix(lab.space, why)
        if not hidden:  # derived from the inputs only: still input data, layout unknown
            return Label(None, (), None)
        return None

    def single(self, call: GlueCall) -> tuple[Tensor | None, Label | None]:
        """The one labeled input of ``call`` as ``(tensor, label)``, or ``(None, None)`` if there are more."""
        return call.labeled[0] if len(call.labeled) == 1 else (None, None)

    def dims(self, call: GlueCall, pos: int, ndim: int) -> tuple[int, ...] | None:
        """The ``dim`` argument (positional ``pos`` or keyword ``dim``/``axis``), non-negative, as a tuple."""
        dim = call.args[pos] if len(call.args) > pos else call.kwargs.get("dim", call.kwargs.get("axis"))
        if dim is None:
            return None
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        return tuple(d % ndim for d in dims)

    def check_same_batch(self, batch_axes, name: str) -> int | None:
        """The common batch axis of tensors combined by op ``name`` (None entries: no batch axis); raises
        :class:`~gradgraph.SampleMixingError` if they disagree."""
        axes = {b for b in batch_axes if b is not None}
        if len(axes) > 1:
            a, b = sorted(axes)[:2]
            raise SampleMixingError(
                f"op '{name}' combines a tensor whose batch axis is {a} with one whose batch axis is {b}: an op "
                "output without a batch axis is broadcast across the samples (for example a position embedding "
                "of shape [T, d] added to [b, T, d]). gradgraph needs every parameterized op to run per sample: "
                "expand its input to the batch first (positions.expand(b, T)).")
        return axes.pop() if axes else None

    def fresh_space(self, base: str, size: int, why: str | None) -> int:
        """A new hidden space with a unique name from ``base``, for neurons split off a traced space; it cannot
        be permuted (``why``) unless ``why`` is None."""
        self._fresh[base] += 1
        k = self._fresh[base]
        sid = self.spaces.new(base if k == 1 else f"{base}#{k}", size)
        if why is not None:
            self.spaces.fix(sid, why)
        return sid
