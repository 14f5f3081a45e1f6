"""A run folder: the resumable checkpoint of an unfinished run, the metrics and best weights of a finished one.

Files (all written atomically by rank 0; checkpoints and weights in gradgraph's versioned format, read with
``torch.load(weights_only=True)``):

* ``checkpoint.pt``: ``{"identity", "model", "optimizer", "state"}`` after every epoch; a run with the same
  identity resumes from it, and it is deleted when the run finishes;
* ``metrics.json``: the finished run's metrics (including ``config.identity``);
* ``best.pt``: ``{"identity", "model", "metrics"}``, the best-validation weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import RunDirConflictError
from ..io import atomic_write_text, load_file, save_file
from .distributed import barrier, is_main

__all__ = ["RunDir"]


class RunDir:
    """The files of one run, identified by its settings (``identity``, a dict of plain values)."""

    def __init__(self, path: str | Path, identity: dict) -> None:
        self.path = Path(path)
        self.identity = identity

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def best_path(self) -> Path:
        return self.path / "best.pt"

    def claim(self, overwrite: bool = False) -> None:
        """Make sure the folder holds nothing of a run with other settings: refuse (naming the folder and the
        differing settings) or, with ``overwrite``, delete those files. A run with the same settings is left
        alone (it is resumed or read back)."""
        other = self._owner()
        if other is None or other == self.identity:
            return
        if not overwrite:
            diff = {k: (other.get(k), self.identity.get(k)) for k in sorted(set(other) | set(self.identity))
                    if other.get(k) != self.identity.get(k)}
            listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise RunDirConflictError(f"{self.path} holds a run with other settings ({listed}). Use another output "
                                      "folder, or pass overwrite=True (--overwrite) to replace it.")
        if is_main():
            for p in (self.checkpoint_path, self.metrics_path, self.best_path):
                p.unlink(missing_ok=True)
        barrier()

    def _owner(self) -> dict | None:
        """The identity of the run whose files are in the folder, or None."""
        if self.metrics_path.exists():
            return json.loads(self.metrics_path.read_text()).get("config", {}).get("identity")
        if self.checkpoint_path.exists():
            return load_file(self.checkpoint_path, "checkpoint", "cpu",
                             remedy="delete it to start the run again").get("identity")
        return None

    def finished(self) -> dict | None:
        """The metrics of a finished run with this identity, or None."""
        if not self.metrics_path.exists():
            return None
        done = json.loads(self.metrics_path.read_text())
        return done if done.get("config", {}).get("identity") == self.identity else None

    def load_checkpoint(self, map_location=None) -> dict | None:
        """The checkpoint of an unfinished run with this identity (mapped to ``map_location``, so a run resumes
        on another device), or None."""
        if not self.checkpoint_path.exists():
            return None
        ckpt = load_file(self.checkpoint_path, "checkpoint", map_location,
                         remedy="delete it to start the run again")
        return ckpt if ckpt.get("identity") == self.identity else None

    def save_checkpoint(self, model_state: dict, optimizer_state: dict, state: dict) -> None:
        if is_main():
            save_file({"identity": self.identity, "model": model_state, "optimizer": optimizer_state, "state": state},
                      self.checkpoint_path, "checkpoint")

    def finish(self, metrics: dict, best_state: dict) -> None:
        """Write the metrics and the best weights; the checkpoint is no longer needed."""
        if not is_main():
            return
        atomic_write_text(json.dumps(metrics, indent=1), self.metrics_path)
        save_file({"identity": self.identity, "model": best_state,
                   "metrics": {k: v for k, v in metrics.items() if k != "history"}}, self.best_path, "weights")
        self.checkpoint_path.unlink(missing_ok=True)

    def load_best(self, map_location=None) -> dict:
        """``{"identity", "model", "metrics"}`` of the finished run."""
        return load_file(self.best_path, "weights", map_location, remedy="rerun the training to rewrite it")
