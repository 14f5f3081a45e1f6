"""Fisher trace of million-parameter SIRENs: GradMetaNet against S, calibrated S and a pooled-statistics MLP.

The paper's scaled curvature variant (:mod:`gradgraph.tasks.trace`): each (training size, seed) is one
resumable run of :func:`gradgraph.tasks.trace.train_trace` (finished runs are read back), whose final metrics
hold the baselines fitted on the same split. The table gives, per training size, the mean absolute log-ratio
(headline), the relative error and the normalized MAE of every row, GradMetaNet's improvement over each
baseline with a 95% paired bootstrap interval over test models (per-model errors averaged over seeds first),
and the targets' own Monte Carlo noise; the plot, the distribution of |log(prediction / target)| over test
models per row.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from ..tasks.curvature_metrics import paired_bootstrap
from ..tasks.trace import TraceConfig, load_dataset, train_trace
from ..train.checkpoint import RunDir
from .curvature_report import mean_std
from .measure import machine_description, write_report
from .options import TRACE_PRESETS as PRESETS
from .options import curvature_trace as add_arguments  # noqa: F401 (the benchmark's entry point)

ROWS = ("standard", "s-calibrated", "pooled-mlp")
METRIC_KEYS = (("logratio", "logratio"), ("relerr", "relerr"), ("nmae", "abserr"))


def _configs(args) -> list[TraceConfig]:
    g = dict(PRESETS[args.preset])
    g.update({k: v for k in ("models", "sizes", "seeds", "epochs", "width") if (v := getattr(args, k)) is not None})
    out_dir = args.out_dir or f"runs/curvature-trace-{args.preset}" + ("" if args.width is None else f"-w{args.width}")
    root = None if not args.datasets_dir else str(Path(args.datasets_dir) / "siren_trace")
    return [TraceConfig(model=m, train_size=n, seed=s, epochs=g["epochs"], num_models=g["num_models"],
                        width=g["width"], num_points=g["num_points"], out_dir=out_dir, device=args.device,
                        dataset_root=root)
            for n in g["sizes"] for m in g["models"] for s in g["seeds"]]


def _per_model(runs: list[dict], row: str, key: str) -> torch.Tensor:
    return torch.stack([torch.tensor(r["test_per_model"][row][key], dtype=torch.float64) for r in runs]).mean(0)


def _cell(xs) -> str:
    mean, sd = mean_std(xs)
    return f"{mean:.4f}" if math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def report(results: dict[int, dict[str, list[dict]]], header: str) -> str:
    """``results[size][model]``: the finished runs (one per seed). The baselines come from the first model's
    first run (they are fitted on the split, the same for every model and seed up to the MLP's seed)."""
    first = next(iter(next(iter(results.values())).values()))[0]["config"]
    w = first["width"]
    lines = [f"# Fisher trace of a SIREN 1-{w}-{w}-1 ({w * w + 4 * w + 1:,} parameters) from {first['num_points']} "
             "gradients (scaled curvature variant)", "", header, ""]
    for n, by_model in sorted(results.items()):
        ref = next(iter(by_model.values()))[0]
        n_test = len(ref["test_per_model"]["standard"]["logratio"])
        lines += [f"## {n} training models", "", "| row | seeds | epochs | training time per run | mean abs log-ratio "
                  "| relative error | normalized MAE |", "|---|---|---|---|---|---|---|"]
        for row in ROWS:
            r = ref["rows"][row]
            lines.append(f"| {row} | | | | {r['logratio']:.4f} | {r['relerr']:.4f} | {r['nmae']:.4f} |")
        for model, runs in by_model.items():
            lines.append(f"| {model} | {len(runs)} | {runs[0]['epochs_run']} | "
                         f"{sum(r['train_time_s'] for r in runs) / len(runs) / 60:.0f} min | "
                         + " | ".join(_cell(r["rows"][model][k] for r in runs) for k, _ in METRIC_KEYS) + " |")
        lines.append(f"| noise of the targets (estimate) | | | | {ref['noise_logratio']:.4f} | | |")
        lines += ["", f"Improvement (1 - the model's error / the row's), 95% paired bootstrap over the {n_test} test "
                  "models (per-model errors averaged over seeds):", "",
                  "| model | against | log-ratio | relative error | MAE |", "|---|---|---|---|---|"]
        for model, runs in by_model.items():
            for row in ROWS:
                cells = []
                for _, key in METRIC_KEYS:
                    b = paired_bootstrap(_per_model(runs, model, key), _per_model([ref], row, key))
                    cells.append(f"{100 * b['improvement']:+.1f}% [{100 * b['lo']:+.1f}, {100 * b['hi']:+.1f}]")
                lines.append(f"| {model} | {row} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Rows fitted on the same training split: `s-calibrated` is exp(a log S + b) by least squares, "
              "`pooled-mlp` an MLP on pooled set statistics predicting a log-correction of S (see "
              "gradgraph.tasks.trace). Normalized MAE: the MAE over that of predicting the training mean of tr(F).",
              ""]
    return "\n".join(lines)


def plot(results: dict[int, dict[str, list[dict]]], path: Path) -> None:
    """Per training size: the sorted |log(prediction / target)| over test models of every row (an inverse
    CDF: lower is better everywhere along the curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        ref = next(iter(results[n].values()))[0]
        curves = [(row, [ref], "--") for row in ROWS] + [(m, runs, "-") for m, runs in results[n].items()]
        for row, runs, style in curves:
            v = _per_model(runs, row, "logratio").sort().values
            ax.plot(torch.linspace(0, 1, len(v)), v, style, label=f"{row} (mean {float(v.mean()):.4f})")
        ax.axhline(ref["noise_logratio"], color="0.5", lw=0.8, label="target noise (mean)")
        ax.set(xlabel="fraction of test models", ylabel="|log(prediction / target)|", yscale="log",
               title=f"tr(F), {n} training models")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    if args.datasets_dir:
        os.environ["GRADGRAPH_DATASETS"] = args.datasets_dir
    configs = _configs(args)
    t0 = time.perf_counter()
    if not args.report_only:
        ds = load_dataset(configs[0], progress=not args.quiet)
        for cfg in configs:
            train_trace(cfg, ds, progress=not args.quiet)
    results: dict[int, dict[str, list[dict]]] = {}
    for cfg in configs:
        m = RunDir(cfg.run_dir, cfg.identity()).finished()
        if m is not None:
            results.setdefault(cfg.train_size, {}).setdefault(cfg.model, []).append(m)
    if not results:
        raise SystemExit(f"no finished runs under {configs[0].out_dir}: run without --report-only first")
    header = (f"Table written on: {machine_description()}. Wall time of this call: "
              f"{(time.perf_counter() - t0) / 60:.1f} min. Preset `{args.preset}`.")
    stem = f"curvature_trace_{args.preset}_w{configs[0].width}"
    return write_report(report(results, header), args.results, stem,
                        lambda png: plot(results, png))
