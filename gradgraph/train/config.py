"""Settings of a training run as a dataclass (this module imports no torch, so the command line can show every
option and its default without loading torch).

A task's config subclasses :class:`TrainConfig`, adds its own fields with :func:`option` (a default and a help
text) and names its :class:`~gradgraph.train.Task` class in ``task``. The ``gradgraph train <task>`` command
is generated from those fields.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

__all__ = ["TrainConfig", "option"]


def option(default=MISSING, help: str = "", *, choices=None, identity: bool = True, **kwargs):
    """A config field with a command-line help text. ``choices`` (a list, or a callable returning one) limits the
    values; ``identity=False`` marks a setting that does not change the results (where files go, the device),
    so that a run can be resumed with another value."""
    meta = {"help": help, "choices": choices, "identity": identity}
    return field(default=default, metadata=meta, **kwargs)


@dataclass
class TrainConfig:
    """What every gradient-based training run needs. Subclasses add the task's data and model settings."""

    seed: int = option(0, "seed of the model initialization and of the data order")
    epochs: int = option(100, "passes over the training split")
    max_steps: int | None = option(None, "stop after this many optimizer steps (default: no limit)")
    batch_size: int = option(32, "items (graphs) per optimizer step")
    lr: float = option(1e-3, "Adam learning rate")
    patience: int | None = option(None, "stop after this many epochs without a better validation metric "
                                  "(default: never)")
    out_dir: str = option("runs", "parent folder of the run folder", identity=False)
    device: str = option("cpu", "cpu, cuda or cuda:k (under torchrun, cuda means one GPU per process)",
                         identity=False)
    threads: int | None = option(None, "torch intra-op threads (default on the command line: $OMP_NUM_THREADS "
                                 "if set, else 1, see gradgraph.threads; from Python: leave torch's setting)",
                                 identity=False)

    task: ClassVar[str] = ""  # "package.module:TaskClass" that trains this config

    def run_name(self) -> str:
        """The run folder's name (unique per setting that matters for a grid of runs)."""
        return f"seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name()

    def identity(self) -> dict:
        """The settings a checkpoint or a finished run must match to be resumed or reused."""
        keep = {f.name for f in fields(self) if f.metadata.get("identity", True)}
        return {k: v for k, v in asdict(self).items() if k in keep}
