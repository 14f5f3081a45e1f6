"""Files written so that a crash never leaves half of one: a temporary file in the same folder, then a rename."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import torch


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
