"""The chunk store every generated dataset is built on: resumable, content-checked, and safe for several
processes generating the same dataset at once (two users, two notebooks, or ``torchrun`` ranks sharing work).

A dataset of N items is generated in chunks (``raw/<tag>/chunk_00000.pt``, ...), each written atomically by
:func:`gradgraph.io.save_file` (a temporary file unique to the writer, then a rename; a content hash checked on
load), then merged once into ``processed/<name>_<tag>.pt`` and the chunks deleted.

* **Claims, not a lock**: a writer takes chunk i by creating ``chunk_i.claim`` exclusively (``O_EXCL``), so
  concurrent writers split the chunks between them; a writer that finds every unfinished chunk claimed waits
  for them, and takes over a claim older than ``stale_s`` seconds whose chunk never appeared (its writer died).
* **Merging once**: whoever finds every chunk first merges; a writer that finds the merged file already there
  (or its chunks already deleted by the one who merged) uses that file. Any writer's merge holds the same
  bytes, so even two merges at once leave a correct file.
* **Damage**: a chunk that fails its content check (a fault outside gradgraph's atomic writes) is generated
  again.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

from torch_geometric.data import InMemoryDataset
from tqdm.auto import tqdm

from ..errors import FileFormatError
from ..io import atomic_write_text, load_file, save_file

__all__ = ["ChunkStore", "GeneratedDataset"]


class ChunkStore:
    """The chunks of one dataset in ``folder``: chunk i holds ``sizes[i]`` items made by ``generate(i, bar)``."""

    def __init__(self, folder: str | Path, sizes: list[int], generate: Callable[[int, object], dict],
                 stale_s: float = 900.0, poll_s: float = 0.2) -> None:
        self.folder, self.sizes, self.generate = Path(folder), list(sizes), generate
        self.stale_s, self.poll_s = stale_s, poll_s

    def path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:05d}.pt"

    def _claim_path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:05d}.claim"

    def _claim(self, i: int) -> bool:
        """Take chunk i for this process (False: another live writer holds it)."""
        claim = self._claim_path(i)
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - claim.stat().st_mtime > self.stale_s:  # its writer died: take it over
                        claim.unlink()
                        continue
                return False
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return True
        return False

    def _write(self, i: int, bar) -> None:
        try:
            save_file(self.generate(i, bar), self.path(i), "dataset-chunk")
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._claim_path(i).unlink()

    def fill(self, bar, done: Callable[[], bool]) -> None:
        """Make every chunk exist (generating the unclaimed ones, waiting for the others), unless ``done()``
        says another writer has already merged them."""
        self.folder.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(len(self.sizes)) if not self.path(i).exists()]
        bar.update(sum(self.sizes) - sum(self.sizes[i] for i in missing))
        while missing and not done():
            waiting = []
            for i in missing:
                if self.path(i).exists():
                    bar.update(self.sizes[i])
                elif self._claim(i):
                    if self.path(i).exists():  # finished between our check and our claim
                        self._claim_path(i).unlink()
                        bar.update(self.sizes[i])
                    else:
                        self._write(i, bar)
                else:
                    waiting.append(i)
            if waiting:  # other writers hold these chunks: look again shortly
                time.sleep(self.poll_s)
            missing = waiting

    def read(self, i: int, bar) -> dict | None:
        """Chunk i (generated again if damaged); None if it is gone because another writer merged it."""
        try:
            return load_file(self.path(i), "dataset-chunk")
        except FileNotFoundError:
            return None
        except FileFormatError as e:
            print(f"{e}; generating chunk {i} again", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                self.path(i).unlink()
            self._write(i, bar)
            return load_file(self.path(i), "dataset-chunk")

    def remove(self) -> None:
        for i in range(len(self.sizes)):
            with contextlib.suppress(FileNotFoundError):  # another writer may have removed it already
                self.path(i).unlink()


class GeneratedDataset(InMemoryDataset):
    """A PyG ``InMemoryDataset`` generated from seeds through a :class:`ChunkStore` (see the module docstring).

    Subclasses set ``self.config``, ``self.tag``, ``self.chunk_size`` and ``self.progress`` before calling
    ``super().__init__(root, transform)`` and define ``num_items``, ``name``, ``bar_spec`` (tqdm arguments and
    the bar units per item), ``generate_chunk(indices, bar) -> dict`` and ``merge(chunks) -> (data, readme)``.
    """

    name = "dataset"

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform, log=False)

    @property
    def num_items(self) -> int:
        raise NotImplementedError

    def bar_spec(self) -> tuple[dict, int]:
        return {"desc": f"generating {type(self).__name__}", "unit": "item"}, 1

    def generate_chunk(self, indices: range, bar) -> dict:
        raise NotImplementedError

    def merge(self, chunks: list[dict]) -> tuple[dict, str]:
        raise NotImplementedError

    # -- the store ------------------------------------------------------------------------------------------
    def _ranges(self) -> list[range]:
        n, c = self.num_items, self.chunk_size
        return [range(lo, min(lo + c, n)) for lo in range(0, n, c)]

    @property
    def store(self) -> ChunkStore:
        ranges = self._ranges()
        _, per_item = self.bar_spec()
        return ChunkStore(self.raw_dir, [len(r) * per_item for r in ranges],
                          lambda i, bar: self.generate_chunk(ranges[i], bar))

    def _merged(self) -> bool:
        return os.path.exists(self.processed_paths[0])

    # -- PyG dataset protocol (its _download/_process would race between writers: replaced) ------------------
    @property
    def raw_file_names(self) -> list[str]:
        return []  # the store tracks its chunks itself

    @property
    def processed_file_names(self) -> list[str]:
        return [f"{self.name}_{self.tag}.pt"]

    # PyG calls _download/_process only for classes that override download/process: these two mark the
    # dataset as generated-and-merged; the work is in _download (ChunkStore.fill) and _process (the merge)
    def download(self) -> None:
        """Nothing to download: the chunks are generated from seeds (see ``_download``)."""

    def process(self) -> None:
        """See ``_process``: the chunks are merged once, by whichever writer finds them all."""

    def _download(self) -> None:
        if self._merged():
            return
        kwargs, per_item = self.bar_spec()
        with tqdm(total=self.num_items * per_item, disable=not self.progress, **kwargs) as bar:
            self.store.fill(bar, self._merged)

    def _process(self) -> None:
        if self._merged():
            return
        store, chunks = self.store, []
        for i in range(len(store.sizes)):
            chunk = store.read(i, tqdm(disable=True))
            if chunk is None:  # deleted by a writer that merged: its file is there (or being renamed into place)
                if self._merged():
                    return
                raise FileNotFoundError(f"{store.path(i)} disappeared before {self.processed_paths[0]} was "
                                        "written; rerun to regenerate it")
            chunks.append(chunk)
        data, readme = self.merge(chunks)
        save_file(data, self.processed_paths[0], "dataset")
        atomic_write_text(readme, Path(self.root) / "README.md")
        store.remove()
