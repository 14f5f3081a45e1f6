"""GradMetaNet, GradMetaNet++ and the baselines: equivariance (with negative tests), batching, decoding,
exactness of the weight-gradient-shaped head, and cost."""
import pytest
import torch
from cases import make
from torch.overrides import TorchFunctionMode
from torch_geometric.loader import DataLoader

import gradgraph
from gradgraph.graph import node_permutation
from gradgraph.nn import GradMetaNet, GradMetaNetPlusPlus
from gradgraph.nn.baselines import BatchAsymmetric, MLPConcat, NeuronAsymmetric, WeightSpaceGMN
from gradgraph.nn.layout import BatchLayout

FAMILIES = ["mlp", "cnn", "gpt", "transformer_encoder"]
LEVELS = ["param", "node", "graph"]


def _graphs(family, seed=1):
    """A graph, the graph of the same batch with samples reordered, a symmetry and the permuted model's graph."""
    c = make(family, seed)
    g = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    perm = torch.randperm(c.inputs.shape[0], generator=torch.Generator().manual_seed(seed))
    g_perm = gradgraph.capture(c.model, c.inputs[perm], c.targets[perm], c.loss_fn)
    for k in range(20):  # a symmetry that moves something
        s = gradgraph.random_symmetry(g, generator=torch.Generator().manual_seed(100 * seed + k))
        if not s.is_identity():
            break
    assert not s.is_identity(), f"{family}: 20 draws were all the identity; the equivariance check would be vacuous"
    g_sym = gradgraph.capture(gradgraph.apply_symmetry(c.model, s), c.inputs, c.targets, c.loss_fn)
    return g, g_perm, s, g_sym


@torch.no_grad()
def _errors(net, level, g, g_perm, s, g_sym):
    """(error under sample reordering, error under the neuron symmetry), relative to the output scale."""
    out = net(g)
    scale = float(out.detach().abs().max()) + 1e-30
    e_sample = float((net(g_perm) - out).abs().max()) / scale
    out_sym = net(g_sym)
    if level == "param":
        want = gradgraph.apply_symmetry(g.graph_to_params(out), s)
        got = g.graph_to_params(out_sym)
        e_neuron = max(float((got[k] - want[k]).abs().max()) for k in want) / scale
    elif level == "node":
        e_neuron = float((out_sym - out[node_permutation(g.spec, s)]).abs().max()) / scale
    else:
        e_neuron = float((out_sym - out).abs().max()) / scale
    return e_sample, e_neuron


def _net(cls, level, **kw):
    """In eval mode: the parameter head's running scale of raw gradients is a dataset statistic (like
    BatchNorm's), updated from the batch in training mode."""
    torch.manual_seed(0)
    net = cls(hidden_channels=16, num_layers=2, out_level=level, out_channels=2, **kw).double().eval()
    with torch.no_grad():  # zero-initialized branches would be trivially equivariant: give them weights
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return net


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cls", [GradMetaNet, GradMetaNetPlusPlus])
@pytest.mark.parametrize("level", LEVELS)
def test_equivariant_models(cls, family, level):
    e_sample, e_neuron = _errors(_net(cls, level), level, *_graphs(family))
    assert e_sample < 1e-6 and e_neuron < 1e-6


@pytest.mark.parametrize("family", ["cnn", "gpt"])
def test_gradmetanet_plus_plus_with_moment_terms_is_equivariant(family):
    e_sample, e_neuron = _errors(_net(GradMetaNetPlusPlus, "param", bilinear_channels=4), "param", *_graphs(family))
    assert e_sample < 1e-6 and e_neuron < 1e-6


def test_space_normalization_keeps_equivariance():
    e_sample, e_neuron = _errors(_net(GradMetaNet, "param", norm_by="space"), "param", *_graphs("gpt"))
    assert e_sample < 1e-6 and e_neuron < 1e-6


def test_space_and_layer_scales_differ_only_where_spaces_span_layers():
    from gradgraph.nn.encoding import scale_normalize

    g = _graphs("gpt")[0]
    layout = BatchLayout(g)
    by_layer, by_space = scale_normalize(g, layout, "layer")[0], scale_normalize(g, layout, "space")[0]
    single = torch.tensor([sum(lay.space == lay2.space for lay2 in g.spec.layers) == 1 for lay in g.spec.layers])
    entry_single = single[g.node_layer[g.entry_node]]
    torch.testing.assert_close(by_layer[entry_single], by_space[entry_single])
    assert not torch.allclose(by_layer[~entry_single], by_space[~entry_single])


@pytest.mark.parametrize("family", ["mlp", "gpt"])
def test_layer_pooled_graph_head_is_invariant(family):
    e_sample, e_neuron = _errors(_net(GradMetaNet, "graph", graph_pool="layer"), "graph", *_graphs(family))
    assert e_sample < 1e-6 and e_neuron < 1e-6


def test_layer_pooled_graph_head_weighs_every_layer_equally():
    """pool="layer" is the mean over layers of each layer's mean node embedding (checked on a batch of two
    graphs against a loop), and differs from the node mean where layers have different sizes."""
    from torch_geometric.data import Batch

    from gradgraph.nn import GraphHead

    g = _graphs("mlp")[0]
    batch = Batch.from_data_list([g, g])
    layout = BatchLayout(batch)
    torch.manual_seed(0)
    u = torch.randn(layout.num_nodes, 4, dtype=torch.float64)
    head = GraphHead(4, 3, pool="layer").double()
    got = head(u, layout)
    n = g.num_nodes
    for k in range(2):
        uk, layer = u[k * n:(k + 1) * n], g.node_layer
        pooled = torch.stack([uk[layer == lay].mean(0) for lay in layer.unique()]).mean(0)
        torch.testing.assert_close(got[k], head.mlp(pooled))
    mean_head = GraphHead(4, 3, pool="mean").double()
    mean_head.load_state_dict(head.state_dict())
    assert not torch.allclose(mean_head(u, layout), got)
    with pytest.raises(ValueError, match="pool must be one of"):
        GraphHead(4, 3, pool="max")


def test_edge_messages_keep_equivariance():
    e_sample, e_neuron = _errors(_net(GradMetaNet, "param", edge_messages=True), "param", *_graphs("gpt"))
    assert e_sample < 1e-6 and e_neuron < 1e-6


def test_broken_coupling_is_detected(monkeypatch):
    """Negative test: giving permutable neurons a position identifier breaks neuron equivariance, and the
    check above sees it (while sample invariance survives)."""
    from gradgraph.nn import encoding

    def broken(self, graph):
        layer = encoding.sinusoidal(graph.node_depth, self.dim)
        neuron = encoding.sinusoidal(graph.node_pos, self.dim)  # no mask: hidden neurons get an identity
        return torch.cat([layer, neuron, self.role(graph.node_role).float()], -1).to(self.role.weight.dtype)

    monkeypatch.setattr(encoding.NodeEncoding, "forward", broken)
    e_sample, e_neuron = _errors(_net(GradMetaNet, "param"), "param", *_graphs("mlp"))
    assert e_sample < 1e-6 and e_neuron > 1e-3


@pytest.mark.parametrize("family", ["mlp", "cnn", "gpt"])
def test_baselines_fail_exactly_the_symmetries_they_lack(family):
    g, g_perm, s, g_sym = _graphs(family)
    b = g.num_samples
    expect = {  # (sample-invariant, neuron-equivariant)
        "mlp-concat": (MLPConcat(16, 2, "param", 2), False, False),
        "neuron-asym": (NeuronAsymmetric(16, 2, "param", 2), True, False),
        "batch-asym": (BatchAsymmetric(16, 2, "param", 2), False, True),
        "gmn-average": (WeightSpaceGMN(16, 2, "param", 2, "average"), True, True),
        "gmn-concat": (WeightSpaceGMN(16, 2, "param", 2, "concat", set_size=b), False, True),
    }
    for name, (net, sample_ok, neuron_ok) in expect.items():
        torch.manual_seed(0)
        e_sample, e_neuron = _errors(net.double(), "param", g, g_perm, s, g_sym)
        assert (e_sample < 1e-6) == sample_ok, (name, e_sample)
        assert (e_neuron < 1e-6) == neuron_ok, (name, e_neuron)


@pytest.mark.parametrize("cls", [GradMetaNet, GradMetaNetPlusPlus])
def test_mixed_batch_equals_each_graph_alone(cls):
    graphs = [_graphs(f)[0] for f in ("mlp", "cnn", "gpt", "transformer_encoder", "mlp")]
    graphs[-1] = gradgraph.capture(make("mlp", 2).model, *[t for t in (make("mlp", 2).inputs, make("mlp", 2).targets)],
                                   make("mlp", 2).loss_fn)
    for level in LEVELS:
        net = _net(cls, level)
        batch = next(iter(DataLoader(graphs, batch_size=len(graphs))))
        out = net(batch)
        alone = torch.cat([net(g) for g in graphs])
        torch.testing.assert_close(out, alone, rtol=1e-9, atol=1e-12)
    decoded = batch.graph_to_params(_net(cls, "param")(batch))
    assert [set(d) for d in decoded] == [set(g.per_sample_grads()) for g in graphs]


def test_decoded_outputs_are_parameter_shaped():
    c = make("cnn", 0)
    g = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    shapes = {n: p.shape for n, p in c.model.named_parameters()}
    one = g.graph_to_params(_net(GradMetaNet, "param").__class__(16, 2, "param", 1).double()(g))
    assert {k: v.shape for k, v in one.items()} == shapes
    three = g.graph_to_params(GradMetaNet(16, 2, "param", 3).double()(g))
    assert {k: v.shape for k, v in three.items()} == {k: (*s, 3) for k, s in shapes.items()}
    assert GradMetaNet(16, 2, "node", 4).double()(g).shape == (g.num_nodes, 4)
    assert GradMetaNet(16, 2, "graph", 5).double()(g).shape == (1, 5)


def _exact_head(which):
    """A GradMetaNet whose output is exactly the bilinear term with phi = g^p, psi = a^p."""
    net = GradMetaNet(8, 2, "param", 1, bilinear_channels=1).double().eval()
    head = net.head
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        col_a, col_g = (0, 1) if which == "gradient" else (2, 3)  # raw monomials: a, g, a^2, g^2, ...
        head.moments.psi_r.weight[0, col_a] = 1
        head.moments.phi_r.weight[0, col_g] = 1
        head.moments.paired_out.weight.fill_(1)
        head.moments.bias_out.weight.fill_(1)  # factorized_out stays zero: that term is off
    return net  # in eval mode every running scale is still 1


@pytest.mark.parametrize("family", ["mlp", "cnn", "gpt", "transformer_encoder", "conv1d", "residual"])
def test_bilinear_head_reproduces_the_batch_gradient(family):
    c = make(family, 0)
    g = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    got = g.graph_to_params(_exact_head("gradient")(g))
    want = {k: v / g.num_samples for k, v in g.grads().items()}
    from conftest import assert_tensors_close

    assert_tensors_close(got, want, rtol=1e-9)


def test_head_starts_from_the_gradient_and_the_fisher():
    """At initialization, bilinear channel 0 is the batch gradient and channel 1 the empirical Fisher (in the
    running-scale units), whatever the other weights are."""
    c = make("siren", 1)
    g = gradgraph.capture(c.model, c.inputs)
    net = GradMetaNet(8, 2, "param", 1, bilinear_channels=3, head_init="fisher").double().eval()
    got = g.graph_to_params(net(g))  # eval mode: the running scales are 1, the output is channel 1 alone
    want = {k: v.pow(2).mean(0) for k, v in g.per_sample_grads().items()}
    from conftest import assert_tensors_close

    assert_tensors_close(got, want, rtol=1e-9)  # biases: mean of g^2, their Fisher


def test_running_scale_is_a_dataset_constant():
    net = GradMetaNet(8, 2, "param", 1)
    g = gradgraph.capture(make("mlp", 0).model.float(), make("mlp", 0).inputs.float())
    net(g)
    ms = net.head.moments.raw_scale.mean_square.clone()
    net.eval()
    net(g)
    assert torch.equal(ms, net.head.moments.raw_scale.mean_square)  # frozen in eval mode
    r = net.head.moments.raw_scale
    assert torch.allclose(r.mean_square[:5], torch.stack([g.entry_x[:, 0].pow(2).mean(), g.entry_x[:, 1].pow(2).mean(),
                          g.entry_x[:, 0].pow(4).mean(), g.entry_x[:, 1].pow(4).mean(),
                          (g.entry_x[:, 0] * g.entry_x[:, 1]).pow(2).mean()]))


def test_bilinear_head_reproduces_the_empirical_fisher_diagonal():
    c = make("siren", 0)
    g = gradgraph.capture(c.model, c.inputs)
    got = g.graph_to_params(_exact_head("fisher")(g))
    want = {k: v.pow(2).mean(0) for k, v in g.per_sample_grads().items()}
    from conftest import assert_tensors_close

    assert_tensors_close(got, want, rtol=1e-9)


def test_pairwise_head_matches_its_formula():
    """GradMetaNet++'s head on a linear op equals (1/b) sum_q W_o GELU(U x_q(j) + V x_q(i) + e) by brute force."""
    c = make("mlp", 0)
    g = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    net = GradMetaNetPlusPlus(8, 1, "param", 1).double()
    head = net.head
    head.chunk = 7  # exercise the chunked path
    layout = BatchLayout(g)
    h = torch.randn(g.entry_x.shape[0], 8, dtype=torch.float64)
    out = g.graph_to_params(head(h, layout))
    spec = g.spec
    op = spec.ops[0]
    lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
    A = h[lin.a.start:lin.a.start + lin.a.count].view(g.num_samples, lin.size, 8)
    G = h[lout.g.start:lout.g.start + lout.g.count].view(g.num_samples, lout.size, 8)
    e = head.kind.weight[0]
    want = torch.zeros(lout.size, lin.size, dtype=torch.float64)
    for j in range(lout.size):
        for i in range(lin.size):
            z = torch.nn.functional.gelu(head.U(G[:, j]) + head.V(A[:, i]) + e)
            want[j, i] = head.out(z).mean(0).squeeze()
    torch.testing.assert_close(out[op.weight.name], want)


class _LargestTensor(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_gradmetanet_never_builds_an_edges_by_set_tensor():
    """Cost: the largest tensor GradMetaNet creates (forward and backward) grows with entries x channels and
    parameters x channels, never parameters x set size."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
                                torch.nn.Linear(48, 4))
    f, pe = 16, 16
    net = GradMetaNet(f, 2, "param", 1, pe_dim=pe)
    widest = max(f, 8 + 3 * pe)  # the encoder's input: (a, g) features plus the node encoding
    for b in (16, 128):
        g = gradgraph.capture(model, torch.randn(b, 8))
        with _LargestTensor() as probe:
            net(g).sum().backward()
        E, P = g.entry_x.shape[0], g.num_params
        bound = 2 * max(E * widest, P * f)
        assert probe.largest <= bound, (b, probe.largest, E * widest, P * f)
    assert P * b * f > 2 * bound  # the bound would catch an edges x set x channels tensor


@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer_encoder"])
def test_dense_fast_path_equals_the_scatter_path(family, monkeypatch):
    """Uniform batches take reshape-and-sum pooling and dense attention; results equal the general path."""
    c = make(family, 0)
    graphs = [gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)] * 3
    batch = next(iter(DataLoader(graphs, batch_size=3)))
    assert BatchLayout(batch).uniform
    for cls in (GradMetaNet, GradMetaNetPlusPlus):
        net = _net(cls, "param").train()  # training mode: the running scale updates identically in both
        torch.manual_seed(1)
        fast = net(batch)
        monkeypatch.setattr(BatchLayout, "uniform", property(lambda self: False))
        net2 = _net(cls, "param").train()
        slow = net2(batch)
        monkeypatch.undo()
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def _calibrated_standardizing_net(family):
    """GradMetaNet with standardized log scales, calibrated on the graphs of four models of one architecture whose
    parameter tensors are rescaled at random (so that every layer's scale varies across them)."""
    from gradgraph.nn import calibrate_scales

    net = _net(GradMetaNet, "graph", standardize_scales=True)
    graphs = []
    for seed in range(4):
        c = make(family, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in c.model.parameters():
                p.mul_(float(torch.empty(()).uniform_(0.5, 2.0, generator=gen)))
        graphs.append(gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn))
    assert calibrate_scales(net, graphs) == 4
    return net.eval(), graphs


@pytest.mark.parametrize("family", ["mlp", "gpt"])
def test_standardized_log_scales_keep_invariance(family):
    net, _ = _calibrated_standardizing_net(family)
    assert bool(net.encoder.standardizer.frozen) and net.encoder.standardizer.count.sum() > 0
    e_sample, e_neuron = _errors(net, "graph", *_graphs(family))
    assert e_sample < 1e-6 and e_neuron < 1e-6


def test_standardization_keyed_by_neuron_breaks_invariance(monkeypatch):
    """Negative test: the same statistics looked up by neuron index (not by layer depth) are not invariant to
    neuron permutations, and the check above sees it."""
    net, _ = _calibrated_standardizing_net("mlp")
    std = net.encoder.standardizer
    forward = type(std).forward
    monkeypatch.setattr(type(std), "forward", lambda self, ls, depth, mask: forward(
        self, ls * (1 + torch.arange(ls.shape[0], dtype=ls.dtype)[:, None] % 7), depth, mask))
    assert _errors(net, "graph", *_graphs("mlp"))[1] > 1e-4


def test_standardized_log_scales_are_centred_and_scaled_per_layer():
    """Over the calibration graphs, each layer's standardized log scale has mean 0 and standard deviation 1,
    against the log scales computed graph by graph from ``scale_normalize``."""
    from gradgraph.nn.encoding import scale_normalize

    net, graphs = _calibrated_standardizing_net("mlp")
    std = net.encoder.standardizer
    per_graph, raw = [], []
    for g in graphs:
        layout = BatchLayout(g)
        log_scale = scale_normalize(g, layout)[1]
        depth = g.node_depth.index_select(0, g.entry_node)
        first = torch.stack([torch.nonzero(depth == d)[0, 0] for d in depth.unique()])  # one entry per layer
        per_graph.append(std(log_scale, depth, g.entry_mask)[first])
        raw.append((log_scale * g.entry_mask)[first])
    z, raw = torch.stack(per_graph), torch.stack(raw)  # [graphs, layers, 2]
    varies = raw.std(0, unbiased=False) > 1e-3  # channels whose scale differs between the four models
    assert varies.sum() >= 2
    torch.testing.assert_close(z.mean(0)[varies], torch.zeros(int(varies.sum()), dtype=z.dtype), atol=1e-9, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False)[varies], torch.ones(int(varies.sum()), dtype=z.dtype),
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("family,level", [("mlp", "param"), ("cnn", "graph"), ("gpt", "node")])
def test_gradmetanet_forward_compiles_into_one_graph(family, level):
    """Once its structure caches are filled (one eager call), the forward traces into a single torch.compile
    graph; CompiledForward's output equals the eager one (traced with the aot_eager backend: no codegen)."""
    import torch._dynamo

    from gradgraph.nn.compiled import CompiledForward

    g, _, _, _ = _graphs(family)
    net = _net(GradMetaNet, level)
    with torch.no_grad():
        want = net(g)
        explained = torch._dynamo.explain(net)(g)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        fwd = CompiledForward(net, backend="aot_eager")
        torch.testing.assert_close(fwd(g), want)  # the eager call of a new structure
        torch.testing.assert_close(fwd(g), want)  # compiled
    torch._dynamo.reset()
