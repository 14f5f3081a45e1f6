"""Per-sample gradient norms: gradgraph from (a, g) against Opacus's ghost clipping and torch.func.

Per-sample gradient norms are what DP-SGD clips and what data-attribution and curvature estimates start from.
Four ways to get them for one batch, each timed on the same model, data and weights:

==============  ==============================================================================================
plain           forward + backward of the summed loss (``.grad``, no norms): the cost the ratios are relative to
gradgraph       :func:`gradgraph.capture` then ``graph.per_sample_grad_norms()`` ([b]; for a linear op
                ``|g aᵀ|² = Σ_{e,f} <g_e, g_f><a_e, a_f>``, no weight-sized tensor)
opacus-ghost    Opacus ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``: forward + backward,
                then ``get_norm_sample()`` (the same ghost-norm identity in backward hooks; ``.grad`` filled too)
vmap            torch.func ``vmap(grad)`` per-sample gradients (:mod:`gradgraph.oracle`), then their norms
==============  ==============================================================================================

Before timing, every engine's norms on the first 4 samples are compared with gradgraph's in float64 (the
table's ``max rel. diff``; gradgraph's own are checked against torch.func by the tests); an engine that
disagrees by more than 1e-6 is marked **wrong**, and one that raises is listed with its error. Times are medians
of ``--repeats`` round-robin steps after ``--warmup`` (:func:`gradgraph.bench.measure.time_steps`). Models are
those of ``gradgraph bench capture`` (:class:`gradgraph.bench.capture.Config`).
"""
from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from torch import Tensor, nn

import gradgraph

from ..io import atomic_write_text
from ..threads import set_threads
from .capture import Config
from .engines import ENGINES as CAPTURE_ENGINES
from .engines import quiet
from .measure import machine_description, time_steps
from .options import NORMS_ENGINES as ENGINES
from .options import norms as add_arguments  # noqa: F401 (the benchmark's entry point)

WRONG = 1e-6  # relative difference in float64 beyond which two engines compute different norms


def _norms(grads: dict[str, Tensor]) -> Tensor:
    """[b] norms of per-sample gradients ``{name: [b, *shape]}`` over all parameters."""
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def prepare(engine: str, model: nn.Module, loss_fn):
    """A step ``(x, y) -> [b] norms`` of ``engine`` (plain: the summed gradient, no norms) on ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if engine == "plain":  # the capture benchmark's engines, on this very model
        return CAPTURE_ENGINES.get("plain").prepare(model, loss_fn)
    if engine == "gradgraph":
        return lambda x, y: gradgraph.capture(model, x, y, loss_fn).per_sample_grad_norms()
    if engine == "opacus-ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping  # optional (the bench extra)

        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                                   use_ghost_clipping=True, strict=False)

        def ghost(x, y):
            loss_fn(gsm(x), y).sum().backward()
            norms = gsm.get_norm_sample()
            for p in params:
                p.grad, p._norm_sample = None, None
            return norms
        return ghost
    if engine == "vmap":  # built once per batch, as in the capture benchmark
        grads = CAPTURE_ENGINES.get("vmap").prepare(model, loss_fn)
        return lambda x, y: _norms(grads(x, y))
    raise ValueError(f"unknown norms engine {engine!r}: use one of {', '.join(ENGINES)}")


def agreement(config: Config, engines: list[str], samples: int = 4, seed: int = 0) -> dict[str, float | str]:
    """Each engine's norms on the first ``samples`` samples (float64) against gradgraph's, relative to the
    largest norm; the error text for an engine that raises."""
    model, x, y, loss_fn = config.build(seed, dtype=torch.float64)
    x, y = x[:samples], y[:samples]
    want = gradgraph.capture(model, x, y, loss_fn).per_sample_grad_norms()
    out: dict[str, float | str] = {}
    for e in engines:
        if e == "plain":
            continue
        try:
            with quiet():
                got = prepare(e, _copy(model), loss_fn)(x, y)
            out[e] = float((got.to(want) - want).abs().max() / want.abs().max())
        except Exception as err:  # noqa: BLE001 - reported in the table, the engine is then skipped
            out[e] = f"{type(err).__name__}: {err}"[:200]
    return out


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)  # each engine wraps or hooks its own copy


def grid(args) -> list[Config]:
    if args.tiny:
        return [Config("mlp", 4, width=16, depth=2), Config("gpt", 2, kwargs=(("block_size", 6), ("d_model", 8)))]
    configs = [Config("mlp", b, width=w, depth=2) for w in args.widths for b in args.batches]
    configs += [Config(f, b) for f in args.models for b in args.model_batches]
    return configs


def run(args) -> int:
    set_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for config in grid(args):
        model, x, y, loss_fn = config.build(args.seed)
        diff = agreement(config, args.engines, seed=args.seed)
        engines = [e for e in args.engines if not isinstance(diff.get(e, 0.0), str)]
        with quiet():
            steps = {e: prepare(e, _copy(model), loss_fn) for e in engines}
            times = time_steps(steps, x, y, "cpu", args.warmup, args.repeats, args.budget)
        rows.append(dict(model=config.label, batch=config.batch, params=sum(p.numel() for p in model.parameters()),
                         ms={e: 1e3 * statistics.median(t) for e, t in times.items()}, diff=diff))
        print(json.dumps(rows[-1]))
    text = report(rows, args.engines, machine_description("cpu"), time.perf_counter() - t0)
    atomic_write_text(text, args.output)
    print(text)
    print(f"written to {args.output}")
    return 0


def report(rows: list[dict], engines: list[str], machine: str, wall_s: float) -> str:
    lines = ["# Per-sample gradient norms", "",
             f"Machine: {machine}; {torch.get_num_threads()} thread(s); float32; {wall_s / 60:.1f} min in all.", "",
             "Time of one batch's per-sample gradient norms, median of the timed steps, and its ratio to plain "
             "forward + backward (which computes no norms). `max rel. diff`: the engine's norms against "
             f"gradgraph's on 4 samples in float64, relative to the largest norm (> {WRONG:g}: **wrong**).", "",
             "| model | batch | params | engine | ms | x plain | max rel. diff | note |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        base = r["ms"].get("plain")
        for e in engines:
            d = r["diff"].get(e)
            if isinstance(d, str):
                lines.append(f"| {r['model']} | {r['batch']} | {r['params']:,} | {e} | - | - | - | {d} |")
                continue
            ms = r["ms"].get(e)
            ratio = f"{ms / base:.2f}" if ms is not None and base else "-"
            note = "**wrong**" if isinstance(d, float) and d > WRONG else ""
            lines.append(f"| {r['model']} | {r['batch']} | {r['params']:,} | {e} | "
                         f"{'-' if ms is None else f'{ms:.1f}'} | {ratio} | "
                         f"{'ref' if e == 'gradgraph' else '-' if d is None else f'{d:.1e}'} | {note} |")
    return "\n".join(lines) + "\n"
