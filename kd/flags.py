"""Reading flags: the command line, ``commandline_args.txt`` and YAML presets, layered into one Config.

Later wins: built-in defaults → commandline_args.txt → YAML presets (in the order named) → command
line. Every value remembers where it came from, for ``--print_config`` and for error messages.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml

from kd.config import FIELDS, TYPES, Config, is_list, scalar_type
from kd.errors import KDError
from kd.files import checked_path, shown
from kd.registry import did_you_mean

FLAGS_FILE = "commandline_args.txt"
PROJECT_DIR = Path(__file__).resolve().parent.parent
# The checkout kd runs from (experiment.py beside the kd package), or None for an installed kd, whose
# parent folder is site-packages: a flags file or preset another package left there is not kd's.
CHECKOUT_DIR = PROJECT_DIR if (PROJECT_DIR / "experiment.py").is_file() else None
# Flags that only the command line understands: they choose which flags file is read.
CLI_ONLY = {"flags_file": "read flags from this file instead of commandline_args.txt ('none' reads none)"}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


@dataclass
class Setting:
    """One flag as written somewhere: its name, raw values and where it was written."""

    name: str
    values: list[Any]
    where: str  # "commandline_args.txt:3", "configs/x.yaml:5", "command line"


def _repr(value: Any, limit: int = 80) -> str:
    """A value as shown in an error: repr'd, and cut short (a 5,000-digit number cannot even be repr'd)."""
    try:
        text = repr(value)
    except ValueError:
        return "<a number too long to show>"
    return text if len(text) <= limit else text[:limit] + "…"


def _convert_one(name: str, raw: Any, where: str) -> Any:
    """Turn one raw value (a string from a flags file, or a YAML scalar) into the flag's type."""
    kind = scalar_type(name)
    fail = KDError(f"{where}: --{name} expects {kind.__name__ if kind is not str else 'a string'}, got {_repr(raw)}")
    if isinstance(raw, (list, dict, bytes)) or (kind is not bool and isinstance(raw, bool)):
        raise fail
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
        if type(None) in get_args(TYPES[name]):
            return None
        if raw is None:
            raise fail
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in _TRUE | _FALSE:
            return str(raw).lower() in _TRUE
        raise KDError(f"{where}: --{name} expects true or false, got {_repr(raw)}")
    if kind is str:
        return str(raw)
    try:
        if kind is int and isinstance(raw, float):
            raise ValueError
        value = kind(raw)
    except (TypeError, ValueError, OverflowError):
        raise fail from None
    if kind is float and not math.isfinite(value):
        raise KDError(f"{where}: --{name} must be a finite number, got {_repr(raw)}")
    return value


def _convert(setting: Setting) -> Any:
    """The typed, checked value of a setting, or a KDError naming where it was written."""
    name, values, where = setting.name, setting.values, setting.where
    meta = FIELDS[name].metadata
    if is_list(name):
        values = [] if values == [None] else values  # an empty YAML value: no items
        value = [_convert_one(name, v, where) for v in values]
        items = value
    else:
        if not values and scalar_type(name) is bool:
            values = [True]
        elif not values and meta["bare"] is not None:
            values = [meta["bare"]]
        if len(values) != 1:
            raise KDError(f"{where}: --{name} takes one value, got {len(values)}: {' '.join(map(str, values))}")
        value = _convert_one(name, values[0], where)
        items = [] if value is None else [value]
    for item in items:
        if meta["choices"] and item not in meta["choices"]:
            raise KDError(f"{where}: --{name} must be one of {', '.join(meta['choices'])}, got {_repr(item)}"
                          f"{did_you_mean(str(item), meta['choices'])}")
        if meta["check"] and not meta["check"](item):
            raise KDError(f"{where}: --{name} must {meta['must']}, got {_repr(item)}")
    return value


def _unknown_flag(name: str, where: str) -> KDError:
    shown = name if name.isprintable() else _repr(name)
    return KDError(f"{where}: unknown flag --{shown}{did_you_mean(name, [*FIELDS, *CLI_ONLY], '--')}")


def parse_tokens(tokens: list[str], where: str) -> list[Setting]:
    """Group ``--flag value ...`` tokens (also ``--flag=value``) into settings."""
    settings: list[Setting] = []
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            if name not in FIELDS and name not in CLI_ONLY:
                raise _unknown_flag(name, where)
            settings.append(Setting(name, [value] if eq else [], where))
        elif not settings:
            raise KDError(f"{where}: expected a flag like --epochs, got {token!r}")
        else:
            settings[-1].values.append(token)
    return settings


def _strip_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a word outside quotes (``--experiment_name run#2`` keeps its #)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def read_flags_file(path: Path) -> list[Setting]:
    """Settings from a flags file: one flag per line, ``#`` comments and blank lines allowed."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KDError(f"cannot read flags file {shown(path)}: {exc}") from None
    settings = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            tokens = shlex.split(_strip_comment(line))
        except ValueError as exc:
            raise KDError(f"{where}: cannot parse line ({exc}): {line.strip()}") from None
        if not tokens:
            continue
        line_settings = parse_tokens(tokens, where)
        if line_settings and line_settings[0].name in CLI_ONLY:
            raise KDError(f"{where}: --{line_settings[0].name} can only be given on the command line")
        if len(line_settings) > 1:
            raise KDError(f"{where}: one flag per line, found {len(line_settings)}: {line.strip()}")
        settings += line_settings
    return settings


def read_preset(path: Path) -> list[Setting]:
    """Settings from a YAML preset: a flat mapping of flag names (without --) to values."""
    try:
        text = path.read_text()
        node, data = yaml.compose(text), yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise KDError(f"cannot read preset {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise KDError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except (ValueError, TypeError, LookupError, AttributeError, RecursionError) as exc:  # PyYAML on odd tags
        raise KDError(f"{path}: not a usable YAML preset ({type(exc).__name__}: {_repr(str(exc))})") from None
    if node is None:
        return []
    if not isinstance(node, yaml.MappingNode):
        raise KDError(f"{path}:{node.start_mark.line + 1}: a preset must be a mapping of flag: value")
    settings: list[Setting] = []
    for key_node, _ in node.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        name = str(key_node.value).removeprefix("--")
        if name not in FIELDS:
            raise _unknown_flag(name, where)
        if name == "config":
            raise KDError(f"{where}: a preset cannot name other presets; list them all with --config")
        if not isinstance(data, dict) or key_node.value not in data:
            raise KDError(f"{where}: a preset must map plain flag names to values")
        if any(s.name == name for s in settings):
            raise KDError(f"{where}: {name} is set twice in this preset")
        value = data[key_node.value]
        if isinstance(value, list) and not is_list(name):
            raise KDError(f"{where}: --{name} takes one value, got a list {_repr(value)}")
        settings.append(Setting(name, value if isinstance(value, list) else [value], where))
    return settings


def _find(path: str, bases: list[Path], what: str, where: str) -> Path:
    """Resolve a relative file name against the current directory, then ``bases``."""
    candidate = checked_path(path, f"{where}: {what}")
    for base in [Path.cwd(), *bases]:
        found = checked_path(base / candidate, f"{where}: {what}")
        if found.is_file():
            return found
        if found.exists():  # a folder, a pipe, a device: something is there, but not a file to read
            kind = "a folder" if found.is_dir() else "not a regular file (a pipe, a device or a socket)"
            raise KDError(f"{where}: {what} {_repr(path)} is {kind}, not a file of flags")
    raise KDError(f"{where}: {what} {_repr(path)} not found")


# Flags that make kd do one thing instead of training, and the flags each would silently drop: given as high up
# the layers (or higher), one of them is refused; given lower (the checkout's commandline_args.txt trains), the
# mode wins, as `python experiment.py --evaluate best.ckpt` expects.
MODES = {"evaluate": ("report", "train_teacher", "baseline", "distill", "tune", "resume"),
         "report": ("train_teacher", "baseline", "distill", "tune", "resume", "export")}
MODE_DOES = {"evaluate": "evaluates one checkpoint", "report": "compares finished runs"}


@dataclass
class Resolved:
    """A configuration plus the source of each value, and the layer it came from (0 default ... 3 command line)."""

    config: Config
    sources: dict[str, str]
    levels: dict[str, int] = dataclasses.field(default_factory=dict)

    def check_modes(self) -> None:
        """Refuse a mode (--evaluate, --report) with a flag it would drop, given on the same layer or a later one."""
        for mode, dropped in MODES.items():
            if not getattr(self.config, mode):
                continue
            for name in dropped:
                if getattr(self.config, name) not in (None, False, []) and self.levels[name] >= self.levels[mode]:
                    raise KDError(f"--{mode} ({self.sources[mode]}) and --{name} ({self.sources[name]}) both given: "
                                  f"--{mode} only {MODE_DOES[mode]} and trains nothing; run them one after the other")

    def table(self) -> str:
        """A three-column text table: flag, value, where it came from."""
        rows = [(f"--{k}", _show(v), self.sources[k]) for k, v in dataclasses.asdict(self.config).items()]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "[]"
    return str(value)


def default_flags_file() -> Path | None:
    """commandline_args.txt in the working directory, else the one beside experiment.py in a checkout."""
    if Path(FLAGS_FILE).is_file():
        return Path(FLAGS_FILE)
    if CHECKOUT_DIR and (CHECKOUT_DIR / FLAGS_FILE).is_file():
        return CHECKOUT_DIR / FLAGS_FILE
    return None


def resolve(argv: list[str]) -> Resolved:
    """Build the configuration from the flags file, presets and command line ``argv``."""
    cli = parse_tokens(argv, "command line")
    flags_file = default_flags_file()
    for setting in cli:
        if setting.name == "flags_file":
            if len(setting.values) != 1:
                raise KDError("command line: --flags_file takes one value: a file, or none")
            chosen = setting.values[0]
            flags_file = None if chosen.lower() == "none" else _find(chosen, [], "flags file", "--flags_file")
    cli = [s for s in cli if s.name != "flags_file"]
    from_file = read_flags_file(flags_file) if flags_file else []

    presets: list[tuple[str, Path]] = []
    preset_bases = [CHECKOUT_DIR] if CHECKOUT_DIR else []
    for settings, bases in ((from_file, [flags_file.parent] if flags_file else []), (cli, preset_bases)):
        for setting in settings:
            if setting.name == "config":
                for name in _convert(setting):
                    presets.append((name, _find(name, bases, "preset", setting.where)))
    layers = [from_file, [s for _, path in presets for s in read_preset(path)], cli]

    values = {name: getattr(Config(), name) for name in FIELDS}
    sources, levels = dict.fromkeys(FIELDS, "default"), dict.fromkeys(FIELDS, 0)
    for level, settings in enumerate(layers, start=1):
        for setting in settings:
            values[setting.name] = _convert(setting)
            sources[setting.name], levels[setting.name] = setting.where, level
    values["config"] = [name for name, _ in presets]
    return Resolved(Config(**values), sources, levels)


def help_text() -> str:
    """The list of flags with defaults and help, grouped as in Config."""
    lines = ["usage: python experiment.py [--flag value ...]",
             f"Flags are read from {FLAGS_FILE}, then --config presets, then the command line.", ""]
    group = None
    for name, f in FIELDS.items():
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"{group}:")
        default = _show(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        choices = f" ({', '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""
        lines.append(f"  --{name:<20} {f.metadata['help']}{choices} [default: {default}]")
    lines += ["", *(f"  --{k:<20} {v}" for k, v in CLI_ONLY.items())]
    return "\n".join(lines)
