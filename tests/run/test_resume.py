"""Nothing lost: kill and resume, Ctrl+C and SIGTERM, NaN losses, full disks, same seed twice."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST, PROJECT, SLOW_NET, start_cli, wait_mid_epoch
from kd.cli import main

def _flags(tiny_data: Path, tmp_path: Path, out: str) -> list[str]:
    (tmp_path / "slow.py").write_text(SLOW_NET)
    return [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / out), "--baseline",
            "--student_arch", f"{tmp_path / 'slow.py'}:Slow", "--batch_size", "8", "--epochs", "4"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tiny_data, tmp_path):
    flags = _flags(tiny_data, tmp_path, "killed")
    stage = tmp_path / "killed" / "kd" / "baseline" / "version_0"
    process = start_cli(flags, tmp_path)
    wait_mid_epoch(process, stage)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (stage / "result.json").exists()
    assert main([*flags, "--resume"]) == 0
    assert main(_flags(tiny_data, tmp_path, "straight")) == 0
    straight = tmp_path / "straight" / "kd" / "baseline" / "version_0"

    resumed, reference = (json.loads((d / "result.json").read_text()) for d in (stage, straight))
    assert len(resumed["val_top1"]) == 4
    assert resumed["val_top1"] == reference["val_top1"] and resumed["best_top1"] == reference["best_top1"]
    a, b = _weights(stage / "checkpoints" / "last.ckpt"), _weights(straight / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, on the CPU
    assert not list(stage.parent.glob("version_1"))  # resumed in place, not started again


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(tiny_data, tmp_path, signum):
    flags = _flags(tiny_data, tmp_path, "runs")
    stage = tmp_path / "runs" / "kd" / "baseline" / "version_0"
    process = start_cli(flags, tmp_path)
    wait_mid_epoch(process, stage)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: baseline (seed 0) was interrupted in epoch ")
    assert last.endswith("--resume") and f"continue with: python {PROJECT / 'experiment.py'} " in last
    assert (stage / "checkpoints" / "interrupted.ckpt").is_file()
    assert main([*flags, "--resume"]) == 0
    assert len(json.loads((stage / "result.json").read_text())["val_top1"]) == 4


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_resume_reuses_matching_stages_and_starts_the_others_anew(tiny_data, tmp_path, capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--baseline",
             "--distill", "--teacher_arch", "cnn_small"]
    assert main(flags) == 0
    root = tmp_path / "kd"
    stamp = (root / "teacher" / "version_0" / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    assert capsys.readouterr().out.count("finished earlier in") == 3
    assert (root / "teacher" / "version_0" / "result.json").stat().st_mtime_ns == stamp
    assert all(_versions(root / s) == ["version_0"] for s in ("teacher", "baseline", "distill"))
    # Another loss: teacher and baseline are reused, the distill stage is new.
    assert main([*flags, "--resume", "--kd_loss", "mse_logits"]) == 0
    assert _versions(root / "teacher") == ["version_0"] and _versions(root / "distill") == ["version_0", "version_1"]
    # Another learning rate: nothing matches, so every stage starts anew; nothing earlier is touched.
    assert main([*flags, "--resume", "--lr", "0.2"]) == 0
    assert all(_versions(root / s)[-1] in ("version_1", "version_2") for s in ("teacher", "baseline", "distill"))
    assert (root / "teacher" / "version_0" / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_distill_stage_records_the_weights_in_force_and_resume_compares_them(tiny_data, tmp_path, capsys):
    """Unset --kd_weights/--ce_weight are saved as the papers' values: a changed default is never reused silently."""
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill"]
    assert main(flags) == 0
    saved = tmp_path / "kd" / "distill" / "version_0" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert (config["kd_weights"], config["ce_weight"]) == ([0.9], 0.1)  # kl_softmax's paper weights
    capsys.readouterr()
    assert main([*flags, "--resume", "--kd_weights", "0.9", "--ce_weight", "0.1"]) == 0  # the same, written out
    assert capsys.readouterr().out.count("finished earlier in") == 2
    config["kd_weights"], config["ce_weight"] = [], None  # as a kd before this change saved it
    saved.write_text(yaml.safe_dump(config))
    assert main([*flags, "--resume"]) == 0
    assert _versions(tmp_path / "kd" / "distill") == ["version_0", "version_1"]


@pytest.mark.slow
def test_resume_never_reuses_a_student_distilled_from_another_teacher(tiny_data, tmp_path):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill"]
    assert main([*flags, "--seeds", "1", "2"]) == 0  # one teacher (seed 1), students for seeds 1 and 2
    assert main([*flags, "--seeds", "2", "1", "--resume"]) == 0  # a new teacher (seed 2): new students
    root = tmp_path / "kd"
    assert _versions(root / "teacher") == ["version_0", "version_1"]
    assert _versions(root / "distill") == ["version_0", "version_1", "version_2", "version_3"]


def test_unfinished_distill_stage_continues_from_its_last_checkpoint(tiny_data, tmp_path):
    teacher = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher"]
    assert main(teacher) == 0
    best = tmp_path / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    distill = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill",
               "--teacher_checkpoint", str(best), "--epochs", "2"]
    assert main(distill) == 0
    stage = tmp_path / "kd" / "distill" / "version_0"
    finished = json.loads((stage / "result.json").read_text())
    (stage / "result.json").unlink()  # as if killed after the last epoch's checkpoint
    assert torch.load(stage / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # the last epoch
    assert main([*distill, "--resume"]) == 0  # loads last.ckpt, teacher included, with nothing left to train
    assert json.loads((stage / "result.json").read_text())["val_top1"] == finished["val_top1"]
    assert not (stage.parent / "version_1").exists()


def test_same_seed_gives_the_same_metrics_twice(tiny_data, tmp_path):
    flags = [*FAST, "--data_dir", str(tiny_data), "--baseline", "--epochs", "2", "--student_arch", "cnn_small"]
    for out in ("a", "b"):
        assert main([*flags, "--output_dir", str(tmp_path / out)]) == 0
    a, b = (json.loads((tmp_path / o / "kd" / "baseline" / "version_0" / "result.json").read_text())
            for o in ("a", "b"))
    assert a["val_top1"] == b["val_top1"] and a["best_top5"] == b["best_top5"]


NAN_LOSS = """
import torch

def explode(student_logits, teacher_logits, labels):
    return (student_logits * 0).sum() / torch.zeros(()) if student_logits.requires_grad else student_logits.sum()
"""


def test_nan_loss_stops_the_stage_and_names_step_and_term(tiny_data, tmp_path, capsys):
    teacher_run = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher"]
    assert main(teacher_run) == 0
    (tmp_path / "nan_loss.py").write_text(NAN_LOSS)
    # the trial step sees a finite value on random logits? No: 0/0 is NaN but still has a gradient path.
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill",
                 "--teacher_checkpoint", str(tmp_path / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"),
                 "--kd_loss", f"{tmp_path / 'nan_loss.py'}:explode"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: distill (seed 0): the loss became nan at step 0 (epoch 0), first in kd/explode")
    assert "--lr" in err and "it saved no checkpoint, so nothing of it is kept" in err
    # An error's state may be broken: only Ctrl+C or SIGTERM save interrupted.ckpt (Lightning's
    # OnExceptionCheckpoint would save one here, which is why kd keeps its own InterruptCheckpoint); a stage that
    # failed at its first step saved nothing, and leaves no empty version folder behind.
    assert not list((tmp_path / "kd" / "distill").glob("version_*"))


def test_full_disk_is_reported_with_the_path_and_leaves_no_half_written_checkpoint(tiny_data, tmp_path, capsys,
                                                                                   monkeypatch):
    def full(path, data):
        path.open("wb").write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", full)  # as kd.train.checkpoint_io writes a checkpoint
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: baseline (seed 0): cannot write ") and "No space left on device" in err
    checkpoints = tmp_path / "kd" / "baseline" / "version_0" / "checkpoints"
    assert not [p for p in checkpoints.rglob("*") if p.is_file()]  # the partial file was removed


def test_resume_says_why_a_stage_stopped_in_its_first_epoch_starts_again(tiny_data, tmp_path, capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline"]
    assert main(flags) == 0
    stopped = tmp_path / "kd" / "baseline" / "version_0"
    (stopped / "result.json").unlink()  # as a SIGTERM in epoch 0 leaves it: no result, no last.ckpt
    (stopped / "checkpoints" / "last.ckpt").rename(stopped / "checkpoints" / "interrupted.ckpt")
    before = {p: p.read_bytes() for p in stopped.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: --resume: {stopped} stopped before its first epoch ended, so it has no last.ckpt to continue "
            "from; it is left as it is, and this stage starts again in a new folder") in err
    assert (tmp_path / "kd" / "baseline" / "version_1" / "result.json").is_file()
    assert {p: p.read_bytes() for p in before} == before
