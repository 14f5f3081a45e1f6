"""Intra-op threads for gradgraph's small ops: 1 vs 2 (or more) torch threads on two typical workloads.

* the training step of the main job (``make demo``): GradMetaNet on a batch of 32 SIREN gradient graphs
  (128 gradients each), forward + backward + Adam step;
* ``gradgraph.capture`` of a small MLP (6 -> 64 -> 64 -> 3, batch 128).

The thread counts run round-robin (one step each per round) so that a change of the machine's load hits them
alike; the table gives the median and the machine. ``python benchmarks/threads.py [--threads 1 2] [--rounds 30]``
(about a minute on 2 cores). The result sets gradgraph's default thread policy (``gradgraph.threads``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import gradgraph
from gradgraph.bench.measure import machine_description
from gradgraph.losses import per_sample_cross_entropy
from gradgraph.models import MLP
from gradgraph.tasks.curvature import CurvatureConfig, CurvatureTask, load_dataset


def demo_step(root: str):
    cfg = CurvatureConfig(model="gradmetanet", train_size=32, num_models=120, epochs=1, dataset_root=root)
    task = CurvatureTask(cfg, load_dataset(cfg, progress=False), progress=False)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model()
    task.initialize(model)
    opt = task.optimizer(model)
    batch = task.batch(task.train_items()[:32])

    def step():
        loss, n = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        (loss / n).backward()
        opt.step()
    return step


def capture_step():
    torch.manual_seed(0)
    mlp = MLP(in_features=6, hidden=(64, 64), out_features=3)
    x, y = mlp.example_batch(batch_size=128)
    return lambda: gradgraph.capture(mlp, x, y, per_sample_cross_entropy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)  # (the machine line below then names the default of the policy)
    with tempfile.TemporaryDirectory() as root:
        work = {"demo training step (GradMetaNet, 32 graphs)": demo_step(root),
                "capture, MLP 6-64-64-3, batch 128": capture_step()}
        lines = [f"Machine: {machine_description()}; {args.rounds} rounds, median ms per step.", "",
                 "| workload | " + " | ".join(f"{t} thread(s)" for t in args.threads) + " |",
                 "|---|" + "---|" * len(args.threads)]
        for name, fn in work.items():
            times: dict[int, list[float]] = {t: [] for t in args.threads}
            for t in args.threads:  # warm-up
                torch.set_num_threads(t)
                fn(), fn()
            for _ in range(args.rounds):
                for t in args.threads:
                    torch.set_num_threads(t)
                    t0 = time.perf_counter()
                    fn()
                    times[t].append(1e3 * (time.perf_counter() - t0))
            lines.append(f"| {name} | " + " | ".join(f"{statistics.median(times[t]):.1f}" for t in args.threads)
                         + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
