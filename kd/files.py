"""Writes that a kill cannot leave half done: everything kd saves goes through :func:`written_atomically`."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from kd.errors import KDError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write a file or folder to; renamed onto ``path`` at the end.

    The name is unique to this machine and process, so concurrent writers never share one. If the
    block raises, or the rename fails (a folder already at ``path``), the temporary is removed and the
    error goes on: ``path`` holds the old content or the new, never a part.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    _remove(tmp)  # a leftover of a killed process that had this pid
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, without writing anything, a folder that could not be created or written to."""
    path = Path(path).expanduser()
    existing = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise KDError(f"{flag}: cannot create {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KDError(f"{flag}: cannot create {path}: {existing} is not writable")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with written_atomically(path) as tmp:
        tmp.write_text(text)
