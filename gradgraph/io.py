"""Files written so that a crash never leaves half of one: a temporary file in the same folder, then a rename."""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import uuid
from pathlib import Path

import torch

from .errors import FileFormatError


@contextlib.contextmanager
def _replaced_atomically(path: str | Path):
    """Yield a fresh temporary path beside ``path`` (unique per writer, so concurrent writers of one file do not
    collide; created with the umask's permissions, like a plain ``open``); when the block succeeds, rename it
    onto ``path``. The temporary file is removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"))
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    with _replaced_atomically(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` the same way."""
    with _replaced_atomically(path) as tmp:
        Path(tmp).write_text(text)


FORMAT_VERSION = 2  # of every file gradgraph writes with save_file; bump when a payload's layout changes


def content_hash(payload) -> str:
    """SHA-256 of a payload's content: every tensor's dtype, shape and bytes, every key and plain value, in order
    (what a file stores, independent of how torch serializes it)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k, v in x.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r}".encode())

    walk(payload)
    return h.hexdigest()


def save_file(payload: dict, path: str | Path, kind: str) -> None:
    """Write ``payload`` (plain tensors, numbers, strings, lists and dicts only: no gradgraph classes, so a file
    survives renaming or moving a class) atomically, tagged with its kind (``"dataset"``, ``"checkpoint"``,
    ``"graph"``, ...), :data:`FORMAT_VERSION` and the content hash that :func:`load_file` verifies."""
    atomic_save({"format": f"gradgraph.{kind}", "version": FORMAT_VERSION, "sha256": content_hash(payload),
                 "payload": payload}, path)


def load_file(path: str | Path, kind: str, map_location=None, remedy: str = "delete it and regenerate it") -> dict:
    """The payload of a file written by :func:`save_file`, loaded with ``torch.load(weights_only=True)`` (no
    code runs while loading) and checked against its content hash. A file of another kind or format version,
    an older pickled format, a truncated or corrupted file raises :class:`~gradgraph.errors.FileFormatError`
    naming the file and ``remedy``."""
    path = Path(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise FileFormatError(f"{path} is not a readable gradgraph {kind} file of format {FORMAT_VERSION} (it may "
                              f"have been written by an older gradgraph, which pickled its classes, or be truncated "
                              f"or damaged; torch.load(weights_only=True) refused it with {type(e).__name__}): "
                              f"{remedy}") from e
    if not isinstance(data, dict) or data.get("format") != f"gradgraph.{kind}" or "payload" not in data:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FileFormatError(f"{path} is not a gradgraph {kind} file (found {found!r}): {remedy}")
    if data.get("version") != FORMAT_VERSION:
        raise FileFormatError(f"{path} has format version {data.get('version')}, this gradgraph reads version "
                              f"{FORMAT_VERSION}: {remedy}")
    if content_hash(data["payload"]) != data.get("sha256"):
        raise FileFormatError(f"{path} is damaged: its content does not match the hash it was written with: {remedy}")
    return data["payload"]
