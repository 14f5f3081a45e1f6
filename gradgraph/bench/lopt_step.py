"""Learned-optimizer step cost: Adam, sgdm, ds and ds+gradmetanet per step, each beside its FLOP floor.

One step = zero_grad, forward, mean cross-entropy, backward and the update (for ds+gradmetanet also recording
the step's per-sample (a, g), building its gradient graph and the GradMetaNet forward), on an MLP at batch
128, one thread, CPU by default. Each timed sample runs ``--inner`` steps (median over ``--repeats`` samples,
round-robin after warm-up, see :func:`gradgraph.bench.measure.time_steps`).

FLOP floors, with W the weights, P the parameters and b the batch: the base step (forward + backward) is 6 b W;
Adam and sgdm add O(P); ``ds`` adds the per-parameter MLP, 2 (19*32 + 32*32 + 32*32 + 32) = 5,376 FLOP per
parameter (about 7 base steps at b = 128); ``ds+gradmetanet`` adds its wider MLP input and, per moment channel
c of the GradMetaNet head, one rank-b contraction of 2 b W (c/3 base steps). Floors are turned into time with
the machine's measured single-matmul throughput. The paper's GradMetaNet optimizer ran at 0.61-0.73x Adam's
iterations per second on an A100 (264-305 it/s against Adam's 360).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..io import atomic_write_text
from ..models.reference import MLP
from ..optim import VARIANTS, LearnedOptimizer
from ..optim.variants import DSGradMetaNet
from ..threads import set_threads
from .measure import machine_description, time_steps
from .options import LOPT_STEP_SIZES as SIZES
from .options import lopt_step as add_arguments  # noqa: F401 (the benchmark's entry point)


def row_rule(name: str):
    """The fresh rule of a table row and whether to compile it: ``variant``, ``variant@K`` (GradMetaNet reads K
    samples), either with ``:compiled`` (GradMetaNet through torch.compile)."""
    variant, _, k = name.split(":")[0].partition("@")
    return VARIANTS.build(variant, **({"set_size": int(k)} if k else {})), name.endswith(":compiled")


def _flops(model, b: int, name: str) -> float:
    W = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    P = sum(p.numel() for p in model.parameters())
    base = 6 * b * W
    if name in ("adam", "sgdm"):
        return base + 12 * P
    meta = row_rule(name)[0]
    lins = [m for m in meta.mlp if isinstance(m, torch.nn.Linear)]
    mlp = 2 * sum(m.weight.numel() for m in lins)
    extra = 0
    if isinstance(meta, DSGradMetaNet):
        extra = meta._gnn["bilinear_channels"] * 2 * min(b, meta.set_size or b) * W
    return base + (mlp + 60) * P + extra


def matmul_gflops(threads_note: str = "") -> float:
    """Achieved single-matmul throughput (GFLOP/s), [128, 1024] x [1024, 1024], median of 7."""
    a, w = torch.randn(128, 1024), torch.randn(1024, 1024)
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        a @ w
        ts.append(time.perf_counter() - t)
    return 2 * 128 * 1024 * 1024 / statistics.median(ts[2:]) / 1e9


def _stepper(name: str, model, inner: int):
    if name == "adam":
        opt = torch.optim.Adam(model.parameters(), 1e-3)
    else:
        rule, compile = row_rule(name)
        opt = LearnedOptimizer(model, rule.variant, meta=rule, compile=compile)

    def step(x, y):
        for _ in range(inner):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    return step


def _capture_overhead(model, x, y, n: int) -> tuple[float, float]:
    """Median ms of a recorded forward + backward with its gradient graph built, and of a plain one."""
    opt = LearnedOptimizer(model, "ds+gradmetanet")

    def plain():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def recorded():
        with opt.record():
            plain()
        opt._take_graph()
    out = []
    for f in (recorded, plain):
        f()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        out.append(1000 * statistics.median(ts))
    return out[0], out[1]


def run(args) -> int:
    args.threads = set_threads(args.threads)
    sizes = {"tiny": (16, (16,), 4)} if args.tiny else {k: SIZES[k] for k in args.sizes}
    reps, inner = (1, 1) if args.tiny else (args.repeats, args.inner)
    gflops = matmul_gflops()
    lines = [f"Learned-optimizer step (forward + backward + update), batch {args.batch_size}, {args.threads} "
             f"thread(s). Machine: {machine_description()}; matmul {gflops:.1f} GFLOP/s.", "",
             "| model | P | optimizer | ms/step | x Adam | floor ms | x floor |", "|---|---|---|---|---|---|---|"]
    for size, (d_in, hidden, d_out) in sizes.items():
        torch.manual_seed(0)
        x, y = torch.randn(args.batch_size, d_in), torch.randint(d_out, (args.batch_size,))
        models = {o: MLP(d_in, hidden, d_out) for o in args.optimizers}
        steps = {o: _stepper(o, models[o], inner) for o in args.optimizers}
        times = time_steps(steps, x, y, "cpu", warmup=args.warmup, repeats=reps)
        ms = {o: 1000 * statistics.median(times[o]) / inner for o in args.optimizers}
        P = sum(p.numel() for p in models[args.optimizers[0]].parameters())
        for o in args.optimizers:
            floor = 1000 * _flops(models[o], args.batch_size, o) / (gflops * 1e9)
            rel = f"{ms[o] / ms['adam']:.2f}" if "adam" in ms else "-"
            lines.append(f"| {size} {d_in}-{'-'.join(map(str, hidden))}-{d_out} | {P} | {o} | {ms[o]:.2f} | {rel} | "
                         f"{floor:.2f} | {ms[o] / floor:.1f} |")
        for o in (o for o in args.optimizers if o.startswith("ds+gradmetanet") and "ds" in ms):
            lines.append(f"| | | {o}: GradMetaNet extra over ds | {ms[o] - ms['ds']:.2f} | "
                         f"{(ms[o] - ms['ds']) / ms['ds']:.2f}x ds | | |")
        if "ds+gradmetanet" in ms:
            rec, plain = _capture_overhead(models["ds+gradmetanet"], x, y, 3 if reps == 1 else 21)
            lines.append(f"| | | capture + graph (recorded fwd+bwd {rec:.2f} - plain {plain:.2f}) | "
                         f"{rec - plain:.2f} | | | |")
    lines += ["", "Goals (issue #13): GradMetaNet extra <= 0.5x the ds step; every variant <= 1.5x its floor at width "
              "1024; fixed overhead <= 1 ms on the digits MLP. Paper: GradMetaNet optimizer at 0.61-0.73x Adam's "
              "iterations/s (A100)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        atomic_write_text(text, args.output)
    return 0
