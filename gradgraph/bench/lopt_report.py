"""The table and the plot of ``gradgraph bench lopt`` (see :mod:`gradgraph.bench.lopt` for the protocol)."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def first_reach(run: dict, target: float, key: str = "loss") -> int | None:
    """Index of the first evaluation whose ``key`` loss is <= ``target`` (None: never)."""
    return next((i for i, v in enumerate(run[key]) if v <= target), None)


def speedups(adam: list[dict], other: list[dict], key: str = "loss") -> dict:
    """Per seed: Adam's best ``key`` loss L (test, or ``"train"``), first reached at step N (time t_N); the other
    optimizer's step M and time t_M to reach L. ``steps`` N / M and ``wall`` t_N / t_M (0 when it never reaches
    L), per seed."""
    steps, wall, reached = [], [], 0
    for a, o in zip(adam, other):
        best = min(a[key])
        i = first_reach(a, best, key)
        j = first_reach(o, best, key)
        if j is None or o["steps"][j] == 0:
            steps.append(0.0)
            wall.append(0.0)
            continue
        reached += 1
        steps.append(a["steps"][i] / o["steps"][j])
        wall.append(a["seconds"][i] / max(o["seconds"][j], 1e-12))
    return {"steps": steps, "wall": wall, "reached": reached}


def bootstrap_mean(xs: list[float], reps: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over seeds."""
    t = torch.tensor(xs, dtype=torch.float64)
    if len(t) < 2:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(0)
    means = t[torch.randint(len(t), (reps, len(t)), generator=g)].mean(1).sort().values
    return float(means[int(0.025 * reps)]), float(means[int(0.975 * reps) - 1])


def _mean_std(xs) -> tuple[float, float]:
    t = torch.tensor(list(xs), dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else float("nan")


def _pm(xs, digits: int = 4) -> str:
    m, s = _mean_std(xs)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def report(results: dict, tuned: dict, info: dict, header: str) -> str:
    lines = ["# Learned optimizers against tuned Adam", "", header, "",
             "Score: Adam's best test loss L is first reached at step N; an optimizer's score is N / (its steps to "
             "reach L), 0 when it never does. Mean over seeds with a 95% bootstrap interval over seeds; wall: the "
             "same ratio in training time (evaluation excluded). Training-loss score: the same ratio for Adam's best "
             "loss on the whole training split (what the meta-objective `--meta-loss train` optimises).", ""]
    if info:
        lines += ["| checkpoint | variant | meta-trained on | meta-steps | CPU hours | command |",
                  "|---|---|---|---|---|---|"]
        for name, i in info.items():
            hours = i.get("process_seconds", float("nan")) / 3600
            lines.append(f"| {name} | {i['variant']} | {i['task']} | {i['meta_steps']} | {hours:.2f} | "
                         f"`{i.get('command', '?')}` |")
        lines.append("")
    lines += ["| task | optimizer | score (steps to Adam's best) | 95% CI | reached | wall speed-up | ms/step | "
              "x Adam cost | best test loss | final test loss | training-loss score | final training loss |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, curves in results.items():
        adam = curves["adam"]
        adam_ms = sum(r["ms_per_step"] for r in adam) / len(adam)
        for name, runs in curves.items():
            best = [min(r["loss"]) for r in runs]
            final = [r["loss"][-1] for r in runs]
            ms = sum(r["ms_per_step"] for r in runs) / len(runs)
            if name == "adam":
                lr = tuned[task][0]
                lines.append(f"| {task} | adam (lr {lr:g}) | 1 | | {len(runs)}/{len(runs)} | 1 | {ms:.2f} | 1.00 | "
                             f"{_pm(best)} | {_pm(final)} | 1 | {_pm(r['train'][-1] for r in runs)} |")
                continue
            s = speedups(adam, runs)
            lo, hi = bootstrap_mean(s["steps"])
            tr = speedups(adam, runs, "train")
            lines.append(f"| {task} | {name} | {sum(s['steps']) / len(s['steps']):.2f} | [{lo:.2f}, {hi:.2f}] | "
                         f"{s['reached']}/{len(runs)} | {sum(s['wall']) / len(s['wall']):.2f} | {ms:.2f} | "
                         f"{ms / adam_ms:.2f} | {_pm(best)} | {_pm(final)} | "
                         f"{sum(tr['steps']) / len(tr['steps']):.2f} ({tr['reached']}/{len(runs)}) | "
                         f"{_pm(r['train'][-1] for r in runs)} |")
    lines += ["", "Adam's learning-rate search (mean best validation loss over the tuning seeds):", ""]
    for task, (lr, scores) in tuned.items():
        row = ", ".join(f"{k:g}: {v:.4f}" for k, v in scores.items())
        lines.append(f"- {task}: chose {lr:g} ({row})")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """One panel per task: test loss against the step, mean over seeds with a band of +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8.5), squeeze=False)
    for col, (task, curves) in enumerate(results.items()):
        for row, (key, what) in enumerate((("loss", "test"), ("train", "training"))):
            ax = axes[row][col]
            for name, runs in curves.items():
                steps = runs[0]["steps"]
                loss = torch.tensor([r[key] for r in runs], dtype=torch.float64)
                mean, std = loss.mean(0), loss.std(0) if len(runs) > 1 else torch.zeros(len(steps))
                line, = ax.plot(steps, mean, label=name, lw=1.5)
                # on a log axis a band below zero would fill the panel: its lower edge stops at a third of the mean
                ax.fill_between(steps, torch.maximum(mean - std, mean / 3), mean + std, alpha=0.2,
                                color=line.get_color())
            best = min(min(r[key]) for r in curves["adam"])
            ax.axhline(best, color="k", ls=":", lw=0.8, label=f"lowest {what} loss of any Adam run")
            ax.set(yscale="log", xlabel="training step", ylabel=f"{what} loss (cross-entropy, log scale)",
                   title=f"{task}: {what} loss")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    n = len(next(iter(results.values()))["adam"])
    fig.text(0.5, 0.01, f"mean over {n} seeds; bands: ± one std over seeds (lower edge at least a third of the "
             "mean)", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
