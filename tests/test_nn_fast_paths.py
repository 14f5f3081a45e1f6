"""The fast paths of GradMetaNet's parameter head against the direct computation they replace: the moment
terms from their factors (``_GenericMoments``) against each kind's materialized ``moments`` and the output maps
applied to the scaled terms, and the contiguous-row writes against the indexed scatter."""
import pytest
import torch
from cases import make
from torch_geometric.loader import DataLoader

import gradgraph
from gradgraph.graph.kinds import kind_of
from gradgraph.nn import GradMetaNet
from gradgraph.nn.encoding import raw_monomials
from gradgraph.nn.layout import BatchLayout, StructureGroup

FAMILIES = ["mlp", "cnn", "gpt", "transformer_encoder"]


def _graph(family, batch):
    c = make(family, 0)
    graphs = [gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)]
    if batch == "uniform":
        graphs = graphs * 3
    elif batch == "mixed":
        d = make("mlp", 1)
        graphs = graphs + [gradgraph.capture(d.model, d.inputs, d.targets, d.loss_fn)] + graphs
    return graphs[0] if batch == "single" else next(iter(DataLoader(graphs, batch_size=len(graphs))))


def _net():
    torch.manual_seed(0)
    net = GradMetaNet(hidden_channels=8, num_layers=2, out_channels=3, bilinear_channels=3).double()
    with torch.no_grad():
        for p in net.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(0, 0.3)
    return net


def _reference_moments(m, layout, h):
    """MomentTerms.compute written out directly: materialized (paired, factorized) terms, scales observed on
    the concatenated [P, C] terms, output maps applied to the scaled terms."""
    r = m.raw_scale(raw_monomials(layout.graph.entry_x.to(h.dtype), layout.graph.entry_mask))
    phi, psi = m.phi_r(r) * (1 + m.phi_h(h)), m.psi_r(r) * (1 + m.psi_h(h))
    one = h.new_tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    psi_bias = m.psi_r(one / m.raw_scale.scale(one))[0]
    pairs, biases = {}, {}
    for gi, group in enumerate(layout.groups):
        for k, op in enumerate(group.spec.ops):
            if group.spec.theta_range(op.weight) is not None:
                pairs[gi, k] = kind_of(op).moments(group, op, phi, psi)
            if group.spec.theta_range(op.bias) is not None:
                lay = group.spec.layers[op.out_layer]
                X = group.block(phi, lay, "g")
                biases[gi, k] = X.reshape(group.size, -1, lay.size, X.shape[-1]).sum(1) / X.shape[1] * psi_bias
    flat = lambda ts: [t.reshape(-1, t.shape[-1]) for t in ts]  # noqa: E731
    m.paired_scale.observe(torch.cat(flat([t[0] for t in pairs.values()]) + flat(biases.values())))
    if pairs:
        m.factorized_scale.observe(torch.cat(flat([t[1] for t in pairs.values()])))
    weights = {key: m.paired_out(p / m.paired_scale.scale(p)) + m.factorized_out(f / m.factorized_scale.scale(f))
               for key, (p, f) in pairs.items()}
    return weights, {key: m.bias_out(t / m.paired_scale.scale(t)) for key, t in biases.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", ["single", "uniform", "mixed"])
@pytest.mark.parametrize("training", [False, True])
def test_moment_terms_equal_the_materialized_computation(family, batch, training):
    g = _graph(family, batch)
    layout = BatchLayout(g)
    fast, ref = _net().head.moments.train(training), _net().head.moments.train(training)
    h = torch.randn(layout.num_entries, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(3, dtype=torch.float64)
    with torch.no_grad():
        w_fast, b_fast = fast.compute(layout, h, weight_bias=bias)
        w_ref, b_ref = _reference_moments(ref, layout, h)
    assert w_fast.keys() == w_ref.keys() and b_fast.keys() == b_ref.keys() and w_fast
    for key in w_ref:
        torch.testing.assert_close(w_fast[key], w_ref[key] + bias, rtol=1e-10, atol=1e-12)
    for key in b_ref:
        torch.testing.assert_close(b_fast[key], b_ref[key], rtol=1e-10, atol=1e-12)
    for name in ("raw_scale", "paired_scale", "factorized_scale"):  # the same running statistics
        torch.testing.assert_close(getattr(fast, name).mean_square, getattr(ref, name).mean_square, rtol=1e-10, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", ["single", "uniform"])
def test_contiguous_row_writes_equal_the_indexed_scatter(family, batch, monkeypatch):
    g = _graph(family, batch)
    net = _net().eval()
    with torch.no_grad():
        fast = net(g)
        monkeypatch.setattr(StructureGroup, "param_rows", lambda self, out, op, bias=False: None)
        slow = net(g)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_the_layout_structure_is_cached_per_spec():
    g = _graph("mlp", "single")
    a, b = BatchLayout(g), BatchLayout(g)
    assert a._structure is b._structure and a.groups[0].theta_index(g.spec.ops[0]) is \
        b.groups[0].theta_index(g.spec.ops[0])
