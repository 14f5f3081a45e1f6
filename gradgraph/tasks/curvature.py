"""Curvature estimation: learn the Fisher diagonal of a SIREN from a set of its gradients (paper Sec. 5.1).

Protocol: targets z-scored with one scalar mean/std (of the training targets), Adam lr 1e-3, batch 32, up to
100 epochs, the best-validation checkpoint, about 15K parameters per model (where the architecture allows it),
test error as mean squared error in z units over every parameter of every test model. The standard estimator
is the diagonal of the empirical Fisher of the same gradients the graph holds.

A run lives in ``<out_dir>/<model>-n<train_size>-s<seed>/`` (see :class:`gradgraph.train.RunDir`): the
checkpoint after every epoch (a rerun with the same settings resumes from it), the metrics and best weights
when it ends. Multi-process: ``torchrun --nproc_per_node=N -m gradgraph.cli train curvature ...`` (see
:mod:`gradgraph.train.loop`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.loader import DataLoader

from ..data.siren_fisher import SirenFisher
from ..errors import UnknownNameError
from ..nn import calibrate_scales
from ..nn.registry import METANETWORKS
from ..train.distributed import all_sum, main_first, world
from ..train.loop import Task, train
from .configs import CURVATURE_MODELS, CurvatureConfig

__all__ = ["CurvatureTask", "CurvatureConfig", "MODELS", "build_model", "train_curvature", "evaluate",
           "OutputAffine"]

MODELS = tuple(CURVATURE_MODELS)
CALIBRATION_GRAPHS = 256  # training graphs used to set the frozen input/moment scales


class OutputAffine(nn.Module):
    """``scale * net(graph) + shift``: the last-layer initialization every curvature model gets, a least-squares
    fit of the untrained model's outputs to the z-scored training targets on the calibration batches (the same
    for every model, so the comparison stays fair; it matters for models whose outputs start at another scale,
    such as GradMetaNet's moment terms)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.scale = nn.Parameter(torch.ones(()))
        self.shift = nn.Parameter(torch.zeros(()))

    def forward(self, graph):
        return self.scale * self.net(graph) + self.shift

    @torch.no_grad()
    def fit(self, batches, mu: float, sigma: float) -> None:
        preds, targets = [], []
        for batch in batches:
            preds.append(self.net(batch).reshape(-1).double())
            targets.append(((batch.y - mu) / sigma).reshape(-1).double())
        p, t = torch.cat(preds), torch.cat(targets)
        p_c, t_c = p - p.mean(), t - t.mean()
        var = float(p_c.pow(2).sum())
        scale = float((p_c * t_c).sum()) / var if var > 0 else 0.0
        self.scale.fill_(scale)
        self.shift.fill_(float(t.mean()) - scale * float(p.mean()))


def build_model(name: str, set_size: int, example_graph=None) -> nn.Module:
    """The curvature model ``name`` (see :data:`gradgraph.tasks.configs.CURVATURE_MODELS`)."""
    if name not in CURVATURE_MODELS:
        raise UnknownNameError(f"unknown curvature model {name!r}: choose one of {', '.join(MODELS)}")
    metanet, hyper = CURVATURE_MODELS[name]
    return METANETWORKS.build(metanet, example_graph=example_graph, set_size=set_size, **hyper)


def _batches(dataset, indices: list[int], batch_size: int):
    """The dataset's own fast batcher when it has one, else PyG's DataLoader (same batches either way)."""
    if hasattr(dataset, "batches"):
        return dataset.batches(indices, batch_size)
    return DataLoader(dataset[indices], batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, indices: list[int], batch_size: int, mu: float, sigma: float,
             device: str = "cpu", predictions=None) -> dict[str, float]:
    """Mean squared and absolute error in z units over every parameter of the graphs ``indices`` (sharded
    across ranks under torch.distributed). ``predictions`` overrides the model with a function of the batch
    (the standard estimator)."""
    rank, size = world()
    model.eval()
    sse = sae = n = 0.0
    for batch in _batches(dataset, indices[rank::size], batch_size):
        batch = batch.to(device)
        pred = predictions(batch) if predictions is not None else model(batch).squeeze(-1)
        diff = pred.float() - (batch.y.float() - mu) / sigma
        sse, sae, n = sse + float(diff.pow(2).sum()), sae + float(diff.abs().sum()), n + diff.numel()
    sse, sae, n = all_sum([sse, sae, n])
    return {"mse": sse / n, "mae": sae / n}


def load_dataset(cfg: CurvatureConfig, progress: bool = True) -> SirenFisher:
    """The run's dataset (generated if needed; under torch.distributed rank 0 generates, the others wait)."""
    with main_first():
        return SirenFisher(cfg.dataset_root, num_models=cfg.num_models, num_points=cfg.num_points,
                           seed=cfg.data_seed, progress=progress and world()[0] == 0)


class CurvatureTask(Task):
    """Regress the z-scored Fisher diagonal of every parameter (loss: squared error per parameter)."""

    loss_name = "mse"
    monitor = "mse"

    def setup(self) -> None:
        cfg = self.cfg
        if self.data is None:
            self.data = load_dataset(cfg, self.progress)
        self.split = self.data.split_indices(cfg.train_size)
        y_train = self.data.y[self.split["train"]]
        self.mu = float(y_train.mean())
        sigma = float(y_train.std()) if len(self.split["train"]) > 1 else 1.0
        self.sigma = sigma if sigma > 0 else 1.0

    def train_items(self) -> list[int]:
        return self.split["train"]

    def batch(self, items: list[int]):
        return next(_batches(self.data, items, len(items))).to(self.cfg.device)

    def build_model(self) -> nn.Module:
        example = self.data[self.split["train"][0]]
        return OutputAffine(build_model(self.cfg.model, self.data.config["num_points"], example_graph=example))

    def initialize(self, model: OutputAffine) -> None:
        """Input/moment scales from the first training graphs (no targets; then frozen), then the output affine.
        Every rank calibrates on the same batches, so all get the same statistics without communicating."""
        calib, bs, dev = self.split["train"][:CALIBRATION_GRAPHS], self.cfg.batch_size, self.cfg.device
        calibrate_scales(model.net, (b.to(dev) for b in _batches(self.data, calib, bs)))
        model.net.eval()  # the frozen scales make eval and train agree; eval for the fit
        model.fit((b.to(dev) for b in _batches(self.data, calib, bs)), self.mu, self.sigma)
        model.train()

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        sq = (model(batch).squeeze(-1) - (batch.y - self.mu) / self.sigma).pow(2)
        return sq.sum(), sq.numel()

    def evaluate(self, model: nn.Module, split: str, predictions=None) -> dict[str, float]:
        return evaluate(model, self.data, self.split[split], self.cfg.batch_size, self.mu, self.sigma,
                        self.cfg.device, predictions)

    def final_metrics(self, model: nn.Module) -> dict:
        test = self.evaluate(model, "test")
        standard = self.evaluate(model, "test", predictions=lambda b: (b.std_est - self.mu) / self.sigma)
        return {"test_mse": test["mse"], "test_mae": test["mae"],
                "standard_test_mse": standard["mse"], "standard_test_mae": standard["mae"],
                "improvement_mse": 1 - test["mse"] / standard["mse"],
                "improvement_mae": 1 - test["mae"] / standard["mae"],
                "target_mean": self.mu, "target_std": self.sigma}


def train_curvature(cfg: CurvatureConfig, dataset: SirenFisher | None = None, progress: bool = True,
                    stop_after_epochs: int | None = None) -> dict:
    """Train (or resume, or read back) one curvature run; see :func:`gradgraph.train.train`."""
    if cfg.model not in CURVATURE_MODELS:
        raise UnknownNameError(f"unknown curvature model {cfg.model!r}: choose one of {', '.join(MODELS)}")
    return train(CurvatureTask(cfg, dataset, progress), progress, stop_after_epochs)
