"""Glue handlers for ops that act per neuron or over whole neuron axes: elementwise ops, pooling,
reductions, softmax, normalizations, scaled_dot_product_attention, cat/stack, functional batch_norm."""
from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from ...errors import SampleMixingError
from ..tracer import GlueCall, Label, register_glue

UNARY = {
    "relu", "relu6", "gelu", "tanh", "sigmoid", "silu", "sin", "cos", "elu", "selu", "celu", "leaky_relu",
    "softplus", "softsign", "mish", "hardtanh", "hardswish", "hardsigmoid", "logsigmoid", "tanhshrink",
    "softshrink", "hardshrink", "threshold", "rrelu", "dropout", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "abs", "neg", "negative", "exp", "expm1", "log", "log1p", "sqrt",
    "rsqrt", "square", "reciprocal", "sign", "erf", "clamp", "clip", "clamp_min", "clamp_max", "sinh", "cosh",
    "atan", "asin", "acos", "asinh", "sinc", "clone", "contiguous", "float", "double", "half", "bfloat16",
    "to", "type", "type_as", "detach", "nan_to_num", "masked_fill",
}
BINARY = {
    "add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide", "pow", "float_power",
    "maximum", "minimum", "fmax", "fmin", "where", "lerp", "addcmul", "addcdiv", "atan2", "hypot",
}
POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "interpolate", "upsample", "pad",
}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "logsumexp", "nansum", "nanmean", "std", "var", "prod"}
SOFTMAX = {"softmax", "log_softmax", "softmin"}
CAT = {"cat", "concat", "concatenate", "stack"}


@register_glue(*UNARY, *BINARY)
def elementwise(tracer, call: GlueCall) -> Label | None:
    """Per-element ops with broadcasting: labels move with the broadcast; tensors of different hidden spaces
    combined elementwise tie them (a residual addition); a per-neuron constant fixes the space."""
    out = call.outputs[0]
    nd = out.ndim
    labs, consts = [], []
    for t in call.inputs:
        lab = tracer.get_label(t)
        if lab is None:
            consts.append(t)
            continue
        shift = nd - t.ndim
        if shift < 0:
            return tracer.unknown(call, [(t, lab)])
        axes = tuple(a + shift for a in lab.axes)
        if any(t.shape[a] != out.shape[a + shift] for a in lab.axes):
            return tracer.unknown(call, [(t, lab)])
        bax = None if lab.batch_axis is None else lab.batch_axis + shift
        labs.append(replace(lab, axes=axes, batch_axis=bax))
    name = call.name
    bax = tracer.check_same_batch([lab.batch_axis for lab in labs], name)
    rows = {lab.rows for lab in labs if lab.batch_axis is not None}
    if len(rows) > 1:
        raise SampleMixingError(
            f"op '{name}' combines tensors whose batch axes hold {' and '.join(map(str, sorted(rows)))} rows per "
            "sample (a [b*T, d] view of the activations broadcast against a tensor of another layout), so rows of "
            "one sample would meet rows of another. Reshape both to the same per-sample layout first.")
    rows = rows.pop() if rows else 1
    hidden = [lab for lab in labs if lab.space is not None]
    if not hidden:
        return Label(None, (), bax, rows=rows)
    ref = hidden[0]
    # a constant that differs across neurons (a buffer of size n along the neuron axis) breaks symmetry; one that
    # differs only along the dims of a head-split space, the same for every head (rotary cos/sin), keeps the
    # permutations of whole heads
    for c in consts:
        shift = nd - c.ndim
        varies = [a - shift >= 0 and c.shape[a - shift] != 1 for a in ref.axes]
        if len(ref.axes) == 2 and varies == [False, True]:
            tracer.spaces.fix_within_heads(ref.space, f"multiplied/added by a constant that differs across the "
                                                      f"dims of each head in op '{name}'")
        elif any(varies):
            tracer.spaces.fix(ref.space, f"multiplied/added by a per-neuron constant in op '{name}'")
    if len(labs) == 1:
        return replace(ref, batch_axis=bax)
    if len(hidden) != len(labs):  # mixes a hidden space with input data
        for lab in hidden:
            tracer.spaces.fix(lab.space, f"combined with model input data by op '{name}'")
        return Label(ref.space, ref.axes, bax, None, ref.group, rows)
    for lab in hidden[1:]:
        if lab.axes != ref.axes or lab.group != ref.group:
            for lb in hidden:
                tracer.spaces.fix(lb.space, f"combined with a differently laid out tensor by op '{name}'")
            return None
        tracer.spaces.tie(ref.space, lab.space, f"op '{name}'")
    return Label(ref.space, ref.axes, bax, None, ref.group, rows)


@register_glue(*POOL)
def pool(tracer, call: GlueCall) -> Label | None:
    """Pooling, interpolation and padding over the trailing spatial dims act per channel."""
    t, lab = tracer.single(call)
    name, args, out = call.name, call.args, call.outputs[0]
    if t is None or t is not args[0]:
        return tracer.unknown(call)
    if name == "pad":
        pad = args[1] if len(args) > 1 else None
        k = len(pad) // 2 if pad is not None else 0
    else:
        k = int(name[-2]) if name[-2:] in {"1d", "2d", "3d"} else (
            int(name.split("_with")[0][-2]) if "_with_indices" in name else t.ndim - 2)
    spatial = set(range(t.ndim - k, t.ndim))
    if (set(lab.axes) & spatial) or (lab.batch_axis in spatial) or lab.group or out.ndim != t.ndim:
        return tracer.unknown(call)
    return lab


@register_glue(*REDUCE)
def reduce(tracer, call: GlueCall) -> Label | None:
    """Reductions over non-neuron axes keep the label; over neurons they are invariant (no neurons left);
    over the batch they mix samples (an error)."""
    args, kwargs = call.args, call.kwargs
    if call.name in {"max", "min"} and len(args) > 1 and isinstance(args[1], Tensor):
        return elementwise(tracer, call)  # torch.max(a, b): elementwise
    t, lab = tracer.single(call)
    if t is None or t is not args[0]:
        return tracer.unknown(call)
    dims = tracer.dims(call, 1, t.ndim)
    if dims is None:
        dims = tuple(range(t.ndim))
    if lab.batch_axis is not None and lab.batch_axis in dims:
        raise SampleMixingError(
            f"op '{call.name}' reduces over the batch axis (dim {lab.batch_axis}) of a tensor of shape "
            f"{tuple(t.shape)}, so every sample's output depends on the whole batch and per-sample gradients "
            "are not defined. Reduce over the other axes only.")
    if lab.space is not None and set(lab.axes) & set(dims):
        return None  # a sum over neurons is invariant: the result carries no neurons
    keep = len(args) > 2 and args[2] is True or kwargs.get("keepdim", False)
    if keep:
        return lab

    def shifted(a):
        return a - sum(1 for d in dims if d < a)

    if lab.group and any(d > lab.axes[0] for d in dims):
        return tracer.unknown(call)
    return replace(lab, axes=tuple(shifted(a) for a in lab.axes),
                   batch_axis=None if lab.batch_axis is None else shifted(lab.batch_axis))


@register_glue(*SOFTMAX)
def softmax(tracer, call: GlueCall) -> Label | None:
    """Softmax over neurons is permutation-equivariant; over other axes it acts per neuron."""
    t, lab = tracer.single(call)
    if t is None or t is not call.args[0]:
        return tracer.unknown(call)
    dims = tracer.dims(call, 1, t.ndim)
    if dims is None:
        return tracer.unknown(call)
    if lab.batch_axis is not None and lab.batch_axis in dims:
        raise SampleMixingError(f"op '{call.name}' normalizes over the batch axis (dim {lab.batch_axis}), so every "
                                "sample's output depends on the whole batch. Normalize over the other axes.")
    return replace(lab, origin=None)


@register_glue("layer_norm", "normalize", "rms_norm")
def normalization(tracer, call: GlueCall) -> Label | None:
    """Functional normalizations over trailing axes: equivariant without weights; per-neuron weights fix
    the space (a module's affine part is a ``diag`` op instead)."""
    t, lab = tracer.single(call)
    name, args = call.name, call.args
    if t is None or t is not args[0]:
        return tracer.unknown(call)
    if name == "normalize":
        dims = tracer.dims(call, 2, t.ndim) or (1 % t.ndim,)
    else:
        shape = call.arg(1, "normalized_shape")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dims = tuple(range(t.ndim - len(shape), t.ndim))
        weight, bias = call.arg(2, "weight"), call.arg(3, "bias")
        if (weight is not None or bias is not None) and lab.space is not None:
            tracer.spaces.fix(lab.space, f"scaled by per-neuron weights in a functional '{name}'")
    if lab.batch_axis is not None and lab.batch_axis in dims:
        raise SampleMixingError(f"op '{name}' normalizes over the batch axis, so every sample's output depends "
                                "on the whole batch. Normalize over the other axes.")
    return replace(lab, origin=None)


@register_glue("batch_norm")
def batch_norm(tracer, call: GlueCall) -> Label | None:
    """Functional batch_norm: batch statistics mix samples (an error); running statistics are per-neuron
    constants (the spaces are fixed)."""
    if call.arg(5, "training", False):
        raise SampleMixingError(
            "F.batch_norm in training mode normalizes with statistics of the whole batch, so every sample's "
            "output depends on the other samples and per-sample gradients are not defined. Put the module "
            "in eval mode (model.eval()) or use LayerNorm/GroupNorm.")
    return tracer.unknown(call)


@register_glue("scaled_dot_product_attention")
def attention(tracer, call: GlueCall) -> Label | None:
    """Attention over [b, heads, T, dh] (or [b, T, d]): queries and keys share a space, q/k and v spaces are
    split into the same heads; the output lives in v's space."""
    names = ("query", "key", "value")
    qkv = [call.arg(i, names[i]) for i in range(3)]
    labs = [tracer.get_label(x) for x in qkv]
    if call.kwargs.get("enable_gqa") or any(lab is None or lab.space is None or lab.group for lab in labs):
        return tracer.unknown(call)
    nd = qkv[0].ndim
    if nd == 4:  # [b, heads, T, dh]; with one head the size-1 head axis is not tracked
        want = ((1, 3),) if qkv[0].shape[1] > 1 else ((1, 3), (3,))
    elif nd == 3:  # [b, T, d]: one head
        want = ((2,),)
    else:
        return tracer.unknown(call)
    if any(lab.axes not in want or lab.batch_axis != 0 for lab in labs):
        return tracer.unknown(call)
    heads = qkv[0].shape[1] if nd == 4 else 1
    lq, lk, lv = labs
    why = "scaled_dot_product_attention"
    tracer.spaces.tie(lq.space, lk.space, why + " (queries and keys)")
    tracer.spaces.set_heads(lq.space, heads, why)
    tracer.spaces.set_heads(lv.space, heads, why)
    tracer.spaces.tie_heads(lq.space, lv.space)
    return Label(lv.space, lv.axes, 0, None, ())


@register_glue(*CAT)
def cat(tracer, call: GlueCall) -> Label | None:
    """Concatenating along a non-neuron axis, or stacking (along a new axis), ties the spaces of the pieces;
    concatenating along a flat neuron axis makes a space cut into the pieces (block by block, like split)."""
    name, out = call.name, call.outputs[0]
    seq = call.arg(0, "tensors")
    labs = [tracer.get_label(x) for x in seq]
    if any(lab is None for lab in labs) or len({(lab.axes, lab.batch_axis, lab.group) for lab in labs}) != 1:
        return tracer.unknown(call)
    ref = labs[0]
    dim = call.arg(1, "dim", 0)
    dim = dim % (out.ndim if name == "stack" else seq[0].ndim)
    spaces = [lab.space for lab in labs]
    if name != "stack" and dim in ref.axes and ref.axes == (dim,) and not ref.group and None not in spaces:
        # pieces joined along their neurons (the groups of a grouped conv): the whole permutes block by block
        whole = tracer.fresh_space(f"{tracer.spaces.name[tracer.spaces.find(spaces[0])]}:{name}", out.shape[dim], None)
        tracer.spaces.set_parts(whole, tuple(spaces))
        return Label(whole, ref.axes, ref.batch_axis)
    if name != "stack" and len(ref.axes) == 2 and dim == ref.axes[1] and None not in spaces:
        return _cat_within_heads(tracer, call, spaces, ref, seq, dim)
    if name != "stack" and (dim in ref.axes or dim == ref.batch_axis):  # stack inserts a new axis: cuts nothing
        return tracer.unknown(call)
    if any(s is None for s in spaces):
        return tracer.unknown(call) if any(s is not None for s in spaces) else Label(None, (), None)
    for s in spaces[1:]:
        tracer.spaces.tie(spaces[0], s, f"op '{name}'")
    if name == "stack":
        def sh(a):
            return a + (1 if a >= dim else 0)
        return Label(ref.space, tuple(sh(a) for a in ref.axes),
                     None if ref.batch_axis is None else sh(ref.batch_axis), None, ref.group)
    return Label(ref.space, ref.axes, ref.batch_axis, None, ref.group)


def _cat_within_heads(tracer, call: GlueCall, spaces: list[int], ref: Label, seq, dim: int) -> Label:
    """Head-split pieces joined along their head dims (``cat((-x2, x1), -1)`` in rotary embeddings): every head
    is rebuilt from the same pieces of itself, so whole heads still permute (with the pieces' heads) while the
    order within a head is fixed."""
    heads, out = seq[0].shape[ref.axes[0]], call.outputs[0]
    table = tracer.spaces
    whole = tracer.fresh_space(f"{table.name[table.find(spaces[0])]}:{call.name}", heads * out.shape[dim], None)
    table.heads_alike((whole, *spaces), heads, call.name, f"rebuilt within each head by op '{call.name}'")
    return Label(whole, ref.axes, ref.batch_axis)
