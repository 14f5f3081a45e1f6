"""Normalizations people use: nn.GroupNorm (1, some and all channels per group), torch's nn.RMSNorm and a
hand-written Hugging Face style RMSNorm (``weight * x * rsqrt(mean(x^2) + eps)``: its weight is a bare layer
scale, captured as a ``diag`` op), in a small residual network and a conv net, through the zoo contract; and
the batch axis: indexing one sample of an op output (``h[0]``) mixes samples and is refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_zoo import _moving_symmetry, check_model
from torch import nn

import gradgraph

D = torch.float64


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class HFRMSNorm(nn.Module):
    """LlamaRMSNorm's forward (without its float32 upcast, so that float64 stays float64)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states


class SwiGLUNet(nn.Module):
    """Pre-norm residual blocks with a SwiGLU MLP (Llama's), normalized by ``norm``."""

    def __init__(self, norm, d=6):
        super().__init__()
        self.inp, self.out = nn.Linear(3, d), nn.Linear(d, 2)
        self.norms = nn.ModuleList([norm(d), norm(d)])
        self.gate, self.up, self.down = nn.Linear(d, 8, bias=False), nn.Linear(d, 8, bias=False), nn.Linear(8, d)

    def forward(self, x):
        h = self.inp(x)
        n = self.norms[0](h)
        h = h + self.down(F.silu(self.gate(n)) * self.up(n))
        return self.out(self.norms[1](h).mean(1))


@pytest.mark.parametrize("norm", ["torch", "hf"])
def test_rms_norm(norm):
    torch.manual_seed(0)
    cls = (lambda d: nn.RMSNorm(d, eps=1e-6, elementwise_affine=True)) if norm == "torch" else HFRMSNorm
    m = SwiGLUNet(cls).double()
    with torch.no_grad():
        for n_ in m.norms:
            n_.weight.uniform_(0.5, 1.5)
    x, y = torch.randn(3, 4, 3, dtype=D), torch.randint(2, (3,))
    g = check_model(m, x, y, ce)
    assert {op.kind for op in g.spec.ops if op.name.startswith("norms")} == {"diag"}
    spaces = {s.key: s for s in g.spec.spaces}
    assert spaces["inp.out"].permutable and spaces["gate.out"].permutable  # the stream, the gate/up units


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_norm(groups):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(groups, 6), nn.SiLU(), nn.Conv2d(6, 4, 3),
                      nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for i in (1, 4):
            m[i].weight.uniform_(0.5, 1.5)
            m[i].bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(3, 2, 4, 4, dtype=D), torch.randint(3, (3,))
    g = check_model(m, x, y, ce)
    s0 = {s.key: s for s in g.spec.spaces}["0.out"]
    assert s0.permutable and len(s0.parts) == (groups if 1 < groups < 6 else 0)


def test_group_norm_across_groups_changes_the_function():
    """Negative: moving a channel to another group (channels 0 and 3 swapped consistently in the conv before,
    the norm's affine and the conv after) changes its statistics."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.Conv2d(6, 1, 1)).double()
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 4, 4, dtype=D)
    p = torch.tensor([3, 1, 2, 0, 4, 5])
    moved = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.Conv2d(6, 1, 1)).double()
    with torch.no_grad():
        moved[0].weight.copy_(m[0].weight[p])
        moved[0].bias.copy_(m[0].bias[p])
        moved[1].weight.copy_(m[1].weight[p])
        moved[1].bias.copy_(m[1].bias[p])
        moved[2].weight.copy_(m[2].weight[:, p])
        moved[2].bias.copy_(m[2].bias)
    assert not torch.allclose(moved(x), m(x), rtol=1e-6, atol=1e-8)
    s = _moving_symmetry(m, x)  # while the captured symmetry keeps it
    torch.testing.assert_close(gradgraph.apply_symmetry(m, s)(x), m(x), rtol=1e-9, atol=1e-12)


def test_indexing_one_sample_of_an_op_output_is_sample_mixing():
    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h + h[0])  # every sample sees sample 0

    with pytest.raises(gradgraph.SampleMixingError, match="batch"):
        gradgraph.capture(First().double(), torch.randn(3, 3, dtype=D))
