"""The op-kind protocol (gradgraph.graph.kinds): per kind, edges against the theta layout and the function,
per-sample gradients against the torch.func oracle, permutations against the function; the registry; negative
tests with deliberately broken kinds. A new kind adds one entry to CASES."""
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.errors import UnknownNameError
from gradgraph.graph.gradient_graph import GradientGraph
from gradgraph.graph.kinds import KINDS, LinearKind, OpKind, TransposedLinearKind, kind_of, num_kinds, register_kind
from gradgraph.graph.spec import OpSpec, ParamUse
from gradgraph.nn import GradMetaNet, GradMetaNetPlusPlus
from gradgraph.nn.baselines import WeightSpaceGMN
from gradgraph.oracle import per_sample_grads

B, T = 3, 2  # samples, elements per sample


@dataclass
class KindCase:
    """One op of a kind as a function of (W, bias, x), every tensor neuron-axis last: ``x`` is the in-layer's a
    ([b, *spatial, n_in], token ids for a vocabulary), the output the out-layer's pre-activation."""

    op: OpSpec
    n_in: int
    n_out: int
    fn: Callable
    W: torch.Tensor
    bias: torch.Tensor | None
    x: torch.Tensor
    dense_input: bool = True  # False: x holds token ids (the in-nodes are a vocabulary)


def _op(kind, **geometry):
    return OpSpec("op", kind, 0, 1, ParamUse("weight"), ParamUse("bias"), **geometry)


def _conv2d(W, b, x, stride, padding, dilation):
    return F.conv2d(x.movedim(-1, 1), W, b, stride, padding, dilation).movedim(1, -1)


def cases() -> dict[str, KindCase]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "linear": KindCase(_op("linear"), 3, 4, lambda W, b, x: x @ W.T + b, r(4, 3), r(4), r(B, T, 3)),
        # a linear layer on a flattened 2 x 3 map of 3 channels (flattened channel-major, as nn.Flatten does)
        "linear_on_map": KindCase(_op("linear", kernel=(2, 3)), 3, 4,
                                  lambda W, b, x: x.movedim(-1, 1).flatten(1) @ W.T + b, r(4, 18), r(4), r(B, 2, 3, 3)),
        "conv2d": KindCase(_op("conv", kernel=(3, 2), stride=(2, 1), padding=((1, 1), (0, 0)), dilation=(1, 2)), 3, 4,
                           lambda W, b, x: _conv2d(W, b, x, (2, 1), (1, 0), (1, 2)), r(4, 3, 3, 2), r(4),
                           r(B, 5, 6, 3)),
        "conv1d": KindCase(_op("conv", kernel=(2,), stride=(1,), padding=((1, 1),), dilation=(2,)), 3, 4,
                           lambda W, b, x: F.conv1d(x.movedim(-1, 1), W, b, 1, 1, 2).movedim(1, -1),
                           r(4, 3, 2), r(4), r(B, 5, 3)),
        "diag": KindCase(_op("diag"), 4, 4, lambda W, b, x: x * W + b, r(4), r(4), r(B, T, 4)),
        "embedding": KindCase(replace(_op("embedding", padding_idx=2), bias=None), 5, 4, lambda W, b, x: W[x],
                              r(5, 4), None, torch.randint(5, (B, T), generator=g), dense_input=False),
        "transposed_linear": KindCase(_op("transposed_linear"), 3, 4, lambda W, b, x: x @ W + b, r(3, 4), r(4),
                                      r(B, T, 3)),
    }


CASES = cases()


class _Fn(nn.Module):
    def __init__(self, case: KindCase) -> None:
        super().__init__()
        self.fn = case.fn
        self.weight = nn.Parameter(case.W.clone())
        self.bias = None if case.bias is None else nn.Parameter(case.bias.clone())

    def forward(self, x):
        return self.fn(self.weight, self.bias, x)


def _weighted(out, R):  # per-sample loss sum(out * R): its gradient with respect to out is R
    return (out * R).flatten(1).sum(1)


def check_edges(kind, case: KindCase, start: int = 7) -> None:
    """Edges, theta index and the function agree: every weight is one entry of one edge, the canonical
    layout points at the same rows, and edge (i, j)'s weights connect in-node i to out-node j only."""
    op, n_in, n_out = case.op, case.n_in, case.n_out
    src, dst, theta = kind.edges(op, n_in, n_out, start)
    idx = kind.theta_index(op, n_in, n_out, start)
    numel = case.W.numel()
    assert src.shape == dst.shape == (kind.num_edges(op, n_in, n_out),)
    assert theta.shape == (src.numel(), op.entries_per_edge)
    assert torch.equal(theta.flatten().sort().values, torch.arange(start, start + numel))
    assert torch.equal(idx.flatten().sort().values, torch.arange(start, start + numel))
    assert idx.shape[0] == n_out and idx.shape[2] == op.entries_per_edge
    assert torch.equal(theta, idx[dst, src if idx.shape[1] > 1 else 0]), "edges and theta_index disagree"
    assert kind.kernel_coords(op).shape == (op.entries_per_edge, 2)
    x = case.x.clone()
    for e in range(src.numel()):
        W = torch.zeros(numel, dtype=case.W.dtype)
        W[theta[e] - start] = 1.0
        W = W.view_as(case.W)
        bias = None if case.bias is None else torch.zeros_like(case.bias)
        i, j = int(src[e]), int(dst[e])
        if case.dense_input:
            other = x.clone()
            other[..., torch.arange(n_in) != i] = torch.randn_like(other[..., torch.arange(n_in) != i])
        else:  # replace every token but i by another token but i
            x[0, 0] = i  # the token of in-node i occurs
            other = torch.where(x == i, x, (i + 1 + torch.randint(n_in - 1, x.shape)) % n_in)
        y = case.fn(W, bias, x)
        assert y[..., j].abs().sum() > 0, f"edge {e}: its weights do not reach out-node {j}"
        assert not y[..., torch.arange(n_out) != j].any(), f"edge {e}: its weights reach other out-nodes than {j}"
        torch.testing.assert_close(case.fn(W, bias, other), y, msg=f"edge {e}: depends on other in-nodes than {i}")


def _per_sample(kind, case: KindCase, x, R) -> torch.Tensor:
    return kind.per_sample_grad(case.op, x, R, case.n_in, case.n_out).reshape(B, *case.W.shape)


def check_per_sample_grad(kind, case: KindCase) -> None:
    module = _Fn(case)
    R = torch.randn_like(module(case.x))  # the out-layer's g
    want = per_sample_grads(module, case.x, R, _weighted)
    got = _per_sample(kind, case, case.x, R)
    if case.op.padding_idx is not None:
        want["weight"][:, case.op.padding_idx] = 0  # nn.Embedding's padding row gets no gradient
    torch.testing.assert_close(got, want["weight"], rtol=1e-12, atol=1e-12)
    if case.bias is not None:
        torch.testing.assert_close(kind.bias_grad(case.op, R), want["bias"], rtol=1e-12, atol=1e-12)


def check_permutation(kind, case: KindCase, seed: int = 0) -> None:
    """Permuting in-neurons by p_in and out-neurons by p_out: the permuted weight on the permuted input gives
    the permuted output, and the per-sample gradient of the permuted op is the permuted gradient."""
    g = torch.Generator().manual_seed(seed)
    p_out = torch.randperm(case.n_out, generator=g)
    if case.n_in == case.n_out and kind.num_edges(case.op, case.n_in, case.n_out) == case.n_out:
        p_in = p_out  # edge i -> i: one neuron on both sides
    else:
        p_in = torch.randperm(case.n_in, generator=g) if case.dense_input else torch.arange(case.n_in)
    x_p = case.x[..., p_in] if case.dense_input else case.x
    W_p = kind.permute_weight(case.op, case.W, p_in, p_out, 0)
    bias_p = None if case.bias is None else case.bias[p_out]
    y = case.fn(case.W, case.bias, case.x)
    torch.testing.assert_close(case.fn(W_p, bias_p, x_p), y[..., p_out], msg="the permuted op is not the same function")
    R = torch.randn_like(y)
    got = _per_sample(kind, case, x_p, R[..., p_out])
    want = kind.permute_weight(case.op, _per_sample(kind, case, case.x, R), p_in, p_out, 1)
    torch.testing.assert_close(got, want, msg="per-sample gradients do not permute like the weight")


@pytest.mark.parametrize("name", CASES)
def test_edges_match_theta_layout_and_function(name):
    case = CASES[name]
    check_edges(kind_of(case.op), case)


@pytest.mark.parametrize("name", CASES)
def test_per_sample_grad_matches_the_oracle(name):
    case = CASES[name]
    check_per_sample_grad(kind_of(case.op), case)


@pytest.mark.parametrize("name", CASES)
def test_permutation_acts_like_on_the_function(name):
    case = CASES[name]
    check_permutation(kind_of(case.op), case)


def test_every_registered_kind_has_a_case():
    assert {c.op.kind for c in CASES.values()} == set(KINDS)


def test_registry_codes_are_stable():
    assert [(k.name, k.code) for k in KINDS.values()] == [
        ("linear", 0), ("conv", 1), ("diag", 2), ("embedding", 3), ("transposed_linear", 4)]
    assert num_kinds() == len(KINDS) and all(KINDS[name].name == name for name in KINDS)
    with pytest.raises(UnknownNameError, match="not a registered op kind"):
        kind_of(_op("no_such_kind"))
    with pytest.raises(ValueError, match="taken"):
        register_kind(type("Again", (LinearKind,), {"name": "linear"}))
    assert num_kinds() == 5


# -- negative tests: the checks above catch a kind that is wrong in one place -------------------------------
class _WrongThetaLayout(TransposedLinearKind):
    """A transposed linear that forgot its weight is [n_in, n_out] in its canonical layout."""

    theta_index = OpKind.theta_index


class _WrongPermutation(TransposedLinearKind):
    """A transposed linear that permutes its axes as a plain linear does."""

    permute_weight = OpKind.permute_weight


class _WrongGradient(TransposedLinearKind):
    """A transposed linear whose per-sample gradient is the plain linear one, [b, n_out, n_in], read as
    [b, n_in, n_out]."""

    per_sample_grad = OpKind.per_sample_grad


def test_broken_kinds_are_detected():
    square = replace(CASES["transposed_linear"], n_in=4, W=torch.randn(4, 4, dtype=torch.float64),
                     x=torch.randn(B, T, 4, dtype=torch.float64))
    for case in (CASES["transposed_linear"], square):
        with pytest.raises(AssertionError, match="disagree"):
            check_edges(_WrongThetaLayout(), case)
        with pytest.raises(AssertionError):
            check_per_sample_grad(_WrongGradient(), case)
    with pytest.raises(AssertionError):
        check_permutation(_WrongPermutation(), square)
    for check in (check_edges, check_per_sample_grad, check_permutation):  # the right kind passes all three
        check(TransposedLinearKind(), square)


# -- a transposed linear inside a graph ------------------------------------------------------------------------
def _transposed_graph(seed=0):
    """An MLP's graph with its first layer stored transposed: the spec dict is edited (kind, parameter shape) and
    the features stay, since ``x W^T`` and ``x (W^T)`` are one function."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    graph = gradgraph.capture(model, x, y, lambda out, t: ((out - t) ** 2).sum(1))
    d = graph.to_dict()
    d["spec"]["ops"][0]["kind"] = "transposed_linear"
    d["spec"]["params"][0]["shape"] = d["spec"]["params"][0]["shape"][::-1]
    return model, graph, GradientGraph.from_dict(d)


def test_transposed_linear_in_a_graph():
    model, graph, tgraph = _transposed_graph()
    name = tgraph.spec.ops[0].weight.name
    want = graph.per_sample_grads()
    got = tgraph.per_sample_grads()
    torch.testing.assert_close(got[name], want[name].transpose(1, 2), rtol=0, atol=0)
    assert tgraph.op_kind[0] == 4 and tgraph.summary().count("transposed_linear") == 1
    # edges read the transposed weight
    tgraph.materialize_edges()
    Wt = model[0].weight.detach().T
    theta = tgraph.params_to_graph({**{n: p.detach() for n, p in model.named_parameters()}, name: Wt})
    sel = tgraph.edge_op[tgraph.wentry_edge] == 0
    src, dst = tgraph.edge_index[:, tgraph.wentry_edge[sel]]
    op = tgraph.spec.ops[0]
    out_start = tgraph.spec.layers[op.out_layer].node_start
    torch.testing.assert_close(theta[tgraph.wentry_theta[sel]], Wt[src, dst - out_start])
    # a symmetry moves the transposed weight's columns with the hidden layer
    s = gradgraph.random_symmetry(tgraph, generator=torch.Generator().manual_seed(1))
    moved = gradgraph.apply_symmetry(got, s, batch_dims=1)
    p = s.perm_of_layer(op.out_layer)
    assert not torch.equal(p, torch.arange(p.numel()))
    torch.testing.assert_close(moved[name], got[name][:, :, p])


@pytest.mark.parametrize("make", [lambda: GradMetaNet(8, 2, "param", 2, edge_messages=True, head_init="fisher"),
                                  lambda: GradMetaNetPlusPlus(8, 1, "param", 2, bilinear_channels=2),
                                  lambda: WeightSpaceGMN(8, 2, "param", 2)])
def test_metanetworks_decode_a_transposed_weight_transposed(make):
    """With the kind embedding rows of linear and transposed_linear made equal, every head sees the same
    function: the transposed op's output is the linear op's output, transposed (heads, moments, edge messages,
    kernel coordinates and theta layout all come from the kind)."""
    _, graph, tgraph = _transposed_graph()
    torch.manual_seed(0)
    net = make().double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Embedding) and m.num_embeddings == num_kinds():
                m.weight[KINDS["transposed_linear"].code] = m.weight[KINDS["linear"].code]
        want, got = graph.graph_to_params(net(graph)), tgraph.graph_to_params(net(tgraph))
    name = graph.spec.ops[0].weight.name
    for k in want:
        torch.testing.assert_close(got[k], want[k].transpose(0, 1) if k == name else want[k], rtol=1e-10, atol=1e-12)
