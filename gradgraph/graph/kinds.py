"""The op-kind protocol: everything an op kind means, in one class per kind.

``OpSpec.kind`` is a registered name (capture emits names and never imports this module); :func:`kind_of`
turns it into the kind object, which says

* its edges and theta layout: :meth:`OpKind.num_edges`, :meth:`OpKind.edges`, :meth:`OpKind.theta_index`,
  :meth:`OpKind.kernel_coords`;
* how its per-sample weight gradient is rebuilt from the ``a`` of the in-layer and the ``g`` of the out-layer:
  :meth:`OpKind.per_sample_grad` (and :meth:`OpKind.bias_grad`);
* how a neuron permutation acts on its weight: :meth:`OpKind.permute_weight`;
* what the parameter heads need to decode it, in the *canonical layout* ``[n_out, n_in', K]`` that
  :meth:`OpKind.theta_index` maps to theta: :meth:`OpKind.aligned_blocks`, :meth:`OpKind.moments`,
  :meth:`OpKind.pairwise` and :meth:`OpKind.align_source`.

Kinds are registered with :func:`register_kind`; each gets a stable integer code (its registration order:
linear 0, conv 1, diag 2, embedding 3, transposed_linear 4, later kinds appended) used by ``op_kind`` tensors
and the metanetworks' learned kind embeddings. See docs/kinds.md for the recipe of a new kind.

The heads' methods take a ``group`` (``gradgraph.nn.layout.StructureGroup``: ``spec``, ``size`` and
``block``/``tokens`` accessors of dense entry blocks); it is duck-typed so that graph/ never imports nn/.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnknownNameError

if TYPE_CHECKING:  # spec.py imports this module (GraphSpec.num_edges): type hints only
    from .spec import OpSpec

__all__ = ["OpKind", "LinearKind", "ConvKind", "DiagKind", "EmbeddingKind", "TransposedLinearKind", "KINDS",
           "register_kind", "kind_of", "num_kinds", "conv_patches"]

KINDS: dict[str, "OpKind"] = {}  # name -> kind object, in code order


def register_kind(cls: type) -> type:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` with the next free code."""
    if not cls.name or cls.name in KINDS:
        raise ValueError(f"an op kind needs a new, non-empty name; {cls.name!r} is taken or empty "
                         f"(registered: {', '.join(KINDS)})")
    kind = cls()
    kind.code = len(KINDS)
    KINDS[cls.name] = kind
    return cls


def kind_of(op: "OpSpec") -> "OpKind":
    """The kind object of an op (``KINDS[op.kind]`` with a clear error for unknown names)."""
    kind = KINDS.get(op.kind)
    if kind is None:
        raise UnknownNameError(f"op '{op.name}' has kind '{op.kind}', which is not a registered op kind "
                               f"({', '.join(KINDS)}); register it with gradgraph.graph.kinds.register_kind")
    return kind


def num_kinds() -> int:
    """Number of registered kinds (the size of the learned kind embeddings)."""
    return len(KINDS)


def conv_patches(maps: Tensor, geometry) -> Tensor:
    """Unfold input maps [B, C, *spatial] into the patches each output position sees: [B, C * K, L]
    (K kernel entries, L output positions), for ``geometry = (kernel, stride, per-side padding, dilation)``.
    1-d maps are treated as 2-d maps of height 1."""
    kernel, stride, padding, dilation = geometry
    if maps.ndim == 3:
        maps = maps.unsqueeze(2)
        kernel, stride, dilation = (1,) + tuple(kernel), (1,) + tuple(stride), (1,) + tuple(dilation)
        padding = ((0, 0),) + tuple(padding)
    pads = [p for lo_hi in reversed(padding) for p in lo_hi]
    if any(pads):
        maps = F.pad(maps, pads)
    return F.unfold(maps, kernel, dilation=dilation, stride=stride)


def _conv_grad(A: Tensor, G: Tensor, geometry) -> Tensor:
    """Per-sample conv weight gradient. A: [b, *in_spatial, C], G: [b, *out_spatial, C_out] -> [b, C_out, C * K]."""
    b, c_out = A.shape[0], G.shape[-1]
    patches = conv_patches(A.movedim(-1, 1), geometry)  # [b, C*K, L]
    return torch.einsum("blo,bkl->bok", G.reshape(b, -1, c_out), patches)


def _scatter_tokens(values: Tensor, tokens: Tensor, V: int) -> Tensor:
    """Sum ``values`` [G, Q, *rest] per (graph, token id) (``tokens`` [G, Q] in 0..V-1): [G, V, *rest]."""
    G = values.shape[0]
    flat = (tokens + V * torch.arange(G, device=tokens.device)[:, None]).reshape(-1)
    rest = values.shape[2:]
    return values.new_zeros(G * V, *rest).index_add_(0, flat, values.reshape(-1, *rest)).view(G, V, *rest)


class OpKind:
    """The protocol (and the defaults: a dense ``y = W x + b``, W ``[n_out, n_in]``, one weight per edge).

    Shapes: ``n_in``/``n_out`` nodes of the op's in- and out-layer, ``K = op.entries_per_edge`` weights per
    edge, ``b`` samples, ``G`` graphs of a structure group, ``Q`` aligned positions (b x positions per sample).
    The canonical layout of the op's weights is ``[n_out, n_in', K]`` with ``n_in' = n_in`` (``1`` for kinds
    whose in-node is the out-node, like ``diag``)."""

    name: str = ""
    code: int = -1  # set by register_kind

    def __repr__(self) -> str:
        return f"<op kind {self.name!r} ({self.code})>"

    # -- structure ---------------------------------------------------------------------------------------
    def num_edges(self, op: OpSpec, n_in: int, n_out: int) -> int:
        """Number of (in-node, out-node) edges of the op."""
        return n_in * n_out

    def edges(self, op: OpSpec, n_in: int, n_out: int, theta_start: int) -> tuple[Tensor, Tensor, Tensor]:
        """Local (src, dst) node indices of the op's edges, [E] each, and the theta index of each of an
        edge's K weights, [E, K] (``theta_start``: the weight's first theta row)."""
        K = op.entries_per_edge
        dst = torch.arange(n_out).repeat_interleave(n_in)
        src = torch.arange(n_in).repeat(n_out)
        theta = theta_start + (dst * n_in + src)[:, None] * K + torch.arange(K)
        return src, dst, theta

    def theta_index(self, op: OpSpec, n_in: int, n_out: int, theta_start: int) -> Tensor:
        """Theta position of every weight in the canonical layout: [n_out, n_in', K]."""
        K = op.entries_per_edge
        return theta_start + (torch.arange(n_out)[:, None, None] * n_in + torch.arange(n_in)[None, :, None]) * K \
            + torch.arange(K)

    def kernel_coords(self, op: OpSpec) -> Tensor:
        """Position of each of an edge's K weights inside its kernel (or flattened map), scaled to [-1, 1]:
        [K, 2] (1-d kernels use the second column; plain weights are at 0)."""
        kernel = tuple(op.kernel) or (1,)
        axes = [torch.linspace(-1, 1, k) if k > 1 else torch.zeros(1) for k in kernel]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(kernel))
        return grid if grid.shape[1] == 2 else torch.cat([torch.zeros(grid.shape[0], 1), grid], 1)

    # -- gradients ---------------------------------------------------------------------------------------
    def per_sample_grad(self, op: OpSpec, A: Tensor, G: Tensor, n_in: int, n_out: int) -> Tensor:
        """Per-sample weight gradient from the in-layer's ``A`` [b, *spatial_in, n_in] (token ids
        [b, *spatial] for a vocabulary) and the out-layer's ``G`` [b, *spatial_out, n_out]: [b, ...] with the
        weight's numel per sample (the caller reshapes it to the weight's shape)."""
        b = A.shape[0]
        return torch.einsum("bso,bsi->boi", G.reshape(b, -1, G.shape[-1]), A.reshape(b, -1, A.shape[-1]))

    def gram_factors(self, op: OpSpec, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(A [b, m, n_in], G [b, m, n_out])`` when the per-sample gradient is ``sum_e g_e a_e^T`` over m
        elements (then inner products of per-sample gradients need no weight-sized tensor:
        <grad_i, grad_j> = sum_{e, f} <g_ie, g_jf> <a_ie, a_jf>), None when it is not of that form (the
        statistics then materialize this op's per-sample gradient)."""
        return None

    def bias_grad(self, op: OpSpec, G: Tensor) -> Tensor:
        """Per-sample bias gradient: the sample's output gradients summed over its elements. [b, n_out]."""
        return G.reshape(G.shape[0], -1, G.shape[-1]).sum(1)

    def permute_weight(self, op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        """The weight (its first axis at ``dim``) after permuting in-neurons by ``p_in`` and out-neurons by
        ``p_out`` (gather convention: new neuron j is old neuron p[j])."""
        return W.index_select(dim, p_out).index_select(dim + 1, p_in)

    def weight_layout(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``permute_weight`` expects for a weight stored as ``shape`` (same entries and order): a bare
        parameter's (position tokens ``[1, T, d]`` as an embedding table ``[T, d]``)."""
        return shape

    # -- what the heads need -----------------------------------------------------------------------------
    def aligned_blocks(self, group, op: OpSpec, h_out: Tensor, h_in: Tensor):
        """Entry features of the op's out-neurons and in-neurons, aligned the way its weight gradient pairs
        them (one product per aligned position q and kernel offset k), and b:

        * ``X_out`` [G, Q, n_out, f_out]: the out-layer's g-entries;
        * ``X_in`` [G, Q, n_in, K, f_in]: the in-layer's a-entries each output position sees (kind-specific:
          an embedding returns ``(X_tok [G, Q, f_in], tokens [G, Q])``).

        With ``h_out = g`` and ``h_in = a`` the sum over q of ``X_out X_in`` is the batch weight gradient;
        sums over q divided by b are per-sample means."""
        X_out, A, b = self._blocks(group, op, h_out, h_in)
        return X_out, A.reshape(group.size, -1, A.shape[-2], 1, A.shape[-1]), b

    def _blocks(self, group, op: OpSpec, h_out: Tensor, h_in: Tensor):
        """X_out [G, Q, n_out, f_out], the raw a-block [G, b, *sp_in, n_in, f_in] and b."""
        spec = group.spec
        lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
        X_out = group.block(h_out, lout, "g")
        b = X_out.shape[1]
        return X_out.reshape(group.size, -1, lout.size, h_out.shape[-1]), group.block(h_in, lin, "a"), b

    def moments(self, group, op: OpSpec, phi: Tensor, psi: Tensor) -> tuple[Tensor, Tensor]:
        """The two second-moment terms of the op from per-entry features phi (out side) and psi (in side),
        [E, C] each, both in the canonical layout [G, n_out, n_in', K, C]:

        * paired: (1/b) sum_q phi_q(j) psi_q(i), the weight gradient with (phi, psi) in place of (g, a);
        * factorized: ((1/b) sum_q phi_q(j)) ((1/b) sum_q psi_q(i)), the product of the two neurons' moments
          (K-FAC-like: lower variance when the two sides are weakly correlated)."""
        X_out, X_in, b = self.aligned_blocks(group, op, phi, psi)
        out_mean = X_out.sum(1) / b  # [G, n_out, C]
        paired = torch.einsum("gqoc,gqikc->goikc", X_out, X_in) / b
        return paired, out_mean[:, :, None, None, :] * (X_in.sum(1) / b)[:, None]

    def pairwise(self, group, op: OpSpec, x_out: Tensor, x_in: Tensor, act: Callable[[Tensor], Tensor],
                 extra: Tensor, chunk: int) -> Tensor:
        """(1/b) sum_q act(x_out_q(j) + x_in_q(i, k) + extra_k) in the canonical layout [G, n_out, n_in', K, H]
        (``x_out``, ``x_in`` [E, H]; ``extra`` [K, H]). Generic kinds build a pairs x set tensor, in chunks of
        the set of about ``chunk`` numbers."""
        X_out, X_in, b = self.aligned_blocks(group, op, x_out, x_in)
        G, Q, n_out, H = X_out.shape
        _, _, n_in, K, _ = X_in.shape
        step = max(1, chunk // max(G * n_out * n_in * K * H, 1))
        acc = X_out.new_zeros(G, n_out, n_in, K, H)
        for q in range(0, Q, step):  # chunks of the set keep the pairwise tensor bounded
            acc = acc + act(X_out[:, q:q + step, :, None, None] + X_in[:, q:q + step, None] + extra).sum(1)
        return acc / b

    def align_source(self, s: Tensor) -> Tensor:
        """An in-node term [G, n_in, f] broadcast into the canonical layout: [G, 1, n_in, 1, f]."""
        return s[:, None, :, None]


@register_kind
class LinearKind(OpKind):
    """``y = W x + b`` with W [n_out, n_in * K]; K > 1 when the input is a flattened conv map whose channels
    are the in-nodes (each edge then carries the K weights of one channel's map)."""

    name = "linear"

    def conv_geometry(self, op: OpSpec):
        """(kernel, stride, per-side padding, dilation): a linear layer on a flattened map is a conv whose
        kernel is the whole map."""
        d = len(op.kernel)
        return op.kernel, (1,) * d, ((0, 0),) * d, (1,) * d

    def per_sample_grad(self, op: OpSpec, A: Tensor, G: Tensor, n_in: int, n_out: int) -> Tensor:
        if op.kernel:  # linear on a flattened map: a conv whose kernel is the whole map
            return _conv_grad(A, G, self.conv_geometry(op))
        return super().per_sample_grad(op, A, G, n_in, n_out)

    def gram_factors(self, op: OpSpec, A: Tensor, G: Tensor):
        return None if op.kernel else (A.reshape(A.shape[0], -1, A.shape[-1]), G.reshape(G.shape[0], -1, G.shape[-1]))

    def permute_weight(self, op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        K = op.entries_per_edge
        W = W.index_select(dim, p_out)
        if K > 1:  # the columns of one in-channel are its K map positions
            p_in = (p_in[:, None] * K + torch.arange(K)).reshape(-1)
        return W.index_select(dim + 1, p_in)

    def aligned_blocks(self, group, op: OpSpec, h_out: Tensor, h_in: Tensor):
        if not op.kernel:
            return super().aligned_blocks(group, op, h_out, h_in)
        X_out, A, b = self._blocks(group, op, h_out, h_in)  # flattened map: every position pairs with q
        n_in = group.spec.layers[op.in_layer].size
        return X_out, A.reshape(group.size, b, -1, n_in, A.shape[-1]).transpose(2, 3), b


@register_kind
class ConvKind(LinearKind):
    """N-d convolution, W [n_out, n_in, *kernel]; channels are nodes, an edge carries its kernel."""

    name = "conv"

    def conv_geometry(self, op: OpSpec):
        return op.kernel, op.stride, op.padding, op.dilation

    def per_sample_grad(self, op: OpSpec, A: Tensor, G: Tensor, n_in: int, n_out: int) -> Tensor:
        return _conv_grad(A, G, self.conv_geometry(op))

    def permute_weight(self, op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        return W.index_select(dim, p_out).index_select(dim + 1, p_in)

    def aligned_blocks(self, group, op: OpSpec, h_out: Tensor, h_in: Tensor):
        """X_in holds the unfolded patch each output position sees: [G, b * L, n_in, K, f]."""
        X_out, A, b = self._blocks(group, op, h_out, h_in)  # A [G, b, *sp_in, n_in, f]
        G, n_in, f_in = group.size, A.shape[-2], A.shape[-1]
        maps = A.movedim(-2, 2).movedim(-1, 3).reshape(G * b, n_in * f_in, *A.shape[2:-2])
        patches = conv_patches(maps, self.conv_geometry(op))  # [G*b, n_in*f*K, L]
        K, L = op.entries_per_edge, patches.shape[-1]
        X_in = patches.view(G, b, n_in, f_in, K, L).permute(0, 1, 5, 2, 4, 3).reshape(G, b * L, n_in, K, f_in)
        return X_out, X_in, b


@register_kind
class DiagKind(OpKind):
    """Elementwise affine ``y_i = w_i x_hat_i + b_i`` (LayerNorm, eval BatchNorm): edge i -> i. Canonical
    layout [n, 1, 1]."""

    name = "diag"

    def num_edges(self, op: OpSpec, n_in: int, n_out: int) -> int:
        return n_out

    def edges(self, op: OpSpec, n_in: int, n_out: int, theta_start: int):
        idx = torch.arange(n_out)
        return idx, idx, theta_start + idx[:, None]

    def theta_index(self, op: OpSpec, n_in: int, n_out: int, theta_start: int) -> Tensor:
        return theta_start + torch.arange(n_out)[:, None, None]

    def weight_layout(self, shape: tuple[int, ...]) -> tuple[int, ...]:  # a bare layer scale [1, 1, d]: [d]
        return (math.prod(shape),)

    def per_sample_grad(self, op: OpSpec, A: Tensor, G: Tensor, n_in: int, n_out: int) -> Tensor:
        b = A.shape[0]
        return (A * G).reshape(b, -1, A.shape[-1]).sum(1)

    def permute_weight(self, op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        return W.index_select(dim, p_out)

    def moments(self, group, op: OpSpec, phi: Tensor, psi: Tensor) -> tuple[Tensor, Tensor]:
        X_out, X_in, b = self.aligned_blocks(group, op, phi, psi)
        out_mean = X_out.sum(1) / b
        paired = (X_out * X_in[:, :, :, 0]).sum(1)[:, :, None, None, :] / b
        return paired, (out_mean * X_in[:, :, :, 0].sum(1) / b)[:, :, None, None, :]

    def pairwise(self, group, op, x_out, x_in, act, extra, chunk):
        X_out, X_in, b = self.aligned_blocks(group, op, x_out, x_in)  # one pair per node: no chunks needed
        return act(X_out + X_in[:, :, :, 0] + extra[0]).sum(1)[:, :, None, None, :] / b

    def align_source(self, s: Tensor) -> Tensor:
        """The in-node of edge j is node j: [G, n, f] -> [G, n, 1, 1, f]."""
        return s[:, :, None, None]


class _InputMajor(OpKind):
    """Shared by kinds whose weight is stored input-major, W [n_in, n_out] (an embedding table, a transposed
    linear): the theta order of the edges and of the canonical layout."""

    def edges(self, op: OpSpec, n_in: int, n_out: int, theta_start: int):
        src = torch.arange(n_in).repeat_interleave(n_out)
        dst = torch.arange(n_out).repeat(n_in)
        return src, dst, theta_start + (src * n_out + dst)[:, None]

    def theta_index(self, op: OpSpec, n_in: int, n_out: int, theta_start: int) -> Tensor:
        """Canonical (j, i) is theta row i * n_out + j: [n_out, n_in, 1]."""
        return theta_start + torch.arange(n_in)[None, :, None] * n_out + torch.arange(n_out)[:, None, None]


@register_kind
class EmbeddingKind(_InputMajor):
    """Lookup ``y = W[id]`` with W [n_in = vocabulary, n_out]: the in-nodes are vocabulary entries, whose
    ``a`` is a one-hot block (token ids)."""

    name = "embedding"

    def per_sample_grad(self, op: OpSpec, A: Tensor, G: Tensor, n_in: int, n_out: int) -> Tensor:
        """``A`` holds token ids [b, *spatial]: [b, vocabulary, n_out]."""
        grad = _scatter_tokens(G.reshape(G.shape[0], -1, G.shape[-1]), A.reshape(A.shape[0], -1), n_in)
        if op.padding_idx is not None:
            grad[:, op.padding_idx] = 0
        return grad

    def permute_weight(self, op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        return W.index_select(dim + 1, p_out)  # vocabulary entries are inputs: never permuted

    def weight_layout(self, shape: tuple[int, ...]) -> tuple[int, ...]:  # position tokens [1, T, d]: [T, d]
        return shape if len(shape) == 2 else (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)

    def aligned_blocks(self, group, op: OpSpec, h_out: Tensor, h_in: Tensor):
        """``X_in = (X_tok [G, Q, f_in], tokens [G, Q])``: one one-hot entry per element."""
        spec, G = group.spec, group.size
        lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
        X_out = group.block(h_out, lout, "g")
        X_tok = group.block(h_in, lin, "a").reshape(G, -1, h_in.shape[-1])
        return X_out.reshape(G, -1, lout.size, h_out.shape[-1]), (X_tok, group.tokens(lin).reshape(G, -1)), \
            X_out.shape[1]

    def moments(self, group, op: OpSpec, phi: Tensor, psi: Tensor) -> tuple[Tensor, Tensor]:
        X_out, (X_tok, tokens), b = self.aligned_blocks(group, op, phi, psi)
        V = group.spec.layers[op.in_layer].size
        out_mean = X_out.sum(1) / b
        paired = _scatter_tokens(X_out * X_tok[:, :, None, :], tokens, V).transpose(1, 2)[:, :, :, None, :] / b
        in_mean = _scatter_tokens(X_tok, tokens, V) / b
        return paired, out_mean[:, :, None, None, :] * in_mean[:, None, :, None, :]

    def pairwise(self, group, op, x_out, x_in, act, extra, chunk):
        X_out, (X_tok, tokens), b = self.aligned_blocks(group, op, x_out, x_in)  # only the seen tokens pair
        V = group.spec.layers[op.in_layer].size
        act_sum = _scatter_tokens(act(X_out + X_tok[:, :, None, :] + extra[0]), tokens, V)
        return act_sum.transpose(1, 2)[:, :, :, None, :] / b


@register_kind
class TransposedLinearKind(_InputMajor):
    """``y = x W + b`` with W stored transposed, [n_in, n_out] (Hugging Face ``Conv1D``): the same function,
    edges and canonical layout as ``linear``; only the theta order and the axes the permutations act on
    differ."""

    name = "transposed_linear"

    def per_sample_grad(self, op: OpSpec, A: Tensor, G: Tensor, n_in: int, n_out: int) -> Tensor:
        """[b, n_in, n_out]: sum over the sample's elements of a_e g_e^T."""
        b = A.shape[0]
        return torch.einsum("bsi,bso->bio", A.reshape(b, -1, A.shape[-1]), G.reshape(b, -1, G.shape[-1]))

    def gram_factors(self, op: OpSpec, A: Tensor, G: Tensor):  # a transpose keeps inner products
        return A.reshape(A.shape[0], -1, A.shape[-1]), G.reshape(G.shape[0], -1, G.shape[-1])

    def permute_weight(self, op: OpSpec, W: Tensor, p_in: Tensor, p_out: Tensor, dim: int) -> Tensor:
        return W.index_select(dim, p_in).index_select(dim + 1, p_out)
