"""Reports: mean ± std over seeds, gains paired by seed, --seeds runs and --report comparisons."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from conftest import FAST, on_a_full_disk
from kd.cli import main
from kd.config import Config
from kd.errors import KDError
from kd.report.provenance import settings_table
from kd.report.comparison import (baseline_name, comparison_table, figure, gains, group_results, stage_table,
                                  write_report)
from kd.report.confidence import paired_gain
from kd.report.results import StageResult, find_results
from kd.run.summary import report_and_summary


def _result(stage: str, seed: int, top1: float, experiment: str = "e", kd_loss: str = "", best: float | None = None,
            trials: int | None = None) -> StageResult:
    """A finished stage whose last epoch scored ``top1`` (and whose best epoch, selected on val/, ``best``)."""
    return StageResult(experiment, stage, "cnn_tiny", seed, 1620, best or top1, top1 + 10, 3, 2.0,
                       Path(f"/r/{stage}{seed}"), Path("/r/x.ckpt"), kd_loss, [top1 - 5, best or top1, top1],
                       tune_trials=trials)


def _means(found: dict) -> dict:
    return {group: {name: gain.mean for name, gain in by_baseline.items()} for group, by_baseline in found.items()}


def test_gain_is_paired_seed_by_seed():
    results = [_result("baseline", 0, 40.0), _result("baseline", 1, 50.0), _result("baseline", 2, 45.0),
               _result("distill", 1, 54.0, kd_loss="kl"), _result("distill", 0, 43.0, kd_loss="kl")]
    assert _means(gains(group_results(results))) == {("e", "distill (kl)"): {"baseline": 3.5}}


def test_gain_without_shared_seeds_is_the_difference_of_means():
    results = [_result("baseline", 0, 40.0), _result("baseline", 1, 50.0), _result("distill", 7, 60.0, kd_loss="kl")]
    gain = gains(group_results(results))[("e", "distill (kl)")]["baseline"]
    assert (gain.mean, gain.low, gain.seeds) == (15.0, None, 0) and gain.short() == "+15.00 (no shared seeds)"
    assert "no seed on both sides" in gain.sentence()


def test_a_seed_trained_twice_counts_once_its_newest_run():
    """A stage run again without --resume adds a version of the same seed: one sample, not two."""
    def run(stage, seed, top1, version, kd_loss=""):
        folder = Path(f"/r/{stage}/version_{version}")
        return dataclasses.replace(_result(stage, seed, top1, kd_loss=kd_loss), log_dir=folder)

    results = [run("baseline", 0, 40.0, 0), run("baseline", 1, 50.0, 1), run("baseline", 0, 42.0, 10),
               run("distill", 0, 45.0, 0, "kl"), run("distill", 1, 52.0, 1, "kl"), run("distill", 0, 49.0, 2, "kl")]
    gain = gains(group_results(results))[("e", "distill (kl)")]["baseline"]
    assert gain.seeds == 2 and gain.mean == pytest.approx(((49 - 42) + (52 - 50)) / 2)


def test_the_headline_top1_is_the_last_epochs_not_the_best_epoch_val_selected():
    results = [_result("baseline", 0, 40.0, best=48.0), _result("distill", 0, 43.0, kd_loss="kl", best=44.0)]
    assert _means(gains(group_results(results))) == {("e", "distill (kl)"): {"baseline": 3.0}}
    row = next(line for line in stage_table(results).splitlines() if line.startswith("baseline"))
    assert "40.00" in row and "48.00 (3)" in row  # the best epoch's top-1, with its epoch, labelled in the header
    assert "best top-1 % on val/ (epoch)" in stage_table(results)


def test_the_95_percent_interval_and_wins_match_a_hand_computation():
    """Differences 4, 2, 6: mean 4, sample std 2, t(0.975, 2 degrees of freedom) = 4.302652729911275 (a t table),
    so the half-width is 4.302652729911275 · 2 / √3."""
    gain = paired_gain([4.0, 2.0, 6.0])
    half = 4.302652729911275 * 2 / math.sqrt(3)
    assert gain.mean == pytest.approx(4.0)
    assert (gain.low, gain.high) == (pytest.approx(4 - half), pytest.approx(4 + half))
    assert (gain.wins, gain.seeds, gain.includes_zero) == (3, 3, True)
    assert "95% CI [-0.97, +8.97]" in gain.sentence() and "the interval includes zero" in gain.sentence()
    assert gain.short() == "+4.00 [-0.97, +8.97], 3/3 wins"
    sure = paired_gain([3.0, 3.5, 2.5, 3.2])
    assert not sure.includes_zero and "excludes zero" in sure.sentence() and sure.low > 0
    lost = paired_gain([-1.0, 2.0, -0.5])
    assert lost.wins == 1
    assert paired_gain([2.0]).short() == "+2.00" and paired_gain([2.0]).low is None


def test_a_tuned_student_is_compared_with_each_baseline_by_name(tmp_path):
    untuned = [_result("baseline", s, v) for s, v in ((0, 40.0), (1, 50.0))]
    tuned_baseline = [_result("baseline", s, v, trials=16) for s, v in ((0, 44.0), (1, 51.0))]
    tuned_student = [_result("distill", s, v, kd_loss="kl", trials=16) for s, v in ((0, 45.0), (1, 53.0))]
    found = gains(group_results(untuned + tuned_baseline + tuned_student))
    assert tuned_baseline[0].label == "baseline (tuned, 16 trials)"
    assert list(found) == [("e", "distill (kl, tuned, 16 trials)")]
    by_name = found[("e", "distill (kl, tuned, 16 trials)")]
    assert list(by_name) == ["baseline tuned, 16 trials", "baseline"]  # the same kind first
    assert (by_name["baseline tuned, 16 trials"].mean, by_name["baseline"].mean) == (1.5, 4.0)
    table = comparison_table(untuned + tuned_baseline + tuned_student)
    assert "gain over baseline tuned, 16 trials (top-1 points)" in table and "gain over baseline (top-1" in table


def test_an_untuned_baseline_is_named_by_its_learning_rate(tmp_path):
    folder = tmp_path / "baseline0"
    folder.mkdir()
    (folder / "config.yaml").write_text("lr: 0.05\n")
    runs = [StageResult("e", "baseline", "cnn_tiny", 0, 1, 40.0, 50.0, 3, 2.0, folder, folder / "x.ckpt")]
    assert baseline_name(runs) == "baseline at --lr 0.05"


def test_comparison_table_shows_mean_and_sample_std():
    results = [_result("baseline", s, v) for s, v in ((0, 40.0), (1, 50.0), (2, 45.0))]
    results += [_result("distill", s, v, kd_loss="kl") for s, v in ((0, 44.0), (1, 52.0), (2, 51.0))]
    table = comparison_table(results)
    baseline_row = next(line for line in table.splitlines() if line.startswith("baseline"))
    distill_row = next(line for line in table.splitlines() if line.startswith("distill (kl)"))
    assert "45.00 ± 5.00" in baseline_row and "0 1 2" in baseline_row and "1,620" in baseline_row
    assert paired_gain([4.0, 2.0, 6.0]).short() in distill_row


def test_rows_name_their_experiment_when_several_are_compared(tmp_path):
    results = [_result("baseline", 0, 40.0, "a"), _result("baseline", 0, 42.0, "b")]
    table = comparison_table(results, markdown=True)
    assert "| a/baseline |" in table and "| b/baseline |" in table
    report = write_report(results, tmp_path / "report")
    text = report.read_text()
    assert text.count("| a/baseline |") == text.count("| b/baseline |") == 2  # in the comparison and the settings
    with pytest.raises(KDError, match="already exists"):  # a report folder is never written twice
        write_report(results, tmp_path / "report")


def test_find_results_errors_name_the_folder(tmp_path):
    with pytest.raises(KDError, match=f"--report: {tmp_path / 'nope'} is not a folder"):
        find_results([str(tmp_path / "nope")])
    with pytest.raises(KDError, match="no finished stage"):
        find_results([str(tmp_path)])
    (tmp_path / "result.json").write_text("{broken")
    with pytest.raises(KDError, match="is not a kd result file"):
        find_results([str(tmp_path)])


@pytest.fixture(scope="module")
def seeded_run(tiny_data, tmp_path_factory):
    """Teacher once, baseline and distill for seeds 3 and 4, in one invocation."""
    out = tmp_path_factory.mktemp("seeds")
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--experiment_name", "multi",
                 "--train_teacher", "--baseline", "--distill", "--seeds", "3", "4"])
    assert code == 0
    return out / "multi"


def test_seeds_repeat_the_student_stages_and_train_one_teacher(seeded_run):
    results = find_results([str(seeded_run)])
    by_stage = {(r.stage, r.seed) for r in results}
    assert by_stage == {("teacher", 3), ("baseline", 3), ("distill", 3), ("baseline", 4), ("distill", 4)}
    assert all(len(r.val_top1) == 1 for r in results)
    report = (seeded_run / "report" / "version_0" / "report.md").read_text()
    assert "| distill (kl_softmax) | cnn_tiny | 1,620 | 3 4 |" in report


def test_repeat_teacher_trains_one_per_seed(tiny_data, tmp_path):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher",
                 "--seeds", "0", "1", "--repeat_teacher"]) == 0
    assert sorted(r.seed for r in find_results([str(tmp_path / "kd" / "teacher")])) == [0, 1]


def test_report_compares_finished_runs_without_training(seeded_run, tmp_path, capsys):
    before = sorted(seeded_run.rglob("*"))
    assert main(["--flags_file", "none", "--report", str(seeded_run / "baseline"), str(seeded_run / "distill"),
                 "--output_dir", str(tmp_path), "--experiment_name", "cmp"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "distill (kl_softmax)" in out and "teacher" not in out
    assert (tmp_path / "cmp" / "report" / "version_0" / "report.png").is_file()
    assert sorted(seeded_run.rglob("*")) == before
    assert main(["--flags_file", "none", "--report", str(tmp_path / "missing")]) == 2


def _stage(root: Path, stage: str, seed: int = 0, top1: float = 50.0, loss: str = "", arch: str = "cnn_tiny",
           curve: list[float] | None = None, **config) -> StageResult:
    """A finished stage written by hand under ``root/<stage>/version_<seed>``: config.yaml (``config``, if any)."""
    log_dir = root / stage / f"version_{seed}"
    log_dir.mkdir(parents=True)
    if config:
        (log_dir / "config.yaml").write_text(yaml.safe_dump(config))
    teachers = [{"arch": a, "checkpoint": c, "top1": 60.0} for a, c in zip(config.get("teacher_arch", []),
                                                                           config.get("teacher_checkpoint", []))]
    return StageResult(root.name, stage, arch, seed, 1620, top1, top1 + 10, 1, 2.0, log_dir,
                       log_dir / "checkpoints" / "best.ckpt", loss, curve or [top1 - 5, top1], teachers)


def _row(table: str, start: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {start}"))


def test_settings_name_the_teacher_temperature_weights_lr_and_epochs(tmp_path):
    root = tmp_path / "exp"
    teacher = _stage(root, "teacher", arch="cnn_medium", lr=0.1, epochs=40)
    distill = _stage(root, "distill", loss="kl_softmax", teacher_arch=["cnn_medium"],
                     teacher_checkpoint=[str(teacher.best_checkpoint)], kd_loss=["kl_softmax"], kd_weights=[0.9],
                     ce_weight=0.1, temperature=None, lr=0.05, epochs=30)
    table = settings_table([teacher, distill], markdown=True)
    assert _row(table, "teacher") == "| teacher | 0 | labels only | - | - | 0.1 | 40 | - |"
    assert _row(table, "distill") == ("| distill (kl_softmax) | 0 | cnn_medium (teacher/version_0/checkpoints/best"
                                      ".ckpt) | 4 (kl_softmax's default) | ce 0.1, kl_softmax 0.9 | 0.05 | 30 | - |")
    assert "## How each stage was trained" in write_report([teacher, distill], tmp_path / "report").read_text()


def test_settings_show_a_given_temperature_and_loss_options(tmp_path):
    distill = _stage(tmp_path, "distill", loss="kl_softmax", teacher_arch=["r"], teacher_checkpoint=["/t.ckpt"],
                     kd_loss=["kl_softmax"], temperature=2.0, loss_options=["kl_softmax.temperature=8"])
    assert "| r (/t.ckpt) | 2; kl_softmax.temperature=8 |" in settings_table([distill], markdown=True)


def test_settings_list_each_ensemble_member_and_the_assistant_chain(tmp_path):
    root = tmp_path / "exp"
    ensemble = _stage(root, "assistant1", loss="kl", teacher_arch=["a", "b"], teacher_checkpoint=["/a.ckpt",
                      str(root / "teacher/version_0/checkpoints/best.ckpt")], ensemble_weights=[2.0, 1.0])
    assistant = _stage(root, "assistant2", loss="kl", teacher_arch=["cnn_small"],
                       teacher_checkpoint=[str(ensemble.best_checkpoint)])
    student = _stage(root, "distill", loss="kl", teacher_arch=["cnn_mini"],
                     teacher_checkpoint=[str(assistant.best_checkpoint)])
    table = settings_table([ensemble, student], markdown=True)
    members = "ensemble of 2: a (/a.ckpt) ×2, b (teacher/version_0/checkpoints/best.ckpt) ×1"
    assert f"| assistant1 (kl) | 0 | {members} |" in table
    assert (f"| distill (kl) | 0 | {members} → cnn_small (assistant1/version_0/checkpoints/best.ckpt) → "
            "cnn_mini (assistant2/version_0/checkpoints/best.ckpt) |") in table


def test_settings_read_old_or_newer_configs_leniently(tmp_path):
    old = _stage(tmp_path, "baseline")  # no config.yaml at all
    newer = _stage(tmp_path, "distill", loss="kl", teacher_arch=["r"], teacher_checkpoint=["/t.ckpt"],
                   label_smoothing=0.1, mixup_alpha=0.0, ema_decay=0.999)  # no weights, lr, epochs; unknown flags
    broken = _stage(tmp_path, "teacher")
    (broken.log_dir / "config.yaml").write_text("[not: a mapping")
    table = settings_table([old, broken, newer], markdown=True)
    assert "| baseline | 0 | not recorded (no readable config.yaml) | - | - | - | - | - |" in table
    assert "| teacher | 0 | not recorded (no readable config.yaml) |" in table
    assert "| distill (kl) | 0 | r (/t.ckpt) | - | - | - | - | ema_decay=0.999, label_smoothing=0.1 |" in table


def test_seeds_with_the_same_settings_share_a_row(tmp_path):
    runs = [_stage(tmp_path, "baseline", seed, lr=0.1, epochs=5) for seed in (0, 1)]
    runs.append(_stage(tmp_path, "baseline", 2, lr=0.2, epochs=5))
    table = settings_table(runs, markdown=True)
    assert "| baseline | 0 1 | labels only | - | - | 0.1 | 5 | - |" in table and "| baseline | 2 |" in table


def test_a_run_that_scored_under_one_percent_is_shown_as_it_scored(tmp_path):
    failed = _stage(tmp_path, "baseline", top1=0.4, curve=[0.1, 0.4])  # e.g. 1000 classes, near chance
    assert " 0.40 " in stage_table([failed])
    [shown] = group_results([failed])[(tmp_path.name, "baseline")]
    assert shown.best_top1 == 0.4 and shown.val_top1 == [0.1, 0.4]


def _legend(fig: plt.Figure) -> dict[str, object]:
    legend = fig.axes[0].get_legend()
    return {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}


def test_plot_gives_each_teacher_its_own_colour_and_dashes(tmp_path):
    teachers = [_stage(tmp_path / name, "teacher", arch=arch, top1=top1)
                for name, arch, top1 in (("a", "resnet50", 70.0), ("b", "vit_b_16", 75.0))]
    fig = figure(teachers)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2
    assert lines[0].get_color() != lines[1].get_color()
    assert lines[0].get_linestyle() != lines[1].get_linestyle()
    assert "-" not in {line.get_linestyle() for line in lines}  # dashed: a teacher's best, not a curve
    assert list(_legend(fig)) == ["a/teacher: resnet50, best 70.0 %, seed 0",
                                  "b/teacher: vit_b_16, best 75.0 %, seed 0"]
    plt.close(fig)


def test_plot_labels_the_band_units_and_keeps_the_legend_off_the_curves(tmp_path):
    runs = [_stage(tmp_path, "distill", seed, top1=50.0 + seed, loss="kl", teacher_arch=["resnet50"],
                   teacher_checkpoint=["/t.ckpt"]) for seed in (0, 1, 2)]
    runs.append(_stage(tmp_path, "baseline", 0, top1=40.0))
    fig = figure(runs)
    axes = fig.axes[0]
    entries = _legend(fig)
    assert list(entries) == ["distill (kl): cnn_tiny from resnet50, mean ± std over 3 seeds",
                             "baseline: cnn_tiny, seed 0"]
    assert len(axes.collections) == 1  # the one band, that of the three seeds
    assert axes.get_xlabel() == "epoch (0 = the first)" and axes.get_ylabel() == "validation top-1 accuracy (%)"
    fig.canvas.draw()
    legend, plot_area = axes.get_legend().get_window_extent(), axes.get_window_extent()
    assert legend.x0 >= plot_area.x1  # beside the axes: it covers no curve's end
    assert legend.x1 <= fig.bbox.x1  # and is not cut off by the figure's edge
    plt.close(fig)


# A full disk, as far as any write can tell: the call runs in a child process whose files may not grow past
# 2 kB, so report.png's write fails part-way with a real EFBIG ("File too large"). Not in pytest's own
# process: there the limit would also stop pytest writing its log to a file.


@pytest.mark.slow  # ~9 s: the call runs in a child process of its own, under a file-size limit
def test_report_on_a_full_disk_names_the_file_and_leaves_no_folder(tmp_path):
    results = [_stage(tmp_path / "exp", "baseline", seed) for seed in (0, 1)]
    folder = tmp_path / "out" / "cmp" / "report" / "version_0"
    outcome = on_a_full_disk(write_report, results, folder)
    with pytest.raises(KDError, match=f"^report: cannot write {folder / 'report.png'}: File too large; "
                                      "no partial report is left$"):
        outcome.result()
    assert not (tmp_path / "out").exists()


def test_report_failing_on_its_markdown_keeps_the_folders_that_were_there(tmp_path, monkeypatch):
    results = [_stage(tmp_path / "exp", "baseline", seed) for seed in (0, 1)]
    (tmp_path / "exp" / "report" / "version_0").mkdir(parents=True)  # an earlier report, to be kept
    real = Path.write_text

    def no_space(path: Path, text: str, *args, **kwargs) -> int:
        if path.name == "report.md":
            raise OSError(28, "No space left on device", str(path))
        return real(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", no_space)
    folder = tmp_path / "exp" / "report" / "version_1"
    with pytest.raises(KDError, match=f"cannot write {folder / 'report.md'}: No space left on device"):
        write_report(results, folder)
    assert [p.name for p in (tmp_path / "exp" / "report").iterdir()] == ["version_0"]


@pytest.mark.slow  # ~9 s: the call runs in a child process of its own, under a file-size limit
def test_summary_is_printed_before_a_report_that_cannot_be_written(tmp_path):
    results = [_stage(tmp_path / "kd", stage) for stage in ("baseline", "teacher")]
    config = dataclasses.replace(Config(), output_dir=str(tmp_path), experiment_name="kd")
    outcome = on_a_full_disk(report_and_summary, results, config)
    with pytest.raises(KDError, match="report.png: File too large"):
        outcome.result()
    out = outcome.stdout
    assert "top-1 %" in out and "baseline" in out and "report:" not in out
    assert not (tmp_path / "kd" / "report").exists()
