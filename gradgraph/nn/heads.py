"""Output heads. Parameter-level heads return one row per trainable scalar, in theta order ([P, C]; a batch
concatenates its graphs' rows), built op by op on dense blocks of each group of same-architecture graphs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter

from ..graph.ops import KIND_CODES, kernel_coords
from .encoding import RunningScale, raw_monomials
from .layout import BatchLayout, StructureGroup, aligned_blocks


def mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_channels, hidden), nn.GELU(), nn.Linear(hidden, out_channels))


class NodeHead(nn.Module):
    """Node-level output: [N, f] -> [N, C]."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = mlp(channels, channels, out_channels)

    def forward(self, u: Tensor, layout: BatchLayout) -> Tensor:
        return self.mlp(u)


class GraphHead(nn.Module):
    """L_Vec, the invariant head: mean of node embeddings per graph -> [num_graphs, C]."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = mlp(channels, channels, out_channels)

    def forward(self, u: Tensor, layout: BatchLayout) -> Tensor:
        return self.mlp(scatter(u, layout.node_graph, 0, dim_size=layout.num_graphs, reduce="mean"))


def _bilinear(group: StructureGroup, op, phi: Tensor, psi: Tensor) -> Tensor:
    """(1/b) sum over aligned positions of phi(out-neuron) * psi(in-neuron): the op's weight gradient with
    (phi, psi) in place of (g, a). [G, n_out, n_in, K, C] ([G, n, 1, 1, C] for diag ops)."""
    X_out, X_in, b = aligned_blocks(group, op, phi, psi)
    if op.kind == "embedding":
        X_tok, tokens = X_in
        G, _, n_out, C = X_out.shape
        V = group.spec.layers[op.in_layer].size
        flat = (tokens + V * torch.arange(G, device=tokens.device)[:, None]).reshape(-1)
        res = X_out.new_zeros(G * V, n_out, C).index_add_(0, flat, (X_out * X_tok[:, :, None, :]).reshape(-1, n_out, C))
        return res.view(G, V, n_out, C).transpose(1, 2)[:, :, :, None, :] / b
    if op.kind == "diag":
        return (X_out * X_in[:, :, :, 0]).sum(1)[:, :, None, None, :] / b
    return torch.einsum("gqoc,gqikc->goikc", X_out, X_in) / b


class ParamHead(nn.Module):
    """Parameter-level head: for a weight between in-neuron i and out-neuron j (kernel offset k),

        out = W_o GELU(W_s u_i + W_d u_j + W_k pos(k) + e_kind [+ W_p param_features])      (L_Prod)
              + W_b (1/b) sum_q phi_q(j) psi_q(i)                                          (bilinear)

    and for a bias of neuron j, the same without the i and k terms (the bilinear term with psi = 1).
    ``phi``/``psi`` are computed per entry from the set-level embeddings h and the raw monomials
    r = (a, g, a^2, g^2, a g, has_a, has_g) divided by their running RMS (one constant per column, see
    ``RunningScale``): ``phi = (R r) * (1 + H h)``. The bilinear term is computed exactly like a weight
    gradient (a matmul for linear ops, unfolded patches for convs), never as an edges x set tensor; with
    phi = g, psi = a it is the batch gradient and with phi = g^2, psi = a^2 the empirical Fisher diagonal
    (exactly, for ops with one element per sample), so both are representable.

    ``param_features`` ([P, F], theta order, e.g. the weights themselves) enter the pairwise term."""

    def __init__(self, node_channels: int, out_channels: int, hidden: int | None = None,
                 entry_channels: int | None = None, bilinear_channels: int = 8, param_features: int = 0) -> None:
        super().__init__()
        hidden = hidden or node_channels
        self.out_channels = out_channels
        self.src, self.dst = nn.Linear(node_channels, hidden, bias=False), nn.Linear(node_channels, hidden)
        self.offset = nn.Linear(2, hidden, bias=False)
        self.kind = nn.Embedding(len(KIND_CODES), hidden)
        self.out = nn.Linear(hidden, out_channels)
        self.bias_node = nn.Linear(node_channels, hidden)
        self.bias_out = nn.Linear(hidden, out_channels)
        self.param_lin = nn.Linear(param_features, hidden, bias=False) if param_features else None
        self.bilinear = entry_channels is not None and bilinear_channels > 0
        if self.bilinear:
            self.raw_scale = RunningScale(7)
            self.phi_r, self.psi_r = nn.Linear(7, bilinear_channels, bias=False), nn.Linear(7, bilinear_channels, bias=False)
            self.phi_h, self.psi_h = nn.Linear(entry_channels, bilinear_channels), nn.Linear(entry_channels, bilinear_channels)
            self.bil_out = nn.Linear(bilinear_channels, out_channels, bias=False)
            self.bil_bias = nn.Linear(bilinear_channels, out_channels, bias=False)

    def forward(self, u: Tensor, layout: BatchLayout, h: Tensor | None = None,
                param_features: Tensor | None = None) -> Tensor:
        if (param_features is None) != (self.param_lin is None):
            raise ValueError("this head was built with param_features=%d; pass a [P, F] tensor exactly when F > 0"
                             % (0 if self.param_lin is None else self.param_lin.in_features))
        graph = layout.graph
        out = u.new_zeros(layout.num_params, self.out_channels)
        phi = psi = None
        if self.bilinear:
            r = self.raw_scale(raw_monomials(graph.entry_x.to(u.dtype), graph.entry_mask))
            phi = self.phi_r(r) * (1 + self.phi_h(h))
            psi = self.psi_r(r) * (1 + self.psi_h(h))
        for group in layout.groups:
            spec = group.spec
            for op in spec.ops:
                lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
                kind = self.kind.weight[KIND_CODES[op.kind]]
                u_out = group.nodes(u, lout)
                tidx = group.theta_index(op)
                if tidx is not None:
                    d = self.dst(u_out)[:, :, None, None]
                    s = self.src(group.nodes(u, lin))
                    s = s[:, :, None, None] if op.kind == "diag" else s[:, None, :, None]
                    off = self.offset(kernel_coords(op).to(u.device, u.dtype))
                    pre = d + s + off + kind
                    if self.param_lin is not None:
                        pre = pre + self.param_lin(param_features[tidx])
                    val = self.out(F.gelu(pre))
                    if self.bilinear:
                        val = val + self.bil_out(_bilinear(group, op, phi, psi))
                    out[tidx.reshape(-1)] = val.reshape(-1, self.out_channels)
                bidx = group.bias_index(op)
                if bidx is not None:
                    pre = self.bias_node(u_out) + kind
                    if self.param_lin is not None:
                        pre = pre + self.param_lin(param_features[bidx])
                    val = self.bias_out(F.gelu(pre))
                    if self.bilinear:
                        X = group.block(phi, lout, "g")
                        val = val + self.bil_bias(X.reshape(group.size, -1, lout.size, X.shape[-1]).sum(1) / X.shape[1])
                    out[bidx.reshape(-1)] = val.reshape(-1, self.out_channels)
        return out


class PairwiseSetHead(nn.Module):
    """GradMetaNet++'s parameter head, applied per set element and summed:

        W_ij = W_o (1/b) sum_q GELU(U x_q(j) + V x_q(i) + W_k pos(k) + e_kind),  b_j = W_o' (1/b) sum_q GELU(B x_q(j))

    This builds an edges x set-elements x hidden tensor (chunked over the set to bound memory): its cost is
    O(P b hidden), quadratic where GradMetaNet's heads are linear."""

    def __init__(self, channels: int, out_channels: int, hidden: int | None = None, chunk: int = 1 << 22) -> None:
        super().__init__()
        hidden = hidden or channels
        self.out_channels, self.chunk = out_channels, chunk
        self.U, self.V = nn.Linear(channels, hidden), nn.Linear(channels, hidden, bias=False)
        self.offset = nn.Linear(2, hidden, bias=False)
        self.kind = nn.Embedding(len(KIND_CODES), hidden)
        self.out = nn.Linear(hidden, out_channels)
        self.bias_in = nn.Linear(channels, hidden)
        self.bias_out = nn.Linear(hidden, out_channels)

    def _pairs(self, group, op, xo: Tensor, xi: Tensor) -> Tensor:
        X_out, X_in, b = aligned_blocks(group, op, xo, xi)
        extra = self.offset(kernel_coords(op).to(xo.device, xo.dtype)) + self.kind.weight[KIND_CODES[op.kind]]
        if op.kind == "embedding":
            X_tok, tokens = X_in
            G, Q, n_out, H = X_out.shape
            V = group.spec.layers[op.in_layer].size
            act = F.gelu(X_out + X_tok[:, :, None, :] + extra[0])
            flat = (tokens + V * torch.arange(G, device=tokens.device)[:, None]).reshape(-1)
            res = act.new_zeros(G * V, n_out, H).index_add_(0, flat, act.reshape(-1, n_out, H))
            return res.view(G, V, n_out, H).transpose(1, 2)[:, :, :, None, :] / b
        if op.kind == "diag":
            return F.gelu(X_out + X_in[:, :, :, 0] + extra[0]).sum(1)[:, :, None, None, :] / b
        G, Q, n_out, H = X_out.shape
        _, _, n_in, K, _ = X_in.shape
        step = max(1, self.chunk // max(G * n_out * n_in * K * H, 1))
        acc = X_out.new_zeros(G, n_out, n_in, K, H)
        for q in range(0, Q, step):  # chunks of the set keep the pairwise tensor bounded
            acc = acc + F.gelu(X_out[:, q:q + step, :, None, None] + X_in[:, q:q + step, None] + extra).sum(1)
        return acc / b

    def forward(self, h: Tensor, layout: BatchLayout) -> Tensor:
        out = h.new_zeros(layout.num_params, self.out_channels)
        xo, xi, xb = self.U(h), self.V(h), self.bias_in(h)
        for group in layout.groups:
            spec = group.spec
            for op in spec.ops:
                lout = spec.layers[op.out_layer]
                tidx = group.theta_index(op)
                if tidx is not None:
                    out[tidx.reshape(-1)] = self.out(self._pairs(group, op, xo, xi)).reshape(-1, self.out_channels)
                bidx = group.bias_index(op)
                if bidx is not None:
                    X = F.gelu(group.block(xb, lout, "g"))
                    X = X.reshape(group.size, -1, lout.size, X.shape[-1])
                    out[bidx.reshape(-1)] = self.bias_out(X.sum(1) / X.shape[1]).reshape(-1, self.out_channels)
        return out
