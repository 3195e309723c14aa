"""The command line: resolve the configuration, run the experiment, turn failures into one line."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from kd.config import named_paths
from kd.files import checked_path
from kd.flags import help_text, resolve
from kd.errors import Interrupted, KDError


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's kill) stops a run like Ctrl+C: checkpoint, then exit with a resume hint."""
    raise KeyboardInterrupt


def _resume_hint(argv: list[str], training: bool) -> str:
    """How to go on after an interrupt: training continues with the same flags plus --resume; --evaluate and
    --report have nothing to resume, so they are simply run again."""
    program = sys.argv[0]
    launcher = ["python", program] if program.endswith(".py") else [Path(program).name]
    if not training:
        return f"run it again: {shlex.join([*launcher, *argv])}"
    return f"continue with: {shlex.join([*launcher, *argv, *([] if '--resume' in argv else ['--resume'])])}"


def _print_all(text: str) -> None:
    """Print ``text``, quietly stopping where a reader such as ``head`` closed the pipe."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet


def main(argv: list[str] | None = None) -> int:
    """Run ``python experiment.py [flags]``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _stop)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    training = True  # until the configuration says it asks for --evaluate or --report
    try:
        resolved = resolve(argv)
        training = not (resolved.config.evaluate or resolved.config.report)
        if resolved.config.print_config:
            print(resolved.table())
            return 0
        if resolved.config.list_models is not None:
            from kd.models.build import describe_models  # imported here, like the runner: it imports torch

            _print_all(describe_models(resolved.config.list_models))
            return 0
        if resolved.config.list_layers is not None:
            from kd.models.layers import describe_layers

            c = resolved.config
            _print_all(describe_layers(c.list_layers, c.image_size, c.num_classes or 10))
            return 0
        resolved.check_modes()
        for flag, path in named_paths(resolved.config):  # before anything opens them
            checked_path(path, flag)
        from kd.console import quiet_lightning  # imported here: --help and config errors answer at once
        from kd.deploy.commands import evaluate_checkpoint
        from kd.run.runner import run_experiment
        from kd.run.summary import compare_runs

        quiet_lightning()
        if resolved.config.report:
            compare_runs(resolved.config)
        elif resolved.config.evaluate:
            evaluate_checkpoint(resolved.config)
        else:
            run_experiment(resolved.config)
    except Interrupted as exc:
        print(f"interrupted: {exc}; {_resume_hint(argv, training)}", file=sys.stderr)
        return 130
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # kd never exits mid-run: user code did (a loss's forward); it is no success
        print(f"error: code kd was running called sys.exit({exc.code!r}) (your own --kd_loss, network or module?); "
              "the run stopped there", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before or between stages: finished stages are safe on disk
        print(f"interrupted; {_resume_hint(argv, training)}", file=sys.stderr)
        return 130
    return 0
