"""Glue handlers for contractions between tensors without parameters: ``matmul``/``@``/``mm``/``bmm`` and
``einsum`` (a product with a weight is a parameterized op and goes through a rule instead).

Every contraction is read in einsum form: one index per operand axis, an output index list, and summation
over indices missing from the output. With one operand carrying neurons:

* its neuron indices all kept and no other operand indexed by them: the output carries the same neurons
  (``h @ C`` over a token axis, ``A @ h``);
* its neuron indices summed and no other operand indexed by them: a sum over neurons, invariant;
* any other operand indexed by them (a per-neuron constant, input data): the space is fixed.

With two operands carrying neurons, summing all neuron indices of both against each other (``q @ k^T``)
ties their spaces and gives an output without neurons; with heads kept as a batch axis (eager attention),
see :func:`_over_heads`; anything else is unknown. The batch index must be
kept and be one index for all operands, else samples mix (an error).
"""
from __future__ import annotations

from torch import Tensor

from ...errors import SampleMixingError
from ..tracer import GlueCall, Label, register_glue


def _broadcast(idx: list[list], shapes: list[tuple[int, ...]]) -> None:
    """Mark axes of size 1 that broadcast against a larger size as carrying nothing (None), in place."""
    size: dict = {}
    for ix, shape in zip(idx, shapes):
        for i, s in zip(ix, shape):
            size[i] = max(size.get(i, 1), s)
    for ix, shape in zip(idx, shapes):
        for k, (i, s) in enumerate(zip(ix, shape)):
            if s == 1 and size[i] > 1:
                ix[k] = None


def _matmul_index(sa: tuple[int, ...], sb: tuple[int, ...]):
    """Einsum form of ``A @ B`` (numpy matmul semantics, batch dims broadcast from the right)."""
    if not sa or not sb:
        return None
    ia = ["k"] if len(sa) == 1 else ["n", "k"]
    ib = ["k"] if len(sb) == 1 else ["k", "m"]
    na, nb = max(len(sa) - 2, 0), max(len(sb) - 2, 0)
    nbatch = max(na, nb)
    batch = [("batch", j) for j in range(nbatch)]
    out = batch + (["n"] if len(sa) > 1 else []) + (["m"] if len(sb) > 1 else [])
    return [batch[nbatch - na:] + ia, batch[nbatch - nb:] + ib], out


def _einsum_index(equation: str, shapes: list[tuple[int, ...]]):
    """Index lists of an einsum equation, with ``...`` expanded (aligned from the right)."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes) or any(t.count("...") > 1 for t in terms + [rhs]):
        return None
    n_ell = max((len(s) - len(t) + 3 for t, s in zip(terms, shapes) if "..." in t), default=0)
    ell = [("ellipsis", j) for j in range(n_ell)]
    idx = []
    for term, shape in zip(terms, shapes):
        pre, dots, post = term.partition("...")
        k = len(shape) - len(pre) - len(post) if dots else 0
        if k < 0 or (not dots and len(term) != len(shape)):
            return None
        idx.append(list(pre) + ell[n_ell - k:] + list(post))
    if arrow:
        pre, dots, post = rhs.partition("...")
        out = list(pre) + (ell if dots else []) + list(post)
    else:  # implicit output: the broadcast dims, then the letters used once, in alphabetical order
        letters = [c for t in terms for c in t.replace("...", "")]
        out = ell + sorted(c for c in set(letters) if letters.count(c) == 1)
    return idx, out


def contraction(tracer, call: GlueCall, operands: list, idx: list[list], out: list) -> Label | None:
    """Label the output of a contraction given in einsum form (see the module docstring)."""
    name = call.name
    if len(set(out)) != len(out) or not all(isinstance(x, Tensor) for x in operands):
        return tracer.unknown(call)
    _broadcast(idx, [tuple(x.shape) for x in operands])
    labs = [tracer.get_label(x) for x in operands]
    batch = set()
    for lab, ix in zip(labs, idx):
        if lab is not None and lab.batch_axis is not None:
            if ix[lab.batch_axis] is None:
                return tracer.unknown(call)
            batch.add(ix[lab.batch_axis])
    if len(batch) > 1 or (batch and next(iter(batch)) not in out):
        raise SampleMixingError(
            f"op '{name}' sums over the batch axis or contracts the batch axes of two tensors against each "
            "other, so an output depends on several samples and per-sample gradients are not defined. Keep the "
            "batch as a shared axis of the output (e.g. 'bij,bjk->bik', or torch.bmm).")
    bax = out.index(next(iter(batch))) if batch else None
    hidden = [k for k, lab in enumerate(labs) if lab is not None and lab.space is not None]
    if not hidden:
        return Label(None, (), bax)
    neurons = {}
    for k in hidden:
        lab, ix = labs[k], idx[k]
        letters = [ix[a] for a in lab.axes]
        if lab.group or None in letters or any(ix.count(i) > 1 for i in letters):
            return tracer.unknown(call)
        neurons[k] = letters
    if len(hidden) == 1:
        (k,) = hidden
        lab, letters = labs[k], neurons[k]
        shared = any(i in idx[j] for j in range(len(operands)) if j != k for i in letters)
        if all(i in out for i in letters):
            if shared:
                tracer.spaces.fix(lab.space, f"multiplied by a tensor that varies across its neurons in op '{name}'")
            return Label(lab.space, tuple(out.index(i) for i in letters), bax)
        if not any(i in out for i in letters):
            if shared:
                tracer.spaces.fix(lab.space, f"its neurons are contracted with a constant or input data in op "
                                             f"'{name}'")
            return Label(None, (), bax)
        return tracer.unknown(call)
    if len(hidden) == 2:
        a, b = hidden
        la, lb = neurons[a], neurons[b]
        others = [j for j in range(len(operands)) if j not in hidden]
        if any(i in idx[j] for j in others for i in la + lb):
            return tracer.unknown(call)
        if la == lb and not any(i in out for i in la):
            tracer.spaces.tie(labs[a].space, labs[b].space, f"op '{name}' (a product over their neurons)")
            return Label(None, (), bax)
        return _over_heads(tracer, call, operands, labs, (a, b), (la, lb), out, bax)
    return tracer.unknown(call)


def _over_heads(tracer, call: GlueCall, operands, labs, hidden, letters, out, bax) -> Label | None:
    """Attention written with matmul, heads kept as a batch axis of the product:

    * ``q @ k^T`` over the dims of each head ([b, H, T, dh] @ [b, H, dh, T]): q and k share a space split into
      H heads; the scores [b, H, T, T] carry one neuron per head, in a fresh per-head space of the same head
      group (so softmax, masks and dropout over the other axes keep the head symmetry);
    * ``scores @ v`` over tokens: v's space, split into the same heads as the scores.

    Anything else is unknown."""
    table, name = tracer.spaces, call.name
    (a, b), (la, lb) = hidden, letters
    if len(la) == len(lb) == 2 and la[0] == lb[0] and la[0] in out and la[1] == lb[1] and la[1] not in out:
        heads = operands[a].shape[labs[a].axes[0]]
        table.tie(labs[a].space, labs[b].space, f"op '{name}' (a product over the dims of each head)")
        scores = tracer.fresh_space(f"{table.name[table.find(labs[a].space)]}:scores", heads, None)
        for sid in (labs[a].space, scores):
            table.set_heads(sid, heads, name)
        table.tie_heads(labs[a].space, scores)
        return Label(scores, (out.index(la[0]),), bax)
    for s_, v_ in ((a, b), (b, a)):  # which operand holds the per-head scores
        ls, lv = letters[hidden.index(s_)], letters[hidden.index(v_)]
        r = table.find(labs[s_].space)
        per_head = table.heads[r] is not None and table.heads[r] == table.size[r] > 1
        if per_head and len(ls) == 1 and len(lv) == 2 and ls[0] == lv[0] and all(i in out for i in lv):
            table.set_heads(labs[v_].space, table.heads[r], name)
            table.tie_heads(labs[s_].space, labs[v_].space)
            return Label(labs[v_].space, tuple(out.index(i) for i in lv), bax)
    return tracer.unknown(call)


@register_glue("matmul", "mm", "bmm", "__matmul__", "__rmatmul__")
def matmul(tracer, call: GlueCall) -> Label | None:
    """``A @ B`` in all its spellings (``__rmatmul__(b, a)`` is ``a @ b``)."""
    a, b = call.arg(0, "input"), call.arg(1, "other", call.kwargs.get("mat2"))
    if call.name == "__rmatmul__":
        a, b = b, a
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return tracer.unknown(call)
    form = _matmul_index(tuple(a.shape), tuple(b.shape))
    return tracer.unknown(call) if form is None else contraction(tracer, call, [a, b], *form)


@register_glue("einsum")
def einsum(tracer, call: GlueCall) -> Label | None:
    """``torch.einsum(equation, *operands)`` (or a list of operands); the sublist form is unknown."""
    equation, operands = call.args[0], list(call.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not all(isinstance(x, Tensor) for x in operands):
        return tracer.unknown(call)
    form = _einsum_index(equation, [tuple(x.shape) for x in operands])
    return tracer.unknown(call) if form is None else contraction(tracer, call, operands, *form)
