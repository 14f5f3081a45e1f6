"""Statistics of the per-sample gradients computed from a graph's (a, g) without materializing them where the
op allows it: the per-sample gradient norms and the Gram matrix of inner products between samples (what
gradient clipping, data attribution and the Fisher trace need).

For an op whose per-sample weight gradient is ``sum_e g_e a_e^T`` over the sample's m set elements (linear and
transposed-linear kinds, see ``OpKind.gram_factors``)::

    <grad_i, grad_j> = sum_{e in i, f in j} <g_e, g_f> <a_e, a_f>

which costs ``(b m)^2 (n_in + n_out)`` instead of the ``b n_in n_out`` of the gradients themselves (the cheaper
of the two is used). Other kinds (convolutions, norms, embeddings) and parameters with several uses (whose
gradient is the sum over the uses, so the inner products are not additive) materialize that op's or that
parameter's per-sample gradient, one at a time, never the whole model's.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from .kinds import kind_of

__all__ = ["per_sample_gram", "per_sample_grad_norms"]


def _rank_one(A: Tensor, G: Tensor, diagonal: bool) -> Tensor:
    """Gram of the per-sample gradients sum_e g_e a_e^T: A [b, m, n_in], G [b, m, n_out] -> [b, b] (or its
    diagonal [b])."""
    b, m, n_in = A.shape
    n_out = G.shape[-1]
    if diagonal:
        if m == 1:
            return A[:, 0].pow(2).sum(-1) * G[:, 0].pow(2).sum(-1)
        return (torch.einsum("bei,bfi->bef", A, A) * torch.einsum("beo,bfo->bef", G, G)).sum((1, 2))
    if m == 1:
        return (A[:, 0] @ A[:, 0].T) * (G[:, 0] @ G[:, 0].T)
    if (b * m) ** 2 * (n_in + n_out) <= b * n_in * n_out * (m + b):
        A2, G2 = A.reshape(b * m, n_in), G.reshape(b * m, n_out)
        return ((A2 @ A2.T) * (G2 @ G2.T)).view(b, m, b, m).sum((1, 3))
    W = torch.einsum("beo,bei->boi", G, A).reshape(b, -1)
    return W @ W.T


def _statistic(graph, diagonal: bool) -> Tensor:
    graph._single("per_sample_gram" if not diagonal else "per_sample_grad_norms")
    spec = graph.spec
    b = spec.num_samples
    uses = Counter((u.name, u.rows) for op in spec.ops for u in (op.weight, op.bias)
                   if u is not None and spec.theta_range(u) is not None)
    out = graph.entry_x.new_zeros((b,) if diagonal else (b, b))
    shared: dict = {}  # (name, rows) used more than once -> the summed per-sample gradient [b, numel]

    def add(key, grad):
        if uses[key] > 1:
            shared[key] = grad if key not in shared else shared[key] + grad
        else:
            out.add_(grad.pow(2).sum(1) if diagonal else grad @ grad.T)

    for op in spec.ops:
        kind = kind_of(op)
        A, G = graph.layer_features(op.in_layer, "a"), graph.layer_features(op.out_layer, "g")
        if spec.theta_range(op.weight) is not None:
            key = (op.weight.name, op.weight.rows)
            factors = kind.gram_factors(op, A, G) if uses[key] == 1 else None
            if factors is not None:
                out.add_(_rank_one(*factors, diagonal))
            else:
                n_in, n_out = spec.layers[op.in_layer].size, spec.layers[op.out_layer].size
                add(key, kind.per_sample_grad(op, A, G, n_in, n_out).reshape(b, -1))
        if spec.theta_range(op.bias) is not None:
            add((op.bias.name, op.bias.rows), kind.bias_grad(op, G).reshape(b, -1))
    for grad in shared.values():
        out.add_(grad.pow(2).sum(1) if diagonal else grad @ grad.T)
    return out


def per_sample_gram(graph) -> Tensor:
    """``K[i, j] = <grad_i, grad_j>`` over every trainable parameter: [b, b]."""
    return _statistic(graph, diagonal=False)


def per_sample_grad_norms(graph) -> Tensor:
    """The norm of every sample's gradient over all trainable parameters: [b]."""
    return _statistic(graph, diagonal=True).clamp_min(0).sqrt()
