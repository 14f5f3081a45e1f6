"""Capture speed and memory, side by side with the per-sample-gradient libraries.

For every configuration (a model and a batch) five engines do one training-step's worth of gradient work on
the same weights and data; each is timed and its peak memory measured: ``plain`` (forward + backward, the
cost every ratio is relative to), ``gradgraph`` (:func:`gradgraph.capture`), and the per-sample-gradient
peers ``vmap`` (torch.func, :mod:`gradgraph.oracle`), ``opacus`` and ``backpack``; see
:mod:`gradgraph.bench.engines` for what each computes. The report's tables are made in
:mod:`gradgraph.bench.capture_report`.

All engines compute the same thing: before timing, every engine runs on the first few samples of the batch
and its per-sample gradients are compared with ``graph.per_sample_grads()`` (the plain engine's ``.grad``
with ``graph.grads()``); the largest difference relative to the largest gradient is reported.

**Time** is the median wall time of ``--repeats`` steps after ``--warmup`` steps. Engines run round-robin
(one step of each engine per round), so that a slow drift of the machine's load (another process) affects
all of them alike; results are freed and ``gc.collect()`` runs between steps, outside the timed region. On
CUDA every step is bracketed by ``torch.cuda.synchronize()``.

**Peak memory** is the extra memory one step needs on top of the prepared engine (model, data, hooks):

* CPU: every (configuration, engine) runs in a fresh subprocess (``--memory subprocess``), so no engine
  inherits another's allocator state, caches or lazily initialized kernels. The worker builds the model and
  data, prepares the engine, runs one warm-up step and frees it, then reads the resident set size (VmRSS in
  ``/proc/self/status``), resets the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), runs
  one step while holding its result (the graph, the per-sample gradients, ``.grad``) and reads the
  high-water mark (VmHWM). Peak = VmHWM - VmRSS before the step. Before it builds the model, the worker
  sets glibc's ``M_MMAP_THRESHOLD`` to 64 KiB (``mallopt``) and returns the free heap (``malloc_trim``):
  every tensor buffer of 64 KiB or more then gets its own mapping that goes back to the OS when freed, so
  resident memory follows live memory and the
  warm-up step cannot leave free heap behind that the measured step reuses without the RSS growing (with
  glibc's default, adaptive threshold that would hide up to 32 MiB per buffer; buffers under 64 KiB can
  still come from resident heap, so the figure may miss a few hundred KiB). The RSS sees everything the
  step touches, tensors or not (oneDNN scratch, Python objects), which ``torch.profiler``'s memory events
  (torch tensors only) would miss; the price is about 3 s of imports per subprocess. Where
  ``/proc/self/clear_refs`` is missing (not Linux) the worker falls back to ``resource.getrusage``'s
  ``ru_maxrss`` (never reset: a lower bound when the step needs less than the setup did).
  Workers run ``--memory-jobs`` (2) at a time, except peers with more than 1 GiB of per-sample gradients,
  which run alone. ``--memory inprocess`` does the same in the benchmark's own process (after all timings;
  for quick runs and tests), ``--memory off`` skips it.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the allocated
  memory before the step (the caching allocator's reserve is not counted).
* gradgraph is measured in the steady state of repeated captures, like every engine: the entry index
  tensors that depend only on the architecture and the batch shape are cached on the graph's spec by the
  warm-up capture, so the peak counts the features and the transient memory, not those indices (their size
  is in the report's "all graph tensors" column). The feature buffers a dropped graph leaves for the next
  capture to reuse are released before the measured step, so its peak counts them.

For MLPs the representation itself is reported too: the graph's feature bytes (``entry_x``), the bytes of
per-sample gradients of every parameter (b x P values) and the theoretical ratio (d_in + d_out) / (d_in d_out)
of one linear layer's (a, g) to its per-sample weight gradient.

All engines run in float32 with the model in training mode (Opacus records per-sample gradients only then)
and ``torch.get_num_threads()`` threads (``--threads``). Peers whose per-sample gradients alone would exceed
``--max-gb`` are skipped with that reason.

Run ``gradgraph bench capture`` (or ``python benchmarks/capture.py``) from the repository root; ``--tiny``
runs a seconds-long smoke grid. The table goes to ``benchmarks/results/capture.md`` and stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import gradgraph

from ..graph.build import release_buffers
from ..io import atomic_write_text
from ..models import CNN, GPT, MLP
from ..models.hf import HFGPT2, HFResNet
from .capture_report import Memory, Row, report
from .engines import ENGINES, engine_grads, prepare, quiet
from .measure import (
    frozen_heap,
    machine_description,
    release_freed_memory_to_os,
    run_worker,
    step_peak,
    time_steps,
    worker_main,
)
from .options import capture as add_arguments  # noqa: F401 (the benchmark's entry point)

# the model families besides the MLP grid: the reference models and two Hugging Face ones (transformers)
FAMILIES = {"cnn": CNN, "gpt": GPT, "hf-gpt2": HFGPT2, "hf-resnet": HFResNet}


# -- configurations ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One model and batch size. ``family`` is ``mlp`` (``width``, ``depth`` hidden layers of that width,
    ``width`` inputs and 10 classes), ``cnn`` or ``gpt`` (the reference models) or ``hf-gpt2`` or ``hf-resnet``
    (Hugging Face models, :mod:`gradgraph.models.hf`), with ``kwargs`` overriding the model's defaults."""

    family: str
    batch: int
    width: int = 0
    depth: int = 2
    kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        if self.family == "mlp":
            return f"MLP {self.width}x{self.depth}"
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        if self.family.startswith("hf-"):  # "HF GPT2", "HF ResNet"
            return f"HF {FAMILIES[self.family].__name__[2:]}{f' ({extra})' if extra else ''}"
        return f"{self.family.upper()} (reference{', ' + extra if extra else ''})"

    def build(self, seed: int = 0, device: str = "cpu", dtype=torch.float32):
        """``(model, inputs, targets, loss_fn)``; the model is in training mode (Opacus records only then)."""
        torch.manual_seed(seed)
        if self.family == "mlp":
            model = MLP(self.width, (self.width,) * self.depth, 10)
        elif self.family in FAMILIES:
            model = FAMILIES[self.family](**dict(self.kwargs))
        else:
            raise ValueError(f"unknown model family {self.family!r}: use mlp or one of {', '.join(FAMILIES)}")
        gen = torch.Generator().manual_seed(seed)
        x, y = model.example_inputs(self.batch, gen), model.example_targets(self.batch, gen)
        model = model.to(device=device, dtype=dtype).train()
        x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
        return model, x, y, model.per_sample_loss

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, d: dict) -> Config:
        def tup(v):
            return tuple(v) if isinstance(v, list) else v
        return cls(d["family"], d["batch"], d["width"], d["depth"],
                   tuple((k, tup(v)) for k, v in d.get("kwargs", {}).items()))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- agreement -----------------------------------------------------------------------------------------------
def max_rel_diff(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """max |got - want| over all tensors, relative to max |want| (some gradients are analytically zero)."""
    if set(got) != set(want):
        raise ValueError(f"different parameters: {sorted(set(got) ^ set(want))}")
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[k].to(want[k]) - want[k]).abs().max()) for k in want) / max(scale, 1e-30)


def agreement(config: Config, engines: list[str], device: str, samples: int = 4, seed: int = 0,
              dtype=torch.float32) -> dict[str, float | str]:
    """Each engine's gradients on the first ``samples`` samples against the graph's reconstruction:
    per-sample gradients vs ``graph.per_sample_grads()`` (plain: ``.grad`` vs ``graph.grads()``). The
    value is the largest relative difference, or the error an engine raised."""
    model, x, y, loss_fn = config.build(seed, device, dtype)
    x, y = x[:samples], y[:samples]
    graph = gradgraph.capture(model, x, y, loss_fn)
    refs = {"per_sample": graph.per_sample_grads(), "sum": graph.grads()}
    out: dict[str, float | str] = {}
    for e in engines:
        want = refs["sum" if e == "plain" else "per_sample"]
        try:
            out[e] = max_rel_diff(engine_grads(e, model, x, y, loss_fn), want)
        except Exception as err:  # noqa: BLE001 - reported in the table, the engine is then skipped
            out[e] = f"{type(err).__name__}: {err}"[:300]
    return out


# -- peak memory ---------------------------------------------------------------------------------------------
def measure_peak(config: Config, engine: str, device: str = "cpu", seed: int = 0) -> Memory:
    """Peak memory of one step of ``engine`` above the prepared state, in this process (see module docs)."""
    model, x, y, loss_fn = config.build(seed, device)
    with quiet():
        step = prepare(engine, model, loss_fn)
        del model
        step(x, y)  # warm-up: lazy initializations, hooks, caches; freed before measuring
        release_buffers()  # gradgraph reuses a dropped graph's feature buffers: count them as the step's
        return Memory(*step_peak(lambda: step(x, y), device))


def _measure_job(job: dict) -> dict:
    """A memory worker's job (see ``gradgraph.bench.measure.worker_main``)."""
    return dataclasses.asdict(measure_peak(Config.from_json(job["config"]), job["engine"], job["device"], job["seed"]))


def peak_memory(config: Config, engine: str, device: str, mode: str, seed: int = 0) -> Memory:
    """Peak memory of one step, in a fresh subprocess (``mode="subprocess"``) or in this process."""
    if mode == "inprocess":
        release_freed_memory_to_os()
        return measure_peak(config, engine, device, seed)
    job = {"config": config.to_json(), "engine": engine, "device": device, "seed": seed,
           "threads": torch.get_num_threads()}
    return Memory(**run_worker("gradgraph.bench.capture", job))


# -- the representation (graph bytes vs per-sample gradient bytes) -------------------------------------------
def graph_bytes(graph) -> int:
    """Bytes of every tensor the graph holds (features, entry indices, node/layer/op tables)."""
    return sum(v.numel() * v.element_size() for _, v in graph.items() if isinstance(v, Tensor))


def theoretical_ratios(model: nn.Module) -> list[float]:
    """Per linear layer, (d_in + d_out) / (d_in * d_out): its (a, g) per sample over its weight gradient."""
    return [(m.in_features + m.out_features) / (m.in_features * m.out_features)
            for m in model.modules() if isinstance(m, nn.Linear)]


# -- the benchmark -------------------------------------------------------------------------------------------
def grid(args) -> list[Config]:
    if args.tiny:
        return [Config("mlp", 4, width=16, depth=2), Config("cnn", 4), Config("gpt", 2)]
    configs = []
    if "mlp" in args.models:
        configs += [Config("mlp", b, width=w, depth=args.depth) for w in args.widths for b in args.batches]
    for family, kw in (("cnn", args.cnn), ("gpt", args.gpt)):
        if family in args.models:
            configs += [Config(family, b, kwargs=tuple(json.loads(kw).items())) for b in args.ref_batches]
    for family, kw in (("hf-gpt2", args.hf_gpt2), ("hf-resnet", args.hf_resnet)):
        if family in args.models:
            configs += [Config(family, b, kwargs=tuple(json.loads(kw).items())) for b in args.hf_batches]
    return configs


def run_config(config: Config, args, progress) -> Row:
    """Agreement, timings and representation sizes of one configuration (memory comes later)."""
    model, x, y, loss_fn = config.build(args.seed, args.device)
    row = Row(config, num_params(model), repeats=args.repeats)
    psg = config.batch * row.params * 4  # float32
    for e in args.engines:
        reason = ENGINES.get(e).unsupported(model)
        if reason is None and ENGINES.get(e).per_sample and psg > args.max_gb * 2 ** 30:
            reason = (f"per-sample gradients alone need {psg / 2 ** 30:.1f} GiB (> --max-gb {args.max_gb:g})")
        if reason:
            row.skipped[e] = reason
    if args.check:
        with quiet():
            checked = agreement(config, [e for e in args.engines if e not in row.skipped], args.device,
                                seed=args.seed)
        for e, v in checked.items():
            if isinstance(v, str):
                row.skipped[e] = v
            else:
                row.diff[e] = v
    engines = [e for e in args.engines if e not in row.skipped]
    graph = gradgraph.capture(model, x, y, loss_fn)
    row.feature_bytes, row.psg_bytes, row.graph_bytes = graph.feature_bytes(), graph.per_sample_grad_bytes(), \
        graph_bytes(graph)
    row.theory = theoretical_ratios(model) if config.family == "mlp" else []
    del graph
    steps = {}
    with quiet():
        for e in engines:
            try:
                steps[e] = prepare(e, model, loss_fn)
            except Exception as err:  # noqa: BLE001
                row.skipped[e] = f"{type(err).__name__}: {err}"[:300]
        row.times = time_steps(steps, x, y, args.device, args.warmup, args.repeats, args.budget, progress)
    return row


def run_memory(rows: list[Row], args) -> None:
    """Peak memory of every (configuration, engine). Worker subprocesses run ``--memory-jobs`` at a time (each
    measures its own process, so they do not disturb each other's figures, only the wall time), except peers
    whose per-sample gradients exceed 1 GiB: those run alone, so that two of them never share the RAM."""
    jobs = [(row, e) for row in rows for e in args.engines if e not in row.skipped]
    big = [(row, e) for row, e in jobs if ENGINES.get(e).per_sample and row.params * row.config.batch * 4 > 2 ** 30]
    small = [job for job in jobs if job not in big]
    workers = max(1, args.memory_jobs) if args.memory == "subprocess" else 1
    with tqdm(total=len(jobs), desc="peak memory", unit="run", disable=False) as bar:
        for batch, n in ((small, workers), (big, 1)):
            with ThreadPoolExecutor(max_workers=n) as pool:
                futures = {pool.submit(peak_memory, row.config, e, args.device, args.memory, args.seed): (row, e)
                           for row, e in batch}
                for future in as_completed(futures):
                    row, e = futures[future]
                    row.memory[e] = future.result()
                    bar.update(1)


# -- command line --------------------------------------------------------------------------------------------
def command_line(args) -> str:
    """``gradgraph bench capture`` with the options of ``args`` that differ from the defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["gradgraph", "bench", "capture"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value, default = getattr(args, action.dest, action.default), action.default
        if value == default:
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def run(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.tiny:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    if "plain" not in args.engines:
        args.engines = ["plain", *args.engines]
    args.engines = [e for e in ENGINES if e in args.engines]
    configs = grid(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    rows = []
    try:
        with frozen_heap(), tqdm(total=len(configs) * (args.warmup + args.repeats), desc="timing", unit="round",
                                 disable=False) as bar:
            for config in configs:
                bar.set_postfix_str(f"{config.label}, batch {config.batch}")
                rows.append(run_config(config, args, bar))
        if args.memory != "off":
            with frozen_heap():
                run_memory(rows, args)
        machine = machine_description(args.device)
    finally:
        torch.set_num_threads(threads)
    text = report(rows, args.engines, machine, command_line(args))
    out = Path(args.output)
    atomic_write_text(text, out)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:], _measure_job))
    parser = argparse.ArgumentParser(prog="python -m gradgraph.bench.capture", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
