"""Property-based fuzzing of the flags-file, preset and command-line parser (kd.flags.resolve).

The property: any input gives either a configuration or a one-line KDError, never a traceback. Each
example runs ``resolve`` in a temporary working directory holding just the generated files (always a
commandline_args.txt there, so the project's own flags file is never read). Successful results must
name only Config fields in ``sources`` and survive a round trip: ``config.to_dict()`` dumped with
yaml.safe_dump and read back as a ``--config`` preset gives the same settings.

Five tests of 600-1000 examples each (4200 in all), derandomized so that CI sees the same inputs.

The ``@example`` cases are inputs that crashed the parser with a non-KDError exception when this file
was written; they keep the tests failing until kd/config.py handles them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kd.config import Config
from kd.flags import Resolved, resolve
from kd.errors import KDError

FIELD_NAMES = [f.name for f in dataclasses.fields(Config)]
FLAG_NAMES = [*FIELD_NAMES, "flags_file"]
# Near misses of real names: typos, other spellings, a third dash, an empty name.
MISSPELT = sorted({m for n in FIELD_NAMES[::3] for m in (n[:-1], n + "s", n.upper(), n.replace("_", "-"), "-" + n)}
                  | {"", "=", "help", "h"})
NAMES = st.one_of(st.sampled_from(FLAG_NAMES), st.sampled_from(FLAG_NAMES), st.sampled_from(MISSPELT))

NO_USER = "~kd_no_such_user"  # a home directory that cannot be found
LONG_NAME = "a" * 300  # longer than a file name may be (ENAMETOOLONG)

# Values a flag might be given: valid for some flags, invalid for others, and edge cases of the converters.
VALUES = [
    "0", "1", "-1", "2", "3", "8", "16", "64", "-0", "0.0", "0.5", "1.5", "-0.5", "1e-3", "5e-324", "1e308",
    "1e400", "-1e400", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1_000", "0x10", "0o7", "0b1", "1.",
    ".5", "4294967295", "4294967296", "-4294967296", "9" * 40, "9" * 5000, "١٢", "１", "\u00b2",
    "true", "false", "True", "FALSE", "yes", "no", "on", "off", "none", "None", "null", "NULL", "",
    "sgd", "adam", "adamw", "Adam", "cosine", "step", "32-true", "bf16-mixed", "16", "auto", "cpu", "ddp",
    "demo", "runs", "kd", "run#2", "a/b", "..", "a/../b", "/abs", ".", "kl_softmax", "resnet18", "cnn_tiny",
    "p.yaml", "q.yaml", "missing.yaml", "flags.txt", "commandline_args.txt", "~", "é", "x y", "--", "-",
    "-x", "=", "'", '"', "\\", "#", "\t", "\x00", "\x1b[31m", "\u2028", "\ufeff",
]
VALUE = st.one_of(st.sampled_from(VALUES), st.sampled_from(VALUES), st.text(max_size=6))

HINTS = get_type_hints(Config)
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _type_of(name: str) -> tuple[type, bool, bool]:
    """(scalar type, is a list, may be None) of a Config field."""
    hint = HINTS[name]
    if get_origin(hint) is None:
        return hint, False, False
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0], get_origin(hint) is list, len(args) < len(get_args(hint))


# Plain strings that need no quoting in a flags file and load back as strings from YAML.
PLAIN = st.text(alphabet=st.characters(categories=["L", "N", "P", "S"], exclude_characters="\\'\"#"),
                min_size=1, max_size=8)


def _good_text(name: str) -> st.SearchStrategy[list[str]]:
    """Values a flags file or command line would give ``--name`` when it is used right (mostly valid)."""
    if name == "flags_file":
        return st.sampled_from([["none"], ["flags.txt"]])
    kind, is_list, optional = _type_of(name)
    choices = FIELDS[name].metadata.get("choices")
    if name == "config":
        one = st.sampled_from(["p.yaml", "q.yaml"])
    elif choices:
        one = st.sampled_from(choices)
    elif kind is bool:
        return st.sampled_from([[], ["true"], ["false"], ["yes"], ["off"], ["1"], ["0"], ["On"]])
    elif kind is int:
        one = st.one_of(st.integers(8, 1000).map(str), st.sampled_from(["8", "1_000", "64"]))
    elif kind is float:
        one = st.one_of(st.floats(0.01, 0.99).map(repr), st.sampled_from(["0.5", ".5", "1e-1", "0.90"]))
    else:
        one = st.one_of(PLAIN, st.text(min_size=1, max_size=8).map(shlex.quote), st.sampled_from(["none", "run#2"]))
    if optional:
        one = st.one_of(one, st.just("none"))
    return st.lists(one, min_size=0 if is_list else 1, max_size=3 if is_list else 1)


def _good_yaml(name: str) -> st.SearchStrategy:
    """Python values a preset would give ``name`` when it is used right (mostly valid)."""
    kind, is_list, optional = _type_of(name)
    choices = FIELDS[name].metadata.get("choices")
    if choices:
        one = st.sampled_from(choices)
    elif kind is bool:
        one = st.one_of(st.booleans(), st.sampled_from(["yes", "off", "true"]))
    elif kind is int:
        one = st.integers(8, 1000)
    elif kind is float:
        one = st.one_of(st.floats(0.01, 0.99), st.just(0.5))
    else:
        one = st.one_of(PLAIN, st.text(min_size=1, max_size=8))
    if optional:
        one = st.one_of(one, st.none())
    return st.lists(one, max_size=3) if is_list else one


GOOD_TEXT = {name: _good_text(name) for name in FLAG_NAMES}
GOOD_YAML = {name: _good_yaml(name) for name in FIELD_NAMES if name != "config"}

SMALL_PRESET = "epochs: 3\nlr: 0.1\nseeds: [1, 2]\n"
SMALL_FLAGS = "--epochs 2\n--config p.yaml\n"

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])


# ---------------------------------------------------------------- the property

_WORKDIR: Path | None = None  # the working directory of every example (set by the fixture below)


@pytest.fixture(scope="module", autouse=True)
def _workdir(tmp_path_factory: pytest.TempPathFactory):
    """One directory for all examples: each writes its files there and removes them (a fresh temporary
    directory per example costs more than the parsing on slow file systems)."""
    global _WORKDIR
    _WORKDIR = tmp_path_factory.mktemp("fuzz")
    yield
    _WORKDIR = None


def _run(argv: list[str], files: dict[str, str | bytes]) -> Resolved | KDError:
    """``resolve(argv)`` in a working directory holding just ``files``: its result or its KDError.

    Any other exception propagates and fails the test.
    """
    folder = _WORKDIR
    assert folder is not None, "the _workdir fixture sets the working directory"
    files = {"commandline_args.txt": "", **files}
    old = os.getcwd()
    try:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else content.encode("utf-8")
            (folder / name).write_bytes(data)
        os.chdir(folder)
        return resolve(list(argv))
    except KDError as exc:
        return exc
    finally:
        os.chdir(old)
        for name in files:
            (folder / name).unlink(missing_ok=True)


def _check(argv: list[str], files: dict[str, str | bytes]) -> Resolved | None:
    """Assert the property for one input; return the Resolved when there was no error."""
    result = _run(argv, files)
    if isinstance(result, KDError):
        message = str(result)
        assert message.strip(), f"empty KDError message for {argv!r}"
        assert "\n" not in message and "\r" not in message, f"multi-line KDError message: {message!r}"
        return None
    assert isinstance(result, Resolved) and isinstance(result.config, Config)
    assert set(result.sources) <= set(FIELD_NAMES), set(result.sources) - set(FIELD_NAMES)
    result.table()  # what --print_config shows must not fail either
    _assert_round_trip(result.config)
    return result


def _assert_round_trip(config: Config) -> None:
    """``config.to_dict()`` saved as YAML and read back with --config gives the same settings."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    again = _run(["--flags_file", "none", "--config", "saved.yaml"], {"saved.yaml": text})
    assert not isinstance(again, KDError), f"saved settings do not load back: {again}\n{text}"
    assert again.config.to_dict() == config.to_dict(), text


# ---------------------------------------------------------------- 1. flags files as raw text and bytes

# Pieces that matter to the flags-file reader, mixed with arbitrary text so lines look like flags often.
FLAG_PIECES = st.sampled_from([
    "--", "--epochs", "--lr", "--seeds", "--config", "--flags_file", "--hflip", "--optimizer", "epochs", "seed",
    "=", "#", " #", "'", '"', "\\", " ", "  ", "\t", "\n", "\r", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85",
    "\u2028", "\ufeff", "é", "1", "0.5", "-1", "nan", "none", "true", "p.yaml", "~",
])
FLAGS_TEXT = st.one_of(
    st.text(),
    st.lists(st.one_of(FLAG_PIECES, st.text(max_size=4)), max_size=30).map("".join),
)
FLAGS_BYTES = st.one_of(
    st.binary(),
    st.tuples(FLAGS_TEXT, st.binary(min_size=1, max_size=4)).map(lambda p: p[0].encode("utf-8") + p[1]),
    FLAGS_TEXT.map(lambda t: t.encode("latin-1", "replace")),
    FLAGS_TEXT.map(lambda t: t.encode("utf-16")),
)
# Mostly text (written as UTF-8), a quarter of the time bytes that are often not UTF-8.
FLAGS_CONTENT = st.integers(0, 3).flatmap(lambda i: FLAGS_BYTES if i == 0 else FLAGS_TEXT)


@pytest.mark.slow
@settings(max_examples=800, **SETTINGS)
@given(content=FLAGS_CONTENT)
@example(content="--config " + NO_USER)  # RuntimeError from Path.expanduser in _find
@example(content="--config " + LONG_NAME)  # OSError ENAMETOOLONG from Path.is_file in _find
def test_any_flags_file_gives_config_or_one_line_error(content: str | bytes) -> None:
    _check([], {"commandline_args.txt": content, "p.yaml": SMALL_PRESET})


# ---------------------------------------------------------------- 2. flags files built from real flags

def _quoted(value: str, how: int) -> str:
    return [value, shlex.quote(value), f'"{value}"', f"'{value}'", value + " #c", value + "#c"][how]


@st.composite
def flag_line(draw) -> str:
    """One line of a flags file: mostly a real flag with fitting values, else anything from the pools."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from(["", "   ", "# a comment", "  # --epochs 3", "#--lr=x"]))
    if kind <= 6:
        name = draw(st.sampled_from(FIELD_NAMES))
        words = list(draw(GOOD_TEXT[name]))
    else:
        name = draw(NAMES)
        values = draw(st.lists(VALUE, max_size=3))
        quoting = draw(st.lists(st.integers(0, 5), min_size=len(values), max_size=len(values)))
        words = [_quoted(v, q) for v, q in zip(values, quoting)]
    if words and draw(st.booleans()):
        head = f"--{name}={words.pop(0)}"
    else:
        head = f"--{name}"
    line = " ".join([head, *words])
    if draw(st.integers(0, 4)) == 0:
        line = draw(st.sampled_from(["  ", "\t"])) + line + draw(st.sampled_from(["", " ", " # comment", "\r"]))
    return line


FLAG_FILES = st.tuples(st.lists(flag_line(), max_size=6), st.sampled_from(["\n", "\r\n", "\r"]),
                       st.booleans()).map(lambda p: p[1].join(p[0]) + (p[1] if p[2] else ""))


@pytest.mark.slow
@settings(max_examples=1000, **SETTINGS)
@given(content=FLAG_FILES, preset=st.sampled_from([SMALL_PRESET, "", "epochs: x\n", "[1]\n"]))
@example(content="--config " + NO_USER, preset="")  # RuntimeError from Path.expanduser in _find
def test_structured_flags_file_gives_config_or_one_line_error(content: str, preset: str) -> None:
    _check([], {"commandline_args.txt": content, "p.yaml": preset})


# ---------------------------------------------------------------- 3. YAML presets

@settings(max_examples=600, **SETTINGS)
@given(content=st.one_of(
    FLAGS_CONTENT,
    st.text(alphabet=st.sampled_from("{}[]:,-?&*!|>'\"%@` \n\t#abs0123456789.~")),  # YAML syntax soup
    st.lists(st.sampled_from(["seed", "lr", "seeds", "hflip", ": ", ":", "\n", "  ", "- ", "0", "1.5", "x", "!!",
                              "int ", "str ", "&a ", "*a", "[", "]", "{", "}", ", ", "~", "? ", "'", "--"]),
             max_size=20).map("".join),  # near-presets
))
@pytest.mark.slow
@example(content="!!int x")  # ValueError from yaml.safe_load in read_preset
@example(content="!!bool x")  # KeyError from yaml.safe_load in read_preset
@example(content="!!timestamp x")  # AttributeError from yaml.safe_load in read_preset
@example(content="seed: " + "1" * 4301)  # ValueError (int digits limit) from yaml.safe_load in read_preset
@example(content="seed: " + "[" * 1000)  # RecursionError from yaml.compose in read_preset
def test_any_preset_text_gives_config_or_one_line_error(content: str | bytes) -> None:
    _check(["--config", "p.yaml"], {"p.yaml": content})


# Raw YAML scalars, written by hand: the YAML 1.1 forms that load as something other than a string.
YAML_SCALARS = [
    "1", "-1", "0", "3", "64", "0x1f", "0o17", "017", "0b101", "1_000", "1:30", "190:20:30", "+12", "1.5",
    "0.5", "1.0e+3", "1.0e+400", "1e3", ".inf", "-.Inf", ".nan", "~", "null", "Null", "", "yes", "No", "on",
    "OFF", "true", "y", "n", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "'quoted'", '"dq\\tx"', "'1'",
    "[1, 2]", "[]", "[[1]]", "{}", "{a: 1}", "[1, [2]]", "sgd", "adam", "cosine", "32-true", "demo", "kd",
    "run#2", "'#'", "|\n  block\n", ">-\n  folded\n", "=", "<<", "4294967296", "1" * 400, "-" * 3,
]
YAML_TAGS = ["", "", "", "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!timestamp ", "!!binary ",
             "!!seq ", "!!map ", "!!set ", "!!omap ", "!!python/none ", "!foo ", "&a ", "*a "]

YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**33), 2**33), st.floats(),
              st.sampled_from([0.5, 1e-3, 4.0, 1e308, 2**32, 2**64, 10**309]), st.text(max_size=8),
              st.sampled_from(VALUES), st.dates(), st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FLAG_NAMES + ["a"]), inner,
                                                                   max_size=2),
    max_leaves=6,
)
YAML_KEYS = st.one_of(NAMES, NAMES.map(lambda n: "--" + n),
                      st.tuples(st.sampled_from(YAML_TAGS), NAMES).map("".join))


GOOD_ENTRY = st.sampled_from(sorted(GOOD_YAML)).flatmap(lambda n: st.tuples(st.just(n), GOOD_YAML[n]))
ANY_ENTRY = st.tuples(st.one_of(NAMES, NAMES.map(lambda n: "--" + n)), YAML_VALUES)
ENTRY = st.integers(0, 4).flatmap(lambda i: ANY_ENTRY if i == 0 else GOOD_ENTRY)


@st.composite
def preset_text(draw) -> str:
    """A YAML preset: safe_dump of a mapping, or hand-joined entries (duplicates, tags, anchors, aliases)."""
    style = draw(st.integers(0, 3))
    if style <= 1:
        mapping = dict(draw(st.lists(ENTRY, max_size=5)))
        flow = draw(st.sampled_from([False, True, None]))
        return yaml.safe_dump(mapping, sort_keys=False, default_flow_style=flow, allow_unicode=draw(st.booleans()))
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        how = draw(st.integers(0, 5))
        if how <= 1:  # an entry dumped by yaml (may repeat a key)
            lines.append(yaml.safe_dump(dict([draw(ENTRY)]), sort_keys=False).rstrip("\n"))
        elif how == 2:  # an anchored value and an alias to it
            lines.append(f"{draw(NAMES)}: &v {draw(st.sampled_from(YAML_SCALARS))}")
            lines.append(f"{draw(NAMES)}: *v")
        elif how == 3:  # an anchored key repeated by an alias
            name = draw(NAMES)
            lines += [f"&k {name}: {draw(st.sampled_from(YAML_SCALARS))}",
                      f"*k : {draw(st.sampled_from(YAML_SCALARS))}"]
        else:  # a hand-written entry: tagged key or value, raw YAML 1.1 scalar
            value = draw(st.sampled_from(YAML_TAGS)) + draw(st.sampled_from(YAML_SCALARS))
            lines.append(f"{draw(YAML_KEYS)}: {value}")
    body = "\n".join(lines) + "\n"
    head = draw(st.sampled_from(["", "", "---\n", "%YAML 1.1\n---\n", "# preset\n", "--- !!map\n", "--- !!set\n",
                                 "--- !!omap\n", "base: &b {epochs: 2}\n", "<<: {epochs: 2}\n"]))
    tail = draw(st.sampled_from(["", "", "...\n", "---\nepochs: 1\n", "# end"]))
    return head + body + tail


@pytest.mark.slow
@settings(max_examples=1000, **SETTINGS)
@given(first=preset_text(), second=st.one_of(st.none(), preset_text()))
@example(first="lr: 1" + "0" * 309, second=None)  # OverflowError: float(int) in _convert_one
@example(first="seed: 0x" + "f" * 3600, second=None)  # ValueError (int digits limit): repr(raw) in _convert_one
@example(first="lr: [0x" + "f" * 3600 + "]", second=None)  # ValueError (int digits limit): str(value) in read_preset
@example(first="!!set {seed}", second=None)  # TypeError: data[key_node.value] in read_preset
@example(first="!!null seed: 1", second=None)  # KeyError: data[key_node.value] in read_preset
@example(first="seed: !!float x", second=None)  # ValueError from yaml.safe_load in read_preset
def test_structured_preset_gives_config_or_one_line_error(first: str, second: str | None) -> None:
    argv = ["--config", "p.yaml"] + ([] if second is None else ["--config", "q.yaml"])
    _check(argv, {"p.yaml": first, "q.yaml": second or ""})


# ---------------------------------------------------------------- 4. command lines

TOKENS = st.one_of(
    NAMES.map(lambda n: "--" + n),
    NAMES.map(lambda n: "--" + n),
    st.tuples(NAMES, VALUE).map(lambda p: f"--{p[0]}={p[1]}"),
    VALUE,
    st.sampled_from(["--", "-", "-x", "-e", "---", "--=", "--=1", "=", "--help", "-h", "none", "NONE",
                     "p.yaml", "flags.txt", "missing.yaml", "./p.yaml", "~", "~/", NO_USER, LONG_NAME, "/"]),
    st.text(max_size=6),
)


def _group(name: str, values: list[str], eq: bool) -> list[str]:
    return [f"--{name}={values[0]}", *values[1:]] if eq and values else [f"--{name}", *values]


GOOD_GROUP = st.sampled_from(FLAG_NAMES).flatmap(
    lambda n: st.tuples(st.just(n), GOOD_TEXT[n], st.booleans()).map(lambda p: _group(*p)))
ARGV = st.lists(st.integers(0, 2).flatmap(lambda i: TOKENS.map(lambda t: [t]) if i == 0 else GOOD_GROUP),
                max_size=7).map(lambda groups: [token for group in groups for token in group])


@settings(max_examples=800, **SETTINGS)
@given(argv=ARGV,
       flags=st.sampled_from(["", SMALL_FLAGS, "--epochs x\n", "--config\n"]))
@pytest.mark.slow
@example(argv=["--config", NO_USER], flags="")  # RuntimeError from Path.expanduser in _find
@example(argv=["--flags_file", LONG_NAME], flags="")  # OSError ENAMETOOLONG from Path.is_file in _find
def test_any_command_line_gives_config_or_one_line_error(argv: list[str], flags: str) -> None:
    _check(argv, {"commandline_args.txt": flags, "flags.txt": SMALL_FLAGS, "p.yaml": SMALL_PRESET})


# ---------------------------------------------------------------- sanity checks of the harness itself

def test_harness_sees_configs_and_errors() -> None:
    resolved = _check(["--epochs", "5"], {"commandline_args.txt": "--lr 0.5\n--config p.yaml\n",
                                          "p.yaml": "seeds: [1, 2]\nstudent_weights: DEFAULT\n"})
    assert resolved is not None
    assert (resolved.config.epochs, resolved.config.lr, resolved.config.seeds) == (5, 0.5, [1, 2])
    assert _check(["--epochs", "x"], {}) is None
    assert isinstance(_run(["--epochs", "x"], {}), KDError)
