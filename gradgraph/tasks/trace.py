"""The scaled curvature variant: learn the Fisher trace tr(F) of a million-parameter SIREN from the gradient
graph of 32 inputs (the paper's Sec. 5.1 "scaled" experiment; data: :class:`gradgraph.data.SirenTrace`).

Estimate ``S * exp(h)``: S is the standard estimator (the mean over the graph's samples of their squared
gradient norms, unbiased for tr(F)), h the metanetwork's graph-level output (so every estimate is positive and
an untrained model starts near S); loss: the squared log-ratio to the target, averaged over models; model
selection on the validation mean absolute log-ratio.

Metrics, per test model then averaged: ``logratio`` |log(pred / y)| (the headline: scale-free),
``relerr`` |pred - y| / y, and ``nmae``, the mean absolute error divided by that of predicting the training
mean of y (1 = knowing nothing; the paper's "normalized MAE" is of this kind, its exact normalisation is not
stated). Beside the model, fitted on the same training split: ``standard`` (S), ``s-calibrated``
(``exp(a log S + b)``, least squares) and ``pooled-mlp`` (an MLP on pooled statistics of the set: per layer
log mean ||a||^2 and ||g||^2 over the samples, log S, the spread of the squared norms, the inputs' mean and
std; it predicts a log-correction of S), with paired bootstrap intervals over test models and an estimate of
the targets' own Monte Carlo noise (``noise_logratio``).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ..data.siren_trace import SirenTrace
from ..errors import UnknownNameError
from ..nn import calibrate_scales
from ..nn.registry import METANETWORKS
from ..train.distributed import world
from ..train.loop import Task, train
from .configs import TRACE_MODELS, TraceConfig
from .curvature import MAX_LOG_RATIO, OutputAffine
from .curvature_metrics import paired_bootstrap

__all__ = ["TraceTask", "TraceConfig", "train_trace", "set_statistics", "pooled_statistics", "StatsAugmented",
           "fit_baselines", "noise_logratio", "TRACE_METRICS"]

TRACE_METRICS = ("logratio", "relerr", "nmae")
CALIBRATION_GRAPHS = 64  # training graphs that set the frozen input scales


def load_dataset(cfg: TraceConfig, progress: bool = True) -> SirenTrace:
    return SirenTrace(cfg.dataset_root, num_models=cfg.num_models, num_points=cfg.num_points,
                      hidden=(cfg.width, cfg.width), seed=cfg.data_seed, progress=progress and world()[0] == 0)


def per_model_errors(pred: Tensor, y: Tensor) -> dict[str, Tensor]:
    """[n] each: |log(pred / y)|, |pred - y| / y and |pred - y| (``nmae`` divides the last by the mean
    predictor's MAE when summarized)."""
    pred, y = pred.double().reshape(-1), y.double().reshape(-1)
    err = (pred - y).abs()
    ratio = torch.log(pred.clamp_min(1e-300) / y).abs()
    return {"logratio": ratio, "relerr": err / y, "abserr": err}


def summarize(errors: dict[str, Tensor], mean_mae: float) -> dict[str, float]:
    return {"logratio": float(errors["logratio"].mean()), "relerr": float(errors["relerr"].mean()),
            "nmae": float(errors["abserr"].mean()) / mean_mae}


# -- cheap baselines ----------------------------------------------------------------------------------------
def set_statistics(batch) -> Tensor:
    """[G, 2 L + 4] permutation-invariant statistics of each graph's set, for a batch of graphs of one
    structure (a SirenTrace batch, or one graph with ``sq_norms``): per layer with a (or g) the log of the mean
    over samples of ||a||^2 (||g||^2), then log S, the std of the squared per-sample gradient norms over S, and
    the mean and std of the scalar inputs."""
    spec = batch.specs[0]
    if any(s is not spec and s.to_dict() != spec.to_dict() for s in batch.specs):
        raise ValueError("set_statistics needs a batch of graphs of one structure (one architecture and set size)")
    G = len(batch.specs)  # a single graph or a batch
    ex = batch.entry_x.reshape(G, -1, batch.entry_x.shape[-1]).double()
    feats = []
    for lay in spec.layers:
        for ch, blk in ((0, lay.a), (1, lay.g)):
            if blk is not None:
                v = ex[:, blk.start:blk.start + blk.count, ch]  # [G, b * spatial * n]
                feats.append(torch.log((v.pow(2).sum(1) / spec.groups[blk.group][0]).clamp_min(1e-300)))
    sq = batch.sq_norms.reshape(G, -1).double()
    first = spec.layers[0].a
    x = ex[:, first.start:first.start + first.count, 0]
    feats += [torch.log(sq.mean(1)), sq.std(1) / sq.mean(1), x.mean(1), x.std(1)]
    return torch.stack(feats, 1)


def pooled_statistics(dataset: SirenTrace, items: list[int]) -> Tensor:
    """:func:`set_statistics` of ``items``: [len(items), 2 L + 4]."""
    return torch.cat([set_statistics(b) for b in dataset.batches(items, 64)])


class StatsAugmented(nn.Module):
    """A graph-level metanetwork whose output embedding is joined with the set statistics of
    :func:`set_statistics` (standardized with constants set from training graphs) before a final MLP: it
    starts from what the pooled-statistics baseline sees, so what it gains over that baseline is what the
    metanetwork adds. Invariant like the metanetwork (the statistics are)."""

    def __init__(self, net: nn.Module, num_stats: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = net
        self.mlp = nn.Sequential(nn.Linear(net.out_channels + num_stats, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.register_buffer("stats_mean", torch.zeros(num_stats))
        self.register_buffer("stats_std", torch.ones(num_stats))

    @torch.no_grad()
    def set_normalization(self, stats: Tensor) -> None:
        self.stats_mean.copy_(stats.mean(0))
        self.stats_std.copy_(stats.std(0).clamp_min(1e-12))

    def forward(self, graph) -> Tensor:
        z = ((set_statistics(graph) - self.stats_mean) / self.stats_std).to(graph.entry_x.dtype)
        return self.mlp(torch.cat([self.net(graph), z], 1))


def _fit_pooled_mlp(X: dict[str, Tensor], logS: dict[str, Tensor], logy: dict[str, Tensor], seed: int,
                    steps: int = 1500) -> Tensor:
    """Train ``log S + MLP(standardized X)`` on the squared log-ratio (Adam, full batch), keep the best
    validation weights; return the test log-predictions."""
    mean, std = X["train"].mean(0), X["train"].std(0).clamp_min(1e-12)
    Z = {k: ((v - mean) / std).float() for k, v in X.items()}
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(Z["train"].shape[1], 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1))
    with torch.no_grad():  # start at S itself
        net[-1].weight.zero_()
        net[-1].bias.zero_()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    best, best_state = float("inf"), copy.deepcopy(net.state_dict())
    for _ in range(steps):
        opt.zero_grad()
        loss = (logS["train"] + net(Z["train"])[:, 0].double() - logy["train"]).pow(2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = float((logS["val"] + net(Z["val"])[:, 0].double() - logy["val"]).abs().mean())
        if val < best:
            best, best_state = val, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    with torch.no_grad():
        return logS["test"] + net(Z["test"])[:, 0].double()


def fit_baselines(dataset: SirenTrace, split: dict[str, list[int]], seed: int = 0) -> dict[str, Tensor]:
    """Test predictions [n_test] of ``standard``, ``s-calibrated`` and ``pooled-mlp`` (fitted on ``split``'s
    train part, the MLP selected on its val part)."""
    logS = {k: torch.log(dataset.std_est[v].double().reshape(-1)) for k, v in split.items()}
    logy = {k: torch.log(dataset.y[v].double().reshape(-1)) for k, v in split.items()}
    X = torch.stack([logS["train"], torch.ones_like(logS["train"])], 1)
    a, b = torch.linalg.lstsq(X, logy["train"][:, None]).solution[:, 0].tolist()
    feats = {k: pooled_statistics(dataset, v) for k, v in split.items()}
    return {"standard": logS["test"].exp(), "s-calibrated": (a * logS["test"] + b).exp(),
            "pooled-mlp": _fit_pooled_mlp(feats, logS, logy, seed).exp()}


def noise_logratio(dataset: SirenTrace, items: list[int]) -> float:
    """Expected |log(target / tr F)| from the targets' own Monte Carlo error, estimated per model from the
    spread of its squared gradient norms: ``sqrt(2 / pi) * cv / sqrt(num_fisher_points)`` (the normal
    approximation of a mean of that many draws), averaged over ``items``."""
    sq = dataset.sq_norms[items].double()
    cv = sq.std(1) / sq.mean(1)
    return float((math.sqrt(2 / math.pi) * cv / math.sqrt(dataset.config["num_fisher_points"])).mean())


# -- the task -----------------------------------------------------------------------------------------------
class TraceTask(Task):
    """Regress tr(F) per model; see the module docstring."""

    loss_name = "logsq"
    monitor = "logratio"

    def setup(self) -> None:
        cfg = self.cfg
        if self.data is None:
            self.data = load_dataset(cfg, self.progress)
        self.split = self.data.split_indices(cfg.train_size)
        y = self.data.y[self.split["train"]].double().reshape(-1)
        self.y_train_mean = float(y.mean())

    def train_items(self) -> list[int]:
        return self.split["train"]

    def batch(self, items: list[int]):
        return next(iter(self.data.batches(items, len(items)))).to(self.cfg.device)

    def build_model(self) -> nn.Module:
        name, hyper = TRACE_MODELS[self.cfg.model]
        hyper = dict(hyper)
        stats = hyper.pop("stats", False)
        example = self.data[self.split["train"][0]]
        net = METANETWORKS.build(name, example_graph=example, set_size=self.cfg.num_points, **hyper)
        if stats:
            net = StatsAugmented(net, pooled_statistics(self.data, self.split["train"][:1]).shape[1])
        return OutputAffine(net)

    def _log_ratio_target(self, batch) -> Tensor:
        return torch.log(batch.y.double() / batch.std_est.double()).to(batch.entry_x.dtype)

    def initialize(self, model: OutputAffine) -> None:
        calib, bs, dev = self.split["train"][:CALIBRATION_GRAPHS], self.cfg.batch_size, self.cfg.device
        if isinstance(model.net, StatsAugmented):
            model.net.set_normalization(pooled_statistics(self.data, self.split["train"]).to(dev))
        calibrate_scales(model.net, (b.to(dev) for b in self.data.batches(calib, bs)))
        model.net.eval()
        model.fit((b.to(dev) for b in self.data.batches(calib, bs)), self._log_ratio_target)
        model.train()

    def predict(self, model: nn.Module, batch) -> Tensor:
        """tr(F) estimates [G]."""
        h = model(batch).reshape(-1).double()
        return batch.std_est.double().reshape(-1) * torch.exp(h.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, int]:
        pred = self.predict(model, batch)
        return torch.log(pred / batch.y.double()).pow(2).sum(), batch.num_graphs

    @torch.no_grad()
    def predictions(self, model: nn.Module, split: str) -> Tensor:
        model.eval()
        items = self.split[split]
        return torch.cat([self.predict(model, b.to(self.cfg.device)).cpu()
                          for b in self.data.batches(items, self.cfg.batch_size)])

    def _mean_mae(self, split: str) -> float:
        y = self.data.y[self.split[split]].double().reshape(-1)
        return float((y - self.y_train_mean).abs().mean())

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        y = self.data.y[self.split[split]]
        return summarize(per_model_errors(self.predictions(model, split), y), self._mean_mae(split))

    def final_metrics(self, model: nn.Module) -> dict:
        """Test metrics of the model and of each baseline, the per-model errors, and paired bootstrap intervals
        of the model's improvement over each baseline (``improvement[baseline][metric]``)."""
        y = self.data.y[self.split["test"]]
        rows = {self.cfg.model: self.predictions(model, "test"), **fit_baselines(self.data, self.split, self.cfg.seed)}
        errors = {name: per_model_errors(pred, y) for name, pred in rows.items()}
        mean_mae = self._mean_mae("test")
        out = {f"test_{k}": v for k, v in summarize(errors[self.cfg.model], mean_mae).items()}
        out["rows"] = {name: summarize(e, mean_mae) for name, e in errors.items()}
        ours = errors[self.cfg.model]
        out["improvement"] = {
            name: {k: paired_bootstrap(ours[key], e[key]) for k, key in (("logratio", "logratio"),
                                                                        ("relerr", "relerr"), ("nmae", "abserr"))}
            for name, e in errors.items() if name != self.cfg.model}
        out["noise_logratio"] = noise_logratio(self.data, self.split["test"])
        out["test_per_model"] = {name: {k: v.tolist() for k, v in e.items()} for name, e in errors.items()}
        return out


def train_trace(cfg: TraceConfig, dataset: SirenTrace | None = None, progress: bool = True,
                stop_after_epochs: int | None = None) -> dict:
    """Train (or resume, or read back) one trace run; see :func:`gradgraph.train.train`."""
    if cfg.model not in TRACE_MODELS:
        raise UnknownNameError(f"unknown trace model {cfg.model!r}: choose one of {', '.join(TRACE_MODELS)}")
    return train(TraceTask(cfg, dataset, progress), progress, stop_after_epochs)
