"""Curvature estimation: learn the Fisher diagonal of a SIREN from a set of its gradients (paper Sec. 5.1).

Protocol: targets z-scored with one scalar mean/std (of the training targets), Adam lr 1e-3, batch 32, up to
100 epochs, the best-validation checkpoint, about 15K parameters per model (where the architecture allows it),
test error as mean squared error in z units over every parameter of every test model. The standard estimator
is the diagonal of the empirical Fisher of the same gradients the graph holds.

A run lives in ``<out_dir>/<model>-n<train_size>-s<seed>/``: ``checkpoint.pt`` (written atomically after every
epoch; a rerun with the same settings resumes from it), ``metrics.json`` (written when the run ends).

Multi-process: started under ``torchrun`` (``torchrun --nproc_per_node=N -m gradgraph.cli train curvature ...``),
each global batch is split across the ranks, the model is wrapped in DistributedDataParallel and the losses are
weighted so that the averaged gradient equals the single-process one; evaluation is sharded and all-reduced;
rank 0 writes the files. Results match a single-process run up to float summation order.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

from ..data.siren_fisher import SirenFisher
from ..io import atomic_save, atomic_write_text
from ..nn import GradMetaNet, GradMetaNetPlusPlus, calibrate_scales
from ..nn.baselines import BatchAsymmetric, MLPConcat, NeuronAsymmetric, WeightSpaceGMN

CALIBRATION_GRAPHS = 256  # training graphs used to set the frozen input/moment scales

MODELS = ("gradmetanet", "gradmetanet++", "mlp-concat", "neuron-asym", "batch-asym", "gmn-average", "gmn-concat",
          "gradmetanet-plain")


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
    """A curvature model by name, sized to about 15K parameters where its input layout allows.

    GradMetaNet and GradMetaNet++ start from the standard estimator (``head_init="fisher"``: their parameter
    head's moment terms begin as the empirical Fisher diagonal of the set) and learn corrections;
    ``gradmetanet-plain`` is the ablation without moment terms (the paper's pairwise head only)."""
    if name == "gradmetanet":
        return GradMetaNet(hidden_channels=26, num_layers=3, set_layers=2, out_level="param", bilinear_channels=8,
                           head_init="fisher")
    if name == "gradmetanet++":
        return GradMetaNetPlusPlus(hidden_channels=20, num_layers=2, out_level="param", heads=1, head_hidden=16,
                                   bilinear_channels=8, head_init="fisher")
    if name == "gradmetanet-plain":
        return GradMetaNet(hidden_channels=28, num_layers=3, set_layers=2, out_level="param", bilinear_channels=0)
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


def _world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float]) -> list[float]:
    if _world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, indices: list[int], batch_size: int, mu: float, sigma: float,
             device: str = "cpu", predictions=None) -> dict[str, float]:
    """Mean squared and absolute error in z units over every parameter of the graphs ``indices`` (sharded
    across ranks under torch.distributed). ``predictions`` overrides the model with a function of the batch
    (the standard estimator)."""
    rank, world = _world()
    model.eval()
    sse = sae = n = 0.0
    for batch in _batches(dataset, indices[rank::world], batch_size):
        batch = batch.to(device)
        pred = predictions(batch) if predictions is not None else model(batch).squeeze(-1)
        diff = pred.float() - (batch.y.float() - mu) / sigma
        sse, sae, n = sse + float(diff.pow(2).sum()), sae + float(diff.abs().sum()), n + diff.numel()
    sse, sae, n = _all_sum([sse, sae, n])
    return {"mse": sse / n, "mae": sae / n}


def _batches(dataset, indices: list[int], batch_size: int):
    """The dataset's own fast batcher when it has one, else PyG's DataLoader (same batches either way)."""
    if hasattr(dataset, "batches"):
        return dataset.batches(indices, batch_size)
    return DataLoader(dataset[indices], batch_size=batch_size, shuffle=False)


def load_dataset(cfg: CurvatureConfig, progress: bool = True) -> SirenFisher:
    """The run's dataset (generated if needed; under torch.distributed rank 0 generates, the others wait)."""
    rank, world = _world()
    if world > 1 and rank != 0:
        dist.barrier()
    ds = SirenFisher(cfg.dataset_root, num_models=cfg.num_models, num_points=cfg.num_points, seed=cfg.data_seed,
                     progress=progress and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    return ds


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

    rank, world = _world()
    torch.manual_seed(cfg.seed)
    model = OutputAffine(build_model(cfg.model, ds.config["num_points"], example_graph=ds[split["train"][0]]))
    model.to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "best_state": None, "history": [],
             "train_time": 0.0}
    ckpt_path = run_dir / "checkpoint.pt"
    resumed = False
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)  # resumable on another device
        if ckpt["identity"] == cfg.identity():
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            state, resumed = ckpt["state"], True
    if not resumed:  # data-dependent initialization: input/moment scales (no targets, then frozen), output affine
        calib = split["train"][: CALIBRATION_GRAPHS]

        def shares():  # each rank's part of every calibration batch (every rank takes part in every batch)
            for i in range(0, len(calib), cfg.batch_size):
                if len(calib[i:i + cfg.batch_size]) >= world:
                    mine = calib[i:i + cfg.batch_size][rank::world]
                    yield next(_batches(ds, mine, len(mine))).to(cfg.device)

        calibrate_scales(model.net, shares())
        model.net.eval()  # the frozen scales make eval and train agree; eval for the fit
        model.fit((b.to(cfg.device) for b in _batches(ds, calib, cfg.batch_size)), mu, sigma)
        model.train()
    dev = torch.device(cfg.device)
    net = (nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
           if world > 1 else model)
    bar = tqdm(range(state["epoch"], cfg.epochs), desc=f"{cfg.model} n={cfg.train_size} s={cfg.seed}",
               unit="epoch", disable=not progress or rank != 0, initial=state["epoch"], total=cfg.epochs)
    epochs_this_call = 0
    for epoch in bar:
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(len(split["train"]), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        train_idx = [split["train"][i] for i in order]
        total, count = 0.0, 0
        for start in range(0, len(train_idx), cfg.batch_size):
            global_batch = train_idx[start:start + cfg.batch_size]
            mine = global_batch[rank::world]
            batch = next(_batches(ds, mine or global_batch[:1], cfg.batch_size)).to(cfg.device)
            sq = (net(batch).squeeze(-1) - (batch.y - mu) / sigma).pow(2)
            sse = sq.sum() if mine else sq.sum() * 0.0  # a rank without graphs still joins the all-reduce
            sse_all, n_all = _all_sum([float(sse.detach()), sq.numel() if mine else 0])
            loss = sse * (world / n_all)  # DDP averages over ranks: the gradient of sum(sq) / n_all
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + sse_all / n_all * len(global_batch), count + len(global_batch)
        val = evaluate(model, ds, split["val"], cfg.batch_size, mu, sigma, cfg.device)["mse"]
        state["train_time"] += time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, "train_mse": total / count, "val_mse": val})
        if val < state["best_val"]:
            state.update(best_val=val, best_epoch=epoch + 1, best_state=copy.deepcopy(model.state_dict()))
        state["epoch"] = epoch + 1
        if rank == 0:
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
    test = evaluate(model, ds, split["test"], cfg.batch_size, mu, sigma, cfg.device)
    standard = evaluate(model, ds, split["test"], cfg.batch_size, mu, sigma, cfg.device,
                        predictions=lambda b: (b.std_est - mu) / sigma)
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
    if rank == 0:
        atomic_write_text(json.dumps(metrics, indent=1), metrics_path)
        atomic_save({"identity": cfg.identity(), "model": state["best_state"], "metrics": {
            k: v for k, v in metrics.items() if k != "history"}}, run_dir / "best.pt")
        ckpt_path.unlink(missing_ok=True)  # the finished run keeps best.pt and metrics.json
    if world > 1:
        dist.barrier()
    return metrics
