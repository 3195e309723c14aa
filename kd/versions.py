"""Version folders: numbered as TensorBoardLogger numbers them, claimed and locked, so two runs never share one."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kd.errors import KDError, warn

LOCK_FILE = "training.lock"


def next_version(folder: Path) -> Path:
    """``folder/version_N`` for the first N not yet taken, as TensorBoardLogger numbers its runs."""
    taken = {int(p.name.removeprefix("version_")) for p in folder.glob("version_*")
             if p.name.removeprefix("version_").isdigit()}
    return folder / f"version_{max(taken, default=-1) + 1}"


def new_version(folder: Path) -> Path:
    """Create and return the next free ``folder/version_N``; should another run create it first, the one after."""
    while True:
        path = next_version(folder)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise KDError(f"--output_dir: cannot create {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def training_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while the block trains in it; another process holding it is refused, naming it.

    An advisory ``flock``: the system releases it when its process ends, however it ends, so a lock a
    killed run left behind never blocks the next one. Where the file system has no locks, training goes on, saying so.
    """
    try:
        file = (folder / LOCK_FILE).open("a+")
    except OSError as exc:
        raise KDError(f"--output_dir: cannot write {folder / LOCK_FILE}: {exc.strerror or exc}") from None
    with file:
        locked = _lock(file, folder)
        try:
            yield
        finally:
            if locked:
                file.truncate(0)  # names no holder once free
                fcntl.flock(file, fcntl.LOCK_UN)


def _lock(file: IO[str], folder: Path) -> bool:
    """Take ``file``'s lock and write this process into it; False where the file system cannot lock."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        raise KDError(f"{folder} is being trained by {holder}; wait for it to finish (or stop it), "
                      "then --resume reuses or continues it") from None
    except OSError as exc:  # e.g. an NFS mount without lockd
        warn(f"{folder}: cannot lock {LOCK_FILE} ({exc.strerror or exc}); do not resume this stage twice at once")
        return False
    file.seek(0)
    file.truncate()
    file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    return True


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first: what a write there would make."""
    return list(itertools.takewhile(lambda p: not p.exists(), [path, *path.parents]))


def remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty: those made for a write that failed."""
    for empty in folders:
        with contextlib.suppress(OSError):
            empty.rmdir()  # only ever removes an empty folder


@contextlib.contextmanager
def claimed_version(folder: Path) -> Iterator[Path]:
    """A new ``folder/version_N`` (:func:`new_version`) for the block alone to fill, as a report is.

    Two runs that finish at once get one each. Should the block fail, the claimed folder goes, with what the
    block wrote into it and the empty folders made to hold it, so a failed write leaves nothing.
    """
    made = missing_folders(folder)
    path = new_version(folder)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        remove_empty(made)
        raise
