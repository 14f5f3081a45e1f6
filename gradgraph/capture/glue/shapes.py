"""Glue handlers for ops that move, view or cut axes: permute/transpose, view/reshape/flatten/squeeze,
expand, indexing, and split/chunk/tensor_split/unbind (several outputs)."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ...errors import SampleMixingError
from ..tracer import GlueCall, Label, register_glue

PERMUTE = {"transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "T", "mT", "H", "mH"}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
EXPAND = {"expand", "expand_as", "broadcast_to"}
SPLIT = {"split": 2, "split_with_sizes": 2, "chunk": 2, "tensor_split": 2, "unbind": 1}  # op -> position of dim

_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


@register_glue(*PERMUTE)
def permute(tracer, call: GlueCall) -> Label | None:
    """Axis permutations move the label's axes; where each axis goes is read off a probe on the meta device
    whose dims are distinct primes."""
    t, lab = tracer.single(call)
    args = call.args
    if t is None or t is not args[0] or t.ndim > len(_PRIMES):
        return tracer.unknown(call)
    probe = torch.empty(_PRIMES[: t.ndim], device="meta")
    with tracer.suspend():
        pout = call.func(probe, *args[1:], **call.kwargs)
    where = {size: k for k, size in enumerate(pout.shape)}
    src_to_out = {i: where[_PRIMES[i]] for i in range(t.ndim)}
    if lab.group:
        return tracer.unknown(call)
    return replace(lab, axes=tuple(src_to_out[a] for a in lab.axes),
                   batch_axis=None if lab.batch_axis is None else src_to_out[lab.batch_axis])


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


def _batch_after_reshape(tracer, lab: Label, src, dst, where) -> tuple[int | None, int]:
    """Where the batch axis is after a reshape, and how many rows per sample it holds (``Label.rows``): kept or
    cut into (samples, rows), its outermost dim is the batch if it is a multiple of the batch size; merged with
    the dims right after it (``[b, T, d] -> [b*T, d]``), it holds their rows per sample (sample-major). Anything
    else loses it (None)."""
    bax = lab.batch_axis
    if bax is None or src[bax] != tracer.batch_size * lab.rows:
        return None, 1
    if bax not in where:  # one row of one sample: [1, T, d] -> [T, d] holds T rows of it
        return (0, dst[0]) if bax == 0 and dst and dst[0] > 1 and all(
            0 not in where[ax][1] for ax in lab.axes if ax in where) else (None, 1)
    a, b = where[bax]
    if a == [bax]:
        if dst[b[0]] % tracer.batch_size:
            return None, 1
        return b[0], dst[b[0]] // tracer.batch_size
    if a[0] == bax and len(b) == 1 and all(src[k] == 1 for k in range(a[0], a[-1] + 1) if k not in a):
        return b[0], lab.rows * math.prod(src[k] for k in a[1:])
    return None, 1


@register_glue(*RESHAPE)
def reshape(tracer, call: GlueCall) -> Label | None:
    """Reshapes that keep the neuron axis whole, split it into (heads, dims), merge (heads, dims) back, or
    flatten trailing spatial dims into it (channel-major: ``group``)."""
    t, lab = tracer.single(call)
    if t is None:
        return tracer.unknown(call)
    src, dst = tuple(t.shape), tuple(call.outputs[0].shape)
    groups = _reshape_groups(src, dst)
    if groups is None:
        return tracer.unknown(call)
    where = {d: (a, b) for a, b in groups for d in a}

    bax, rows = _batch_after_reshape(tracer, lab, src, dst, where)
    if lab.space is None:
        return Label(None, (), bax, rows=rows)
    if len(lab.axes) == 1:
        ax = lab.axes[0]
        if src[ax] == 1:
            return replace(lab, axes=(), batch_axis=bax, rows=rows, origin=None, group=())
        a, b = where[ax]
        bsizes = tuple(dst[d] for d in b)
        if lab.group:
            if a == [ax] and bsizes == (src[ax] // math.prod(lab.group),) + lab.group and _consecutive(b):
                return replace(lab, axes=(b[0],), batch_axis=bax, rows=rows, group=())
            if a == [ax] and len(b) == 1:
                return replace(lab, axes=(b[0],), batch_axis=bax, rows=rows)
            return tracer.unknown(call)
        if a == [ax] and len(b) == 1:
            return replace(lab, axes=(b[0],), batch_axis=bax, rows=rows)
        if a == [ax] and len(b) == 2 and _consecutive(b):
            return replace(lab, axes=(b[0], b[1]), batch_axis=bax, rows=rows, origin=None)
        if a[0] == ax and len(b) == 1 and _consecutive(a):
            return replace(lab, axes=(b[0],), batch_axis=bax, rows=rows, group=tuple(src[d] for d in a[1:]))
        return tracer.unknown(call)
    if len(lab.axes) == 2:
        h, d = lab.axes
        ah, bh = where[h]
        ad, bd = where[d]
        if ah == [h, d] and len(bh) == 1:
            return replace(lab, axes=(bh[0],), batch_axis=bax, rows=rows)
        if ah == [h] and ad == [d] and len(bh) == 1 and len(bd) == 1:
            return replace(lab, axes=(bh[0], bd[0]), batch_axis=bax, rows=rows)
    return tracer.unknown(call)


@register_glue(*EXPAND)
def expand(tracer, call: GlueCall) -> Label | None:
    """Broadcasting to new leading dims or along size-1 dims keeps the neurons."""
    t, lab = tracer.single(call)
    out = call.outputs[0]
    if t is None:
        return tracer.unknown(call)
    shift = out.ndim - t.ndim
    if lab.space is not None and any(out.shape[a + shift] != t.shape[a] for a in lab.axes):
        return tracer.unknown(call)
    bax = None if lab.batch_axis is None else lab.batch_axis + shift
    if shift and lab.space is not None and bax is not None and bax != 0:
        tracer.check_same_batch([0, bax], call.name)
    return replace(lab, axes=tuple(a + shift for a in lab.axes), batch_axis=bax)


@register_glue("__getitem__")
def getitem(tracer, call: GlueCall) -> Label | None:
    """Basic indexing (ints, slices, None, ...) that keeps every neuron axis whole."""
    t, lab = tracer.single(call)
    args = call.args
    if t is None or t is not args[0]:
        return tracer.unknown(call)
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        return tracer.unknown(call)
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
    if bax is not None and not full[bax]:
        raise SampleMixingError(
            f"indexing picks samples of a per-sample tensor of shape {tuple(t.shape)} (index {args[1]!r} on its "
            f"batch axis {bax}): what one sample computes would then depend on other samples (h + h[0]), so "
            "per-sample gradients are not defined. Index the other axes only (h[:, 0] for the first token).")
    if bax is not None:
        bax = src_to_out[bax]
    if lab.space is None:
        return Label(None, (), bax)
    if (len(lab.axes) == 2 and full[lab.axes[0]] and not full[lab.axes[1]]
            and src_to_out[lab.axes[1]] is not None):  # a slice of every head's dims (rotate_half in rotary)
        h, d = lab.axes
        heads, table = t.shape[h], tracer.spaces
        piece = tracer.fresh_space(f"{table.name[table.find(lab.space)]}:slice", heads * call.outputs[0].shape[
            src_to_out[d]], None)
        table.heads_alike((lab.space, piece), heads, "__getitem__", "sliced within each head by '__getitem__'")
        return Label(piece, (src_to_out[h], src_to_out[d]), bax)
    if not all(full[a] for a in lab.axes) or (lab.group and any(
            not full[d] for d in range(lab.axes[0] + 1, t.ndim))):
        return tracer.unknown(call)
    return replace(lab, axes=tuple(src_to_out[a] for a in lab.axes), batch_axis=bax)


@register_glue(*SPLIT)
def split(tracer, call: GlueCall) -> list[Label | None] | Label | None:
    """One label per piece. Cut along a non-neuron axis, every piece keeps the neurons. Cut along a flat
    neuron axis (``q, k, v = qkv(x).split(d, -1)``), each piece gets a space of its own and the cut space
    becomes their concatenation (it permutes block by block; see ``SpaceTable.resolve_parts``). Cut along a
    head-split axis, a permutation would move neurons from piece to piece: the space is fixed and each piece
    gets a fresh fixed space (``unbind`` along a flat neuron axis: pieces carry no neurons). Cutting the batch
    is unknown (the pieces are no longer per-sample tensors)."""
    t, lab = tracer.single(call)
    outs = call.outputs
    if t is None or t is not call.args[0]:
        return tracer.unknown(call)
    dim = call.arg(SPLIT[call.name], "dim", 0) % t.ndim
    drop = call.name == "unbind"
    if dim == lab.batch_axis or (lab.group and (drop or dim in lab.axes)):
        return [tracer.unknown(call)] * len(outs)

    def moved(a):  # where axis ``a`` of the input is in a piece
        return None if a is None else a - 1 if drop and a > dim else a

    bax = moved(lab.batch_axis)
    if lab.space is None:
        return [Label(None, (), bax)] * len(outs)
    if dim not in lab.axes:
        return [replace(lab, axes=tuple(moved(a) for a in lab.axes), batch_axis=bax)] * len(outs)
    name = tracer.spaces.name[tracer.spaces.find(lab.space)]
    if not drop and lab.axes == (dim,):  # a packed projection: each piece is a space, the cut one their blocks
        sizes, table = [o.shape[dim] for o in outs], tracer.spaces
        same = [ps for sp, ps in table.parts if table.find(sp) == table.find(lab.space)
                and [table.size[p] for p in ps] == sizes]
        if same:  # the same cut again (``h.chunk(3)`` twice): the same pieces
            return [Label(p, lab.axes, bax) for p in same[0]]
        pieces = [tracer.fresh_space(f"{name}:{call.name}.{i}", n, None) for i, n in enumerate(sizes)]
        table.set_parts(lab.space, tuple(pieces))
        return [Label(p, lab.axes, bax) for p in pieces]
    tracer.spaces.fix(lab.space, f"split along its neurons by op '{call.name}'")
    axes = tuple(moved(a) for a in lab.axes if not (drop and a == dim))
    if not axes:
        return [Label(None, (), bax)] * len(outs)
    return [Label(tracer.fresh_space(f"{name}:{call.name}.{i}", math.prod(o.shape[a] for a in axes),
                                     f"a piece of space '{name}' cut along its neurons by op '{call.name}'"),
                  axes, bax) for i, o in enumerate(outs)]
