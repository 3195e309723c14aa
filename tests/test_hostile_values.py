"""Values a flag accepts but a run cannot use, modes that would drop each other, images and class names that decode
or print wrong, and user code that exits: each one line naming the flag or file, never a traceback or silence."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST
from kd.cli import main
from kd.data.images import decode_resized, load_rgb
from kd.deploy.metrics import Evaluation, format_evaluation
from kd.tables import text_table


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("flag, value", [("--lr", "1e39"), ("--lr", "1e308"), ("--weight_decay", "1e300")])
def test_optimiser_values_a_float32_weight_cannot_hold_are_refused(flag, value, tiny_data, tmp_path, capsys):
    code, err = _run([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline",
                      flag, value], capsys)
    assert code == 2 and "\n" not in err and err.startswith(f"error: command line: {flag} must be") and "float32" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("precision", ["16-true", "bf16-true", "64-true", "64"])
def test_true_precision_modes_are_refused_naming_the_mixed_ones(precision, tiny_data, tmp_path, capsys):
    code, err = _run([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline",
                      "--precision", precision], capsys)
    assert code == 2 and "\n" not in err and "--precision must be 32-true, 16-mixed or bf16-mixed" in err, err
    assert not any(tmp_path.iterdir())  # no empty version_N


NAN_LOSS = """
import torch

def explode(student_logits, teacher_logits, labels):
    return (student_logits * 0).sum() / torch.zeros(())
"""


def test_a_stage_that_fails_before_saving_anything_leaves_no_version_folder(tiny_data, tmp_path, capsys):
    (tmp_path / "nan_loss.py").write_text(NAN_LOSS)
    out = tmp_path / "out"
    earlier = out / "kd" / "distill" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("someone's earlier work")
    code, err = _run([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher", "--distill",
                      "--kd_loss", f"{tmp_path / 'nan_loss.py'}:explode"], capsys)
    assert code == 2 and "the loss became nan" in err and "saved no checkpoint" in err, err
    assert sorted(p.name for p in (out / "kd" / "distill").iterdir()) == ["version_0"]  # version_1 removed
    assert (earlier / "notes.txt").read_text() == "someone's earlier work"
    assert list((out / "kd" / "teacher" / "version_0" / "checkpoints").glob("*.ckpt"))  # finished work kept


# ------------------------------------------------------------------------------ images and class names


def test_a_float_tiff_decodes_to_the_values_it_means(tmp_path):
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[0, 0] = np.nan
    Image.fromarray(pixels, "F").save(tmp_path / "float.tif")
    rgb = np.asarray(load_rgb(str(tmp_path / "float.tif")))
    assert rgb.shape == (8, 8, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert abs(int(rgb[4, 4, 0]) - round(pixels[4, 4] * 255)) <= 1
    assert decode_resized(str(tmp_path / "float.tif"), 4).mean() > 100  # not all black
    Image.fromarray(pixels[1:] * 200, "F").save(tmp_path / "float255.tif")  # a float image already in 0..255
    assert np.asarray(load_rgb(str(tmp_path / "float255.tif"))).max() == 200


def test_class_names_with_line_breaks_stay_on_their_row():
    assert text_table(("class",), [("cat\ndog",), ("tab\there",)]).splitlines() == [
        "class", "---------", "cat\\ndog", "tab\\there"]
    assert text_table(("a",), [("x|y",)], markdown=True).splitlines()[2] == "| x\\|y |"
    evaluation = Evaluation(["cat\ndog", "bird"], 50.0, 100.0, [100.0, 0.0], torch.tensor([[1, 0], [1, 0]]), 2)
    text = format_evaluation(evaluation)
    assert "cat\\ndog" in text and len(text.splitlines()) == 12  # as with any two names


def test_evaluate_prints_a_class_named_with_a_newline_on_one_row(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    for split in ("train", "val"):
        (data / split / "blue_ring").rename(data / split / "blue\nring")
    assert main([*FAST, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--baseline"]) == 0
    checkpoint = next((tmp_path / "out" / "kd" / "baseline").rglob("best.ckpt"))
    capsys.readouterr()
    assert main([*FAST, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"),
                 "--evaluate", str(checkpoint)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "blue" in line and "ring" in line]
    assert rows and all("blue\\nring" in row for row in rows) and len(rows) == 2  # per class and confusion


# ------------------------------------------------------------------------------ modes and user code


@pytest.mark.parametrize("mode, other", [(["--evaluate", "x.ckpt"], "--train_teacher"),
                                         (["--evaluate", "x.ckpt"], "--distill"),
                                         (["--report", "runs"], "--baseline"),
                                         (["--report", "runs"], "--resume"),
                                         (["--evaluate", "x.ckpt"], "--report")])
def test_modes_that_would_drop_a_flag_are_refused_naming_both(mode, other, tiny_data, tmp_path, capsys):
    extra = [other, "runs"] if other == "--report" else [other]
    code, err = _run([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), *mode, *extra], capsys)
    assert code == 2 and "\n" not in err and mode[0] in err and other in err and "both given" in err, err
    assert not any(tmp_path.iterdir())


def test_a_mode_on_the_command_line_wins_over_stages_in_the_flags_file(tiny_data, tmp_path, capsys):
    """The checkout's commandline_args.txt trains: `experiment.py --evaluate best.ckpt` must still evaluate."""
    flags_file = tmp_path / "flags.txt"
    flags_file.write_text("--train_teacher\n--baseline\n")
    code, err = _run([*FAST, "--flags_file", str(flags_file), "--data_dir", str(tiny_data),
                      "--output_dir", str(tmp_path), "--evaluate", str(tmp_path / "missing.ckpt")], capsys)
    assert code == 2 and "does not exist" in err and "both given" not in err, err
    flags_file.write_text("--evaluate x.ckpt\n")
    code, err = _run([*FAST, "--flags_file", str(flags_file), "--data_dir", str(tiny_data),
                      "--output_dir", str(tmp_path), "--baseline"], capsys)
    assert code == 2 and f"--evaluate ({flags_file}:1) and --baseline (command line) both given" in err, err


EXITING = """
import sys
import torch

class Net(torch.nn.Module):
    def __init__(self, num_classes):
        sys.exit(0)

class Loss:
    def __init__(self):
        sys.exit(0)

class Runs(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, x):
        sys.exit(0)
"""


@pytest.mark.parametrize("flags, named", [(["--baseline", "--student_arch", "{code}:Net"], "{code}:Net: building it"),
                                          (["--train_teacher", "--distill", "--kd_loss", "{code}:Loss"],
                                           "--kd_loss {code}:Loss: building it"),
                                          (["--baseline", "--student_arch", "{code}:Runs"],
                                           "--student_arch {code}:Runs"),
                                          (["--baseline", "--student_arch", "{tmp}/at_import.py:Net"],
                                           "importing {tmp}/at_import.py")])
def test_user_code_that_calls_sys_exit_is_an_error_naming_the_file(flags, named, tiny_data, tmp_path, capsys):
    code_file = tmp_path / "exiting.py"
    code_file.write_text(EXITING)
    (tmp_path / "at_import.py").write_text("import sys\nsys.exit(0)\n")
    fill = {"code": code_file, "tmp": tmp_path}
    code, err = _run([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"),
                      *(f.format(**fill) for f in flags)], capsys)
    assert code == 2 and "\n" not in err and named.format(**fill) in err and "sys.exit(0)" in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("version_*"))


def test_report_paths_are_checked_before_any_is_read(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, err = _run(["--flags_file", "none", "--report", str(tmp_path), str(loop)], capsys)
    assert code == 2 and err == f"error: --report: cannot use {loop}: Too many levels of symbolic links", err
    assert Path(tmp_path).exists()


def test_a_loss_that_calls_sys_exit_while_running_is_an_error_not_a_quiet_success(tiny_data, tmp_path, capsys):
    (tmp_path / "exit_call.py").write_text("import sys\n\ndef boom(student_logits, teacher_logits, labels):\n"
                                           "    sys.exit(0)\n")
    code, err = _run([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--train_teacher",
                      "--distill", "--kd_loss", f"{tmp_path / 'exit_call.py'}:boom"], capsys)
    assert code == 2 and "\n" not in err and "called sys.exit(0)" in err, err


@pytest.mark.parametrize("flags, part", [
    (["--accelerator", "cpu", "--devices", "abc"], "--devices abc"),
    (["--accelerator", "tpu"], "torch_xla"),  # an accelerator whose library is missing
])
def test_hardware_lightning_refuses_with_an_exception_of_its_own_is_one_line(flags, part, tiny_data, tmp_path,
                                                                               capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --accelerator") and part in err and "\n" not in err, err


def test_a_cache_path_that_is_a_file_is_refused_before_anything_trains(tiny_data, tmp_path, capsys):
    (tmp_path / "w.pt").write_text("weights, not a cache")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--baseline",
                 "--image_cache", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --image_cache: {tmp_path / 'w.pt'} is a file, not a folder for the cache"
    assert not (tmp_path / "out").exists()
