"""Rules for individual module types: outputs unchanged, per-sample gradients exact, odd configurations."""
import copy

import pytest
import torch
from conftest import assert_tensors_close
from torch import nn

import gradgraph
from gradgraph import oracle
from gradgraph.capture import CaptureSession, supported_modules
from gradgraph.capture.rules import find_rule
from gradgraph.losses import per_sample_mse

D = torch.float64


class Attn(nn.Module):
    def __init__(self, mha, mode):
        super().__init__()
        self.mha, self.mode = mha, mode
        self.out = nn.Linear(mha.embed_dim, 2)
        self.register_buffer("fmask", torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        b, T, _ = x.shape
        kw = {}
        if self.mode == "causal_bool":
            kw = dict(attn_mask=torch.triu(torch.ones(T, T, dtype=torch.bool), 1), need_weights=False)
        elif self.mode == "float_mask_weights":
            kw = dict(attn_mask=self.fmask[:T, :T])
        elif self.mode == "padding":
            pad = torch.zeros(b, T, dtype=torch.bool)
            pad[:, -1] = True
            kw = dict(key_padding_mask=pad, average_attn_weights=False)
        elif self.mode == "causal_hint":
            kw = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype), is_causal=True,
                      need_weights=False)
        y, _ = self.mha(x, x, x, **kw)
        return self.out(y)


@pytest.mark.parametrize("mode", ["causal_bool", "float_mask_weights", "padding", "causal_hint"])
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention(mode, bias):
    torch.manual_seed(0)
    m = Attn(nn.MultiheadAttention(6, 2, bias=bias, batch_first=True), mode).double().eval()
    x, y = torch.randn(3, 4, 6, dtype=D), torch.randn(3, 4, 2, dtype=D)
    with CaptureSession(m) as session:
        out = m(x)
    torch.testing.assert_close(out, m(x))  # the rule computes what the module computes
    del session
    g = gradgraph.capture(m, x, y, per_sample_mse)
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, x, y, per_sample_mse))
    spaces = {s.key: s for s in g.spec.spaces}
    # head-averaged weights keep the head symmetry; so do per-head weights returned to the caller (they carry a
    # per-head space that permutes with the heads)
    assert spaces["mha:q.out"].permutable and spaces["mha:q.out"].heads_permutable
    for seed in range(3):
        s = gradgraph.random_symmetry(m, generator=torch.Generator().manual_seed(seed), example_inputs=x)
        torch.testing.assert_close(gradgraph.apply_symmetry(m, s)(x), m(x), rtol=1e-9, atol=1e-12)


def test_cross_attention_with_kdim_vdim():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)

        def forward(self, q, kv):
            return self.mha(q, kv[..., :3], kv, need_weights=False)[0]

    torch.manual_seed(1)
    m = Cross().double()
    q, kv = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 5, dtype=D)
    g = gradgraph.capture(m, (q, kv))
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, (q, kv)))


def test_embedding_padding_idx():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Linear(3, 2)).double()
    ids = torch.tensor([[0, 1, 2, 0], [3, 3, 5, 1], [0, 0, 0, 4]])
    y = torch.randn(3, 4, 2, dtype=D)
    g = gradgraph.capture(m, ids, y, per_sample_mse)
    psg = g.per_sample_grads()
    assert_tensors_close(psg, oracle.per_sample_grads(m, ids, y, per_sample_mse))
    assert not psg["0.weight"][:, 0].any()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's own note
@pytest.mark.parametrize("padding", ["same", 0, 2])
def test_conv_even_kernel_and_string_padding(padding):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 3, (2, 4), padding=padding, dilation=(1, 2)), nn.Tanh(), nn.Flatten(),
                      nn.LazyLinear(2)).double()
    x, y = torch.randn(2, 2, 7, 9, dtype=D), torch.randn(2, 2, dtype=D)
    m(x)
    g = gradgraph.capture(m, x, y, per_sample_mse)
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, x, y, per_sample_mse))


def test_batchnorm_eval_moves_running_stats_with_the_channels():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten(),
                      nn.Linear(8, 2)).double().eval()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(3, 1, 6, 6, dtype=D), torch.randn(3, 2, dtype=D)
    g = gradgraph.capture(m, x, y, per_sample_mse)
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, x, y, per_sample_mse))
    s = gradgraph.random_symmetry(g, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(s.perms["0.out"], torch.arange(3)), "the draw must move the BatchNorm channels"
    torch.testing.assert_close(gradgraph.apply_symmetry(m, s)(x), m(x))


def test_supported_modules_lists_the_registry():
    names = supported_modules()
    for n in ("Linear", "Conv1d", "Conv2d", "LayerNorm", "Embedding", "MultiheadAttention", "BatchNorm2d"):
        assert n in names


# -- user rules: the worked example of docs/capture.md ------------------------------------------------------
class PackedMLP(nn.Module):
    """Two linear maps d -> d -> d whose weights and biases are packed into one parameter each."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.weight = nn.Parameter(torch.randn(2 * d, d) / d ** 0.5)
        self.bias = nn.Parameter(torch.randn(2 * d) / 10)

    def forward(self, x):
        d = self.d
        h = torch.tanh(nn.functional.linear(x, self.weight[:d], self.bias[:d]))
        return nn.functional.linear(h, self.weight[d:], self.bias[d:])


class ScaleNorm(nn.Module):
    """RMS normalization with a per-feature gain."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d) + torch.randn(d) / 10)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@gradgraph.register_rule(PackedMLP)
def packed_mlp_rule(ctx, m, x):
    d = m.d
    h = torch.tanh(ctx.linear(x, ctx.rows(m.weight, 0, d), ctx.rows(m.bias, 0, d), name="first"))
    return ctx.linear(h, ctx.rows(m.weight, d, 2 * d), ctx.rows(m.bias, d, 2 * d), name="second")


@gradgraph.register_rule(ScaleNorm)
def scale_norm_rule(ctx, m, x):
    with ctx.tracer.suspend():  # the normalization is glue; the diag op sees its result as the activation
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)
    return ctx.diag(x, x_hat, m.weight, axis=-1)


def _custom_model():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(3, 4), PackedMLP(4), ScaleNorm(4), nn.ReLU(), nn.Linear(4, 2)).double()
    return m, torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)


def test_user_rules_compute_the_module_and_its_per_sample_gradients():
    m, x, y = _custom_model()
    with CaptureSession(m) as session:
        out = m(x)
    torch.testing.assert_close(out, m(x))  # the rules compute what the modules compute
    del session
    g = gradgraph.capture(m, x, y, per_sample_mse)
    assert [op.name for op in g.spec.ops] == ["0", "1:first", "1:second", "2", "4"]
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, x, y, per_sample_mse))


def _moving(m, x):
    for k in range(50):
        s = gradgraph.random_symmetry(m, generator=torch.Generator().manual_seed(k), example_inputs=x)
        if not torch.equal(s.perms["1:first.out"], torch.arange(4)):
            return s
    raise AssertionError("no draw moved the hidden space of the packed module")


def test_user_rules_find_the_symmetry_and_a_broken_coupling_is_detected():
    m, x, _ = _custom_model()
    s = _moving(m, x)
    assert not s.is_identity()
    torch.testing.assert_close(gradgraph.apply_symmetry(m, s)(x), m(x))
    # negative: permute the rows of the first half but not the columns of the second half it feeds
    moved = gradgraph.apply_symmetry({n: p.detach() for n, p in m.named_parameters()}, s)
    moved["1.weight"][4:] = moved["1.weight"][4:][:, torch.argsort(s.perms["1:first.out"])]
    broken = copy.deepcopy(m)
    with torch.no_grad():
        for n, p in broken.named_parameters():
            p.copy_(moved[n])
    assert not torch.allclose(broken(x), m(x), atol=1e-6)


def test_a_subclass_uses_its_parents_rule_unless_it_overrides_forward():
    class Renamed(PackedMLP):
        pass

    class Doubled(PackedMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    assert find_rule(Renamed(2)) is packed_mlp_rule and find_rule(Doubled(2)) is None
    torch.manual_seed(6)
    m, x, y = nn.Sequential(Renamed(3), nn.Tanh()).double(), torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    g = gradgraph.capture(m, x, y, per_sample_mse)
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, x, y, per_sample_mse))
    with pytest.raises(gradgraph.UnsupportedModuleError, match=r"register_rule\(Doubled\)"):
        gradgraph.capture(Doubled(3), torch.randn(4, 3))
