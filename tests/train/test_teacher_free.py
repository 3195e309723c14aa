"""Teacher-free losses (USKD, TF-KD's virtual teacher): a distill stage that needs no teacher, and the refusals."""

from __future__ import annotations

import json

import pytest

from conftest import FAST
from kd.cli import main


def _result(root, stage="distill"):
    return json.loads(next((root / "kd" / stage).rglob("result.json")).read_text())


@pytest.mark.parametrize("flags", [["--kd_loss", "tf_kd"], ["--kd_loss", "uskd", "--student_layers", "features.3"]])
def test_a_teacher_free_loss_distils_without_a_teacher(tiny_data, tmp_path, flags):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline", "--distill",
                 *flags]) == 0
    result = _result(tmp_path)
    assert result["kd_loss"] == flags[1] and result["teachers"] == [] and result["teacher_top1"] is None
    assert not (tmp_path / "kd" / "teacher").exists()
    events = "".join(p.name for p in (tmp_path / "kd" / "distill").rglob("events.out.tfevents.*"))
    assert events  # it logged its own curves


@pytest.mark.parametrize("flags, message", [
    (["--kd_loss", "tf_kd", "--teacher_checkpoint", "x.ckpt"],
     "--kd_loss tf_kd needs no teacher (it makes its own soft labels), but --teacher_checkpoint gives one"),
    (["--kd_loss", "uskd"], "it reads the student's own features, with no teacher: give --student_layers"),
    (["--kd_loss", "uskd", "--student_layers", "features.3", "--teacher_layers", "features.3"],
     "but --teacher_layers gives one"),
    (["--kd_loss", "tf_kd", "--train_teacher"], "but --train_teacher gives one: drop it"),
    (["--kd_loss", "tf_kd", "--teacher_cache", "cache"], "it needs no teacher, so there are no teacher outputs"),
])
def test_a_teacher_free_stage_refuses_what_it_cannot_use_in_one_line(tiny_data, tmp_path, capsys, flags, message):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.rglob("*.ckpt"))


def test_a_teacher_free_loss_beside_a_teacher_loss_still_needs_the_teacher(tiny_data, tmp_path, capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill", "--kd_loss",
                 "tf_kd", "kl_softmax"]) == 2
    assert "--distill needs a teacher" in capsys.readouterr().err
