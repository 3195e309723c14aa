"""The one exception type kd shows to users: a one-line message, never a traceback."""

import sys


class KDError(Exception):
    """A user-facing error whose message names the flag, file or value at fault."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises an error as KDError("Caught KDError in DataLoader worker
        # process 0.\nOriginal Traceback ...\nkd.errors.KDError: <message>"): keep just <message>.
        lines = message.strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught "):
            lines = [lines[-1].partition(": ")[2] or lines[-1]]
        super().__init__(" ".join(line.strip() for line in lines))


def warn(message: str) -> None:
    """Tell the user about something kd worked around (a one-line ``warning: ...`` on stderr)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Interrupted(KDError):
    """A run stopped by Ctrl+C or SIGTERM after saving its checkpoints; the message says where."""
