"""Metanetwork cost: GradMetaNet (and GradMetaNet++) against the weight-space baseline on per-sample gradients.

For MLP base models of growing width (set size fixed) and growing set size (width fixed), one training step of
each metanetwork on the base model's gradient graph (forward to parameter-level outputs, backward) is timed
(median of repeats after warm-up, round-robin) and its peak memory measured (a fresh subprocess per
measurement on CPU, as in ``gradgraph bench capture``; see that module's docstring for the method). The table
lists the graph's entries E (neurons x set elements), the parameters P, P x b, and every figure with its
ratio to GradMetaNet; the scaling exponent of each model's time against E and against P x b is fitted
(least squares on logs) over each sweep.

``gmn-concat`` is the paper's weight-space baseline fed the b per-sample gradients of every weight (it builds
them, O(P b)); GradMetaNet works on the (a, g) entries, O(E f^2), and never builds a P x b tensor.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..api import capture
from ..io import atomic_write_text
from ..nn import GradMetaNet, GradMetaNetPlusPlus
from ..nn.baselines import WeightSpaceGMN
from .measure import frozen_heap, machine_description, run_worker, step_peak, time_steps, worker_main
from .options import METANET_MODELS as MODELS
from .options import metanet as add_arguments  # noqa: F401 (the benchmark's entry point)


@dataclass(frozen=True)
class Setting:
    width: int
    set_size: int
    depth: int = 2
    in_features: int = 8
    out_features: int = 4

    def graph(self, seed: int = 0, device: str = "cpu"):
        torch.manual_seed(seed)
        dims = [self.in_features] + [self.width] * self.depth + [self.out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(dims) - 2 else [])
        model = nn.Sequential(*layers).to(device)
        return capture(model, torch.randn(self.set_size, self.in_features, device=device))


def build(name: str, setting: Setting, hidden: int, device: str) -> nn.Module:
    if name == "gradmetanet":
        net = GradMetaNet(hidden, num_layers=4, out_level="param")
    elif name == "gradmetanet++":
        net = GradMetaNetPlusPlus(hidden, num_layers=2, out_level="param", heads=1)
    elif name == "gmn-concat":
        net = WeightSpaceGMN(hidden, num_layers=3, out_level="param", mode="concat", set_size=setting.set_size)
    else:
        raise ValueError(f"unknown metanetwork {name!r}: choose from {MODELS}")
    return net.to(device)


def _step(net: nn.Module, graph):
    def step(*_):
        net.zero_grad(set_to_none=True)
        out = net(graph)
        out.sum().backward()
        return out
    return step


def measure_peak(setting: Setting, name: str, hidden: int, device: str) -> int | None:
    """Peak extra bytes of one step above the prepared state (see gradgraph.bench.measure.step_peak)."""
    graph = setting.graph(device=device)
    step = _step(build(name, setting, hidden, device), graph)
    step()  # warm-up
    return step_peak(step, device)[0]


def _measure_job(job: dict) -> dict:
    """A memory worker's job (see ``gradgraph.bench.measure.worker_main``)."""
    return {"peak": measure_peak(Setting(**job["setting"]), job["model"], job["hidden"], job["device"])}


def peak_memory(setting: Setting, name: str, hidden: int, device: str, mode: str) -> int | None:
    if mode == "off":
        return None
    if mode == "inprocess" or device.startswith("cuda"):
        return measure_peak(setting, name, hidden, device)
    job = {"setting": dataclasses.asdict(setting), "model": name, "hidden": hidden, "device": device,
           "threads": torch.get_num_threads()}
    return run_worker("gradgraph.bench.metanet", job)["peak"]


def sweeps(args) -> dict[str, list[Setting]]:
    if args.tiny:
        return {"width": [Setting(8, 8), Setting(16, 8)], "set size": [Setting(8, 4), Setting(8, 16)]}
    widths = args.widths or [32, 64, 128, 256]
    sizes = args.set_sizes or [16, 64, 256, 1024]
    return {"width": [Setting(w, args.fixed_set_size) for w in widths],
            "set size": [Setting(args.fixed_width, b) for b in sizes]}


def _slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else None


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    lines = [f"Metanetwork cost (one training step: forward to parameter outputs + backward), f = {args.hidden}. "
             f"Machine: {machine_description(args.device)}.", ""]
    for sweep, settings in sweeps(args).items():
        rows = []
        for s in settings:
            graph = s.graph(device=args.device)
            steps = {m: _step(build(m, s, args.hidden, args.device), graph) for m in args.models}
            times = time_steps(steps, None, None, args.device, warmup=args.warmup, repeats=args.repeats)
            mem = {m: peak_memory(s, m, args.hidden, args.device, args.memory) for m in args.models}
            rows.append((s, graph.entry_x.shape[0], graph.num_params, {m: statistics.median(times[m]) for m in times},
                         mem))
            del steps, graph
        head = ["width", "b", "E", "P", "P x b"] + [f"{m} ms" for m in args.models] + [f"{m} MiB" for m in args.models]
        lines += [f"### {sweep} sweep", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s, E, P, t, mem in rows:
            ref_t, ref_m = t.get("gradmetanet"), mem.get("gradmetanet")
            cells = [str(s.width), str(s.set_size), str(E), str(P), str(P * s.set_size)]
            cells += [f"{1000 * t[m]:.1f}" + (f" ({t[m] / ref_t:.2f}x)" if ref_t and m != "gradmetanet" else "")
                      for m in args.models]
            cells += ["-" if mem[m] is None else f"{mem[m] / 2**20:.1f}" + (
                f" ({mem[m] / ref_m:.2f}x)" if ref_m and m != "gradmetanet" and mem[m] is not None else "")
                for m in args.models]
            lines.append("| " + " | ".join(cells) + " |")
        fits = []
        for m in args.models:
            te = _slope([r[1] for r in rows], [r[3][m] for r in rows])
            tp = _slope([r[2] * r[0].set_size for r in rows], [r[3][m] for r in rows])
            fits.append(f"{m}: time ~ E^{te:.2f}, ~ (P b)^{tp:.2f}" if te is not None and tp is not None else m)
        lines += ["", "Fitted scaling over this sweep: " + "; ".join(fits) + "." if len(rows) > 1
                  else "(one setting: no scaling fit)", ""]
    lines.append(f"Wall time of this benchmark: {(time.perf_counter() - t_start) / 60:.1f} min. "
                 f"Reproduce: `gradgraph bench metanet`.")
    table = "\n".join(lines)
    atomic_write_text(table, args.output)
    print(table)
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        with frozen_heap():
            sys.exit(worker_main(sys.argv[2:], _measure_job))
