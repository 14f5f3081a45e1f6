"""Capture speed and memory, side by side with the per-sample-gradient libraries.

For every configuration (a model and a batch) five engines do one training-step's worth of gradient work on
the same weights and data; each is timed and its peak memory measured:

==========  ======================================================================================================
plain       forward + backward of the summed per-sample loss (fills ``.grad``): the cost every ratio is relative to
gradgraph   :func:`gradgraph.capture` to a :class:`~gradgraph.GradientGraph` (per neuron and set element ``a``
            and ``g``; no weight-gradient products, ``.grad`` untouched)
vmap        ``torch.func`` ``vmap(grad(single-sample loss))``: per-sample gradients ``{name: [b, *shape]}``
opacus      Opacus ``GradSampleModule(loss_reduction="sum")``: forward + backward, ``p.grad_sample`` (and ``.grad``)
backpack    BackPACK ``BatchGrad``: forward + backward inside ``backpack(BatchGrad())``, ``p.grad_batch`` (and
            ``.grad``); skipped, with the reason, for models with a parameterized module it has no extension for
==========  ======================================================================================================

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
  is in the report's "all graph tensors" column).

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
import contextlib
import copy
import dataclasses
import importlib.metadata
import itertools
import json
import os
import shlex
import statistics
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..io import atomic_write_text
from .measure import frozen_heap, release_freed_memory_to_os, run_worker, step_peak, time_steps, worker_main

DEFAULT_OUTPUT = "benchmarks/results/capture.md"
PEERS = ("vmap", "opacus", "backpack")
_MIB = 2 ** 20

# harmless warnings of the peers on these models (containers holding parameters, SDPA without a vmap rule)
_QUIET = ("Extension saving to grad_batch does not have an extension for Module",
          "There is a performance drop because we have not yet implemented the batching rule",
          "Full backward hook is firing when gradients are computed with respect to module outputs",
          "Using a non-full backward hook when the forward contains multiple autograd Nodes")


@contextlib.contextmanager
def _quiet():
    """Silence the peers' known, harmless warnings."""
    with warnings.catch_warnings():
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=msg)
        yield


# -- configurations ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One model and batch size. ``family`` is ``mlp`` (``width``, ``depth`` hidden layers of that width,
    ``width`` inputs and 10 classes), ``cnn`` or ``gpt`` (the reference models, with ``kwargs`` overriding
    their defaults)."""

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
        return f"{self.family.upper()} (reference{', ' + extra if extra else ''})"

    def build(self, seed: int = 0, device: str = "cpu", dtype=torch.float32):
        """``(model, inputs, targets, loss_fn)``; the model is in training mode (Opacus records only then)."""
        from ..models import CNN, GPT, MLP

        torch.manual_seed(seed)
        if self.family == "mlp":
            model = MLP(self.width, (self.width,) * self.depth, 10)
        elif self.family in ("cnn", "gpt"):
            model = {"cnn": CNN, "gpt": GPT}[self.family](**dict(self.kwargs))
        else:
            raise ValueError(f"unknown model family {self.family!r}: use mlp, cnn or gpt")
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


# -- engines -------------------------------------------------------------------------------------------------
Step = Callable[[Tensor, Tensor], object]


@dataclass(frozen=True)
class Engine:
    """``prepare(model, loss_fn) -> step``; ``step(x, y)`` does one step and returns its result (kept alive
    while memory is measured); ``grads(result)`` reads ``{name: [b, *shape]}`` per-sample gradients from it
    (the plain engine: the summed gradient ``{name: [*shape]}``). ``unsupported(model)`` gives the reason an
    engine cannot handle a model, or None."""

    name: str
    title: str
    prepare: Callable[[nn.Module, Callable], Step]
    grads: Callable[[object], dict[str, Tensor]]
    unsupported: Callable[[nn.Module], str | None] = lambda model: None
    per_sample: bool = True  # computes per-sample gradients (a peer)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _take(params, attr: str) -> dict[str, Tensor]:
    """Move ``p.<attr>`` of every parameter into a dict (the step's result) and clear ``.grad`` too, so that
    nothing of a step outlives its result: dropping the result frees it, and the next step starts from the
    same state (this matters for the memory measurement, whose warm-up step must leave nothing behind)."""
    out = {}
    for n, p in params:
        out[n] = getattr(p, attr)
        p.grad = None
        if attr != "grad":
            setattr(p, attr, None)
    return out


def _prepare_plain(model, loss_fn) -> Step:
    params = _trainable(model)

    def step(x, y):
        loss_fn(model(x), y).sum().backward()
        return _take(params, "grad")
    return step


def _prepare_gradgraph(model, loss_fn) -> Step:
    import gradgraph

    return lambda x, y: gradgraph.capture(model, x, y, loss_fn)


def _prepare_vmap(model, loss_fn) -> Step:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in _trainable(model)}
    rest = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    rest.update(dict(model.named_buffers()))

    def one(p, x, y):  # the loss of one sample: x [*in], y [*target]
        out = functional_call(model, (p, rest), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
    return lambda x, y: per_sample(params, x, y)


def _prepare_opacus(model, loss_fn) -> Step:
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = _trainable(model)

    def step(x, y):
        loss_fn(gsm(x), y).sum().backward()
        return _take(params, "grad_sample")
    return step


def _backpack_unsupported(model: nn.Module) -> str | None:
    try:
        from backpack.extensions import BatchGrad
    except ImportError as e:
        return f"backpack-for-pytorch is not installed ({e})"
    known = getattr(BatchGrad(), "_BackpropExtension__module_extensions", None)
    if known is None:
        return None
    missing = sorted({type(m).__name__ for m in model.modules()
                      if any(p.requires_grad for p in m.parameters(recurse=False)) and type(m) not in known})
    if missing:
        return f"BackPACK {_version('backpack-for-pytorch')} BatchGrad has no extension for {', '.join(missing)}"
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _prepare_backpack(model, loss_fn) -> Step:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(model)
    params = _trainable(model)

    def step(x, y):
        with backpack(BatchGrad()):
            loss_fn(model(x), y).sum().backward()
        return _take(params, "grad_batch")
    return step


def _opacus_unsupported(model: nn.Module) -> str | None:
    try:
        from opacus import GradSampleModule
    except ImportError as e:
        return f"opacus is not installed ({e})"
    errors = GradSampleModule.validate(model, strict=False)
    return "; ".join(str(e) for e in errors) or None


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("plain", "forward + backward", _prepare_plain, lambda r: r, per_sample=False),
    Engine("gradgraph", "gradgraph.capture", _prepare_gradgraph, lambda g: g.per_sample_grads(), per_sample=False),
    Engine("vmap", "torch.func vmap(grad)", _prepare_vmap, lambda r: r),
    Engine("opacus", "Opacus GradSampleModule", _prepare_opacus, lambda r: r, _opacus_unsupported),
    Engine("backpack", "BackPACK BatchGrad", _prepare_backpack, lambda r: r, _backpack_unsupported),
)}


def prepare(engine: str, model: nn.Module, loss_fn) -> Step:
    """A step function of ``engine`` on its own copy of ``model`` (peers add hooks or wrap the model)."""
    return ENGINES[engine].prepare(copy.deepcopy(model), loss_fn)


def engine_grads(engine: str, model: nn.Module, x: Tensor, y: Tensor, loss_fn) -> dict[str, Tensor]:
    """One step of ``engine`` and the gradients it produced (see :attr:`Engine.grads`)."""
    with _quiet():
        return ENGINES[engine].grads(prepare(engine, model, loss_fn)(x, y))


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
    import gradgraph

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


# -- timing --------------------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Peak extra bytes of one step, and how they were measured."""

    peak: int | None
    method: str
    note: str | None = None


def measure_peak(config: Config, engine: str, device: str = "cpu", seed: int = 0) -> Memory:
    """Peak memory of one step of ``engine`` above the prepared state, in this process (see module docs)."""
    model, x, y, loss_fn = config.build(seed, device)
    with _quiet():
        step = prepare(engine, model, loss_fn)
        del model
        step(x, y)  # warm-up: lazy initializations, hooks, caches; freed before measuring
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
@dataclass
class Row:
    """One configuration's results: per engine, step times (s), peak memory, agreement or a skip reason."""

    config: Config
    params: int
    times: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)
    diff: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    feature_bytes: int = 0
    psg_bytes: int = 0
    graph_bytes: int = 0
    theory: list[float] = field(default_factory=list)
    repeats: int = 0

    def median_ms(self, engine: str) -> float | None:
        t = self.times.get(engine)
        return statistics.median(t) * 1e3 if t else None

    def peak_mib(self, engine: str) -> float | None:
        m = self.memory.get(engine)
        return None if m is None or m.peak is None else m.peak / _MIB

    def fastest_peer(self) -> str | None:
        done = [e for e in PEERS if self.median_ms(e) is not None]
        return min(done, key=self.median_ms) if done else None


def grid(args) -> list[Config]:
    if args.tiny:
        return [Config("mlp", 4, width=16, depth=2), Config("cnn", 4), Config("gpt", 2)]
    configs = []
    if "mlp" in args.models:
        configs += [Config("mlp", b, width=w, depth=args.depth) for w in args.widths for b in args.batches]
    for family, kw in (("cnn", args.cnn), ("gpt", args.gpt)):
        if family in args.models:
            configs += [Config(family, b, kwargs=tuple(json.loads(kw).items())) for b in args.ref_batches]
    return configs


def run_config(config: Config, args, progress) -> Row:
    """Agreement, timings and representation sizes of one configuration (memory comes later)."""
    import gradgraph

    model, x, y, loss_fn = config.build(args.seed, args.device)
    row = Row(config, num_params(model), repeats=args.repeats)
    psg = config.batch * row.params * 4  # float32
    for e in args.engines:
        reason = ENGINES[e].unsupported(model)
        if reason is None and ENGINES[e].per_sample and psg > args.max_gb * 2 ** 30:
            reason = (f"per-sample gradients alone need {psg / 2 ** 30:.1f} GiB (> --max-gb {args.max_gb:g})")
        if reason:
            row.skipped[e] = reason
    if args.check:
        with _quiet():
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
    with _quiet():
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
    big = [(row, e) for row, e in jobs if ENGINES[e].per_sample and row.params * row.config.batch * 4 > 2 ** 30]
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


# -- the tables ----------------------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}" if v >= 1 else f"{v:.{digits + 1}g}"


def _ratio(v: float | None, ref: float | None) -> str:
    return "-" if v is None or not ref else f"{v / ref:.2f}x"


MAIN_COLUMNS = ["model", "batch", "params", "engine", "time [ms]", "time / plain", "peak memory [MiB]",
                "memory / plain", "max rel. diff", "note"]
TARGET_COLUMNS = ["model", "batch", "capture time / plain", "fastest peer", "peer time / capture",
                  "peer memory / capture", "leanest peer memory / capture"]
REPR_COLUMNS = ["model", "batch", "feature bytes", "per-sample grad bytes", "ratio", "theory (whole model)",
                "ratio / theory", "theory per layer", "all graph tensors"]


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if c in ("model", "engine", "note", "fastest peer", "theory per layer") else "---:"
             for c in columns]
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def main_table(rows: list[Row], engines: list[str]) -> list[str]:
    out = []
    for row in rows:
        t0, m0 = row.median_ms("plain"), row.peak_mib("plain")
        for e in engines:
            t, m = row.median_ms(e), row.peak_mib(e)
            mem = row.memory.get(e)
            note = row.skipped.get(e) or (mem.note if mem is not None else None) or ""
            if not note and e in row.times and len(row.times[e]) < row.repeats:
                note = f"{len(row.times[e])} timed steps (--budget)"
            diff = "ref" if e == "gradgraph" and e in row.diff else row.diff.get(e)
            out.append([row.config.label, str(row.config.batch), f"{row.params:,}", ENGINES[e].title, _fmt(t),
                        _ratio(t, t0), _fmt(m), _ratio(m, m0), diff if isinstance(diff, str) else "-" if diff is None
                        else f"{diff:.1e}", note])
    return _table(MAIN_COLUMNS, out)


def target_table(rows: list[Row]) -> list[str]:
    out = []
    for row in rows:
        tc, mc = row.median_ms("gradgraph"), row.peak_mib("gradgraph")
        fast = row.fastest_peer()
        lean = [row.peak_mib(e) for e in PEERS if row.peak_mib(e) is not None]
        out.append([row.config.label, str(row.config.batch), _ratio(tc, row.median_ms("plain")),
                    ENGINES[fast].title if fast else "-",
                    _ratio(row.median_ms(fast), tc) if fast else "-",
                    _ratio(row.peak_mib(fast), mc) if fast else "-",
                    _ratio(min(lean), mc) if lean else "-"])
    return _table(TARGET_COLUMNS, out)


def repr_table(rows: list[Row]) -> list[str]:
    out = []
    for row in rows:
        if not row.feature_bytes:
            continue
        ratio, whole = row.feature_bytes / row.psg_bytes, None
        if row.theory:
            lin = [(m.in_features, m.out_features) for m in _linears(row.config)]
            whole = sum(a + b for a, b in lin) / sum(a * b for a, b in lin)
        out.append([row.config.label, str(row.config.batch), f"{row.feature_bytes:,}", f"{row.psg_bytes:,}",
                    f"{ratio:.4g}", "-" if whole is None else f"{whole:.4g}",
                    "-" if whole is None else f"{ratio / whole:.2f}x",
                    ", ".join(f"{t:.4g}" for t in row.theory) or "-", f"{row.graph_bytes:,}"])
    return _table(REPR_COLUMNS, out)


def _linears(config: Config) -> list[nn.Linear]:
    dims = [config.width] * (config.depth + 1) + [10]
    return [nn.Linear(a, b, device="meta") for a, b in itertools.pairwise(dims)]


def report(rows: list[Row], engines: list[str], machine: str, command: str) -> str:
    """The markdown report: machine, command, the main table, the targets and the representation sizes."""
    intro = ("Time: median wall time of one step after warm-up (engines interleaved round-robin). Peak memory: "
             "extra memory of one step above the prepared model and data (see `gradgraph.bench.capture`). "
             "Ratios are to plain forward + backward of the same configuration. `max rel. diff`: largest "
             "difference of the engine's gradients from the graph's reconstruction (`graph.per_sample_grads()`; "
             "plain: `.grad` vs `graph.grads()`), relative to the largest gradient, on the first 4 samples.")
    targets = ("capture time / plain: target <= 1.2x. Peer / capture: how many times slower (more memory) the "
               "fastest per-sample-gradient peer is; target >= 5x (time) and >= 10x (memory) at width >= 1024, "
               "batch 128.")
    sizes = ("feature bytes: the graph's `entry_x` (a and g per node and element); per-sample grad bytes: b x P "
             "values; theory: (d_in + d_out) / (d_in d_out) per linear layer, and Σ(d_in + d_out) / Σ d_in d_out "
             "for the whole MLP. The graph keeps an (a, g) pair for every node, so the input layer's nodes carry "
             "an empty g slot and the output layer's an empty a slot (masked by `entry_mask`): that, not the "
             "hidden layers, makes ratio / theory exceed 1. All graph tensors adds the int64 entry indices, the "
             "entry mask and the node, layer and op tables (cached per spec: shared by every graph of the same "
             "model and batch shape).")
    lines = ["# Capture speed and memory", "", f"Machine: {machine}  ",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  ", f"Command: `{command}`", "", intro, ""]
    lines += main_table(rows, engines)
    lines += ["", "## Targets", "", targets, ""]
    lines += target_table(rows)
    lines += ["", "## Representation size", "", sizes, ""]
    lines += repr_table(rows)
    return "\n".join(lines) + "\n"


# -- command line --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("grid")
    g.add_argument("--models", nargs="+", choices=("mlp", "cnn", "gpt"), default=["mlp", "cnn", "gpt"])
    g.add_argument("--widths", nargs="+", type=int, default=[256, 1024, 2048],
                   help="MLP widths (default 256 1024 2048)")
    g.add_argument("--batches", nargs="+", type=int, default=[32, 128], help="MLP batch sizes (default 32 128)")
    g.add_argument("--depth", type=int, default=2, help="MLP hidden layers (default 2)")
    g.add_argument("--ref-batches", nargs="+", type=int, default=[128],
                   help="batch sizes of the reference CNN and GPT (default 128)")
    g.add_argument("--cnn", default="{}", metavar="JSON", help='reference CNN arguments, e.g. \'{"image_size": 16}\'')
    g.add_argument("--gpt", default="{}", metavar="JSON", help='reference GPT arguments, e.g. \'{"d_model": 128}\'')
    g.add_argument("--tiny", action="store_true", help="a seconds-long smoke grid (MLP 16x2, CNN, GPT; tiny batches)")
    m = parser.add_argument_group("measurement")
    m.add_argument("--engines", nargs="+", choices=tuple(ENGINES), default=list(ENGINES))
    m.add_argument("--device", default="cpu", help="cpu or cuda (every engine on the GPU, CUDA memory stats)")
    m.add_argument("--repeats", type=int, default=7, help="timed steps per engine (default 7)")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps before (default 2)")
    m.add_argument("--budget", type=float, default=20.0,
                   help="seconds of timed steps per engine and configuration after which it stops at 3 (default 20)")
    m.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default="subprocess",
                   help="peak memory: a fresh process per engine (default), this process, or not at all")
    m.add_argument("--memory-jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="memory worker processes at a time (default: 2, or 1 on one core)")
    m.add_argument("--max-gb", type=float, default=8.0,
                   help="skip per-sample-gradient peers whose gradients alone exceed this many GiB (default 8)")
    m.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing every engine's gradients with the graph's")
    m.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, usually the number of cores)")
    m.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"markdown file (default {DEFAULT_OUTPUT})")


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
    from . import machine_description

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
