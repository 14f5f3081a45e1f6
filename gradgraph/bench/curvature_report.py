"""Tables and plot of the curvature benchmark (see :mod:`gradgraph.bench.curvature`).

Every improvement is ``1 - err / err_ref`` with a 95% paired bootstrap interval over the test models (the
models' per-test-model errors averaged over seeds first); ``+-`` is the spread over seeds, shown only with
two or more seeds. References: the standard estimator S and the strongest calibrated baseline at that size.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..tasks.curvature import MODELS
from ..tasks.curvature_baselines import CALIBRATED
from ..tasks.curvature_metrics import paired_bootstrap

__all__ = ["report", "plot", "mean_std"]


def _overall(per_model: dict, metric: str) -> torch.Tensor:
    """[n_test] per-test-model values of a metric (per-tensor metrics averaged over tensors)."""
    v = torch.tensor(per_model[metric], dtype=torch.float64)
    return v.mean(1) if v.ndim == 2 else v


def _seed_mean(runs: list[dict], metric: str, tensor: int | None = None) -> torch.Tensor:
    vals = [torch.tensor(r["test_per_model"][metric], dtype=torch.float64) for r in runs]
    v = torch.stack(vals).mean(0)
    if tensor is not None:
        return v[:, tensor]
    return v.mean(1) if v.ndim == 2 else v


def mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    mean = sum(xs) / len(xs)
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def _imp(a: torch.Tensor, b: torch.Tensor) -> str:
    r = paired_bootstrap(a, b)
    return f"{100 * r['improvement']:+.1f}% [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]"


def _best_calibrated(ref: dict, metric: str = "nmse") -> str | None:
    names = [n for n in CALIBRATED if n in ref]
    return min(names, key=lambda n: float(_overall(ref[n], metric).mean())) if names else None


def _standard(results: dict, refs: dict, n: int) -> dict | None:
    if n in refs and "standard" in refs[n]:
        return refs[n]["standard"]
    runs = next((runs for (m, size), runs in results.items() if size == n), None)
    return runs[0]["standard_per_model"] if runs else None


def _metric_table(results: dict, refs: dict, g: dict, sizes: list[int], metric: str, digits: int) -> list[str]:
    lines = ["| model | params | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    std = {n: _standard(results, refs, n) for n in sizes}
    row = [f"{float(_overall(std[n], metric).mean()):.{digits}f}" if std[n] else "-" for n in sizes]
    lines.append("| standard estimator S | - | " + " | ".join(row) + " |")
    for name in CALIBRATED:
        cells = []
        for n in sizes:
            if n not in refs or name not in refs[n] or not std[n]:
                cells.append("-")
                continue
            v = _overall(refs[n][name], metric)
            cells.append(f"{float(v.mean()):.{digits}f} ({_imp(v, _overall(std[n], metric))} vs S)")
        lines.append(f"| {name} (calibrated S) | - | " + " | ".join(cells) + " |")
    for model in g["models"]:
        cells, params = [], "-"
        for n in sizes:
            runs = results.get((model, n))
            if not runs or not std[n]:
                cells.append("-")
                continue
            params = str(runs[0]["parameters"])
            mean, sd = mean_std(r[f"test_{metric}"] for r in runs)
            a = _seed_mean(runs, metric)
            cell = f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" +- {sd:.{digits}f}")
            cell += f" ({_imp(a, _overall(std[n], metric))} vs S"
            best = _best_calibrated(refs.get(n, {}), metric)
            if best:
                cell += f"; {_imp(a, _overall(refs[n][best], metric))} vs {best}"
            cells.append(cell + ")" + ("" if len(runs) == len(g["seeds"]) else f" [{len(runs)} seed(s)]"))
        lines.append(f"| {model} | {params} | " + " | ".join(cells) + " |")
    if metric == "nmse":
        floors = [f"{float(_overall(refs[n]['noise floor'], 'nmse').mean()):.{digits}f}"
                  + (f" (S can improve by at most {100 * (1 - float(_overall(refs[n]['noise floor'], 'nmse').mean()) / float(_overall(std[n], 'nmse').mean())):.0f}%)" if std[n] else "")  # noqa: E501
                  if n in refs and "noise floor" in refs[n] else "-" for n in sizes]
        lines.append("| noise floor (the true Fisher vs the Monte Carlo targets) | - | " + " | ".join(floors) + " |")
    return lines


def _tensor_table(results: dict, refs: dict, g: dict, n: int) -> list[str]:
    runs0 = next((r for (m, size), r in results.items() if size == n), None)
    if not runs0:
        return []
    names = runs0[0]["tensors"]
    std = _standard(results, refs, n)
    best = _best_calibrated(refs.get(n, {}))
    lines = [f"Per parameter tensor at n={n}: nmse, and in brackets the improvement over {best or 'S'} "
             "(95% paired bootstrap interval over test models); tensors where S is exact (error 0) are marked.", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    ref_pm = refs[n][best] if best else std
    s_v = torch.tensor(std["nmse"], dtype=torch.float64)
    lines.append("| standard estimator S | " + " | ".join(
        "exact (0)" if float(s_v[:, t].max()) == 0 else f"{float(s_v[:, t].mean()):.4f}" for t in range(len(names)))
        + " |")
    rows = ([(best, torch.tensor(refs[n][best]["nmse"], dtype=torch.float64))] if best else [])
    rows += [(m, torch.stack([torch.tensor(r["test_per_model"]["nmse"], dtype=torch.float64)
                              for r in results[(m, n)]]).mean(0)) for m in g["models"] if (m, n) in results]
    ref_v = torch.tensor(ref_pm["nmse"], dtype=torch.float64)
    for name, v in rows:
        cells = []
        for t in range(len(names)):
            if float(s_v[:, t].max()) == 0:
                cells.append(f"{float(v[:, t].mean()):.2g}")
            elif name == best:
                cells.append(f"{float(v[:, t].mean()):.4f}")
            else:
                cells.append(f"{float(v[:, t].mean()):.4f} ({_imp(v[:, t], ref_v[:, t])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _sign_table(results: dict, g: dict, n: int) -> list[str]:
    lines = [f"At n={n}: mean absolute log-ratio |log(pred / target)| (tensor-averaged) and the share of "
             "predictions <= 0 (the Fisher diagonal is positive).", "", "| model | log-ratio | share <= 0 |",
             "|---|---|---|"]
    for model in ["standard", *g["models"]]:
        runs = results.get((model, n)) if model != "standard" else next(
            (r for (m, size), r in results.items() if size == n), None)
        if not runs:
            continue
        key = "test" if model != "standard" else "standard_test"
        lines.append(f"| {'standard estimator S' if model == 'standard' else model} | "
                     f"{mean_std(r[f'{key}_logratio'] for r in runs)[0]:.3f} | "
                     f"{100 * mean_std(r[f'{key}_nonpos'] for r in runs)[0]:.1f}% |")
    return lines


def _devices(results: dict) -> str:
    """Where the runs trained (a run's device is not part of its identity, so runs of one grid may differ)."""
    count: dict[str, int] = {}
    for runs in results.values():
        for r in runs:
            dev = r["config"].get("device", "cpu")
            count[dev] = count.get(dev, 0) + 1
    return "Runs by training device: " + ", ".join(f"{d} {k}" for d, k in sorted(count.items())) + "." if count else ""


def report(results: dict, refs: dict, g: dict, header: str) -> str:
    sizes = [n for n in g["sizes"] if n in refs or any((m, n) in results for m in g["models"])]
    top = max((n for n in sizes if any((m, n) in results for m in g["models"])), default=None)
    lines = [f"Curvature estimation (SIREN Fisher diagonal), {g['num_models']} models, up to {g['epochs']} epochs"
             + (f", early stopping after {g['patience']} epochs without improvement" if g.get("patience") else "")
             + f", seeds {list(g['seeds'])}. " + header + " " + _devices(results), "",
             "## Headline: per-tensor normalized error (nmse; every layer counts)", "",
             "Each parameter tensor's mean squared error divided by the mean square of its training targets, "
             "averaged over tensors; lower is better. In brackets: improvement with a 95% paired bootstrap interval "
             "over the test models, against S and against the strongest calibrated baseline.", ""]
    lines += _metric_table(results, refs, g, sizes, "nmse", 4)
    lines += ["", "## The paper's metric: MSE of globally z-scored targets (dominated by the first layer)", ""]
    lines += _metric_table(results, refs, g, sizes, "mse", 4)
    if top is not None:
        lines += ["", "## Per layer", ""] + _tensor_table(results, refs, g, top)
        lines += ["", "## Log-ratio and sign", ""] + _sign_table(results, g, top)
    return "\n".join(lines) + "\n"


FLOOR = -40.0  # improvements below this (%) are drawn as markers on the bottom edge, labelled with their value


def plot(results: dict, refs: dict, path: Path) -> None:
    """Left: test nmse against the training-set size (error bars over seeds only with >= 2 seeds); right: the
    improvement over S with its 95% paired bootstrap band. One colour per model in both panels; the number of
    seeds is in the caption; series below -40% are drawn on the bottom edge with their values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_imp) = plt.subplots(1, 2, figsize=(12, 5))
    models = sorted({m for m, _ in results}, key=lambda m: MODELS.index(m))
    sizes = sorted({n for _, n in results} | set(refs))
    palette = plt.get_cmap("tab10").colors
    colour = {name: palette[k % len(palette)] for k, name in enumerate([*models, *CALIBRATED])}
    colour.update({"standard": "k", "noise floor": "0.4"})
    for name in ("standard", *CALIBRATED, "noise floor"):
        pts = [(n, float(_overall(refs[n][name], "nmse").mean())) for n in sizes if name in refs.get(n, {})]
        if pts:
            ax.plot(*zip(*pts), ":" if name == "noise floor" else "--", marker="x", alpha=0.8, color=colour[name],
                    label={"standard": "standard estimator S", "noise floor": "noise floor (Monte Carlo targets)"}
                    .get(name, f"{name} (calibrated S)"))
    seeds = sorted({len(runs) for runs in results.values()})
    for model in models:
        pts = sorted((n, [r["test_nmse"] for r in runs]) for (m, n), runs in results.items() if m == model)
        stats = [mean_std(v) for _, v in pts]
        err = [0.0 if math.isnan(sd) else sd for _, sd in stats]
        ax.errorbar([n for n, _ in pts], [mean for mean, _ in stats], yerr=err if any(err) else None, marker="o",
                    capsize=3, color=colour[model], label=model)
        imp = []
        for n, _ in pts:
            std = _standard(results, refs, n)
            if std:
                r = paired_bootstrap(_seed_mean(results[(model, n)], "nmse"), _overall(std, "nmse"))
                imp.append((n, 100 * r["improvement"], 100 * r["lo"], 100 * r["hi"]))
        if imp:
            ns, mid, lo, hi = zip(*imp)
            _improvement_line(ax_imp, ns, mid, "-", "o", colour[model], model)
            ax_imp.fill_between(ns, [max(v, FLOOR) for v in lo], [max(v, FLOOR) for v in hi], alpha=0.2,
                                color=colour[model])
    for name in CALIBRATED:
        imp = [(n, 100 * paired_bootstrap(_overall(refs[n][name], "nmse"), _overall(refs[n]["standard"], "nmse"))
                ["improvement"]) for n in sizes if name in refs.get(n, {}) and "standard" in refs[n]]
        if imp:
            _improvement_line(ax_imp, *zip(*imp), "--", "x", colour[name], f"{name} (calibrated S)")
    ax_imp.axhline(0, color="k", ls="--", lw=0.8, label="S (0%)")
    for a in (ax, ax_imp):
        a.set_xscale("log")
        a.set_xlabel("training models (count, log scale)")
        a.legend(fontsize=7)
        a.grid(alpha=0.3, which="both")
    ax.set_yscale("log")
    ax.set_ylabel("test nmse (dimensionless; lower is better)")
    ax.set_title("Fisher diagonal estimation from 128 gradients")
    ax_imp.set_ylabel("improvement over S (%), 95% paired bootstrap band")
    ax_imp.set_title("1 - nmse / nmse(S), higher is better")
    seed_text = "/".join(map(str, seeds)) if seeds else "0"
    fig.text(0.5, 0.01, f"{seed_text} seed(s) per point; error bars: std over seeds (drawn only with >= 2 seeds); "
             f"bands: 95% paired bootstrap over test models; improvements below {FLOOR:.0f}% sit on the bottom edge "
             "(\u25bc) with their value.", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _improvement_line(ax, ns, values, style, marker, colour, label) -> None:
    """A series of the improvement panel; points below FLOOR are drawn at FLOOR as down triangles labelled with
    their value, so that an off-scale baseline is visible instead of cut off."""
    ax.plot(ns, [max(v, FLOOR) for v in values], style, marker=marker, color=colour, label=label, alpha=0.9)
    for n, v in zip(ns, values):
        if v < FLOOR:
            ax.plot([n], [FLOOR], "v", color=colour, ms=8)
            ax.annotate(f"{v:.0f}%", (n, FLOOR), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colour)
    if min(values) < FLOOR:
        ax.set_ylim(bottom=FLOOR - 3)
