"""Optimizer tasks: what a learned optimizer is meta-trained and evaluated on (offline, seeded).

A task gives a model factory, an endless seeded stream of training batches, the (mean-reduced) loss, the
validation/test loss and the inner horizon T (steps of one inner training run)::

    task = OPT_TASKS.build("digits-mlp")
    model = task.model(seed=0)
    for step, batch in zip(range(task.horizon), task.batches(seed=0)):
        loss = task.loss(model, batch)
    task.evaluate(model, "test")

* ``digits-mlp``: scikit-learn's 8x8 digits / 16, MLP 64 -> 32 -> 10 (ReLU), batch 128, a fixed stratified
  60/20/20 train/validation/test split (``random_state=0``), cross-entropy. ``digits-mlp-w64``: width 64.
* ``text-gpt``: next-character prediction on text read from Python's own standard-library sources (a fixed
  list of modules, so the text depends only on the Python version), printable ASCII plus newline (other
  characters map to ``?``), the reference GPT with 2 blocks, d = 32, 4 heads, batch 8 sequences x 8 characters;
  the first 80% of the text trains, the next 10% validates, the last 10% tests.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.reference import GPT, MLP
from ..registry import Registry
from ..train.loop import epoch_order

__all__ = ["OPT_TASKS", "OptTask", "DigitsMLP", "TextGPT"]

OPT_TASKS = Registry("optimizer task")


class OptTask:
    """One task. ``classes`` bounds the clipped per-step loss (1.5 ln classes) in PES."""

    name = "task"
    classes = 10
    horizon = 2000

    def model(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def batches(self, seed: int):
        """An endless iterator of training batches ``(x, y)``, the same for the same seed."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> Tensor:
        """The mean loss of ``model`` on ``batch`` (a scalar with grad)."""
        raise NotImplementedError

    def eval_batch(self, split: str = "val"):
        """The fixed batch that :meth:`evaluate` scores (the whole split, or fixed windows of it)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "val") -> float:
        """The mean loss on the whole ``"val"`` or ``"test"`` split."""
        return float(self.loss(model, self.eval_batch(split)))

    @property
    def max_loss(self) -> float:
        return 1.5 * math.log(self.classes)


@dataclass
class DigitsMLP(OptTask):
    """sklearn digits / 16 with an MLP 64 -> width -> 10."""

    width: int = 32
    batch_size: int = 128
    horizon: int = 2000

    def __post_init__(self):
        self.name = "digits-mlp" if self.width == 32 else f"digits-mlp-w{self.width}"
        self._data = None

    def data(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self._data is None:
            self._data = _digits()
        return self._data

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MLP(64, (self.width,), 10)

    def batches(self, seed: int):
        x, y = self.data()["train"]
        n, epoch = len(y), 0
        while True:
            order = torch.tensor(epoch_order(n, seed, epoch))
            for i in range(0, n - self.batch_size + 1, self.batch_size):  # full batches only: one graph shape
                idx = order[i:i + self.batch_size]
                yield x[idx], y[idx]
            epoch += 1

    def loss(self, model, batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_batch(self, split: str = "val"):
        return self.data()[_split(split)]


def _split(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    return split


def _digits() -> dict[str, tuple[Tensor, Tensor]]:
    from sklearn.datasets import load_digits  # scikit-learn is heavy: only the digits tasks load it
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)
    idx = list(range(len(y)))
    train, rest = train_test_split(idx, test_size=0.4, stratify=d.target, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=d.target[rest], random_state=0)
    return {k: (x[v], y[v]) for k, v in (("train", train), ("val", val), ("test", test))}


STDLIB_MODULES = ("textwrap", "string", "difflib", "argparse", "functools", "collections/__init__",
                  "dataclasses", "pathlib", "shutil", "tempfile", "enum", "fractions", "heapq", "bisect")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # index 0 is newline; "?" stands for anything else


def stdlib_text() -> str:
    root = os.path.dirname(os.__file__)
    parts = []
    for name in STDLIB_MODULES:
        path = os.path.join(root, name + ".py")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    return "\n".join(parts)


@dataclass
class TextGPT(OptTask):
    """Char-level next-token prediction with the reference GPT (2 blocks, d = 32, 4 heads)."""

    batch_size: int = 8
    seq_len: int = 8
    horizon: int = 5000
    eval_windows: int = 512

    def __post_init__(self):
        self.name, self.classes = "text-gpt", len(CHARS)
        self._ids = None

    def ids(self) -> Tensor:
        if self._ids is None:
            lookup = {c: i for i, c in enumerate(CHARS)}
            q = lookup["?"]
            self._ids = torch.tensor([lookup.get(c, q) for c in stdlib_text()], dtype=torch.long)
        return self._ids

    def _range(self, split: str) -> tuple[int, int]:
        n = self.ids().numel()
        a, b = int(0.8 * n), int(0.9 * n)
        return {"train": (0, a), "val": (a, b), "test": (b, n)}[_split(split)]

    def _windows(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        ids = self.ids()
        off = torch.arange(self.seq_len + 1)
        w = ids[starts[:, None] + off]
        return w[:, :-1], w[:, 1:]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return GPT(vocab_size=len(CHARS), block_size=self.seq_len, d_model=32, n_heads=4, n_layers=2)

    def batches(self, seed: int):
        lo, hi = self._range("train")
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self._windows(torch.randint(lo, hi - self.seq_len - 1, (self.batch_size,), generator=gen))

    def loss(self, model, batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def eval_batch(self, split: str = "val"):
        lo, hi = self._range(split)
        starts = torch.linspace(lo, hi - self.seq_len - 2, self.eval_windows).long()  # fixed, evenly spaced
        return self._windows(starts)


OPT_TASKS.register("digits-mlp", DigitsMLP, help="sklearn digits, MLP 64-32-10, batch 128")
OPT_TASKS.register("digits-mlp-w64", lambda: DigitsMLP(width=64), help="sklearn digits, MLP 64-64-10, batch 128")
OPT_TASKS.register("text-gpt", TextGPT, help="char-level GPT (2 blocks, d=32) on stdlib sources, batch 8x8")
