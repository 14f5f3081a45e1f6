"""Settings of a training run as a dataclass (this module imports no torch, so the command line can show every
option and its default without loading torch).

A task's config subclasses :class:`TrainConfig`, adds its own fields with :func:`option` (a default and a help
text) and names its :class:`~gradgraph.train.Task` class in ``task``. The ``gradgraph train <task>`` command
is generated from those fields.
"""
from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from ..errors import ConfigError

__all__ = ["TrainConfig", "option"]


def option(default=MISSING, help: str = "", *, choices=None, identity: bool = True, low=None, above=None, **kwargs):
    """A config field with a command-line help text. ``choices`` (a list, or a callable returning one) limits the
    values; ``low`` (inclusive) and ``above`` (exclusive) bound a number; ``identity=False`` marks a setting
    that does not change the results (where files go, the device), so that a run can be resumed with another
    value. Every config checks its values when it is built (from Python or the command line)."""
    meta = {"help": help, "choices": choices, "identity": identity, "low": low, "above": above}
    return field(default=default, metadata=meta, **kwargs)


def _check_field(cls_name: str, f, value, hint) -> None:
    """Raise ConfigError if ``value`` is not a valid value of field ``f``."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) not in allowed:
            raise ConfigError(f"{cls_name}.{f.name} is required (got None)")
        return
    kinds = tuple(a for a in allowed if isinstance(a, type))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kinds and not isinstance(value, kinds) and not (float in kinds and number):
        raise ConfigError(f"{cls_name}.{f.name} must be {' or '.join(k.__name__ for k in kinds)}, got "
                          f"{type(value).__name__} {value!r}")
    choices = f.metadata.get("choices")
    if callable(choices):
        choices = choices()
    if choices and value not in choices:
        raise ConfigError(f"{cls_name}.{f.name} = {value!r} is not one of {', '.join(map(str, choices))}")
    low, above = f.metadata.get("low"), f.metadata.get("above")
    if number and low is not None and value < low:
        raise ConfigError(f"{cls_name}.{f.name} = {value} is out of range: it must be >= {low}")
    if number and above is not None and not value > above:
        raise ConfigError(f"{cls_name}.{f.name} = {value} is out of range: it must be > {above}")


@dataclass
class TrainConfig:
    """What every gradient-based training run needs. Subclasses add the task's data and model settings."""

    seed: int = option(0, "seed of the model initialization and of the data order", low=0)
    epochs: int = option(100, "passes over the training split", low=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps (default: no limit)", low=1)
    batch_size: int = option(32, "items (graphs) per optimizer step", low=1)
    lr: float = option(1e-3, "Adam learning rate", above=0)
    patience: int | None = option(None, "stop after this many epochs without a better validation metric "
                                  "(default: never)", low=1)
    out_dir: str = option("runs", "parent folder of the run folder", identity=False)
    device: str = option("cpu", "cpu, cuda or cuda:k (under torchrun, cuda means one GPU per process)",
                         identity=False)
    threads: int | None = option(None, "torch intra-op threads (default on the command line: $OMP_NUM_THREADS "
                                 "if set, else 1, see gradgraph.threads; from Python: leave torch's setting)",
                                 identity=False, low=1)
    overwrite: bool = option(False, "replace the run folder's files when they belong to a run with other settings "
                             "(default: refuse, naming the differing settings)", identity=False)

    task: ClassVar[str] = ""  # "package.module:TaskClass" that trains this config

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_field(type(self).__name__, f, getattr(self, f.name), hints[f.name])

    def run_name(self) -> str:
        """The run folder's name (unique per setting that matters for a grid of runs)."""
        return f"seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name()

    def architecture(self) -> dict | None:
        """What the model name stands for (its class and hyperparameters), when a table outside the config
        defines it: part of the identity, so that editing the table cannot silently reuse old runs."""
        return None

    def identity(self) -> dict:
        """The settings a checkpoint or a finished run must match to be resumed or reused."""
        keep = {f.name for f in fields(self) if f.metadata.get("identity", True)}
        ident = {k: v for k, v in asdict(self).items() if k in keep}
        arch = self.architecture()
        if arch is not None:  # as stored (JSON: tuples become lists), so that a stored identity compares equal
            ident["architecture"] = json.loads(json.dumps(arch))
        return ident
