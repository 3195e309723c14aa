"""Weights files of every format kd reads (kd checkpoints, RepDistiller's and mdistiller's, state_dicts,
safetensors), read without unpickling Python objects, and loaded into a network only if they fit."""

from __future__ import annotations

import zipfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from kd.errors import KDError
from kd.files import checked_path
from kd.models.heads import class_layers


def require_file(path: Path, flag: str) -> None:
    """Refuse a weights path that is a folder, does not exist or cannot be looked at, naming ``flag``."""
    path = checked_path(path, flag)
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
    heads = tuple(f"{name}." for name in class_layers(model, num_classes)) if new_head else ()
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
