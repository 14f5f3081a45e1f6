"""MLP, SIREN, CNN and a GPT-style transformer: small, seeded, and written with plain torch so that
gradgraph discovers their structure by tracing (no special cases for them in the library)."""
from __future__ import annotations

import inspect
import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NotAModelFactoryError, UnknownNameError
from ..losses import per_sample_cross_entropy, per_sample_mse
from ..registry import Registry, load_object

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


class _Reference(nn.Module):
    def example_targets(self, batch_size: int = 4, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def example_batch(self, batch_size: int = 4, generator: torch.Generator | None = None):
        return self.example_inputs(batch_size, generator), self.example_targets(batch_size, generator)


class MLP(_Reference):
    """Fully connected network: [b, in_features] -> [b, out_features]."""

    def __init__(self, in_features: int = 8, hidden: tuple[int, ...] = (32, 32), out_features: int = 4,
                 activation: str = "relu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLP activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        dims = (in_features, *hidden, out_features)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def example_inputs(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randn(batch_size, self.in_features, generator=generator)

    def example_targets(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randint(self.out_features, (batch_size,), generator=generator)

    per_sample_loss = staticmethod(per_sample_cross_entropy)


class Sine(nn.Module):
    """``sin(w0 * x)``, the SIREN activation."""

    def __init__(self, w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = w0

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * x)


class SIREN(_Reference):
    """Sine-activated MLP (Sitzmann et al. 2020), coordinates [b, in_features] -> values [b, out_features].
    ``init="siren"`` uses the paper's uniform initialization; ``init="normal"`` draws every weight and
    bias from N(0, 1) (the untrained models of the curvature task)."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (32, 32), out_features: int = 1,
                 w0: float = 30.0, init: str = "siren") -> None:
        super().__init__()
        dims = (in_features, *hidden, out_features)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.act = Sine(w0)
        self.in_features, self.out_features = in_features, out_features
        with torch.no_grad():
            for i, lin in enumerate(self.linears):
                if init == "normal":
                    nn.init.normal_(lin.weight)
                    nn.init.normal_(lin.bias)
                elif init == "siren":
                    bound = 1 / lin.in_features if i == 0 else math.sqrt(6 / lin.in_features) / w0
                    nn.init.uniform_(lin.weight, -bound, bound)
                else:
                    raise ValueError(f"SIREN init must be 'siren' or 'normal', got {init!r}")

    def forward(self, x: Tensor) -> Tensor:
        for lin in self.linears[:-1]:
            x = self.act(lin(x))
        return self.linears[-1](x)

    def example_inputs(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.rand(batch_size, self.in_features, generator=generator) * 2 - 1

    def example_targets(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randn(batch_size, self.out_features, generator=generator)

    per_sample_loss = staticmethod(per_sample_mse)


class CNN(_Reference):
    """Convolutions (3x3, ReLU; max pooling after the first, stride 2 from the second on), global average
    pooling and a linear head: images [b, in_channels, H, W] -> logits [b, num_classes]."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (8, 16), num_classes: int = 10,
                 image_size: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, c_out in enumerate(channels):
            layers += [nn.Conv2d(c, c_out, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
            if i == 0:
                layers.append(nn.MaxPool2d(2))
            c = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        self.net = nn.Sequential(*layers)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def example_inputs(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randn(batch_size, self.in_channels, self.image_size, self.image_size, generator=generator)

    def example_targets(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randint(self.num_classes, (batch_size,), generator=generator)

    per_sample_loss = staticmethod(per_sample_cross_entropy)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v and output projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h, dh = self.n_heads, C // self.n_heads
        q = self.q(x).view(B, T, h, dh).transpose(1, 2)
        k = self.k(x).view(B, T, h, dh).transpose(1, 2)
        v = self.v(x).view(B, T, h, dh).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class GPT(_Reference):
    """A GPT-style character language model: token ids [b, T] -> next-token logits [b, T, vocab_size]."""

    def __init__(self, vocab_size: int = 65, block_size: int = 16, d_model: int = 32, n_heads: int = 4,
                 n_layers: int = 2, d_ff: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.vocab_size, self.block_size = vocab_size, block_size

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds block_size={self.block_size}")
        positions = torch.arange(T, device=idx.device).expand(B, T)  # per sample, so gradients stay per sample
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def example_inputs(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randint(self.vocab_size, (batch_size, self.block_size), generator=generator)

    def example_targets(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randint(self.vocab_size, (batch_size, self.block_size), generator=generator)

    per_sample_loss = staticmethod(per_sample_cross_entropy)


# The reference models by name; a user's ``package.module:function`` goes through build_model's checks.
REFERENCE_MODELS = Registry("reference model")
for _name, _cls in (("mlp", MLP), ("siren", SIREN), ("cnn", CNN), ("gpt", GPT)):
    REFERENCE_MODELS.register(_name, _cls)
del _name, _cls


def model_factory(fn):
    """Declare ``fn`` a model factory, so that ``gradgraph inspect --model package.module:fn`` may call it (as a
    return annotation ``-> nn.Module`` or ``-> tuple[nn.Module, Tensor, ...]`` does)."""
    fn.__gradgraph_model_factory__ = True
    return fn


def _declares_a_model(fn) -> bool:
    if getattr(fn, "__gradgraph_model_factory__", False):
        return True
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not resolve here: read its text
        ret = fn.__annotations__.get("return")
    if isinstance(ret, type) and issubclass(ret, nn.Module):
        return True
    if typing.get_origin(ret) is tuple:
        first = (typing.get_args(ret) or (None,))[0]
        return isinstance(first, type) and issubclass(first, nn.Module)
    return isinstance(ret, str) and "Module" in ret


def _load_factory(path: str):
    """The model class or declared factory at ``path``: a target names code that will run, so anything else
    (``os:system``, a module constant, an undeclared function) is refused before it is called."""
    obj = load_object(path)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    if inspect.isfunction(obj) and _declares_a_model(obj):
        return obj
    what = (f"the class {obj.__name__}, not an nn.Module subclass" if isinstance(obj, type)
            else "a function whose return annotation does not say it builds a model" if inspect.isfunction(obj)
            else f"a {type(obj).__name__}, not a model class or function")
    raise NotAModelFactoryError(
        f"'{path}' is {what}. A model target runs code, so it must be an nn.Module subclass, a function annotated "
        "`-> nn.Module` (or `-> tuple[nn.Module, Tensor, ...]` for (model, inputs[, targets, loss_fn])), or a "
        "function decorated with @gradgraph.models.model_factory")


def build_model(name: str, **kwargs):
    """A reference model by name (``mlp``, ``siren``, ``cnn``, ``gpt``) or ``package.module:attribute``: an
    nn.Module subclass or a declared model factory (see :func:`model_factory`), returning a model or a tuple
    ``(model, inputs[, targets, loss_fn])``. The target's code runs: pass only targets you trust. Unknown names
    raise :class:`~gradgraph.errors.UnknownNameError`, other targets
    :class:`~gradgraph.errors.NotAModelFactoryError`."""
    if name in REFERENCE_MODELS:
        return REFERENCE_MODELS.build(name, **kwargs)
    if ":" not in name:
        raise UnknownNameError(f"unknown model '{name}': use one of {sorted(REFERENCE_MODELS)} or "
                               "'package.module:function'")
    made = _load_factory(name)(**kwargs)
    model = made[0] if isinstance(made, tuple) and made else made
    if not isinstance(model, nn.Module):
        raise NotAModelFactoryError(f"'{name}' returned a {type(model).__name__}, not an nn.Module (or a tuple "
                                    "starting with one)")
    return made
