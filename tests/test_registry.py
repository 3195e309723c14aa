"""Tests of kd.registry: Registry lookups and errors, did_you_mean, and import_object for user plug-ins."""

import pytest

from kd.errors import KDError
from kd.registry import Registry, did_you_mean, import_object


@pytest.fixture
def widgets():
    """A registry of three functions: two registered under their own names, one under an explicit name."""
    registry = Registry("widget")

    @registry.register()
    def alpha():
        return "alpha"

    @registry.register()
    def alpha_beta():
        return "alpha_beta"

    @registry.register("gamma")
    def anything():
        return "gamma"

    return registry


def error_message(call, *args):
    with pytest.raises(KDError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_module(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- Registry

@pytest.mark.parametrize("name", ["alpha", "alpha_beta", "gamma"])
def test_get_returns_the_registered_object(widgets, name):
    assert widgets.get(name)() == name
    assert name in widgets


def test_register_returns_the_object_unchanged():
    registry = Registry("widget")

    def thing():
        return 1

    assert registry.register()(thing) is thing
    assert registry.register("other")(thing) is thing
    assert registry.get("thing") is registry.get("other") is thing


@pytest.mark.parametrize("name", ["anything", "beta", "", "Alpha"])
def test_unregistered_names_are_not_contained(widgets, name):
    assert name not in widgets


@pytest.mark.parametrize("pattern, expected", [
    ("*", ["alpha", "alpha_beta", "gamma"]),
    ("alpha*", ["alpha", "alpha_beta"]),
    ("*_beta", ["alpha_beta"]),
    ("?amma", ["gamma"]),
    ("delta*", []),
])
def test_names_match_a_shell_pattern_sorted(widgets, pattern, expected):
    assert widgets.names(pattern) == expected


def test_names_default_is_everything(widgets):
    assert widgets.names() == widgets.names("*") == ["alpha", "alpha_beta", "gamma"]


@pytest.mark.parametrize("register", [lambda r: r.register(), lambda r: r.register("alpha")],
                         ids=["own name", "explicit name"])
def test_duplicate_registration_raises_value_error(widgets, register):
    def alpha():
        return "again"

    with pytest.raises(ValueError, match="alpha"):
        register(widgets)(alpha)
    assert widgets.get("alpha")() == "alpha"


@pytest.mark.parametrize("name, parts", [
    ("alpah", ["unknown widget 'alpah'", "did you mean alpha"]),
    ("gama", ["did you mean gamma"]),
    ("zzzzzz", ["unknown widget 'zzzzzz'", "choose from alpha, alpha_beta, gamma"]),
])
def test_unknown_name_suggests_close_matches(widgets, name, parts):
    message = error_message(widgets.get, name)
    for part in parts:
        assert part in message


def test_unknown_suggests_from_extra_names(widgets):
    assert "did you mean resnet18" in widgets.unknown("resnet19", ["resnet18", "vgg11"])


def test_get_with_colon_imports_the_object(widgets):
    assert widgets.get("kd.errors:KDError") is KDError


# ---------------------------------------------------------------- did_you_mean

@pytest.mark.parametrize("name, choices, prefix, expected", [
    ("epoch", ["epochs", "lr"], "--", " (did you mean --epochs?)"),
    ("sgdd", ["sgd", "adam", "adamw"], "", " (did you mean sgd?)"),
    ("adan", ["sgd", "adam", "adamw"], "", " (did you mean adam or adamw?)"),
    ("xyz", ["sgd", "adam"], "", ""),
    ("xyz", [], "", ""),
])
def test_did_you_mean(name, choices, prefix, expected):
    assert did_you_mean(name, choices, prefix) == expected


# ---------------------------------------------------------------- import_object

def test_import_object_from_file_absolute_and_relative(tmp_path, monkeypatch):
    path = write_module(tmp_path, "plugins/plug.py", "VALUE = 41\n\ndef answer():\n    return VALUE + 1\n")
    assert import_object(f"{path}:answer")() == 42
    monkeypatch.chdir(tmp_path)
    assert import_object("plugins/plug.py:VALUE") == 41


def test_import_object_keeps_same_named_files_apart(tmp_path):
    first = write_module(tmp_path, "a/plug.py", "NAME = 'a'\n")
    second = write_module(tmp_path, "b/plug.py", "NAME = 'b'\n")
    assert (import_object(f"{first}:NAME"), import_object(f"{second}:NAME")) == ("a", "b")


def test_import_object_from_module():
    assert import_object("kd.registry:Registry") is Registry


@pytest.mark.parametrize("spec, parts", [
    ("no_colon_here", ["no_colon_here", "module:Name"]),
    ("kd.registry:", ["module:Name"]),
    (":Registry", ["module:Name"]),
    ("{tmp}/missing.py:Thing", ["missing.py", "does not exist"]),
    ("{tmp}/raises.py:Thing", ["raises.py", "importing", "ZeroDivisionError"]),
    ("{tmp}/syntax.py:Thing", ["syntax.py", "importing", "SyntaxError"]),
    ("{tmp}/imports.py:Thing", ["imports.py", "importing", "ModuleNotFoundError", "kd_no_such_module"]),
    ("kd_no_such_module:Thing", ["kd_no_such_module", "importing", "ModuleNotFoundError"]),
    ("{tmp}/good.py:Scaler", ["good.py", "no attribute Scaler", "did you mean Scale"]),
    ("kd.errors:KDErorr", ["kd.errors", "no attribute KDErorr", "did you mean KDError"]),
    ("{tmp}/good.py:zzzz", ["no attribute zzzz"]),
])
def test_import_object_errors(tmp_path, spec, parts):
    write_module(tmp_path, "raises.py", "x = 1 / 0\n")
    write_module(tmp_path, "syntax.py", "def broken(:\n")
    write_module(tmp_path, "imports.py", "import kd_no_such_module\n")
    write_module(tmp_path, "good.py", "class Scale:\n    pass\n")
    message = error_message(import_object, spec.format(tmp=tmp_path))
    for part in parts:
        assert part in message


def test_indexing_a_registry_never_imports_and_suggests_close_names():
    """Model and dataset sources live in Registries too: ``registry[prefix]`` reads an entry, never a module:Name."""
    registry = Registry("model source")
    registry.register("timm")("the timm source")
    assert registry["timm"] == "the timm source" and list(registry) == ["timm"] and registry.values() == [
        "the timm source"]
    with pytest.raises(KDError, match="unknown model source 'tim' \\(did you mean timm\\?\\)"):
        registry["tim"]
    with pytest.raises(KDError, match="unknown model source 'kd.errors:KDError'"):
        registry["kd.errors:KDError"]
    del registry["timm"]
    assert "timm" not in registry
