"""Weight sharing: a parameter used by several ops (a module called twice, tied input and output embeddings,
a weight used transposed) is one parameter with several uses. Its per-sample gradient is the sum over the
uses (checked against the torch.func oracle), and its axes tie the neuron spaces of the uses, so a symmetry
acts on every use alike (a broken one, permuting one use only, changes the function)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_tensors_close
from torch import nn

import gradgraph
from gradgraph.api import model_spec
from gradgraph.losses import per_sample_cross_entropy, per_sample_mse
from gradgraph.oracle import grads, per_sample_grads

D = torch.float64


class CalledTwice(nn.Module):
    """One hidden layer applied twice (a weight-tied residual block)."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.mid(h))
        h = h + torch.tanh(self.mid(h))
        return self.out(h)


class TiedLM(nn.Module):
    """Embedding and output layer share one table; the head uses it through F.linear in a custom module."""

    def __init__(self, V=7, d=4):
        super().__init__()
        self.emb, self.mix = nn.Embedding(V, d), nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


class Autoencoder(nn.Module):
    """A decoder whose weight is the encoder's, used transposed (x @ W)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.dec = TransposedDecoder(self.enc)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class TransposedDecoder(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = [enc]  # not a submodule: the weight belongs to the encoder
        self.bias = nn.Parameter(torch.randn(4) / 10)

    def forward(self, h):
        return h @ self.enc[0].weight + self.bias


@gradgraph.register_rule(TransposedDecoder)
def _decoder_rule(ctx, m, h):
    return ctx.linear(h, m.enc[0].weight, m.bias, transposed=True)


def _cases():
    torch.manual_seed(0)
    ids = torch.randint(7, (3, 5))
    return {
        "called_twice": (CalledTwice().double(), torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D),
                         per_sample_mse),
        "tied_lm": (TiedLM().double(), ids, torch.randint(7, (3, 5)),
                    lambda o, t: F.cross_entropy(o.transpose(1, 2), t, reduction="none").sum(1)),
        "transposed_use": (Autoencoder().double(), torch.randn(4, 4, dtype=D), torch.randn(4, 4, dtype=D),
                           per_sample_mse),
    }


def _moving_symmetry(model, x):
    for k in range(50):
        s = gradgraph.random_symmetry(model, generator=torch.Generator().manual_seed(k), example_inputs=x)
        if not s.is_identity():
            return s
    raise AssertionError("nothing permutable")


@pytest.mark.parametrize("name", ["called_twice", "tied_lm", "transposed_use"])
def test_shared_parameters_are_exact_and_symmetric(name):
    model, x, y, loss = _cases()[name]
    g = gradgraph.capture(model, x, y, loss)
    assert_tensors_close(g.per_sample_grads(), per_sample_grads(model, x, y, loss), rtol=1e-9)
    assert_tensors_close(g.grads(), grads(model, x, y, loss), rtol=1e-9)
    users = {}
    for op in g.spec.ops:
        if op.weight is not None:
            users.setdefault(op.weight.name, []).append(op.name)
    assert max(len(u) for u in users.values()) == 2  # one parameter, two uses
    s = _moving_symmetry(model, x)
    moved = gradgraph.apply_symmetry(model, s)
    torch.testing.assert_close(moved(x), model(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gradgraph.capture(moved, x, y, loss).entry_x, gradgraph.apply_symmetry(g, s).entry_x,
                               rtol=1e-9, atol=1e-12)


def test_a_module_called_twice_ties_its_input_and_output():
    """mid's weight maps the stream to itself twice: both uses share the stream's space, which stays free."""
    model, x, _, _ = _cases()["called_twice"]
    spec = model_spec(model, x)
    ops = {op.name: op for op in spec.ops}
    assert {"mid", "mid#2"} <= set(ops)
    sp = {li: spec.layers[li].space for op in ops.values() for li in (op.in_layer, op.out_layer)}
    assert sp[ops["mid"].in_layer] == sp[ops["mid#2"].in_layer] and spec.spaces[sp[ops["mid"].in_layer]].permutable


def test_permuting_one_use_only_breaks_the_function():
    """Negative: untie the two uses of mid (give its second use's output space another permutation)."""
    model, x, _, _ = _cases()["called_twice"]
    s = _moving_symmetry(model, x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    moved = gradgraph.apply_symmetry(params, s)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    while torch.equal(perm, torch.arange(5)):
        perm = torch.randperm(5)
    broken = dict(moved)
    broken["mid.weight"] = moved["mid.weight"][perm]  # rows permuted for one use, not for the other
    broken["mid.bias"] = moved["mid.bias"][perm]
    out = torch.func.functional_call(model, broken, (x,))
    assert not torch.allclose(out, model(x), rtol=1e-6)


def test_tied_embedding_keeps_one_parameter():
    model, ids, y, loss = _cases()["tied_lm"]
    g = gradgraph.capture(model, ids, y, loss)
    assert [p.name for p in g.spec.params].count("emb.weight") == 1 and "head.weight" not in g.spec.param_by_name
    assert per_sample_cross_entropy is not None
