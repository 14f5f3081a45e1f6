"""gradgraph's thread policy: one torch intra-op thread unless asked for more.

gradgraph's work is many small ops (per-node scatters, per-layer einsums over a few hundred set elements), for
which extra intra-op threads cost more in synchronization than they give: measured with
``benchmarks/threads.py`` on 2 cores (README, "Threads"), 1 thread is as fast as or faster than 2 on a quiet
machine and several times faster when the cores are busy with other work (OpenMP threads spin-waiting for a
descheduled partner).

Who decides, first match wins:

1. an explicit count: ``--threads N`` on the command line, ``threads=N`` in a training config, or
   ``set_threads(N)``;
2. ``OMP_NUM_THREADS`` in the environment (torch reads it at import, so it is respected as is);
3. the default, :data:`DEFAULT_THREADS` (1).

The command line (every ``gradgraph`` command, ``make demo``, the benchmarks) and the notebooks apply this
policy at start. The library itself never changes the thread count behind your back: ``import gradgraph``,
``capture`` and ``train(task)`` with ``threads=None`` leave ``torch.set_num_threads`` as you set it.
"""
from __future__ import annotations

import os

__all__ = ["DEFAULT_THREADS", "resolve_threads", "set_threads"]

DEFAULT_THREADS = 1


def resolve_threads(requested: int | None = None) -> int:
    """The thread count the policy picks: ``requested``, else ``$OMP_NUM_THREADS``, else :data:`DEFAULT_THREADS`."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return DEFAULT_THREADS


def set_threads(requested: int | None = None) -> int:
    """Apply the policy to this process (``torch.set_num_threads``) and to the processes it starts
    (``OMP_NUM_THREADS``); returns the count."""
    import torch

    n = resolve_threads(requested)
    os.environ["OMP_NUM_THREADS"] = str(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
