"""Curvature estimation: every model over training sizes and seeds, against S and calibrated estimators.

Each (model, size, seed) is one resumable run of :func:`gradgraph.tasks.train_curvature` (finished runs are
read back from their ``metrics.json``), so an interrupted grid continues where it stopped, and ``--shard i/n``
splits the grid across processes or machines that share the output folder. Per training size the calibrated
standard estimators (:mod:`gradgraph.tasks.curvature_baselines`) are fitted once and cached beside the runs.
The table and plot are made from whatever runs are finished (see :mod:`gradgraph.bench.curvature_report`):
the headline metric is the per-tensor normalized error (every layer counts), with paired bootstrap intervals
over test models for every improvement, the paper's z-scored MSE beside it, and the noise floor of the
Monte Carlo targets.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..io import atomic_write_text
from ..tasks.curvature import CurvatureConfig, CurvatureTask, load_dataset, train_curvature
from ..tasks.curvature_baselines import fit_all, noise_floor
from ..train.checkpoint import RunDir
from ..train.loop import on_epoch, progress_bar
from .curvature_report import plot, report
from .measure import machine_description, write_report
from .options import CURVATURE_PRESETS as PRESETS
from .options import curvature as add_arguments  # noqa: F401 (the benchmark's entry point)


def grid(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    for key in ("models", "sizes", "seeds", "epochs", "patience", "num_models"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def _configs(args, g: dict) -> list[CurvatureConfig]:
    out_dir = args.out_dir or f"runs/curvature-{args.preset}"
    root = None if not args.datasets_dir else str(Path(args.datasets_dir) / "siren_fisher")
    return [CurvatureConfig(model=m, train_size=n, seed=s, epochs=g["epochs"], patience=g["patience"],
                            num_models=g["num_models"], num_points=g.get("num_points", 128), out_dir=out_dir,
                            device=args.device, output=args.output, loss=args.loss, select=args.select,
                            dataset_root=root)
            for n in g["sizes"] for m in g["models"] for s in g["seeds"]]


def calibrated(cfg: CurvatureConfig, dataset) -> dict:
    """Per-model test metrics of the calibrated baselines and the noise floor for ``cfg.train_size``, fitted
    once and cached in ``<out_dir>/calibrated-n<size>.json`` (keyed by the dataset settings)."""
    path = Path(cfg.out_dir) / f"calibrated-n{cfg.train_size}.json"
    key = {"dataset": dataset.config, "train_size": cfg.train_size}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["results"]
    task = CurvatureTask(cfg, dataset, progress=False)
    task.setup()
    per_model = fit_all(dataset, task.split, task.metrics)
    per_model["standard"] = task.per_model(None, "test")
    per_model["noise floor"] = noise_floor(dataset, task.split["test"], task.metrics)
    results = {name: {k: v.tolist() for k, v in r.items()} for name, r in per_model.items()}
    atomic_write_text(json.dumps({"key": key, "results": results}), path)
    return results


def collect(configs) -> dict:
    """{(model, size): [metrics of each finished seed]} (runs of the same name with other settings are not
    this grid's and are skipped)."""
    results: dict = {}
    for cfg in configs:
        m = RunDir(cfg.run_dir, cfg.identity()).finished()
        if m is not None:
            results.setdefault((cfg.model, cfg.train_size), []).append(m)
    return results


class GridProgress:
    """One progress bar over the whole grid, in units of work (an epoch of a run counts 3 per training model,
    forward + backward, and 1 per validation model), so that its ETA covers every remaining run, not only the
    current one; runs already finished count at once, runs stopped early give their remaining epochs back."""

    def __init__(self, configs, dataset, enabled: bool = True) -> None:
        self.per_epoch = {}
        for cfg in configs:
            split = dataset.split_indices(cfg.train_size)
            self.per_epoch[cfg.run_name()] = 3 * len(split["train"]) + len(split["val"])
        self.seen: dict[str, int] = {}
        self.done = 0
        self.total = total = sum(self.per_epoch[c.run_name()] * c.epochs for c in configs)
        self.bar = progress_bar(total=total, enabled=enabled, desc=f"grid of {len(configs)} runs", unit="work",
                                unit_scale=True, position=0, smoothing=0.1)
        self.epochs = {c.run_name(): c.epochs for c in configs}

    def __call__(self, cfg, epoch: int, done: bool) -> None:
        name = cfg.run_name()
        if name not in self.per_epoch:
            return
        target = self.epochs[name] if done else epoch
        new = target - self.seen.get(name, 0)
        if new > 0:
            self.seen[name] = target
            self.done += new * self.per_epoch[name]
            self.bar.update(new * self.per_epoch[name])

    def close(self) -> None:
        self.bar.close()


def run(args) -> int:
    if args.datasets_dir:
        os.environ["GRADGRAPH_DATASETS"] = args.datasets_dir  # datasets the runs open themselves
    g = grid(args)
    configs = _configs(args, g)
    i, n = (int(x) for x in args.shard.split("/"))
    t0 = time.perf_counter()
    ds = None
    if not args.report_only:
        ds = load_dataset(configs[0], progress=not args.quiet)
        mine = [cfg for k, cfg in enumerate(configs) if k % n == i]
        grid_bar = GridProgress(mine, ds, enabled=not args.quiet)
        with on_epoch(grid_bar):
            for cfg in mine:
                train_curvature(cfg, ds, progress=not args.quiet)
        grid_bar.close()
    refs: dict = {}
    if args.calibrated:
        for size in g["sizes"]:
            cfg = next(c for c in configs if c.train_size == size)
            if ds is None:
                ds = load_dataset(cfg, progress=not args.quiet)
            refs[size] = calibrated(cfg, ds)
    results = collect(configs)
    header = (f"Table written on: {machine_description()}. Wall time of this call: "
              f"{(time.perf_counter() - t0) / 60:.1f} min. Runs: --output {args.output} --loss {args.loss} "
              f"--select {args.select}.")
    table = report(results, refs, g, header)
    return write_report(table, args.results, f"curvature_{args.preset}", lambda png: plot(results, refs, png))
