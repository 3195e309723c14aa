"""After training: ``--evaluate`` a checkpoint, ``--export`` students, and show what distillation bought."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from kd.config import Config
from kd.evaluate import confusion_figure, evaluate, format_evaluation
from kd.export import export_model, format_profiles, profile_model
from kd.data import make_datamodule
from kd.models import load_network, read_checkpoint
from kd.results import StageResult

EXTENSIONS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def _device(config: Config) -> str:
    return "cuda" if torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda") else "cpu"


def export_network(model: nn.Module, checkpoint: Path, fmt: str, image_size: int) -> str:
    """Write ``model`` beside its checkpoint in format ``fmt``; one line saying where and how close."""
    path = checkpoint.with_suffix(EXTENSIONS[fmt])
    if path.exists():  # a stage that --resume reused was exported the first time round
        return f"already exported: {path}"
    difference = export_model(model.cpu(), fmt, path, image_size)
    return f"exported {path} (outputs within {difference:.1e} of PyTorch's)"


def evaluate_checkpoint(config: Config) -> Path:
    """``--evaluate CHECKPOINT``: accuracy, per-class accuracy and confusion matrix on the validation data."""
    path = Path(config.evaluate).expanduser()
    _, meta = read_checkpoint(path, "--evaluate")
    # A kd checkpoint names its network and image size; a bare state_dict takes --student_arch/--image_size.
    arch = meta.get("arch", config.student_arch)
    config = replace(config, image_size=int(meta.get("image_size", config.image_size)),
                     augment=meta.get("augment", "imagenet" if meta else config.augment))  # older kd: imagenet
    data = make_datamodule(config)
    model = load_network(path, arch, data.classes, config.image_size, "--evaluate")
    result = evaluate(model, data.val_dataloader(), data.classes, _device(config), config.augment)
    logger = TensorBoardLogger(Path(config.output_dir) / config.experiment_name, name="evaluate",
                               default_hp_metric=False)
    logger.log_metrics({"eval/top1": result.top1, "eval/top5": result.top5}, step=0)
    logger.log_metrics({f"eval/class/{name}": acc for name, acc in zip(result.class_names, result.per_class)}, 0)
    logger.experiment.add_figure("eval/confusion_matrix", confusion_figure(result), global_step=0)
    logger.finalize("success")
    print(f"{path} ({arch}, {config.image_size} px) on the validation images of {config.data_dir}:\n"
          f"{format_evaluation(result)}\nlogged to {logger.log_dir}")
    if config.export:
        print(export_network(model, path, config.export, config.image_size))
    return Path(logger.log_dir)


def deploy_students(results: list[StageResult], teacher: nn.Module | None, config: Config,
                    classes: list[str]) -> str:
    """Export each trained student's best checkpoint and compare the teacher's and students' cost."""
    lines, profiles = [], {}
    if teacher is not None:
        profiles["teacher"] = profile_model(teacher.cpu(), config.image_size)
    for result in results:
        if result.stage == "teacher":
            continue
        model = load_network(result.best_checkpoint, result.arch, classes, config.image_size, "--export")
        profiles.setdefault("student", profile_model(model, config.image_size))
        lines.append(export_network(model, result.best_checkpoint, config.export, config.image_size))
    return "\n".join([*lines, format_profiles(profiles)])

