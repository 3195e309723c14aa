"""Leftovers of killed writers: the temporaries of :func:`kd.files.written_atomically` (``.NAME.tmp-HOST-PID``)
whose writer is dead, removed by the next run so that a kill costs no disk space.

Only this machine's are judged (another machine's pid means nothing here), and a temporary whose pid is
alive is another process's work in progress (or a reused pid): both are left alone.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import socket
import sys
from pathlib import Path


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (ours, or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and belongs to another user
        return True
    return True


def dead_temporaries(folder: Path, target: str = "*") -> list[Path]:
    """The temporaries in ``folder`` of targets whose name matches ``target`` whose writer on this machine has died."""
    pattern = re.compile(rf"\.(.+)\.tmp-{re.escape(socket.gethostname())}-(\d+)")
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # no folder yet: nothing left over
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and fnmatch.fnmatchcase(match[1], target):
            pid = int(match[2])
            if pid != os.getpid() and not _alive(pid):
                found.append(entry)
    return found


def remove_dead_temporaries(folder: Path, target: str = "*", what: str = "write") -> None:
    """Remove :func:`dead_temporaries`, saying so in one line (``what`` names the unfinished work)."""
    removed = dead_temporaries(folder, target)
    for leftover in removed:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: it only costs space
                leftover.unlink(missing_ok=True)
    if removed:
        print(f"removed {len(removed)} unfinished {what}(s) left by a killed run, e.g. {removed[0]}",
              file=sys.stderr, flush=True)
