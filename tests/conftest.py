"""Shared fixtures: a tiny generated ImageFolder, a runner for experiment.py as a subprocess, a child process
for code that must run on a full disk, and a guard that puts process-wide state back after every test."""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kd.console import LIGHTNING_LOGGERS
from kd.data.sources.demo import make_demo_dataset

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread():
    """One intra-op thread for tests timing or running larger models: the 2 CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-class demo ImageFolder (train/ and val/) of 16 px PNGs, a few images per class."""
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", train_per_class=6, val_per_class=3,
                             image_size=16)


# Flags that make any stage finish in seconds on a CPU; tests add the stages and paths they need.
FAST = ["--flags_file", "none", "--image_size", "16", "--batch_size", "16", "--epochs", "1",
        "--num_workers", "0", "--teacher_arch", "cnn_tiny", "--student_arch", "cnn_tiny", "--accelerator", "cpu"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300, **options) -> subprocess.CompletedProcess:
    """Run ``python experiment.py ARGS`` in ``cwd`` and capture its output (``options`` go to subprocess.run)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(PROJECT / "experiment.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **options)


def hooked_features(arch: str, layers: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` of a CIFAR-100 network ``arch`` (seeded 0) on ``images``: real features for a loss."""
    from kd.models.build import build_model

    torch.manual_seed(0)
    model, features = build_model(arch, 100), {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda _, __, out, name=name: features.__setitem__(name, out))
               for name in layers]
    model(images)
    for handle in handles:
        handle.remove()
    return features


# A student that sleeps in each training step, so that a test can stop it in the middle of an epoch.
SLOW_NET = """
import time
from torch import nn
from kd.models.kd_cnns import SimpleCNN

class Slow(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = SimpleCNN((8, 16), num_classes)

    def forward(self, x):
        if self.training:
            time.sleep(0.03)
        return self.net(x)
"""


def _signals_as_a_terminal_gives_them() -> None:
    """In the child before it runs: Ctrl+C and SIGTERM at their defaults. A test suite started in the background
    by a non-interactive shell ignores SIGINT, and a child would inherit that and never see the test's Ctrl+C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python experiment.py ARGS`` in ``cwd`` without waiting for it (a test stops it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen([sys.executable, str(PROJECT / "experiment.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_signals_as_a_terminal_gives_them)


def wait_mid_epoch(process: subprocess.Popen, stage_dir: Path, timeout: float = 120) -> None:
    """Return once the first epoch's checkpoint exists and the second epoch is under way."""
    deadline = time.monotonic() + timeout
    while not (stage_dir / "checkpoints" / "last.ckpt").is_file():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.12)  # a few of the 9 steps of the next epoch
    assert process.poll() is None, "the run ended before it could be interrupted"



# ------------------------------------------------------------------------------------------ a full disk


@dataclass
class ChildOutcome:
    """What a call in a child process did: its return value or the exception it raised, and what it printed."""

    value: Any
    error: BaseException | None
    stdout: str
    traceback: str = ""  # the error's, as the child printed it

    def result(self) -> Any:
        """The call's return value, or its exception raised again here (for ``pytest.raises``), caused by
        the child's traceback (a pickled exception carries none)."""
        if self.error is not None:
            raise self.error from ChildTraceback(self.traceback)
        return self.value


class ChildTraceback(Exception):
    """Where in the child process an exception was raised."""


def _call_on_a_full_disk(file_size_limit: int, function: Callable[..., Any], args: tuple) -> ChildOutcome:
    """In the child: no file may grow past ``file_size_limit`` bytes, then ``function(*args)``."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            return ChildOutcome(function(*args), None, stdout.getvalue())
        except BaseException as exc:  # whatever it was, the test in the parent judges it
            return ChildOutcome(None, exc, stdout.getvalue(), "".join(traceback.format_exception(exc)))


def on_a_full_disk(function: Callable[..., Any], *args: Any, file_size_limit: int = 2000,
                   timeout: float = 300) -> ChildOutcome:
    """``function(*args)`` as on a full disk: in a fresh Python process whose files cannot grow past
    ``file_size_limit`` bytes, so that kd's writes fail with a real OSError (EFBIG) part-way through.

    The limit (RLIMIT_FSIZE) is per process: set in pytest's own process, it would also stop pytest writing
    its output to a file (``> log``, -v, --junitxml). ``function`` and ``args`` must pickle (a module-level
    function; results, configs and paths do).
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call_on_a_full_disk, file_size_limit, function, args).result(timeout=timeout)


# ---------------------------------------------------------------------------------- process-wide state
# Tests run in one process, one after the other: a resource limit, signal handler, umask, environment
# variable, working directory, torch setting, random state, warnings filter or logger level that one test
# (or the kd code it calls: kd.cli.main installs a SIGTERM handler and quiets Lightning's loggers;
# Lightning's seed_everything seeds every generator and sets PL_GLOBAL_SEED and PL_SEED_WORKERS) leaves
# changed would change every later test, and pytest itself (a file-size limit stops it writing its log).
# The state is taken before each test's setup, so that module-scoped fixtures (which often run kd's
# main()) are covered too, and put back after its teardown.

# Lightning (imported above, through kd.console) sets its loggers' levels when imported, and kd.cli.main
# raises them (quiet_lightning): made here, before any test, they are loggers whose level a test can leave
# changed, and so are put back (a logger first made during a test keeps what it was given).
for _name in LIGHTNING_LOGGERS:
    logging.getLogger(_name)

_RLIMITS = tuple(getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_"))
_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))
_PYTEST_OWN_VARIABLES = {"PYTEST_CURRENT_TEST"}  # pytest sets and removes it around each phase


def _loggers() -> dict[str, logging.Logger]:
    loggers = {name: logger for name, logger in logging.Logger.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    return {**loggers, "": logging.getLogger()}


@dataclass
class _ProcessState:
    rlimits: dict[int, tuple[int, int]]
    handlers: dict[int, Any]
    umask: int
    cwd: str
    environ: dict[str, str]
    loggers: dict[str, tuple[int, bool, bool]]
    logging_disabled: int
    warnings: Any  # an entered warnings.catch_warnings()
    torch: dict[str, Any]
    rng: tuple[torch.Tensor, Any, Any]

    @classmethod
    def capture(cls) -> _ProcessState:
        umask = os.umask(0o022)
        os.umask(umask)
        caught = warnings.catch_warnings()
        caught.__enter__()
        main = threading.current_thread() is threading.main_thread()
        return cls(rlimits={r: resource.getrlimit(r) for r in _RLIMITS},
                   handlers={s: signal.getsignal(s) for s in _SIGNALS} if main else {},
                   umask=umask, cwd=os.getcwd(), environ=dict(os.environ),
                   loggers={name: (logger.level, logger.disabled, logger.propagate)
                            for name, logger in _loggers().items()},
                   logging_disabled=logging.root.manager.disable, warnings=caught,
                   torch=_torch_settings(), rng=(torch.get_rng_state(), np.random.get_state(), random.getstate()))

    def restore(self) -> list[str]:
        """Put everything back; returns what could not be (a hard resource limit lowered, say)."""
        problems = []
        for which, limits in self.rlimits.items():
            if resource.getrlimit(which) != limits:
                try:
                    resource.setrlimit(which, limits)
                except (ValueError, OSError) as exc:
                    problems.append(f"resource limit {which}: {exc}")
        for signum, handler in self.handlers.items():
            if handler is not None and signal.getsignal(signum) != handler:  # None: not set from Python
                signal.signal(signum, handler)
        os.umask(self.umask)
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)
        for name in set(os.environ) - set(self.environ) - _PYTEST_OWN_VARIABLES:
            del os.environ[name]
        for name, value in self.environ.items():
            if name not in _PYTEST_OWN_VARIABLES and os.environ.get(name) != value:
                os.environ[name] = value
        loggers = _loggers()
        for name, (level, disabled, propagate) in self.loggers.items():
            logger = loggers.get(name)  # one made during the test keeps what its module gave it
            if logger is not None and (logger.level, logger.disabled, logger.propagate) != (level, disabled, propagate):
                logger.setLevel(level)  # (only when changed: each setLevel clears every logger's cache)
                logger.disabled, logger.propagate = disabled, propagate
        logging.disable(self.logging_disabled)
        self.warnings.__exit__(None, None, None)
        _restore_torch_settings(self.torch)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])
        return problems


def _torch_settings() -> dict[str, Any]:
    return {"num_threads": torch.get_num_threads(),
            "deterministic": (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled()),
            "default_dtype": torch.get_default_dtype(), "default_device": torch.get_default_device(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                      torch.backends.cudnn.deterministic),
            "grad_enabled": torch.is_grad_enabled(),
            "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())}


def _restore_torch_settings(saved: dict[str, Any]) -> None:
    now = _torch_settings()
    if now["num_threads"] != saved["num_threads"]:
        torch.set_num_threads(saved["num_threads"])
    if now["deterministic"] != saved["deterministic"]:
        torch.use_deterministic_algorithms(saved["deterministic"][0], warn_only=saved["deterministic"][1])
    if now["default_dtype"] != saved["default_dtype"]:
        torch.set_default_dtype(saved["default_dtype"])
    if now["default_device"] != saved["default_device"]:
        torch.set_default_device(saved["default_device"])
    if now["matmul_precision"] != saved["matmul_precision"]:
        torch.set_float32_matmul_precision(saved["matmul_precision"])
    cudnn = torch.backends.cudnn
    cudnn.enabled, cudnn.benchmark, cudnn.deterministic = saved["cudnn"]
    torch.set_grad_enabled(saved["grad_enabled"])
    if now["anomaly"] != saved["anomaly"]:
        torch.autograd.set_detect_anomaly(*saved["anomaly"])


_STATE = pytest.StashKey[_ProcessState]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item):
    item.stash[_STATE] = _ProcessState.capture()
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)
    finally:
        state = item.stash.get(_STATE, None)
        if state is not None:
            del item.stash[_STATE]
            problems = state.restore()
            if problems:  # a teardown error of this test: later tests would run under it
                raise RuntimeError(f"{item.nodeid} left process-wide state that cannot be put back: "
                                   + "; ".join(problems))
