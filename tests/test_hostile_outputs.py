"""Hostile conditions where kd writes: full disks, read-only folders, a small $TMPDIR, kills mid-write, and
checkpoints or exports that are broken, stale or not what they claim to be."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from kd.checkpoint_io import AtomicCheckpointIO
from kd.errors import KDError
from kd.files import WriteError, check_writable, write_text, written_atomically


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_names_the_destination_and_leaves_the_old_file_alone(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(WriteError, match=rf"^cannot write {path}: No space left on device$") as caught:
        with written_atomically(path) as tmp:
            tmp.write_text("half")
            _full_disk()
    assert isinstance(caught.value, OSError) and isinstance(caught.value, KDError)  # races caught as OSError
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and path.read_text() == "old"


def test_write_text_on_a_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(KDError, match=rf"^cannot write {tmp_path / 'a.yaml'}: No space left on device$"):
        write_text(tmp_path / "a.yaml", "x")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_in_the_block_pass_unchanged_and_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="not a write"):
        with written_atomically(tmp_path / "f") as tmp:
            tmp.write_text("x")
            raise ValueError("not a write")
    assert list(tmp_path.iterdir()) == []


def test_the_leftover_of_a_writer_killed_mid_write_is_removed_by_the_next_write(tmp_path):
    dead = tmp_path / f".last.ckpt.tmp-{socket.gethostname()}-999999999"  # no such process
    running = tmp_path / f".last.ckpt.tmp-{socket.gethostname()}-1"  # init: still running, maybe writing
    dead.write_bytes(b"partial")
    running.write_bytes(b"partial")
    write_text(tmp_path / "last.ckpt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "last.ckpt"])


def _checkpoint() -> dict:
    return {"state_dict": {"model.w": torch.arange(4.0)}, "epoch": 3}


def test_checkpoints_are_staged_beside_their_destination_not_in_tmpdir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_tmpdir"))  # a $TMPDIR that cannot take a file
    path = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    assert torch.load(path)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_write_on_a_full_disk_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (Path(f).write_bytes(b"part"), _full_disk()))
    with pytest.raises(WriteError, match=rf"^cannot write {path}: No space left on device$"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _not_writable(*folders: Path):
    """os.access as for a user who may not write into ``folders`` (tests may run as root, whom chmod does not stop)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        return False if Path(path) in folders and mode & os.W_OK else real(path, mode, *args, **kwargs)
    return access


def test_a_read_only_stage_folder_is_refused_before_a_run_writes_anything(tmp_path, monkeypatch):
    stage = tmp_path / "kd" / "baseline"
    stage.mkdir(parents=True)
    monkeypatch.setattr(os, "access", _not_writable(stage))
    with pytest.raises(KDError, match=rf"^--output_dir: cannot write into {stage}: the folder is not writable$"):
        check_writable(tmp_path / "kd", "--output_dir")
