"""Shared helpers for generated datasets: where they live, atomic writes, seeded per-item RNG."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


def default_root(name: str) -> str:
    """``$GRADGRAPH_DATASETS/<name>``, or ``datasets/<name>`` under the working directory."""
    return str(Path(os.environ.get("GRADGRAPH_DATASETS", "datasets")) / name)


def config_tag(config: dict) -> str:
    """A short stable hash of a generation config (datasets with other settings live beside it)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state afterwards (needed for
    samplers such as torch.distributions that take no generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def item_seed(base: int, index: int) -> int:
    """Seed of item ``index`` of a dataset with seed ``base``: independent of chunking and resumption."""
    return (base * 1_000_003 + index) % (2**63 - 1)
