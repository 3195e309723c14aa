"""The teacher-output cache: a teacher's logits for every training sample of every epoch, on disk.

Augmentations are a pure function of (seed, epoch, sample index), so a later run with the same
teacher, data, transforms and seed sees exactly the images the first one did and can read the
teacher's logits instead of running it. Each finished epoch is one folder, written aside and renamed
into place: an interrupted epoch leaves nothing, and a finished one is never rewritten.

Under DDP each process fills the samples of its shard; at the end of an epoch each writes its share beside the
cache (``.<epoch>.part<rank>of<world>.npz``), and the first process merges the shares into the one folder a
single process would have written. So the key and the layout do not depend on the process count, and a cache
filled by N processes is read by any number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.errors import KDError, warn
from kd.files import file_digest, remove_dead_temporaries, written_atomically
from kd.data.sources.base import Split

FORMAT_VERSION = 1
FLOAT16_TOLERANCE = 0.05  # the most float16 rounding may move a logit; a teacher's beyond it is stored as float32


def cache_key(teacher_checkpoints: list[Path], splits: dict[str, Split], settings: dict[str, Any]) -> str:
    """The cache folder's name: a digest of the teachers' content (in order), each split's fingerprint and settings.

    A split's fingerprint changes with its images and labels (for files: each one's path, label,
    size and mtime). ``settings`` holds everything else that changes the teacher's outputs:
    architecture, transforms, seed, precision, the image cache, the storage format.
    """
    teachers = [file_digest(path) for path in teacher_checkpoints]
    digest = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "teacher": teachers, "settings": settings},
                                       sort_keys=True).encode())
    for name, split in splits.items():
        digest.update(f"{name}\0{split.fingerprint()}\n".encode())
    return digest.hexdigest()[:24]


def _fits_float16(logits: torch.Tensor) -> bool:
    """Whether float16 holds these (finite) logits to within FLOAT16_TOLERANCE; a teacher's own inf or NaN stays."""
    finite = logits[torch.isfinite(logits)]
    return bool(((finite - finite.half().float()).abs() <= FLOAT16_TOLERANCE).all())


class _Split:
    """One epoch's (or the validation set's) logits, filled batch by batch, then saved as a folder."""

    DTYPES = {"filled": bool, "indices": np.int32, "rest": np.float32}  # and "values": the cache's dtype

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: str) -> None:
        self.arrays = {name: np.zeros(shape, dtype=self.DTYPES.get(name, dtype)) for name, shape in shapes.items()}


class TeacherCache:
    """Reads and writes teacher logits by (epoch, sample index) under ``root/<key>``.

    ``topk`` keeps each sample's k largest logits; the others are stored as one value that gives
    them their true total probability at temperature 1 (exact for k = number of classes).
    """

    KINDS = {"values": ("f", "floats"), "filled": ("b", "booleans"), "indices": ("iu", "whole numbers"),
             "rest": ("f", "floats")}  # numpy's dtype kinds of each saved array, and what they are called

    def __init__(self, root: str | Path, key: str, num_samples: dict[str, int], num_classes: int,
                 dtype: str = "float16", topk: int | None = None) -> None:
        self.folder = Path(root).expanduser() / key
        self.num_samples, self.num_classes, self.dtype, self.topk = num_samples, num_classes, dtype, topk
        self._pending: dict[str, _Split] = {}
        self._open: dict[str, dict[str, np.ndarray]] = {}
        self._cleaned = False  # whether commit removed killed runs' leftovers yet

    @staticmethod
    def split_name(epoch: int | None) -> str:
        """``epoch_0003`` for a training epoch, ``val`` for the validation set (epoch None)."""
        return "val" if epoch is None else f"epoch_{epoch:04d}"

    def has(self, epoch: int | None) -> bool:
        return (self.folder / self.split_name(epoch) / "filled.npy").is_file()

    def complete(self, epoch: int | None) -> bool:
        """Whether ``epoch`` is saved with every sample (a batch size that drops a last lone image leaves a gap)."""
        return self.has(epoch) and bool(self._saved(epoch)["filled"].all())

    def missing(self, epochs: int) -> list[str]:
        """The splits a run of ``epochs`` epochs would have to compute, at least in part."""
        return [self.split_name(e) for e in [None, *range(epochs)] if not self.complete(e)]

    def lookup(self, epoch: int | None, indices: torch.Tensor) -> torch.Tensor | None:
        """The cached logits of these samples (float32), or None if any of them is not cached."""
        if not self.has(epoch):
            return None
        arrays, rows = self._saved(epoch), indices.cpu().numpy()
        if not arrays["filled"][rows].all():
            return None
        logits = self._restore(arrays, rows)
        if not torch.isfinite(logits).all():  # float16 overflowed in a cache written before kd widened it
            raise KDError(f"--teacher_cache: {self.folder / self.split_name(epoch)} holds infinite or NaN logits; "
                          "remove that folder to compute them again")
        return logits

    def _shapes(self, epoch: int | None) -> dict[str, tuple[int, ...]]:
        """The arrays an epoch is stored in, by name, and their shapes (top-k adds the classes kept and the rest)."""
        rows = self.num_samples["val" if epoch is None else "train"]
        width = min(self.topk or self.num_classes, self.num_classes)
        shapes = {"values": (rows, width), "filled": (rows,)}
        if width < self.num_classes:
            shapes |= {"indices": (rows, width), "rest": (rows,)}
        return shapes

    def _saved(self, epoch: int | None) -> dict[str, np.ndarray]:
        """The saved arrays of ``epoch``, memory-mapped once and checked: a KDError naming the folder if damaged."""
        name = self.split_name(epoch)
        if name not in self._open:
            folder, shapes = self.folder / name, self._shapes(epoch)
            try:
                arrays = {key: np.load(folder / f"{key}.npy", mmap_mode="r") for key in shapes}
            except (OSError, ValueError, EOFError) as exc:  # a truncated or overwritten file
                raise KDError(f"--teacher_cache: {folder} is damaged ({exc}); remove it to compute it again") from None
            wrong = self._damage(arrays, shapes)
            if wrong:
                raise KDError(f"--teacher_cache: {folder} is damaged ({wrong}); remove it to compute it again")
            self._open[name] = arrays
        return self._open[name]

    def _damage(self, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> str | None:
        """What is wrong with an epoch's saved arrays (a shape, a type, a class out of range), or None."""
        for key, shape in shapes.items():
            kinds, what = self.KINDS[key]
            if arrays[key].shape != shape:
                return f"{key}.npy has shape {arrays[key].shape}, not {shape}"
            if arrays[key].dtype.kind not in kinds:
                return f"{key}.npy holds {arrays[key].dtype}, not {what}"
        if "indices" in arrays and not ((arrays["indices"] >= 0) & (arrays["indices"] < self.num_classes)).all():
            return f"indices.npy names classes outside 0 to {self.num_classes - 1}"
        return None

    def _restore(self, arrays: dict[str, np.ndarray], rows: np.ndarray) -> torch.Tensor:
        """Float32 logits of ``rows`` as stored: rounded to the storage dtype, the tail filled in for top-k."""
        values = torch.from_numpy(np.asarray(arrays["values"][rows], dtype=np.float32))
        if "indices" not in arrays:
            return values
        full = torch.from_numpy(np.asarray(arrays["rest"][rows])).unsqueeze(1).repeat(1, self.num_classes)
        return full.scatter_(1, torch.from_numpy(np.asarray(arrays["indices"][rows], dtype=np.int64)), values)

    def record(self, epoch: int | None, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Keep these samples' logits for ``epoch`` (:meth:`commit` saves the epoch) and return them as stored.

        The run that fills the cache then trains on the very values later runs read back. None when the
        epoch was saved before (without these samples): nothing is stored, the logits are used as they are.
        """
        name = self.split_name(epoch)
        if self.has(epoch):
            return None
        split = self._pending.setdefault(name, _Split(self._shapes(epoch), self.dtype))
        rows, logits = indices.cpu().numpy(), logits.detach().float().cpu()
        if "indices" in split.arrays:
            top = logits.topk(split.arrays["values"].shape[1], dim=1)
            rest = logits.scatter(1, top.indices, -torch.inf).logsumexp(1)
            split.arrays["indices"][rows] = top.indices.numpy()
            split.arrays["rest"][rows] = (rest - np.log(self.num_classes - top.indices.shape[1])).numpy()
            logits = top.values
        if split.arrays["values"].dtype == np.float16 and not _fits_float16(logits):
            self._widen(logits)
        split.arrays["values"][rows] = logits.numpy()
        split.arrays["filled"][rows] = True
        return self._restore(split.arrays, rows)

    def _widen(self, logits: torch.Tensor) -> None:
        """Store this cache's logits as float32 from now on (those kept so far too), saying why."""
        warn(f"--teacher_cache: the teacher's logits reach {logits.abs().max().item():.6g}, more than float16 holds "
             f"to within {FLOAT16_TOLERANCE} (it overflows past {np.finfo(np.float16).max:.0f}); this cache stores "
             "them as float32")
        self.dtype = "float32"
        for pending in self._pending.values():
            pending.arrays["values"] = pending.arrays["values"].astype(np.float32)

    def commit(self, epoch: int | None, rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] = lambda: None) -> None:
        """Save ``epoch``'s logits: written beside the cache, then renamed into place.

        With several processes (``rank`` of ``world_size``, ``barrier`` waiting for all of them), each writes its
        share and rank 0 merges them. The first save also removes the epochs that killed runs left half written.
        """
        split = self._pending.pop(self.split_name(epoch), None)
        if world_size == 1:
            if split is not None and not self.has(epoch):
                self._save(epoch, split.arrays)
            return
        saved = self.has(epoch)  # asked by every process before any merges: the same answer on all of them
        if not saved:  # a process that trained on no sample this epoch writes an empty share: none is missing
            self._write_share(epoch, split or _Split(self._shapes(epoch), self.dtype), rank, world_size)
        barrier()
        if rank == 0 and not saved:
            self._save(epoch, self._merged_shares(epoch, world_size))
        barrier()

    def _share(self, epoch: int | None, rank: int, world_size: int) -> Path:
        return self.folder / f".{self.split_name(epoch)}.part{rank}of{world_size}.npz"

    def _write_share(self, epoch: int | None, split: _Split, rank: int, world_size: int) -> None:
        """One process's share of an epoch, as one file written aside and renamed (a killed write leaves none)."""
        path = self._share(epoch, rank, world_size)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with written_atomically(path) as tmp, tmp.open("wb") as file:
                np.savez(file, **split.arrays)
        except OSError as exc:
            raise KDError(f"--teacher_cache: cannot write {path}: {exc.strerror or exc}") from None

    def _merged_shares(self, epoch: int | None, world_size: int) -> dict[str, np.ndarray]:
        """Every process's share of ``epoch`` in one set of arrays (float32 if any share had to widen), the share
        files then removed; a share that is missing or damaged is a KDError naming it."""
        merged = _Split(self._shapes(epoch), self.dtype).arrays
        shares = [self._share(epoch, rank, world_size) for rank in range(world_size)]
        for path in shares:
            try:
                with np.load(path) as share:
                    arrays = {key: share[key] for key in merged}
            except (OSError, ValueError, KeyError, EOFError) as exc:
                raise KDError(f"--teacher_cache: cannot read {path}, one process's share of "
                              f"{self.split_name(epoch)} ({exc})") from None
            if arrays["values"].dtype != merged["values"].dtype and arrays["values"].dtype == np.float32:
                merged["values"] = merged["values"].astype(np.float32)
            rows = arrays["filled"]
            for key, array in arrays.items():
                merged[key][rows] = array[rows]
        for path in self.folder.glob(f".{self.split_name(epoch)}.part*of*.npz"):  # this run's, and any killed run's
            path.unlink(missing_ok=True)
        return merged

    def _save(self, epoch: int | None, arrays: dict[str, np.ndarray]) -> None:
        """Write one epoch's arrays as its folder, aside and renamed into place."""
        final = self.folder / self.split_name(epoch)
        if not self._cleaned:
            for keyed in sorted(self.folder.parent.glob("*")):  # dead_temporaries passes over files
                remove_dead_temporaries(keyed, what="teacher-cache epoch")
            self._cleaned = True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with written_atomically(final) as tmp:
                tmp.mkdir()
                for name, array in arrays.items():
                    np.save(tmp / f"{name}.npy", array)
        except OSError as exc:
            if not self.has(epoch):  # else another run saved the same epoch first: theirs is as good
                raise KDError(f"--teacher_cache: cannot write {final}: {exc.strerror or exc}") from None

    def nbytes(self) -> int:
        """Bytes on disk of everything cached under this key."""
        return sum(f.stat().st_size for f in self.folder.rglob("*.npy")) if self.folder.is_dir() else 0
