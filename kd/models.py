"""Networks by name: kd's small CNNs, torchvision's, timm's and the CIFAR tables' models, and the user's own.

Each name comes from a model source (kd/model_sources.py) chosen by its prefix: bare names are kd's CNNs
or torchvision's models, ``timm:NAME`` is a timm model, ``cifar:NAME`` one of RepDistiller's and
mdistiller's CIFAR networks, ``module:Name`` a user's class or function.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torchvision
from torch import nn

from kd import cifar, timm_models  # noqa: F401 - registers the cifar: and timm: sources
from kd.errors import KDError
from kd.registry import Registry, did_you_mean
from kd.model_sources import (USER, ModelSource, RegistrySource, downloading, find_models, find_source, register_source,
                              runs_user_code)

MODELS: Registry = Registry("model")
# Weights that name a file rather than a source's named weights (DEFAULT, IMAGENET1K_V1).
WEIGHTS_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


class SimpleCNN(nn.Module):
    """Conv-BN-ReLU blocks, each halving the resolution, then global pooling and a linear head."""

    def __init__(self, widths: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        blocks, channels = [], 3
        for width in widths:
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register()
def cnn_tiny(num_classes: int) -> nn.Module:
    """Two blocks (8, 16 channels), ~1.6k parameters: a student that trains in seconds on a CPU."""
    return SimpleCNN((8, 16), num_classes)


@MODELS.register()
def cnn_small(num_classes: int) -> nn.Module:
    """Three blocks (16, 32, 64 channels), ~25k parameters."""
    return SimpleCNN((16, 32, 64), num_classes)


@MODELS.register()
def cnn_medium(num_classes: int) -> nn.Module:
    """Four blocks (32, 64, 128, 256 channels), ~390k parameters: a CPU-sized teacher."""
    return SimpleCNN((32, 64, 128, 256), num_classes)


# torchvision models that return auxiliary outputs in training mode unless told not to.
AUX_LOGITS = {"googlenet", "inception_v3"}


@register_source
class KdModels(RegistrySource):
    """kd's own CNNs (bare names, or kd:NAME)."""

    prefix, bare, registry = "kd", True, MODELS
    about = "kd's small CNNs, trained in seconds on a CPU"


@register_source
class TorchvisionModels(ModelSource):
    """torchvision's classification models (bare names, or torchvision:NAME), with its weights enums."""

    prefix, bare, named_weights = "torchvision", True, True
    about = "torchvision's classification models; weights DEFAULT, IMAGENET1K_V1, ... into torch's cache"

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(torchvision.models.list_models(module=torchvision.models, include=pattern))

    def has(self, name: str) -> bool:
        return name in torchvision.models.list_models(module=torchvision.models)

    def build(self, name: str, num_classes: int) -> nn.Module:
        return torchvision.models.get_model(name, num_classes=num_classes, **self._options(name))

    def pretrained(self, name: str, weights: str, num_classes: int, flag: str) -> nn.Module:
        """Fetch the weights into torch's cache (failing fast offline) and resize the classifier."""
        enum = torchvision.models.get_model_weights(name)
        member = weights.rpartition(".")[2]
        if member not in enum.__members__:
            raise KDError(f"{flag}: {name} has no weights '{weights}'{did_you_mean(member, enum.__members__)} "
                          f"(choose from {', '.join(enum.__members__)}, or give a local file)")
        chosen = enum[member]
        with downloading(str(chosen), chosen.url, Path(torch.hub.get_dir()) / "checkpoints", flag):
            model = torchvision.models.get_model(name, weights=chosen, **self._options(name))
        _replace_heads(model, len(chosen.meta["categories"]), num_classes)
        return model

    @staticmethod
    def _options(name: str) -> dict:
        return {"aux_logits": False} if name in AUX_LOGITS else {}


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


def _class_layers(model: nn.Module, out_features: int) -> list[str]:
    """Names of the layers that produce ``out_features`` class scores (the classifier heads)."""
    return [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) and m.out_features == out_features)
            or (isinstance(m, nn.Conv2d) and m.out_channels == out_features and m.kernel_size == (1, 1))]


def _replace_heads(model: nn.Module, old_classes: int, num_classes: int) -> None:
    """Resize every classifier head (main and auxiliary) from ``old_classes`` to ``num_classes`` outputs."""
    for name in _class_layers(model, old_classes):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = (nn.Linear(old.in_features, num_classes) if isinstance(old, nn.Linear)
               else nn.Conv2d(old.in_channels, num_classes, 1))
        setattr(parent, child, new)


def require_file(path: Path, flag: str) -> None:
    """Refuse a weights path that is a folder or does not exist, naming ``flag``."""
    if path.is_dir():
        raise KDError(f"{flag}: {path} is a folder, not a weights file")
    if not path.is_file():
        raise KDError(f"{flag}: file {path} does not exist")


def read_checkpoint(path: Path, flag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and hyper-parameters saved in a weights file of any format kd reads.

    ``model.*`` of a kd checkpoint; the ``model`` entry of a RepDistiller or mdistiller file (``{'model':
    state_dict, 'epoch', 'optimizer', 'best_acc'}``: how their released teachers are saved); a state_dict;
    a .safetensors file.
    """
    require_file(path, flag)
    try:
        data = (safetensors.torch.load_file(path) if path.suffix == ".safetensors"
                else torch.load(path, map_location="cpu", weights_only=True))
    except safetensors.SafetensorError as exc:
        raise KDError(f"{flag}: cannot load {path}: not a safetensors file, or truncated ({exc})") from None
    except Exception as exc:  # a truncated file, not a torch file at all, or pickled objects
        with path.open("rb") as file:  # a real torch file is a zip archive (or an old-style pickle)
            looks_like_torch = zipfile.is_zipfile(file) or (file.seek(0) == 0 and file.read(1) == b"\x80")
        pickled = "Weights only load failed" in str(exc) and looks_like_torch
        why = ("it holds pickled Python objects; save a state_dict instead" if pickled
               else f"not a PyTorch file, or truncated ({type(exc).__name__})")
        raise KDError(f"{flag}: cannot load {path}: {why}") from None
    meta = {}
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        meta = data.get("hyper_parameters") if isinstance(data.get("hyper_parameters"), dict) else {}
        data = {k.removeprefix("model."): v for k, v in data["state_dict"].items() if k.startswith("model.")}
    elif isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise KDError(f"{flag}: {path} holds no state_dict of tensors")
    return data, meta


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int, source: str, flag: str,
                 new_head: bool = True) -> None:
    """Load ``state`` into ``model``, refusing weights that do not fit.

    With ``new_head``, classifier heads trained for another class count are skipped and stay freshly
    initialised (fine-tuning); without it (a teacher) every weight must fit.
    """
    own = model.state_dict()
    heads = tuple(f"{name}." for name in _class_layers(model, num_classes)) if new_head else ()
    keep = {k: v for k, v in state.items() if not (k.startswith(heads) and k in own and own[k].shape != v.shape)}
    for key, value in keep.items():
        if key in own and own[key].shape != value.shape:
            raise KDError(f"{flag}: {source} does not fit this model: {key} has shape "
                          f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if not k.startswith(heads)]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise KDError(f"{flag}: {source} does not fit this model ({what}, "
                      f"{len(missing)} missing and {len(unexpected)} unexpected keys in all)")


def _arch_flag(flag: str) -> str:
    """The flag that named the architecture: callers building with weights pass the weights flag."""
    return flag.removesuffix("_weights") + "_arch" if flag.endswith("_weights") else flag


def _names_a_file(weights: str, source: ModelSource) -> bool:
    """Whether ``weights`` is a local file rather than one of the source's named weights (DEFAULT)."""
    return (not source.named_weights or Path(weights).expanduser().is_file() or "/" in weights
            or weights.endswith(WEIGHTS_SUFFIXES))


def build_model(arch: str, num_classes: int, weights: str | None = None, flag: str = "--arch") -> nn.Module:
    """A network with ``num_classes`` outputs; ``weights`` is a weights name of its source (DEFAULT) or a file."""
    source, name = find_source(arch, _arch_flag(flag))
    local = weights is not None and _names_a_file(weights, source)
    if weights is not None and not local:
        model = source.pretrained(name, weights, num_classes, flag)
    else:
        model = source.build(name, num_classes)
    if local:
        path = Path(weights).expanduser()
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
    except Exception as exc:  # a fixed input size (ViT), too small an image for its pooling, a user bug
        message = (str(exc).splitlines() or [""])[0]
        raise KDError(f"{flag} {arch} does not run on {image_size} px images: "
                      f"{type(exc).__name__}: {message}") from None
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
    path = Path(path).expanduser()
    state, meta = read_checkpoint(path, flag)
    if not _same_network(meta.get("arch", arch), arch):
        raise KDError(f"{flag}: {path} holds a {meta['arch']}, not the {arch} asked for (--teacher_arch)")
    saved_classes = list(meta.get("class_names", class_names))
    if saved_classes != list(class_names):
        raise KDError(f"{flag}: {path} was trained on {len(saved_classes)} classes ({', '.join(saved_classes)}) "
                      f"but the data has {len(class_names)} ({', '.join(class_names)})")
    model = build_model(arch, len(class_names), flag=flag)
    load_weights(model, state, len(class_names), str(path), flag, new_head=False)
    check_forward(model, arch, image_size, len(class_names), flag, training=False)
    return model
