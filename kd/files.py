"""Paths and writes: every path flag is checked with :func:`checked_path` (by the CLI up front, and where it is
opened), and everything kd saves goes through :func:`written_atomically` (a kill cannot leave it half done)."""

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


def remove_path(path: Path) -> None:
    """Remove ``path`` (a file, a link or a whole folder), quietly where it is already gone or cannot be removed."""
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
        remove_path(leftover)
    if removed and what:
        print(f"removed {len(removed)} unfinished {what}(s) left by a killed run, e.g. {removed[0]}",
              file=sys.stderr, flush=True)


def printable(text: str) -> str:
    """``text`` as one line any file or stream can hold: undecodable bytes of a file name as ``\\xNN`` escapes, line
    breaks, tabs and other control characters escaped as Python writes them (``\\n``).

    On Linux a name that is not UTF-8 arrives as a str with surrogate escapes, which no encoder takes; a folder
    named with a newline would break a table row or an error line in two.
    """
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


LONGEST_SHOWN = 60  # characters of one path component shown in a message before it is cut short


def shown(path: str | Path) -> str:
    """``path`` as a message shows it: :func:`printable`, each overlong component cut short with its length."""
    parts = printable(str(path)).split("/")
    return "/".join(part if len(part) <= LONGEST_SHOWN else f"{part[:20]}…({len(part)} characters)" for part in parts)


def checked_path(path: str | Path, flag: str, verb: str = "use") -> Path:
    """``path`` with ``~`` expanded, once Python can look at it; else a KDError naming ``flag`` and why.

    A name too long for the file system, a folder on the way that denies access, a symlink loop, a file where a
    folder should be, or a NUL in the name would otherwise raise deep inside whatever opens it next (``OSError: File
    name too long``, ``RuntimeError: Symlink loop``). A path that does not exist passes: the caller knows whether
    it must. ``verb`` says what kd meant to do with it (read, create).
    """
    if not str(path):  # Path("") is the working directory: never what an empty value meant
        raise KDError(f"{flag}: an empty path")
    try:
        path = Path(path).expanduser()
        path.stat()
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        file = next((p for p in Path(path).parents if p.is_file()), Path(path).parent)
        raise KDError(f"{flag}: cannot {verb} {shown(path)}: {shown(file)} is not a folder") from None
    except OSError as exc:  # ENAMETOOLONG, EACCES, ELOOP, EIO...
        raise KDError(f"{flag}: cannot {verb} {shown(path)}: {reason(exc)}") from None
    except (RuntimeError, ValueError) as exc:  # ~nosuchuser; a NUL in a name written in a preset
        raise KDError(f"{flag}: cannot {verb} {shown(path)}: {exc}") from None
    return Path(path)


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
        remove_path(tmp)


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, without writing anything, a folder that could not be created or written to.

    An existing folder is checked with the folders directly in it, where new runs go (``stage/version_N``).
    """
    path = checked_path(path, flag, "create")
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
