"""Recurrent layers (capture/rules/recurrent.py): nn.RNN, nn.GRU and nn.LSTM unrolled over time, weight
sharing across the steps. The oracle is a per-sample autograd loop (one backward per sample: independent of
torch.func, which has no batching rule for the fused recurrent kernels), plus the zoo contract of
tests/test_zoo.py; negatives: a symmetry acting on one gate block only changes the function, and the variants
gradgraph does not capture are refused naming the module path and class."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_zoo import _moving_symmetry, check_model
from torch import nn

import gradgraph
from gradgraph.capture import CaptureSession

D = torch.float64


class Seq(nn.Module):
    def __init__(self, cls, batch_first=True, **kw):
        super().__init__()
        self.bf = batch_first
        self.rnn, self.head = cls(3, 4, batch_first=batch_first, **kw), nn.Linear(4, 2)

    def forward(self, x, h0=None):  # x: [b, T, 3]
        out = self.rnn(x if self.bf else x.transpose(0, 1), h0)[0]
        return self.head(out.mean(1 if self.bf else 0))


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def loop_grads(model, x, y, loss_fn):
    """Per-sample gradients by one autograd backward per sample: {name: [b, *shape]}."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    rows = [torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum(), params) for i in range(x.shape[0])]
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


CASES = {"rnn-2layers": (nn.RNN, dict(num_layers=2)), "rnn-relu-seqfirst": (nn.RNN, dict(nonlinearity="relu",
                                                                                            batch_first=False)),
         "gru-2layers": (nn.GRU, dict(num_layers=2)), "gru-nobias-seqfirst": (nn.GRU, dict(bias=False,
                                                                                          batch_first=False)),
         "lstm-2layers": (nn.LSTM, dict(num_layers=2)), "lstm-seqfirst": (nn.LSTM, dict(batch_first=False))}


@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_layers_are_exact_with_their_hidden_symmetry(case):
    cls, kw = CASES[case]
    torch.manual_seed(3)
    m = Seq(cls, **kw).double().eval()
    g_ = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 3, generator=g_, dtype=D), torch.randint(2, (3,), generator=g_)
    g = check_model(m, x, y, ce, ref=loop_grads(m, x, y, ce))
    steps = [op.name for op in g.spec.ops if op.weight.name == "rnn.weight_hh_l0"]
    assert len(steps) == 5  # one use of the recurrent weight per time step
    hidden = {g.spec.spaces[g.spec.layers[op.in_layer].space].key for op in g.spec.ops
              if op.weight.name == "rnn.weight_hh_l0"}
    assert len(hidden) == 1 and g.spec.spaces[[s.key for s in g.spec.spaces].index(hidden.pop())].permutable


def test_the_rule_computes_what_the_module_computes_with_an_initial_state():
    torch.manual_seed(4)
    for cls in (nn.RNN, nn.GRU, nn.LSTM):
        m = Seq(cls, num_layers=2).double().eval()
        x = torch.randn(3, 5, 3, dtype=D)
        h0 = torch.randn(2, 3, 4, dtype=D)
        hx = (h0, torch.randn(2, 3, 4, dtype=D)) if cls is nn.LSTM else h0
        with CaptureSession(m):
            got = m(x, hx)
        torch.testing.assert_close(got, m(x, hx), rtol=1e-12, atol=1e-14)


def test_a_symmetry_on_one_gate_block_changes_the_function():
    """Negative: the hidden units permuted in the input gate's rows only (not in the other gates and not in the
    recurrent weight's columns)."""
    torch.manual_seed(5)
    m = Seq(nn.LSTM).double().eval()
    x = torch.randn(3, 5, 3, dtype=D)
    s = _moving_symmetry(m, x)
    assert torch.allclose(gradgraph.apply_symmetry(m, s)(x), m(x), rtol=1e-9, atol=1e-12)
    broken = Seq(nn.LSTM).double().eval()
    broken.load_state_dict(m.state_dict())
    with torch.no_grad():
        p = torch.tensor([1, 0, 2, 3])
        broken.rnn.weight_ih_l0[:4] = m.rnn.weight_ih_l0[:4][p]
        broken.rnn.bias_ih_l0[:4] = m.rnn.bias_ih_l0[:4][p]
    assert not torch.allclose(broken(x), m(x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kw,what", [(dict(bidirectional=True), "bidirectional"), (dict(proj_size=2), "proj_size")])
def test_unsupported_recurrent_variants_are_refused_with_the_module(kw, what):
    m = Seq(nn.LSTM, **kw).double()
    if what == "proj_size":
        m.head = nn.Linear(2, 2).double()
    elif what == "bidirectional":
        m.head = nn.Linear(8, 2).double()
    with pytest.raises(gradgraph.UnsupportedModuleError, match=rf"'rnn' \(torch.nn.modules.rnn.LSTM\): .*{what}"):
        gradgraph.capture(m, torch.randn(3, 5, 3, dtype=D))


def test_packed_sequences_are_refused():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
            return self.rnn(packed)[1][0]

    with pytest.raises(gradgraph.UnsupportedModuleError, match=r"'rnn' \(torch.nn.modules.rnn.GRU\).*PackedSequence"):
        gradgraph.capture(Packed().double(), torch.randn(3, 5, 3, dtype=D))
