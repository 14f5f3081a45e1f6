"""Calibrated standard estimators for the curvature task: the cheap baselines that could explain a
metanetwork's gain away, fitted on the same training split in seconds.

With S the standard estimator (the empirical Fisher diagonal of the graph's gradients), per parameter tensor t:

* ``s-affine``: ``a_t S + b_t`` (least squares per tensor);
* ``s-shrink``: ``lambda_t S + (1 - lambda_t) mean_t(S)``, shrinkage toward the model's own mean of S over the
  tensor (least squares per tensor);
* ``stats-mlp``: ``S exp(MLP(log S, log var(g^2), log mean_t(S), tensor id))``, a per-parameter MLP on statistics
  of the set (var(g^2): the sample variance of the squared per-sample gradients), trained with Adam on the
  task's normalized error, best validation checkpoint.

Each returns predictions [n, P] for any items; :func:`fit_all` fits the three on a training split and
evaluates them with the task's metrics. Also :func:`noise_floor`: the error of the true Fisher diagonal
against the targets, which are themselves Monte Carlo estimates (it bounds every predictor's improvement).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..train.loop import epoch_order
from .curvature_metrics import CurvatureMetrics

__all__ = ["gradient_square_variance", "fit_affine", "fit_shrink", "shrink_base", "StatsMLP", "fit_stats_mlp",
           "fit_all", "noise_floor", "CALIBRATED"]

CALIBRATED = ("s-affine", "s-shrink", "stats-mlp")


def gradient_square_variance(dataset, items: list[int]) -> Tensor:
    """[len(items), P]: per parameter, the sample variance over the graph's set of the squared per-sample
    gradients (rebuilt from the graph), in theta order."""
    out = []
    for i in items:
        graph = dataset[i]
        psg = graph.per_sample_grads()
        sq = graph.params_to_graph({k: v.double().pow(2).movedim(0, -1) for k, v in psg.items()})  # [P, b]
        out.append(sq.var(1))
    return torch.stack(out)


def _per_tensor(metrics: CurvatureMetrics, x: Tensor) -> Tensor:
    """[n, P] -> [n, T] means over each tensor's entries."""
    return metrics._per_tensor_mean(x)


def fit_affine(metrics: CurvatureMetrics, S: Tensor, y: Tensor) -> Tensor:
    """Per-tensor (a, b) of ``a S + b`` by least squares: [T, 2]."""
    coef = []
    for t in range(len(metrics.sizes)):
        cols = metrics.tensor_of == t
        s, target = S[:, cols].reshape(-1).double(), y[:, cols].reshape(-1).double()
        X = torch.stack([s, torch.ones_like(s)], 1)
        coef.append(torch.linalg.lstsq(X, target[:, None]).solution[:, 0])
    return torch.stack(coef)


def apply_affine(metrics: CurvatureMetrics, coef: Tensor, S: Tensor) -> Tensor:
    c = coef[metrics.tensor_of]
    return c[:, 0] * S.double() + c[:, 1]


def fit_shrink(metrics: CurvatureMetrics, S: Tensor, y: Tensor) -> Tensor:
    """Per-tensor lambda of ``lambda S + (1 - lambda) mean_t(S)`` by least squares: [T]."""
    m = _per_tensor(metrics, S.double())[:, metrics.tensor_of]
    d, r = S.double() - m, y.double() - m
    num = torch.zeros(len(metrics.sizes), dtype=torch.float64).index_add_(0, metrics.tensor_of, (d * r).sum(0))
    den = torch.zeros(len(metrics.sizes), dtype=torch.float64).index_add_(0, metrics.tensor_of, (d * d).sum(0))
    return num / den.clamp_min(1e-300)


def shrink_base(standard: Tensor, lam: Tensor, tensor_of: Tensor) -> Tensor:
    """``lam_t S + (1 - lam_t) mean_t(S)`` per parameter tensor t of each model: [G, P] from S [G, P], ``lam``
    [T] in [0, 1] (so the base stays positive) and ``tensor_of`` [P] (each parameter's tensor index)."""
    seg = tensor_of.to(standard.device)
    sums = standard.new_zeros(standard.shape[0], len(lam)).index_add_(1, seg, standard)
    counts = torch.bincount(seg, minlength=len(lam)).to(standard)
    mean = (sums / counts)[:, seg]
    return lam.to(standard)[seg] * (standard - mean) + mean


def apply_shrink(metrics: CurvatureMetrics, lam: Tensor, S: Tensor) -> Tensor:
    return shrink_base(S.double(), lam, metrics.tensor_of)


class StatsMLP(nn.Module):
    """``h = MLP(features)`` per parameter; the estimate is ``S exp(h)``. Features [n, P, 3 + T]."""

    def __init__(self, num_tensors: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 + num_tensors, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        with torch.no_grad():  # start at S itself
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()

    @staticmethod
    def features(metrics: CurvatureMetrics, S: Tensor, var: Tensor) -> Tensor:
        logS = torch.log(S.double().clamp_min(1e-30))
        logv = torch.log(var.double().clamp_min(1e-30))
        logm = torch.log(_per_tensor(metrics, S.double()).clamp_min(1e-30))[:, metrics.tensor_of]
        onehot = torch.eye(len(metrics.sizes), dtype=torch.float64)[metrics.tensor_of].expand(S.shape[0], -1, -1)
        return torch.cat([torch.stack([logS, logv, logm], -1) / 10, onehot], -1).float()

    def forward(self, feats: Tensor, S: Tensor) -> Tensor:
        return S.float().clamp_min(1e-30) * torch.exp(self.net(feats)[..., 0].clamp(-30, 30))


def fit_stats_mlp(metrics: CurvatureMetrics, train: tuple[Tensor, Tensor, Tensor], val: tuple[Tensor, Tensor, Tensor],
                  seed: int = 0, steps: int = 400, batch: int = 64, lr: float = 3e-3) -> StatsMLP:
    """Train on (features, S, y) of the training items with the normalized loss; keep the best on validation
    (checked every 25 steps)."""
    torch.manual_seed(seed)
    model = StatsMLP(len(metrics.sizes))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    feats, S, y = train
    best, best_state, step, epoch = float("inf"), None, 0, 0
    while step < steps:
        order = epoch_order(feats.shape[0], seed, epoch)
        epoch += 1
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            loss = metrics.loss(model(feats[idx], S[idx]), y[idx].float(), "normalized") / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 25 == 0 or step == steps:
                with torch.no_grad():
                    v = float(metrics.per_model(model(val[0], val[1]), val[2])["nmse"].mean())
                if v < best:
                    best, best_state = v, copy.deepcopy(model.state_dict())
            if step >= steps:
                break
    model.load_state_dict(best_state)
    return model


def fit_all(dataset, split: dict[str, list[int]], metrics: CurvatureMetrics, seed: int = 0) -> dict:
    """Fit every calibrated baseline on ``split["train"]`` and return ``{name: per-model test metrics}``
    (see :meth:`CurvatureMetrics.per_model`)."""
    S = {k: dataset.std_est[v].double() for k, v in split.items()}
    y = {k: dataset.y[v].double() for k, v in split.items()}
    out = {"s-affine": apply_affine(metrics, fit_affine(metrics, S["train"], y["train"]), S["test"]),
           "s-shrink": apply_shrink(metrics, fit_shrink(metrics, S["train"], y["train"]), S["test"])}
    var = {k: gradient_square_variance(dataset, v) for k, v in split.items()}
    f = {k: StatsMLP.features(metrics, S[k], var[k]) for k in split}
    mlp = fit_stats_mlp(metrics, (f["train"], S["train"], y["train"]), (f["val"], S["val"], y["val"]), seed)
    with torch.no_grad():
        out["stats-mlp"] = mlp(f["test"], S["test"]).double()
    return {name: metrics.per_model(pred, y["test"]) for name, pred in out.items()}


def noise_floor(dataset, items: list[int], metrics: CurvatureMetrics) -> dict[str, Tensor]:
    """Per-model metrics of the true Fisher diagonal against the targets, estimated from the set: each target
    entry is a mean of ``num_fisher_points`` squared gradients, so its error variance is about var(g^2) /
    num_fisher_points. Returns ``{"nmse": [n, T]}`` (expected values)."""
    var = gradient_square_variance(dataset, items) / dataset.config["num_fisher_points"]
    return {"nmse": _per_tensor(metrics, var) / metrics.mean_square}
