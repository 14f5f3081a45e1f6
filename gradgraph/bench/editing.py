"""INR editing: every model over seeds on the digit INRs, against no edit, the oracle and k Adam steps.

Each (model, seed) is one resumable run of :func:`gradgraph.tasks.train_editing` (finished runs are read back
from their ``metrics.json``), so an interrupted grid continues where it stopped; ``--shard i/n`` splits the grid
across processes that share the output folder. The reference rows (identity, image-space oracle, adam-k with k
and lr chosen on validation) are computed once per dataset and cached. Reported: test pixel MSE x10^-2 of the
edited INR's 28x28 rendering against the dilated image (mean +- std over seeds), the change against the
identity (no edit), a 95% bootstrap interval over the test INRs (first seed), and each model's parameter count;
a PNG shows example edits (original, target, every model's edit).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..io import atomic_write_text
from ..tasks.configs import EditingConfig
from ..tasks.editing import EditingTask, load_dataset, reference_metrics, train_editing
from ..train.checkpoint import RunDir
from .measure import machine_description, write_report
from .options import EDITING_PRESETS as PRESETS
from .options import editing as add_arguments  # noqa: F401 (the benchmark's entry point)


def grid(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    for key in ("models", "seeds", "epochs", "patience", "lr"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def configs_of(args, g: dict) -> list[EditingConfig]:
    return [EditingConfig(model=m, seed=s, epochs=g["epochs"], patience=g["patience"], num_images=g["num_images"],
                          fit_steps=g.get("fit_steps", 500), batch_size=args.batch_size, lr=g.get("lr", 1e-3),
                          dataset_root=args.dataset_root, out_dir=args.out_dir, device=args.device)
            for s in g["seeds"] for m in g["models"]]  # seed-major: an interrupted grid has whole seeds


def references(data, split, out_dir: Path, grid_: dict | None) -> dict:
    """The reference rows, cached per dataset in ``<out_dir>/references-<tag>.json``."""
    path = out_dir / f"references-{data.tag}.json"
    if path.exists():
        return json.loads(path.read_text())
    ref = reference_metrics(data, split, **({"grid": grid_} if grid_ else {}))
    atomic_write_text(json.dumps(ref, indent=2), path)
    return ref


def run(args) -> int:
    g = grid(args)
    configs = configs_of(args, g)
    i, n = (int(x) for x in args.shard.split("/"))
    t0 = time.perf_counter()
    data = load_dataset(configs[0], progress=not args.quiet)
    split = data.split_indices()
    ref = references(data, split, Path(args.out_dir), g.get("adam_grid"))
    if not args.report_only:
        for k, cfg in enumerate(configs):
            if k % n == i:
                train_editing(cfg, data, progress=not args.quiet)
    results = collect(configs)
    examples, intervals = edits(configs, results, data, split)
    table = report(results, ref, intervals, g, data, time.perf_counter() - t0)
    return write_report(table, args.results, f"editing_{args.preset}", lambda png: plot(examples, png))


def collect(configs) -> dict:
    """{model: [metrics of each finished seed, with its config]} (runs with other settings are skipped)."""
    results: dict = {}
    for cfg in configs:
        m = RunDir(cfg.run_dir, cfg.identity()).finished()
        if m is not None:
            results.setdefault(cfg.model, []).append((cfg, m))
    return results


def _bootstrap(errs: torch.Tensor, reps: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-INR errors."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(errs), (reps, len(errs)), generator=g)
    means = errs[idx].mean(1).sort().values
    return float(means[int(0.025 * reps)]), float(means[int(0.975 * reps) - 1])


@torch.no_grad()
def edits(configs, results: dict, data, split, num_examples: int = 6):
    """Renderings of the first test INRs (original, target, identity, each model's first-seed edit) and the
    bootstrap interval of each model's (and the identity's) test MSE over the test INRs."""
    test = split["test"]
    shown = [test[j * len(test) // num_examples] for j in range(num_examples)] if test else []
    examples = {"original": data.images[shown], "target": data.targets[shown]}
    intervals = {}
    task = EditingTask(configs[0], data, progress=False)
    task.setup()
    per_inr = {}
    for name in ["identity", *results]:
        model = None
        if name != "identity":
            cfg = results[name][0][0]
            task.cfg = cfg
            model = task.build_model()
            model.load_state_dict(RunDir(cfg.run_dir, cfg.identity()).load_best()["model"])
            model.eval()
        errs = []
        for batch in data.batches(test, 64):
            r = task.render(model, batch)
            errs.append((r - batch.target.reshape(r.shape)).pow(2).mean(1))
        per_inr[name] = torch.cat(errs)
        examples[name] = task.render(model, data.batch(shown)).clamp(0, 1) if shown else data.images[:0]
        intervals[name] = _bootstrap(per_inr[name])
    return examples, intervals


def _mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def report(results: dict, ref: dict, intervals: dict, g: dict, data, seconds: float) -> str:
    ident = ref["identity"]
    lines = [f"INR editing (digit INRs -> 3x3 dilation): test pixel MSE x10^-2 of the edited 28x28 rendering, mean "
             f"+- std over seeds {list(g['seeds'])}; change against the identity (no edit); 95% bootstrap interval "
             f"over the {len(data.split_indices()['test'])} test INRs (first seed). {data.config['num_images']} "
             f"images x {data.config['inrs_per_image']} INR(s), up to {g['epochs']} epochs at lr {g.get('lr', 1e-3):g}"
             + (f", early stopping after {g['patience']}" if g.get("patience") else "") + ".", "",
             f"Table written on: {machine_description()}. Wall time of this call: {seconds / 60:.1f} min.", "",
             "| model | params | test MSE x1e-2 | vs identity | 95% CI (x1e-2) | epochs | train time |",
             "|---|---|---|---|---|---|---|"]

    def ci(name):
        lo, hi = intervals.get(name, (math.nan, math.nan))
        return "-" if math.isnan(lo) else f"{100 * lo:.3f} - {100 * hi:.3f}"

    lines.append(f"| identity (no edit) | 0 | {100 * ident:.3f} | - | {ci('identity')} | - | - |")
    lines.append(f"| oracle (dilate the INR's rendering) | - | {100 * ref['oracle']:.4f} | "
                 f"{100 * (ref['oracle'] / ident - 1):+.1f}% | - | - | - |")
    lines.append(f"| adam-k (k={ref['adam_k']}, lr={ref['adam_lr']:g}, chosen on val) | 0 | {100 * ref['adam-k']:.3f}"
                 f" | {100 * (ref['adam-k'] / ident - 1):+.1f}% | - | - | - |")
    for model in g["models"]:
        runs = [m for _, m in results.get(model, [])]
        if not runs:
            lines.append(f"| {model} | - | not run | - | - | - | - |")
            continue
        mse, sd = _mean_std(r["test_mse"] for r in runs)
        seeds = "" if len(runs) == len(g["seeds"]) else f" [{len(runs)} seed(s)]"
        ep = "/".join(str(r["epochs_run"]) for r in runs)
        tt = _mean_std(r["train_time_s"] for r in runs)[0]
        lines.append(f"| {model} | {runs[0]['parameters']} | {100 * mse:.3f} +- {100 * sd:.3f}{seeds} | "
                     f"{100 * (mse / ident - 1):+.1f}% | {ci(model)} | {ep} | {tt / 60:.1f} min |")
    return "\n".join(lines)


def plot(examples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(examples)
    n = len(examples["original"])
    fig, axes = plt.subplots(max(n, 1), len(names), figsize=(1.4 * len(names), 1.5 * max(n, 1)), squeeze=False)
    for c, name in enumerate(names):
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(examples[name][r].reshape(28, 28).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
