"""Dataset sources: prefixes, torchvision's datasets read from fake copies in their own formats, errors, caches."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from conftest import FAST
from fake_datasets import FAKES, skip_md5_check
import kd.data.sources.folder
from kd.cli import main
from kd.config import Config
from kd.data.loaders import make_datamodule
from kd.errors import KDError
from kd.data.image_cache import ImageCache, image_cache_key
from kd.data.images import resize_short
from kd.data.sources import DATA_SOURCES, DatasetLayout, LoadOptions, open_source
from kd.data.sources.demo import make_demo_dataset
from kd.data.sources.folder import ImageFolderSource
from kd.data.sources.torchvision_datasets import DATASETS, DOWNLOAD_TIMEOUT_S, TorchvisionSource
from kd.train.teacher_cache import cache_key


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_md5_check(monkeypatch)


def _load(data_dir: str | Path, **flags) -> DatasetLayout:
    return open_source(str(data_dir)).load(LoadOptions.from_config(Config(data_dir=str(data_dir), **flags)))


def _error(data_dir: str | Path, **flags) -> str:
    with pytest.raises(KDError) as info:
        _load(data_dir, **flags)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_torchvision_dataset_has_a_fake_copy():
    assert set(FAKES) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_each_dataset_reads_its_fake_copy(name, tmp_path, no_md5):
    fake = FAKES[name](tmp_path)
    layout = _load(f"torchvision:{name}:{tmp_path}")
    assert layout.classes == fake.classes and layout.skipped == []
    for split, kind in ((layout.train, "train"), (layout.val, "test")):  # the test split validates
        assert len(split) == len(fake.labels[kind]) and split.labels == fake.labels[kind]
        for i in range(len(split)):
            image = split.image(i)
            assert image.mode == "RGB" and image.size == fake.images[kind].shape[2:0:-1]
            assert np.array_equal(np.asarray(image), fake.images[kind][i]), (kind, i)
        assert split.describe(3) == f"{name} {kind} #3"


def test_torchvision_data_feeds_the_loaders(tmp_path, no_md5):
    FAKES["MNIST"](tmp_path)
    data = make_datamodule(Config(data_dir=f"torchvision:mnist:{tmp_path}", image_size=16, batch_size=4,
                                  num_workers=0, num_classes=10))  # the name in any case
    assert data.classes[0] == "0 - zero"
    x, y, index = next(iter(data.val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 and y.tolist() == data.layout.val.labels[:4]
    with pytest.raises(KDError, match=r"--num_classes is 3 but torchvision:MNIST:\S+ holds 10 classes: 0 - zero"):
        make_datamodule(Config(data_dir=f"torchvision:MNIST:{tmp_path}", num_classes=3))


def test_a_missing_dataset_says_where_it_was_looked_for_and_how_to_get_it(tmp_path):
    assert _error(f"torchvision:CIFAR10:{tmp_path}") == (
        f"--data_dir torchvision:CIFAR10:{tmp_path}: CIFAR10 is not in {tmp_path} (expected "
        f"{tmp_path}/cifar-10-batches-py); add --download_data, or put the files there")
    assert f"expected {tmp_path}/train_32x32.mat, {tmp_path}/test_32x32.mat" in _error(f"torchvision:SVHN:{tmp_path}")


def test_files_failing_torchvisions_check_are_damaged_not_missing(tmp_path):
    FAKES["CIFAR10"](tmp_path)  # the MD5 check stays on: fake files fail it
    message = _error(f"torchvision:CIFAR10:{tmp_path}", download_data=True)
    assert message.endswith(f"CIFAR10 in {tmp_path} is incomplete or damaged (torchvision's check of its files "
                            f"failed); remove {tmp_path}/cifar-10-batches-py and add --download_data, or put intact "
                            "files there")


def test_an_unreadable_file_names_the_dataset(tmp_path):
    FAKES["MNIST"](tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + bytes(20))
    assert f"cannot read MNIST from {tmp_path}: " in _error(f"torchvision:MNIST:{tmp_path}")


@pytest.mark.parametrize("spec, message", [
    ("torchvision:CIFAR1000:data", "unknown torchvision dataset 'CIFAR1000' (did you mean CIFAR100 or CIFAR10?); "
                                   "kd reads CIFAR10, CIFAR100, MNIST"),
    ("torchvision:ImageNet:data", "unknown torchvision dataset 'ImageNet'"),
    ("torchvision:CIFAR100", "expected torchvision:NAME:ROOT, a dataset and the folder that holds it"),
    ("torchvision:CIFAR100:", "expected torchvision:NAME:ROOT"),
    ("torchvision::data", "expected torchvision:NAME:ROOT"),
    ("torchvison:CIFAR10:data", "no dataset source 'torchvison' (did you mean torchvision?)"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    assert message in _error(spec) and _error(spec).startswith(f"--data_dir {spec}: ")


def test_offline_download_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    timeouts = []

    def offline(*args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    for name in ("CIFAR10", "MNIST"):  # MNIST tries two mirrors
        message = _error(f"torchvision:{name}:{root}", download_data=True)
        assert message.startswith(f"--data_dir torchvision:{name}:{root} --download_data: could not download {name} "
                                  f"into {root} (")
        assert "name resolution" in message and message.endswith("offline? put the files there")
        assert not root.exists()  # no partial dataset, and not even the folder kd created for it
    assert timeouts and set(timeouts) == {DOWNLOAD_TIMEOUT_S} and socket.getdefaulttimeout() is None


def test_a_download_lands_whole_in_the_root(tmp_path, monkeypatch, no_md5):
    fetched = []

    def download(dataset):  # torchvision's download, as if from the network: into the root it was given
        if not (Path(dataset.root) / "cifar-10-batches-py").exists():
            FAKES["CIFAR10"](Path(dataset.root))
            fetched.append(dataset.root)

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", download)
    (tmp_path / "other").mkdir()  # another dataset already in the root stays as it is
    layout = _load(f"torchvision:CIFAR10:{tmp_path}", download_data=True)
    assert len(fetched) == 1 and Path(fetched[0]).parent == tmp_path and len(layout.train) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "other"]
    assert len(_load(f"torchvision:CIFAR10:{tmp_path}", download_data=True).val) == 20 and len(fetched) == 1


def test_cache_keys_are_stable_and_follow_the_files(tmp_path, no_md5):
    FAKES["CIFAR10"](tmp_path / "data")
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"weights")
    spec = f"torchvision:CIFAR10:{tmp_path / 'data'}"

    def keys() -> tuple[str, str]:
        layout = _load(spec)
        return cache_key([teacher], {"train": layout.train, "val": layout.val}, {}), image_cache_key(layout.train, 24)

    first = keys()
    assert keys() == first
    batch = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert keys()[0] != first[0] and keys()[1] != first[1]
    layout = _load(spec)
    assert layout.train.fingerprint() != layout.val.fingerprint()


def test_image_cache_of_in_memory_images(tmp_path, no_md5):
    FAKES["STL10"](tmp_path / "data")
    split = _load(f"torchvision:STL10:{tmp_path / 'data'}").train
    cache = ImageCache.build(split, 40, tmp_path / "cache")
    assert len(cache) == len(split) and cache.folder.name == image_cache_key(split, 40)
    for i in range(len(split)):
        assert np.array_equal(cache[i].permute(1, 2, 0).numpy(), resize_short(split.image(i), 40))
    assert ImageCache.build(split, 40, tmp_path / "cache").folder == cache.folder


@pytest.mark.parametrize("data_dir, source, spec", [
    ("some/folder", ImageFolderSource, "some/folder"), ("demo", ImageFolderSource, "demo"),
    ("C:/data", ImageFolderSource, "C:/data"), ("folder:torchvision:x", ImageFolderSource, "torchvision:x"),
    ("torchvision:CIFAR10:data", TorchvisionSource, "CIFAR10:data"),
])
def test_a_prefix_chooses_the_source_and_a_bare_path_is_a_folder(data_dir, source, spec):
    chosen = open_source(data_dir)
    assert type(chosen) is source and chosen.spec == spec


def test_demo_is_generated_under_the_output_folder(tmp_path, monkeypatch):
    made = []

    def small_demo(root: Path) -> Path:  # the real generator, with fewer images
        made.append(root)
        return make_demo_dataset(root, train_per_class=2, val_per_class=1, image_size=16)

    monkeypatch.setattr(kd.data.sources.folder, "make_demo_dataset", small_demo)
    layout = _load("demo", output_dir=str(tmp_path / "runs"))
    assert made == [tmp_path / "runs" / "demo_data"] and len(layout.classes) == 12
    assert (len(layout.train), len(layout.val)) == (24, 12)
    assert layout.val.describe(0).startswith(str(tmp_path / "runs" / "demo_data" / "val"))


@pytest.fixture
def examples(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A --data_dir of every registered source."""
    skip_md5_check(monkeypatch)
    FAKES["SVHN"](tmp_path)
    return {"folder": str(tiny_data), "torchvision": f"torchvision:SVHN:{tmp_path}"}


@pytest.mark.parametrize("source", DATA_SOURCES.names())
def test_every_source_gives_classes_and_two_labelled_splits(source, examples):
    layout = _load(examples[source])
    for split in (layout.train, layout.val):
        assert len(split) > 0 and len(split.labels) == len(split)
        assert set(split.labels) <= set(range(len(layout.classes)))
        assert split.image(0).mode == "RGB" and split.describe(0) and len(split.fingerprint()) == 64


@pytest.mark.slow
def test_teacher_baseline_and_distilled_student_on_fake_cifar10(tmp_path, no_md5, capsys):
    FAKES["CIFAR10"](tmp_path / "cifar", (4, 2))
    assert main([*FAST, "--data_dir", f"torchvision:CIFAR10:{tmp_path / 'cifar'}", "--output_dir",
                 str(tmp_path / "runs"), "--train_teacher", "--baseline", "--distill", "--image_size", "32"]) == 0
    out = capsys.readouterr().out
    summary = out[out.rindex("\nstage "):]  # the summary table and what follows it (a weak teacher's warning, say)
    for stage in ("teacher", "baseline", "distill"):
        assert stage in summary
    assert "distill (kl_softmax) gain over the baseline" in summary
