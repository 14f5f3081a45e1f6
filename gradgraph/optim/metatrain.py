"""``gradgraph meta-train``: PES meta-training of a learned-optimizer variant on a task, resumable.

The run folder holds ``checkpoint.pt`` (the whole PES state, inner runs included, written atomically with
:func:`gradgraph.io.save_file` every ``--save-every`` meta-steps and at the end: a stopped run resumes exactly
where it stopped), ``rule.pt`` (the variant, its constructor arguments and its meta-parameters: what a shipped
checkpoint will be), ``curve.png`` (the meta-loss per meta-step) and the accumulated process time.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.utils import vector_to_parameters

from ..io import load_file, save_file
from ..train.distributed import all_sum, is_main, process_group
from ..train.loop import progress_bar
from .meta import PES, LOptProblem, PESConfig
from .particles import BatchedLOptProblem, batchable
from .pretrained import checkpoint_info, load_rule
from .tasks import OPT_TASKS
from .variants import VARIANTS

__all__ = ["run", "save_curve", "command"]


def save_curve(history: list[float], path: Path, title: str, meta_loss: str = "train") -> None:
    """The meta-loss per meta-step (and its moving mean) as a PNG; ``meta_loss`` names what it measures."""
    import matplotlib  # plotting is optional at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history, lw=0.8, label="per meta-step")
    if len(history) >= 20:
        k = max(len(history) // 50, 5)
        smooth = torch.tensor(history).unfold(0, k, 1).mean(1)
        ax.plot(range(k - 1, len(history)), smooth, lw=2, label=f"mean of {k}")
    what = "validation loss after each update" if meta_loss == "val" else "training loss"
    ax.set(xlabel="meta-step", ylabel=f"mean {what}\n(cross-entropy, nats)", title=title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def command(args, steps: int) -> str:
    """The ``gradgraph meta-train`` command that reproduces a run to ``steps`` meta-steps (stored in rule.pt)."""
    horizon = f" --horizon {args.horizon}" if args.horizon else ""
    return (f"gradgraph meta-train --task {args.task} --variant {args.variant} --steps {steps} --pairs {args.pairs} "
            f"--truncation {args.truncation}{horizon} --sigma {args.sigma} --lr {args.lr} --scalar-lr {args.scalar_lr} "
            f"--seed {args.seed}" + ("" if args.meta_loss == "train" else f" --meta-loss {args.meta_loss}")
            + (f" --init-from {args.init_from}" if getattr(args, "init_from", None) else "")
            + (f" --set-size {args.set_size}" if getattr(args, "set_size", None) else ""))


def run(args) -> int:
    """Meta-train as ``args`` say; under ``torchrun`` every process runs its share of the pairs (gloo on CPU) and
    rank 0 writes the run folder."""
    torch.set_num_threads(args.threads)
    with process_group("cpu"):
        return _run(args)


def _run(args) -> int:
    out, main = Path(args.out), is_main()
    out.mkdir(parents=True, exist_ok=True)
    task = OPT_TASKS.build(args.task)
    torch.manual_seed(args.seed)
    set_size = getattr(args, "set_size", None)
    if set_size is not None and not VARIANTS.get(args.variant).needs_graph:
        raise ValueError(f"--set-size caps the samples GradMetaNet reads: it applies to graph variants such as "
                         f"ds+gradmetanet, not to '{args.variant}'")
    rule = VARIANTS.build(args.variant, **({} if set_size is None else {"set_size": set_size}))
    init_from = getattr(args, "init_from", None)
    if init_from:  # theta0 is the warm-started rule (a resumed run overwrites it with its own theta)
        rule.warm_start(load_rule(init_from))
    ckpt, spent = out / "checkpoint.pt", 0.0
    saved = load_file(ckpt, "pes-checkpoint", remedy="delete the run folder to start over") if ckpt.exists() else None
    # particles in stacked tensors where the variant allows it (measured 2.5-3.4x faster per meta-step); a
    # resumed run keeps the kind it started with (their states differ)
    kind = saved.get("particles", "loop") if saved else ("batched" if batchable(rule) and not args.loop else "loop")
    if kind == "batched":
        problem = BatchedLOptProblem(task, rule, horizon=args.horizon, meta_loss=args.meta_loss)
    else:
        problem = LOptProblem(task, rule, horizon=args.horizon, meta_loss=args.meta_loss,
                              compile=getattr(args, "compile", False))
    cfg = PESConfig(pairs=args.pairs, truncation=args.truncation, sigma=args.sigma, lr=args.lr, seed=args.seed,
                    scalar_lr=args.scalar_lr)
    pes = PES(problem, problem.theta0(), cfg)
    if saved:
        run_of = (saved["task"], saved["variant"], saved["horizon"], saved.get("meta_loss", "train"),
                  saved.get("init_from"), saved.get("set_size"))
        if run_of != (args.task, args.variant, problem.horizon, args.meta_loss, init_from, set_size):
            raise ValueError(f"{ckpt} is a run of {saved['variant']} on {saved['task']} (horizon {saved['horizon']}, "
                             f"meta-loss {run_of[3]}, init from {run_of[4]}, set size {run_of[5]}), not of "
                             f"{args.variant} on {args.task} (horizon {problem.horizon}, meta-loss {args.meta_loss}, "
                             f"init from {init_from}, set size {set_size}); use another --out folder")
        pes.load_state_dict(saved["pes"])
        spent = float(saved["process_seconds"])
        if main:
            print(f"resumed {ckpt} at meta-step {pes.meta_step} ({spent / 3600:.2f} core-hours so far)")

    # what the warm start itself cost: part of this rule's meta-training, recorded beside its own steps
    init_info = ({k: v for k, v in checkpoint_info(init_from).items() if k in ("variant", "meta_steps",
                 "process_seconds", "command")} if init_from else None)

    def save() -> None:
        state = pes.state_dict()  # a collective under torchrun: every rank calls it
        if not main:
            return
        vector_to_parameters(pes.theta.detach().float(), rule.parameters())
        save_file({"task": args.task, "variant": args.variant, "horizon": problem.horizon, "pes": state,
                   "process_seconds": spent, "particles": kind,
                   "meta_loss": args.meta_loss, "init_from": init_from, "set_size": set_size}, ckpt, "pes-checkpoint")
        save_file({"variant": args.variant, "hyper": rule.hyper(), "state": rule.state_dict(), "task": args.task,
                   "meta_steps": pes.meta_step, "horizon": problem.horizon, "pes": asdict(cfg),
                   "meta_loss": args.meta_loss, "init_from": init_info,
                   "process_seconds": spent, "command": command(args, pes.meta_step)}, out / "rule.pt", "lopt-rule")
        save_curve(pes.history, out / "curve.png", f"{args.variant} on {args.task} (PES, {cfg.pairs} pairs)",
                   args.meta_loss)

    bar = progress_bar(range(pes.meta_step, args.steps), enabled=main and not args.quiet, initial=pes.meta_step,
                       total=args.steps, desc="meta-train")
    for i in bar:
        t0 = time.process_time()
        loss = pes.step()
        spent += all_sum([time.process_time() - t0])[0]  # CPU time of every process
        bar.set_postfix(meta_loss=f"{loss:.4f}")
        if (i + 1) % args.save_every == 0:
            save()
    save()
    if main:
        print(f"{pes.meta_step} meta-steps, last meta-loss {pes.history[-1] if pes.history else float('nan'):.4f}, "
              f"{spent / 3600:.3f} core-hours in all; run folder {out}")
    return 0
