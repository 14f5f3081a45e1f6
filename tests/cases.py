"""Randomly drawn architectures shared by the tests: each builder takes a seed and returns a
``Case(model, inputs, targets, loss_fn)`` in float64. Architectures vary with the seed (depths, widths,
kernels, strides, paddings, activations, heads), so a test parametrized over seeds checks a family, not one
fixed model."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.losses import per_sample_cross_entropy, per_sample_mse
from gradgraph.models import CNN, GPT, MLP, SIREN

_ACTS = [nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid]


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: object
    targets: torch.Tensor
    loss_fn: Callable


def _finish(name, model, inputs, targets, loss_fn) -> Case:
    def dbl(t):
        return t.double() if t.is_floating_point() else t
    return Case(name, model.double().eval(), dbl(inputs), dbl(targets), loss_fn)


def mlp(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    hidden = tuple(r.randint(2, 6) for _ in range(r.randint(1, 3)))
    m = MLP(r.randint(2, 5), hidden, r.randint(2, 4), r.choice(["relu", "tanh", "gelu", "silu", "sigmoid"]))
    b = r.randint(2, 6)
    return _finish("mlp", m, torch.randn(b, m.in_features), torch.randint(m.out_features, (b,)),
                   per_sample_cross_entropy)


def siren(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    m = SIREN(r.randint(1, 2), tuple(r.randint(3, 6) for _ in range(2)), r.randint(1, 2), init="normal")
    b = r.randint(2, 6)
    return _finish("siren", m, torch.rand(b, m.in_features) * 2 - 1, torch.randn(b, m.out_features),
                   per_sample_mse)


class RandomCNN(nn.Module):
    """Conv2d layers with random kernel/stride/padding/dilation, optional pooling, and either a global
    pool or a flatten before the linear head."""

    def __init__(self, r: random.Random, c_in: int, size: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.acts = []
        self.pools = []
        c = c_in
        for _ in range(r.randint(1, 3)):
            k = r.choice([1, 2, 3])
            stride = r.choice([1, 2]) if size > 4 else 1
            pad = r.choice([0, 1]) if k > 1 else 0
            dil = r.choice([1, 2]) if k > 1 and size > 5 else 1
            c_out = r.randint(2, 4)
            conv = nn.Conv2d(c, c_out, k, stride=stride, padding=pad, dilation=dil)
            new = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            if new < 2:
                break
            self.convs.append(conv)
            self.acts.append(r.choice(["relu", "tanh", "silu"]))
            size, c = new, c_out
            pool = r.choice([None, "max", "avg"]) if size >= 4 else None
            self.pools.append(pool)
            if pool:
                size //= 2
        self.global_pool = r.random() < 0.5
        self.head = nn.Linear(c if self.global_pool else c * size * size, r.randint(2, 3))

    def forward(self, x):
        for conv, act, pool in zip(self.convs, self.acts, self.pools):
            x = getattr(torch, act)(conv(x)) if act != "silu" else F.silu(conv(x))
            if pool == "max":
                x = F.max_pool2d(x, 2)
            elif pool == "avg":
                x = nn.AvgPool2d(2)(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1) if self.global_pool else nn.Flatten()(x)
        return self.head(x)


def cnn(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    c_in, size = r.randint(1, 2), r.randint(5, 9)
    m = RandomCNN(r, c_in, size)
    b = r.randint(2, 4)
    return _finish("cnn", m, torch.randn(b, c_in, size, size), torch.randint(m.head.out_features, (b,)),
                   per_sample_cross_entropy)


def reference_cnn(seed: int) -> Case:
    torch.manual_seed(seed)
    m = CNN(in_channels=1, channels=(3, 4), num_classes=3, image_size=8)
    return _finish("reference_cnn", m, torch.randn(3, 1, 8, 8), torch.randint(3, (3,)), per_sample_cross_entropy)


class Conv1dNet(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, r.randint(2, 4), 3, padding=1, padding_mode=r.choice(["zeros", "reflect"]))
        self.c2 = nn.Conv1d(self.c1.out_channels, 3, r.choice([2, 3]), stride=2, padding="valid")
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = F.avg_pool1d(F.silu(self.c1(x)), 2)
        return self.fc(torch.relu(self.c2(x)).mean(-1))


def conv1d(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    return _finish("conv1d", Conv1dNet(r), torch.randn(3, 2, 12), torch.randn(3, 2), per_sample_mse)


def gpt(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    heads = r.choice([1, 2])
    m = GPT(vocab_size=r.randint(5, 9), block_size=r.randint(3, 5), d_model=4 * heads, n_heads=heads,
            n_layers=r.randint(1, 2), d_ff=r.randint(5, 9))
    b = r.randint(2, 3)
    return _finish("gpt", m, torch.randint(m.vocab_size, (b, m.block_size)),
                   torch.randint(m.vocab_size, (b, m.block_size)), per_sample_cross_entropy)


class EncoderNet(nn.Module):
    """Linear in, torch.nn.TransformerEncoder (batch_first), linear out."""

    def __init__(self, d_in, d, heads, d_ff, layers, norm_first, activation, d_out) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, heads, d_ff, dropout=0.0, activation=activation, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, d_out)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


def transformer_encoder(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    heads = r.choice([1, 2])
    m = EncoderNet(r.randint(2, 4), 4 * heads, heads, r.randint(4, 8), r.randint(1, 2), seed % 2 == 0,
                   r.choice(["relu", "gelu"]), 2)
    b, T = r.randint(2, 3), r.randint(2, 4)
    return _finish("transformer_encoder", m, torch.randn(b, T, m.inp.in_features), torch.randn(b, T, 2),
                   per_sample_mse)


class ResidualLN(nn.Module):
    """Residual MLP with LayerNorm, in-place ReLU and an augmented-assignment residual."""

    def __init__(self, r: random.Random) -> None:
        super().__init__()
        d = r.randint(3, 6)
        self.inp, self.l1, self.l2 = nn.Linear(3, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.l1(self.relu(self.ln(h)))
        u = self.l2(h)
        u += h
        return self.out(torch.tanh(u))


def residual(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    return _finish("residual", ResidualLN(r), torch.randn(4, 3), torch.randn(4, 2), per_sample_mse)


FAMILIES = {
    "mlp": mlp, "siren": siren, "cnn": cnn, "reference_cnn": reference_cnn, "conv1d": conv1d, "gpt": gpt,
    "transformer_encoder": transformer_encoder, "residual": residual,
}
SEEDS = (0, 1, 2)
ALL_CASES = [(family, seed) for family in FAMILIES for seed in SEEDS]


def make(family: str, seed: int) -> Case:
    return FAMILIES[family](seed)
