"""Dataflow discovery by tracing the real forward pass.

A :class:`DataflowTracer` is a ``TorchFunctionMode`` that sees every torch function called between the
parameterized ops (the "glue": activations, residual additions, pooling, reshapes, attention). It gives every
tensor that carries neurons a :class:`Label` (which neuron space, which axis, which op output it came from)
and records in a :class:`SpaceTable` which spaces must be permuted together (residual additions, attention
heads) and which cannot be permuted at all (model inputs and outputs, spaces that reach an op it does not
understand).

Correctness does not depend on knowing every op: an unknown op marks the spaces of its inputs as fixed
(non-permutable), which only shrinks the symmetry group. Gradients never depend on the tracer at all.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import SampleMixingError

__all__ = ["Label", "SpaceTable", "DataflowTracer"]


class SpaceTable:
    """Union-find over neuron spaces.

    A space is a set of neurons that one permutation acts on. Tied spaces (a residual addition ties the
    stream to every block output) share their permutation. Attention spaces are split into ``heads``
    blocks; spaces in one head group share the permutation of the heads (q, k, v, attention output).
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.name: list[str] = []
        self.size: list[int] = []
        self.kind: list[str] = []  # "hidden" | "input"
        self.fixed: list[str | None] = []  # why the space cannot be permuted, or None
        self.output: list[bool] = []
        self.heads: list[int | None] = []
        self._head_parent: list[int] = []

    def new(self, name: str, size: int, kind: str = "hidden") -> int:
        sid = len(self._parent)
        self._parent.append(sid)
        self._head_parent.append(sid)
        self.name.append(name)
        self.size.append(int(size))
        self.kind.append(kind)
        self.fixed.append("model input" if kind == "input" else None)
        self.output.append(False)
        self.heads.append(None)
        return sid

    def find(self, s: int) -> int:
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def head_group(self, s: int) -> int:
        h = self.find(s)
        while self._head_parent[h] != h:
            self._head_parent[h] = self._head_parent[self._head_parent[h]]
            h = self._head_parent[h]
        return h

    def tie(self, a: int, b: int, why: str) -> int:
        """Neurons of ``a`` and ``b`` are the same neurons (same permutation)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ha, hb = self.head_group(ra), self.head_group(rb)
        if ra > rb:  # keep the older space as representative: its name is the canonical key
            ra, rb, ha, hb = rb, ra, hb, ha
        self._parent[rb] = ra
        if ha != hb:
            self._head_parent[max(ha, hb)] = min(ha, hb)
        if self.size[ra] != self.size[rb]:
            self.fixed[ra] = self.fixed[ra] or f"tied to a space of another size by {why}"
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.output[ra] = self.output[ra] or self.output[rb]
        if self.kind[rb] == "input":
            self.kind[ra] = "input"
        ha_, hb_ = self.heads[ra], self.heads[rb]
        if ha_ is not None and hb_ is not None and ha_ != hb_:
            self.fixed[ra] = self.fixed[ra] or f"conflicting head splits ({ha_} vs {hb_}) tied by {why}"
        self.heads[ra] = ha_ if ha_ is not None else hb_
        return ra

    def fix(self, s: int, why: str) -> None:
        r = self.find(s)
        self.fixed[r] = self.fixed[r] or why

    def mark_output(self, s: int) -> None:
        r = self.find(s)
        self.output[r] = True
        self.fixed[r] = self.fixed[r] or "model output"

    def set_heads(self, s: int, heads: int, why: str) -> None:
        r = self.find(s)
        if self.heads[r] is None:
            if self.size[r] % heads:
                self.fix(r, f"{why}: {heads} heads do not divide {self.size[r]} neurons")
            self.heads[r] = heads
        elif self.heads[r] != heads:
            self.fix(r, f"conflicting head splits ({self.heads[r]} vs {heads}) by {why}")

    def tie_heads(self, a: int, b: int) -> None:
        """``a`` and ``b`` are split into the same heads: permuting heads must act on both."""
        ha, hb = self.head_group(a), self.head_group(b)
        if ha != hb:
            self._head_parent[max(ha, hb)] = min(ha, hb)

    def roots(self) -> list[int]:
        return [s for s in range(len(self._parent)) if self.find(s) == s]


@dataclass(frozen=True)
class Label:
    """What the tracer knows about a tensor.

    ``space`` is None for tensors derived from the model inputs only. ``axes`` is ``(axis,)`` for a flat
    neuron axis, ``(head_axis, dim_axis)`` for a space split into attention heads, ``()`` when unknown.
    ``origin`` is the out-site id of the op output this tensor was computed from by per-neuron elementwise
    ops only (so that output and this tensor can share one node: g from the op, a from its consumer).
    ``group`` lists the sizes of spatial dims flattened into the neuron axis after it (channel-major),
    as in ``conv -> flatten -> linear``.
    """

    space: int | None
    axes: tuple[int, ...]
    batch_axis: int | None
    origin: int | None = None
    group: tuple[int, ...] = ()


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)

_UNARY = {
    "relu", "relu6", "gelu", "tanh", "sigmoid", "silu", "sin", "cos", "elu", "selu", "celu", "leaky_relu",
    "softplus", "softsign", "mish", "hardtanh", "hardswish", "hardsigmoid", "logsigmoid", "tanhshrink",
    "softshrink", "hardshrink", "threshold", "rrelu", "dropout", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "abs", "neg", "negative", "exp", "expm1", "log", "log1p", "sqrt",
    "rsqrt", "square", "reciprocal", "sign", "erf", "clamp", "clip", "clamp_min", "clamp_max", "sinh", "cosh",
    "atan", "asin", "acos", "asinh", "sinc", "clone", "contiguous", "float", "double", "half", "bfloat16",
    "to", "type_as", "detach", "nan_to_num", "masked_fill",
}
_BINARY = {
    "add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide", "pow", "float_power",
    "maximum", "minimum", "fmax", "fmin", "where", "lerp", "addcmul", "addcdiv", "atan2", "hypot",
}
_POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "interpolate", "upsample", "pad",
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "logsumexp", "nansum", "nanmean", "std", "var", "prod"}
_PERMUTE = {"transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "t"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_EXPAND = {"expand", "expand_as", "broadcast_to"}
_SOFTMAX = {"softmax", "log_softmax", "softmin"}
_CAT = {"cat", "concat", "concatenate", "stack"}
_IGNORED = {
    "__get__", "size", "dim", "numel", "item", "tolist", "__len__", "__format__", "__repr__", "is_floating_point",
    "is_contiguous", "stride", "data_ptr", "element_size", "__bool__", "__index__", "requires_grad_",
    "requires_grad", "retain_grad", "register_hook", "backward", "__setstate__", "__reduce_ex__", "__deepcopy__",
    "storage_offset", "untyped_storage", "get_device", "__array__", "numpy", "cpu",
}

# ignored ops whose raw name is already normalized (no trailing in-place "_"): skipped before any other work
_PASS_THROUGH = frozenset(n for n in _IGNORED if not (n.endswith("_") and not n.endswith("__")))


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


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into groups of consecutive dims with equal products (size-1 dims left out)."""
    si = [k for k, s in enumerate(src) if s != 1]
    dj = [k for k, s in enumerate(dst) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(si) and j < len(dj):
        a, b = [si[i]], [dj[j]]
        pa, pb = src[si[i]], dst[dj[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(si):
                    return None
                a.append(si[i])
                pa *= src[si[i]]
                i += 1
            else:
                if j >= len(dj):
                    return None
                b.append(dj[j])
                pb *= dst[dj[j]]
                j += 1
        groups.append((a, b))
    return groups if i == len(si) and j == len(dj) else None


def _consecutive(dims: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(dims, dims[1:]))


class DataflowTracer(TorchFunctionMode):
    """Labels tensors during a forward pass and records ties between neuron spaces.

    ``suspend()`` turns tracing off (used inside the parameterized ops, which label their outputs
    themselves). ``before_inplace`` is called with a tensor about to be modified in place.
    """

    def __init__(self, spaces: SpaceTable, batch_size: int, before_inplace=None) -> None:
        super().__init__()
        self.spaces = spaces
        self.batch_size = batch_size
        self.before_inplace = before_inplace
        self._labels: dict[int, Label] = {}
        self._keep: list[Tensor] = []  # keeps labeled tensors alive so that their ids stay unique
        self._suspended = 0

    # -- public helpers -------------------------------------------------------------------------------
    def set_label(self, t: Tensor, label: Label) -> None:
        self._labels[id(t)] = label
        self._keep.append(t)

    def get_label(self, t: Tensor) -> Label | None:
        return self._labels.get(id(t))

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
        if self._suspended or getattr(func, "__name__", None) in _PASS_THROUGH:
            return func(*args, **kwargs)  # most calls are attribute reads (Tensor.shape.__get__ & co.)
        ins = _tensors(args, kwargs)
        labeled = [(t, self._labels[id(t)]) for t in ins if id(t) in self._labels]
        if not labeled:
            return func(*args, **kwargs)
        name, inplace = _normalize_name(func)
        if name in _IGNORED:
            return func(*args, **kwargs)
        if kwargs.get("inplace") is True:
            inplace = True
        if inplace and self.before_inplace is not None and args and isinstance(args[0], Tensor):
            self.before_inplace(args[0])
        out = func(*args, **kwargs)
        if name == "batch_norm" and (args[5] if len(args) > 5 else kwargs.get("training", False)):
            raise SampleMixingError(
                "F.batch_norm in training mode normalizes with statistics of the whole batch, so every sample's "
                "output depends on the other samples and per-sample gradients are not defined. Put the module "
                "in eval mode (model.eval()) or use LayerNorm/GroupNorm.")
        try:
            self._propagate(name, func, args, kwargs, ins, labeled, out)
        except SampleMixingError:
            raise
        return out

    def _propagate(self, name, func, args, kwargs, ins, labeled, out) -> None:
        outs = [out] if isinstance(out, Tensor) else [o for o in (out if isinstance(out, (tuple, list)) else ())
                                                     if isinstance(o, Tensor)]
        if not outs:
            return
        first = outs[0]
        if name in _UNARY or name in _BINARY or (name in {"max", "min"} and len(args) > 1
                                                  and isinstance(args[1], Tensor)):
            lab = self._elementwise(name, ins, first)
        elif name in _POOL:
            lab = self._pool(name, args, labeled, first)
        elif name in _REDUCE:
            lab = self._reduce(name, args, kwargs, labeled, first)
        elif name in _PERMUTE:
            lab = self._permute(func, args, kwargs, labeled, first)
        elif name in _RESHAPE:
            lab = self._reshape(labeled, first)
        elif name in _EXPAND:
            lab = self._expand(name, labeled, first)
        elif name == "__getitem__":
            lab = self._getitem(args, labeled, first)
        elif name in _SOFTMAX:
            lab = self._softmax(name, args, kwargs, labeled)
        elif name in {"layer_norm", "normalize", "rms_norm"}:
            lab = self._normalization(name, args, kwargs, labeled)
        elif name == "scaled_dot_product_attention":
            lab = self._attention(args, kwargs, labeled, first)
        elif name in _CAT:
            lab = self._cat(name, args, kwargs, labeled, first)
        else:
            lab = self._unknown(name, labeled)
        if lab is not None:
            self.set_label(first, lab)
        elif isinstance(out, Tensor) and id(out) in self._labels and any(t is out for t, _ in labeled):
            # an in-place op we could not follow: the tensor no longer has a known layout
            del self._labels[id(out)]

    # -- op families ----------------------------------------------------------------------------------
    def _unknown(self, name: str, labeled) -> Label | None:
        hidden = [lab for _, lab in labeled if lab.space is not None]
        for lab in hidden:
            self.spaces.fix(lab.space, f"reaches op '{name}', which gradgraph cannot prove equivariant")
        if not hidden:  # derived from the inputs only: still input data, layout unknown
            return Label(None, (), None)
        return None

    def _check_same_batch(self, labs_axes, name: str) -> int | None:
        bax = {b for b in labs_axes if b is not None}
        if len(bax) > 1:
            raise SampleMixingError(
                f"op '{name}' combines a tensor whose batch axis is {sorted(bax)[0]} with one whose batch axis is "
                f"{sorted(bax)[1]}: an op output without a batch axis is broadcast across the samples (for example "
                "a position embedding of shape [T, d] added to [b, T, d]). gradgraph needs every parameterized op "
                "to run per sample: expand its input to the batch first (positions.expand(b, T)).")
        return bax.pop() if bax else None

    def _elementwise(self, name: str, ins: list[Tensor], out: Tensor) -> Label | None:
        nd = out.ndim
        labs, consts = [], []
        for t in ins:
            lab = self._labels.get(id(t))
            if lab is None:
                consts.append(t)
                continue
            shift = nd - t.ndim
            if shift < 0:
                return self._unknown(name, [(t, lab)])
            axes = tuple(a + shift for a in lab.axes)
            if any(t.shape[a] != out.shape[a + shift] for a in lab.axes):
                return self._unknown(name, [(t, lab)])
            bax = None if lab.batch_axis is None else lab.batch_axis + shift
            labs.append(replace(lab, axes=axes, batch_axis=bax))
        bax = self._check_same_batch([lab.batch_axis for lab in labs], name)
        hidden = [lab for lab in labs if lab.space is not None]
        if not hidden:
            return Label(None, (), bax)
        ref = hidden[0]
        # a constant that differs across neurons (a buffer of size n along the neuron axis) breaks symmetry
        for c in consts:
            shift = nd - c.ndim
            if any(a - shift >= 0 and c.shape[a - shift] != 1 for a in ref.axes):
                self.spaces.fix(ref.space, f"multiplied/added by a per-neuron constant in op '{name}'")
        if len(labs) == 1:
            return replace(ref, batch_axis=bax)
        if len(hidden) != len(labs):  # mixes a hidden space with input data
            for lab in hidden:
                self.spaces.fix(lab.space, f"combined with model input data by op '{name}'")
            return Label(ref.space, ref.axes, bax, None, ref.group)
        for lab in hidden[1:]:
            if lab.axes != ref.axes or lab.group != ref.group:
                for lb in hidden:
                    self.spaces.fix(lb.space, f"combined with a differently laid out tensor by op '{name}'")
                return None
            self.spaces.tie(ref.space, lab.space, f"op '{name}'")
        return Label(ref.space, ref.axes, bax, None, ref.group)

    def _single(self, labeled):
        return labeled[0] if len(labeled) == 1 else (None, None)

    def _pool(self, name: str, args, labeled, out: Tensor) -> Label | None:
        t, lab = self._single(labeled)
        if t is None or t is not args[0]:
            return self._unknown(name, labeled)
        if name == "pad":
            pad = args[1] if len(args) > 1 else None
            k = len(pad) // 2 if pad is not None else 0
        else:
            k = int(name[-2]) if name[-2:] in {"1d", "2d", "3d"} else (
                int(name.split("_with")[0][-2]) if "_with_indices" in name else t.ndim - 2)
        spatial = set(range(t.ndim - k, t.ndim))
        if (set(lab.axes) & spatial) or (lab.batch_axis in spatial) or lab.group or out.ndim != t.ndim:
            return self._unknown(name, labeled)
        return lab

    def _dims(self, args, kwargs, pos: int, ndim: int):
        dim = args[pos] if len(args) > pos else kwargs.get("dim", kwargs.get("axis"))
        if dim is None:
            return None
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        return tuple(d % ndim for d in dims)

    def _reduce(self, name: str, args, kwargs, labeled, out: Tensor) -> Label | None:
        t, lab = self._single(labeled)
        if t is None or t is not args[0]:
            return self._unknown(name, labeled)
        dims = self._dims(args, kwargs, 1, t.ndim)
        if dims is None:
            dims = tuple(range(t.ndim))
        if lab.batch_axis is not None and lab.batch_axis in dims:
            raise SampleMixingError(
                f"op '{name}' reduces over the batch axis (dim {lab.batch_axis}) of a tensor of shape "
                f"{tuple(t.shape)}, so every sample's output depends on the whole batch and per-sample gradients "
                "are not defined. Reduce over the other axes only.")
        if lab.space is not None and set(lab.axes) & set(dims):
            return None  # a sum over neurons is invariant: the result carries no neurons
        keep = len(args) > 2 and args[2] is True or kwargs.get("keepdim", False)
        if keep:
            return replace(lab, group=lab.group if not dims else lab.group)
        def shifted(a):
            return a - sum(1 for d in dims if d < a)
        if lab.group and any(d > lab.axes[0] for d in dims):
            return self._unknown(name, labeled)
        return replace(lab, axes=tuple(shifted(a) for a in lab.axes),
                       batch_axis=None if lab.batch_axis is None else shifted(lab.batch_axis))

    def _permute(self, func, args, kwargs, labeled, out: Tensor) -> Label | None:
        t, lab = self._single(labeled)
        if t is None or t is not args[0] or t.ndim > len(_PRIMES):
            return self._unknown(getattr(func, "__name__", "permute"), labeled)
        probe = torch.empty(_PRIMES[: t.ndim], device="meta")
        with self.suspend():
            pout = func(probe, *args[1:], **kwargs)
        where = {size: k for k, size in enumerate(pout.shape)}
        src_to_out = {i: where[_PRIMES[i]] for i in range(t.ndim)}
        if lab.group:
            return self._unknown("permute", labeled)
        return replace(lab, axes=tuple(src_to_out[a] for a in lab.axes),
                       batch_axis=None if lab.batch_axis is None else src_to_out[lab.batch_axis])

    def _reshape(self, labeled, out: Tensor) -> Label | None:
        t, lab = self._single(labeled)
        if t is None:
            return self._unknown("reshape", labeled)
        src, dst = tuple(t.shape), tuple(out.shape)
        groups = _reshape_groups(src, dst)
        if groups is None:
            return self._unknown("reshape", labeled)
        where = {d: (a, b) for a, b in groups for d in a}

        bax = None
        if lab.batch_axis is not None and src[lab.batch_axis] == self.batch_size:
            a, b = where.get(lab.batch_axis, (None, None))
            bax = b[0] if a == [lab.batch_axis] and len(b) == 1 else None
        if lab.space is None:
            return Label(None, (), bax)
        if len(lab.axes) == 1:
            ax = lab.axes[0]
            if src[ax] == 1:
                return replace(lab, axes=(), batch_axis=bax, origin=None, group=())
            a, b = where[ax]
            bsizes = tuple(dst[d] for d in b)
            if lab.group:
                if a == [ax] and bsizes == (src[ax] // _prod(lab.group),) + lab.group and _consecutive(b):
                    return replace(lab, axes=(b[0],), batch_axis=bax, group=())
                if a == [ax] and len(b) == 1:
                    return replace(lab, axes=(b[0],), batch_axis=bax)
                return self._unknown("reshape", labeled)
            if a == [ax] and len(b) == 1:
                return replace(lab, axes=(b[0],), batch_axis=bax)
            if a == [ax] and len(b) == 2 and _consecutive(b):
                return replace(lab, axes=(b[0], b[1]), batch_axis=bax, origin=None)
            if a[0] == ax and len(b) == 1 and _consecutive(a):
                return replace(lab, axes=(b[0],), batch_axis=bax, group=tuple(src[d] for d in a[1:]))
            return self._unknown("reshape", labeled)
        if len(lab.axes) == 2:
            h, d = lab.axes
            ah, bh = where[h]
            ad, bd = where[d]
            if ah == [h, d] and len(bh) == 1:
                return replace(lab, axes=(bh[0],), batch_axis=bax)
            if ah == [h] and ad == [d] and len(bh) == 1 and len(bd) == 1:
                return replace(lab, axes=(bh[0], bd[0]), batch_axis=bax)
        return self._unknown("reshape", labeled)

    def _expand(self, name, labeled, out: Tensor) -> Label | None:
        t, lab = self._single(labeled)
        if t is None:
            return self._unknown(name, labeled)
        shift = out.ndim - t.ndim
        if lab.space is not None and any(out.shape[a + shift] != t.shape[a] for a in lab.axes):
            return self._unknown(name, labeled)
        bax = None if lab.batch_axis is None else lab.batch_axis + shift
        if shift and lab.space is not None and bax is not None and bax != 0:
            self._check_same_batch([0, bax], name)
        return replace(lab, axes=tuple(a + shift for a in lab.axes), batch_axis=bax)

    def _getitem(self, args, labeled, out: Tensor) -> Label | None:
        t, lab = self._single(labeled)
        if t is None or t is not args[0]:
            return self._unknown("__getitem__", labeled)
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
            return self._unknown("__getitem__", labeled)
        n_used = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (t.ndim - n_used))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (t.ndim - sum(1 for i in expanded if i is not None)))
        src_to_out: dict[int, int | None] = {}
        full: dict[int, bool] = {}
        src = o = 0
        for i in expanded:
            if i is None:
                o += 1
            elif isinstance(i, int):
                src_to_out[src], full[src] = None, False
                src += 1
            else:
                src_to_out[src], full[src] = o, i == slice(None)
                src, o = src + 1, o + 1
        bax = lab.batch_axis
        if bax is not None:
            bax = src_to_out[bax] if full[bax] else None
        if lab.space is None:
            return Label(None, (), bax)
        if not all(full[a] for a in lab.axes) or (lab.group and any(
                not full[d] for d in range(lab.axes[0] + 1, t.ndim))):
            return self._unknown("__getitem__", labeled)
        return replace(lab, axes=tuple(src_to_out[a] for a in lab.axes), batch_axis=bax)

    def _softmax(self, name, args, kwargs, labeled) -> Label | None:
        t, lab = self._single(labeled)
        if t is None or t is not args[0]:
            return self._unknown(name, labeled)
        dims = self._dims(args, kwargs, 1, t.ndim)
        if dims is None:
            return self._unknown(name, labeled)
        if lab.batch_axis is not None and lab.batch_axis in dims:
            raise SampleMixingError(f"op '{name}' normalizes over the batch axis (dim {lab.batch_axis}), so every "
                                    "sample's output depends on the whole batch. Normalize over the other axes.")
        # softmax over neurons is permutation-equivariant; over other axes it acts per neuron
        return replace(lab, origin=None)

    def _normalization(self, name, args, kwargs, labeled) -> Label | None:
        t, lab = self._single(labeled)
        if t is None or t is not args[0]:
            return self._unknown(name, labeled)
        if name == "normalize":
            dims = self._dims(args, kwargs, 2, t.ndim) or (1 % t.ndim,)
        else:
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            dims = tuple(range(t.ndim - len(shape), t.ndim))
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            bias = args[3] if len(args) > 3 else kwargs.get("bias")
            if (weight is not None or bias is not None) and lab.space is not None:
                self.spaces.fix(lab.space, f"scaled by per-neuron weights in a functional '{name}'")
        if lab.batch_axis is not None and lab.batch_axis in dims:
            raise SampleMixingError(f"op '{name}' normalizes over the batch axis, so every sample's output depends "
                                    "on the whole batch. Normalize over the other axes.")
        return replace(lab, origin=None)

    def _attention(self, args, kwargs, labeled, out: Tensor) -> Label | None:
        names = ("query", "key", "value")
        qkv = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3)]
        labs = [self._labels.get(id(x)) for x in qkv]
        if kwargs.get("enable_gqa") or any(lab is None or lab.space is None or lab.group for lab in labs):
            return self._unknown("scaled_dot_product_attention", labeled)
        nd = qkv[0].ndim
        if nd == 4:  # [b, heads, T, dh]; with one head the size-1 head axis is not tracked
            want = ((1, 3),) if qkv[0].shape[1] > 1 else ((1, 3), (3,))
        elif nd == 3:  # [b, T, d]: one head
            want = ((2,),)
        else:
            return self._unknown("scaled_dot_product_attention", labeled)
        if any(lab.axes not in want or lab.batch_axis != 0 for lab in labs):
            return self._unknown("scaled_dot_product_attention", labeled)
        heads = qkv[0].shape[1] if nd == 4 else 1
        lq, lk, lv = labs
        why = "scaled_dot_product_attention"
        self.spaces.tie(lq.space, lk.space, why + " (queries and keys)")
        self.spaces.set_heads(lq.space, heads, why)
        self.spaces.set_heads(lv.space, heads, why)
        self.spaces.tie_heads(lq.space, lv.space)
        return Label(lv.space, lv.axes, 0, None, ())

    def _cat(self, name, args, kwargs, labeled, out: Tensor) -> Label | None:
        seq = args[0] if args else kwargs.get("tensors")
        labs = [self._labels.get(id(x)) for x in seq]
        if any(lab is None for lab in labs) or len({(lab.axes, lab.batch_axis, lab.group) for lab in labs}) != 1:
            return self._unknown(name, labeled)
        ref = labs[0]
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0))
        dim = dim % (out.ndim if name == "stack" else seq[0].ndim)
        if dim in ref.axes or dim == ref.batch_axis:
            return self._unknown(name, labeled)
        spaces = [lab.space for lab in labs]
        if any(s is None for s in spaces):
            return self._unknown(name, labeled) if any(s is not None for s in spaces) else Label(None, (), None)
        for s in spaces[1:]:
            self.spaces.tie(spaces[0], s, f"op '{name}'")
        if name == "stack":
            def sh(a):
                return a + (1 if a >= dim else 0)
            return Label(ref.space, tuple(sh(a) for a in ref.axes),
                         None if ref.batch_axis is None else sh(ref.batch_axis), None, ref.group)
        return Label(ref.space, ref.axes, ref.batch_axis, None, ref.group)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p
