"""Learned optimizers against tuned Adam: steps and wall-clock time to Adam's best test loss, over seeds.

Protocol (issue #13, the paper's metric). Per task: Adam's learning rate is chosen on the grid
{0.0005 j, j = 1..20} by the mean over ``--tune-seeds`` runs of the best validation loss; then Adam (that rate)
and every learned optimizer (the shipped checkpoints, or ``--rules NAME=rule.pt``) train ``--seeds`` runs,
seeded model initialisation and data order shared by all optimizers, for the task's horizon, with the test
loss evaluated every ``--eval-every`` steps. Per seed, Adam's best test loss L is first reached at step N;
an optimizer's score is N / (its first evaluated step with test loss <= L), 0 when it never gets there
("never"). Reported: the mean score with a 95% bootstrap interval over seeds, how many seeds reached L, the
wall-clock speed-up (Adam's training time to N over the optimizer's to reach L, evaluation excluded), the
per-step cost against Adam and the final and best test losses; a PNG of the test-loss curves (mean and std
band over seeds).

Every run is cached in ``--out-dir`` as JSON keyed by everything that changes it (task, optimizer, learning
rate or checkpoint hash, seed, steps, evaluation period), written atomically: an interrupted benchmark
resumes where it stopped. Evaluation seeds (100000 + s) and tuning seeds (200000 + s) are disjoint from the
run ids meta-training uses (0, 1, 2, ... per PES pair).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..io import atomic_write_text, content_hash
from ..optim import LearnedOptimizer, available, load_rule
from ..optim.pretrained import checkpoint_info
from ..optim.tasks import OPT_TASKS
from ..threads import set_threads
from ..train.loop import progress_bar
from .lopt_report import plot, report
from .measure import machine_description, write_report
from .options import LOPT_PRESETS as PRESETS
from .options import lopt as add_arguments  # noqa: F401 (the benchmark's entry point)

EVAL_SEED, TUNE_SEED = 100_000, 200_000
LR_GRID = tuple(round(0.0005 * j, 4) for j in range(1, 21))
def _rules(args) -> dict[str, str]:
    """{name: checkpoint name or rule.pt path} of the learned optimizers to compare."""
    rules = {}
    for item in args.rules:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"--rules takes NAME=PATH with PATH a rule.pt of `gradgraph meta-train`; got {item!r}")
        rules[name] = path
    for name in args.optimizers or available():
        if name not in rules:
            if name not in available():
                raise SystemExit(f"--optimizers {name}: no shipped checkpoint of that name (shipped: {available()}); "
                                 "pass a meta-train run with --rules NAME=PATH")
            rules[name] = name
    return rules


def train_curve(task, make_opt, seed: int, steps: int, eval_every: int, split: str = "test",
                also_train: bool = False) -> dict:
    """Train ``task.model(seed)`` on ``task.batches(seed)`` for ``steps`` steps with ``make_opt(model)``;
    the ``split`` loss (``loss``; with ``also_train`` the training-split loss too, ``train``) at step 0, every
    ``eval_every`` steps and at the end, and the cumulative training time (seconds, evaluation excluded) at
    each of those points."""
    model = task.model(seed=seed)
    opt, data = make_opt(model), task.batches(seed=seed)
    points, losses, seconds, spent = [0], [task.evaluate(model, split)], [0.0], 0.0
    train = [task.evaluate(model, "train")] if also_train else None
    for step in range(1, steps + 1):
        batch = next(data)
        t0 = time.perf_counter()

        def closure(batch=batch):
            opt.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            return loss
        opt.step(closure)
        spent += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            points.append(step)
            losses.append(task.evaluate(model, split))
            seconds.append(spent)
            if train is not None:
                train.append(task.evaluate(model, "train"))
    out = {"steps": points, "loss": losses, "seconds": seconds, "ms_per_step": 1000 * spent / steps}
    return {**out, "train": train} if train is not None else out


class Runner:
    """Cached runs: one JSON file per (task, optimizer, setting, seed, steps, eval period, split)."""

    def __init__(self, out_dir: Path, steps: int | None, eval_every: int) -> None:
        self.out_dir, self.steps, self.eval_every = out_dir, steps, eval_every
        self._tasks: dict = {}  # one task object per name: its data (digits, text) is loaded once

    def run(self, task_name: str, label: str, setting: str, make_opt, seed: int, split: str = "test") -> dict:
        if task_name not in self._tasks:
            self._tasks[task_name] = OPT_TASKS.build(task_name)
        task = self._tasks[task_name]
        steps = self.steps or task.horizon
        key = dict(task=task_name, optimizer=label, setting=setting, seed=seed, steps=steps,
                   eval_every=self.eval_every, split=split)
        if split == "test":  # evaluation runs also record the training loss (what meta-training optimises)
            key["train_curve"] = True
        path = self.out_dir / task_name / f"{content_hash(key)[:20]}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved
        torch.manual_seed(seed)
        curve = train_curve(task, make_opt, seed, steps, self.eval_every, split, also_train=split == "test")
        result = {"key": key, **curve}
        atomic_write_text(json.dumps(result), path)
        return result


def tune_adam(runner: Runner, task_name: str, grid, seeds: int, bar) -> tuple[float, dict]:
    """The grid's learning rate with the lowest mean (over tuning seeds) best validation loss."""
    scores = {}
    for lr in grid:
        runs = [runner.run(task_name, "adam", f"lr={lr}", lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr),
                           TUNE_SEED + s, split="val") for s in range(seeds)]
        scores[lr] = sum(min(r["loss"]) for r in runs) / len(runs)
        bar.update(seeds)
    return min(scores, key=scores.get), scores


def run(args) -> int:
    args.threads = set_threads(args.threads)
    preset = PRESETS[args.preset]
    tasks = args.tasks or list(preset["tasks"])
    seeds, eval_every = args.seeds or preset["seeds"], args.eval_every or preset["eval_every"]
    grid, tune_seeds = preset.get("lr_grid", LR_GRID), preset["tune_seeds"]
    rules = _rules(args)
    runner = Runner(Path(args.out_dir), args.steps or preset["steps"], eval_every)
    t0 = time.perf_counter()
    bar = progress_bar(range(len(tasks) * (len(grid) * tune_seeds + seeds * (1 + len(rules)))),
                       enabled=not args.quiet, desc="bench lopt")
    results, tuned = {}, {}
    for task_name in tasks:
        lr, scores = tune_adam(runner, task_name, grid, tune_seeds, bar)
        tuned[task_name] = (lr, scores)
        curves = {"adam": [runner.run(task_name, "adam", f"lr={lr}",
                                      lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr), EVAL_SEED + s)
                           for s in range(seeds)]}
        bar.update(seeds)
        for name, source in rules.items():
            rule = load_rule(source)
            setting = content_hash({"variant": rule.variant, "state": rule.state_dict()})
            curves[name] = [runner.run(task_name, name, setting,
                                       lambda m, source=source: LearnedOptimizer.from_pretrained(source, m),
                                       EVAL_SEED + s) for s in range(seeds)]
            bar.update(seeds)
        results[task_name] = curves
    bar.close()
    info = {name: checkpoint_info(source) for name, source in rules.items()}
    header = (f"Machine: {machine_description()}; {args.threads} thread(s); {time.perf_counter() - t0:.0f} s "
              f"(cached runs are read back). Preset {args.preset}: {seeds} evaluation seeds, Adam tuned on "
              f"{len(grid)} learning rates x {tune_seeds} seeds by best validation loss, test loss every "
              f"{eval_every} steps.")
    table = report(results, tuned, info, header)
    return write_report(table, args.results, f"lopt_{args.preset}", lambda png: plot(results, png))
