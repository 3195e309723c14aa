"""The ``timm:`` model source: timm's networks, their DEFAULT weights from the Hugging Face cache.

timm itself waits out huggingface_hub's retries (47 s, measured offline) before saying it is offline;
kd looks in the cache first, then asks the Hub once with a deadline, and says what to do in one line.
timm and huggingface_hub are imported on first use: they take seconds to import.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from torch import nn

from kd.errors import KDError
from kd.registry import did_you_mean
from kd.models.sources import ModelSource, downloading, register_source

# The longest kd waits for the Hub to answer whether it holds a file (and whether it is reachable at all).
HUB_DEADLINE_S = 20
# Where timm looks for a Hub repo's weights when its pretrained config names no file.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@register_source
class TimmModels(ModelSource):
    """timm's models, written ``timm:NAME`` or ``timm:NAME.TAG`` (a tag picks other pretrained weights)."""

    prefix, named_weights = "timm", True
    about = "timm's models (NAME.TAG picks other pretrained weights); DEFAULT weights from the Hugging Face cache"

    def names(self, pattern: str = "*") -> list[str]:
        import timm

        return timm.list_models(pattern)

    def has(self, name: str) -> bool:
        import timm

        arch, _, tag = name.partition(".")
        return timm.is_model(arch) and (not tag or name in timm.list_pretrained(name))

    def check(self, name: str, flag: str) -> None:
        """Refuse an unknown model or pretrained tag, suggesting close ones."""
        import timm

        arch, _, tag = name.partition(".")
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag and timm.is_model(arch) and tag not in tags:
            raise KDError(f"{flag}: timm:{arch} has no pretrained tag '{tag}'{did_you_mean(tag, tags)} "
                          f"(its tags: {', '.join(tags) or 'none'})")
        super().check(name, flag)

    def build(self, name: str, num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(name, num_classes=num_classes)

    def pretrained(self, name: str, weights: str, num_classes: int, flag: str) -> nn.Module:
        """timm's pretrained weights of ``name`` (the cache first, else the Hub), the classifier resized."""
        import timm

        if weights != "DEFAULT":
            raise KDError(f"{flag}: timm:{name} takes DEFAULT (timm's pretrained weights; pick others with a tag, "
                          f"e.g. timm:{name.partition('.')[0]}.TAG) or a local weights file, not '{weights}'")
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise KDError(f"{flag}: timm:{name} has no pretrained weights; pass a local weights file")
        if not cfg.hf_hub_id:  # an old release hosted elsewhere: timm fetches it with urllib into torch's cache
            with downloading(f"timm's {name} weights", cfg.url, Path(torch.hub.get_dir()) / "checkpoints", flag):
                return timm.create_model(name, pretrained=True, num_classes=num_classes)
        path = hub_file(cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES,
                        f"timm:{name}", flag)
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay={"file": path})
        except Exception as exc:  # a corrupt or foreign file in the cache
            message = (str(exc).splitlines() or [""])[0]
            raise KDError(f"{flag}: cannot load timm:{name}'s weights from {path}: "
                          f"{type(exc).__name__}: {message}") from None


def hub_file(hub_id: str, files: tuple[str, ...], model: str, flag: str) -> str:
    """The local path of the first of ``files`` in Hub repo ``hub_id`` (``repo@revision``): cached, else downloaded.

    Offline, or when the Hub does not answer within HUB_DEADLINE_S, a one-line KDError says what to do.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    for file in files:
        with contextlib.suppress(LocalEntryNotFoundError):
            return hf_hub_download(repo, file, revision=revision or None, local_files_only=True)
    cache = Path(constants.HF_HUB_CACHE)
    todo = (f"fetch them where you are online (hf download {repo} {files[0]}) and copy the "
            f"models--{repo.replace('/', '--')} folder it writes into {cache}, or pass a local weights file")
    if constants.HF_HUB_OFFLINE:
        raise KDError(f"{flag}: {model}'s DEFAULT weights ({repo}) are not in the Hugging Face cache {cache} "
                      f"and HF_HUB_OFFLINE is set; {todo}")
    found, why = _ask_hub(repo, files, revision or None)
    if found is None:
        raise KDError(f"{flag}: {model}'s DEFAULT weights ({repo}) are not in the Hugging Face cache {cache} and "
                      f"the Hub did not give them ({why}); offline? {todo}")
    try:
        return hf_hub_download(repo, found, revision=revision or None)
    except Exception as exc:  # the connection broke during the download, the disk filled up...
        raise KDError(f"{flag}: downloading {repo}/{found} for {model} failed ({type(exc).__name__}: {exc}); "
                      f"{todo}") from None


def _ask_hub(repo: str, files: tuple[str, ...], revision: str | None) -> tuple[str | None, str]:
    """(the first of ``files`` the Hub holds for ``repo``, '') or (None, why it did not say within HUB_DEADLINE_S).

    One HEAD request per file, without huggingface_hub's retries; the requests run in a daemon thread
    so that not even a name lookup that hangs can hold kd past the deadline.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    answer: list[tuple[str | None, str]] = []

    def ask() -> None:
        for file in files:
            try:
                get_hf_file_metadata(hf_hub_url(repo, file, revision=revision),
                                     timeout=min(constants.HF_HUB_ETAG_TIMEOUT, HUB_DEADLINE_S))
            except EntryNotFoundError:
                continue
            except Exception as exc:  # refused, timed out, a proxy, no such repository, a gated one...
                answer.append((None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"))
                return
            answer.append((file, ""))
            return
        answer.append((None, f"it holds none of {', '.join(files)}"))

    thread = threading.Thread(target=ask, daemon=True, name="kd-hub-probe")
    thread.start()
    thread.join(HUB_DEADLINE_S)
    return answer[0] if answer else (None, f"no answer within {HUB_DEADLINE_S} s")
