"""Metrics of Fisher-diagonal predictions that see every layer.

The paper's metric (mean squared error of targets z-scored with one global mean and std) is dominated by the
largest entries: on SIRENs the first layer's Fisher is ~10^6 while later layers are 10^2 to 10^0, so that metric
measures the first layer alone. The headline metric here is scale-free per parameter tensor:

* ``nmse``: each tensor's mean squared error divided by the training-set mean square of its targets (their
  RMS, not their std, which is 0 for the output bias whose Fisher is exactly 1), averaged over the tensors;
* ``logratio``: the mean absolute log-ratio ``|log(pred / target)|`` per tensor, averaged over tensors
  (non-positive predictions count as ``pred = 1e-12 * RMS``);
* ``nonpos``: the share of predictions <= 0 (the Fisher diagonal is positive by definition);
* ``mse`` / ``mae``: the paper's global z-scored errors, for comparability.

Every metric is computed per test model first (``per_model``), so improvements get paired bootstrap
intervals over test models (:func:`paired_bootstrap`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CurvatureMetrics", "paired_bootstrap", "METRICS"]

METRICS = ("nmse", "logratio", "nonpos", "mse", "mae")  # per-tensor metrics first (see per_model)
_PER_TENSOR = ("nmse", "logratio", "nonpos")


class CurvatureMetrics:
    """Metrics for one architecture's parameters (theta order), normalized by the training targets.

    Args:
        tensor_sizes: ``(name, numel)`` of every trainable parameter tensor, in theta order.
        y_train: training targets [n, P]; their per-tensor mean square is the nmse unit.
        mu, sigma: the global z-scoring of the paper's metric.
    """

    def __init__(self, tensor_sizes: list[tuple[str, int]], y_train: Tensor, mu: float, sigma: float) -> None:
        self.names = [n for n, _ in tensor_sizes]
        sizes = torch.tensor([k for _, k in tensor_sizes])
        self.tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # [P]
        self.sizes = sizes
        ms = self._per_tensor_mean(y_train.double().pow(2)).mean(0)  # [T]
        self.mean_square = ms.clamp_min(1e-300)
        self.mu, self.sigma = mu, sigma

    def _per_tensor_mean(self, x: Tensor) -> Tensor:
        """[G, P] -> [G, T]: the mean over each tensor's entries."""
        out = x.new_zeros(x.shape[0], len(self.sizes)).index_add_(1, self.tensor_of.to(x.device), x)
        return out / self.sizes.to(x.device, x.dtype)

    def per_model(self, pred: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-model metrics of predictions ``pred`` for targets ``y`` (both [G, P], original units):
        ``nmse``, ``logratio``, ``nonpos`` [G, T] per tensor, ``mse``, ``mae`` [G] (z units)."""
        pred, y = pred.double(), y.double()
        ms = self.mean_square.to(pred.device)
        floor = (ms.sqrt() * 1e-12)[self.tensor_of.to(pred.device)]
        err = (pred - y).pow(2)
        ratio = torch.log(torch.maximum(pred, floor) / torch.maximum(y, floor)).abs()
        return {"nmse": self._per_tensor_mean(err) / ms, "logratio": self._per_tensor_mean(ratio),
                "nonpos": self._per_tensor_mean((pred <= 0).double()),
                "mse": err.mean(1) / self.sigma ** 2, "mae": (pred - y).abs().mean(1) / self.sigma}

    def loss(self, pred: Tensor, y: Tensor, kind: str) -> Tensor:
        """Training loss summed over the batch's models (the loop divides by the number of models):
        ``normalized`` (nmse), ``log`` (squared log-ratio, tensor-averaged) or ``z`` (global z-scored MSE)."""
        if kind == "normalized":
            return (self._per_tensor_mean((pred - y).pow(2)) / self.mean_square.to(pred)).mean(1).sum()
        if kind == "log":
            return self._per_tensor_mean(torch.log(pred / y.clamp_min(1e-30)).pow(2)).mean(1).sum()
        if kind == "z":
            return ((pred - y) / self.sigma).pow(2).mean(1).sum()
        raise ValueError(f"unknown curvature loss {kind!r}: use normalized, log or z")

    @staticmethod
    def summarize(per_model: dict[str, Tensor], names: list[str] | None = None) -> dict:
        """Mean over models (and tensors) of each metric, plus per-tensor means under ``<metric>_by_tensor``."""
        out = {}
        for k, v in per_model.items():
            out[k] = float(v.mean())
            if v.ndim == 2 and names is not None:
                out[f"{k}_by_tensor"] = dict(zip(names, v.mean(0).tolist()))
        return out


def paired_bootstrap(a: Tensor, b: Tensor, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Improvement ``1 - mean(a) / mean(b)`` of per-model errors ``a`` over ``b`` (both [n], the same test
    models) with a paired bootstrap interval over the test models: ``{"improvement", "lo", "hi"}``."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired bootstrap needs two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(a.numel(), (samples, a.numel()), generator=g)
    imp = 1 - a[idx].mean(1) / b[idx].mean(1)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(imp, q).tolist()
    point = 1 - float(a.mean()) / float(b.mean())
    return {"improvement": point, "lo": lo, "hi": hi if not math.isnan(hi) else point}
