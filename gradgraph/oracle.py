"""The reference gradients: torch.func (``vmap`` of ``grad``) and plain autograd, computed without gradgraph.

Tests compare gradient graphs against these, benchmarks time them as the standard per-sample-gradient engine,
and anything that needs ground truth imports them from here (one implementation, not one per caller). The
per-sample quantity follows :func:`gradgraph.capture`: ``loss_fn(output, targets)`` summed over the sample
(``loss_fn`` returns one value per sample), or the sum of the sample's outputs when ``loss_fn`` is None.

Inputs are given as for ``capture``: a tensor, a tuple of positional arguments or a dict of keyword
arguments. Tensors whose first dimension is the batch size ``b`` (the first tensor's) are split into samples;
other tensors and non-tensor arguments are passed unchanged to every sample (broadcast constants). Only
trainable parameters (``requires_grad``) are differentiated; frozen ones and buffers are held fixed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["per_sample_grads", "grads", "fisher_diagonal", "make_per_sample_grads"]


def _call_args(inputs) -> tuple[tuple, dict]:
    # the input convention of gradgraph.capture, restated here: the reference shares no code with what it checks
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _sample_quantity(output, targets, loss_fn: Callable | None) -> Tensor:
    """The scalar whose gradient is one sample's gradient (the sample is a batch of one here)."""
    if loss_fn is None:
        return output.sum()
    return loss_fn(output, targets).sum()


def _split_params(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))
    return trainable, fixed


def make_per_sample_grads(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None,
                          randomness: str = "error") -> Callable[[], dict[str, Tensor]]:
    """A function of no arguments computing :func:`per_sample_grads` on these inputs (the vmapped function is
    built once; benchmarks time its calls)."""
    args, kwargs = _call_args(inputs)
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.ndim]
    if not leaves:
        raise ValueError("the oracle needs at least one input tensor with a batch axis (batch first)")
    b = leaves[0].shape[0]

    def dim(t):
        return 0 if isinstance(t, Tensor) and t.ndim and t.shape[0] == b else None

    in_dims = (None, tree_map(dim, args), tree_map(dim, kwargs), None if targets is None else tree_map(dim, targets))
    params, fixed = _split_params(model)

    def one(p, args1, kwargs1, y1):
        # vmap hands every batched tensor without its batch axis: give the model a batch of one
        def lift(t, d):
            return t.unsqueeze(0) if d == 0 else t
        a = tree_map(lift, args1, in_dims[1])
        k = tree_map(lift, kwargs1, in_dims[2])
        y = None if y1 is None else tree_map(lift, y1, in_dims[3])
        return _sample_quantity(functional_call(model, (p, fixed), a, k), y, loss_fn)

    per_sample = vmap(grad(one), in_dims=in_dims, randomness=randomness)
    return lambda: per_sample(params, args, kwargs, targets)


def per_sample_grads(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None,
                     randomness: str = "error") -> dict[str, Tensor]:
    """Per-sample gradients of every trainable parameter: ``{name: [b, *param.shape]}`` (torch.func ``vmap``
    of ``grad`` over the samples; ``randomness`` as for ``vmap``, e.g. ``"different"`` for dropout)."""
    return make_per_sample_grads(model, inputs, targets, loss_fn, randomness)()


def grads(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None) -> dict[str, Tensor]:
    """Gradient of the summed per-sample quantity by plain autograd, on copies of the parameters (the model's
    ``.grad`` is untouched): ``{name: [*param.shape]}``."""
    args, kwargs = _call_args(inputs)
    params, fixed = _split_params(model)
    params = {n: p.clone().requires_grad_() for n, p in params.items()}
    with torch.enable_grad():
        out = functional_call(model, (params, fixed), args, kwargs)
        total = out.sum() if loss_fn is None else loss_fn(out, targets).sum()
        gs = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)}


def fisher_diagonal(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None) -> dict[str, Tensor]:
    """Diagonal of the empirical Fisher, the mean over samples of the squared per-sample gradients:
    ``{name: [*param.shape]}``. With ``loss_fn=None`` (gradients of the model output) this is the
    regression Fisher ``E_x[grad f(x) grad f(x)^T]`` estimated on the batch."""
    return {n: g.pow(2).mean(0) for n, g in per_sample_grads(model, inputs, targets, loss_fn).items()}
