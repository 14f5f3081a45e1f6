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

from pathlib import Path

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader
from torch_geometric.utils import scatter

from ..api import capture
from ..data.siren_fisher import SirenFisher, fisher_diagonal
from ..errors import StructureMismatchError, UnknownNameError
from ..io import load_file
from ..nn import calibrate_scales
from ..nn.registry import METANETWORKS
from ..train.distributed import all_sum_tensor, world
from ..train.loop import Task, train
from .configs import CURVATURE_MODELS, CurvatureConfig
from .curvature_baselines import fit_shrink, shrink_base
from .curvature_metrics import METRICS, CurvatureMetrics

__all__ = ["CurvatureTask", "CurvatureConfig", "MODELS", "build_model", "train_curvature", "OutputAffine", "load",
           "FisherEstimator", "estimate"]

MODELS = tuple(CURVATURE_MODELS)
CALIBRATION_GRAPHS = 256  # training graphs used to set the frozen input/moment scales


class OutputAffine(nn.Module):
    """``scale * net(graph) + shift``: the last-layer initialization every curvature model gets, a least-squares
    fit of the untrained model's outputs to the training targets (in the units of the task's output: log-ratios
    to the standard estimator, or z-scores) on the calibration batches. The same for every model, so the
    comparison stays fair; it matters for models whose outputs start at another scale, such as GradMetaNet's
    moment terms."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.scale = nn.Parameter(torch.ones(()))
        self.shift = nn.Parameter(torch.zeros(()))

    def forward(self, graph):
        return self.scale * self.net(graph) + self.shift

    @torch.no_grad()
    def fit(self, batches, target) -> None:
        """``target(batch)`` [G * P]: what the output should be."""
        preds, targets = [], []
        for batch in batches:
            preds.append(self.net(batch).reshape(-1).double())
            targets.append(target(batch).reshape(-1).double())
        p, t = torch.cat(preds), torch.cat(targets)
        p_c, t_c = p - p.mean(), t - t.mean()
        var = float(p_c.pow(2).sum())
        scale = float((p_c * t_c).sum()) / var if var > 0 else 0.0
        self.scale.fill_(scale)
        self.shift.fill_(float(t.mean()) - scale * float(p.mean()))


def build_model(name: str, set_size: int, example_graph=None, param_features: int = 0) -> nn.Module:
    """The curvature model ``name`` (see :data:`gradgraph.tasks.configs.CURVATURE_MODELS`); ``param_features``
    per-parameter input channels for the models that take them (GradMetaNet's parameter head)."""
    if name not in CURVATURE_MODELS:
        raise UnknownNameError(f"unknown curvature model {name!r}: choose one of {', '.join(MODELS)}")
    metanet, hyper = CURVATURE_MODELS[name]
    if param_features and metanet == "gradmetanet":
        hyper = {**hyper, "param_features": param_features}
    return METANETWORKS.build(metanet, example_graph=example_graph, set_size=set_size, **hyper)


def _tensor_segments(graph) -> torch.Tensor:
    """[sum P]: for every trainable scalar of a (batched) graph, the index of its (graph, parameter tensor)."""
    parts, offset = [], 0
    for spec in graph.specs:
        local = spec.__dict__.get("_tensor_segments")
        if local is None:  # cached per spec, like its other tables
            sizes = torch.tensor([p.numel for p in spec.trainable], dtype=torch.long)
            local = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
            object.__setattr__(spec, "_tensor_segments", local)
        parts.append(local + offset)
        offset += len(spec.trainable)
    return torch.cat(parts).to(graph.entry_x.device)


class LogStandardFeatures(nn.Module):
    """Feeds GradMetaNet's parameter head, per parameter, the log of the standard estimator S (the graph's
    ``std_est``) and of its mean over the parameter's tensor in the same model, both read from the graph's own
    gradients: the statistics a log-scale correction of S needs, on a scale the head can use. [sum P, 2]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, graph):
        S = graph.std_est.reshape(-1).double().clamp_min(1e-30)
        seg = _tensor_segments(graph)
        mean = scatter(S, seg, 0, reduce="mean")
        feats = torch.stack([S.log(), mean.log()[seg]], -1) / 10
        return self.net(graph, feats.to(graph.entry_x.dtype))


def _batches(dataset, indices: list[int], batch_size: int):
    """The dataset's own fast batcher when it has one, else PyG's DataLoader (same batches either way)."""
    if hasattr(dataset, "batches"):
        return dataset.batches(indices, batch_size)
    return DataLoader(dataset[indices], batch_size=batch_size, shuffle=False)


def load_dataset(cfg: CurvatureConfig, progress: bool = True) -> SirenFisher:
    """The run's dataset, generated if needed. Under torch.distributed every rank generates: the chunk store
    splits the chunks between them (gradgraph.data.store), so N ranks generate about N times faster."""
    return SirenFisher(cfg.dataset_root, num_models=cfg.num_models, num_points=cfg.num_points, seed=cfg.data_seed,
                       progress=progress and world()[0] == 0)


MAX_LOG_RATIO = 30.0  # |h| is clamped before exp: an untrained model cannot overflow float32


def estimate(out: torch.Tensor, base: torch.Tensor, output: str, mu: float, sigma: float) -> torch.Tensor:
    """The Fisher-diagonal estimate from a model's output ``out`` [G, P]: ``base * exp(h)`` for
    ``output="positive"`` (base: the standard estimator S) and ``"shrink"`` (base: S shrunk per tensor, see
    :func:`shrink_base`), the de-standardized output for ``"z"``."""
    if output == "z":
        return out * sigma + mu
    return base.to(out.dtype).clamp_min(1e-30) * torch.exp(out.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


class CurvatureTask(Task):
    """Regress the Fisher diagonal of every parameter. With ``output="positive"`` the model predicts
    ``h`` and the estimate is ``S * exp(h)`` (S the standard estimator of the same gradients, so the model
    starts near S and learns a log-correction; the estimate is positive by construction); with ``"shrink"``
    the base is the strongest calibrated baseline instead, S shrunk per tensor toward the model's mean of S
    with the per-tensor weights fitted on the training split (``s-shrink``), so the model learns only what
    that calibration misses; with ``"z"`` it predicts the globally z-scored target directly (the paper).
    Metrics: :mod:`.curvature_metrics`."""

    def setup(self) -> None:
        cfg = self.cfg
        if self.data is None:
            self.data = load_dataset(cfg, self.progress)
        self.split = self.data.split_indices(cfg.train_size)
        y_train = self.data.y[self.split["train"]]
        self.mu = float(y_train.mean())
        sigma = float(y_train.std()) if len(self.split["train"]) > 1 else 1.0
        self.sigma = sigma if sigma > 0 else 1.0
        sizes = [(p.name, p.numel) for p in self.data.spec.trainable]
        self.metrics = CurvatureMetrics(sizes, y_train, self.mu, self.sigma)
        # s-shrink's per-tensor weights, fitted on the training split only (the base of output="shrink")
        S_train = self.data.std_est[self.split["train"]]
        self.shrink = fit_shrink(self.metrics, S_train, y_train).clamp(0, 1).float()
        self.loss_name = {"normalized": "nmse", "log": "logsq", "z": "mse"}[cfg.loss]
        self.monitor = cfg.select

    def train_items(self) -> list[int]:
        return self.split["train"]

    def batch(self, items: list[int]):
        return next(_batches(self.data, items, len(items))).to(self.cfg.device)

    def build_model(self) -> nn.Module:
        example = self.data[self.split["train"][0]]
        log_features = self.cfg.output != "z" and CURVATURE_MODELS[self.cfg.model][0] == "gradmetanet"
        net = build_model(self.cfg.model, self.data.config["num_points"], example, param_features=2 * log_features)
        return OutputAffine(LogStandardFeatures(net) if log_features else net)

    def _standard(self, batch) -> torch.Tensor:
        return batch.std_est.view(batch.num_graphs, -1)

    def _base(self, batch) -> torch.Tensor:
        """[G, P]: what the model's log-correction multiplies (S, or S shrunk per tensor)."""
        S = self._standard(batch)
        return shrink_base(S, self.shrink, self.metrics.tensor_of) if self.cfg.output == "shrink" else S

    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        """Fisher-diagonal estimates [G, P] in the targets' units."""
        out = model(batch).reshape(batch.num_graphs, -1)
        return estimate(out, self._base(batch), self.cfg.output, self.mu, self.sigma)

    def _fit_target(self, batch) -> torch.Tensor:
        y = batch.y.view(batch.num_graphs, -1)
        if self.cfg.output == "z":
            return (y - self.mu) / self.sigma
        return torch.log(y.clamp_min(1e-30) / self._base(batch).clamp_min(1e-30))

    def initialize(self, model: OutputAffine) -> None:
        """Input/moment scales from the first training graphs (no targets; then frozen), then the output affine.
        Every rank calibrates on the same batches, so all get the same statistics without communicating."""
        calib, bs, dev = self.split["train"][:CALIBRATION_GRAPHS], self.cfg.batch_size, self.cfg.device
        calibrate_scales(model.net, (b.to(dev) for b in _batches(self.data, calib, bs)))
        model.net.eval()  # the frozen scales make eval and train agree; eval for the fit
        model.fit((b.to(dev) for b in _batches(self.data, calib, bs)), self._fit_target)
        model.train()

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        y = batch.y.view(batch.num_graphs, -1)
        return self.metrics.loss(self.predict(model, batch), y, self.cfg.loss), batch.num_graphs

    @torch.no_grad()
    def per_model(self, model: nn.Module | None, split: str) -> dict[str, torch.Tensor]:
        """Per-model metrics over a split (see CurvatureMetrics.per_model); ``model=None``: the standard
        estimator. Sharded across ranks under torch.distributed, then summed."""
        rank, size = world()
        items = self.split[split]
        if model is not None:
            model.eval()
        parts: dict[str, torch.Tensor] = {}
        mine = list(range(rank, len(items), size))
        for start in range(0, len(mine), self.cfg.batch_size):
            rows = mine[start:start + self.cfg.batch_size]
            batch = self.batch([items[r] for r in rows])
            pred = self._standard(batch) if model is None else self.predict(model, batch)
            for k, v in self.metrics.per_model(pred, batch.y.view(batch.num_graphs, -1)).items():
                if k not in parts:
                    parts[k] = torch.zeros((len(items),) + v.shape[1:], dtype=torch.float64)
                parts[k][rows] = v.cpu()
        if not parts:  # this rank had no items: still join the sums with zeros of the right shapes
            T = len(self.metrics.names)
            parts = {k: torch.zeros((len(items), T) if k in ("nmse", "logratio", "nonpos") else (len(items),),
                                    dtype=torch.float64) for k in METRICS}
        return {k: all_sum_tensor(v) for k, v in parts.items()}

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        return CurvatureMetrics.summarize(self.per_model(model, split))

    def final_metrics(self, model: nn.Module) -> dict:
        """Test metrics of the model and of the standard estimator, overall and per tensor, with the per-model
        values the benchmark's paired bootstrap needs (``test_per_model``, ``standard_per_model``)."""
        names = self.metrics.names
        ours, std = self.per_model(model, "test"), self.per_model(None, "test")
        out = {f"test_{k}": v for k, v in CurvatureMetrics.summarize(ours, names).items()}
        out.update({f"standard_test_{k}": v for k, v in CurvatureMetrics.summarize(std, names).items()})
        for k in ("mse", "mae", "nmse", "logratio"):
            out[f"improvement_{k}"] = 1 - out[f"test_{k}"] / out[f"standard_test_{k}"]
        out.update({"tensors": names, "target_mean": self.mu, "target_std": self.sigma,
                    "tensor_sizes": self.metrics.sizes.tolist(), "shrink": self.shrink.tolist(),
                    "test_per_model": {k: v.tolist() for k, v in ours.items()},
                    "standard_per_model": {k: v.tolist() for k, v in std.items()}})
        return out


def train_curvature(cfg: CurvatureConfig, dataset: SirenFisher | None = None, progress: bool = True,
                    stop_after_epochs: int | None = None) -> dict:
    """Train (or resume, or read back) one curvature run; see :func:`gradgraph.train.train`."""
    if cfg.model not in CURVATURE_MODELS:
        raise UnknownNameError(f"unknown curvature model {cfg.model!r}: choose one of {', '.join(MODELS)}")
    return train(CurvatureTask(cfg, dataset, progress), progress, stop_after_epochs)


class FisherEstimator:
    """A trained curvature model applied to any model gradgraph captures (see :func:`load`). A model trained
    with ``output="shrink"`` carries per-tensor weights of its training architecture and applies only to models
    with the same parameter tensors."""

    def __init__(self, cfg: CurvatureConfig, net: nn.Module, mu: float, sigma: float,
                 shrink: dict[str, tuple[float, int]] | None = None) -> None:
        """``shrink``: for ``output="shrink"``, per parameter tensor of the training architecture its
        (lambda, number of entries)."""
        self.cfg, self.net, self.mu, self.sigma, self.shrink = cfg, net.eval(), mu, sigma, shrink

    def _base(self, graph, standard: torch.Tensor) -> torch.Tensor:
        if self.cfg.output != "shrink":
            return standard
        have = {p.name: p.numel for p in graph.spec.trainable}
        trained = {name: size for name, (_, size) in self.shrink.items()}
        if have != trained:  # names and sizes: a SIREN of another width has the same names
            raise StructureMismatchError(
                f"this estimator was trained with output='shrink' on the parameter tensors (name: entries) "
                f"{trained}, but the model has {have}: its per-tensor shrinkage does not transfer; use a run "
                "trained with --output positive for other architectures")
        sizes = torch.tensor([p.numel for p in graph.spec.trainable])
        tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        lam = torch.tensor([self.shrink[p.name][0] for p in graph.spec.trainable])
        return shrink_base(standard, lam, tensor_of)

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs, targets=None, loss_fn=None) -> dict[str, torch.Tensor]:
        """The Fisher diagonal of ``model``'s per-sample quantity on this batch (as for :func:`gradgraph.capture`;
        the task was trained on the regression Fisher, ``loss_fn=None``): ``{name: tensor shaped like the
        parameter}``. The standard estimator of the same gradients is ``graph.std_est``'s decoding."""
        graph = capture(model, inputs, targets, loss_fn)
        graph.std_est = fisher_diagonal(graph).to(graph.entry_x.dtype)
        batch = Batch.from_data_list([graph])
        out = self.net(batch).reshape(1, -1)
        base = self._base(graph, batch.std_est.view(1, -1))
        return graph.graph_to_params(estimate(out, base, self.cfg.output, self.mu, self.sigma)[0])


def load(path) -> FisherEstimator:
    """The best-validation model of a finished curvature run (its folder, or its ``best.pt``)."""
    path = Path(path)
    best = path / "best.pt" if path.is_dir() else path
    payload = load_file(best, "weights", remedy="rerun the training to rewrite it")
    identity, metrics = dict(payload["identity"]), payload["metrics"]
    arch = identity.pop("architecture", None)
    cfg = CurvatureConfig(**identity)
    if arch is not None and arch != cfg.identity()["architecture"]:
        raise StructureMismatchError(f"{best} was trained with '{cfg.model}' = {arch}; this gradgraph defines "
                                     f"'{cfg.model}' as {cfg.identity()['architecture']}: use the gradgraph version "
                                     "that trained it, or retrain")
    log_features = cfg.output != "z" and CURVATURE_MODELS[cfg.model][0] == "gradmetanet"
    if CURVATURE_MODELS[cfg.model][0] not in ("gradmetanet", "gradmetanet++", "gmn") or cfg.model == "gmn-concat":
        raise StructureMismatchError(f"{best}: a '{cfg.model}' model flattens its training architecture into features "
                               "and cannot be applied to other models; use a gradmetanet or gmn-average run")
    net = build_model(cfg.model, cfg.num_points, param_features=2 * log_features)
    model = OutputAffine(LogStandardFeatures(net) if log_features else net)
    model.load_state_dict(payload["model"])
    shrink = None
    if cfg.output == "shrink":
        shrink = {n: (lam, size) for n, lam, size in zip(metrics["tensors"], metrics["shrink"],
                                                           metrics["tensor_sizes"])}
    return FisherEstimator(cfg, model, metrics["target_mean"], metrics["target_std"], shrink)
