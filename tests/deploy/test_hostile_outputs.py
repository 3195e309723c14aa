"""Hostile conditions where kd writes: full disks, read-only folders, a small $TMPDIR, kills mid-write, and
checkpoints or exports that are broken, stale or not what they claim to be."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from kd.train.checkpoint_io import AtomicCheckpointIO
from conftest import FAST
from kd.cli import main
from kd.data.transforms import normalize, val_transform
from kd.data.sources.demo import DEMO_HUES, DEMO_SHAPES
from kd.errors import KDError
from kd.deploy.export import export_model
from kd.files import WriteError, check_writable, write_text, written_atomically
from kd.models.build import build_model, load_network


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_names_the_destination_and_leaves_the_old_file_alone(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(WriteError, match=rf"^cannot write {path}: No space left on device$") as caught:
        with written_atomically(path) as tmp:
            tmp.write_text("half")
            _full_disk()
    assert isinstance(caught.value, OSError) and isinstance(caught.value, KDError)  # races caught as OSError
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and path.read_text() == "old"


def test_write_text_on_a_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(KDError, match=rf"^cannot write {tmp_path / 'a.yaml'}: No space left on device$"):
        write_text(tmp_path / "a.yaml", "x")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_in_the_block_pass_unchanged_and_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="not a write"):
        with written_atomically(tmp_path / "f") as tmp:
            tmp.write_text("x")
            raise ValueError("not a write")
    assert list(tmp_path.iterdir()) == []


def test_the_leftover_of_a_writer_killed_mid_write_is_removed_by_the_next_write(tmp_path):
    dead = tmp_path / f".last.ckpt.tmp-{socket.gethostname()}-999999999"  # no such process
    running = tmp_path / f".last.ckpt.tmp-{socket.gethostname()}-1"  # init: still running, maybe writing
    dead.write_bytes(b"partial")
    running.write_bytes(b"partial")
    write_text(tmp_path / "last.ckpt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "last.ckpt"])


def _checkpoint() -> dict:
    return {"state_dict": {"model.w": torch.arange(4.0)}, "epoch": 3}


def test_checkpoints_are_staged_beside_their_destination_not_in_tmpdir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_tmpdir"))  # a $TMPDIR that cannot take a file
    path = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    assert torch.load(path)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_write_on_a_full_disk_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    before = path.read_bytes()
    monkeypatch.setattr(Path, "write_bytes", lambda tmp, data: (tmp.open("wb").write(data[:10]), _full_disk()))
    with pytest.raises(WriteError, match=rf"^cannot write {path}: No space left on device$"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _not_writable(*folders: Path):
    """os.access as for a user who may not write into ``folders`` (tests may run as root, whom chmod does not stop)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        return False if Path(path) in folders and mode & os.W_OK else real(path, mode, *args, **kwargs)
    return access


def test_a_read_only_stage_folder_is_refused_before_a_run_writes_anything(tmp_path, monkeypatch):
    stage = tmp_path / "kd" / "baseline"
    stage.mkdir(parents=True)
    monkeypatch.setattr(os, "access", _not_writable(stage))
    with pytest.raises(KDError, match=rf"^--output_dir: cannot write into {stage}: the folder is not writable$"):
        check_writable(tmp_path / "kd", "--output_dir")


# --evaluate and --export of checkpoints written here by hand: a kd checkpoint needs no training to make.
CLASSES = sorted(f"{hue}_{shape}" for hue in DEMO_HUES for shape in DEMO_SHAPES)  # as in the tiny_data fixture
SIZE = ["--image_size", "16", "--num_workers", "0", "--accelerator", "cpu", "--flags_file", "none"]


def _kd_checkpoint(path: Path, seed: int = 0, arch: str = "cnn_tiny", classes: list[str] = CLASSES,
                   edit=None) -> Path:
    """A checkpoint as kd's training writes it (``model.*`` weights and hyper-parameters), of random weights."""
    torch.manual_seed(seed)
    state = build_model(arch, len(classes)).state_dict()
    if edit:
        edit(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"arch": arch, "class_names": classes, "image_size": 16, "augment": "imagenet"}},
               path)
    return path


def _evaluate(data: Path, out: Path, checkpoint: Path, *flags: str) -> list[str]:
    return ["--data_dir", str(data), "--output_dir", str(out), *SIZE, "--evaluate", str(checkpoint), *flags]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return _kd_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")


def _preprocess(image: Image.Image, meta: dict[str, str]) -> np.ndarray:
    """An image as the exported file's metadata says, by PIL and numpy alone (as a deployment without kd would)."""
    size = int(meta["image_size"])
    short = round(size * 256 / 224)
    width, height = image.size
    scale = short / min(width, height)
    image = image.convert("RGB").resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    pixels = (pixels - np.array(json.loads(meta["mean"]))) / np.array(json.loads(meta["std"]))
    return pixels.transpose(2, 0, 1).astype(np.float32)  # HWC -> CHW


def test_an_onnx_export_describes_itself_and_runs_as_printed(tiny_data, tmp_path, checkpoint, capsys):
    assert main(_evaluate(tiny_data, tmp_path / "out", checkpoint, "--export", "onnx")) == 0
    out = capsys.readouterr().out
    path = checkpoint.with_suffix(".onnx")
    assert f"onnxruntime.InferenceSession({str(path)!r})" in out and "{'images': x}" in out
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES and meta["image_size"] == "16" and meta["arch"] == "cnn_tiny"
    assert meta["input"] == "float32 NCHW (N, 3, 16, 16), RGB" and f"x: {meta['input']}; {meta['preprocessing']}" in out
    images = sorted((tiny_data / "val").glob("*/*.png"))
    x = np.stack([_preprocess(Image.open(p), meta) for p in images])
    logits = onnxruntime.InferenceSession(str(path)).run(None, {"images": x})[0]
    model = load_network(checkpoint, "cnn_tiny", CLASSES, 16).eval()
    kd_input = torch.stack([normalize(val_transform(16)(Image.open(p)).unsqueeze(0))[0] for p in images])
    with torch.no_grad():
        expected = model(kd_input).numpy()
    assert np.abs(logits - expected).max() < 0.05  # PIL's and torchvision's resizing differ by a grey level or so
    predicted = [json.loads(meta["class_names"])[i] for i in logits.argmax(1)]
    assert predicted == [CLASSES[i] for i in expected.argmax(1)]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_torchscript_export_carries_the_same_metadata(tiny_data, tmp_path, checkpoint, capsys):
    assert main(_evaluate(tiny_data, tmp_path / "out", checkpoint, "--export", "torchscript")) == 0
    extra = {"kd.json": ""}
    torch.jit.load(str(checkpoint.with_suffix(".torchscript.pt")), _extra_files=extra)
    meta = json.loads(extra["kd.json"])
    assert json.loads(meta["class_names"]) == CLASSES and json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert "_extra_files=extra" in capsys.readouterr().out


@pytest.mark.parametrize("fmt, suffix", [pytest.param("onnx", ".onnx", marks=pytest.mark.slow),  # ~20 s
                                         ("torchscript", ".torchscript.pt")])
def test_an_export_of_a_checkpoint_that_changed_since_is_made_anew_and_the_earlier_kept(tiny_data, tmp_path, fmt,
                                                                                       suffix, checkpoint, capsys):
    flags = _evaluate(tiny_data, tmp_path / "out", checkpoint, "--export", fmt)
    assert main(flags) == 0
    path = checkpoint.with_suffix(suffix)
    first = path.read_bytes()
    assert main(flags) == 0
    assert f"already exported from this very best.ckpt: {path}" in capsys.readouterr().out
    _kd_checkpoint(checkpoint, seed=1)  # training resumed and went on: last.ckpt holds other weights
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert f"re-exported {path}: best.ckpt changed since it was exported (the earlier file is kept as " in out
    kept = [p for p in path.parent.iterdir() if p.name.startswith("best.old-")]
    assert len(kept) == 1 and kept[0].read_bytes() == first and path.read_bytes() != first
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["best.ckpt", path.name, kept[0].name])


def test_an_export_path_taken_by_a_folder_is_one_error(tiny_data, tmp_path, checkpoint, capsys):
    checkpoint.with_suffix(".onnx").mkdir()
    assert main(_evaluate(tiny_data, tmp_path / "out", checkpoint, "--export", "onnx")) == 2
    folder = checkpoint.with_suffix(".onnx")
    assert capsys.readouterr().err.strip() == (f"error: --export onnx: {folder} is a folder; the export needs a file "
                                               "name there")


def test_evaluate_names_the_tensor_that_holds_nan(tiny_data, tmp_path, capsys):
    def poison(state):
        state["fc.weight"][:3, :4] = math.nan
    path = _kd_checkpoint(tmp_path / "nan.ckpt", edit=poison)
    assert main(_evaluate(tiny_data, tmp_path / "out", path)) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (f"error: --evaluate: {path} is broken: fc.weight holds 12 NaN values; the run that saved "
                           "it diverged? evaluate an earlier checkpoint")
    assert "top-1" not in out and not (tmp_path / "out").exists()


def test_evaluate_warns_of_absurd_weights_and_still_evaluates(tiny_data, tmp_path, capsys):
    path = _kd_checkpoint(tmp_path / "big.ckpt", edit=lambda state: state["fc.bias"].fill_(4e12))
    assert main(_evaluate(tiny_data, tmp_path / "out", path)) == 0
    out, err = capsys.readouterr()
    assert "warning: --evaluate: " in err and "fc.bias holds values up to 4e+12 in magnitude" in err
    assert "top-1" in out


def test_evaluate_into_an_output_folder_it_cannot_create_prints_the_metrics_and_says_where(tiny_data, tmp_path,
                                                                                        checkpoint, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(_evaluate(tiny_data, tmp_path / "afile", checkpoint)) == 0
    out, err = capsys.readouterr()
    assert "top-1" in out and "confusion matrix" in out
    assert err.startswith(f"warning: --evaluate: cannot log to {tmp_path / 'afile' / 'kd' / 'evaluate'}")
    assert "Traceback" not in err and "tried to log" not in err and err.count("\n") == 1


def test_evaluate_on_a_disk_that_fills_under_tensorboards_writer_thread(tiny_data, tmp_path, checkpoint, capsys,
                                                                       monkeypatch):
    from tensorboard.summary.writer import record_writer
    monkeypatch.setattr(record_writer.RecordWriter, "write", _full_disk)
    assert main(_evaluate(tiny_data, tmp_path / "out", checkpoint)) == 0
    out, err = capsys.readouterr()
    assert "top-1" in out
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("warning: --evaluate: cannot log to ") and "No space left on device" in err


@pytest.mark.slow
def test_resume_into_a_read_only_checkpoint_folder_is_one_error_before_training(tiny_data, tmp_path, monkeypatch,
                                                                                  capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline"]
    assert main(flags) == 0
    run = tmp_path / "kd" / "baseline" / "version_0"
    (run / "result.json").unlink()  # as if it had been stopped before its end
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    monkeypatch.setattr(os, "access", _not_writable(run / "checkpoints"))
    assert main([*flags, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: baseline (seed 0): --output_dir: cannot write into {run / 'checkpoints'}: the folder is "
                   "not writable")
    assert {p: p.read_bytes() for p in before} == before  # and no epoch was trained for nothing
    assert not (run / "checkpoints" / "interrupted.ckpt").exists()


@pytest.mark.parametrize("key, value, what", [("image_size", "abc", "a positive whole number"),
                                              ("image_size", 0, "a positive whole number"),
                                              ("augment", "foo", "one of imagenet, cifar"),
                                              ("arch", 5, "a network name"),
                                              ("class_names", "blue", "a list of names")])
def test_evaluate_refuses_settings_kd_could_not_have_written(tmp_path, key, value, what, capsys):
    path = _kd_checkpoint(tmp_path / "edited.ckpt")
    saved = torch.load(path)
    saved["hyper_parameters"][key] = value
    torch.save(saved, path)
    assert main(_evaluate(tmp_path / "no_data_needed", tmp_path / "out", path)) == 2
    assert capsys.readouterr().err.strip() == (f"error: --evaluate: {path} records {key} {value!r}, not {what}; not a "
                                               "checkpoint kd wrote?")


def test_a_file_at_the_export_path_that_is_no_export_is_kept_beside_the_new_one(tiny_data, tmp_path, checkpoint,
                                                                             capsys):
    path = checkpoint.with_suffix(".torchscript.pt")
    notes = b"notes, not an export"
    path.write_bytes(notes)
    assert main(_evaluate(tiny_data, tmp_path / "out", checkpoint, "--export", "torchscript")) == 0
    kept = path.with_name(f"best.old-{hashlib.sha256(notes).hexdigest()[:8]}.torchscript.pt")
    assert kept.read_bytes() == notes
    assert f"no export) (the earlier file is kept as {kept.name})" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_on_a_full_disk_names_the_export_and_leaves_nothing(tmp_path, fmt, monkeypatch):
    monkeypatch.setattr(onnx if fmt == "onnx" else torch.jit, "save", _full_disk)
    path = tmp_path / f"best.{fmt}"
    with pytest.raises(WriteError, match=rf"^--export {fmt}: cannot write {path}: No space left on device$"):
        export_model(build_model("cnn_tiny", 3), fmt, path, 16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_at_result_json_is_one_line_naming_it_and_keeps_the_checkpoints(tiny_data, tmp_path, monkeypatch,
                                                                                    capsys):
    write_text_ = Path.write_text

    def full_at_result(path, *args, **kwargs):
        return _full_disk() if path.name.startswith(".result.json") else write_text_(path, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_at_result)
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline"]) == 2
    run = tmp_path / "kd" / "baseline" / "version_0"
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {run / 'result.json'}: No space left on device"
    kept = ["checkpoints", "config.yaml", "hparams.yaml", "training.lock"]  # no .result.json.tmp-*
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events.")) == kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
