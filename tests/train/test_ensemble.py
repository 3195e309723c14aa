"""Distilling from several teachers: their averaged logits, checks, logging, the summary and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST
from kd.cli import main
from kd.train.teachers import TeacherEnsemble
from kd.models.build import build_model


def test_the_ensemble_is_the_weighted_mean_of_its_members_logits():
    torch.manual_seed(0)
    members = [build_model("cnn_tiny", 5).eval(), build_model("cnn_small", 5).eval()]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        a, b = (m(x) for m in members)
        ensemble = TeacherEnsemble(members, [1.0, 3.0])
        torch.testing.assert_close(ensemble(x), 0.25 * a + 0.75 * b)
        assert [torch.equal(m, e) for m, e in zip(ensemble.member_logits, (a, b))] == [True, True]
        torch.testing.assert_close(TeacherEnsemble(members)(x), (a + b) / 2)
    assert not [k for k in ensemble.state_dict() if "weights" in k]  # the weights come from the flags


@pytest.fixture(scope="module")
def teachers(tiny_data, tmp_path_factory) -> list[Path]:
    """Two teachers of different architectures, trained for one epoch each: their best checkpoints."""
    out = tmp_path_factory.mktemp("teachers")
    paths = []
    for arch in ("cnn_small", "cnn_tiny"):
        assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--experiment_name", arch,
                     "--train_teacher", "--teacher_arch", arch]) == 0
        paths.append(out / arch / "teacher" / "version_0" / "checkpoints" / "best.ckpt")
    return paths


def _ensemble(tiny_data: Path, teachers: list[Path], out: Path, *flags: str) -> int:
    return main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--baseline", "--distill",
                 "--teacher_checkpoint", *map(str, teachers), "--teacher_arch", "cnn_small", "cnn_tiny", *flags])


@pytest.mark.slow
def test_a_student_distills_from_two_teachers_and_each_is_reported(tiny_data, teachers, tmp_path, capsys):
    assert _ensemble(tiny_data, teachers, tmp_path, "--ensemble_weights", "2", "1") == 0
    out = capsys.readouterr().out
    assert "distill (kl_softmax), seed 0: an ensemble of 2 teachers (" in out
    assert "each alone: cnn_small " in out and ", cnn_tiny " in out
    stage = tmp_path / "kd" / "distill" / "version_0"
    result = json.loads((stage / "result.json").read_text())
    assert [t["arch"] for t in result["teachers"]] == ["cnn_small", "cnn_tiny"]
    assert all(0 <= t["top1"] <= 100 for t in result["teachers"]) and result["teacher_top1"] is not None
    events = EventAccumulator(str(stage)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/teacher1_top1", "val/teacher2_top1", "val/teacher1_agreement", "val/teacher_top1"} <= tags
    report = next((tmp_path / "kd" / "report").glob("version_*/report.md")).read_text()
    assert "## Ensembles" in report and "an ensemble of 2 teachers" in report


@pytest.mark.slow
def test_an_ensemble_is_cached_like_one_teacher(tiny_data, teachers, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert _ensemble(tiny_data, teachers, tmp_path / "first", "--teacher_cache", str(cache), "--epochs", "2") == 0
    assert len(list(cache.iterdir())) == 1
    # epoch 1 validates on cached ensemble logits; the loaded teachers still give their own top-1
    result = json.loads((tmp_path / "first" / "kd" / "distill" / "version_0" / "result.json").read_text())
    assert all(t["top1"] is not None for t in result["teachers"])
    import kd.train.stage  # a complete cache: the teachers are never loaded again

    monkeypatch.setattr(kd.train.stage, "load_network", lambda *a, **k: pytest.fail("a teacher was loaded"))
    assert _ensemble(tiny_data, teachers, tmp_path / "second", "--teacher_cache", str(cache),
                     "--teacher_cache_only", "--epochs", "2") == 0
    assert _ensemble(tiny_data, teachers[::-1], tmp_path / "third", "--teacher_cache", str(cache),
                     "--teacher_arch", "cnn_tiny", "cnn_small", "--teacher_cache_only", "--epochs", "2") == 2


@pytest.mark.parametrize("flags, message", [
    (["--teacher_arch", "cnn_small", "cnn_tiny", "cnn_tiny"],
     "--teacher_arch names 3 networks for 2 --teacher_checkpoint"),
    (["--ensemble_weights", "1"], "--ensemble_weights 1.0: give one weight per --teacher_checkpoint (2)"),
    (["--ensemble_weights", "0", "0"], "not all zero"),
    (["--kd_loss", "at", "--student_layers", "features", "--teacher_layers", "features"],
     "feature losses compare one teacher's features"),
])
def test_ensembles_that_cannot_work_are_refused_before_training(flags, message, tiny_data, tmp_path, capsys):
    fake = [tmp_path / "a.ckpt", tmp_path / "b.ckpt"]  # never read: the flags are refused first
    assert _ensemble(tiny_data, fake, tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_training_one_teacher_takes_one_architecture(tiny_data, tmp_path, capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher",
                 "--teacher_arch", "cnn_tiny", "cnn_small"]) == 2
    assert "--train_teacher trains one teacher, but --teacher_arch names 2" in capsys.readouterr().err
