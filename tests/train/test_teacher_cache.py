"""The teacher-output cache: exact replay, keys that never mix teachers or data up, atomic epochs, top-k."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import kd.train.stage
from conftest import FAST
from kd.cli import main
from kd.data.sources.folder import FileSplit
from kd.train.teacher_cache import TeacherCache, cache_key


def _teacher(tiny_data: Path, out: Path) -> Path:
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher",
                 "--teacher_arch", "cnn_small"]) == 0
    return out / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _teacher(tiny_data, tmp_path_factory.mktemp("teacher"))


def _distill(tiny_data: Path, teacher: Path, out: Path, *flags: str) -> int:
    return main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--distill", "--teacher_arch",
                 "cnn_small", "--teacher_checkpoint", str(teacher), "--epochs", "2", "--batch_size", "8", *flags])


def _run(out: Path) -> tuple[dict, dict[str, torch.Tensor], list[float]]:
    """A distill stage's result.json, its last.ckpt weights and its logged training losses."""
    stage = out / "kd" / "distill" / "version_0"
    result = json.loads((stage / "result.json").read_text())
    weights = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]
    events = EventAccumulator(str(stage), size_guidance={"scalars": 0})
    events.Reload()
    return result, weights, [e.value for tag in ("train/loss_step", "train/loss_epoch") for e in events.Scalars(tag)]


@pytest.mark.slow
def test_cached_run_equals_online_run_and_never_loads_the_teacher(tiny_data, teacher, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    float32 = ["--teacher_cache_dtype", "float32"]
    assert _distill(tiny_data, teacher, tmp_path / "online") == 0
    assert _distill(tiny_data, teacher, tmp_path / "filling", "--teacher_cache", cache, *float32) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache holds every epoch")

    monkeypatch.setattr(kd.train.stage, "load_network", refuse)  # every teacher is loaded there
    assert _distill(tiny_data, teacher, tmp_path / "cached", "--teacher_cache", cache, *float32,
                    "--teacher_cache_only") == 0
    online, filling, cached = (_run(tmp_path / name) for name in ("online", "filling", "cached"))
    for result, weights, losses in (filling, cached):
        assert result["val_top1"] == online[0]["val_top1"]
        assert losses == online[2] and len(losses) == 4  # a logged step and the mean of each epoch
        assert weights.keys() == online[1].keys()
        for key, value in online[1].items():
            assert torch.equal(weights[key], value), key
    folders = list(Path(cache).iterdir())
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["epoch_0000", "epoch_0001", "val"]


def test_other_seed_or_teacher_gets_its_own_cache(tiny_data, teacher, tmp_path, capsys):
    cache = tmp_path / "cache"
    one = ["--teacher_cache", str(cache), "--epochs", "1"]
    assert _distill(tiny_data, teacher, tmp_path / "a", *one) == 0
    capsys.readouterr()
    assert _distill(tiny_data, teacher, tmp_path / "b", *one, "--teacher_cache_only", "--seed", "1") == 2
    assert "--teacher_cache_only:" in capsys.readouterr().err
    other = _teacher(tiny_data, tmp_path / "other")  # same architecture and data, other weights
    capsys.readouterr()
    assert _distill(tiny_data, other, tmp_path / "c", *one, "--teacher_cache_only") == 2
    assert "lacks val, epoch_0000 for this teacher, data, transforms and seed" in capsys.readouterr().err
    assert _distill(tiny_data, teacher, tmp_path / "d", *one, "--teacher_cache_only") == 0
    assert len(list(cache.iterdir())) == 1


def _cache(tmp_path: Path, **options) -> TeacherCache:
    return TeacherCache(tmp_path, "key", {"train": 6, "val": 2}, num_classes=5, **options)


def test_an_epoch_is_saved_only_when_committed(tmp_path):
    cache = _cache(tmp_path, dtype="float32")
    logits = torch.randn(6, 5)
    cache.record(0, torch.arange(4), logits[:4])
    assert cache.lookup(0, torch.arange(2)) is None and not cache.has(0)  # an unfinished epoch stores nothing
    assert not (tmp_path / "key").exists()
    cache.record(0, torch.tensor([4, 5]), logits[4:])
    cache.commit(0)
    assert cache.has(0) and cache.missing(1) == ["val"]
    torch.testing.assert_close(cache.lookup(0, torch.tensor([5, 0])), logits[[5, 0]], rtol=0, atol=0)
    reopened = _cache(tmp_path, dtype="float32")
    torch.testing.assert_close(reopened.lookup(0, torch.tensor([3])), logits[[3]], rtol=0, atol=0)


def test_rows_never_recorded_are_not_served(tmp_path):
    """A sample dropped from an epoch (drop_last) is computed online, never read as zeros."""
    cache = _cache(tmp_path)
    cache.record(0, torch.arange(5), torch.randn(5, 5))
    cache.commit(0)
    assert cache.lookup(0, torch.tensor([0, 5])) is None
    assert cache.lookup(0, torch.tensor([0, 4])) is not None


def test_float16_halves_the_size_and_stays_close(tmp_path):
    logits = torch.randn(200, 10) * 5
    sizes = {}
    for dtype in ("float16", "float32"):
        cache = TeacherCache(tmp_path, dtype, {"train": 200, "val": 2}, 10, dtype)
        cache.record(0, torch.arange(200), logits)
        cache.commit(0)
        torch.testing.assert_close(cache.lookup(0, torch.arange(200)), logits, rtol=1e-3, atol=1e-2)
        sizes[dtype] = cache.nbytes()
    assert sizes["float16"] < 0.6 * sizes["float32"]


def test_topk_keeps_the_largest_logits_and_the_tail_probability(tmp_path):
    cache = _cache(tmp_path, dtype="float32", topk=2)
    logits = torch.randn(6, 5, dtype=torch.float64).float() * 3
    cache.record(0, torch.arange(6), logits)
    cache.commit(0)
    restored = cache.lookup(0, torch.arange(6))
    top = logits.topk(2, dim=1)
    assert torch.equal(restored.gather(1, top.indices), top.values)
    tail = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top.indices, False)
    torch.testing.assert_close(restored.softmax(1)[tail].view(6, 3).sum(1), logits.softmax(1)[tail].view(6, 3).sum(1))
    torch.testing.assert_close(restored.softmax(1).gather(1, top.indices), logits.softmax(1).gather(1, top.indices))


def test_unwritable_cache_folder_is_one_line_error_before_training(tiny_data, teacher, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _distill(tiny_data, teacher, tmp_path / "out", "--teacher_cache", str(tmp_path / "file" / "cache")) == 2
    assert f"--teacher_cache: cannot use {tmp_path / 'file' / 'cache'}: " in capsys.readouterr().err
    assert not (tmp_path / "out" / "kd").exists()


@pytest.mark.slow
def test_each_seed_has_its_own_cache_and_the_filling_run_trains_on_the_stored_values(tiny_data, teacher, tmp_path,
                                                                                    monkeypatch):
    """float16 storage: the run that fills the cache must see the rounded logits later runs read back."""
    cache = str(tmp_path / "cache")
    assert _distill(tiny_data, teacher, tmp_path / "filling", "--teacher_cache", cache, "--seeds", "0", "1") == 0
    assert len(list(Path(cache).iterdir())) == 2  # crops differ by seed: so do the teacher's outputs

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache holds every epoch of both seeds")

    monkeypatch.setattr(kd.train.stage, "load_network", refuse)  # every teacher is loaded there
    assert _distill(tiny_data, teacher, tmp_path / "cached", "--teacher_cache", cache, "--seeds", "0", "1",
                    "--teacher_cache_only") == 0
    for version in ("version_0", "version_1"):
        filled, read = (json.loads((tmp_path / run / "kd" / "distill" / version / "result.json").read_text())
                        for run in ("filling", "cached"))
        assert filled["val_top1"] == read["val_top1"] and filled["seed"] == read["seed"]


def test_an_epoch_saved_with_a_gap_counts_as_missing(tmp_path):
    """A batch size that drops a last lone image leaves a row unfilled: such an epoch needs the teacher."""
    cache = _cache(tmp_path)
    cache.record(0, torch.arange(5), torch.randn(5, 5))
    cache.commit(0)
    assert cache.has(0) and not cache.complete(0) and "epoch_0000" in cache.missing(1)


def test_key_follows_the_teacher_the_files_their_labels_and_the_settings(tiny_data, tmp_path):
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"weights")
    samples = []
    for i, image in enumerate(sorted((tiny_data / "val").rglob("*.png"))[:4]):
        samples.append((str(tmp_path / f"{i}.png"), i % 2))
        Path(samples[-1][0]).write_bytes(image.read_bytes())

    def key(items=samples, settings=None) -> str:
        return cache_key([teacher], {"train": FileSplit(items), "val": FileSplit(items[:1])}, settings or {"seed": 0})

    first = key()
    assert key() == first and len(first) == 24
    assert key(settings={"seed": 1}) != first
    assert key([(path, 1 - label) for path, label in samples]) != first
    assert key(samples[::-1]) != first
    stat = os.stat(samples[2][0])
    os.utime(samples[2][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    touched = key()
    assert touched != first
    teacher.write_bytes(b"other weights")
    assert key() not in (first, touched)


@pytest.mark.parametrize("topk", [None, 2])
def test_shares_of_several_processes_merge_into_the_epoch_one_process_writes(tmp_path, topk):
    """Each process (here two caches on one folder, committing in turn) saves its share; rank 0 merges them. A share
    that had to widen to float32 widens the epoch; every sample reads back as its process stored it."""
    logits = torch.randn(6, 5) * 3
    logits[4, 0] = 70000.0  # past float16: rank 0's share (rows 0, 2, 4) widens, rank 1's stays float16
    waited = []
    ranks = [_cache(tmp_path, topk=topk) for _ in range(2)]
    stored = {rank: ranks[rank].record(0, torch.arange(rank, 6, 2), logits[rank::2]) for rank in (1, 0)}
    for rank in (1, 0):  # the last process to commit merges; with a real barrier rank 0 merges after every share
        ranks[rank].commit(0, rank, 2, lambda rank=rank: waited.append(rank))
    assert waited == [1, 1, 0, 0] and sorted(p.name for p in (tmp_path / "key").iterdir()) == ["epoch_0000"]
    reader = _cache(tmp_path, topk=topk)
    assert reader.complete(0)
    for rank in (0, 1):
        assert torch.equal(reader.lookup(0, torch.arange(rank, 6, 2)), stored[rank])


def test_a_process_that_recorded_nothing_still_lets_the_epoch_merge(tmp_path):
    """A process whose shard held no sample this epoch (more processes than batches) adds an empty share, so rank 0's
    merge finds every share and saves the other process's samples, the rest marked missing rather than failing."""
    logits = torch.randn(6, 5)
    ranks = [_cache(tmp_path) for _ in range(2)]
    stored = ranks[1].record(0, torch.arange(6), logits)
    for rank in (1, 0):
        ranks[rank].commit(0, rank, 2, lambda: None)
    reader = _cache(tmp_path)
    assert reader.has(0) and reader.complete(0)
    assert torch.equal(reader.lookup(0, torch.arange(6)), stored)
