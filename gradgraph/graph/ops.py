"""What each op kind means for the graph: how its weights are laid out as edges, how a per-sample weight
gradient is rebuilt from the ``a`` of its input nodes and the ``g`` of its output nodes, and how a neuron
permutation acts on its weights. One class per kind, looked up by ``OpSpec.kind``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import OpSpec


def conv_geometry(op: OpSpec):
    """(kernel, stride, per-side padding, dilation) of a conv op, or of a linear op on a flattened map
    (a conv whose kernel is the whole map)."""
    if op.kind == "conv":
        return op.kernel, op.stride, op.padding, op.dilation
    d = len(op.kernel)
    return op.kernel, (1,) * d, ((0, 0),) * d, (1,) * d


def conv_patches(maps: Tensor, op: OpSpec) -> Tensor:
    """Unfold input maps [B, C, *spatial] into the patches each output position sees: [B, C * K, L]
    (K kernel entries, L output positions). 1-d maps are treated as 2-d maps of height 1."""
    kernel, stride, padding, dilation = conv_geometry(op)
    if maps.ndim == 3:
        maps = maps.unsqueeze(2)
        kernel, stride, dilation = (1,) + tuple(kernel), (1,) + tuple(stride), (1,) + tuple(dilation)
        padding = ((0, 0),) + tuple(padding)
    pads = [p for lo_hi in reversed(padding) for p in lo_hi]
    if any(pads):
        maps = F.pad(maps, pads)
    return F.unfold(maps, kernel, dilation=dilation, stride=stride)


def _conv_grad(A: Tensor, G: Tensor, op: OpSpec) -> Tensor:
    """Per-sample conv weight gradient. A: [b, *in_spatial, C], G: [b, *out_spatial, C_out] -> [b, C_out, C * K]."""
    b, c_out = A.shape[0], G.shape[-1]
    patches = conv_patches(A.movedim(-1, 1), op)  # [b, C*K, L]
    return torch.einsum("blo,bkl->bok", G.reshape(b, -1, c_out), patches)


def kernel_coords(op: OpSpec) -> Tensor:
    """Position of each of an edge's K weights inside its kernel (or flattened map), scaled to [-1, 1]:
    [K, 2] (1-d kernels use the second column; plain weights are at 0)."""
    kernel = tuple(op.kernel) or (1,)
    axes = [torch.linspace(-1, 1, k) if k > 1 else torch.zeros(1) for k in kernel]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(kernel))
    return grid if grid.shape[1] == 2 else torch.cat([torch.zeros(grid.shape[0], 1), grid], 1)


class LinearKind:
    """``y = W x + b`` with W [n_out, n_in * K]; K > 1 when the input is a flattened conv map whose channels
    are the in-nodes (each edge then carries the K weights of one channel's map)."""

    @staticmethod
    def edges(op: OpSpec, n_in: int, n_out: int, theta_start: int) -> tuple[Tensor, Tensor, Tensor]:
        """Local (src, dst) node indices of the op's edges and the theta index of each weight, [E, K]."""
        K = op.entries_per_edge
        dst = torch.arange(n_out).repeat_interleave(n_in)
        src = torch.arange(n_in).repeat(n_out)
        theta = theta_start + (dst * n_in + src)[:, None] * K + torch.arange(K)
        return src, dst, theta

    @staticmethod
    def theta_index(op: OpSpec, n_in: int, n_out: int, theta_start: int) -> Tensor:
        """Theta position of every weight in the canonical layout [n_out, n_in, K]."""
        K = op.entries_per_edge
        return theta_start + (torch.arange(n_out)[:, None, None] * n_in + torch.arange(n_in)[None, :, None]) * K \
            + torch.arange(K)

    @staticmethod
    def per_sample_grad(op: OpSpec, A: Tensor, G: Tensor) -> Tensor:
        if op.kernel:  # linear on a flattened map: a conv whose kernel is the whole map
            return _conv_grad(A, G, op)
        b = A.shape[0]
        return torch.einsum("bso,bsi->boi", G.reshape(b, -1, G.shape[-1]), A.reshape(b, -1, A.shape[-1]))

    @staticmethod
    def permute_weight(op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        K = op.entries_per_edge
        W = W.index_select(dim, p_out)
        if op.kind == "linear" and K > 1:
            p_in = (p_in[:, None] * K + torch.arange(K)).reshape(-1)
        return W.index_select(dim + 1, p_in)


class ConvKind(LinearKind):
    """N-d convolution, W [n_out, n_in, *kernel]; channels are nodes, an edge carries its kernel."""

    @staticmethod
    def per_sample_grad(op: OpSpec, A: Tensor, G: Tensor) -> Tensor:
        return _conv_grad(A, G, op)


class DiagKind:
    """Elementwise affine ``y_i = w_i x_hat_i + b_i`` (LayerNorm, eval BatchNorm): edge i -> i."""

    @staticmethod
    def edges(op: OpSpec, n_in: int, n_out: int, theta_start: int):
        idx = torch.arange(n_out)
        return idx, idx, theta_start + idx[:, None]

    @staticmethod
    def theta_index(op: OpSpec, n_in: int, n_out: int, theta_start: int) -> Tensor:
        """Theta position of every weight in the canonical layout [n_out, 1, 1] (edge j -> j)."""
        return theta_start + torch.arange(n_out)[:, None, None]

    @staticmethod
    def per_sample_grad(op: OpSpec, A: Tensor, G: Tensor) -> Tensor:
        b = A.shape[0]
        return (A * G).reshape(b, -1, A.shape[-1]).sum(1)

    @staticmethod
    def permute_weight(op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        return W.index_select(dim, p_out)


class EmbeddingKind:
    """Lookup ``y = W[id]`` with W [n_in = vocabulary, n_out]: the in-nodes are vocabulary entries."""

    @staticmethod
    def theta_index(op: OpSpec, n_in: int, n_out: int, theta_start: int) -> Tensor:
        """Theta position of every weight in the canonical layout [n_out, n_in, 1] (W is [n_in, n_out])."""
        return theta_start + torch.arange(n_in)[None, :, None] * n_out + torch.arange(n_out)[:, None, None]

    @staticmethod
    def edges(op: OpSpec, n_in: int, n_out: int, theta_start: int):
        src = torch.arange(n_in).repeat_interleave(n_out)
        dst = torch.arange(n_out).repeat(n_in)
        return src, dst, theta_start + (src * n_out + dst)[:, None]

    @staticmethod
    def per_sample_grad(op: OpSpec, ids: Tensor, G: Tensor, vocab: int) -> Tensor:
        b, d = G.shape[0], G.shape[-1]
        flat = (ids.reshape(b, -1) + vocab * torch.arange(b, device=ids.device)[:, None]).reshape(-1)
        grad = torch.zeros(b * vocab, d, dtype=G.dtype, device=G.device)
        grad.index_add_(0, flat, G.reshape(-1, d))
        grad = grad.view(b, vocab, d)
        if op.padding_idx is not None:
            grad[:, op.padding_idx] = 0
        return grad

    @staticmethod
    def permute_weight(op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        return W.index_select(dim + 1, p_out)


KINDS = {"linear": LinearKind, "conv": ConvKind, "diag": DiagKind, "embedding": EmbeddingKind}
KIND_CODES = {name: i for i, name in enumerate(KINDS)}


def bias_grad(G: Tensor) -> Tensor:
    """Per-sample bias gradient: the sample's output gradients summed over its elements. [b, n_out]."""
    return G.reshape(G.shape[0], -1, G.shape[-1]).sum(1)

