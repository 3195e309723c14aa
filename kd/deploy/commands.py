"""After training: ``--evaluate`` a checkpoint, ``--export`` students, and show what distillation bought."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from kd.config import Config
from kd.data.transforms import RECIPES
from kd.data.loaders import make_datamodule
from kd.errors import KDError, warn
from kd.deploy.metrics import (Evaluation, confusion_figure, device_of, evaluate, format_evaluation,
                               weight_problems)
from kd.deploy.export import METADATA_FILE, export_model, format_profiles, profile_model, read_metadata
from kd.files import file_digest, writer_thread_errors_raised_here
from kd.models.build import load_network
from kd.models.checkpoints import read_checkpoint
from kd.models.sources import trusted_arch
from kd.report.results import RESULT_FILE, StageResult

EXTENSIONS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def preprocessing(image_size: int, augment: str) -> str:
    """How an image becomes the network's input, as --augment's validation transform and normalisation do it."""
    recipe = RECIPES[augment]
    size = (f"resize the short side to {round(image_size * 256 / 224)} px (bilinear, antialiased), centre-crop "
            f"{image_size}x{image_size}" if recipe.resized
            else f"centre-crop {image_size}x{image_size} (zero-padded if smaller, no resizing)")
    return (f"{size}; RGB values scaled to [0, 1]; per channel subtract mean {list(recipe.mean)} and divide by "
            f"std {list(recipe.std)}")


def export_metadata(arch: str, class_names: list[str], image_size: int, augment: str) -> dict[str, str]:
    """What an exported file says about itself: its classes and the input it expects (ONNX metadata_props,
    TorchScript's kd.json)."""
    recipe = RECIPES[augment]
    return {"arch": arch, "class_names": json.dumps(list(class_names)), "image_size": str(image_size),
            "input": f"float32 NCHW (N, 3, {image_size}, {image_size}), RGB",
            "preprocessing": preprocessing(image_size, augment),
            "mean": json.dumps(list(recipe.mean)), "std": json.dumps(list(recipe.std)),
            "output": f"logits: float32 (N, {len(class_names)}) in the order of class_names; softmax: probabilities"}


def how_to_call(fmt: str, path: Path, metadata: dict[str, str]) -> str:
    """Two lines for the console: how to run an exported file, and what its input must be."""
    if fmt == "onnx":
        call = (f"session = onnxruntime.InferenceSession({str(path)!r}); logits = session.run(None, {{'images': x}})"
                "[0]  (class names: onnx.load(...).metadata_props)")
    else:
        call = (f"extra = {{{METADATA_FILE!r}: ''}}; model = torch.jit.load({str(path)!r}, _extra_files=extra); "
                f"logits = model(x)  (class names: json.loads(extra[{METADATA_FILE!r}]))")
    return f"  run it: {call}\n  x: {metadata['input']}; {metadata['preprocessing']}"


def export_network(model: nn.Module, checkpoint: Path, fmt: str, image_size: int, metadata: dict[str, str]) -> str:
    """Write ``model`` beside its checkpoint in format ``fmt``; lines saying where, how close and how to call it.

    The file records the checkpoint's content hash: an export of the very same content is reused; one of
    earlier content (a run that resumed and went on) is exported anew, the earlier file kept beside it.
    """
    path = checkpoint.with_suffix(EXTENSIONS[fmt])
    metadata = {**metadata, "checkpoint": checkpoint.name, "checkpoint_sha256": file_digest(checkpoint)}
    previous = earlier = None
    if path.is_file():
        earlier = read_metadata(fmt, path).get("checkpoint_sha256")
        if earlier == metadata["checkpoint_sha256"]:
            return f"already exported from this very {checkpoint.name}: {path}\n{how_to_call(fmt, path, metadata)}"
        stem = path.name.removesuffix(EXTENSIONS[fmt])
        previous = path.with_name(f"{stem}.old-{(earlier or file_digest(path))[:8]}{EXTENSIONS[fmt]}")
    difference = export_model(model.cpu(), fmt, path, image_size, metadata=metadata, previous=previous)
    why = (f"{checkpoint.name} changed since it was exported" if earlier else
           "the file there names no checkpoint it came from (an older kd's export, or no export)")
    done = (f"exported {path}" if previous is None else
            f"re-exported {path}: {why} (the earlier file is kept as {previous.name})")
    return f"{done} (outputs within {difference:.1e} of PyTorch's)\n{how_to_call(fmt, path, metadata)}"


def _first(problems: list[str]) -> str:
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more tensor{'s' * (more > 1)})" if more else "")


def _check_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or infinite values; warn of absurdly large ones: their accuracies mean nothing."""
    broken, absurd = weight_problems(state)
    if broken:
        raise KDError(f"--evaluate: {path} is broken: {_first(broken)}; the run that saved it diverged? "
                      "evaluate an earlier checkpoint")
    if absurd:
        warn(f"--evaluate: {path}: {_first(absurd)}; a diverged run? its accuracies may mean little")


def _check_settings(path: Path, meta: dict) -> None:
    """Refuse a checkpoint whose recorded settings kd could not have written (another program's, or edited)."""
    expected = {"arch": ("a network name", lambda v: isinstance(v, str) and v),
                "image_size": ("a positive whole number", lambda v: isinstance(v, int) and v > 0),
                "augment": (f"one of {', '.join(RECIPES)}", lambda v: isinstance(v, str) and v in RECIPES),
                "class_names": ("a list of names",
                                lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v))}
    for key, (what, valid) in expected.items():
        if key in meta and not valid(meta[key]):
            raise KDError(f"--evaluate: {path} records {key} {meta[key]!r}, not {what}; not a checkpoint kd wrote?")


def _log_evaluation(result: Evaluation, folder: Path) -> Path | None:
    """Log the accuracies and the confusion figure to TensorBoard under ``folder/evaluate/version_N``.

    A folder that cannot be written (read-only, a full disk) is a warning naming it: the metrics are printed already.
    """
    logger = TensorBoardLogger(folder, name="evaluate", default_hp_metric=False)
    scalars = {"eval/top1": result.top1, "eval/top5": result.top5,
               **{f"eval/class/{name}": acc for name, acc in zip(result.class_names, result.per_class)}}
    try:
        with writer_thread_errors_raised_here():
            writer = logger.experiment  # not log_metrics, which turns an OSError into "you tried to log 8.33 ..."
            for name, value in scalars.items():
                writer.add_scalar(name, value, 0)
            writer.add_figure("eval/confusion_matrix", confusion_figure(result), global_step=0)
            logger.finalize("success")
    except OSError as exc:
        warn(f"--evaluate: cannot log to {logger.log_dir}: {exc.strerror or exc}; the metrics above are not saved")
        return None
    print(f"logged to {logger.log_dir}", flush=True)
    return Path(logger.log_dir)


def named_archs(config: Config) -> set[str]:
    """The architectures the user named (flags, flags file, preset): the only user code kd may import."""
    return {config.student_arch, *config.teacher_arch, *config.assistant_arch, *config.mutual}


def evaluate_checkpoint(config: Config) -> Path | None:
    """``--evaluate CHECKPOINT``: accuracy, per-class accuracy and confusion matrix on the validation data.

    Returns the TensorBoard folder they were logged to (None if it could not be written).
    """
    path = Path(config.evaluate).expanduser()
    state, meta = read_checkpoint(path, "--evaluate")
    _check_weights(path, state)
    # A kd checkpoint names its network and image size; a bare state_dict takes --student_arch/--image_size.
    _check_settings(path, meta)
    arch = trusted_arch(meta.get("arch", config.student_arch), named_archs(config), f"--evaluate: {path}",
                        "--student_arch")
    config = replace(config, image_size=int(meta.get("image_size", config.image_size)),
                     augment=meta.get("augment", "imagenet" if meta else config.augment))  # older kd: imagenet
    data = make_datamodule(config)
    model = load_network(path, arch, data.classes, config.image_size, "--evaluate")
    result = evaluate(model, data.val_dataloader(), data.classes, device_of(config.accelerator), config.augment)
    print(f"{path} ({arch}, {config.image_size} px) on the validation images of {config.data_dir}:\n"
          f"{format_evaluation(result)}", flush=True)
    log_dir = _log_evaluation(result, Path(config.output_dir) / config.experiment_name)
    if config.export:
        metadata = export_metadata(arch, data.classes, config.image_size, config.augment)
        print(export_network(model, path, config.export, config.image_size, metadata))
    return log_dir


def deploy_students(results: list[StageResult], teacher: nn.Module | None, config: Config,
                    classes: list[str]) -> str:
    """Export each trained student's best checkpoint and compare the teacher's and students' cost."""
    lines, profiles = [], {}
    if teacher is not None:
        profiles["teacher"] = profile_model(teacher.cpu(), config.image_size)
    for result in results:
        if result.stage in ("teacher", "ensemble"):  # an ensemble's members are exported as themselves
            continue
        flag = "--assistant_arch" if result.stage.startswith("assistant") else "--student_arch"
        arch = trusted_arch(result.arch, named_archs(config), f"--export: {result.log_dir / RESULT_FILE}", flag)
        model = load_network(result.best_checkpoint, arch, classes, config.image_size, "--export")
        profiles.setdefault("student", profile_model(model, config.image_size))
        metadata = export_metadata(arch, classes, config.image_size, config.augment)
        lines.append(export_network(model, result.best_checkpoint, config.export, config.image_size, metadata))
    return "\n".join([*lines, format_profiles(profiles)])
