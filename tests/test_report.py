"""Reports: mean ± std over seeds, gains paired by seed, --seeds runs and --report comparisons."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import FAST
from kd.cli import main
from kd.errors import KDError
from kd.report import comparison_table, gains, group_results, write_report
from kd.results import StageResult, find_results


def _result(stage: str, seed: int, top1: float, experiment: str = "e", kd_loss: str = "") -> StageResult:
    return StageResult(experiment, stage, "cnn_tiny", seed, 1620, top1, top1 + 10, 3, 2.0, Path(f"/r/{stage}{seed}"),
                       Path("/r/x.ckpt"), kd_loss, [top1 - 5, top1])


def test_gain_is_paired_seed_by_seed():
    results = [_result("baseline", 0, 40.0), _result("baseline", 1, 50.0), _result("baseline", 2, 45.0),
               _result("distill", 1, 54.0, kd_loss="kl"), _result("distill", 0, 43.0, kd_loss="kl")]
    assert gains(group_results(results)) == {("e", "distill (kl)"): [4.0, 3.0]}


def test_gain_without_shared_seeds_is_the_difference_of_means():
    results = [_result("baseline", 0, 40.0), _result("baseline", 1, 50.0), _result("distill", 7, 60.0, kd_loss="kl")]
    assert gains(group_results(results)) == {("e", "distill (kl)"): [15.0]}


def test_comparison_table_shows_mean_and_sample_std():
    results = [_result("baseline", s, v) for s, v in ((0, 40.0), (1, 50.0), (2, 45.0))]
    results += [_result("distill", s, v, kd_loss="kl") for s, v in ((0, 44.0), (1, 52.0), (2, 51.0))]
    table = comparison_table(results)
    diffs = [4.0, 2.0, 6.0]
    std = math.sqrt(sum((d - 4.0) ** 2 for d in diffs) / 2)  # sample standard deviation, by hand
    baseline_row = next(line for line in table.splitlines() if line.startswith("baseline"))
    distill_row = next(line for line in table.splitlines() if line.startswith("distill (kl)"))
    assert "45.00 ± 5.00" in baseline_row and "0 1 2" in baseline_row and "1,620" in baseline_row
    assert f"4.00 ± {std:.2f}" in distill_row


def test_rows_name_their_experiment_when_several_are_compared(tmp_path):
    results = [_result("baseline", 0, 40.0, "a"), _result("baseline", 0, 42.0, "b")]
    table = comparison_table(results, markdown=True)
    assert "| a/baseline |" in table and "| b/baseline |" in table
    report = write_report(results, tmp_path / "report")
    assert report.read_text().count("/baseline |") == 2
    with pytest.raises(FileExistsError):  # a report folder is never written twice
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
