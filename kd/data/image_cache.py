"""A decoded-image cache: every image of a split decoded once into a memory-mapped uint8 file.

Training then augments from raw pixels instead of decoding JPEG/PNG every epoch. Images keep their
aspect ratio, so they are stored ragged: ``pixels.u8`` holds each image as HWC uint8 with its short side
resized to ``short_side``, one after another; ``index.npy`` holds (offset, height, width) per image;
``meta.json`` holds the key inputs and is written last. The folder is named by a key of the split's
fingerprint (which changes with its files) and the short side. A cache folder is built under a temporary
name and renamed into place when complete, so an interrupted build never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kd.errors import KDError, warn
from kd.files import remove_dead_temporaries, written_atomically
from kd.data.sources.base import Split

FORMAT_VERSION = 1  # bump when the stored pixels change for the same inputs (filter, layout, draft use)
BUILD_CHUNK = 256  # images decoded per parallel batch: bounds the memory held by decoded images
MAX_THREADS = 8


def image_cache_key(split: Split, short_side: int) -> str:
    """Hex digest over the split's fingerprint, the short side and a format version."""
    digest = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "short_side": short_side}).encode())
    digest.update(split.fingerprint().encode())
    return digest.hexdigest()


def _human(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class ImageCache:
    """Decoded images of one split, memory-mapped read-only.

    ``cache[i]`` is image ``i`` as a uint8 CHW tensor (a private copy, channels-last in memory).
    The mapping is opened lazily in each process and never pickled, so DataLoader workers, forked
    or spawned, each map the file themselves.
    """

    def __init__(self, folder: str | Path) -> None:
        """Open the complete cache in ``folder`` (see :meth:`build` to make one)."""
        self.folder = Path(folder)
        meta = _read_meta(self.folder)
        if meta is None:
            raise KDError(f"--image_cache: {self.folder} is not a complete image cache")
        self.short_side, self._count, self._nbytes = meta["short_side"], meta["count"], meta["nbytes"]
        self._pixels: np.ndarray | None = None
        self._index: np.ndarray | None = None

    @classmethod
    def build(cls, split: Split, short_side: int, root: str | Path) -> ImageCache:
        """The cache of ``split``'s images under ``root/<key>``: opened if complete, else decoded once first."""
        if short_side < 1:
            raise KDError(f"--image_cache: the short side must be at least 1 pixel, not {short_side}")
        root = Path(root).expanduser()
        remove_dead_temporaries(root, what="image cache build")
        key = image_cache_key(split, short_side)
        folder = root / key
        expected = {"version": FORMAT_VERSION, "key": key, "short_side": short_side, "count": len(split)}
        if _read_meta(folder, expected) is not None:
            return cls(folder)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KDError(f"--image_cache: cannot write {root}: {exc.strerror or exc}") from None
        with _builder_lock(root / f".{key}.lock"):  # one writer: the others wait, then open what it built
            if _read_meta(folder, expected) is not None:
                return cls(folder)
            nbytes = cls._write_folder(split, short_side, folder, expected)
        print(f"image cache: {len(split)} images at short side {short_side}, {_human(nbytes)} in {folder}",
              file=sys.stderr, flush=True)
        return cls(folder)

    @staticmethod
    def _write_folder(split: Split, short_side: int, folder: Path, expected: dict) -> int:
        """Decode ``split`` into ``folder``, built aside and renamed into place; the number of pixel bytes."""
        nbytes = 0
        try:
            with written_atomically(folder) as tmp:
                tmp.mkdir()
                nbytes = _write(tmp, split, short_side, expected)
                if folder.exists() and _read_meta(folder, expected) is None:
                    warn(f"--image_cache: {folder} is damaged (its meta.json, index.npy or pixels.u8 do not agree); "
                         "it is built again")
                    shutil.rmtree(folder)  # a damaged folder under our key (complete ones only appear by rename)
        except OSError as exc:
            if _read_meta(folder, expected) is None:  # not another process that finished first
                raise KDError(f"--image_cache: cannot write {folder}: {exc.strerror or exc}") from None
        return nbytes

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self._count <= i < self._count:
            raise IndexError(f"image {i} out of range for a cache of {self._count}")
        if self._pixels is None:
            self._open()
        offset, height, width = (int(v) for v in self._index[i])
        pixels = np.array(self._pixels[offset:offset + height * width * 3]).reshape(height, width, 3)
        return torch.from_numpy(pixels).permute(2, 0, 1)

    @property
    def nbytes(self) -> int:
        """The size of the decoded pixels on disk."""
        return self._nbytes

    def shape(self, i: int) -> tuple[int, int, int]:
        """(3, height, width) of image ``i`` without reading its pixels."""
        if self._index is None:
            self._open()
        _, height, width = (int(v) for v in self._index[i])
        return 3, height, width

    def _open(self) -> None:
        self._index = np.load(self.folder / "index.npy")
        self._pixels = (np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r") if self._nbytes
                        else np.zeros(0, np.uint8))  # numpy cannot map an empty file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None, "_index": None}

    def __repr__(self) -> str:
        return f"ImageCache({str(self.folder)!r}, {self._count} images, short side {self.short_side})"


@contextlib.contextmanager
def _builder_lock(path: Path) -> Iterator[None]:
    """Hold the advisory lock ``path``, waiting for another builder (on any machine sharing the file system) to
    finish; the file is removed on release, so nothing is left beside the cache. Where the file system cannot lock,
    build anyway (two builders then decode twice, and one rename wins)."""
    while True:
        try:
            file = path.open("a")
        except OSError as exc:
            raise KDError(f"--image_cache: cannot write {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. an NFS mount without lockd
            warn(f"--image_cache: cannot lock {path} ({exc.strerror or exc}); processes building this cache at once "
                 "each decode it")
            break
        try:  # the holder before us removed the file it locked: lock the one at the path now
            if os.fstat(file.fileno()).st_ino == path.stat().st_ino:
                break
        except FileNotFoundError:
            pass
        file.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiter on this file then tries the path again
        file.close()


def _read_meta(folder: Path, expected: dict | None = None) -> dict | None:
    """The metadata of a complete cache in ``folder`` (matching ``expected``), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not all(_count(meta[key]) for key in ("version", "short_side", "count", "nbytes")):
            return None  # a hand edit: a count that is text, negative or true
        complete = ((folder / "pixels.u8").stat().st_size == meta["nbytes"]
                    and _index_fits(np.load(folder / "index.npy"), meta["count"], meta["nbytes"]))
    except (OSError, ValueError, KeyError, TypeError, EOFError, RecursionError):  # missing, truncated, overwritten
        return None
    if not complete or meta.get("version") != FORMAT_VERSION:
        return None
    if expected is not None and any(meta.get(k) != v for k, v in expected.items()):
        return None
    return meta


def _count(value: object) -> bool:
    """Whether a meta.json value is a whole number of 0 or more (JSON's true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_fits(index: np.ndarray, count: int, nbytes: int) -> bool:
    """Whether ``index`` holds (offset, height, width) of ``count`` images that all lie within ``nbytes`` of pixels."""
    if index.shape != (count, 3) or index.dtype.kind not in "iu":
        return False
    offsets, heights, widths = index.T.astype(np.int64)
    return bool((offsets >= 0).all() and (heights > 0).all() and (widths > 0).all()
                and (offsets + heights * widths * 3 <= nbytes).all())


def _write(folder: Path, split: Split, short_side: int, meta: dict) -> int:
    """Decode ``split``'s images into ``folder`` (pixels, index, then meta.json last); the number of pixel bytes."""
    index = np.zeros((len(split), 3), dtype=np.int64)
    offset = 0
    threads = max(1, min(MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    # On a terminal only: a file or pipe gets the one-line summary the caller prints after the build.
    bar = tqdm(total=len(split), desc="caching images", unit="img", file=sys.stderr, disable=None)
    # PIL releases the GIL while decoding and resizing, so threads decode in parallel; map keeps the order.
    with open(folder / "pixels.u8", "wb") as out, ThreadPoolExecutor(threads) as pool, bar:
        for start in range(0, len(split), BUILD_CHUNK):
            chunk = range(start, min(start + BUILD_CHUNK, len(split)))
            for i, pixels in zip(chunk, pool.map(split.resized, chunk, [short_side] * len(chunk))):
                out.write(np.ascontiguousarray(pixels).data)
                index[i] = (offset, pixels.shape[0], pixels.shape[1])
                offset += pixels.nbytes
                bar.update()
        out.flush()
        os.fsync(out.fileno())
    np.save(folder / "index.npy", index)
    (folder / "meta.json").write_text(json.dumps({**meta, "nbytes": offset}))
    return offset
