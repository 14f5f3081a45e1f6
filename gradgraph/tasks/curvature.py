"""Curvature estimation: learn the Fisher diagonal of a SIREN from a set of its gradients (paper Sec. 5.1).

Protocol: targets z-scored with one scalar mean/std (of the training targets), Adam lr 1e-3, batch 32, up to
100 epochs, the best-validation checkpoint, about 15K parameters per model (where the architecture allows it),
test error as mean squared error in z units over every parameter of every test model. The standard estimator
is the diagonal of the empirical Fisher of the same gradients the graph holds.

A run lives in ``<out_dir>/<model>-n<train_size>-s<seed>/``: ``checkpoint.pt`` (written atomically after every
epoch; a rerun with the same settings resumes from it), ``metrics.json`` (written when the run ends).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

from ..data.common import atomic_save, atomic_write_text
from ..data.siren_fisher import SirenFisher
from ..nn import GradMetaNet, GradMetaNetPlusPlus
from ..nn.baselines import BatchAsymmetric, MLPConcat, NeuronAsymmetric, WeightSpaceGMN

MODELS = ("gradmetanet", "gradmetanet++", "mlp-concat", "neuron-asym", "batch-asym", "gmn-average", "gmn-concat")


def build_model(name: str, set_size: int, example_graph=None) -> nn.Module:
    """A curvature model by name, sized to about 15K parameters where its input layout allows."""
    if name == "gradmetanet":
        return GradMetaNet(hidden_channels=26, num_layers=3, set_layers=2, out_level="param", bilinear_channels=8)
    if name == "gradmetanet++":
        return GradMetaNetPlusPlus(hidden_channels=20, num_layers=2, out_level="param", heads=4, head_hidden=16)
    if name == "mlp-concat":  # input = every entry of the graph: its first layer alone exceeds 15K parameters
        return MLPConcat(hidden_channels=8, num_layers=2, out_level="param", example_graph=example_graph)
    if name == "neuron-asym":
        return NeuronAsymmetric(hidden_channels=12, num_layers=3, out_level="param", example_graph=example_graph)
    if name == "batch-asym":
        return BatchAsymmetric(hidden_channels=16, num_layers=3, out_level="param", example_graph=example_graph)
    if name == "gmn-average":
        return WeightSpaceGMN(hidden_channels=22, num_layers=3, out_level="param", mode="average")
    if name == "gmn-concat":
        return WeightSpaceGMN(hidden_channels=20, num_layers=3, out_level="param", mode="concat", set_size=set_size)
    raise ValueError(f"unknown curvature model {name!r}: choose one of {', '.join(MODELS)}")


@dataclass
class CurvatureConfig:
    """Settings of one training run (the defaults are the paper's protocol)."""

    model: str = "gradmetanet"
    train_size: int = 2000
    seed: int = 0
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    patience: int | None = None  # stop after this many epochs without a better validation error
    num_models: int = 3000
    num_points: int = 128
    data_seed: int = 0
    dataset_root: str | None = None
    out_dir: str = "runs/curvature"
    device: str = "cpu"
    threads: int | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / f"{self.model}-n{self.train_size}-s{self.seed}"

    def identity(self) -> dict:
        """The settings a checkpoint must match to be resumed."""
        d = asdict(self)
        for k in ("out_dir", "device", "threads", "dataset_root"):
            d.pop(k)
        return d


@dataclass
class Split:
    """A split's graphs and its z-scored targets and standard-estimator values (concatenated theta order)."""

    indices: list[int]
    y: torch.Tensor = field(repr=False)
    std_est: torch.Tensor = field(repr=False)


def _errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    diff = pred - target
    return {"mse": float(diff.pow(2).mean()), "mae": float(diff.abs().mean())}


@torch.no_grad()
def predict(model: nn.Module, dataset, indices: list[int], batch_size: int, mu: float, sigma: float,
            device: str = "cpu") -> torch.Tensor:
    """Predictions in z units for the graphs ``indices``, concatenated in theta order: [sum P]."""
    model.eval()
    out = [model(b.to(device)).squeeze(-1).float().cpu()
           for b in DataLoader(dataset[indices], batch_size=batch_size, shuffle=False)]
    return torch.cat(out)


def load_dataset(cfg: CurvatureConfig, progress: bool = True) -> SirenFisher:
    return SirenFisher(cfg.dataset_root, num_models=cfg.num_models, num_points=cfg.num_points, seed=cfg.data_seed,
                       progress=progress)


def train_curvature(cfg: CurvatureConfig, dataset: SirenFisher | None = None, progress: bool = True,
                    stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) one run and return its metrics (also written to ``metrics.json``).

    ``stop_after_epochs`` ends the process early after that many epochs of this call, leaving the
    checkpoint behind (used to test resumption); the run then reports ``{"interrupted": True}``."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown curvature model {cfg.model!r}: choose one of {', '.join(MODELS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = cfg.run_dir
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        done = json.loads(metrics_path.read_text())
        if done.get("config", {}).get("identity") == cfg.identity():
            return done
    ds = dataset if dataset is not None else load_dataset(cfg, progress)
    split = ds.split_indices(cfg.train_size)
    y_train = ds.y[split["train"]]
    mu, sigma = float(y_train.mean()), float(y_train.std()) if len(split["train"]) > 1 else 1.0
    sigma = sigma if sigma > 0 else 1.0

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.config["num_points"], example_graph=ds[split["train"][0]])
    model.to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "best_state": None, "history": [],
             "train_time": 0.0}
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["identity"] == cfg.identity():
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            state = ckpt["state"]
    val_y = (ds.y[split["val"]].reshape(-1) - mu) / sigma
    bar = tqdm(range(state["epoch"], cfg.epochs), desc=f"{cfg.model} n={cfg.train_size} s={cfg.seed}",
               unit="epoch", disable=not progress, initial=state["epoch"], total=cfg.epochs)
    epochs_this_call = 0
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(split["train"]), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        train_idx = [split["train"][i] for i in order]
        total, count = 0.0, 0
        for batch in DataLoader(ds[train_idx], batch_size=cfg.batch_size, shuffle=False):
            batch = batch.to(cfg.device)
            pred = model(batch).squeeze(-1)
            loss = (pred - (batch.y - mu) / sigma).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * batch.num_graphs, count + batch.num_graphs
        val = _errors(predict(model, ds, split["val"], cfg.batch_size, mu, sigma, cfg.device), val_y)["mse"]
        state["train_time"] += time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, "train_mse": total / count, "val_mse": val})
        if val < state["best_val"]:
            state.update(best_val=val, best_epoch=epoch + 1, best_state=copy.deepcopy(model.state_dict()))
        state["epoch"] = epoch + 1
        atomic_save({"identity": cfg.identity(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "state": state}, ckpt_path)
        bar.set_postfix(train=f"{total / count:.4f}", val=f"{val:.4f}", best=f"{state['best_val']:.4f}")
        epochs_this_call += 1
        if cfg.patience is not None and state["epoch"] - state["best_epoch"] >= cfg.patience:
            break
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and state["epoch"] < cfg.epochs:
            bar.close()
            return {"interrupted": True, "epoch": state["epoch"]}
    bar.close()

    model.load_state_dict(state["best_state"])
    test_y = (ds.y[split["test"]].reshape(-1) - mu) / sigma
    test = _errors(predict(model, ds, split["test"], cfg.batch_size, mu, sigma, cfg.device), test_y)
    standard = _errors((ds.std_est[split["test"]].reshape(-1) - mu) / sigma, test_y)
    metrics = {
        "config": {**asdict(cfg), "identity": cfg.identity()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs_run": state["epoch"], "best_epoch": state["best_epoch"], "val_mse": state["best_val"],
        "test_mse": test["mse"], "test_mae": test["mae"],
        "standard_test_mse": standard["mse"], "standard_test_mae": standard["mae"],
        "improvement_mse": 1 - test["mse"] / standard["mse"], "improvement_mae": 1 - test["mae"] / standard["mae"],
        "target_mean": mu, "target_std": sigma, "train_time_s": state["train_time"],
        "history": state["history"],
    }
    atomic_write_text(json.dumps(metrics, indent=1), metrics_path)
    atomic_save({"identity": cfg.identity(), "model": state["best_state"], "metrics": {
        k: v for k, v in metrics.items() if k != "history"}}, run_dir / "best.pt")
    ckpt_path.unlink(missing_ok=True)  # the finished run keeps best.pt and metrics.json
    return metrics
