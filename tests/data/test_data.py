"""ImageFolder data and the DataModule: layout detection, class checks, the fixed split, transforms, the demo set."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.config import Config
from kd.data.transforms import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, RECIPES, normalize
from kd.data.loaders import ImageDataModule, make_datamodule
from kd.errors import KDError
from kd.data.images import load_rgb
from kd.data.sources.demo import make_demo_dataset
from kd.data.sources.folder import FileSplit, scan_image_folder


def _data(data_dir: Path, **flags) -> ImageDataModule:
    """The DataModule of ``--data_dir data_dir`` with these flags, as a run makes it."""
    return make_datamodule(Config(data_dir=str(data_dir), num_workers=0, **flags))


def _flatten(root: Path, dest: Path) -> Path:
    """Copy the train/ class folders of ``root`` into ``dest`` as one folder of class folders."""
    shutil.copytree(root / "train", dest)
    return dest


def test_train_val_layout_detects_classes(tiny_data):
    layout = scan_image_folder(tiny_data)
    assert len(layout.classes) == 12 and layout.classes == sorted(layout.classes)
    assert len(layout.train) == 12 * 6 and len(layout.val) == 12 * 3
    assert set(layout.val.labels) == set(range(12)) and len(layout.val.labels) == len(layout.val)


def test_single_folder_is_split_stratified_and_fixed(tiny_data, tmp_path):
    root = _flatten(tiny_data, tmp_path / "flat")
    first = scan_image_folder(root, val_fraction=0.5)
    again = scan_image_folder(root, val_fraction=0.5)
    assert first.train == again.train and first.val == again.val
    assert not {p for p, _ in first.train.samples} & {p for p, _ in first.val.samples}
    assert len(first.train) + len(first.val) == 12 * 6
    for label in range(12):  # every class on both sides, half of each held out
        assert first.val.labels.count(label) == 3
        assert first.train.labels.count(label) == 3


def test_a_single_folder_class_of_one_image_is_refused_naming_the_flag_and_class(tiny_data, tmp_path):
    root = _flatten(tiny_data, tmp_path / "flat")
    lonely = sorted((root / "blue_circle").iterdir())
    for extra in lonely[1:]:
        extra.unlink()
    with pytest.raises(KDError, match=r"^--val_fraction: class blue_circle has 1 image\(s\), too few to hold out one"):
        scan_image_folder(root)


def test_num_classes_must_agree(tiny_data):
    assert len(_data(tiny_data, num_classes=12).classes) == 12
    with pytest.raises(KDError, match=r"--num_classes is 5 but .* holds 12 classes: blue_circle"):
        _data(tiny_data, num_classes=5)


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("no_classes", "no class folders"),
    ("no_images", "no images"),
    ("empty_class", "class folder .*blue_circle has no images"),
    ("no_val", "has train/ but no val/"),
    ("val_classes_differ", "differ from train/: missing \\['red_triangle'\\]"),
])
def test_bad_layouts_name_the_culprit(tiny_data, tmp_path, breakage, message):
    root = tmp_path / "data"
    if breakage != "missing":
        shutil.copytree(tiny_data, root)
    if breakage == "no_classes":
        shutil.rmtree(root)
        root.mkdir()
        (root / "readme.txt").write_text("no class folders here")
    elif breakage == "no_images":
        for image in root.rglob("*.png"):
            image.unlink()
        shutil.rmtree(root / "val")
        for folder in (root / "train").iterdir():
            shutil.move(folder, root / folder.name)
        shutil.rmtree(root / "train")
    elif breakage == "empty_class":
        for image in (root / "train" / "blue_circle").iterdir():
            image.unlink()
    elif breakage == "no_val":
        shutil.rmtree(root / "val")
    elif breakage == "val_classes_differ":
        shutil.rmtree(root / "val" / "red_triangle")
    with pytest.raises(KDError, match=message):
        scan_image_folder(root)


def test_unreadable_image_error_names_the_file(tiny_data, tmp_path):
    root = shutil.copytree(tiny_data, tmp_path / "data")
    bad = sorted((root / "train" / "blue_ring").iterdir())[0]
    bad.write_bytes(b"not a png")
    with pytest.raises(KDError, match=f"--data_dir: cannot read image {bad} .*--skip_bad_images"):
        _data(root, image_size=16, batch_size=4)
    with pytest.raises(KDError, match=f"cannot read image {bad}"):
        load_rgb(str(bad))
    data = _data(root, image_size=16, batch_size=4, skip_bad_images=True)
    assert [p for p, _ in data.skipped] == [str(bad)] and str(bad) not in {p for p, _ in data.layout.train.samples}
    assert len(data.layout.train) == 12 * 6 - 1 and len(data.layout.val) == 12 * 3


def test_an_epoch_is_a_pure_function_of_seed_and_epoch(tiny_data):
    def batches(seed, epochs):
        data = _data(tiny_data, image_size=12, batch_size=8, seed=seed)
        loader = data.train_dataloader()
        out = []
        for epoch in epochs:
            data.set_epoch(epoch)
            out.append(torch.cat([x for x, _, _ in loader]))
        return out

    straight = batches(0, [0, 1, 2])
    assert torch.equal(batches(0, [2])[0], straight[2])  # epoch 2 alone, as after a resume
    assert not torch.equal(straight[1], straight[2])  # epochs differ
    assert not torch.equal(batches(1, [2])[0], straight[2])  # seeds differ


def test_loaders_yield_pixel_batches_of_the_crop_size_normalised_on_the_device(tiny_data):
    data = _data(tiny_data, image_size=12, batch_size=5)
    for loader in (data.train_dataloader(), data.val_dataloader()):
        x, y, indices = next(iter(loader))
        assert x.shape == (5, 3, 12, 12) and x.dtype == torch.uint8  # pixels: a quarter of float32's bytes
        assert y.dtype == torch.int64 and int(y.max()) < 12
        assert indices.dtype == torch.int64 and indices.shape == (5,) and len(set(indices.tolist())) == 5
        inputs = data.on_after_batch_transfer((x, y, indices), 0)[0]  # after the copy to the device
        assert inputs.dtype == torch.float32 and -3 < float(inputs.mean()) < 3 and float(inputs.std()) > 0.1
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        torch.testing.assert_close(inputs, (x / 255 - mean) / std)


def _digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.relative_to(root).as_posix().encode() + p.read_bytes() for p in files)).hexdigest()


def test_demo_dataset_is_deterministic_and_reused(tmp_path):
    first = make_demo_dataset(tmp_path / "a", train_per_class=2, val_per_class=1, image_size=16)
    second = make_demo_dataset(tmp_path / "b", train_per_class=2, val_per_class=1, image_size=16)
    assert _digest(first) == _digest(second)
    stamp = (first / "demo.json").stat().st_mtime_ns
    assert make_demo_dataset(first, train_per_class=2, val_per_class=1, image_size=16) == first
    assert (first / "demo.json").stat().st_mtime_ns == stamp
    with pytest.raises(KDError, match="exists but is not this demo dataset"):
        make_demo_dataset(first, train_per_class=3, val_per_class=1, image_size=16)
    assert not list(tmp_path.glob(".*tmp*"))  # no half-built folder left behind


def test_sixteen_bit_greyscale_keeps_its_levels(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    assert set(np.asarray(load_rgb(str(path))).ravel()) == {127}  # mid grey, not clipped to white


@pytest.mark.parametrize("n_train, batches", [(73, 4), (74, 5)])
def test_a_last_training_batch_of_one_image_is_dropped(tiny_data, n_train, batches):
    data = _data(tiny_data, image_size=12, batch_size=18)
    data.layout.train = FileSplit((data.layout.train.samples * 2)[:n_train])
    assert len(data.train_dataloader()) == batches  # 73 = 4×18 + 1: the lone image would break BatchNorm
    assert len(data.val_dataloader()) == 2


def test_cifar_recipe_crops_padded_images_without_resizing():
    """--augment cifar: RepDistiller's 4 px zero-padded random crop and flip; validation sees the image itself."""
    image = torch.arange(3 * 32 * 32, dtype=torch.int32).reshape(3, 32, 32).remainder(251).to(torch.uint8)
    torch.manual_seed(0)
    crops = [RECIPES["cifar"].train(32, 0.08, False)(image) for _ in range(20)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    # every crop is the image shifted by at most 4 px, zeros where it left the image: pixels are never resampled
    for crop in crops:
        shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                  if torch.equal(crop, _shifted(image, dy, dx))]
        assert shifts, "a crop that is not a shift of the padded image"
    assert any(not torch.equal(c, image) for c in crops)
    assert torch.equal(RECIPES["cifar"].val(32)(image), image)
    x = normalize(image.unsqueeze(0), "cifar")
    torch.testing.assert_close(x[0, :, 0, 0], (image[:, 0, 0] / 255 - torch.tensor(CIFAR100_MEAN))
                               / torch.tensor(CIFAR100_STD))


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    return padded[:, 4 + dy:36 + dy, 4 + dx:36 + dx]
