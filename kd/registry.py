"""Name → factory registries (models, losses), with close-match errors and user plug-ins.

`Registry.get` also accepts ``module:Name`` or ``path/to/file.py:Name`` so users plug in their own
classes without editing kd.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Generic, TypeVar
from collections.abc import Callable, Iterable, Iterator

from kd.errors import KDError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + m for m in matches)}?)" if matches else ""


@contextlib.contextmanager
def running_user_code(what: str) -> Iterator[None]:
    """Run a user's code (``what``, e.g. ``'my.py:Net': building it``): its exception, or a ``sys.exit`` that would
    end kd quietly with nothing trained, becomes a KDError naming it; kd's own KDErrors pass as they are."""
    try:
        yield
    except KDError:
        raise
    except SystemExit as exc:
        raise KDError(f"{what} failed: it called sys.exit({exc.code!r})") from None
    except Exception as exc:  # the user's code failed: say where and why
        raise KDError(f"{what} failed: {type(exc).__name__}: {exc}") from None


def import_object(spec: str) -> object:
    """Import ``module:Name`` (an importable module or a .py file path) and return ``Name``."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise KDError(f"'{spec}' is not of the form module:Name or file.py:Name")
    with running_user_code(f"'{spec}': importing {module_part}"):
        if module_part.endswith(".py"):
            path = Path(module_part).expanduser().resolve()
            if not path.is_file():
                raise KDError(f"'{spec}': file {module_part} does not exist")
            module_name = f"kd_user_{path.stem}_{abs(hash(str(path)))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    if not hasattr(module, attr):
        public = [n for n in vars(module) if not n.startswith("_")]
        raise KDError(f"'{spec}': {module_part} has no attribute {attr}{did_you_mean(attr, public)}")
    return getattr(module, attr)


class Registry(Generic[T]):
    """Maps names to factories of one kind (``kind`` appears in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering a class or function under ``name`` (default: its own name)."""

        def add(obj: T) -> T:
            key = name or obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is already registered ({self._entries[key]!r})")
            self._entries[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry called ``name``, or the object that ``module:Name`` points to."""
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return import_object(name)
        raise KDError(self.unknown(name))

    def unknown(self, name: str, extra: Iterable[str] = ()) -> str:
        """The message for an unknown name, suggesting close matches among ours and ``extra``."""
        choices = [*self._entries, *extra]
        hint = did_you_mean(name, choices) or f" (choose from {', '.join(sorted(self._entries))})"
        return f"unknown {self.kind} '{name}'{hint}"

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        """The entry registered as ``name`` (never a ``module:Name`` import)."""
        if name not in self._entries:
            raise KDError(self.unknown(name))
        return self._entries[name]

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def values(self) -> list[T]:
        """The entries in registration order."""
        return list(self._entries.values())
