"""--born_again N: generations of the student, each distilled from the one before, and their ensemble."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import FAST
from kd.cli import main
from kd.config import Config
from kd.run.plan import TeacherFrom, plan_stages


def test_generations_follow_the_teacher_or_without_one_the_baseline():
    with_teacher = plan_stages(Config(train_teacher=True, distill=True, born_again=3, seeds=[0, 1]))
    assert [(s.name, s.seed) for s in with_teacher] == [
        ("teacher", 0), ("generation1", 0), ("generation2", 0), ("generation3", 0),
        ("generation1", 1), ("generation2", 1), ("generation3", 1)]
    by_key = {s.key: s for s in with_teacher}
    assert by_key["generation1", 1].teacher == TeacherFrom("teacher", 0)
    assert by_key["generation3", 1].teacher == TeacherFrom("generation2", 1)
    assert [s.teaches for s in with_teacher if s.seed == 1] == [True, True, False]
    without = plan_stages(Config(baseline=True, distill=True, born_again=2))
    assert [s.name for s in without] == ["baseline", "generation1", "generation2"]
    assert without[0].teaches and without[1].teacher == TeacherFrom("baseline", 0)


@pytest.mark.slow
def test_born_again_trains_each_generation_from_the_one_before_and_reports_their_ensemble(tiny_data, tmp_path,
                                                                                          capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline", "--distill",
             "--born_again", "2"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    root = tmp_path / "kd"
    assert sorted(p.name for p in root.iterdir()) == ["baseline", "generation1", "generation2", "report"]
    first, second = (yaml.safe_load((root / f"generation{n}" / "version_0" / "config.yaml").read_text())
                     for n in (1, 2))
    assert first["teacher_checkpoint"] == [str(root / "baseline" / "version_0" / "checkpoints" / "best.ckpt")]
    assert second["teacher_checkpoint"] == [str(root / "generation1" / "version_0" / "checkpoints" / "best.ckpt")]
    assert first["born_again"] is None and first["student_arch"] == second["teacher_arch"][0] == "cnn_tiny"
    row = next(line for line in out.splitlines() if line.startswith("ensemble (kl_softmax)"))
    assert "2×cnn_tiny" in row
    assert "generation2 (kl_softmax) gain over the baseline at --lr" in out
    assert "ensemble (kl_softmax) gain over the baseline at --lr" in out
    report = next((root / "report").rglob("report.md")).read_text()
    assert "| ensemble (kl_softmax) | 2×cnn_tiny |" in report

    assert main([*flags, "--resume"]) == 0  # every generation is a stage: reused, and the ensemble evaluated again
    again = capsys.readouterr().out
    assert again.count("finished earlier") == 3
    row_again = next(line for line in again.splitlines() if line.startswith("ensemble (kl_softmax)"))
    assert row_again.split()[4] == row.split()[4]  # the same top-1


def test_the_ensemble_averages_the_generations_logits(tiny_data, tmp_path):
    """The ensemble row's top-1 is that of the mean of the generations' logits, computed here by hand."""
    from kd.data.loaders import make_datamodule
    from kd.data.transforms import normalize
    from kd.models.build import load_network
    from kd.run.generations import ensemble_of_generations
    from kd.report.results import find_results
    from kd.train.stage import StageBuilder

    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline", "--distill",
                 "--born_again", "2", "--epochs", "2"]) == 0
    config = Config(data_dir=str(tiny_data), image_size=16, batch_size=16, num_workers=0, accelerator="cpu")
    data = make_datamodule(config)
    generations = sorted((r for r in find_results([str(tmp_path)]) if r.stage.startswith("generation")),
                         key=lambda r: r.stage)
    row = ensemble_of_generations(generations, StageBuilder(config, data), config)
    networks = [load_network(r.log_dir / "checkpoints" / "last.ckpt", "cnn_tiny", data.classes, 16).eval()
                for r in generations]  # their last epochs, as their headline figures
    right = total = 0
    with torch.inference_mode():
        for images, labels, *_ in data.val_dataloader():
            x = normalize(images, config.augment)
            mean = sum(network(x) for network in networks) / len(networks)
            right += int((mean.argmax(1) == labels).sum())
            total += len(labels)
    assert row.top1 == pytest.approx(100 * right / total, abs=1e-4)
    assert row.stage == "ensemble" and row.params == 2 * generations[0].params and row.teachers == []
    assert row.seconds >= sum(r.seconds for r in generations) and row.log_dir == generations[-1].log_dir
    assert json.loads((generations[0].log_dir / "result.json").read_text())["stage"] == "generation1"


@pytest.mark.parametrize("flags, message", [
    (["--baseline", "--born_again", "2"], "--born_again 2 trains generations of distilled students: add --distill"),
    (["--distill", "--born_again", "2"], "without a teacher distils its first generation from the baseline student"),
    (["--train_teacher", "--distill", "--born_again", "2", "--assistant_arch", "cnn_tiny"],
     "--born_again with --assistant_arch"),
    (["--train_teacher", "--distill", "--born_again", "2", "--tune", "2"], "--tune with --born_again"),
    (["--train_teacher", "--distill", "--born_again", "2", "--teacher_cache", "c"], "each generation is a new teacher"),
    (["--baseline", "--distill", "--born_again", "2", "--kd_loss", "tf_kd"], "needs no teacher"),
    (["--distill", "--born_again", "0", "--train_teacher"], "--born_again must be at least 1"),
])
def test_born_again_refuses_what_cannot_work_in_one_line(tiny_data, tmp_path, capsys, flags, message):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.rglob("*.ckpt"))
