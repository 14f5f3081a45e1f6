"""Fault injection: a process killed at a seeded file write (the file half-written, nothing cleaned up, as after
``kill -9``) and then rerun ends with exactly the result of an uninterrupted run: training, dataset generation
and PES meta-training."""
import os
import random

import pytest
import torch
from test_train_loop import ToyTask, _cfg

from gradgraph import io
from gradgraph.data import SirenFisher
from gradgraph.io import load_file
from gradgraph.train import train

SMALL = dict(num_models=12, num_points=8, num_fisher_points=64, chunk_size=5, progress=False)


class Killed(BaseException):
    """The simulated kill (a BaseException: no ``except Exception`` in the code under test catches it)."""


def _writes(fn) -> int:
    """How many atomic file writes ``fn()`` makes."""
    n = {"writes": 0}
    real = io.os.replace

    def counting(src, dst):
        n["writes"] += 1
        return real(src, dst)
    io.os.replace = counting
    try:
        fn()
    finally:
        io.os.replace = real
    return n["writes"]


def _killed_at_write(monkeypatch, k: int, fn) -> None:
    """Run ``fn()`` and kill it at its k-th atomic write: the temporary file is left half-written and the
    rename never happens (nor does any cleanup)."""
    real = io.os.replace
    calls = {"n": 0}
    with monkeypatch.context() as m:
        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == k:
                size = os.path.getsize(src)
                with open(src, "r+b") as f:
                    f.truncate(size // 2)
                m.setattr(io.os, "remove", lambda path: None)  # kill -9: the finally blocks do not run
                raise Killed
            return real(src, dst)
        m.setattr(io.os, "replace", replace)
        with pytest.raises(Killed):
            fn()


def _kill_points(n: int, seed: int, count: int = 3) -> list[int]:
    return sorted(random.Random(seed).sample(range(1, n + 1), min(count, n)))


def test_training_killed_at_seeded_writes_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    whole = {}
    n = _writes(lambda: whole.update(train(ToyTask(_cfg(tmp_path / "whole", epochs=6)), progress=False)))
    assert n >= 6  # a checkpoint per epoch, the best weights, the metrics
    for k in _kill_points(n, seed=0):
        root = tmp_path / f"k{k}"
        _killed_at_write(monkeypatch, k, lambda root=root: train(ToyTask(_cfg(root, epochs=6)), progress=False))
        resumed = train(ToyTask(_cfg(root, epochs=6)), progress=False)
        assert resumed["history"] == whole["history"], k
        assert resumed["test_mse"] == whole["test_mse"] and resumed["best_epoch"] == whole["best_epoch"]


def test_dataset_generation_killed_at_seeded_writes_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    fresh = {}
    n = _writes(lambda: fresh.update(ds=SirenFisher(tmp_path / "whole", **SMALL)))
    for k in _kill_points(n, seed=1):
        root = tmp_path / f"k{k}"
        _killed_at_write(monkeypatch, k, lambda root=root: SirenFisher(root, **SMALL))
        resumed = SirenFisher(root, **SMALL)
        for key in ("entry_x", "y", "std_est", "p"):
            assert torch.equal(getattr(resumed, key), getattr(fresh["ds"], key)), (k, key)


def test_meta_training_killed_at_seeded_writes_resumes_to_the_same_meta_parameters(tmp_path, monkeypatch):
    from gradgraph.cli import main

    def argv(out):
        return ["meta-train", "--variant", "ds", "--pairs", "1", "--truncation", "2", "--horizon", "3", "--steps",
                "4", "--save-every", "1", "--out", str(out), "--quiet"]
    n = _writes(lambda: main(argv(tmp_path / "whole")))
    want = load_file(tmp_path / "whole" / "rule.pt", "lopt-rule")
    for k in _kill_points(n, seed=2):
        root = tmp_path / f"k{k}"
        _killed_at_write(monkeypatch, k, lambda root=root: main(argv(root)))
        assert main(argv(root)) == 0
        got = load_file(root / "rule.pt", "lopt-rule")
        assert got["meta_steps"] == 4
        for name, value in want["state"].items():
            assert torch.equal(got["state"][name], value), (k, name)
