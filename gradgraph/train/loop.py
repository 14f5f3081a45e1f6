"""The one training loop of gradgraph: a :class:`Task` says what to learn, :func:`train` does the rest.

The loop owns epochs (or a step budget), the split of every global batch across torch.distributed ranks,
DistributedDataParallel, validation after every epoch, early stopping on the task's validation metric, the
best-validation weights, an atomic checkpoint after every epoch (a rerun with the same settings resumes from
it, on any device), a progress bar with the metrics, seeding, and the metrics JSON of the finished run.

Under torch.distributed every global batch of ``batch_size`` items is split across the ranks and the loss is
weighted so that the averaged gradient equals the single-process one; results match a single-process run up
to float summation order. Rank 0 writes the files.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import RunDir
from .config import TrainConfig
from .distributed import all_sum, barrier, is_main, world, wrap

__all__ = ["Task", "train", "epoch_order", "progress_bar", "on_epoch"]


class Task:
    """What a training run learns. Subclass it, set ``loss_name`` and ``monitor``, implement the methods
    below, and register the config class that names it (see :mod:`gradgraph.tasks`).

    The loop calls, in order: ``setup()`` (load the data), ``build_model()`` (after seeding torch with
    ``cfg.seed``), ``optimizer(model)``, ``initialize(model)`` (fresh runs only: data-dependent
    initialization), then per step ``batch(items)`` and ``loss(model, batch)``, per epoch ``evaluate(model,
    "val")``, and at the end ``final_metrics(model)`` with the best-validation weights loaded.
    """

    loss_name = "loss"  # history key: train_<loss_name>
    monitor = "loss"  # the key of evaluate()'s dict minimized on the validation split: val_<monitor>

    def __init__(self, cfg: TrainConfig, dataset=None, progress: bool = True) -> None:
        self.cfg, self.data, self.progress = cfg, dataset, progress

    def setup(self) -> None:
        """Load (or generate) the data; called once per run, after the check for a finished run."""

    def train_items(self) -> list[int]:
        """Indices of the training items (the loop shuffles them every epoch)."""
        raise NotImplementedError

    def batch(self, items: list[int]):
        """The batch of ``items``, on ``cfg.device``."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def initialize(self, model: nn.Module) -> None:
        """Data-dependent initialization of a new model (not called when a run resumes)."""

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr)

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, int]:
        """``(sum of the batch's loss terms, number of terms)``: the loop divides by the global number of terms."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics of ``model`` on a split (``"val"`` after every epoch); must contain ``monitor``."""
        raise NotImplementedError

    def final_metrics(self, model: nn.Module) -> dict:
        """Metrics of the finished run, with the best-validation weights loaded."""
        return {f"test_{k}": v for k, v in self.evaluate(model, "test").items()}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` training items in ``epoch``: a permutation that depends only on (seed, epoch), so an
    interrupted run resumes with the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar shown on rank 0 only."""
    return tqdm(iterable, disable=not enabled or not is_main(), **kwargs)


_EPOCH_HOOKS: list = []


@contextmanager
def on_epoch(hook):
    """Call ``hook(cfg, epoch, done)`` after every epoch of every :func:`train` inside the block (``done``: the
    run ended, by its epoch budget, early stopping or a step limit; a run read back finished calls it once with
    its ``epochs_run``). A grid of runs uses it for one progress bar over the whole grid."""
    _EPOCH_HOOKS.append(hook)
    try:
        yield hook
    finally:
        _EPOCH_HOOKS.remove(hook)


def _notify(cfg, epoch: int, done: bool) -> None:
    for hook in _EPOCH_HOOKS:
        hook(cfg, epoch, done)


def _fresh_state() -> dict:
    return {"epoch": 0, "step": 0, "best_val": float("inf"), "best_epoch": -1, "best_state": None, "history": [],
            "train_time": 0.0}


def train(task: Task, progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train (or resume, or read back) one run of ``task`` and return its metrics (also in ``metrics.json``).

    ``stop_after_epochs`` ends this call after that many epochs, leaving the checkpoint behind (to test
    resumption); it then returns ``{"interrupted": True, "epoch": ...}``."""
    cfg = task.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.run_dir, cfg.identity())
    run.claim(cfg.overwrite)
    done = run.finished()
    if done is not None:
        _notify(cfg, done.get("epochs_run", cfg.epochs), True)
        return done
    task.setup()
    rank, size = world()
    torch.manual_seed(cfg.seed)
    model = task.build_model().to(cfg.device)
    opt = task.optimizer(model)
    state = _fresh_state()
    ckpt = run.load_checkpoint(map_location=cfg.device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
    else:
        task.initialize(model)
    net = wrap(model, cfg.device)
    items = task.train_items()
    train_key, val_key = f"train_{task.loss_name}", f"val_{task.monitor}"
    bar = progress_bar(range(state["epoch"], cfg.epochs), progress and task.progress, desc=run.path.name,
                       unit="epoch", initial=state["epoch"], total=cfg.epochs)
    epochs_this_call = 0
    for epoch in bar:
        t0 = time.perf_counter()
        net.train()
        order = [items[i] for i in epoch_order(len(items), cfg.seed, epoch)]
        total = count = 0.0
        for start in range(0, len(order), cfg.batch_size):
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                break
            global_batch = order[start:start + cfg.batch_size]
            mine = global_batch[rank::size]
            loss_sum, n = task.loss(net, task.batch(mine or global_batch[:1]))
            if not mine:  # a rank without items still joins the all-reduce of DDP
                loss_sum, n = loss_sum * 0.0, 0
            sum_all, n_all = all_sum([float(loss_sum.detach()), n])
            opt.zero_grad(set_to_none=True)
            (loss_sum * (size / n_all)).backward()  # DDP averages over ranks: the gradient of sum / n_all
            opt.step()
            state["step"] += 1
            total, count = total + sum_all / n_all * len(global_batch), count + len(global_batch)
        val = task.evaluate(model, "val")[task.monitor]
        state["train_time"] += time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, train_key: total / max(count, 1), val_key: val})
        if val < state["best_val"]:
            state.update(best_val=val, best_epoch=epoch + 1, best_state=copy.deepcopy(model.state_dict()))
        state["epoch"] = epoch + 1
        run.save_checkpoint(model.state_dict(), opt.state_dict(), state)
        bar.set_postfix(train=f"{total / max(count, 1):.4f}", val=f"{val:.4f}", best=f"{state['best_val']:.4f}")
        epochs_this_call += 1
        stop = ((cfg.patience is not None and state["epoch"] - state["best_epoch"] >= cfg.patience)
                or (cfg.max_steps is not None and state["step"] >= cfg.max_steps))
        _notify(cfg, state["epoch"], stop or state["epoch"] >= cfg.epochs)
        if stop:
            break
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and state["epoch"] < cfg.epochs:
            bar.close()
            return {"interrupted": True, "epoch": state["epoch"]}
    bar.close()

    model.load_state_dict(state["best_state"])
    metrics = {"config": {**asdict(cfg), "identity": cfg.identity()},
               "parameters": sum(p.numel() for p in model.parameters()),
               "epochs_run": state["epoch"], "steps_run": state["step"], "best_epoch": state["best_epoch"],
               val_key: state["best_val"], **task.final_metrics(model), "train_time_s": state["train_time"],
               "history": state["history"]}
    run.finish(metrics, state["best_state"])
    barrier()
    return metrics
