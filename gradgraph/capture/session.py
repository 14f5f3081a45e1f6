"""One capture: patch the forwards of modules that have rules, trace the glue between them, record the
input activations and output gradients of every parameterized op.

Rules (see :mod:`gradgraph.capture.rules`) receive the session as ``ctx`` and express a module's forward
with four primitives: :meth:`CaptureSession.linear`, :meth:`~CaptureSession.conv`,
:meth:`~CaptureSession.diag` (elementwise affine, as in LayerNorm) and :meth:`~CaptureSession.embedding`.
Each primitive computes the op, labels its output for the tracer and records where its ``a`` and ``g`` live.
"""
from __future__ import annotations

import functools
import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

from ..errors import GradGraphError, SampleMixingError, UnsupportedModuleError
from .bare import BareParameters
from .geometry import Rows, conv_padding, expand_tuple
from .records import CaptureRecords, InSite, OpRecord, OutSite, ParamRef, tie_shared
from .rules import find_rule, overrides_a_rule, supported_modules
from .sample_rows import per_sample, rows_per_sample, run_by_rows
from .spaces import SpaceTable
from .tracer import DataflowTracer, Label

_MISSING = object()


def _builtin_layer(cls) -> bool:
    """A torch layer (or a subclass of one): it computes with its parameters in torch's own code."""
    return any(c.__module__.startswith("torch.") for c in cls.__mro__ if c not in (nn.Module, object))


class CaptureSession:
    """Records one forward (and, after :meth:`collect_grads` or hooks, one backward) of ``model``.

    Use as a context manager around exactly one call of ``model``. With ``use_hooks=False`` the caller
    differentiates with :meth:`collect_grads` (capture's path: parameter ``.grad`` is not touched and the
    weight-gradient products are skipped); with ``use_hooks=True`` tensor hooks store ``g`` during the
    user's own ``loss.backward()`` (the recorder's path).
    """

    def __init__(self, model: nn.Module, use_hooks: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradgraph needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.use_hooks = use_hooks
        named_params = list(model.named_parameters())
        named_buffers = list(model.named_buffers())
        self._param_names = {id(p): n for n, p in named_params}
        self._trainable_names = {id(p): n for n, p in named_params if p.requires_grad}
        self._buffer_names = {id(b): n for n, b in named_buffers}
        self.params = [(n, tuple(p.shape), p.requires_grad) for n, p in named_params]
        self.buffers = {n: tuple(b.shape) for n, b in named_buffers}
        self._rules = []
        found = [(path, module, find_rule(module)) for path, module in model.named_modules()]
        # a parameter of a module without a rule is fine if it is also one of a module with a rule (tied, as
        # BERT's output bias): that rule records its use
        covered = {id(p) for _, module, rule in found if rule is not None for p in module.parameters()}
        for path, module, rule in found:
            trainable = [n for n, p in module._parameters.items()
                         if p is not None and p.requires_grad and id(p) not in covered]
            if rule is None and trainable and (_builtin_layer(type(module)) or overrides_a_rule(module)):
                # a built-in layer computes with its parameters in its own code; the model's own modules may use
                # parameters bare (class tokens, layer scales: capture/bare.py), and the tracer refuses the rest
                cls = type(module)
                raise UnsupportedModuleError(
                    f"module '{path or '<root>'}' ({cls.__module__}.{cls.__qualname__}) has trainable parameters "
                    f"{trainable} but no capture rule, so its gradient cannot be represented. Supported modules: "
                    f"{', '.join(supported_modules())}. Write a rule with @gradgraph.register_rule("
                    f"{cls.__name__}) (see docs/capture.md), compose the module from supported ones, or "
                    "freeze these parameters with requires_grad_(False).")
            if rule is not None:
                self._rules.append((path, module, rule))
        self.spaces = SpaceTable()
        self.ops: list[OpRecord] = []
        self.insites: dict[tuple, InSite] = {}
        self.outsites: list[OutSite] = []
        self.tracer: DataflowTracer | None = None
        self.batch_size: int | None = None
        self.output = None
        self.dtype = None
        self._path = ""
        self._names = Counter()
        self._patched: list[tuple[nn.Module, object]] = []
        self._insite_by_tensor: dict[int, list[InSite]] = {}
        self._alive: list[Tensor] = []
        self._row_views: dict[int, Tensor] = {}  # id of a [b*k, ...] input -> its [b, k, ...] view
        self._calls = 0

    # -- patching ---------------------------------------------------------------------------------------
    def __enter__(self) -> "CaptureSession":
        for path, module, rule in self._rules:
            self._patch(module, functools.partial(self._call_rule, rule, module, path))
        self._patch(self.model, functools.partial(self._call_root, self.model.forward))
        return self

    def __exit__(self, *exc) -> None:
        for module, old in reversed(self._patched):
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = old
        self._patched.clear()

    def _patch(self, module: nn.Module, fn) -> None:
        self._patched.append((module, module.__dict__.get("forward", _MISSING)))
        module.__dict__["forward"] = fn

    def _call_root(self, inner, *args, **kwargs):
        if self._calls:
            raise GradGraphError(
                "the model was called twice while gradgraph was recording; a gradient graph records exactly one "
                "forward and one backward pass. Start a new capture (or GradientRecorder) for every batch.")
        self._calls += 1
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.ndim]  # 0-d: constants
        if not leaves:
            raise GradGraphError("the model's inputs contain no tensor with a batch axis; gradgraph needs the "
                                 "batch as the first dimension of the inputs")
        self.batch_size = int(leaves[0].shape[0])
        self.tracer = DataflowTracer(self.spaces, self.batch_size, self._before_inplace, self._trainable_names,
                                     BareParameters(self))
        for t in leaves:
            if t.ndim and t.shape[0] == self.batch_size:
                self.tracer.set_label(t, Label(None, (), 0))
        try:
            try:
                with torch.enable_grad(), self.tracer:
                    out = inner(*args, **kwargs)
            except GradGraphError as e:  # a refused parameter use is the first thing that went wrong
                if self.tracer.refused is not None:
                    raise self.tracer.refused from e
                raise
            if self.tracer.refused is not None:
                raise self.tracer.refused
            for t in tree_flatten(out)[0]:
                lab = self.tracer.get_label(t) if isinstance(t, Tensor) else None
                if lab is not None and lab.space is not None:
                    self.spaces.mark_output(lab.space)
        finally:
            self.tracer.release()
        self.output = out
        return out

    def _call_rule(self, rule, module, path, *args, **kwargs):
        if self.tracer is None or self._calls == 0:
            raise GradGraphError(f"module '{path}' was called outside the forward of the model being recorded; "
                                 "gradgraph records the model's own forward pass only")
        if torch._C._current_graph_task_id() != -1:  # a forward run by autograd inside the backward pass
            raise GradGraphError(
                f"module '{path}' ran again during the backward pass: activation checkpointing "
                "(torch.utils.checkpoint) recomputes forwards in backward, and a gradient graph records exactly one "
                "forward; record this step without checkpointing (Hugging Face: "
                "model.gradient_checkpointing_disable())")
        prev, self._path = self._path, path
        try:
            return rule(self, module, *args, **kwargs)
        finally:
            self._path = prev

    def _before_inplace(self, t: Tensor) -> None:
        # an in-place op would overwrite an activation we stored: keep a copy of the recorded value
        for site in self._insite_by_tensor.pop(id(t), []):
            site.a = site.a.clone()

    # -- primitives for rules ---------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """Dotted path of the module whose rule is running (for error messages)."""
        return self._path or "<root>"

    def rows(self, param: Tensor, start: int, stop: int) -> Rows:
        """Refer to rows ``start:stop`` of a packed parameter (e.g. the query block of ``in_proj_weight``)."""
        return Rows(param, start, stop)

    def linear(self, x: Tensor, weight, bias=None, name: str | None = None, transposed: bool = False) -> Tensor:
        """``y = x W^T + b`` over the last axis of ``x`` ([b, ..., in] -> [b, ..., out]); with
        ``transposed=True`` the weight is stored ``[in, out]`` and ``y = x W + b`` (Hugging Face ``Conv1D``,
        kind ``transposed_linear``). A flattened conv map ([b, C*H*W]) keeps its channels as nodes: the op
        then acts like a conv whose kernel covers the whole map (plain layout only)."""
        if (k := rows_per_sample(self, x)) > 1:  # [b*k, ..., in], k rows per sample: run on the [b, k, ..., in] view
            return run_by_rows(self, k, x, lambda v: self.linear(v, weight, bias, name, transposed))
        with self.tracer.suspend():  # the op and the bookkeeping; the tracer sees the op through its label
            W, wref = self._param(weight, "weight")
            B, bref = self._param(bias, "bias")
            x = per_sample(self, x)
            out = F.linear(x, W.t() if transposed else W, B)
            opname = self._op_name(name)
            lab = self.tracer.get_label(x)
            last = x.ndim - 1
            if (not transposed and lab is not None and lab.space is not None and lab.group and lab.axes == (last,)
                    and x.ndim == 2):
                spatial = lab.group
                C = x.shape[1] // math.prod(spatial)
                a = x.reshape(x.shape[0], C, *spatial).movedim(1, -1)
                insite = self._insite((id(x), "grouped"), opname, x, a, lab, want=(last,), grouped=True)
                geometry = {"spatial": tuple(spatial)}
            else:
                insite = self._insite((id(x), last), opname, x, x, lab, want=(last,))
                geometry = {}
            outsite = self._outsite(out, last, opname)
            self._record(opname, "transposed_linear" if transposed else "linear", insite, outsite, wref, bref,
                         geometry)
        return out

    def conv(self, x: Tensor, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1,
             name: str | None = None) -> Tensor:
        """An N-d convolution ([b, C_in, *spatial] -> [b, C_out, *spatial']); channels are the nodes."""
        with self.tracer.suspend():
            W, wref = self._param(weight, "weight")
            B, bref = self._param(bias, "bias")
            d = W.ndim - 2
            opname = self._op_name(name)
            if groups != 1 or d not in (1, 2):
                raise UnsupportedModuleError(
                    f"module '{self._path}': gradgraph supports 1-d and 2-d convolutions with groups=1, got a "
                    f"{d}-d convolution with groups={groups}. Grouped/depthwise convolutions need a rule of their "
                    "own.")
            conv_fn = F.conv1d if d == 1 else F.conv2d
            x = per_sample(self, x)
            out = conv_fn(x, W, B, stride, padding, dilation)
            kernel = tuple(W.shape[2:])
            dil = expand_tuple(dilation, d)
            lab = self.tracer.get_label(x)
            insite = self._insite((id(x), 1), opname, x, x.movedim(1, -1), lab, want=(1,))
            outsite = self._outsite(out, 1, opname)
            geometry = {"kernel": kernel, "stride": expand_tuple(stride, d), "dilation": dil,
                        "padding": conv_padding(padding, kernel, dil)}
            self._record(opname, "conv", insite, outsite, wref, bref, geometry)
        return out

    def diag(self, x: Tensor, x_hat: Tensor, weight=None, bias=None, axis: int = -1, buffers=(),
             name: str | None = None) -> Tensor:
        """Elementwise affine ``y = x_hat * w + b`` along ``axis`` (LayerNorm, eval BatchNorm). ``x`` is the
        module input (for the dataflow), ``x_hat`` the normalized input (the activation the weight sees).
        ``buffers`` are per-neuron buffers (running statistics) that a permutation must move as well."""
        axis = axis % x.ndim
        if (k := rows_per_sample(self, x)) > 1 and axis > 0 and x_hat.shape == x.shape:
            with self.tracer.suspend():
                hat = x_hat.unflatten(0, (self.batch_size, k))
            return run_by_rows(self, k, x, lambda v: self.diag(v, hat, weight, bias, axis + 1, buffers, name))
        with self.tracer.suspend():
            W, wref = self._param(weight, "weight")
            B, bref = self._param(bias, "bias")
            shape = [1] * x.ndim
            shape[axis] = -1
            out = x_hat * W.view(shape) if W is not None else x_hat * 1.0
            if B is not None:
                out = out + B.view(shape)
            opname = self._op_name(name)
            lab = self.tracer.get_label(x)
            insite = self._insite((id(x), "diag", len(self.ops)), opname, x, x_hat.movedim(axis, -1), lab,
                                  want=(axis,))
            outsite = self._outsite(out, axis, opname, space=insite.space)
            names = tuple(self._buffer_names[id(b)] for b in buffers if id(b) in self._buffer_names)
            self._record(opname, "diag", insite, outsite, wref, bref, {"buffers": names})
        return out

    def embedding(self, ids: Tensor, weight, padding_idx: int | None = None, name: str | None = None) -> Tensor:
        """A lookup table ``W[ids]`` ([b, ...] long -> [b, ..., d]). The vocabulary entries are input nodes
        whose activation is one-hot; the graph stores the token ids, not the one-hot matrix."""
        with self.tracer.suspend():
            W, wref = self._param(weight, "weight")
            if W.ndim != 2:  # a bare parameter [1, T, d]: a table of T entries (see capture/bare.py)
                W = W.reshape(-1, W.shape[-1] if W.ndim else 1)
            ids = per_sample(self, ids)
            out = F.embedding(ids, W, padding_idx)
            opname = self._op_name(name)
            space = self.spaces.new(f"{opname}.vocab", W.shape[0], "input")
            insite = self._insite((id(ids), "embedding", len(self.ops)), opname, ids, ids, None, want=(),
                                  kind="onehot", n=W.shape[0], space=space)
            outsite = self._outsite(out, out.ndim - 1, opname)
            pad = None if padding_idx is None else padding_idx % W.shape[0]
            self._record(opname, "embedding", insite, outsite, wref, None, {"padding_idx": pad})
        return out

    def bare_op(self, primitive, param: Tensor, *args, **kwargs) -> Tensor:
        """Run ``primitive`` for a bare use of ``param`` (capture/bare.py): the op is named by the parameter."""
        prev, self._path = self._path, self._param_names[id(param)]
        try:
            return primitive(*args, **kwargs)
        finally:
            self._path = prev

    # -- internals --------------------------------------------------------------------------------------
    def _op_name(self, suffix: str | None) -> str:
        base = self._path or "<root>"
        name = f"{base}:{suffix}" if suffix else base
        self._names[name] += 1
        return name if self._names[name] == 1 else f"{name}#{self._names[name]}"

    def _param(self, p, what: str):
        if p is None:
            return None, None
        rows = None
        if isinstance(p, Rows):
            rows = (p.start, p.stop)
            tensor, p = p.param[p.start:p.stop], p.param
        else:
            tensor = p
        name = self._param_names.get(id(p))
        if name is None:
            raise UnsupportedModuleError(
                f"module '{self._path}': the {what} passed to a gradgraph op is not a parameter of the model "
                "(gradgraph maps every weight back to a parameter name). Pass the nn.Parameter itself, or "
                "ctx.rows(param, start, stop) for a block of a packed parameter.")
        self.dtype = self.dtype or tensor.dtype
        return tensor, ParamRef(name, tuple(p.shape), rows)

    def _check_batch(self, t: Tensor, opname: str, what: str) -> None:
        if t.ndim == 0 or t.shape[0] != self.batch_size:
            raise SampleMixingError(
                f"op '{opname}': its {what} has shape {tuple(t.shape)} but the batch has {self.batch_size} "
                "samples. gradgraph needs every parameterized op to run per sample with the batch as the first "
                "axis (an op shared across samples, e.g. a position embedding of shape [T, d], must get its "
                "input expanded to the batch first).")

    def _insite(self, key, opname, source: Tensor, a: Tensor, lab: Label | None, want, grouped: bool = False,
                kind: str = "dense", n: int | None = None, space: int | None = None) -> InSite:
        if key in self.insites:
            return self.insites[key]
        self._check_batch(a, opname, "input")
        origin = None
        if kind == "dense":
            n = a.shape[-1]
            elem_shape = tuple(a.shape[:-1])
        else:
            elem_shape = tuple(a.shape)
        if space is None:
            if lab is not None and lab.space is not None and lab.axes == tuple(want) and bool(lab.group) == grouped:
                space, origin = lab.space, lab.origin
            elif lab is not None and lab.space is not None:
                self.spaces.fix(lab.space, f"used by op '{opname}' along an axis the tracer did not follow")
                space = self.spaces.new(f"{opname}.in", n)
                self.spaces.fix(space, f"reached op '{opname}' through ops gradgraph cannot follow")
            else:
                space = self.spaces.new(f"{opname}.in", n, "input")
        site = InSite(key, f"{opname}.in", a.detach(), n, elem_shape, space, origin, kind)
        self._alive.append(source)  # keys use id(source): it must not be freed and its id reused
        self.insites[key] = site
        self._insite_by_tensor.setdefault(id(source), []).append(site)
        return site

    def _outsite(self, out: Tensor, axis: int, opname: str, space: int | None = None) -> OutSite:
        self._check_batch(out, opname, "output")
        if not out.requires_grad:
            out.requires_grad_()  # no trainable input upstream: still differentiate the loss w.r.t. it
        n = out.shape[axis]
        elem_shape = tuple(s for k, s in enumerate(out.shape) if k != axis)
        if space is None:
            space = self.spaces.new(f"{opname}.out", n)
        site = OutSite(len(self.outsites), f"{opname}.out", n, elem_shape, space, axis)
        if self.use_hooks:
            out.register_hook(functools.partial(self._store_grad, site))
        else:
            site.grad_edge = get_gradient_edge(out)
        self.outsites.append(site)
        self.tracer.set_label(out, Label(space, (axis,), 0, site.id))
        return site

    @staticmethod
    def _store_grad(site: OutSite, g: Tensor) -> None:
        site.g = g.detach().movedim(site.axis, -1)

    def _record(self, name, kind, insite, outsite, wref, bref, geometry) -> None:
        self.ops.append(OpRecord(name, kind, insite, outsite, wref, bref, geometry))

    # -- after the forward ------------------------------------------------------------------------------
    def collect_grads(self, total: Tensor) -> None:
        """Differentiate ``total`` (the sum of per-sample losses) w.r.t. every op output, skipping the
        weight gradients (they are what the graph represents)."""
        if not self.outsites:
            return
        grads = torch.autograd.grad(total, [s.grad_edge for s in self.outsites], allow_unused=True)
        for site, g in zip(self.outsites, grads):
            site.g = None if g is None else g.detach().movedim(site.axis, -1)

    def records(self, grad_scale: float = 1.0, structure_only: bool = False) -> CaptureRecords:
        """The finished records; raises if no gradient was recorded at all. ``structure_only`` skips the
        gradient checks (for building a spec from a forward pass alone). Non-finite values are checked by the
        graph builder in one pass over the assembled features (see :meth:`CaptureRecords.check_finite`)."""
        if self._calls == 0:
            raise GradGraphError("the model was never called while gradgraph was recording")
        tie_shared(self.ops, self.spaces)
        if structure_only:
            return CaptureRecords(self.ops, list(self.insites.values()), self.outsites, self.spaces,
                                  self.batch_size, self.params, self.buffers, self.dtype)
        if self.outsites and all(s.g is None for s in self.outsites):
            raise GradGraphError("no gradient was recorded: call loss.backward() inside the recorder (or after "
                                 "the forward it recorded) before asking for the graph")
        for site in self.outsites:
            if site.g is None:  # this op's output does not influence the loss
                shape = (self.batch_size,) + site.elem_shape[1:] + (site.n,)
                site.g = torch.zeros(shape, dtype=self.dtype)
        return CaptureRecords(self.ops, list(self.insites.values()), self.outsites, self.spaces, self.batch_size,
                              self.params, self.buffers, self.dtype, grad_scale)
