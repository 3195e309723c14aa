"""The command line: resolve the configuration, run the experiment, turn failures into one line."""

from __future__ import annotations

import sys

from kd.config import help_text, resolve
from kd.errors import KDError


def main(argv: list[str] | None = None) -> int:
    """Run ``python experiment.py [flags]``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        resolved = resolve(argv)
        if resolved.config.print_config:
            print(resolved.table())
            return 0
        from kd.runner import compare_runs, run_experiment  # imported here: --help and config errors answer at once

        if resolved.config.report:
            compare_runs(resolved.config)
        else:
            run_experiment(resolved.config)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
