"""Curvature estimation: every model over training-set sizes and seeds, against the standard estimator.

Each (model, size, seed) is one resumable run of :func:`gradgraph.tasks.train_curvature` (finished runs are
read back from their ``metrics.json``), so an interrupted grid continues where it stopped, and ``--shard i/n``
splits the grid across processes or machines that share the output folder. The table and plot are made from
whatever runs are finished. Reported: test mean squared error in z units (mean +- std over seeds) and the
relative improvement ``1 - err_model / err_standard``, where the standard estimator is the diagonal of the
empirical Fisher of the same gradients.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..io import atomic_write_text
from ..tasks.curvature import MODELS, CurvatureConfig, load_dataset, train_curvature
from .measure import machine_description

PRESETS = {
    # the paper's protocol
    "paper": dict(num_models=3000, sizes=(10, 30, 100, 300, 1000, 2000), seeds=(0, 1, 2, 3, 4), epochs=100,
                  patience=None, models=MODELS),
    # what fits a 2-core CPU machine in a few hours (see the README for what was run)
    "cpu": dict(num_models=3000, sizes=(10, 100, 500, 2000), seeds=(0, 1, 2), epochs=100, patience=15,
                models=MODELS),
    # the main job of `make demo`: a few minutes
    "demo": dict(num_models=400, sizes=(10, 100), seeds=(0,), epochs=15, patience=None,
                 models=("gradmetanet", "gmn-average", "neuron-asym")),
    # for tests: seconds
    "tiny": dict(num_models=45, num_points=8, sizes=(5,), seeds=(0,), epochs=2, patience=None,
                 models=("gradmetanet", "gmn-average")),
}


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="grid to run (default demo)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="override the preset's models")
    p.add_argument("--sizes", nargs="+", type=int, help="override the training-set sizes")
    p.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    p.add_argument("--epochs", type=int, help="override the epochs")
    p.add_argument("--patience", type=int, help="early stopping patience (epochs)")
    p.add_argument("--num-models", type=int, help="dataset size")
    p.add_argument("--out-dir", default="runs/curvature", help="run folders (default runs/curvature)")
    p.add_argument("--results", default="benchmarks/results", help="where the table and plot go")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k] (default cpu)")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i (default 0/1); start n "
                   "processes with shards 0/n .. n-1/n to fill a machine or a GPU, then --report-only")
    p.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def grid(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    for key in ("models", "sizes", "seeds", "epochs", "patience", "num_models"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def run(args) -> int:
    g = grid(args)
    configs = [CurvatureConfig(model=m, train_size=n, seed=s, epochs=g["epochs"], patience=g["patience"],
                               num_models=g["num_models"], num_points=g.get("num_points", 128), out_dir=args.out_dir,
                               device=getattr(args, "device", "cpu"))
               for n in g["sizes"] for m in g["models"] for s in g["seeds"]]
    i, n = (int(x) for x in args.shard.split("/"))
    t0 = time.perf_counter()
    if not args.report_only:
        ds = load_dataset(configs[0], progress=not args.quiet)
        for k, cfg in enumerate(configs):
            if k % n == i:
                train_curvature(cfg, ds, progress=not args.quiet)
    results = collect(configs)
    table = report(results, g, time.perf_counter() - t0)
    out = Path(args.results)
    atomic_write_text(table, out / f"curvature_{args.preset}.md")
    plot(results, out / f"curvature_{args.preset}.png")
    print(table)
    print(f"\nwritten: {out / f'curvature_{args.preset}.md'}, {out / f'curvature_{args.preset}.png'}")
    return 0


def collect(configs) -> dict:
    """{(model, size): [metrics of each finished seed]} plus the standard estimator under key
    ("standard", size)."""
    results: dict = {}
    for cfg in configs:
        path = cfg.run_dir / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        if m.get("config", {}).get("identity") != cfg.identity():
            continue  # a run of the same name with other settings (epochs, dataset, ...): not this grid's
        results.setdefault((cfg.model, cfg.train_size), []).append(m)
        results.setdefault(("standard", cfg.train_size), {})[cfg.seed] = m
    return results


def _mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def _devices(results: dict) -> str:
    """Where the runs trained (a run's device is not part of its identity, so runs of one grid may differ)."""
    count: dict[str, int] = {}
    for (model, _), runs in results.items():
        if model == "standard":  # the same runs again, by seed
            continue
        for r in runs:
            dev = r["config"].get("device", "cpu")
            count[dev] = count.get(dev, 0) + 1
    return "Runs by training device: " + ", ".join(f"{d} {k}" for d, k in sorted(count.items())) + "." if count else ""


def report(results: dict, g: dict, seconds: float) -> str:
    sizes = [n for n in g["sizes"] if any((m, n) in results for m in g["models"])]
    lines = [f"Curvature estimation (SIREN Fisher diagonal): test MSE in z units, mean +- std over seeds "
             f"{list(g['seeds'])}; in brackets the improvement over the standard estimator "
             f"(1 - err / err_standard). {g['num_models']} models, up to {g['epochs']} epochs"
             + (f", early stopping after {g['patience']} epochs without improvement" if g.get("patience") else "")
             + ".", "", f"Table written on: {machine_description()}. Wall time of this call: {seconds / 60:.1f} min. "
             + _devices(results), "",
             "| model | params | " + " | ".join(f"n={n}" for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    std_row = []
    for n in sizes:
        runs = list(results.get(("standard", n), {}).values())
        std_row.append(f"{_mean_std(r['standard_test_mse'] for r in runs)[0]:.4f}" if runs else "-")
    lines.append("| standard estimator | - | " + " | ".join(std_row) + " |")
    for model in g["models"]:
        cells, params = [], "-"
        for n in sizes:
            runs = results.get((model, n))
            if not runs:
                cells.append("-")
                continue
            params = str(runs[0]["parameters"])
            mse, mse_sd = _mean_std(r["test_mse"] for r in runs)
            imp, imp_sd = _mean_std(100 * r["improvement_mse"] for r in runs)
            seeds = "" if len(runs) == len(g["seeds"]) else f" [{len(runs)} seed{'s' if len(runs) > 1 else ''}]"
            cells.append(f"{mse:.4f} +- {mse_sd:.4f} ({imp:+.1f} +- {imp_sd:.1f}%){seeds}")
        lines.append(f"| {model} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_imp) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = sorted({m for m, _ in results if m != "standard"}, key=lambda m: MODELS.index(m))
    for model in models:
        for axis, key, scale in ((ax, "test_mse", 1), (ax_imp, "improvement_mse", 100)):
            pts = sorted((n, _mean_std(scale * r[key] for r in runs))
                         for (m, n), runs in results.items() if m == model)
            if pts:
                axis.errorbar([n for n, _ in pts], [v[0] for _, v in pts], yerr=[v[1] for _, v in pts],
                              marker="o", capsize=3, label=model)
    ax_imp.axhline(0, color="k", ls="--", label="standard estimator")
    ax_imp.set_xscale("log")
    ax_imp.set_ylim(-40, 40)  # the baselines far below the standard estimator fall off the bottom
    ax_imp.set_xlabel("training models")
    ax_imp.set_ylabel("improvement over the standard estimator (%)")
    ax_imp.set_title("1 - err / err_standard (higher is better)")
    std = sorted((n, _mean_std(r["standard_test_mse"] for r in runs.values()))
                 for (m, n), runs in results.items() if m == "standard")
    if std:  # per training size: the z units depend on the training targets' mean and std
        ax.plot([n for n, _ in std], [v[0] for _, v in std], "k--", marker="x", label="standard estimator")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training models")
    ax.set_ylabel("test MSE (z units)")
    ax.set_title("Fisher diagonal estimation from 128 gradients")
    ax_imp.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower right")  # the empty corner
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
