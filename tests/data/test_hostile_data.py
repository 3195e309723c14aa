"""Hostile data: lying or damaged files on every path that reads them (images, caches, the demo), odd names
and odd datasets. Each case is a one-line KDError naming the file, a skip, or a clean recovery."""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST
from kd.cli import main
from kd.config import Config
from kd.data.loaders import make_datamodule
from kd.data.sources.demo import make_demo_dataset
from kd.data.sources.folder import _split, scan_image_folder
from kd.errors import KDError
from kd.data.image_cache import ImageCache, image_cache_key
from kd.data.images import load_rgb
from kd.models.build import build_model
from kd.train.teacher_cache import TeacherCache, cache_key


def _bmp_claiming(width: int, height: int) -> bytes:
    """A tiny BMP whose header claims ``width`` x ``height`` pixels (its pixel data is 2 x 2)."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _blank_png(width: int, height: int) -> bytes:
    """A real, complete 1-bit PNG of ``width`` x ``height`` black pixels (a few KB however large)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _data(root: Path, **flags) -> object:
    return make_datamodule(Config(data_dir=str(root), image_size=16, batch_size=4, **flags))


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    """A copy of the tiny dataset to break."""
    return shutil.copytree(tiny_data, tmp_path / "data")


@pytest.mark.parametrize("content", [_bmp_claiming(17300, 17300), _blank_png(20000, 20000)],
                         ids=["lying_bmp_header", "real_20000px_png"])
def test_an_image_over_pils_pixel_limit_is_named_and_skipped(data, content):
    bomb = data / "train" / "red_ring" / "huge.bmp"
    bomb.write_bytes(content)
    with pytest.raises(KDError, match=f"--data_dir: cannot read image {bomb} .*exceeds limit.*--skip_bad_images"):
        _data(data)
    with pytest.raises(KDError, match=f"cannot read image {bomb}: .*decompression bomb"):
        load_rgb(str(bomb))
    skipped = _data(data, skip_bad_images=True).skipped
    assert [path for path, _ in skipped] == [str(bomb)] and "exceeds limit" in skipped[0][1]


def _non_utf8_names(data: Path) -> tuple[str, str]:
    """Rename one image to a Latin-1 name and add an unreadable one named with a stray byte; their str paths."""
    folder = os.fsencode(data / "train" / "red_ring")
    good, bad = os.fsdecode(folder + b"/caf\xe9.png"), os.fsdecode(folder + b"/bad\xff.png")
    os.rename(data / "train" / "red_ring" / "0000.png", good)
    Path(bad).write_bytes(b"not an image")
    return good, bad


def test_file_names_that_are_not_utf8_key_the_caches_and_are_listed_as_skipped(data):
    good, bad = _non_utf8_names(data)
    module = _data(data, skip_bad_images=True)
    train = module.layout.train
    assert cache_key([], {"train": train, "val": module.layout.val}, {}) and image_cache_key(train, 18)
    [(path, reason)] = module.skipped
    assert path == f"{data}/train/red_ring/bad\\xff.png" and path.encode() and reason
    assert train.describe([path for path, _ in train.samples].index(good)).endswith("caf\\xe9.png")


@pytest.mark.slow
def test_a_cached_distillation_runs_on_non_utf8_file_names(data, tmp_path):
    _non_utf8_names(data)
    out = tmp_path / "runs"
    assert main([*FAST, "--data_dir", str(data), "--output_dir", str(out), "--train_teacher", "--distill",
                 "--teacher_cache", str(tmp_path / "cache"), "--skip_bad_images"]) == 0
    listed = (out / "kd" / "distill" / "version_0" / "skipped_images.txt").read_text()
    assert listed.startswith(f"{data}/train/red_ring/bad\\xff.png\t")


def _dead_pid() -> int:
    """The pid of a process that has exited (the kernel does not reuse it at once)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def alive():
    """A process that is running for the length of the test (and no longer)."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _leftovers(folder: Path, target: str, alive: subprocess.Popen) -> dict[str, Path]:
    """Temporaries of ``target`` as killed writers leave them: this machine's dead pid, a live pid, another machine."""
    names = {"dead": f"{socket.gethostname()}-{_dead_pid()}", "live": f"{socket.gethostname()}-{alive.pid}",
             "elsewhere": f"other-host-{_dead_pid()}"}
    paths = {}
    for kind, owner in names.items():
        paths[kind] = folder / f".{target}.tmp-{owner}"
        (paths[kind] / "part").mkdir(parents=True)
        (paths[kind] / "part" / "0000.png").write_bytes(b"half")
    return paths


def _only_the_dead_one_is_gone(paths: dict[str, Path]) -> None:
    assert not paths["dead"].exists() and paths["live"].is_dir() and paths["elsewhere"].is_dir()


def test_a_killed_demo_generation_is_cleaned_up_on_the_next_start(tmp_path, alive, capsys):
    paths = _leftovers(tmp_path, "demo_data", alive)
    make_demo_dataset(tmp_path / "demo_data", train_per_class=1, val_per_class=1, image_size=8)
    _only_the_dead_one_is_gone(paths)
    assert f"removed 1 unfinished demo dataset(s) left by a killed run, e.g. {paths['dead']}" in capsys.readouterr().err


def test_a_killed_image_cache_build_is_cleaned_up_by_the_next_build(tiny_data, tmp_path, alive):
    paths = _leftovers(tmp_path / "cache", "0" * 64, alive)  # a build under another key: other data, another size
    ImageCache.build(scan_image_folder(tiny_data).val, 8, tmp_path / "cache")
    _only_the_dead_one_is_gone(paths)


def test_a_killed_teacher_cache_epoch_is_cleaned_up_by_the_next_save(tmp_path, alive):
    paths = _leftovers(tmp_path / "other-key", "epoch_0003", alive)
    cache = TeacherCache(tmp_path, "key", {"train": 2, "val": 2}, num_classes=3)
    cache.record(None, torch.arange(2), torch.randn(2, 3))
    cache.commit(None)
    _only_the_dead_one_is_gone(paths)
    assert cache.complete(None)


@pytest.mark.parametrize("flags, hint", [
    (["--evaluate", "student.ckpt"], "run it again: "),
    (["--report", "runs/a", "runs/b"], "run it again: "),
    (["--baseline"], "continue with: "),
])
def test_the_interrupt_hint_adds_resume_only_to_training(flags, hint, monkeypatch, capsys):
    def interrupted(*args) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr("kd.deploy.commands.evaluate_checkpoint", interrupted)
    monkeypatch.setattr("kd.run.summary.compare_runs", interrupted)
    monkeypatch.setattr("kd.run.runner.run_experiment", interrupted)
    assert main(["--flags_file", "none", *flags]) == 130
    message = capsys.readouterr().err.strip()
    assert hint in message and message.endswith(" ".join(flags) + (" --resume" if "--baseline" in flags else ""))


def _cache(root: Path, **options) -> TeacherCache:
    return TeacherCache(root, "key", {"train": 4, "val": 2}, num_classes=3, **options)


@pytest.mark.parametrize("topk", [None, 2])
def test_logits_float16_cannot_hold_are_stored_as_float32(tmp_path, topk, capsys):
    logits = torch.tensor([[471471.0, -1.5, 3.25], [7.0, 8.0, 9.0]])
    cache = _cache(tmp_path, topk=topk)
    assert torch.equal(cache.record(None, torch.tensor([1, 0]), logits).topk(1).values, logits.topk(1).values)
    assert "logits reach 471471, more than float16 holds" in capsys.readouterr().err
    cache.commit(None)
    stored = _cache(tmp_path, topk=topk).lookup(None, torch.tensor([1, 0]))
    assert torch.isfinite(stored).all() and stored[0, 0] == 471471.0 and stored[1, 2] == 9.0
    if topk is None:
        assert torch.equal(stored, logits)


def test_float16_keeps_ordinary_logits(tmp_path, capsys):
    cache = _cache(tmp_path)
    cache.record(None, torch.tensor([0, 1]), torch.tensor([[60.0, -1.5, 3.3], [7.0, 8.0, 9.0]]))
    cache.commit(None)
    assert np.load(tmp_path / "key" / "val" / "values.npy").dtype == np.float16 and not capsys.readouterr().err


def _saved_epoch(root: Path) -> Path:
    cache = _cache(root)
    cache.record(0, torch.arange(4), torch.randn(4, 3))
    cache.commit(0)
    return root / "key" / "epoch_0000"


@pytest.mark.parametrize("damage, reason", [
    (lambda folder: (folder / "values.npy").write_bytes(b"\x93NUMPY garbage"), "is damaged"),
    (lambda folder: (folder / "filled.npy").write_bytes((folder / "filled.npy").read_bytes()[:70]), "is damaged"),
    (lambda folder: np.save(folder / "values.npy", np.zeros((4, 7), np.float16)), r"values.npy has shape \(4, 7\)"),
    (lambda folder: (folder / "values.npy").unlink(), "is damaged"),
    (lambda folder: np.save(folder / "values.npy", np.full((4, 3), np.inf, np.float16)), "infinite or NaN logits"),
])
def test_a_damaged_teacher_cache_epoch_is_named_with_the_fix(tmp_path, damage, reason):
    folder = _saved_epoch(tmp_path)
    damage(folder)
    with pytest.raises(KDError, match=f"--teacher_cache: {folder} .*{reason}.*remove"):
        cache = _cache(tmp_path)
        cache.missing(1)
        cache.lookup(0, torch.arange(4))


@pytest.mark.slow
def test_a_teacher_with_logits_past_float16_distills_through_the_default_cache(tiny_data, tmp_path, capsys):
    teacher = build_model("cnn_tiny", 12)
    with torch.no_grad():
        for parameter in list(teacher.parameters())[-2:]:  # the classifier: logits of about 1e6
            parameter.mul_(1e6)
    torch.save(teacher.state_dict(), tmp_path / "loud.pt")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "runs"), "--distill",
                 "--teacher_checkpoint", str(tmp_path / "loud.pt"), "--teacher_cache", str(tmp_path / "cache")]) == 0
    assert "this cache stores them as float32" in capsys.readouterr().err


def _train_paths(root: Path) -> list[str]:
    return [path for path, _ in _data(root).layout.train.samples]


def test_a_symlink_loop_repeats_no_image_and_brings_in_no_other_class(data, tiny_data):
    (data / "train" / "red_ring" / "up").symlink_to("..")
    assert _train_paths(data) == [path.replace(str(tiny_data), str(data)) for path in _train_paths(tiny_data)]


def test_a_linked_class_folder_is_read(data, tmp_path):
    elsewhere = shutil.move(data / "train" / "blue_ring", tmp_path / "elsewhere")
    (data / "train" / "blue_ring").symlink_to(elsewhere)
    assert len([path for path in _train_paths(data) if "/blue_ring/" in path]) == 6


def test_hidden_files_and_folders_are_neither_images_nor_classes(data):
    (data / "train" / "red_ring" / "._0000.png").write_bytes(b"\0\5\x16\7 AppleDouble")  # macOS's resource forks
    shutil.copytree(data / "train" / "red_ring", data / "train" / ".ipynb_checkpoints")
    (data / "val" / "blue_ring" / ".cache").mkdir()
    (data / "val" / "blue_ring" / ".cache" / "0000.png").write_bytes(b"stale")
    module = _data(data)
    assert len(module.classes) == 12 and len(module.layout.train) == 12 * 6 and len(module.layout.val) == 12 * 3


@pytest.mark.parametrize("make", [os.mkfifo, lambda path: os.symlink("/dev/zero", path)], ids=["fifo", "device"])
def test_a_pipe_or_device_named_like_an_image_is_a_bad_image_not_a_hang(data, make):
    odd = data / "train" / "red_ring" / "odd.png"
    make(odd)
    with pytest.raises(KDError, match=f"cannot read image {odd} \\(not a regular file"):
        _data(data)
    assert [path for path, _ in _data(data, skip_bad_images=True).skipped] == [str(odd)]


@pytest.mark.parametrize("damage", [
    lambda folder: (folder / "index.npy").write_bytes((folder / "index.npy").read_bytes()[:100]),
    lambda folder: np.save(folder / "index.npy", np.array([[0, 99, 99]] * 36)),
], ids=["truncated_index", "index_past_the_pixels"])
def test_a_damaged_image_cache_is_rebuilt_not_read(tiny_data, tmp_path, damage):
    split = scan_image_folder(tiny_data).val
    first = ImageCache.build(split, 8, tmp_path / "cache")
    expected = [first[i] for i in range(len(first))]
    damage(first.folder)
    again = ImageCache.build(split, 8, tmp_path / "cache")
    assert all(torch.equal(pixels, again[i]) for i, pixels in enumerate(expected))


def test_damaged_demo_settings_are_a_one_line_error(tmp_path):
    root = make_demo_dataset(tmp_path / "demo_data", train_per_class=1, val_per_class=1, image_size=8)
    for damage in (b"{garbage", b"\xff\xfe"):
        (root / "demo.json").write_bytes(damage)
        with pytest.raises(KDError, match=f"--data_dir demo: {root} exists but is not this demo dataset"):
            make_demo_dataset(root, train_per_class=1, val_per_class=1, image_size=8)


def test_a_single_folder_of_many_classes_splits_in_one_pass(tmp_path):
    classes = [f"c{i:05d}" for i in range(20000)]
    samples = [(f"{name}/{j}.png", label) for label, name in enumerate(classes) for j in range(3)]
    start = time.perf_counter()
    train, val = _split(samples, classes, 0.2)
    assert time.perf_counter() - start < 5  # a filter per class compared 1.2e9 labels (about a minute)
    assert len(val) == 20000 and sorted(train + val) == sorted(samples)
    assert [label for _, label in val] == list(range(20000))


def test_a_dataset_of_one_class_is_refused_before_training(data):
    for split in ("train", "val"):
        for folder in sorted((data / split).iterdir())[1:]:
            shutil.rmtree(folder)
    with pytest.raises(KDError, match=f"--data_dir {data} holds one class \\(blue_circle\\): a classifier needs two"):
        _data(data)
