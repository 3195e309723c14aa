"""Model sources: where a network comes from, chosen by the prefix of its name (``timm:convnext_nano``).

A source is one small class decorated with ``@register_source``: it lists its names, builds a network
with ``num_classes`` outputs and loads its own named weights (``DEFAULT``). A bare name is looked up
in the sources that take bare names (kd's CNNs, then torchvision) in the order they were registered;
any other ``module:Name`` or ``path/to/file.py:Name`` is a user's own class or function.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.error import URLError

from torch import nn

from kd.errors import KDError
from kd.files import checked_path
from kd.registry import Registry, did_you_mean, import_object, running_user_code

DOWNLOAD_TIMEOUT_S = 30


class ModelSource:
    """Networks of one origin. Subclass it, set ``prefix``, and decorate the class with ``@register_source``."""

    prefix = ""  # names from this source are written prefix:NAME
    about = ""  # what it offers, one line for --list_models
    bare = False  # also answers names written without the prefix
    named_weights = False  # has weights chosen by name (--*_weights DEFAULT) besides local files

    def names(self, pattern: str = "*") -> list[str]:
        """Its model names matching a shell-style ``pattern``, sorted."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        """Whether it builds ``name``."""
        return name in self.names()

    def check(self, name: str, flag: str) -> None:
        """Refuse a name this source does not have, suggesting close ones."""
        if not self.has(name):
            hint = did_you_mean(name, self.names(), self.written("")) or f" (see --list_models '{self.prefix}:*')"
            raise KDError(f"{flag}: unknown {self.prefix} model '{name}'{hint}")

    def build(self, name: str, num_classes: int) -> nn.Module:
        """A freshly initialised ``name`` with ``num_classes`` outputs."""
        raise NotImplementedError

    def pretrained(self, name: str, weights: str, num_classes: int, flag: str) -> nn.Module:
        """``name`` with its named ``weights`` and the classifier resized to ``num_classes`` (if ``named_weights``)."""
        raise NotImplementedError

    def written(self, name: str) -> str:
        """``name`` as a user writes it: bare for sources that take bare names, else prefixed."""
        return name if self.bare else f"{self.prefix}:{name}"


class RegistrySource(ModelSource):
    """A source whose networks are the functions of a kd Registry, each called with ``num_classes``."""

    registry: Registry

    def names(self, pattern: str = "*") -> list[str]:
        return self.registry.names(pattern)

    def has(self, name: str) -> bool:
        return name in self.registry

    def build(self, name: str, num_classes: int) -> nn.Module:
        return self.registry.get(name)(num_classes=num_classes)


MODEL_SOURCES: Registry[ModelSource] = Registry("model source")  # by prefix, in registration order
S = TypeVar("S", bound=type[ModelSource])


def register_source(cls: S) -> S:
    """Class decorator: names written ``cls.prefix:NAME`` (and bare ones if ``cls.bare``) now come from ``cls``."""
    MODEL_SOURCES.register(cls.prefix)(cls())
    return cls


def _prefixes() -> str:
    return ", ".join(source.prefix for source in sources())


def sources() -> list[ModelSource]:
    """Every model source, those taking bare names first (a bare name is theirs), each kind in registration order."""
    return sorted(MODEL_SOURCES.values(), key=lambda source: not source.bare)


class UserSource(ModelSource):
    """A user's ``module:Name`` or ``path/to/file.py:Name``: a class or function taking ``num_classes``."""

    about = "your own network: module:Name or path/to/file.py:Name, a class or function taking num_classes"

    def names(self, pattern: str = "*") -> list[str]:
        return []

    def check(self, name: str, flag: str) -> None:
        """Refuse a spec whose file does not exist or whose module is neither a source nor importable."""
        module, _, attr = name.rpartition(":")
        if not module or not attr:
            raise KDError(f"{flag}: '{name}' is not of the form module:Name or file.py:Name")
        if module.endswith(".py"):
            if not checked_path(module, flag).is_file():
                raise KDError(f"{flag}: '{name}': file {module} does not exist")
        elif not _importable(module.partition(".")[0]):
            hint = did_you_mean(module, MODEL_SOURCES)
            raise KDError(f"{flag}: '{name}': '{module}' is neither a model source{hint} "
                          f"nor an importable module (the sources are {_prefixes()})")

    def build(self, name: str, num_classes: int) -> nn.Module:
        """The user's network, refusing anything that is not a Module and naming what failed."""
        factory: Callable[..., object] = import_object(name)  # type: ignore[assignment]
        with running_user_code(f"{name}: building it"):
            model = factory(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise KDError(f"{name}: built a {type(model).__name__}, not a torch.nn.Module")
        return model


USER = UserSource()


def _importable(module: str) -> bool:
    """Whether a top-level module can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # an empty or relative name
        return False


def runs_user_code(arch: str) -> bool:
    """Whether building ``arch`` imports a user's module or file (``module:Name``, ``file.py:Name``)."""
    prefix, colon, _ = arch.partition(":")
    return bool(colon) and prefix not in MODEL_SOURCES


def trusted_arch(arch: str, named: Collection[str], where: str, flag: str) -> str:
    """``arch`` as a file kd reads (``where``) records it, refused if it is user code the user did not name.

    A checkpoint or a record from anywhere must never make kd import a module or run a file: the user's own
    network is built only when the user names it too (``flag``), as ``trust_remote_code`` asks elsewhere.
    """
    if runs_user_code(arch) and arch not in named:
        raise KDError(f"{where} names the architecture {arch}, which is code outside kd; kd runs such code only "
                      f"when you name it yourself: give {flag} {arch} if you trust it")
    return arch


def find_source(arch: str, flag: str) -> tuple[ModelSource, str]:
    """The source of ``arch`` and the name it has there, refusing names that no source has."""
    prefix, colon, name = arch.partition(":")
    if colon:
        source = MODEL_SOURCES[prefix] if prefix in MODEL_SOURCES else None
        if source is None:
            USER.check(arch, flag)
            return USER, arch
        source.check(name, flag)
        return source, name
    for source in sources():
        if source.bare and source.has(arch):
            return source, arch
    raise KDError(f"{flag}: unknown model '{arch}'{_close_names(arch)}")


def _close_names(name: str) -> str:
    """A hint for an unknown bare name: the same name in a prefixed source, else close bare names, else close
    names in the prefixed sources."""
    exact = [source.written(name) for source in sources() if not source.bare and source.has(name)]
    if exact:
        return f" (did you mean {' or '.join(exact)}?)"
    hint = did_you_mean(name, [n for source in sources() if source.bare for n in source.names()])
    for source in sources():
        if hint:
            break
        if not source.bare:
            hint = did_you_mean(name, source.names(), f"{source.prefix}:")
    return hint or " (see --list_models)"


def find_models(pattern: str, flag: str = "--list_models") -> dict[ModelSource, list[str]]:
    """The names matching ``pattern`` in each source: ``timm:*net*`` searches timm only, ``*net*`` every source."""
    prefix, colon, rest = pattern.partition(":")
    if not colon:
        return {source: source.names(pattern) for source in sources()}
    if prefix not in MODEL_SOURCES:
        raise KDError(f"{flag} {pattern}: '{prefix}' is not a model source{did_you_mean(prefix, MODEL_SOURCES)}; "
                      f"the sources are {_prefixes()}")
    return {MODEL_SOURCES[prefix]: MODEL_SOURCES[prefix].names(rest or "*")}


@contextlib.contextmanager
def downloading(what: str, url: str, cache: Path, flag: str) -> Iterator[None]:
    """Let a library fetch ``what`` from ``url`` into ``cache`` with urllib, failing fast and clearly when offline."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except (URLError, OSError, TimeoutError) as exc:
        raise KDError(f"{flag}: could not download {what} from {url} ({exc}); offline? "
                      f"put the file in {cache} or pass a local weights file") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
