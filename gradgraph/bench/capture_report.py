"""The results of ``gradgraph bench capture`` (:class:`Row`, :class:`Memory`) and its markdown report: the main
table (every engine's time, peak memory and agreement, with ratios to plain forward + backward), the targets
and the representation sizes. Formatting only: nothing here measures."""
from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from torch import nn

from .engines import ENGINES, PEERS

if TYPE_CHECKING:  # only for annotations: capture.py builds Rows and imports this module
    from .capture import Config

__all__ = ["Memory", "Row", "MAIN_COLUMNS", "TARGET_COLUMNS", "REPR_COLUMNS", "main_table", "target_table",
           "repr_table", "report"]

_MIB = 2 ** 20


# -- results -------------------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Peak extra bytes of one step, and how they were measured."""

    peak: int | None
    method: str
    note: str | None = None


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


WRONG = 1e-3  # a float32 engine further than this from the graph's gradients computes something else


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
            if isinstance(diff, float) and diff > WRONG:
                note = "; ".join(filter(None, ["**wrong gradients**", note]))
            out.append([row.config.label, str(row.config.batch), f"{row.params:,}", ENGINES.get(e).title, _fmt(t),
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
                    ENGINES.get(fast).title if fast else "-",
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
             "plain: `.grad` vs `graph.grads()`), relative to the largest gradient, on the first 4 samples; above "
             f"{WRONG:g} the note says **wrong gradients** (the graph's are checked against torch.func in the tests).")
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
