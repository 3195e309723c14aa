"""Writes that a kill cannot leave half done: everything kd saves goes through :func:`written_atomically`."""

from __future__ import annotations

import contextlib
import hashlib
import fnmatch
import glob
import os
import re
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from kd.errors import KDError


class WriteError(KDError, OSError):
    """A write that failed, naming the file meant (not its temporary name) and why, e.g. No space left on device.

    Also an OSError, so that a caller who lets a failed write pass when another process wrote the same
    file first (a DDP rank) still catches it.
    """


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # already gone, or a folder that no longer lets us remove it
            path.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (ours, or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # a process of another user
        return True
    return True


def dead_temporaries(folder: Path, target: str = "*") -> list[Path]:
    """The temporaries in ``folder`` (of targets whose name matches the pattern ``target``) whose writer died.

    Only this machine's are judged (another machine's pid means nothing here); a temporary whose pid is
    alive is another process's work in progress (or a reused pid) and is left alone.
    """
    pattern = re.compile(rf"\.(.+)\.tmp-{re.escape(socket.gethostname())}-(\d+)")
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # no folder yet: nothing left over
        return []
    matches = [(entry, pattern.fullmatch(entry.name)) for entry in entries]
    return [entry for entry, match in matches if match and fnmatch.fnmatchcase(match[1], target)
            and int(match[2]) != os.getpid() and not alive(int(match[2]))]


def remove_dead_temporaries(folder: Path, target: str = "*", what: str = "") -> None:
    """Remove :func:`dead_temporaries`; with ``what`` (the unfinished work's name), say so in one line."""
    removed = dead_temporaries(folder, target)
    for leftover in removed:
        _remove(leftover)
    if removed and what:
        print(f"removed {len(removed)} unfinished {what}(s) left by a killed run, e.g. {removed[0]}",
              file=sys.stderr, flush=True)


def reason(exc: OSError) -> str:
    """What went wrong in a failed file operation, e.g. ``No space left on device``, without the file's name."""
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write a file or folder to; renamed onto ``path`` at the end.

    The name is unique to this machine and process, so concurrent writers never share one; those of
    writers killed mid-write are removed first. If the
    block or the rename fails (a full disk, a read-only folder, a folder already at ``path``), the
    temporary is removed: ``path`` holds the old content or the new, never a part. A failed write is
    raised as a :class:`WriteError` naming ``path``; other errors go on as they are.
    """
    path = Path(path)
    host = socket.gethostname()
    tmp = path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}")
    try:
        remove_dead_temporaries(path.parent, glob.escape(path.name))
        yield tmp
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {reason(exc)}") from exc
    finally:
        _remove(tmp)


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, without writing anything, a folder that could not be created or written to.

    An existing folder is checked with the folders directly in it, where new runs go (``stage/version_N``).
    """
    path = Path(path).expanduser()
    existing = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise KDError(f"{flag}: cannot create {path}: {existing} is not a folder")
    if existing != path:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise KDError(f"{flag}: cannot create {path}: {existing} is not writable")
        return
    for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise KDError(f"{flag}: cannot write into {folder}: the folder is not writable")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with written_atomically(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def writer_thread_errors_raised_here() -> Iterator[None]:
    """While the block runs, an OSError that kills a background writer thread (TensorBoard's event writer on
    a full disk) prints no traceback there: the writer raises it again here, at its next write, flush or close."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not issubclass(args.exc_type, OSError):
            default(args)
    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = default


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read a megabyte at a time: a checkpoint's content, whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
