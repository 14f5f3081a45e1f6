"""random_symmetry / apply_symmetry: function preservation, the capture property, and negative tests."""
import pytest
import torch
from cases import ALL_CASES, make
from conftest import assert_tensors_close
from torch import nn

import gradgraph
from gradgraph import oracle
from gradgraph.graph import random_symmetry as graph_random_symmetry
from gradgraph.graph.kinds import KINDS
from gradgraph.models import GPT


def _out(model, inputs):
    return model(inputs)


def _drawn(case, seed=0):
    """A random symmetry that moves something (tiny spaces can draw the identity by chance)."""
    for k in range(50):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        s = gradgraph.random_symmetry(case.model, generator=g, example_inputs=case.inputs)
        if not s.is_identity():
            return s
    raise AssertionError(f"{case.name}: 50 draws were all the identity; a test on it would check nothing")


@pytest.mark.parametrize("family,seed", ALL_CASES)
def test_symmetry_preserves_the_function(family, seed):
    c = make(family, seed)
    s = _drawn(c)
    assert not s.is_identity(), "every family has a permutable hidden space; the draw must move something"
    permuted = gradgraph.apply_symmetry(c.model, s)
    torch.testing.assert_close(_out(permuted, c.inputs), _out(c.model, c.inputs), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("family,seed", ALL_CASES)
def test_capture_commutes_with_symmetry(family, seed):
    c = make(family, seed)
    s = _drawn(c, seed + 1)
    assert not s.is_identity()
    graph = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    permuted = gradgraph.capture(gradgraph.apply_symmetry(c.model, s), c.inputs, c.targets, c.loss_fn)
    torch.testing.assert_close(permuted.entry_x, gradgraph.apply_symmetry(graph, s).entry_x, rtol=1e-9, atol=1e-10)
    # and the permuted gradients are the permuted gradients
    assert_tensors_close(permuted.per_sample_grads(),
                         gradgraph.apply_symmetry(graph.per_sample_grads(), s, batch_dims=1))


def _break_one_op(params, sym, op_index):
    """Apply ``sym`` everywhere except on the input side of one op: a permutation whose coupling is broken."""
    spec = sym.spec
    moved = gradgraph.apply_symmetry(params, sym)
    op = spec.ops[op_index]
    sl = slice(*op.weight.rows) if op.weight.rows else slice(None)
    keep_in = torch.arange(spec.layers[op.in_layer].size)
    moved[op.weight.name][sl] = KINDS[op.kind].permute_weight(op, params[op.weight.name][sl], keep_in,
                                                               sym.perm_of_layer(op.out_layer), 0)
    return moved


@pytest.mark.parametrize("family", ["mlp", "cnn", "gpt", "transformer_encoder"])
def test_broken_coupling_is_detected(family):
    """Negative test: permuting a hidden space on one side of a weight but not the other changes the
    function and breaks the capture property, so the two tests above can fail."""
    c = make(family, 0)
    s = _drawn(c, 3)
    assert not s.is_identity()
    spec = s.spec
    # an op whose input space is permutable and actually moved
    k = next(i for i, op in enumerate(spec.ops) if op.kind in ("linear", "conv")
             and not torch.equal(s.perm_of_layer(op.in_layer), torch.arange(spec.layers[op.in_layer].size)))
    params = {n: p.detach() for n, p in c.model.named_parameters()}
    broken = _break_one_op(params, s, k)
    model = make(family, 0).model
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(broken[n])
    assert not torch.allclose(model(c.inputs), c.model(c.inputs), atol=1e-6)
    graph = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    wrong = gradgraph.capture(model, c.inputs, c.targets, c.loss_fn)
    assert not torch.allclose(wrong.entry_x, gradgraph.apply_symmetry(graph, s).entry_x, atol=1e-6)


class PerNeuronScale(nn.Module):
    """A hidden layer multiplied by a fixed per-neuron buffer: its neurons are NOT exchangeable."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 5))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.tanh(self.a(x)) * self.scale)))


class UnknownOp(nn.Module):
    """cumsum across neurons is not permutation-equivariant; the tracer does not know it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.cumsum(self.a(x), -1))))


@pytest.mark.parametrize("cls,fixed,free", [(PerNeuronScale, "a.out", "b.out"), (UnknownOp, "a.out", "b.out")])
def test_spaces_the_tracer_cannot_prove_are_fixed(cls, fixed, free):
    torch.manual_seed(0)
    m = cls().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    s = gradgraph.random_symmetry(m, generator=torch.Generator().manual_seed(1), example_inputs=x)
    assert not torch.equal(s.perms[free], torch.arange(4)), "the draw must move the free space"
    spaces = {sp.key: sp for sp in s.spec.spaces}
    assert not spaces[fixed].permutable and spaces[fixed].reason
    assert spaces[free].permutable
    torch.testing.assert_close(gradgraph.apply_symmetry(m, s)(x), m(x))
    # negative: permuting the fixed space anyway changes the function
    s.perms[fixed] = torch.tensor([1, 0, 2, 3, 4])
    assert not torch.allclose(gradgraph.apply_symmetry(m, s)(x), m(x))


def test_attention_heads_are_discovered():
    gpt = GPT(vocab_size=7, block_size=4, d_model=8, n_heads=2, n_layers=2)
    spec = gradgraph.random_symmetry(gpt).spec
    keys = {s.key: s for s in spec.spaces}
    assert keys["blocks.0.attn.q.out"].heads == 2 and keys["blocks.0.attn.v.out"].heads == 2
    assert keys["blocks.0.attn.q.out"].heads_permutable
    assert keys["blocks.0.attn.q.out"].head_group == keys["blocks.0.attn.v.out"].head_group
    assert "blocks.0.attn.k.out" not in keys  # tied to q
    residual = [lay for lay in spec.layers if spec.spaces[lay.space].key == "tok.out"]
    assert len(residual) >= 2 * 4  # every block's LayerNorms and output projections share the stream
    assert keys["tok.out"].permutable and not keys["head.out"].permutable


def test_single_head_attention_keeps_its_symmetry():
    gpt = GPT(vocab_size=7, block_size=4, d_model=4, n_heads=1, n_layers=1)
    keys = {s.key: s for s in gradgraph.random_symmetry(gpt).spec.spaces}
    assert keys["blocks.0.attn.q.out"].permutable and keys["blocks.0.attn.v.out"].permutable


def test_symmetry_acts_on_per_sample_gradients_and_channels():
    c = make("cnn", 1)
    s = _drawn(c)
    assert not s.is_identity()
    psg = oracle.per_sample_grads(c.model, c.inputs, c.targets, c.loss_fn)
    stacked = {k: torch.stack([v, 2 * v], -1) for k, v in psg.items()}  # a trailing channel dim
    once = gradgraph.apply_symmetry(stacked, s, batch_dims=1)
    assert any(not torch.equal(once[k], stacked[k]) for k in psg)  # the symmetry moved some gradients
    for k in psg:
        torch.testing.assert_close(once[k][..., 1], 2 * once[k][..., 0])
    back = gradgraph.apply_symmetry(once, s.inverse(), batch_dims=1)
    for k in psg:
        torch.testing.assert_close(back[k], stacked[k])


def test_symmetry_of_a_different_model_is_refused():
    a, b = make("mlp", 0), make("cnn", 0)
    s = _drawn(a)
    assert not s.is_identity()
    with pytest.raises(gradgraph.StructureMismatchError):
        gradgraph.apply_symmetry(gradgraph.capture(b.model, b.inputs, b.targets, b.loss_fn), s)
    with pytest.raises(gradgraph.StructureMismatchError):
        gradgraph.apply_symmetry({"nonexistent.weight": torch.zeros(2)}, s)


def test_random_symmetry_needs_inputs_for_a_plain_module():
    with pytest.raises(ValueError, match="example_inputs"):
        gradgraph.random_symmetry(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))


def test_same_generator_seed_same_symmetry():
    c = make("gpt", 1)
    s1, s2 = _drawn(c, 5), _drawn(c, 5)
    assert not s1.is_identity()
    assert all(torch.equal(s1.perms[k], s2.perms[k]) for k in s1.perms)


def test_the_graph_stage_refuses_a_module_and_points_to_the_top_level():
    """graph/ does not trace modules (that is capture's job): gradgraph.random_symmetry does."""
    c = make("mlp", 0)
    with pytest.raises(TypeError, match=r"gradgraph\.random_symmetry"):
        graph_random_symmetry(c.model)
    spec = gradgraph.random_symmetry(c.model, example_inputs=c.inputs).spec
    s = graph_random_symmetry(spec, generator=torch.Generator().manual_seed(0))
    assert not s.is_identity() and s.spec is spec


def test_a_symmetry_refuses_another_models_tensors():
    from gradgraph.models import MLP

    a, b = MLP(3, (4,), 2), MLP(3, (5,), 2)  # the same parameter names, other shapes
    s = gradgraph.random_symmetry(a, example_inputs=torch.randn(2, 3))
    assert not s.is_identity()
    with pytest.raises(gradgraph.StructureMismatchError, match=r"\(5, 3\).*\(4, 3\)"):
        gradgraph.apply_symmetry(b, s)
    with pytest.raises(gradgraph.StructureMismatchError, match=r"'net.0.weight' has shape \(5, 3\)"):
        gradgraph.apply_symmetry(dict(b.named_parameters()), s)
    moved = gradgraph.apply_symmetry(dict(a.named_parameters()), s)  # its own model: fine
    assert moved["net.0.weight"].shape == (4, 3)
