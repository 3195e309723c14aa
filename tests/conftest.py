"""Shared fixtures: a tiny generated ImageFolder and a runner for experiment.py as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd.datasets.demo import make_demo_dataset

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
