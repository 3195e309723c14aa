"""The decoded-image cache of image files: sizes, pixels, reuse, keys, interrupted builds, pickling, bad roots."""

from __future__ import annotations

import ast
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from torch.utils.data import DataLoader

import kd.data.image_cache as image_cache
from kd.errors import KDError
from kd.data.image_cache import ImageCache, image_cache_key
from kd.data.images import load_rgb, resized_size
from kd.data.sources.folder import FileSplit

SHORT = 24
# (width, height, format): landscape, portrait, square, smaller than SHORT (upscaled), a JPEG big enough to draft
SIZES = [(64, 48, "PNG"), (40, 90, "PNG"), (30, 30, "JPEG"), (16, 20, "PNG"), (200, 100, "JPEG"), (57, 31, "JPEG")]


def _make_images(folder: Path, sizes=SIZES) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height, fmt) in enumerate(sizes):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3))  # smooth enough for JPEG
        pixels = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width].astype(np.uint8)
        path = folder / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        Image.fromarray(pixels).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        paths.append(str(path))
    return paths


def _files(paths: list[str]) -> FileSplit:
    """The split of these image files (their labels do not matter to the cache)."""
    return FileSplit([(path, 0) for path in paths])


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    return _make_images(tmp_path / "images")


def _reference(path: str, short_side: int = SHORT) -> np.ndarray:
    """The image decoded in full and resized with PIL's antialiased bilinear filter."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        return np.asarray(image.resize(resized_size(*image.size, short_side), Image.Resampling.BILINEAR))


def test_shapes_keep_the_aspect_ratio(images, tmp_path):
    cache = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    assert len(cache) == len(images)
    for i, (width, height, _) in enumerate(SIZES):
        image = cache[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        h, w = image.shape[1:]
        assert min(h, w) == SHORT
        assert abs(max(h, w) - max(width, height) * SHORT / min(width, height)) <= 1
        assert (h >= w) == (height >= width)
        assert cache.shape(i) == tuple(image.shape)
    assert cache.nbytes == sum(cache[i].numel() for i in range(len(cache)))
    assert cache.folder == tmp_path / "cache" / image_cache_key(_files(images), SHORT)
    assert torch.equal(cache[-1], cache[len(cache) - 1])
    with pytest.raises(IndexError):
        cache[len(cache)]


def test_pixels_match_a_pil_resize(images, tmp_path):
    cache = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    for i, (path, (_, _, fmt)) in enumerate(zip(images, SIZES)):
        ours, ref = cache[i].permute(1, 2, 0).numpy().astype(int), _reference(path).astype(int)
        assert ours.shape == ref.shape
        if fmt == "PNG":  # decoded in full: the very same pixels
            assert np.array_equal(ours, ref), path
        else:  # a large JPEG is decoded at reduced scale by libjpeg first: close (on blocky noise), not equal
            assert np.abs(ours - ref).mean() < 4, path


def test_large_jpegs_decode_at_reduced_scale(tmp_path, monkeypatch):
    paths = _make_images(tmp_path / "images", [(400, 200, "JPEG"), (100, 60, "JPEG"), (400, 200, "PNG")])
    drafted = []
    draft = JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        drafted.append((Path(self.filename).name, self.size))
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    cache = ImageCache.build(_files(paths), SHORT, tmp_path / "cache")
    # 400x200 to 48x24: decoded at 1/4 scale, still twice the target; 100x60 to 40x24: no room, full size
    assert sorted(drafted) == [("0.jpg", (100, 50)), ("1.jpg", (100, 60))]
    assert cache.shape(0) == cache.shape(2) == (3, SHORT, 48)
    assert np.abs(cache[0].permute(1, 2, 0).numpy().astype(int) - _reference(paths[0])).mean() < 4


def test_second_build_reuses_the_cache(images, tmp_path, monkeypatch):
    first = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    pixels = first.folder / "pixels.u8"
    stamp = pixels.stat().st_mtime_ns

    def refuse(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(FileSplit, "resized", refuse)
    second = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    assert second.folder == first.folder and pixels.stat().st_mtime_ns == stamp
    assert all(torch.equal(first[i], second[i]) for i in range(len(first)))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.folder.name]


def test_processes_building_one_cache_at_once_decode_it_once(images, tmp_path, monkeypatch):
    """Two processes (two machines' first ranks on a shared file system, say) ask for the same cache at once: one
    decodes, the other waits for it and opens what it built."""
    decoded = tmp_path / "decoded.txt"
    resized = FileSplit.resized

    def slow_resized(self, i, short_side):
        with decoded.open("a") as log:
            log.write(f"{os.getpid()} {i}\n")
        time.sleep(0.05)
        return resized(self, i, short_side)

    monkeypatch.setattr(FileSplit, "resized", slow_resized)
    builders = [multiprocessing.get_context("fork").Process(target=ImageCache.build,
                                                             args=(_files(images), SHORT, tmp_path / "cache"))
                for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(60)
    assert [builder.exitcode for builder in builders] == [0, 0]
    lines = decoded.read_text().splitlines()
    assert len(lines) == len(images) and len({line.split()[0] for line in lines}) == 1  # one process decoded
    assert len(list((tmp_path / "cache").iterdir())) == 1  # its folder, and no lock file left


def test_two_builds_give_identical_bytes(images, tmp_path):
    a = ImageCache.build(_files(images), SHORT, tmp_path / "a")
    b = ImageCache.build(_files(images), SHORT, tmp_path / "b")
    for name in ("pixels.u8", "index.npy", "meta.json"):
        assert (a.folder / name).read_bytes() == (b.folder / name).read_bytes()


def test_key_follows_files_and_short_side(images):
    key = image_cache_key(_files(images), SHORT)
    assert key == image_cache_key(_files(list(images)), SHORT)
    assert key != image_cache_key(_files(images), SHORT + 1)
    assert key != image_cache_key(_files(images[::-1]), SHORT)
    assert key != image_cache_key(_files(images[:-1]), SHORT)
    stat = os.stat(images[0])
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    touched = image_cache_key(_files(images), SHORT)
    assert touched != key
    Image.new("RGB", (64, 48), "red").save(images[0])  # new content
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # even with the same mtime
    assert image_cache_key(_files(images), SHORT) not in (key, touched)


def test_changed_file_builds_a_new_cache(images, tmp_path):
    first = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    Image.new("RGB", (64, 48), "red").save(images[0])
    os.utime(images[0], ns=(0, os.stat(images[0]).st_mtime_ns + 1_000_000_000))
    second = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    assert second.folder != first.folder
    assert torch.all(second[0][0] == 255) and torch.all(second[0][1:] == 0)
    assert torch.equal(second[1], first[1])


@pytest.mark.parametrize("error", [KDError, KeyboardInterrupt])
def test_interrupted_build_leaves_nothing_complete(images, tmp_path, monkeypatch, error):
    decode = FileSplit.resized

    def fail_on_third(split, index, short_side):
        if split.describe(index) == images[2]:
            raise error(f"cannot read image {images[2]}: broken")
        return decode(split, index, short_side)

    monkeypatch.setattr(FileSplit, "resized", fail_on_third)
    root = tmp_path / "cache"
    with pytest.raises(error, match=f"cannot read image {images[2]}"):
        ImageCache.build(_files(images), SHORT, root)
    assert list(root.iterdir()) == []  # no cache folder, no temporary folder
    monkeypatch.setattr(FileSplit, "resized", decode)
    assert len(ImageCache.build(_files(images), SHORT, root)) == len(images)


def test_16_bit_images_decode_as_in_training(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)).save(path)
    cache = ImageCache.build(_files([str(path)]), SHORT, tmp_path / "cache")
    image = load_rgb(str(path))
    expected = np.asarray(image.resize(resized_size(*image.size, SHORT), Image.Resampling.BILINEAR))
    assert np.array_equal(cache[0].permute(1, 2, 0).numpy(), expected)
    assert cache[0].max() > 200  # not clipped to white, not crushed to black


def test_unreadable_image_names_the_file(images, tmp_path):
    Path(images[1]).write_bytes(b"not an image")
    with pytest.raises(KDError, match=f"cannot read image {images[1]}"):
        ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_damaged_cache_is_rebuilt(images, tmp_path):
    first = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    expected = [first[i] for i in range(len(first))]
    with open(first.folder / "pixels.u8", "r+b") as f:
        f.truncate(10)
    second = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    assert all(torch.equal(a, second[i]) for i, a in enumerate(expected))


def test_pickled_cache_reads_the_same_pixels(images, tmp_path):
    cache = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    before = cache[1]  # maps the file in this process
    data = pickle.dumps(cache)
    assert len(data) < 2000  # the mapping and the index are not pickled
    clone = pickle.loads(data)
    assert len(clone) == len(cache)
    assert all(torch.equal(clone[i], cache[i]) for i in range(len(cache)))
    assert torch.equal(before, clone[1])
    image = clone[0]
    image.zero_()  # a private copy: writable, and the cache is unchanged
    assert torch.equal(clone[0], cache[0]) and not torch.equal(clone[0], image)


def test_dataloader_workers_read_the_cache(images, tmp_path):
    cache = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    expected = [cache[i] for i in range(len(cache))]  # mapped in the parent before the workers fork
    loader = DataLoader(cache, batch_size=None, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(loader, expected, strict=True))


def test_empty_list(tmp_path):
    cache = ImageCache.build(_files([]), SHORT, tmp_path / "cache")
    assert len(cache) == 0 and cache.nbytes == 0
    assert len(pickle.loads(pickle.dumps(cache))) == 0


def test_unwritable_root_names_it(images, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    root = blocker / "cache"
    with pytest.raises(KDError, match=f"^--image_cache: cannot write {root}: ") as info:
        ImageCache.build(_files(images), SHORT, root)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_root_names_it(images, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(KDError, match=f"^--image_cache: cannot write {root}: "):
            ImageCache.build(_files(images), SHORT, root)
    finally:
        root.chmod(0o700)


def test_complete_cache_opens_in_a_read_only_root(images, tmp_path, monkeypatch):
    cache = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError("read-only")))
    again = ImageCache.build(_files(images), SHORT, tmp_path / "cache")
    assert torch.equal(again[2], cache[2])


def _kd_imports(module: str) -> set[str]:
    """The kd modules importing ``module`` loads, directly or through others (read from the source, not run)."""
    package = Path(image_cache.__file__).parents[2]  # the checkout: module names are paths from there
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = package / (name.replace(".", "/") + ".py")
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        todo.append(name.rpartition(".")[0])  # a module's package runs first
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("kd.")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kd."):
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]  # or submodules
    return seen


def test_the_cache_does_not_import_the_data_module():
    """kd.data.loaders uses kd.data.image_cache; the other way round would be an import circle again."""
    imported = _kd_imports("kd.data.image_cache")
    assert {"kd.data.images", "kd.data.sources.base"} <= imported and "kd.data.loaders" not in imported
