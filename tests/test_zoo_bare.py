"""Bare parameters (capture/bare.py) and the vision models of the zoo: class and position tokens, layer scales
and a learned temperature used by the model's own code, Hugging Face ViT (bare cls/pos tokens) and ResNet.
Each through the zoo contract of tests/test_zoo.py (per-sample gradients vs torch.func to 1e-9 relative, the
summed gradient vs autograd, a moving symmetry that keeps the output, capture(s . model) == s . capture(model),
GradMetaNet), plus the negatives: a symmetry that forgets the tokens changes the function, and bare uses
gradgraph cannot represent stay refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import assert_tensors_close
from test_zoo import _moving_symmetry, check_model
from torch import nn

import gradgraph
from gradgraph import oracle

D = torch.float64


def ce(out, y):
    return F.cross_entropy(out.logits if hasattr(out, "logits") else out, y, reduction="none")


class Block(nn.Module):
    """Pre-norm attention + MLP block with layer scales (CaiT/DINOv2 style): ``x + gamma * f(x)``."""

    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gamma1 = nn.Parameter(torch.rand(d) + 0.5)
        self.gamma2 = nn.Parameter(torch.rand(1, 1, d) + 0.5)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.gamma1 * self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)))) * self.gamma2


class TinyViT(nn.Module):
    """Patches by a conv, a bare class token and bare position tokens, layer-scaled blocks, a learned scalar
    temperature on the logits."""

    def __init__(self, d=6, patch=2, size=4, classes=3, heads=2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (size // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d))
        self.blocks = nn.Sequential(Block(d, heads), Block(d, heads))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1) + self.pos
        h = self.norm(self.blocks(h))
        return self.head(h[:, 0]) * self.temperature


def _images(b=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g, dtype=D), torch.randint(3, (b,), generator=g)


def test_vit_with_bare_tokens_layer_scales_and_temperature():
    torch.manual_seed(1)
    m = TinyViT().double().eval()
    x, y = _images()
    g = check_model(m, x, y, ce)
    kinds = {op.name: op.kind for op in g.spec.ops}
    assert kinds["cls"] == kinds["pos"] == kinds["temperature"] == "embedding"
    assert kinds["blocks.0.gamma1"] == kinds["blocks.1.gamma2"] == "diag"
    spaces = {s.key: s for s in g.spec.spaces}
    # the tokens are added to the residual stream: their neurons are the stream's (one permutable space)
    stream = spaces["patch.out"]
    assert stream.permutable
    ops = {op.name: op for op in g.spec.ops}
    for name in ("cls", "pos", "blocks.0.gamma1", "blocks.1.gamma2"):
        assert g.spec.layers[ops[name].out_layer].space == g.spec.layers[ops["patch"].out_layer].space, name


def test_forgetting_the_tokens_in_a_symmetry_changes_the_function():
    """Negative: the stream permuted everywhere except in the class and position tokens (as if they were not
    part of it), or except in a layer scale."""
    torch.manual_seed(1)
    m = TinyViT().double().eval()
    x, _ = _images()
    s = _moving_symmetry(m, x)
    moved = gradgraph.apply_symmetry(m, s)
    torch.testing.assert_close(moved(x), m(x), rtol=1e-9, atol=1e-10)
    for names in (("cls", "pos"), ("blocks.0.gamma1",)):
        broken = gradgraph.apply_symmetry(m, s)
        with torch.no_grad():
            for n in names:
                broken.get_parameter(n).copy_(m.get_parameter(n))
        assert not torch.allclose(broken(x), m(x), rtol=1e-6, atol=1e-8), names


class Refused(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.lin = how, nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4) if how in {"matmul", "rows"} else torch.randn(4))

    def forward(self, x):
        h = self.lin(x)
        if self.how == "matmul":
            return h @ self.w  # a matrix: a rule's job (ctx.linear(h, w, transposed=True))
        if self.how == "rows":
            return h + self.w  # [4, 4] on [b=4, 4]: a row per sample, not one value shared by the samples
        if self.how == "index":
            return h * self.w[0]  # indexed first: not followed
        if self.how == "inplace":
            return h.mul_(self.w)
        return h * self.w.sum()  # reduced first


@pytest.mark.parametrize("how", ["matmul", "rows", "index", "inplace", "reduce"])
def test_bare_uses_gradgraph_cannot_represent_are_refused(how):
    m = Refused(how).double()
    x = torch.randn(4, 4, dtype=D)
    with pytest.raises(gradgraph.UnsupportedModuleError, match=r"\['w'\] are used by the torch function .*module "
                                                                r"'<root>' \(.*Refused\)"):
        gradgraph.capture(m, x)
    m.w.requires_grad_(False)  # frozen, it is a constant: nothing to refuse
    assert set(gradgraph.capture(m, x).per_sample_grads()) == {"lin.weight", "lin.bias"}


def test_a_bare_additive_parameter_on_input_data_and_a_bias_vector():
    """Bare parameters on the model input (a learned offset [d]) and as a bias of a hidden layer [1, d]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.offset, self.a, self.b = nn.Parameter(torch.randn(3)), nn.Linear(3, 5, bias=False), nn.Linear(5, 2)
            self.bias = nn.Parameter(torch.randn(1, 5))

        def forward(self, x):
            return self.b(torch.tanh(self.a(x - self.offset) + self.bias))

    m = M().double()
    x, y = torch.randn(4, 3, dtype=D), torch.randint(2, (4,))
    g = check_model(m, x, y, ce)
    assert {s.key for s in g.spec.spaces if s.permutable} == {"a.out"}


def _vit_config(**kw):
    return transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=16, num_labels=3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="sdpa", **kw)


def test_hf_vit():
    """ViTForImageClassification: bare cls_token [1, 1, d] and position_embeddings [1, n + 1, d]."""
    m = transformers.ViTForImageClassification(_vit_config()).double().eval()
    x, y = _images(2, 8)
    g = check_model(m, x, y, ce)
    kinds = {op.name: op.kind for op in g.spec.ops}
    assert kinds["vit.embeddings.cls_token"] == kinds["vit.embeddings.position_embeddings"] == "embedding"
    heads = [s for s in g.spec.spaces if s.heads == 2]
    assert heads and all(s.heads_permutable for s in heads)


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hf_resnet(layer_type):
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type=layer_type, num_labels=3)
    m = transformers.ResNetForImageClassification(cfg).double().eval()
    x, y = _images(2, 8)
    check_model(m, x, y, ce, min_permutable=3)


def test_summed_gradient_of_a_shared_bare_parameter():
    """One layer scale used by two blocks: its gradient is the sum over both uses, per sample."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            h = self.a(x)
            h = h + torch.tanh(self.b(h)) * self.gamma
            return self.c(h + torch.tanh(self.b(h)) * self.gamma)

    m = Shared().double()
    x, y = torch.randn(5, 3, dtype=D), torch.randint(2, (5,))
    g = check_model(m, x, y, ce)
    assert [op.name for op in g.spec.ops if op.weight is not None and op.weight.name == "gamma"] == ["gamma",
                                                                                                      "gamma#2"]
    assert_tensors_close(g.grads(), oracle.grads(m, x, y, ce), rtol=1e-9)


def test_hf_mobilenet_v2_depthwise_convolutions():
    """MobileNetV2: depthwise and pointwise convs, eval BatchNorm, ReLU6. A depthwise conv is one conv op per
    group (its rows of the weight); the channels of a grouped conv permute group by group."""
    cfg = transformers.MobileNetV2Config(num_channels=3, image_size=8, depth_multiplier=0.25, min_depth=4,
                                         num_labels=3, initializer_range=0.3, finegrained_output=False)
    m = transformers.MobileNetV2ForImageClassification(cfg).double().eval()
    x, y = _images(2, 8)
    g = check_model(m, x, y, ce)
    dw = m.mobilenet_v2.layer[0].conv_3x3.convolution
    assert dw.groups == dw.in_channels > 1
    assert sum(op.weight.name == "mobilenet_v2.layer.0.conv_3x3.convolution.weight" for op in g.spec.ops) == dw.groups


def test_grouped_conv_symmetry_permutes_within_groups_only():
    """A grouped conv (2 groups of 3 channels) between two convs: exact, and a symmetry that swaps channels
    across the groups changes the function (negative)."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.Tanh(),
                      nn.Conv2d(6, 2, 1), nn.Flatten(), nn.Linear(32, 3)).double()
    x, y = torch.randn(3, 2, 4, 4, dtype=D), torch.randint(3, (3,))
    g = check_model(m, x, y, ce)
    assert sum(op.weight.name == "2.weight" for op in g.spec.ops) == 2
    cut = {sp.key: sp for sp in g.spec.spaces}["0.out"]
    assert cut.permutable and [g.spec.spaces[i].size for i in cut.parts] == [3, 3]
    s = _moving_symmetry(m, x)
    s.perms["0.out"] = torch.tensor([3, 1, 2, 0, 4, 5])  # channel 0 (group 0) <-> channel 3 (group 1)
    assert not torch.allclose(gradgraph.apply_symmetry(m, s)(x), m(x), rtol=1e-6, atol=1e-8)


def test_bare_parameters_inside_a_training_loop_recorder():
    """The recorder path (hooks during the user's own backward) records bare parameters the same way."""
    torch.manual_seed(1)
    m = TinyViT().double().eval()
    x, y = _images()
    with gradgraph.GradientRecorder(m) as rec:
        ce(m(x), y).sum().backward()
    assert_tensors_close(rec.graph().per_sample_grads(), oracle.per_sample_grads(m, x, y, ce), rtol=1e-9)


def test_a_refusal_is_reported_even_when_the_forward_then_fails():
    """The refused use's output is not labeled; when that makes a later op fail, the refusal is what is raised."""
    class Later(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin((x @ self.w)[0])  # would be sample mixing, after the refused matmul

    with pytest.raises(gradgraph.UnsupportedModuleError, match="'matmul'"):
        gradgraph.capture(Later().double(), torch.randn(3, 4, dtype=D))
