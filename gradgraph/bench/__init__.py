"""Side-by-side measurements (``gradgraph bench NAME``). Each benchmark module defines
``add_arguments(parser)`` and ``run(args) -> int`` and writes a markdown table with the machine description.
Benchmarks measure; they never assert timings (tests only check their code paths on tiny sizes)."""
from __future__ import annotations

import importlib
import os
import platform

import torch

BENCHMARKS: dict[str, str] = {
    "capture": "gradgraph.bench.capture",
    "curvature": "gradgraph.bench.curvature",
    "metanet": "gradgraph.bench.metanet",
}


def add_bench_parsers(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark and write its markdown table")
    sub = bench.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)


def machine_description(device: str = "cpu") -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    line = (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    if device.startswith("cuda") and torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(0)}"
    return line
