"""Networks by name: kd's small CNNs, torchvision's, timm's and the CIFAR tables' models, and the user's own.

Each name comes from a model source (kd/models/sources.py) chosen by its prefix: bare names are kd's CNNs
or torchvision's models, ``timm:NAME`` is a timm model, ``cifar:NAME`` one of RepDistiller's and
mdistiller's CIFAR networks, ``module:Name`` a user's class or function.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# The sources register themselves on import, kd's CNNs and torchvision's first: bare names resolve in that order.
from kd.models import cifar, kd_cnns, timm_models, torchvision_models  # noqa: F401
from kd.errors import KDError
from kd.files import checked_path, printable
from kd.models.checkpoints import load_weights, read_checkpoint
from kd.models.sources import USER, ModelSource, find_models, find_source, runs_user_code

# Weights that name a file rather than a source's named weights (DEFAULT, IMAGENET1K_V1).
WEIGHTS_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def check_model_name(name: str, flag: str = "--arch") -> None:
    """Refuse an unknown architecture up front, suggesting close names."""
    find_source(name, flag)


def describe_models(pattern: str = "*") -> str:
    """What each source offers whose names match ``pattern``, grouped by source, for --list_models."""
    lines = []
    for source, names in find_models(pattern).items():
        if names:
            how = "bare names or " if source.bare else ""
            lines += [f"{source.prefix}: {source.about} ({len(names)}; write {how}{source.prefix}:NAME)",
                      *(f"  {source.written(name)}" for name in names)]
    if not lines:
        lines.append(f"no model name matches '{pattern}'; --list_models alone lists them all")
    return "\n".join([*lines, *([f"user: {USER.about}"] if ":" not in pattern else [])])


def _arch_flag(flag: str) -> str:
    """The flag that named the architecture: callers building with weights pass the weights flag."""
    return flag.removesuffix("_weights") + "_arch" if flag.endswith("_weights") else flag


def _names_a_file(weights: str, source: ModelSource, flag: str) -> bool:
    """Whether ``weights`` is a local file rather than one of the source's named weights (DEFAULT)."""
    return (not source.named_weights or checked_path(weights, flag).is_file() or "/" in weights
            or weights.endswith(WEIGHTS_SUFFIXES))


def build_model(arch: str, num_classes: int, weights: str | None = None, flag: str = "--arch") -> nn.Module:
    """A network with ``num_classes`` outputs; ``weights`` is a weights name of its source (DEFAULT) or a file."""
    source, name = find_source(arch, _arch_flag(flag))
    local = weights is not None and _names_a_file(weights, source, flag)
    if weights is not None and not local:
        model = source.pretrained(name, weights, num_classes, flag)
    else:
        model = source.build(name, num_classes)
    if local:
        path = checked_path(weights, flag)
        load_weights(model, read_checkpoint(path, flag)[0], num_classes, str(path), flag)
    return model


def check_forward(model: nn.Module, arch: str, image_size: int, num_classes: int, flag: str,
                  training: bool = True) -> None:
    """Run ``model`` once on two random images: it must return (2, num_classes) logits.

    ``training`` runs it in training mode (as a student), which updates BatchNorm statistics: use it
    on throwaway copies only; a teacher is checked in eval mode, which leaves it untouched.
    """
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            output = model(torch.randn(2, 3, image_size, image_size))
    except (Exception, SystemExit) as exc:  # a fixed input size (ViT), too small a size for its pooling, a user bug
        why = (f"it called sys.exit({exc.code!r})" if isinstance(exc, SystemExit)
               else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        raise KDError(f"{flag} {arch} does not run on {image_size} px images: {why}") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, num_classes):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise KDError(f"{flag} {arch} returns {shape}, not logits of shape (batch, {num_classes})")


def _same_network(saved: str, asked: str) -> bool:
    """Whether two names mean one network: ``resnet18`` is ``torchvision:resnet18``, ``cnn_tiny`` is ``kd:cnn_tiny``."""
    if saved == asked:
        return True
    if runs_user_code(saved) or runs_user_code(asked):  # user code is only ever the same spelling
        return False
    try:
        (source, name), (other, other_name) = find_source(saved, "--arch"), find_source(asked, "--arch")
    except KDError:  # a name no source knows (any more): only the same spelling is the same network
        return False
    return source is other and name == other_name


def load_network(path: str | Path, arch: str, class_names: list[str], image_size: int,
                 flag: str = "--teacher_checkpoint") -> nn.Module:
    """A trained network from a kd checkpoint (or a plain state_dict), refusing one that does not fit."""
    path = checked_path(path, flag)
    state, meta = read_checkpoint(path, flag)
    if not _same_network(meta.get("arch", arch), arch):
        raise KDError(f"{flag}: {path} holds a {meta['arch']}, not the {arch} asked for (--teacher_arch)")
    saved_classes = list(meta.get("class_names", class_names))
    if saved_classes != list(class_names):
        raise KDError(f"{flag}: {path} was trained on {len(saved_classes)} classes "
                      f"({', '.join(map(printable, saved_classes))}) but the data has {len(class_names)} "
                      f"({', '.join(map(printable, class_names))})")
    model = build_model(arch, len(class_names), flag=flag)
    load_weights(model, state, len(class_names), str(path), flag, new_head=False)
    check_forward(model, arch, image_size, len(class_names), flag, training=False)
    return model
