"""Bare parameters: a trainable ``nn.Parameter`` that the model's own code combines with activations outside any
rule, as class and position tokens (``torch.cat([cls.expand(b, -1, -1), x], 1) + pos``), layer scales
(``x * gamma``) and learned temperatures (``logits * t``).

The tracer hands every call that receives a trainable parameter outside a rule to :meth:`BareParameters.use`.
A use it recognises becomes a recorded op, and the call then runs on the op's output instead of the parameter
(same values, so the forward is unchanged and the gradient is exact):

* **scale** (``mul`` of an activation whose neurons are one flat axis by a parameter that has the neuron
  count along that axis and 1 elsewhere): a ``diag`` op ``x * w`` on the activation's own neurons; the call's
  output is the op's output.
* **additive** (``add``/``sub``/``mul``/``div``/``where`` with an activation that has a batch axis, or
  ``expand``/``expand_as`` to the batch): the parameter is an ``embedding`` whose vocabulary is its
  non-neuron positions (the last axis is the neurons): the op looks the table up per sample with the ids
  ``0..V-1`` laid out as the parameter, so each sample gets its own copy and its gradient is that copy's.
  The neurons are an op output like any other: the add/cat glue ties them to the stream they join. A
  scalar parameter (a temperature) is a table of one entry of one neuron whose output the glue treats as a
  broadcast constant.

Anything else (a parameter multiplied as a matrix, indexed, reshaped first, used in place, or combined with
nothing that has a batch axis) stays refused by the tracer: its gradient would be missing from the graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rules import supported_modules

ADDITIVE = frozenset({"add", "sub", "rsub", "mul", "multiply", "div", "divide", "true_divide", "where"})
EXPAND = frozenset({"expand", "expand_as"})


class BareParameters:
    """Records bare uses of parameters for a :class:`~gradgraph.capture.session.CaptureSession`."""

    def __init__(self, session) -> None:
        self.session = session

    def owners(self, names: list[str]) -> str:
        """The modules owning parameters ``names``, for error messages: "module 'inner' (its class)"."""
        out = []
        for n in names:
            path = n.rpartition(".")[0]
            cls = type(self.session.model.get_submodule(path))
            out.append(f"module '{path or '<root>'}' ({cls.__module__}.{cls.__qualname__})")
        return ", ".join(dict.fromkeys(out))

    @staticmethod
    def hint() -> str:
        return f" Modules with a built-in rule: {', '.join(supported_modules())}."

    def use(self, tracer, name: str, inplace: bool, args, kwargs, params: list[Tensor]):
        """None (refuse), ``("out", tensor)`` (the call's result) or ``("args", args, kwargs)`` (run the call on
        these arguments, the parameters replaced by op outputs)."""
        if inplace or kwargs.get("out") is not None:
            return None
        unique = list({id(p): p for p in params}.values())
        if name in {"mul", "multiply"} and len(unique) == 1:
            out = self._scale(tracer, args, kwargs, unique[0])
            if out is not None:
                return "out", out
        if name not in ADDITIVE | EXPAND:
            return None
        subst = {}
        for p in unique:
            e = self._table(tracer, name, args, kwargs, p)
            if e is None:
                return None
            subst[id(p)] = e

        def swap(v):
            return subst.get(id(v), v) if isinstance(v, Tensor) else v

        return "args", tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    # -- the two kinds of use ------------------------------------------------------------------------------
    def _partner(self, tracer, args, kwargs, p: Tensor):
        """The one other tensor operand with a batch axis at 0, as (tensor, label), or (None, None)."""
        others = [t for t in list(args) + list(kwargs.values()) if isinstance(t, Tensor) and t is not p]
        labeled = [(t, tracer.get_label(t)) for t in others if tracer.get_label(t) is not None]
        if len(labeled) != 1 or labeled[0][1].batch_axis != 0:
            return None, None
        return labeled[0]

    def _scale(self, tracer, args, kwargs, p: Tensor):
        x, lab = self._partner(tracer, args, kwargs, p)
        if x is None or lab.space is None or len(lab.axes) != 1 or lab.group or p.ndim > x.ndim or p.ndim == 0:
            return None
        axis = lab.axes[0]
        k = axis - (x.ndim - p.ndim)  # the parameter's axis aligned with the neurons
        n = x.shape[axis]
        if k < 0 or p.shape[k] != n or p.numel() != n or n == 1:
            return None
        return self.session.bare_op(self.session.diag, p, x, x, p, axis=axis)

    def _table(self, tracer, name: str, args, kwargs, p: Tensor):
        b = self.session.batch_size
        if name in EXPAND:
            if not args or args[0] is not p:
                return None
            sizes = tuple(args[1].shape) if name == "expand_as" else (
                tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:])
            if not sizes or sizes[0] != b or len(sizes) < p.ndim:
                return None
            nd = len(sizes)
        else:
            x, lab = self._partner(tracer, args, kwargs, p)
            if x is None or x.ndim < p.ndim:
                return None
            nd = x.ndim
            if lab.space is not None and (lab.axes != (nd - 1,) or lab.group) and p.numel() > 1:
                return None  # the parameter's last axis would not be the activation's neurons
        if p.ndim == nd and p.shape[0] != 1:
            return None  # a parameter with a row per sample: not one value shared by the samples
        if p.ndim == nd:
            shape = tuple(p.shape[1:])
        else:
            shape = (1,) * (nd - 1 - p.ndim) + tuple(p.shape)
        if not shape:
            return None
        vocab = shape[:-1]
        ids = torch.arange(p.numel() // shape[-1]).view(vocab).expand(b, *vocab)
        e = self.session.bare_op(self.session.embedding, p, ids, p)
        if p.numel() == 1:  # a scalar: broadcast like a constant (its one neuron is not the activation's)
            tracer.forget(e)
        return e
