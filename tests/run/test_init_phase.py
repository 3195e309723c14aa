"""A loss's init phase (RepDistiller's ``init()``: FSP's and AB's student warm-up, FT's paraphraser): a stage of its
own before each distillation, reused and resumed like any, from whose end the distillation starts."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import pytorch_lightning as pl
import torch
import yaml

from conftest import FAST, SLOW_NET, start_cli, wait_mid_epoch
from kd.cli import main
from kd.config import Config
from kd.errors import KDError
from kd.models.build import build_model
from kd.report.results import find_results
from kd.run.plan import TeacherFrom, check_stages, plan_stages

# A user's loss with an init phase: it warms up its own gain (and, as Warm, the student) towards a target mean.
WARM = """
import torch
from torch import nn


class Warm(nn.Module):
    features = True
    init_trains_student = True

    def __init__(self, init_epochs: int = 1, init_lr: float = 0.0):
        super().__init__()
        self.init_epochs = init_epochs
        self.gain = nn.Parameter(torch.ones(()))

    def init_parameters(self):
        return [self.gain]

    def main_parameters(self):
        return []

    def init_loss(self, student_features, teacher_features):
        student = next(iter(student_features.values()))
        return (self.gain * student.mean() - 3.0) ** 2

    def forward(self, student_logits, teacher_logits, labels, student_features, teacher_features):
        student, teacher = next(iter(student_features.values())), next(iter(teacher_features.values()))
        return (student.mean() - teacher.mean()) ** 2


class Frozen(Warm):
    init_trains_student = False
"""
LAYERS = ["--student_layers", "features.3", "--teacher_layers", "features.3"]


@pytest.fixture
def warm(tmp_path):
    path = tmp_path / "warm.py"
    path.write_text(WARM)
    return path


def _state(stage_dir, name="last.ckpt"):
    return torch.load(stage_dir / "checkpoints" / name, weights_only=True)["state_dict"]


def test_every_distillation_is_preceded_by_its_init_phase(warm):
    loss = [f"{warm}:Warm"]
    stages = plan_stages(Config(train_teacher=True, distill=True, kd_loss=loss, assistant_arch=["cnn_small"]))
    assert [s.name for s in stages] == ["teacher", "init_assistant1", "assistant1", "init_distill", "distill"]
    by_name = {s.name: s for s in stages}
    assert by_name["init_distill"].init and by_name["init_distill"].teacher == TeacherFrom("assistant1", 0)
    assert by_name["distill"].starts_from == "init_distill" and not by_name["distill"].init
    assert not by_name["init_assistant1"].teaches and by_name["assistant1"].teaches
    generations = plan_stages(Config(train_teacher=True, distill=True, kd_loss=loss, born_again=2))
    assert [s.name for s in generations] == ["teacher", "init_generation1", "generation1", "init_generation2",
                                             "generation2"]
    none = plan_stages(Config(train_teacher=True, distill=True, kd_loss=loss, loss_options=["init_epochs=0"]))
    assert [s.name for s in none] == ["teacher", "distill"]  # 0 epochs: no init phase


def test_init_phases_that_cannot_run_are_refused(warm):
    with pytest.raises(KDError, match=r"each has an init phase before distillation, and a stage has one"):
        check_stages(Config(train_teacher=True, distill=True, kd_loss=[f"{warm}:Warm", f"{warm}:Frozen"]))
    with pytest.raises(KDError, match=r"--tune with --kd_loss .*Warm: its init phase runs before distillation"):
        check_stages(Config(train_teacher=True, distill=True, kd_loss=[f"{warm}:Warm"], tune=4))


def test_the_init_phase_trains_its_own_modules_and_the_distillation_starts_where_it_ended(warm, tiny_data, tmp_path,
                                                                                          capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
             "--kd_loss", f"{warm}:Frozen", *LAYERS, "--loss_options", "Frozen.init_epochs=2", "--epochs", "1"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    root = tmp_path / "kd"
    phase, distill = root / "init_distill" / "version_0", root / "distill" / "version_0"
    record = yaml.safe_load((phase / "config.yaml").read_text())
    assert record["epochs"] == 2 and record["scheduler"] == "none" and record["distill"]
    assert json.loads((phase / "result.json").read_text())["stage"] == "init_distill"
    ended, after = _state(phase), _state(distill)
    assert ended["objective.losses.Frozen.gain"] != 1.0  # trained by the init phase ...
    assert torch.equal(after["objective.losses.Frozen.gain"], ended["objective.losses.Frozen.gain"])  # ... then kept
    pl.seed_everything(0, verbose=False)
    fresh = build_model("cnn_tiny", 12, None, "--student_weights").state_dict()
    assert all(torch.equal(ended[f"model.{k}"], v) for k, v in fresh.items())  # untrained: not even its BN statistics

    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("init_distill", "distill"))]
    assert "init_distill" not in rows and "distill" in rows  # the phase is no row of its own
    assert {r.stage for r in find_results([str(root)])} == {"teacher", "distill"}

    shutil.rmtree(distill)  # a lost distillation is trained again from its finished phase, reused
    assert main([*flags, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "init_distill, seed 0: finished earlier" in out and not (root / "init_distill" / "version_1").exists()
    assert torch.equal(_state(distill)["objective.losses.Frozen.gain"], ended["objective.losses.Frozen.gain"])
    shutil.rmtree(root / "init_distill")  # a finished distillation needs its phase no more: not trained again
    assert main([*flags, "--resume"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2 and not (root / "init_distill").exists()


def test_only_the_losses_whose_init_phase_runs_train_in_it_and_always_with_sgd(warm, tiny_data, tmp_path):
    from kd.losses.objective import build_objective
    from kd.losses.spec import resolve_losses

    both = Config(kd_loss=[f"{warm}:Warm", f"{warm}:Frozen"], loss_options=["Warm.init_epochs=0"])
    assert build_objective(resolve_losses(both)).init_keys == ["Frozen"]
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--kd_loss", f"{warm}:Frozen", *LAYERS, "--optimizer", "dot"]) == 0
    records = {stage: yaml.safe_load((tmp_path / "kd" / stage / "version_0" / "config.yaml").read_text())
               for stage in ("init_distill", "distill")}
    assert records["init_distill"]["optimizer"] == "sgd" and records["distill"]["optimizer"] == "dot"


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_an_init_learning_rate_that_cannot_train_is_refused_before_training(value, tiny_data, tmp_path, capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--kd_loss", "ft", *LAYERS, "--loss_options", f"ft.init_lr={value}"]) == 2
    err = capsys.readouterr().err
    assert "init_lr is the init phase's learning rate" in err and err.count("\n") == 1
    assert not (tmp_path / "kd").exists()


def test_an_init_phase_that_trains_the_student_hands_it_on_at_its_own_learning_rate(warm, tiny_data, tmp_path):
    # --lr 1e-9 barely moves the distillation: its student is where the init phase (at init_lr 0.5) left it.
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--kd_loss", f"{warm}:Warm", *LAYERS, "--loss_options", "Warm.init_lr=0.5", "--lr", "1e-9",
                 "--scheduler", "none"]) == 0
    root = tmp_path / "kd"
    assert yaml.safe_load((root / "init_distill" / "version_0" / "config.yaml").read_text())["lr"] == 0.5
    ended, after = _state(root / "init_distill" / "version_0"), _state(root / "distill" / "version_0")
    pl.seed_everything(0, verbose=False)
    fresh = dict(build_model("cnn_tiny", 12, None, "--student_weights").named_parameters())
    assert not torch.equal(ended["model.features.0.weight"], fresh["features.0.weight"])
    for key in fresh:  # its weights (its BN statistics go on moving in training mode)
        assert torch.allclose(after[f"model.{key}"], ended[f"model.{key}"], atol=1e-5), key


@pytest.mark.slow
def test_a_killed_init_phase_resumes_to_the_uninterrupted_result(warm, tiny_data, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_NET)

    def flags(out: str) -> list[str]:
        return [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / out), "--distill",
                "--teacher_checkpoint", str(teacher), "--student_arch", f"{tmp_path / 'slow.py'}:Slow",
                "--kd_loss", f"{warm}:Warm", "--student_layers", "net.features.3", "--teacher_layers", "features.3",
                "--loss_options", "Warm.init_epochs=3", "--batch_size", "8"]

    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "t"), "--train_teacher"]) == 0
    teacher = tmp_path / "t" / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    phase = tmp_path / "killed" / "kd" / "init_distill" / "version_0"
    process = start_cli(flags("killed"), tmp_path)
    wait_mid_epoch(process, phase)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (phase / "result.json").exists() and not (phase.parent.parent / "distill").exists()
    assert main([*flags("killed"), "--resume"]) == 0
    assert main(flags("straight")) == 0
    for stage in ("init_distill", "distill"):
        resumed, reference = (json.loads((tmp_path / run / "kd" / stage / "version_0" / "result.json").read_text())
                              for run in ("killed", "straight"))
        assert resumed["val_top1"] == reference["val_top1"], stage
        a, b = (_state(tmp_path / run / "kd" / stage / "version_0") for run in ("killed", "straight"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
