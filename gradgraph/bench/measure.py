"""Measuring one step: wall time (round-robin, median of repeats) and peak memory (the resident set's
high-water mark on Linux, the CUDA allocator's peak on GPUs), and the line naming the machine. Shared by the
benchmarks; see :mod:`gradgraph.bench.capture` for the method and its caveats."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..io import atomic_write_text


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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def frozen_heap():
    """Move every object alive now out of the garbage collector's sight (``gc.freeze``), so that the
    ``gc.collect()`` between steps takes milliseconds instead of ~0.2 s (torch, PyG and the peers make a heap
    of ~300k objects). Nested uses are no-ops."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def time_steps(steps: dict[str, Callable], x, y, device: str, warmup: int = 2, repeats: int = 7,
               budget_s: float = 30.0, progress=None) -> dict[str, list[float]]:
    """Wall times (seconds) of ``repeats`` steps of every engine after ``warmup`` steps, round-robin. An engine
    whose measured steps have taken ``budget_s`` stops early once it has 3 of them."""
    times: dict[str, list[float]] = {e: [] for e in steps}
    spent = dict.fromkeys(steps, 0.0)
    with frozen_heap():
        for r in range(warmup + repeats):
            for name, step in steps.items():
                if r >= warmup and len(times[name]) >= 3 and spent[name] >= budget_s:
                    continue
                gc.collect()
                sync(device)
                t0 = time.perf_counter()
                result = step(x, y)
                sync(device)
                dt = time.perf_counter() - t0
                del result
                if r >= warmup:
                    times[name].append(dt)
                    spent[name] += dt
            if progress is not None:
                progress.update(1)
    return times


# -- peak memory ---------------------------------------------------------------------------------------------
def status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def release_freed_memory_to_os(threshold: int = 64 * 1024) -> bool:
    """glibc: serve every allocation of ``threshold`` bytes or more by its own mmap (returned to the OS when
    freed), stop adapting that threshold, and give the free heap back now (``malloc_trim``), so that RSS
    tracks live memory from here on. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def step_peak(step: Callable[[], object], device: str = "cpu") -> tuple[int | None, str, str | None]:
    """Peak extra bytes while ``step()`` runs and its result is held, above what is in use before it:
    ``(bytes, method, note)``. CPU: VmHWM - VmRSS after resetting the high-water mark (Linux), else a
    ``ru_maxrss`` lower bound; CUDA: ``max_memory_allocated`` above the allocation before the step."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak, "torch.cuda.max_memory_allocated", None
    base_kib = status_kib("VmRSS")
    if base_kib is not None and reset_rss_peak():
        result = step()
        peak = (status_kib("VmHWM") - base_kib) * 1024
        del result
        return peak, "VmHWM - VmRSS", None
    before = maxrss_bytes()
    result = step()
    peak = maxrss_bytes() - before
    del result
    return peak, "ru_maxrss", "lower bound (ru_maxrss cannot be reset)"


# -- one measurement per fresh process (CPU): nothing an earlier measurement allocated is still mapped ----------
def _failed(note: str) -> dict:
    return {"peak": None, "method": "failed", "note": note[:300]}


def worker_main(argv: list[str], measure: Callable[[dict], dict]) -> int:
    """Entry of ``python -m <benchmark module> --worker JSON``: set the process up like every measurement
    (freed memory back to the OS, the parent's thread count), run ``measure(job)`` and print its result as one
    JSON line (a failure is reported in that line, never raised: the benchmark tables show it)."""
    job = json.loads(argv[0])
    release_freed_memory_to_os()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    try:
        result = measure(job)
    except Exception as e:  # noqa: BLE001
        result = _failed(f"{type(e).__name__}: {e}")
    print(json.dumps(result))
    return 0


def run_worker(module: str, job: dict) -> dict:
    """Run ``job`` in ``python -m module --worker JSON`` (see :func:`worker_main`) and return its JSON result,
    ``{"peak": None, "method": "failed", "note": ...}`` if the process died."""
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(job)],
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return _failed(f"memory worker failed: {why}")
    return json.loads(lines[-1])


def write_report(table: str, results: str | Path, stem: str, plot: Callable[[Path], None]) -> int:
    """Write a benchmark's table (``<results>/<stem>.md``, atomically) and its plot (``<stem>.png``), print
    both paths; the benchmark's exit status (0)."""
    out = Path(results)
    atomic_write_text(table, out / f"{stem}.md")
    plot(out / f"{stem}.png")
    print(table)
    print(f"\nwritten: {out / f'{stem}.md'}, {out / f'{stem}.png'}")
    return 0
