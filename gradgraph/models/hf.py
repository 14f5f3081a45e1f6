"""Hugging Face models built from random configs (nothing downloads), wrapped like the reference models:
``example_inputs``, ``example_targets`` and ``per_sample_loss``, and ``forward`` returns the logits tensor. The
capture benchmark measures them (``gradgraph bench capture --models hf-gpt2 hf-resnet``); gradgraph captures
the wrapped Hugging Face module as it is (the wrapper adds no parameter). Needs ``transformers`` (the ``zoo``
extra)."""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..losses import per_sample_cross_entropy
from .reference import _Reference

__all__ = ["HFGPT2", "HFResNet"]


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: never reach for the hub
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


class HFGPT2(_Reference):
    """``transformers.GPT2LMHeadModel`` from a random ``GPT2Config`` (dropout off, no cache): token ids
    ``[b, T]`` -> logits ``[b, T, vocab_size]``. The defaults are a 2-block GPT-2 of width 256 at sequence 128;
    ``tied`` ties the output layer to the token embedding (GPT-2's default)."""

    def __init__(self, vocab_size: int = 4096, block_size: int = 128, d_model: int = 256, n_layer: int = 2,
                 n_head: int = 4, tied: bool = True) -> None:
        super().__init__()
        tf = _transformers()
        cfg = tf.GPT2Config(
            vocab_size=vocab_size, n_positions=block_size, n_embd=d_model, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, use_cache=False,
            bos_token_id=0, eos_token_id=0)
        self.hf = tf.GPT2LMHeadModel(cfg)
        self.vocab_size, self.block_size = vocab_size, block_size

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids).logits

    def example_inputs(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randint(self.vocab_size, (batch_size, self.block_size), generator=generator)

    def example_targets(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randint(self.vocab_size, (batch_size, self.block_size), generator=generator)

    per_sample_loss = staticmethod(per_sample_cross_entropy)


class HFResNet(_Reference):
    """``transformers.ResNetForImageClassification`` from a random ``ResNetConfig``: images
    ``[b, 3, image_size, image_size]`` -> logits ``[b, num_classes]``. The defaults are ResNet-18's layout
    (basic blocks, widths 64-128-256-512, depths 2-2-2-2) at 64x64 pixels. BatchNorm always runs on its running
    statistics (``train()`` leaves it in eval mode): in training mode it mixes the samples of a batch, which no
    per-sample gradient can express, and gradgraph refuses it."""

    def __init__(self, image_size: int = 64, num_classes: int = 10, hidden_sizes: tuple[int, ...] = (64, 128, 256, 512),
                 depths: tuple[int, ...] = (2, 2, 2, 2), embedding_size: int = 64) -> None:
        super().__init__()
        tf = _transformers()
        cfg = tf.ResNetConfig(
            num_channels=3, embedding_size=embedding_size, hidden_sizes=list(hidden_sizes), depths=list(depths),
            layer_type="basic", num_labels=num_classes)
        self.hf = tf.ResNetForImageClassification(cfg)
        self.image_size, self.num_classes = image_size, num_classes
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.hf(pixel_values=pixel_values).logits

    def example_inputs(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randn(batch_size, 3, self.image_size, self.image_size, generator=generator)

    def example_targets(self, batch_size: int = 4, generator=None) -> Tensor:
        return torch.randint(self.num_classes, (batch_size,), generator=generator)

    per_sample_loss = staticmethod(per_sample_cross_entropy)
