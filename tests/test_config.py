"""Tests of kd.config: how defaults, flags file, YAML presets and command line combine, and their errors."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from kd.config import Config, Role, cache_settings, identity, save_config, with_role
from kd.flags import help_text, resolve
from kd.errors import KDError
from kd.losses import LOSSES
from kd.models.build import check_model_name

PROJECT = Path(__file__).resolve().parent.parent
NO_FILE = ["--flags_file", "none"]
FIELD_NAMES = [f.name for f in dataclasses.fields(Config)]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory with an empty commandline_args.txt (so the project's is never read)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "commandline_args.txt").write_text("")
    return tmp_path


def write(folder, files):
    """Write ``{name: text}`` into ``folder``."""
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def resolve_error(argv):
    """The one-line message of the KDError that resolving ``argv`` raises."""
    with pytest.raises(KDError) as info:
        resolve(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- precedence and sources

def test_each_layer_overrides_the_one_before(cwd):
    write(cwd, {
        "commandline_args.txt": "# flags for the test\n--epochs 2\n\n--lr 0.2\n--batch_size 8\n--seed 1\n"
                                "--config zz_file.yaml\n",
        "zz_file.yaml": "# first preset\nlr: 0.3\nbatch_size: 16\nseed: 2\n",
        "aa_cli.yaml": "batch_size: 32\nseed: 3\n",
    })
    resolved = resolve(["--config", "aa_cli.yaml", "--seed", "4"])
    c, sources = resolved.config, resolved.sources
    assert (c.epochs, c.lr, c.batch_size, c.seed, c.weight_decay) == (2, 0.3, 32, 4, 5e-4)
    assert sources["epochs"] == "commandline_args.txt:2"
    assert sources["lr"].endswith("zz_file.yaml:2")
    assert sources["batch_size"].endswith("aa_cli.yaml:1")
    assert sources["seed"] == "command line"
    assert sources["weight_decay"] == "default"
    assert c.config == ["zz_file.yaml", "aa_cli.yaml"]


@pytest.mark.parametrize("order", [["a.yaml", "b.yaml"], ["b.yaml", "a.yaml"]])
def test_later_preset_wins(cwd, order):
    write(cwd, {"a.yaml": "epochs: 3\nlr: 0.5\n", "b.yaml": "\nepochs: 4\n"})
    resolved = resolve(NO_FILE + ["--config", *order])
    assert resolved.config.epochs == {"a.yaml": 3, "b.yaml": 4}[order[-1]]
    assert resolved.sources["epochs"].endswith({"a.yaml": "a.yaml:1", "b.yaml": "b.yaml:2"}[order[-1]])
    assert resolved.config.lr == 0.5 and resolved.sources["lr"].endswith("a.yaml:2")


def test_preset_named_in_flags_file_is_found_beside_it(cwd):
    write(cwd, {"sub/flags.txt": "--config p.yaml\n", "sub/p.yaml": "epochs: 6\n"})
    resolved = resolve(["--flags_file", "sub/flags.txt"])
    assert resolved.config.epochs == 6
    assert resolved.sources["epochs"].endswith("p.yaml:1")


@pytest.mark.parametrize("argv, epochs, source", [
    ([], 3, "commandline_args.txt:2"),
    (["--flags_file", "other.txt"], 7, "other.txt:1"),
    (["--flags_file=other.txt"], 7, "other.txt:1"),
    (["--flags_file", "none"], 10, "default"),
    (["--flags_file", "NONE"], 10, "default"),
])
def test_flags_file_choice(cwd, argv, epochs, source):
    write(cwd, {"commandline_args.txt": "--lr 0.1\n--epochs 3\n", "other.txt": "--epochs 7\n"})
    resolved = resolve(argv)
    assert resolved.config.epochs == epochs
    assert resolved.sources["epochs"].endswith(source)


@pytest.mark.parametrize("argv, expected", [
    ([], False),
    (["--distill"], True),
    (["--distill", "--epochs", "2"], True),
    (["--distill", "true"], True),
    (["--distill", "yes"], True),
    (["--distill", "false"], False),
    (["--distill", "0"], False),
    (["--distill=false"], False),
    (["--distill=True"], True),
])
def test_boolean_flag_forms(cwd, argv, expected):
    assert resolve(NO_FILE + argv).config.distill is expected


def test_bare_boolean_in_flags_file_and_preset(cwd):
    write(cwd, {"commandline_args.txt": "--distill\n--baseline\n--train_teacher\n--config p.yaml\n",
                "p.yaml": "baseline: false\n"})
    config = resolve([]).config
    assert (config.distill, config.baseline, config.train_teacher) == (True, False, True)


@pytest.mark.parametrize("line, expected", [
    ("--experiment_name run#2", "run#2"),
    ("--experiment_name run # a comment", "run"),
    ("--experiment_name 'a #b'  # comment", "a #b"),
    ("# --experiment_name commented", "kd"),
])
def test_hash_starts_a_comment_only_at_the_start_of_a_word(cwd, line, expected):
    write(cwd, {"commandline_args.txt": line + "\n"})
    assert resolve([]).config.experiment_name == expected


@pytest.mark.parametrize("argv, name, expected", [
    (["--epochs=5"], "epochs", 5),
    (["--epochs", "5"], "epochs", 5),
    (["--lr=1e-3"], "lr", 1e-3),
    (["--seed", "4294967295"], "seed", 2**32 - 1),
    (["--num_classes", "12"], "num_classes", 12),
    (["--num_classes", "none"], "num_classes", None),
    (["--devices", "0,1"], "devices", "0,1"),
    (["--experiment_name", "my run"], "experiment_name", "my run"),
    (["--config"], "config", []),
    (["--kd_loss", "dkd", "at"], "kd_loss", ["dkd", "at"]),
    (["--kd_weights", "1", "0.5"], "kd_weights", [1.0, 0.5]),
    (["--ce_weight", "0"], "ce_weight", 0.0),
    (["--temperature", "none"], "temperature", None),
    (["--loss_options", "dkd.beta=4", "temperature=2"], "loss_options", ["dkd.beta=4", "temperature=2"]),
    (["--student_layers", "layer3", "layer4"], "student_layers", ["layer3", "layer4"]),
    (["--assistant_arch", "resnet34", "resnet18"], "assistant_arch", ["resnet34", "resnet18"]),
])
def test_command_line_values(cwd, argv, name, expected):
    resolved = resolve(NO_FILE + argv)
    assert getattr(resolved.config, name) == expected
    assert resolved.sources[name] == "command line"


@pytest.mark.parametrize("text, name, expected", [
    ("teacher_weights: null\n", "teacher_weights", None),
    ("teacher_checkpoint: null\n", "teacher_checkpoint", []),  # a list flag: no items
    ("teacher_checkpoint: a.ckpt\n", "teacher_checkpoint", ["a.ckpt"]),
    ("num_classes: 5\n", "num_classes", 5),
    ("temperature: 2\n", "temperature", 2.0),
    ("lr: 1.0e-4\n", "lr", 1e-4),
    ("precision: 32\n", "precision", "32"),
    ("--epochs: 4\n", "epochs", 4),
    ("distill: yes\n", "distill", True),
    ("kd_loss: dkd\n", "kd_loss", ["dkd"]),
    ("kd_loss: [kl_softmax, at]\n", "kd_loss", ["kl_softmax", "at"]),
    ("ce_weight: 1\n", "ce_weight", 1.0),
])
def test_preset_values(cwd, text, name, expected):
    write(cwd, {"p.yaml": text})
    value = getattr(resolve(NO_FILE + ["--config", "p.yaml"]).config, name)
    assert value == expected and type(value) is type(expected)


def test_empty_preset_changes_nothing(cwd):
    write(cwd, {"p.yaml": "# nothing yet\n"})
    assert resolve(NO_FILE + ["--config", "p.yaml"]).config.to_dict() == Config().to_dict()


# ---------------------------------------------------------------- errors

ERRORS = {
    "unknown flag in file": ({"commandline_args.txt": "--epochs 2\n--epoch 5\n"}, [],
                             ["commandline_args.txt:2", "--epoch", "did you mean --epochs"]),
    "unknown flag on command line": ({}, ["--batchsize", "3"], ["command line", "--batchsize", "--batch_size"]),
    "bad int": ({"commandline_args.txt": "# c\n\n--epochs five\n"}, [], ["commandline_args.txt:3", "--epochs", "five"]),
    "int given as float": ({}, ["--epochs", "2.5"], ["command line", "--epochs", "2.5"]),
    "bad float": ({}, ["--lr", "fast"], ["command line", "--lr", "fast"]),
    "out of range": ({"commandline_args.txt": "--epochs 2\n--ce_weight -1.5\n"}, [],
                     ["commandline_args.txt:2", "--ce_weight", "-1.5"]),
    "not positive": ({}, ["--epochs", "0"], ["command line", "--epochs", "positive"]),
    "bad choice": ({"commandline_args.txt": "--optimizer sgdd\n"}, [],
                   ["commandline_args.txt:1", "--optimizer", "sgdd", "did you mean sgd"]),
    "bad boolean": ({}, ["--distill", "maybe"], ["command line", "--distill", "maybe"]),
    "two flags on a line": ({"commandline_args.txt": "--epochs 3 --lr 0.1\n"}, [],
                            ["commandline_args.txt:1", "--epochs", "--lr"]),
    "line without a flag": ({"commandline_args.txt": "--lr 0.1\nepochs 3\n"}, [],
                            ["commandline_args.txt:2", "epochs"]),
    "value before any flag": ({}, ["5", "--epochs", "3"], ["command line", "'5'"]),
    "unbalanced quote": ({"commandline_args.txt": "--epochs 3\n--experiment_name 'oops\n"}, [],
                         ["commandline_args.txt:2", "--experiment_name"]),
    "too many values": ({"commandline_args.txt": "--epochs 3 4\n"}, [], ["commandline_args.txt:1", "--epochs", "3 4"]),
    "missing value": ({}, ["--epochs"], ["command line", "--epochs"]),
    "unknown key in preset": ({"p.yaml": "epochs: 3\nlrr: 0.1\n"}, ["--config", "p.yaml"],
                              ["p.yaml:2", "lrr", "did you mean --lr"]),
    "flags_file in preset": ({"p.yaml": "flags_file: x.txt\n"}, ["--config", "p.yaml"], ["p.yaml:1", "flags_file"]),
    "invalid yaml": ({"p.yaml": "epochs: 3\nlr: [0.1\n"}, ["--config", "p.yaml"], ["p.yaml:3", "YAML"]),
    "tab in yaml": ({"p.yaml": "epochs: 3\n\tlr: 0.1\n"}, ["--config", "p.yaml"], ["p.yaml:2", "YAML"]),
    "yaml list": ({"p.yaml": "- epochs\n- 3\n"}, ["--config", "p.yaml"], ["p.yaml:1", "mapping"]),
    "yaml scalar": ({"p.yaml": "\nepochs 3\n"}, ["--config", "p.yaml"], ["p.yaml:2", "mapping"]),
    "preset names config": ({"p.yaml": "epochs: 3\nconfig: [q.yaml]\n", "q.yaml": "lr: 1\n"}, ["--config", "p.yaml"],
                            ["p.yaml:2", "config"]),
    "missing preset on command line": ({}, ["--config", "nope.yaml"], ["command line", "nope.yaml", "not found"]),
    "missing preset in flags file": ({"commandline_args.txt": "--config nope.yaml\n"}, [],
                                     ["commandline_args.txt:1", "nope.yaml", "not found"]),
    "yaml list for scalar": ({"p.yaml": "lr: 0.1\nepochs: [1, 2]\n"}, ["--config", "p.yaml"], ["p.yaml:2", "--epochs"]),
    "yaml one-item list for scalar": ({"p.yaml": "epochs: [5]\n"}, ["--config", "p.yaml"],
                                      ["p.yaml:1", "--epochs", "list"]),
    "duplicate key in preset": ({"p.yaml": "epochs: 3\nlr: 0.1\nepochs: 4\n"}, ["--config", "p.yaml"],
                                ["p.yaml:3", "epochs", "twice"]),
    "yaml bool for int": ({"p.yaml": "epochs: true\n"}, ["--config", "p.yaml"], ["p.yaml:1", "--epochs", "True"]),
    "yaml float for int": ({"p.yaml": "\n\nepochs: 2.5\n"}, ["--config", "p.yaml"], ["p.yaml:3", "--epochs", "2.5"]),
    "yaml mapping value": ({"p.yaml": "lr: {a: 1}\n"}, ["--config", "p.yaml"], ["p.yaml:1", "--lr"]),
    "yaml null for required": ({"p.yaml": "data_dir: null\n"}, ["--config", "p.yaml"], ["p.yaml:1", "--data_dir"]),
    "yaml out of range": ({"p.yaml": "ce_weight: -2\n"}, ["--config", "p.yaml"], ["p.yaml:1", "--ce_weight", "-2"]),
    "negative seed": ({}, ["--seed", "-3"], ["command line", "--seed", "-3"]),
    "infinite float": ({"commandline_args.txt": "--lr inf\n"}, [], ["commandline_args.txt:1", "--lr", "finite"]),
    "nan float": ({}, ["--temperature", "nan"], ["command line", "--temperature", "finite"]),
    "empty experiment name": ({}, ["--experiment_name", ""], ["--experiment_name", "non-empty relative"]),
    "experiment name leaving output_dir": ({}, ["--experiment_name", "a/../../x"], ["--experiment_name", ".."]),
    "absolute experiment name": ({}, ["--experiment_name", "/tmp/x"], ["--experiment_name", "relative"]),
    "missing flags file": ({}, ["--flags_file", "missing.txt"], ["--flags_file", "missing.txt"]),
    "flags_file without value": ({}, ["--flags_file"], ["--flags_file"]),
}


@pytest.mark.parametrize("files, argv, parts", ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_file_line_and_flag(cwd, files, argv, parts):
    write(cwd, files)
    message = resolve_error(argv)
    for part in parts:
        assert part in message


def test_flags_file_named_inside_a_flags_file_is_a_clear_error(cwd):
    write(cwd, {"commandline_args.txt": "--epochs 2\n--flags_file other.txt\n", "other.txt": "--epochs 3\n"})
    message = resolve_error([])
    assert "commandline_args.txt:2" in message and "--flags_file" in message


def test_preset_that_is_not_text_is_a_clear_error(cwd):
    (cwd / "p.yaml").write_bytes(b"\x80\x81epochs: 3\n")
    assert "p.yaml" in resolve_error(NO_FILE + ["--config", "p.yaml"])


@pytest.mark.parametrize("text, expected", [("teacher_weights:\n", None), ("num_classes:  # unset\n", None),
                                            ("teacher_checkpoint:\n", []),
                                            ("data_dir:\n", KDError)])
def test_empty_preset_value_is_null(cwd, text, expected):
    write(cwd, {"p.yaml": text})
    if expected is KDError:
        assert "p.yaml:1" in resolve_error(NO_FILE + ["--config", "p.yaml"])
    else:
        config = resolve(NO_FILE + ["--config", "p.yaml"]).config
        assert getattr(config, text.partition(":")[0]) == expected


def test_flags_file_that_is_not_text_is_a_clear_error(cwd):
    (cwd / "commandline_args.txt").write_bytes(b"--epochs \x80\x81\n")
    assert "commandline_args.txt" in resolve_error([])


# ---------------------------------------------------------------- table, save, help

def test_table_shows_each_flag_value_and_source(cwd):
    write(cwd, {"commandline_args.txt": "--epochs 2\n--config p.yaml\n", "p.yaml": "lr: 0.5\n"})
    resolved = resolve(["--seed", "9"])
    lines = resolved.table().splitlines()
    assert len(lines) == len(FIELD_NAMES)
    for name, line in zip(FIELD_NAMES, lines):
        assert line.startswith(f"--{name} ")
        assert line.endswith(resolved.sources[name])
        value = getattr(resolved.config, name)
        shown = (" ".join(map(str, value)) or "[]") if isinstance(value, list) else str(value)
        assert shown in line or name == "config"
    sources = {line.split()[0]: line for line in lines}
    assert sources["--epochs"].endswith("commandline_args.txt:1")
    assert sources["--lr"].endswith("p.yaml:1")
    assert sources["--seed"].endswith("command line")
    assert sources["--momentum"].endswith("default")


@pytest.mark.parametrize("argv", [
    [],
    ["--epochs", "3", "--lr", "1e-5", "--num_classes", "5", "--distill", "--teacher_checkpoint", "t.ckpt",
     "--devices", "1", "--scheduler", "none", "--precision", "bf16-mixed", "--experiment_name", "yes",
     "--output_dir", "null", "--data_dir", "1e3", "--warmup_epochs", "2", "--weight_decay", "0"],
], ids=["defaults", "tricky values"])
def test_saved_config_is_a_preset_that_repeats_the_run(cwd, argv):
    original = resolve(NO_FILE + argv).config
    save_config(original, cwd / "saved.yaml")
    assert list(yaml.safe_load((cwd / "saved.yaml").read_text())) == list(original.to_dict())
    assert sorted(p.name for p in cwd.iterdir()) == ["commandline_args.txt", "saved.yaml"]  # no temp file left
    again = resolve(NO_FILE + ["--config", "saved.yaml"])
    assert again.config.to_dict() == original.to_dict()
    assert all(again.sources[name].startswith(str(cwd / "saved.yaml:")) for name in original.to_dict())


@pytest.mark.parametrize("name", FIELD_NAMES + ["flags_file"])
def test_help_lists_every_flag(name):
    assert any(line.lstrip().startswith(f"--{name} ") for line in help_text().splitlines())


def test_help_shows_defaults_and_choices():
    lines = {line.split()[0]: line for line in help_text().splitlines() if line.lstrip().startswith("--")}
    assert "[default: 10]" in lines["--epochs"]
    assert "sgd, adam, adamw" in lines["--optimizer"] and "[default: sgd]" in lines["--optimizer"]


# ---------------------------------------------------------------- shipped files

def assert_runnable_names(config):
    """The architectures and loss a shipped file names exist (without building anything)."""
    for arch in config.teacher_arch:
        check_model_name(arch)
    check_model_name(config.student_arch)
    assert config.kd_loss and all(name in LOSSES for name in config.kd_loss)


# Every YAML file under configs/ is a preset, but for the published CIFAR-100 figures (data for scripts/reproduce.py).
PRESETS = sorted(p for p in PROJECT.glob("configs/**/*.yaml") if p != PROJECT / "configs/cifar100/published.yaml")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(PROJECT / "configs")))
def test_shipped_preset_resolves(cwd, preset):
    resolved = resolve(NO_FILE + ["--config", str(preset)])
    assert resolved.config.config == [str(preset)]
    for name in yaml.safe_load(preset.read_text()) or {}:
        assert resolved.sources[name].startswith(f"{preset}:")
    assert_runnable_names(resolved.config)


def test_shipped_flags_file_resolves_and_is_the_default(cwd):
    (cwd / "commandline_args.txt").unlink()
    shipped = resolve(["--flags_file", str(PROJECT / "commandline_args.txt")])
    assert resolve([]).config == shipped.config
    assert_runnable_names(shipped.config)


def _flags_without_roles(cls: type) -> list[str]:
    """Fields of ``cls`` with no role, or with INVOCATION beside another role (it means: not saved)."""
    bad = []
    for f in dataclasses.fields(cls):
        roles = f.metadata.get("roles") or frozenset()
        if not roles or not all(isinstance(r, Role) for r in roles) or (Role.INVOCATION in roles and len(roles) > 1):
            bad.append(f.name)
    return bad


def test_every_flag_declares_its_roles():
    """A flag without a role would silently be left out of --resume's comparison and the cache key."""
    assert _flags_without_roles(Config) == []


def test_the_role_check_catches_a_flag_without_roles():
    @dataclasses.dataclass
    class WithNewFlag(Config):
        new_flag: int = 3  # added without _flag(): no roles

    assert _flags_without_roles(WithNewFlag) == ["new_flag"]


def test_stage_identities_follow_the_roles():
    """What --resume compares per stage, and what keys the teacher cache, come from the fields' roles."""
    teacher, baseline, distill = (with_role(r) for r in (Role.TEACHER, Role.BASELINE, Role.DISTILL))
    assert {"teacher_arch", "teacher_weights", "epochs", "seed", "data_dir"} <= teacher
    assert "student_arch" not in teacher and "kd_loss" not in baseline
    assert {"kd_loss", "temperature", "teacher_checkpoint", "student_arch", "teacher_cache_dtype"} <= distill
    assert not (with_role(Role.INVOCATION) & (teacher | baseline | distill))
    assert "num_workers" not in teacher | baseline | distill | with_role(Role.CACHE_KEY)
    key = cache_settings(Config(image_cache="some/folder"))
    assert key["image_cache"] is True and key["teacher_arch"] == ["resnet50"] and "epochs" not in key


@pytest.mark.parametrize("a, b", [("data", "data/"), ("data", "./data"), ("runs/x/../data", "runs/data")])
def test_path_flags_compare_normalised(a, b):
    assert Config(data_dir=a).identity(Role.TEACHER) == Config(data_dir=b).identity(Role.TEACHER)
    assert Config(data_dir=a).identity(Role.TEACHER) != Config(data_dir="other").identity(Role.TEACHER)


def test_invocation_flags_are_not_saved():
    saved = Config().to_dict()
    assert not set(saved) & with_role(Role.INVOCATION)
    assert {"resume", "config", "print_config", "report", "evaluate"} <= with_role(Role.INVOCATION)


def test_a_flag_a_saved_config_lacks_reads_as_its_default():
    """A stage saved before kd had a flag ran with that flag's default behaviour: --resume may reuse it."""
    saved = Config().to_dict()
    del saved["augment"], saved["milestones"]
    assert identity(saved, Role.TEACHER) == Config().identity(Role.TEACHER)
    assert identity(saved, Role.TEACHER) != Config(augment="cifar").identity(Role.TEACHER)
