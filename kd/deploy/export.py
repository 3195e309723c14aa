"""Deployment: a trained network saved as ONNX or TorchScript and checked, and what it costs to run."""

from __future__ import annotations

import importlib.util
import os
import json
import statistics
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd.errors import KDError
from kd.files import WriteError, written_atomically
from kd.deploy.metrics import eval_mode
from kd.tables import text_table

EXPORT_BATCH, CHECK_BATCH = 2, 3  # checked on another batch size than the exported one: the batch is dynamic
WARMUP_RUNS = 3
Predict = Callable[[torch.Tensor], torch.Tensor]


METADATA_FILE = "kd.json"  # a TorchScript file's metadata: this extra file, read with torch.jit.load(_extra_files=)


def _save_onnx(model: nn.Module, images: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    # One self-contained file (no external weights beside it), so that it can be renamed into place.
    torch.onnx.export(model, (images,), path, input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, dynamo=True,
                      verbose=False)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, path)


def _load_onnx(path: Path) -> Predict:
    import onnxruntime  # optional: only --export onnx needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def _read_onnx(path: Path) -> dict[str, str]:
    import onnx

    return {prop.key: prop.value for prop in onnx.load(path, load_external_data=False).metadata_props}


def _save_torchscript(model: nn.Module, images: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    torch.jit.save(torch.jit.trace(model, images), str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def _load_torchscript(path: Path) -> Predict:
    return torch.jit.load(str(path), map_location="cpu")


def _read_torchscript(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as archive:  # what torch.jit.load(_extra_files=) reads, without loading the model
        name = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
        return json.loads(archive.read(name)) if name else {}


class Format(NamedTuple):
    save: Callable[[nn.Module, torch.Tensor, Path, dict[str, str]], None]
    load: Callable[[Path], Predict]
    read_metadata: Callable[[Path], dict[str, str]]
    packages: tuple[str, ...]  # what it needs beyond torch


FORMATS = {
    "onnx": Format(_save_onnx, _load_onnx, _read_onnx, ("onnx", "onnxscript", "onnxruntime")),
    "torchscript": Format(_save_torchscript, _load_torchscript, _read_torchscript, ()),
}


def read_metadata(fmt: str, path: Path) -> dict[str, str]:
    """The metadata an exported file carries (ONNX metadata_props, TorchScript's kd.json); {} for none or a
    file that is no export of this format."""
    try:
        return FORMATS[fmt].read_metadata(Path(path))
    except Exception:  # a truncated file, another format, a folder: no metadata kd can trust
        return {}


def export_model(model: nn.Module, fmt: str, path: Path, image_size: int, tolerance: float = 1e-4,
                 metadata: dict[str, str] | None = None, previous: Path | None = None) -> float:
    """Save the eval-mode ``model`` (on the CPU) to a new file ``path`` as ``fmt``, checked against PyTorch.

    The file is written beside ``path`` and renamed into place only once its outputs on a fixed batch
    match the model's within ``tolerance``; returns the largest absolute difference of the logits.
    ``metadata`` goes into the file. An existing ``path`` is refused, unless ``previous`` names where
    to move it (once the new file passed its check): an export never destroys another.
    """
    flag = f"--export {fmt}"
    if fmt not in FORMATS:
        raise KDError(f"--export: unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    path = Path(path)
    if path.is_dir():
        raise KDError(f"{flag}: {path} is a folder; the export needs a file name there")
    if path.exists() and previous is None:
        raise KDError(f"{flag}: {path} already exists; move it away or choose another name")
    missing = [name for name in FORMATS[fmt].packages if importlib.util.find_spec(name) is None]
    if missing:
        raise KDError(f"{flag} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    generator = torch.Generator().manual_seed(0)
    example, check = (torch.randn(n, 3, image_size, image_size, generator=generator)
                      for n in (EXPORT_BATCH, CHECK_BATCH))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from None
    with written_atomically(path) as tmp:
        with eval_mode(model), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export; saying so to every user of
            # --export torchscript helps no one (warnings about the trace itself still show).
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
            try:
                FORMATS[fmt].save(model, example, tmp, metadata or {})
                with torch.inference_mode():
                    expected, got = model(check), FORMATS[fmt].load(tmp)(check)
            except OSError as exc:  # a full disk or a read-only folder: name the file meant, not the temporary
                raise WriteError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from None
            except Exception as exc:  # a model that does not run, an operation the format cannot express, or
                # a file that fails on another batch size (a trace that froze it)
                message = (str(exc).strip().splitlines() or [""])[0]
                raise KDError(f"{flag}: cannot export to {path}: {type(exc).__name__}: {message}") from None
        difference = (got - expected).abs().max().item()
        if not difference <= tolerance:  # also refuses NaN
            raise KDError(f"{flag}: {path} was not written: its outputs differ from PyTorch's by up to "
                          f"{difference:.3g} (tolerance {tolerance:g})")
        if previous is not None and path.exists():
            os.replace(path, previous)
    return difference


@dataclass
class Profile:
    """What a network costs: parameters, multiply-accumulates per image and CPU latency for one image."""

    params: int
    macs: int
    latency_ms: float


def profile_model(model: nn.Module, image_size: int, runs: int = 20) -> Profile:
    """Count ``model``'s parameters and MACs and time it on one image (median of ``runs``, after warm-up).

    The model (on the CPU) runs in eval mode without gradients; its weights and modes are left as they were.
    """
    image = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    times = []
    with eval_mode(model), torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(image)
        for _ in range(WARMUP_RUNS):
            model(image)
        for _ in range(runs):
            start = time.perf_counter()
            model(image)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return Profile(params, counter.get_total_flops() // 2, 1000 * statistics.median(times))


def _human(count: float) -> str:
    """1234567 → '1.2 M': a count with a unit prefix."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {prefix}"
    return str(count)


def format_profiles(profiles: dict[str, Profile]) -> str:
    """A table of the profiled networks; given a teacher and a student, how much smaller and faster the student is."""
    rows = [(name, f"{p.params:,}", _human(p.macs), f"{p.latency_ms:.2f}") for name, p in profiles.items()]
    text = text_table(("model", "params", "MACs / image", "CPU latency (ms, batch 1)"), rows)
    if "teacher" in profiles and "student" in profiles:
        teacher, student = profiles["teacher"], profiles["student"]
        text += (f"\nthe student is {teacher.params / student.params:.1f}× smaller, needs "
                 f"{teacher.macs / student.macs:.1f}× fewer MACs and runs "
                 f"{teacher.latency_ms / student.latency_ms:.1f}× faster than the teacher")
    return text
