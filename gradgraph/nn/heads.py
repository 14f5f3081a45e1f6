"""Output heads. Parameter-level heads return one row per trainable scalar, in theta order ([P, C]; a batch
concatenates its graphs' rows), built op by op on dense blocks of each group of same-architecture graphs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter

from ..graph.kinds import OpKind, kind_of
from .encoding import RunningScale, raw_monomials
from .layers import kind_embedding
from .layout import BatchLayout


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
    """L_Vec, the invariant head: node embeddings pooled per graph, then an MLP -> [num_graphs, C].

    ``pool="mean"``: the mean over the graph's nodes (the paper). ``pool="layer"``: the mean over each layer's
    nodes, then the mean over the graph's layers, so that a layer of one neuron (a scalar input, the output)
    weighs as much as one of a thousand instead of vanishing in the mean; still invariant to every neuron
    permutation, since layers are never permuted."""

    POOLS = ("mean", "layer")

    def __init__(self, channels: int, out_channels: int, pool: str = "mean") -> None:
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"GraphHead pool must be one of {self.POOLS}, got {pool!r}")
        self.mlp = mlp(channels, channels, out_channels)
        self.pool = pool

    def _layer_segments(self, layout: BatchLayout) -> tuple[Tensor, Tensor, int]:
        """Per node its (graph, layer) segment, per segment its graph, the number of segments."""
        stride = int(layout.graph.node_layer.max()) + 1
        uniq, seg = torch.unique(layout.node_graph * stride + layout.graph.node_layer, return_inverse=True)
        return seg, uniq // stride, uniq.numel()

    def forward(self, u: Tensor, layout: BatchLayout) -> Tensor:
        if self.pool == "mean":
            return self.mlp(scatter(u, layout.node_graph, 0, dim_size=layout.num_graphs, reduce="mean"))
        seg, seg_graph, n = layout.memo("graph_head_layers", lambda: self._layer_segments(layout))
        per_layer = scatter(u, seg, 0, dim_size=n, reduce="mean")
        return self.mlp(scatter(per_layer, seg_graph, 0, dim_size=layout.num_graphs, reduce="mean"))


class MomentTerms(nn.Module):
    """Second-moment terms computed like weight gradients (each op kind's ``moments``), for any parameter head.

    Per entry, ``phi = (R r) * (1 + H_phi h)`` (out-neuron side) and ``psi = (R' r) * (1 + H_psi h)`` (in-neuron
    side), where r = (a, g, a^2, g^2, a g, has_a, has_g) divided by its running RMS (``RunningScale``) and h
    are set-level embeddings. Channel 0 starts as (g, a), the gradient, and channel 1 as (g^2, a^2), the
    empirical Fisher diagonal (exact for ops with one element per sample), their gates zeroed. The paired and
    bias terms (one moment, for weights and for biases) are divided by their running RMS over every parameter
    of the batch, the factorized terms by theirs (one constant per channel, so layers and parameter kinds keep
    their relative scales) before the output maps, which brings raw curvature scales to O(1).
    ``init="fisher"`` (or ``"gradient"``) makes the output start as that channel alone, i.e. as the classical
    estimator in these units; ``None`` starts from a random combination."""

    INITS = {"gradient": 0, "fisher": 1}

    def __init__(self, entry_channels: int, channels: int, out_channels: int, init: str | None = None) -> None:
        super().__init__()
        if init is not None and (init not in self.INITS or channels <= self.INITS[init]):
            raise ValueError(f"moment init must be one of {sorted(self.INITS)} (with enough channels), got {init!r}")
        self.raw_scale = RunningScale(7)
        self.paired_scale, self.factorized_scale = RunningScale(channels), RunningScale(channels)
        self.phi_r, self.psi_r = nn.Linear(7, channels, bias=False), nn.Linear(7, channels, bias=False)
        self.phi_h, self.psi_h = nn.Linear(entry_channels, channels), nn.Linear(entry_channels, channels)
        self.paired_out = nn.Linear(channels, out_channels, bias=False)
        self.factorized_out = nn.Linear(channels, out_channels, bias=False)
        self.bias_out = nn.Linear(channels, out_channels, bias=False)
        with torch.no_grad():  # channel 0: (g, a) -> gradient; channel 1: (g^2, a^2) -> empirical Fisher
            for c, (col_g, col_a) in enumerate([(1, 0), (3, 2)][:channels]):
                self.phi_r.weight[c].zero_()
                self.psi_r.weight[c].zero_()
                self.phi_r.weight[c, col_g] = 1.0
                self.psi_r.weight[c, col_a] = 1.0
                for lin in (self.phi_h, self.psi_h):
                    lin.weight[c].zero_()
                    lin.bias[c] = 0.0
            if init is not None:
                for lin in (self.paired_out, self.factorized_out, self.bias_out):
                    lin.weight.zero_()
                self.paired_out.weight[:, self.INITS[init]] = 1.0
                self.bias_out.weight[:, self.INITS[init]] = 1.0

    def compute(self, layout: BatchLayout, h: Tensor, weight_bias: Tensor | None = None) -> tuple[dict, dict]:
        """The weight term of every (group, op) with trainable weights, in its kind's canonical layout
        [G, n_out, n_in', K, out] (diag: [G, n, 1, 1, out]), plus ``weight_bias`` [out] if given (a head's
        output bias, added here for free), and the bias term of every (group, op) with trainable biases,
        [G, n_out, out].

        The running scales are folded into the weights they precede ((x / s) W^T = x (W / s)^T), and for
        kinds with the generic ``moments`` (linear, conv, ...) neither the [.., C] moment tensors nor the
        factorized outer product are built: the paired sums come out of one batched matmul as [G, C, rows],
        are mixed by the output map with a second one (no transpose copy), and the factorized term of output
        channel k, sum_c mean_out(j, c) mean_in(i, c) W_f[k, c], is one matmul of the out-neuron means with a
        [C, n_in' K out] table. Same values as the materialized path up to float rounding."""
        x = layout.graph.entry_x.to(h.dtype)
        r = raw_monomials(x, layout.graph.entry_mask)
        self.raw_scale.observe(r)
        inv = 1 / self.raw_scale.scale(r)  # (r / s) W^T = r (W / s)^T
        phi = (r @ (self.phi_r.weight * inv).t()) * torch.addmm(self.phi_h.bias + 1, h, self.phi_h.weight.t())
        psi = (r @ (self.psi_r.weight * inv).t()) * torch.addmm(self.psi_h.bias + 1, h, self.psi_h.weight.t())
        # a bias is a weight on a constant input a = 1: its psi is that of the constant's monomials
        one = h.new_tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
        psi_bias = self.psi_r(one / self.raw_scale.scale(one))[0]
        pairs, biases = {}, {}
        for gi, group in enumerate(layout.groups):
            for k, op in enumerate(group.spec.ops):
                if group.spec.theta_range(op.weight) is not None:
                    kind = kind_of(op)
                    pairs[gi, k] = (_GenericMoments(*kind.aligned_blocks(group, op, phi, psi))
                                    if type(kind).moments is OpKind.moments else kind.moments(group, op, phi, psi))
                if group.spec.theta_range(op.bias) is not None:
                    lay = group.spec.layers[op.out_layer]
                    X = group.block(phi, lay, "g")
                    biases[gi, k] = X.reshape(group.size, -1, lay.size, X.shape[-1]).sum(1) / X.shape[1] * psi_bias
        # one running scale per channel over every parameter of the batch: paired weight terms and bias terms
        # together (they are the same moment for weights and for biases), factorized terms apart
        if self.paired_scale.observing:
            sums = [_sum_squares(t, 0) for t in pairs.values()] + [_sum_squares(t, None) for t in biases.values()]
            self.paired_scale.observe_sums(sum(s for s, _ in sums), sum(n for _, n in sums))
        if pairs and self.factorized_scale.observing:
            sums = [_sum_squares(t, 1) for t in pairs.values()]
            self.factorized_scale.observe_sums(sum(s for s, _ in sums), sum(n for _, n in sums))
        Wp = self.paired_out.weight / self.paired_scale.scale(h)
        Wf = self.factorized_out.weight / self.factorized_scale.scale(h)
        weights = {}
        for key, t in pairs.items():
            if isinstance(t, _GenericMoments):
                weights[key] = t.mixed(Wp, Wf, weight_bias)
            else:
                p, f = t
                w = torch.matmul(p, Wp.t()) + torch.matmul(f, Wf.t())
                weights[key] = w if weight_bias is None else w + weight_bias
        biases = {key: self.bias_out(t / self.paired_scale.scale(t)) for key, t in biases.items()}
        return weights, biases


class _GenericMoments:
    """The moment terms of one op with the generic ``OpKind.moments``, kept as their factors (see
    ``MomentTerms.compute``): ``X_out`` [G, Q, n_out, C], ``X_in`` [G, Q, n_in', K, C] and b."""

    def __init__(self, X_out: Tensor, X_in: Tensor, b: int) -> None:
        G, Q, n_out, C = X_out.shape
        self.shape = (G, n_out, *X_in.shape[2:4])
        self.b, M = b, X_in.shape[2] * X_in.shape[3]
        # sum_q phi_q(j) psi_q(i) per channel: [G, C, n_out, M], one batched matmul
        self.paired_sum = torch.matmul(X_out.permute(0, 3, 2, 1), X_in.permute(0, 4, 1, 2, 3).reshape(G, C, Q, M))
        self.out_sum, self.in_sum = X_out.sum(1), X_in.sum(1).reshape(G, M, C)  # [G, n_out, C], [G, M, C]

    def sum_squares(self, factorized: bool) -> tuple[Tensor, int]:
        """Per channel, the sum of squares of the paired (or factorized) term's values, and their number."""
        G, n_out, n_in, K = self.shape
        if factorized:
            ss = (self.out_sum.detach().square().sum(1) * self.in_sum.detach().square().sum(1)).sum(0) / self.b ** 4
        else:
            ss = self.paired_sum.detach().square().sum((0, 2, 3)) / self.b ** 2
        return ss, G * n_out * n_in * K

    def mixed(self, Wp: Tensor, Wf: Tensor, bias: Tensor | None) -> Tensor:
        """paired W_p^T + factorized W_f^T (+ bias): [G, n_out, n_in', K, out]."""
        G, n_out, n_in, K = self.shape
        M, C, out = n_in * K, Wp.shape[1], Wp.shape[0]
        table = (self.in_sum[:, :, None, :] * (Wf / self.b ** 2)).permute(0, 3, 1, 2).reshape(G, C, M * out)
        fact = torch.bmm(self.out_sum, table) if bias is None else torch.baddbmm(bias.repeat(M), self.out_sum, table)
        P = self.paired_sum.view(G, C, n_out * M).transpose(1, 2)  # [G, n_out M, C], column-major: no copy
        res = torch.baddbmm(fact.view(G, n_out * M, out), P, (Wp / self.b).t().expand(G, C, out))
        return res.view(G, n_out, n_in, K, out)


def _sum_squares(t, which: int | None) -> tuple[Tensor, int]:
    """Per-channel sum of squares and count of a moment term: a ``_GenericMoments`` (which: 0 paired,
    1 factorized), a materialized (paired, factorized) pair, or one tensor (which=None)."""
    if isinstance(t, _GenericMoments):
        return t.sum_squares(bool(which))
    x = t if which is None else t[which]
    x = x.detach().reshape(-1, x.shape[-1])
    return x.square().sum(0), x.shape[0]


def _moment_terms(entry_channels: int | None, channels: int, out_channels: int, init: str | None,
                  *pairwise_outputs: nn.Linear) -> MomentTerms | None:
    """A head's ``MomentTerms`` (None without entry embeddings or with 0 channels). With them, the head's own
    pairwise output layers start at zero: the head starts from the moment terms and learns a correction."""
    if entry_channels is None or channels <= 0:
        return None
    with torch.no_grad():
        for lin in pairwise_outputs:
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    return MomentTerms(entry_channels, channels, out_channels, init)


class ParamHead(nn.Module):
    """Parameter-level head: for a weight between in-neuron i and out-neuron j (kernel offset k),

        out = W_o GELU(W_s u_i + W_d u_j + W_k pos(k) + e_kind [+ W_p param_features])      (L_Prod)
              + W_b (1/b) sum_q phi_q(j) psi_q(i)                                          (paired moments)
              + W_f ((1/b) sum_q phi_q(j)) ((1/b) sum_q psi_q(i))                          (factorized moments)

    and for a bias of neuron j, the same without the i and k terms. The moment terms (``MomentTerms``) are
    computed exactly like a weight gradient (a matmul for linear ops, unfolded patches for convs), never as an
    edges x set tensor; with phi = g, psi = a the paired term is the batch gradient and with phi = g^2,
    psi = a^2 the empirical Fisher diagonal, which is where two of its channels start. The pairwise MLP's output
    layer starts at zero, so the head starts from the moment terms and learns a correction.

    ``param_features`` ([P, F], theta order, e.g. the weights themselves) enter the pairwise term. The pairwise
    term is evaluated in chunks of out-neuron rows of about ``CHUNK`` values (same result, bounded memory)."""

    CHUNK = 1 << 18

    def __init__(self, node_channels: int, out_channels: int, hidden: int | None = None,
                 entry_channels: int | None = None, bilinear_channels: int = 8, param_features: int = 0,
                 moment_init: str | None = None) -> None:
        super().__init__()
        hidden = hidden or node_channels
        self.out_channels = out_channels
        self.src, self.dst = nn.Linear(node_channels, hidden, bias=False), nn.Linear(node_channels, hidden)
        self.offset = nn.Linear(2, hidden, bias=False)
        self.kind = kind_embedding(hidden)
        self.out = nn.Linear(hidden, out_channels)
        self.bias_node = nn.Linear(node_channels, hidden)
        self.bias_out = nn.Linear(hidden, out_channels)
        self.param_lin = nn.Linear(param_features, hidden, bias=False) if param_features else None
        self.moments = _moment_terms(entry_channels, bilinear_channels, out_channels, moment_init,
                                     self.out, self.bias_out)

    def forward(self, u: Tensor, layout: BatchLayout, h: Tensor | None = None,
                param_features: Tensor | None = None) -> Tensor:
        if (param_features is None) != (self.param_lin is None):
            raise ValueError("this head was built with param_features=%d; pass a [P, F] tensor exactly when F > 0"
                             % (0 if self.param_lin is None else self.param_lin.in_features))
        out = u.new_zeros(layout.num_params, self.out_channels)
        m_weights, m_biases = (self.moments.compute(layout, h, weight_bias=self.out.bias) if self.moments is not None
                               else ({}, {}))
        for gi, group in enumerate(layout.groups):
            spec = group.spec
            for k, op in enumerate(spec.ops):
                lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
                op_kind = kind_of(op)
                kind = self.kind.weight[op_kind.code]
                u_out = group.nodes(u, lout)
                tidx = group.theta_index(op)
                if tidx is not None:
                    # the out-neuron, kernel-offset and kind terms summed while small, [G, n_out, 1, K, hidden]:
                    # one add per chunk at full size
                    coords = layout.memo(("kernel_coords", id(op)),
                                         lambda op=op: kind_of(op).kernel_coords(op).to(u.device))
                    d = self.dst(u_out)[:, :, None, None] + (self.offset(coords.to(u.dtype)) + kind)
                    s = op_kind.align_source(self.src(group.nodes(u, lin)))
                    mw = m_weights.get((gi, k))  # the moment terms with self.out's bias in them
                    rows_out = group.param_rows(out, op)  # [G, n_out n_in' K, C] view of out, or None
                    # chunks of out-neuron rows: the [G, n_out, n_in', K, hidden] tensor is never built whole
                    n_out, per_row = tidx.shape[1], tidx[0, 0].numel()
                    step = max(1, self.CHUNK // max(1, tidx[:, :1].numel() * d.shape[-1]))
                    for r0 in range(0, n_out, step):
                        rows = slice(r0, min(r0 + step, n_out))
                        pre = d[:, rows] + (s[:, rows] if s.shape[1] > 1 else s)
                        if self.param_lin is not None:
                            pre = pre + self.param_lin(param_features[tidx[:, rows]])
                        act = F.gelu(pre).reshape(-1, pre.shape[-1])
                        val = self.out(act) if mw is None else torch.addmm(
                            mw[:, rows].reshape(-1, self.out_channels), act, self.out.weight.t())
                        if rows_out is not None:
                            rows_out[:, rows.start * per_row:rows.stop * per_row] = val.view(group.size, -1,
                                                                                             self.out_channels)
                        else:
                            out[tidx[:, rows].reshape(-1)] = val
                bidx = group.bias_index(op)
                if bidx is not None:
                    pre = self.bias_node(u_out) + kind
                    if self.param_lin is not None:
                        pre = pre + self.param_lin(param_features[bidx])
                    val = self.bias_out(F.gelu(pre)) + m_biases.get((gi, k), 0)
                    out[bidx.reshape(-1)] = val.reshape(-1, self.out_channels)
        return out


class PairwiseSetHead(nn.Module):
    """GradMetaNet++'s parameter head, applied per set element and summed:

        W_ij = W_o (1/b) sum_q GELU(U x_q(j) + V x_q(i) + W_k pos(k) + e_kind),  b_j = W_o' (1/b) sum_q GELU(B x_q(j))

    This builds an edges x set-elements x hidden tensor (chunked over the set to bound memory): its cost is
    O(P b hidden), quadratic where GradMetaNet's heads are linear. With ``bilinear_channels > 0`` the
    ``MomentTerms`` of GradMetaNet's head are added (a multiplicative pair interaction the GELU sum lacks)."""

    def __init__(self, channels: int, out_channels: int, hidden: int | None = None, chunk: int = 1 << 22,
                 bilinear_channels: int = 0, moment_init: str | None = None) -> None:
        super().__init__()
        hidden = hidden or channels
        self.out_channels, self.chunk = out_channels, chunk
        self.U, self.V = nn.Linear(channels, hidden), nn.Linear(channels, hidden, bias=False)
        self.offset = nn.Linear(2, hidden, bias=False)
        self.kind = kind_embedding(hidden)
        self.out = nn.Linear(hidden, out_channels)
        self.bias_in = nn.Linear(channels, hidden)
        self.bias_out = nn.Linear(hidden, out_channels)
        self.moments = _moment_terms(channels, bilinear_channels, out_channels, moment_init, self.out, self.bias_out)

    def _pairs(self, group, op, xo: Tensor, xi: Tensor) -> Tensor:
        """(1/b) sum_q GELU(U x_q(j) + V x_q(i) + W_k pos(k) + e_kind), in the kind's canonical layout."""
        kind = kind_of(op)
        extra = self.offset(kind.kernel_coords(op).to(xo.device, xo.dtype)) + self.kind.weight[kind.code]
        return kind.pairwise(group, op, xo, xi, F.gelu, extra, self.chunk)

    def forward(self, h: Tensor, layout: BatchLayout) -> Tensor:
        out = h.new_zeros(layout.num_params, self.out_channels)
        xo, xi, xb = self.U(h), self.V(h), self.bias_in(h)
        m_weights, m_biases = self.moments.compute(layout, h) if self.moments is not None else ({}, {})
        for gi, group in enumerate(layout.groups):
            spec = group.spec
            for k, op in enumerate(spec.ops):
                lout = spec.layers[op.out_layer]
                tidx = group.theta_index(op)
                if tidx is not None:
                    val = self.out(self._pairs(group, op, xo, xi)) + m_weights.get((gi, k), 0)
                    out[tidx.reshape(-1)] = val.reshape(-1, self.out_channels)
                bidx = group.bias_index(op)
                if bidx is not None:
                    X = F.gelu(group.block(xb, lout, "g"))
                    X = X.reshape(group.size, -1, lout.size, X.shape[-1])
                    val = self.bias_out(X.sum(1) / X.shape[1]) + m_biases.get((gi, k), 0)
                    out[bidx.reshape(-1)] = val.reshape(-1, self.out_channels)
        return out
