"""experiment.py end to end: stages, outputs, summary, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST, run_cli
from kd.cli import main
from kd.config import Config, Role
from kd.models.build import load_network
from kd.run.plan import saved_identity, with_weights_in_force
from kd.train.callbacks import History


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def _tags(log_dir: Path) -> set[str]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
    """One subprocess run of all three stages on the tiny dataset (shared by the tests below)."""
    out = tmp_path_factory.mktemp("runs")
    result = run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--experiment_name", "e2e",
                      "--train_teacher", "--baseline", "--distill", "--teacher_arch", "cnn_small",
                      "--epochs", "2"], cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "e2e", result


@pytest.mark.slow
def test_every_stage_writes_checkpoints_config_and_tensorboard_logs(full_run):
    root, _ = full_run
    for stage in ("teacher", "baseline", "distill"):
        log_dir = root / stage / "version_0"
        assert (log_dir / "config.yaml").is_file()
        assert (log_dir / "checkpoints" / "last.ckpt").is_file()
        assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        tags = _tags(log_dir)
        assert {"train/loss_step", "train/ce_epoch", "train/top1", "val/top1", "val/top5", "lr-SGD",
                "hp/best_top1"} <= tags, tags
    distill_tags = _tags(root / "distill" / "version_0")
    assert {"train/kd/kl_softmax_step", "val/teacher_agreement", "val/teacher_kl"} <= distill_tags


@pytest.mark.slow
def test_accuracies_are_logged_in_percent_as_the_summary_shows_them(full_run):
    root, _ = full_run
    for stage in ("teacher", "distill"):
        events = EventAccumulator(str(root / stage / "version_0"))
        events.Reload()
        result = json.loads((root / stage / "version_0" / "result.json").read_text())
        logged = [event.value for event in events.Scalars("val/top1")]
        assert logged == pytest.approx(result["val_top1"]) and max(logged) == pytest.approx(result["best_top1"])
        assert [e.value for e in events.Scalars("hp/best_top1")] == pytest.approx([result["best_top1"]])
    assert events.Scalars("val/teacher_top1")[-1].value == pytest.approx(result["teacher_top1"])


@pytest.mark.slow
def test_the_console_shows_kd_progress_one_line_per_epoch_and_no_lightning_banners(full_run):
    """Redirected to a file: the stage headers, a line per epoch, the summary; nothing on stderr."""
    _, result = full_run
    assert result.stderr == ""  # no GPU/TPU banners, tips, "Trainer.fit stopped", LeafSpec warnings
    epochs = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" (")[0] for line in epochs] == ["Epoch 0/1", "Epoch 1/1"] * 3
    assert all("val/top1=" in line and "train/loss_epoch=" in line for line in epochs)
    assert "it/s" not in result.stdout and "v_num" not in result.stdout  # no per-step bar


@pytest.mark.slow
def test_student_checkpoint_holds_no_teacher_and_knows_its_classes(full_run, tiny_data):
    root, _ = full_run
    checkpoint = torch.load(root / "distill" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(k.startswith("model.") or k.startswith("val_") or k.startswith("train_")
                                            for k in checkpoint["state_dict"])
    meta = checkpoint["hyper_parameters"]
    assert meta["arch"] == "cnn_tiny"
    assert meta["class_names"] == sorted(p.name for p in (tiny_data / "train").iterdir())


@pytest.mark.slow
def test_summary_table_compares_the_stages(full_run):
    root, result = full_run
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    assert "top-1 %" in lines[header] and "top-5 %" in lines[header] and "time" in lines[header]
    rows = {line.split()[0]: line.replace("distill (kl_softmax)", "distill").split()
            for line in lines[header + 2:header + 5]}
    assert set(rows) == {"teacher", "baseline", "distill"}
    assert rows["teacher"][1] == "cnn_small" and rows["distill"][1] == "cnn_tiny"
    assert rows["distill"][-1].endswith("distill/version_0")
    gain = float(rows["distill"][3]) - float(rows["baseline"][3])
    lr = yaml.safe_load((root / "baseline" / "version_0" / "config.yaml").read_text())["lr"]
    assert (f"distill (kl_softmax) gain over the baseline at --lr {lr:g}: {gain:+.2f} top-1 points (one seed: no "
            "interval)\n") in result.stdout
    assert f"report: {root}/report/version_0/report.md" in result.stdout


@pytest.mark.slow
def test_run_writes_a_report_with_table_and_plot(full_run):
    root, _ = full_run
    report = (root / "report" / "version_0" / "report.md").read_text()
    for label in ("| teacher | cnn_small |", "| baseline | cnn_tiny |", "| distill (kl_softmax) | cnn_tiny |"):
        assert label in report
    assert "![validation top-1 per epoch](report.png)" in report
    assert (root / "report" / "version_0" / "report.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_new_run_never_overwrites_an_earlier_one(full_run, tiny_data):
    root, _ = full_run
    before = _snapshot(root)
    teacher = root / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(root.parent), "--experiment_name",
                 "e2e", "--distill", "--teacher_checkpoint", str(teacher), "--teacher_arch", "cnn_small"]) == 0
    assert (root / "distill" / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert {k: v for k, v in _snapshot(root).items() if k in before} == before


@pytest.mark.slow
def test_a_distill_stage_config_repeats_that_stage_alone_with_the_same_figures(full_run, tmp_path, capsys):
    """Its config.yaml names the teacher it used, this seed, the loss settings in force, and this stage only."""
    root, _ = full_run
    stage = root / "distill" / "version_0"
    saved = yaml.safe_load((stage / "config.yaml").read_text())
    assert (saved["train_teacher"], saved["baseline"], saved["distill"], saved["seeds"]) == (False, False, True, [])
    assert saved["teacher_checkpoint"] == [str(root / "teacher" / "version_0" / "checkpoints" / "best.ckpt")]
    assert (saved["temperature"], saved["kd_weights"], saved["ce_weight"]) == (4.0, [0.9], 0.1)
    # With the shipped commandline_args.txt (all three stages on) below it, as a user in the checkout runs it.
    assert main(["--config", str(stage / "config.yaml"), "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== distill: cnn_tiny, seed 0" in out and "== teacher" not in out and "== baseline" not in out
    again, first = (json.loads((folder / "result.json").read_text())
                    for folder in (tmp_path / "e2e" / "distill" / "version_0", stage))
    assert (again["best_top1"], again["val_top1"]) == (first["best_top1"], first["val_top1"])
    repeated = yaml.safe_load((tmp_path / "e2e" / "distill" / "version_0" / "config.yaml").read_text())
    assert repeated == saved | {"output_dir": str(tmp_path)}


@pytest.mark.parametrize("flags, temperature", [
    ({}, 4.0),  # kl_softmax's own
    ({"temperature": 2.0}, 2.0),
    ({"loss_options": ["kl_softmax.temperature=3"]}, 3.0),
    ({"kd_loss": ["kl_softmax", "dkd"], "loss_options": ["temperature=5"]}, 5.0),
    ({"kd_loss": ["kl_softmax", "dist"]}, None),  # 4 and 1: each loss keeps its own
    ({"kd_loss": ["mse_logits"]}, None),  # no loss has a temperature
])
def test_a_distill_stage_records_the_temperature_in_force(flags, temperature):
    assert with_weights_in_force(Config(**flags)).temperature == temperature


def test_resume_reads_a_config_saved_without_the_temperature_in_force_as_the_losses_own():
    """The kd before this one saved the weights in force but ``temperature: null``: it ran at kl_softmax's T = 4."""
    old = with_weights_in_force(Config(kd_loss=["kl_softmax"])).to_dict() | {"temperature": None}
    for temperature, same in ((None, True), (4.0, True), (2.0, False)):
        config = with_weights_in_force(Config(kd_loss=["kl_softmax"], temperature=temperature))
        assert (saved_identity(old, config, Role.DISTILL) == config.identity(Role.DISTILL)) is same


def test_a_checkpoint_from_before_percent_resumes_with_its_history_and_best_score_in_percent():
    """--resume of a stage interrupted under a kd that logged fractions keeps its best epoch the best."""
    best = {"monitor": "val/top1", "best_model_score": torch.tensor(0.5), "current_score": torch.tensor(0.25),
            "kth_value": torch.tensor(0.5), "best_k_models": {"best.ckpt": torch.tensor(0.5)}}
    history = History()
    old = {"callbacks": {history.state_key: {"epochs": [{"epoch": 0, "val/top1": 0.5, "val/loss": 2.0}]},
                         "ModelCheckpoint{'monitor': 'val/top1'}": best}}
    history.on_load_checkpoint(None, None, old)
    history.load_state_dict(old["callbacks"][history.state_key])
    assert history.epochs == [{"epoch": 0, "val/top1": 50.0, "val/loss": 2.0}]
    assert (float(best["best_model_score"]), float(best["current_score"]), float(best["best_k_models"]["best.ckpt"])) \
        == (50.0, 25.0, 50.0)
    new = {"callbacks": {history.state_key: history.state_dict()}}
    history.on_load_checkpoint(None, None, new)
    assert new["callbacks"][history.state_key]["epochs"] == [{"epoch": 0, "val/top1": 50.0, "val/loss": 2.0}]


def _tiny_copy(tiny_data: Path, tmp_path: Path) -> Path:
    return shutil.copytree(tiny_data, tmp_path / "data")


def _broken_images(tiny_data: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the data with one file that is no image and one PNG cut in half (its header intact)."""
    root = _tiny_copy(tiny_data, tmp_path)
    garbage, truncated = root / "train" / "red_ring" / "0000.png", root / "val" / "blue_square" / "0001.png"
    garbage.write_bytes(b"\x89PNG not really")
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    return root, garbage, truncated


@pytest.mark.slow
def test_skip_bad_images_trains_on_the_rest_and_lists_them(tiny_data, tmp_path):
    root, garbage, truncated = _broken_images(tiny_data, tmp_path)
    result = run_cli([*FAST, "--data_dir", str(root), "--output_dir", str(tmp_path / "runs"), "--baseline",
                      "--skip_bad_images"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: --skip_bad_images: skipping 2 unreadable image(s)" in result.stderr
    listed = (tmp_path / "runs" / "kd" / "baseline" / "version_0" / "skipped_images.txt").read_text()
    assert sorted(line.split("\t")[0] for line in listed.splitlines()) == sorted([str(garbage), str(truncated)])


@pytest.mark.slow
def test_non_image_files_are_named_in_a_warning(tiny_data, tmp_path):
    root = _tiny_copy(tiny_data, tmp_path)
    (root / "train" / "blue_ring" / "notes.txt").write_text("not an image")
    result = run_cli([*FAST, "--data_dir", str(root), "--output_dir", str(tmp_path / "runs"), "--baseline"],
                     cwd=tmp_path)
    assert result.returncode == 0
    assert f"warning: --data_dir: ignoring 1 file(s) under {root / 'train'} that are not images" in result.stderr


def _readme_loss(tmp_path: Path) -> str:
    """The custom-loss example from the README, written to a file, as a --kd_loss spec."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = readme.split("```python\n# my_losses.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_losses.py").write_text(code)
    return f"{tmp_path / 'my_losses.py'}:SoftCE"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kl_softmax", "mse_logits", "ce", "readme example"])
def test_distill_with_each_loss_logs_its_terms(loss, full_run, tiny_data, tmp_path):
    root, _ = full_run
    teacher = root / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    spec = _readme_loss(tmp_path) if loss == "readme example" else loss
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill",
                 "--teacher_checkpoint", str(teacher), "--teacher_arch", "cnn_small", "--kd_loss", spec]) == 0
    term = "SoftCE/soft_ce" if loss == "readme example" else loss  # a dict term: kd/<loss>/<term>
    assert f"train/kd/{term}_step" in _tags(tmp_path / "kd" / "distill" / "version_0")


@pytest.mark.slow
def test_loaded_teacher_holds_exactly_the_checkpoint_weights(full_run, tiny_data):
    root, _ = full_run
    path = root / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    saved = {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=True)["state_dict"].items()
             if k.startswith("model.")}
    teacher = load_network(path, "cnn_small", sorted(p.name for p in (tiny_data / "train").iterdir()), 16)
    assert teacher.state_dict().keys() == saved.keys()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in saved.items())  # BN statistics included


@pytest.mark.slow
def test_evaluate_prints_and_logs_accuracy_per_class_and_confusion(full_run, tiny_data, tmp_path, capsys):
    root, _ = full_run
    best = root / "distill" / "version_0" / "checkpoints" / "best.ckpt"
    reported = json.loads((root / "distill" / "version_0" / "result.json").read_text())
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--evaluate", str(best)]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {reported['best_top1']:.2f}" in out  # the same images and weights as the stage's best epoch
    assert "blue_circle" in out and "true \\ predicted" in out
    events = EventAccumulator(str(tmp_path / "kd" / "evaluate" / "version_0"))
    events.Reload()
    assert "eval/confusion_matrix" in events.Tags()["images"] and "eval/top1" in events.Tags()["scalars"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".torchscript.pt")])
def test_export_writes_students_beside_their_checkpoints_and_compares_costs(fmt, suffix, full_run, tiny_data,
                                                                           tmp_path, capsys):
    root, _ = full_run
    teacher = root / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill", "--teacher_arch",
                 "cnn_small", "--teacher_checkpoint", str(teacher), "--export", fmt]) == 0
    out = capsys.readouterr().out
    exported = tmp_path / "kd" / "distill" / "version_0" / "checkpoints" / f"best{suffix}"
    assert exported.is_file() and f"exported {exported} (outputs within" in out
    assert "teacher" in out.split("exported")[-1] and "student" in out.split("exported")[-1]


def test_a_run_that_fails_its_checks_writes_nothing(tiny_data, tmp_path, capsys):
    """The checks read and try, never write: no empty experiment folder is left behind."""
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--train_teacher",
                 "--distill", "--kd_loss", "fitnets"])
    assert code == 2 and "feature losses need --student_layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--milestones", "3"], "--milestones 3: they are for --scheduler multistep, not cosine"),
    (["--scheduler", "multistep"], "--scheduler multistep needs --milestones"),
])
def test_schedule_flags_that_do_not_fit_are_refused(flags, message, tiny_data, tmp_path, capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline", *flags]) == 2
    assert message in capsys.readouterr().err


def test_an_output_folder_that_is_a_file_is_refused_before_the_demo_data_is_written(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([*FAST, "--data_dir", "demo", "--output_dir", str(tmp_path / "afile"), "--baseline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output_dir: cannot create {tmp_path / 'afile' / 'kd'}") and err.count("\n") == 1


def test_a_missing_teacher_checkpoint_is_named_before_the_cache_reads_it(tiny_data, tmp_path, capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--distill",
                 "--teacher_checkpoint", str(tmp_path / "typo.ckpt"), "--teacher_cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --teacher_checkpoint: file {tmp_path / 'typo.ckpt'} does not exist\n"
