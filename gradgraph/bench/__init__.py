"""Side-by-side measurements (``gradgraph bench NAME``). Each benchmark module defines
``add_arguments(parser)`` and ``run(args) -> int`` and writes a markdown table with the machine description.
Benchmarks measure; they never assert timings (tests only check their code paths on tiny sizes).

:data:`BENCHMARKS` lists them without importing them (this module imports neither torch nor a benchmark, so
that ``gradgraph --help`` stays fast): ``BENCHMARKS.names()``, ``BENCHMARKS.help(name)`` and
``BENCHMARKS.get(name)``, which imports and returns the benchmark's module.
"""
from __future__ import annotations

import importlib

from ..registry import Registry

__all__ = ["BENCHMARKS"]

# Lazy entries "gradgraph.bench:NAME": the module-level __getattr__ below imports the submodule on first use.
# The help text is the first line of the module's docstring (a test keeps the two equal).
BENCHMARKS = Registry("benchmark")
BENCHMARKS.register("capture", "gradgraph.bench:capture",
                    help="Capture speed and memory, side by side with the per-sample-gradient libraries.")
BENCHMARKS.register("curvature", "gradgraph.bench:curvature",
                    help="Curvature estimation: every model over training sizes and seeds, against S and calibrated "
                         "estimators.")
BENCHMARKS.register("curvature-trace", "gradgraph.bench:curvature_trace",
                    help="Fisher trace of million-parameter SIRENs: GradMetaNet against S, calibrated S and a "
                         "pooled-statistics MLP.")
BENCHMARKS.register("editing", "gradgraph.bench:editing",
                    help="INR editing: every model over seeds on the digit INRs, against no edit, the oracle and k "
                         "Adam steps.")
BENCHMARKS.register("lopt", "gradgraph.bench:lopt",
                    help="Learned optimizers against tuned Adam: steps and wall-clock time to Adam's best test "
                         "loss, over seeds.")
BENCHMARKS.register("lopt-step", "gradgraph.bench:lopt_step",
                    help="Learned-optimizer step cost: Adam, sgdm, ds and ds+gradmetanet per step, each beside its "
                         "FLOP floor.")
BENCHMARKS.register("metanet", "gradgraph.bench:metanet",
                    help="Metanetwork cost: GradMetaNet (and GradMetaNet++) against the weight-space baseline on "
                         "per-sample gradients.")
BENCHMARKS.register("norms", "gradgraph.bench:norms",
                    help="Per-sample gradient norms: gradgraph from (a, g) against Opacus's ghost clipping and "
                         "torch.func.")


def __getattr__(name: str):
    """``gradgraph.bench.<benchmark>`` imports that benchmark's module on first access (PEP 562)."""
    if name.replace("_", "-") in BENCHMARKS:  # "lopt-step" lives in lopt_step.py
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

