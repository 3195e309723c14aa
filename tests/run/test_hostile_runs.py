"""Hostile runs: experiments moved, edited, damaged or run twice at once, and odd flag combinations."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, PROJECT
from kd.cli import main
from kd.models.build import build_model


def _flags(data: Path, out: Path, *stages: str) -> list[str]:
    return [*FAST, "--data_dir", str(data), "--output_dir", str(out), *stages]


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


def test_a_seed_given_twice_is_refused_naming_seeds(tiny_data, tmp_path, capsys):
    assert main(_flags(tiny_data, tmp_path, "--baseline", "--seeds", "0", "3", "0", "3", "1")) == 2
    assert _one_line_error(capsys) == ("error: --seeds: 0, 3 given more than once; a seed repeated trains the same "
                                       "runs again (and reports a spread of 0)")
    assert not (tmp_path / "kd").exists()


def test_a_long_seed_list_is_checked_in_linear_time(tiny_data, tmp_path, capsys):
    seeds = [str(n) for n in range(200_000)] + ["7"]
    started = time.monotonic()
    assert main(_flags(tiny_data, tmp_path, "--baseline", "--seeds", *seeds, "--student_arch", "no_such_net")) == 2
    assert time.monotonic() - started < 20 and "error: --seeds: 7 given more than once" in capsys.readouterr().err


def test_resume_after_a_class_folder_is_renamed_trains_anew_and_says_why(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    flags = _flags(data, tmp_path / "runs", "--baseline")
    assert main(flags) == 0
    stage = tmp_path / "runs" / "kd" / "baseline"
    before = _snapshot(stage / "version_0")
    for split in ("train", "val"):  # blue_circle sorts first; as zz_circle it sorts last: every label shifts
        (data / split / "blue_circle").rename(data / split / "zz_circle")
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"--resume: reusing {stage / 'version_0'} is not possible: it learned other classes: 12, the data now " \
           "has 12 (added: zz_circle; gone: blue_circle)" in err
    assert _versions(stage) == ["version_0", "version_1"] and _snapshot(stage / "version_0") == before


def test_resume_of_an_unfinished_stage_on_more_classes_never_continues_it(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    flags = _flags(data, tmp_path / "runs", "--baseline")
    assert main(flags) == 0
    stage = tmp_path / "runs" / "kd" / "baseline"
    (stage / "version_0" / "result.json").unlink()  # unfinished: only last.ckpt
    for split in ("train", "val"):
        shutil.copytree(data / split / "red_ring", data / split / "aa_ring")
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0  # before: a size mismatch loading last.ckpt
    assert "is not possible: it learned other classes: 12, the data now has 13 (added: aa_ring)" \
           in capsys.readouterr().err
    assert _versions(stage) == ["version_0", "version_1"] and not (stage / "version_0" / "result.json").exists()
    assert json.loads((stage / "version_1" / "result.json").read_text())["stage"] == "baseline"


def test_a_truncated_last_checkpoint_is_named_and_left_while_the_stage_starts_anew(tiny_data, tmp_path, capsys):
    flags = _flags(tiny_data, tmp_path, "--baseline")
    assert main(flags) == 0
    stage = tmp_path / "kd" / "baseline"
    (stage / "version_0" / "result.json").unlink()
    last = stage / "version_0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:3000])
    before = _snapshot(stage / "version_0")
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"--resume: continuing {stage / 'version_0'} is not possible: cannot load {last}: not a PyTorch " \
           "file, or truncated" in err and "cannot write" not in err
    assert _versions(stage) == ["version_0", "version_1"] and _snapshot(stage / "version_0") == before


HOLD_LOCK = """
import sys, time
from pathlib import Path
from kd.versions import training_lock
with training_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_stage_being_trained_is_not_resumed_twice_and_a_dead_holder_blocks_nothing(tiny_data, tmp_path, capsys):
    flags = _flags(tiny_data, tmp_path, "--baseline")
    assert main(flags) == 0
    stage = tmp_path / "kd" / "baseline" / "version_0"
    (stage / "result.json").unlink()  # unfinished, as when the first --resume is still training it
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(stage)], stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(PROJECT)})
    try:
        assert holder.stdout.readline() == "held\n"
        capsys.readouterr()
        assert main([*flags, "--resume"]) == 2
        err = _one_line_error(capsys)
        assert err.startswith(f"error: {stage} is being trained by process {holder.pid} on ")
    finally:
        holder.kill()  # SIGKILL: the lock is released with the process, whatever its file says
        holder.wait()
    assert main([*flags, "--resume"]) == 0
    assert (stage / "result.json").is_file() and _versions(stage.parent) == ["version_0"]


def _old_format(result: Path) -> None:
    """Rewrite ``result`` as kd wrote it before relative paths: absolute folders."""
    data = json.loads(result.read_text())
    data["log_dir"] = str(result.parent.resolve())
    data["best_checkpoint"] = str(result.parent.resolve() / "checkpoints" / "best.ckpt")
    result.write_text(json.dumps(data))


@pytest.mark.slow
def test_a_moved_experiment_resumes_every_stage(tiny_data, tmp_path, capsys):
    flags = _flags(tiny_data, tmp_path / "here", "--train_teacher", "--distill")
    assert main(flags) == 0
    saved = json.loads((tmp_path / "here" / "kd" / "distill" / "version_0" / "result.json").read_text())
    assert (saved["log_dir"], saved["best_checkpoint"]) == (".", "checkpoints/best.ckpt")
    _old_format(tmp_path / "here" / "kd" / "teacher" / "version_0" / "result.json")  # old files load too
    shutil.move(tmp_path / "here", tmp_path / "there")
    capsys.readouterr()
    moved = _flags(tiny_data, tmp_path / "there", "--train_teacher", "--distill", "--resume")
    assert main(moved) == 0  # before: error: --teacher_checkpoint: file .../here/kd/teacher/... does not exist
    out = capsys.readouterr().out
    assert out.count("finished earlier in") == 2 and str(tmp_path / "there" / "kd" / "distill" / "version_0") in out
    assert all(_versions(tmp_path / "there" / "kd" / s) == ["version_0"] for s in ("teacher", "distill"))


@pytest.mark.slow
def test_a_teacher_near_chance_is_warned_about_before_distilling_and_recorded(tiny_data, tmp_path, capsys):
    assert main(_flags(tiny_data, tmp_path, "--train_teacher", "--distill")) == 0  # 1 epoch: 8.33 % on 12 classes
    out = capsys.readouterr().out
    warning = ("the teacher's validation top-1 is 8.33 %, near chance (8.33 % with 12 classes): it has little to "
               "teach; train it longer, or give a better --teacher_checkpoint")
    assert out.index(f"warning: distill (seed 0): {warning}") < out.index("== distill: ")
    assert f"warning: distill (kl_softmax), seed 0: {warning}" in out.split("stage ")[-1]  # the summary
    result = json.loads((tmp_path / "kd" / "distill" / "version_0" / "result.json").read_text())
    assert result["warnings"] == [warning]


def test_teacher_doubt_names_chance_and_the_baseline():
    from kd.run.runner import teacher_doubt  # imported here: it loads Lightning

    assert "near chance (8.33 % with 12 classes)" in teacher_doubt(8.33, 12)
    assert teacher_doubt(60.0, 12) is None and teacher_doubt(60.0, 12, baseline=55.0) is None
    assert teacher_doubt(60.0, 12, baseline=70.0) == ("the teacher's validation top-1 (60.00 %) is below the baseline "
                                                      "student's (70.00 %): distilling from it may hold the student "
                                                      "back")
    assert teacher_doubt(54.0, 2) is not None and teacher_doubt(56.0, 2) is None  # chance is 50 % for 2 classes


@pytest.fixture(scope="module")
def baseline_run(tiny_data, tmp_path_factory) -> Path:
    """An output folder holding a finished baseline run, trained once for the tests below."""
    out = tmp_path_factory.mktemp("baseline")
    assert main(_flags(tiny_data, out, "--baseline")) == 0
    return out


@pytest.fixture
def finished(baseline_run, tiny_data, tmp_path) -> tuple[list[str], Path]:
    """A copy of the finished baseline run to break, and the flags that resume it."""
    shutil.copytree(baseline_run, tmp_path, dirs_exist_ok=True)
    return _flags(tiny_data, tmp_path, "--baseline"), tmp_path / "kd" / "baseline" / "version_0"


def test_a_hand_broken_result_file_is_named_on_resume_not_blamed_on_report(finished, capsys):
    flags, stage = finished
    (stage / "result.json").write_text('{"stage": "baseline", ')
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: {stage / 'result.json'} is not a kd result file (JSONDecodeError") \
           and "--report" not in err


@pytest.mark.parametrize("text", ["lr: [0.1\n", "- a list\n", "\x00\x01"])
def test_a_hand_broken_config_file_is_named_on_resume(finished, capsys, text):
    flags, stage = finished
    (stage / "config.yaml").write_text(text)
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 2
    assert _one_line_error(capsys).startswith(f"error: --resume: {stage / 'config.yaml'} ")


def test_a_stray_version_folder_is_ignored_on_resume(finished, capsys):
    flags, stage = finished
    shutil.copytree(stage, stage.parent / "version_0_backup")  # before: ValueError on int('0_backup')
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    assert "finished earlier in" in capsys.readouterr().out


def test_a_finished_stage_whose_checkpoint_was_deleted_is_trained_anew(finished, capsys):
    flags, stage = finished
    shutil.rmtree(stage / "checkpoints")  # a half-deleted version folder: result.json, no checkpoints
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"--resume: reusing {stage} is not possible: file {stage / 'checkpoints' / 'best.ckpt'}" in err
    assert _versions(stage.parent) == ["version_0", "version_1"]


def test_a_last_checkpoint_of_another_network_is_named_not_loaded(finished, capsys):
    flags, stage = finished
    (stage / "result.json").unlink()
    last = stage / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # a hand-copied file: cnn_small weights under cnn_tiny's name
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in build_model("cnn_small", 12).state_dict().items()}
    torch.save(checkpoint, last)
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0  # before: a traceback of size mismatches from load_state_dict
    assert f"--resume: continuing {stage} is not possible: {last} does not fit this model: " in capsys.readouterr().err
    assert _versions(stage.parent) == ["version_0", "version_1"]


def test_a_stage_folder_that_is_a_file_is_a_one_line_error(tiny_data, tmp_path, capsys):
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "baseline").write_text("not a folder")
    assert main(_flags(tiny_data, tmp_path, "--baseline")) == 2  # before: NotADirectoryError's traceback
    version = tmp_path / "kd" / "baseline" / "version_0"
    assert _one_line_error(capsys) == f"error: --output_dir: cannot create {version}: Not a directory"


def test_a_version_folder_another_run_just_took_is_not_shared(tmp_path, monkeypatch):
    import kd.versions

    first, taken = kd.versions.next_version, []

    def raced(folder: Path) -> Path:  # another run creates version_0 between the choice and the mkdir
        chosen = first(folder)
        if not taken:
            chosen.mkdir(parents=True)
            taken.append(chosen)
        return chosen

    monkeypatch.setattr(kd.versions, "next_version", raced)
    assert kd.versions.new_version(tmp_path / "baseline") == tmp_path / "baseline" / "version_1"


def test_a_file_system_without_locks_trains_saying_so(tmp_path, monkeypatch, capsys):
    import fcntl

    from kd.versions import training_lock

    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with training_lock(tmp_path):  # before: OSError's traceback
        pass
    assert capsys.readouterr().err == (f"warning: {tmp_path}: cannot lock training.lock (No locks available); do not "
                                       "resume this stage twice at once\n")


@pytest.mark.parametrize("log_dir, best", [
    (".", "checkpoints/best.ckpt"),  # as kd saves it now
    ("/old/kd/teacher/version_3", "/old/kd/teacher/version_3/checkpoints/best.ckpt"),  # before: absolute
    ("runs/kd/teacher/version_3", "/home/u/runs/kd/teacher/version_3/checkpoints/best.ckpt"),  # relative --output_dir
])
def test_result_files_of_every_age_find_their_checkpoint_where_they_lie_now(tmp_path, log_dir, best):
    from kd.report.results import StageResult

    folder = tmp_path / "moved" / "kd" / "teacher" / "version_3"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({
        "experiment": "kd", "stage": "teacher", "arch": "cnn_tiny", "seed": 0, "params": 1, "best_top1": 50.0,
        "best_top5": 90.0, "best_epoch": 0, "seconds": 1.0, "log_dir": log_dir, "best_checkpoint": best}))
    result = StageResult.load(folder / "result.json")
    assert (result.log_dir, result.best_checkpoint) == (folder, folder / "checkpoints" / "best.ckpt")


def test_a_result_saved_under_a_relative_output_dir_keeps_its_checkpoint_relative(tmp_path, monkeypatch):
    from kd.report.results import StageResult

    monkeypatch.chdir(tmp_path)
    folder = Path("runs") / "kd" / "baseline" / "version_0"  # as the runner names it; Lightning's path is absolute
    folder.mkdir(parents=True)
    StageResult("kd", "baseline", "cnn_tiny", 0, 1, 50.0, 90.0, 0, 1.0, folder,
                tmp_path / folder / "checkpoints" / "best.ckpt").save()
    saved = json.loads((folder / "result.json").read_text())
    assert (saved["log_dir"], saved["best_checkpoint"]) == (".", "checkpoints/best.ckpt")
