"""Paths Python cannot look at (a 300-character name, a symlink loop, a path under a file, no permission) given to
every flag that takes one, and output that would become input: one line naming the flag, never a traceback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST
from fake_datasets import FAKES, skip_md5_check
from kd.cli import main
from kd.errors import KDError
from kd.files import checked_path, printable, shown
from kd.models.build import build_model

# Each path-taking flag, as a run that reaches it: {path} is the bad path; {data} the tiny dataset.
FLAGS = {
    "--output_dir": ["--baseline", "--output_dir", "{path}"],
    "--data_dir": ["--baseline", "--data_dir", "{path}"],
    "--teacher_checkpoint": ["--distill", "--teacher_checkpoint", "{path}"],
    "--evaluate": ["--evaluate", "{path}"],
    "--student_weights": ["--baseline", "--student_weights", "{path}"],
    "--teacher_weights": ["--train_teacher", "--teacher_weights", "{path}"],
    "--teacher_cache": ["--train_teacher", "--distill", "--teacher_cache", "{path}"],
    "--image_cache": ["--baseline", "--image_cache", "{path}"],
    "--report": ["--report", "{path}"],
    "--student_arch": ["--baseline", "--student_arch", "{path}/net.py:Net"],
    "--kd_loss": ["--train_teacher", "--distill", "--kd_loss", "{path}/loss.py:Loss"],
    "--config": ["--baseline", "--config", "{path}"],
}


def _bad_path(kind: str, tmp: Path) -> tuple[Path, str]:
    """A path of ``kind`` under ``tmp`` and the reason kd must give for it."""
    if kind == "too long":
        return tmp / ("x" * 300), "File name too long"
    if kind == "symlink loop":
        (tmp / "a").symlink_to(tmp / "b")
        (tmp / "b").symlink_to(tmp / "a")
        return tmp / "a", "Too many levels of symbolic links"
    (tmp / "afile").write_text("a file, not a folder")  # as root, "no permission" is a folder we cannot enter
    return tmp / "afile" / "sub", "afile is not a folder"


@pytest.mark.parametrize("kind", ["too long", "symlink loop", "under a file"])
@pytest.mark.parametrize("flag", FLAGS)
def test_every_path_flag_refuses_a_path_it_cannot_look_at(flag, kind, tiny_data, tmp_path, capsys):
    path, why = _bad_path(kind, tmp_path)
    flags = [f.format(path=path) for f in FLAGS[flag]]
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("error: ") and why in err, err
    assert flag in err or "preset" in err, err  # --config names where it was given, as for a missing preset
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_no_permission_is_one_line_naming_the_flag(tiny_data, tmp_path, monkeypatch, capsys):
    """Root can enter any folder, so a folder that denies it is simulated where kd looks at a path."""
    denied = tmp_path / "denied"
    stat = Path.stat

    def refusing(self, **kwargs):
        if str(self).startswith(str(denied)):
            raise PermissionError(13, "Permission denied", str(self))
        return stat(self, **kwargs)
    monkeypatch.setattr(Path, "stat", refusing)
    for flag in ("--output_dir", "--data_dir", "--teacher_checkpoint", "--evaluate", "--report"):
        code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"),
                     *(f.format(path=denied / "x") for f in FLAGS[flag])])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == f"error: {flag}: cannot use {denied / 'x'}: Permission denied", err


def test_checked_path_passes_what_merely_does_not_exist_and_shows_names_on_one_line(tmp_path):
    assert checked_path(tmp_path / "not yet", "--output_dir") == tmp_path / "not yet"
    assert checked_path("~", "--data_dir") == Path.home()
    with pytest.raises(KDError, match="--data_dir: cannot use ~nosuchuser_kd/x"):
        checked_path("~nosuchuser_kd/x", "--data_dir")
    with pytest.raises(KDError, match="embedded null byte"):  # a preset can write one; a command line cannot
        checked_path("a\0b", "--output_dir")
    assert shown("/d/" + "y" * 300) == "/d/" + "y" * 20 + "…(300 characters)"
    assert printable("cat\nsdog\t" + os.fsdecode(b"\xff")) == "cat\\nsdog\\t\\xff"


# ------------------------------------------------------------------------------ output that becomes input


@pytest.mark.parametrize("where", ["output equals data", "output inside data", "data inside output",
                                   "image cache inside data", "teacher cache inside data"])
def test_kd_never_writes_into_the_data_it_reads(where, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    data.symlink_to(tiny_data, target_is_directory=True)  # a link to it counts as it
    out = tmp_path / "out"
    if where == "data inside output":  # a dataset made of kd's own output: its stage folders would be classes
        data = shutil.copytree(tiny_data, out / "kd" / "teacher")
    flags = {"output equals data": ["--output_dir", str(data)],
             "output inside data": ["--output_dir", str(data / "train")],
             "data inside output": ["--output_dir", str(out)],
             "image cache inside data": ["--output_dir", str(out), "--image_cache", str(data / "cache")],
             "teacher cache inside data": ["--output_dir", str(out), "--train_teacher", "--distill",
                                           "--teacher_cache", str(tiny_data / "cache")]}[where]
    before = sorted(Path(data).resolve().rglob("*"))
    code = main([*FAST, "--data_dir", str(data), "--baseline", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "lies inside" in err and "--data_dir" in err, err
    assert sorted(Path(data).resolve().rglob("*")) == before


def test_an_export_beside_a_checkpoint_in_the_data_is_refused(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    checkpoint = data / "best.pt"
    torch.save(build_model("cnn_tiny", 12).state_dict(), checkpoint)
    code = main([*FAST, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"),
                 "--evaluate", str(checkpoint), "--export", "onnx"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: --export {data} lies inside --data_dir {data}"), err
    assert sorted(p.name for p in data.iterdir()) == ["best.pt", "demo.json", "train", "val"]


# ------------------------------------------------------------------------------ found in kd's own hostile round


@pytest.mark.parametrize("flags, message", [
    (["--output_dir", ""], "--output_dir: an empty path"),
    (["--data_dir", ""], "--data_dir: an empty path"),
    (["--data_dir", "folder:"], "--data_dir: an empty path"),  # Path("") would read the working directory
    (["--student_weights", ""], "--student_weights: an empty path"),
    (["--output_dir", os.fsdecode(b"out\xff")], "--output_dir must be a name in UTF-8"),  # TensorBoard's traceback
    (["--experiment_name", "a\nb"], "--experiment_name must be a non-empty relative name without .., line breaks"),
])
def test_empty_and_unloggable_output_names_are_refused(flags, message, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--baseline", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not any(tmp_path.iterdir())


def test_a_class_folder_in_a_symlink_loop_is_named_not_hiding_every_class(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    (data / "train" / "loop").symlink_to(data / "train" / "loop")
    code = main([*FAST, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--baseline"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --data_dir: cannot use {data}/train/loop: Too many levels of symbolic links"


def test_class_names_in_errors_stay_on_one_line(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    for split in ("train", "val"):
        (data / split / "blue_ring").rename(data / split / "blue\nring")
    code = main([*FAST, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--baseline",
                 "--num_classes", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "blue\\nring" in err, err


@pytest.mark.parametrize("kind", ["too long", "symlink loop", "under a file"])
def test_a_torchvision_datasets_folder_is_checked_like_any_path(kind, tmp_path, capsys):
    path, why = _bad_path(kind, tmp_path)
    assert main([*FAST, "--baseline", "--data_dir", f"torchvision:CIFAR10:{path}",
                 "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --data_dir") and why in err, err


def test_a_run_may_write_beside_a_torchvision_datasets_files(tmp_path, monkeypatch, capsys):
    """torchvision's readers open named files, never a folder of class folders: runs kept beside them (the usual
    ``torchvision:CIFAR10:.``) cannot become part of the data."""
    skip_md5_check(monkeypatch)
    FAKES["CIFAR10"](tmp_path / "cifar")
    assert main([*FAST, "--baseline", "--data_dir", f"torchvision:CIFAR10:{tmp_path / 'cifar'}",
                 "--output_dir", str(tmp_path / "cifar" / "runs"), "--image_size", "32"]) == 0, capsys.readouterr().err


def test_a_class_folder_kd_may_not_list_is_named_not_taken_for_an_empty_one(tiny_data, tmp_path, monkeypatch,
                                                                            capsys):
    """As root no folder denies reading, so the denial is simulated where the walk lists the folder."""
    locked = tiny_data / "train" / "blue_ring"
    listing = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main([*FAST, "--baseline", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --data_dir: cannot list {locked}: Permission denied"


@pytest.mark.parametrize("kind", ["folder", "fifo"])
@pytest.mark.parametrize("flag", ["--config", "--flags_file"])
def test_a_preset_or_flags_file_that_is_no_file_says_what_it_is(kind, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if kind == "folder":
        (tmp_path / "preset").mkdir()
    else:
        os.mkfifo(tmp_path / "preset")
    args = ["--flags_file", "none", "--config", "preset"] if flag == "--config" else ["--flags_file", "preset"]
    assert main(args) == 2
    what = "a folder" if kind == "folder" else "not a regular file (a pipe, a device or a socket)"
    assert capsys.readouterr().err.strip().endswith(f"'preset' is {what}, not a file of flags")
