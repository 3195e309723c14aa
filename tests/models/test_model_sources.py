"""Tests of the model sources (kd/models/sources.py): kd, torchvision, cifar, timm and user networks by prefix, timm's
DEFAULT weights from a fake local Hugging Face cache, the offline error, --list_models, and a timm
teacher distilled into a timm student end to end. Nothing is downloaded."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from huggingface_hub import close_session, constants

from conftest import FAST, run_cli
from kd.models.cifar import MODELS as CIFAR_MODELS
from kd.cli import main
from kd.errors import KDError
from kd.train.hooks import FeatureHooks
from kd.models.build import build_model, check_model_name, load_network
from kd.models.sources import MODEL_SOURCES, ModelSource, find_source, register_source

NUM_CLASSES = 7
TIMM = "test_resnet"  # timm's own ~0.4M-parameter test network, with pretrained weights on the Hub
REVISION = "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.usefixtures("one_thread")


def build_error(*args, **kwargs) -> str:
    with pytest.raises(KDError) as info:
        build_model(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def images(side=32, seed=0):
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))


def hub_repo(name: str) -> str:
    return timm.models.get_pretrained_cfg(name).hf_hub_id


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and a Hub at a local port that refuses every connection."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub reads the variables on import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")
    return cache


def point_hub_at(monkeypatch, endpoint: str) -> None:
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    close_session()  # its shared client read the proxy variables when it was made


def cache_weights(cache: Path, name: str, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """A random ImageNet-sized state_dict of timm's ``name`` in the hub cache layout, as the Hub would leave it."""
    torch.manual_seed(5)
    state = {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}
    folder = cache / f"models--{hub_repo(name).replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    if file.endswith(".safetensors"):
        safetensors.torch.save_file(state, snapshot / file)
    else:
        torch.save(state, snapshot / file)
    return state


def assert_loaded(model, state, head="fc."):
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith(head):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    assert own[f"{head}weight"].shape[0] == NUM_CLASSES and state[f"{head}weight"].shape[0] == 1000


# ---------------------------------------------------------------- every source builds

@pytest.mark.parametrize("arch, kind", [
    ("cnn_tiny", "SimpleCNN"), ("kd:cnn_small", "SimpleCNN"), ("resnet18", "torchvision.models.resnet.ResNet"),
    ("torchvision:mobilenet_v3_small", "torchvision.models.mobilenetv3.MobileNetV3"),
    (f"timm:{TIMM}", "timm.models.resnet.ResNet"), ("timm:test_convnext", "timm.models.convnext.ConvNeXt"),
    ("timm:mobilenetv3_small_050", "timm.models.mobilenetv3.MobileNetV3"), ("kd.models.kd_cnns:cnn_tiny", "SimpleCNN"),
])
def test_every_source_builds_a_network_with_the_class_count(arch, kind):
    model = build_model(arch, NUM_CLASSES).eval()
    assert f"{type(model).__module__}.{type(model).__name__}".endswith(kind)
    assert model(images()).shape == (2, NUM_CLASSES)


def test_a_bare_torchvision_name_is_still_torchvision():
    assert type(build_model("resnet18", NUM_CLASSES)) is torchvision.models.ResNet
    assert type(build_model(f"timm:{TIMM}", NUM_CLASSES)) is timm.models.ResNet


@pytest.mark.parametrize("name", [TIMM, "test_convnext", "mobilenetv3_small_050", "resnet10t.c3_in1k"])
def test_timm_classifier_is_resized(name):
    assert build_model(f"timm:{name}", NUM_CLASSES).get_classifier().out_features == NUM_CLASSES


def test_a_source_is_one_registered_class():
    @register_source
    class Tiny(ModelSource):
        prefix, about = "tinytest", "one linear layer"

        def names(self, pattern="*"):
            return ["linear"]

        def build(self, name, num_classes):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))

    try:
        assert build_model("tinytest:linear", 3)(images(8)).shape == (2, 3)
        assert "did you mean tinytest:linear" in build_error("tinytest:lineer", 3)
        with pytest.raises(ValueError, match="already registered"):
            register_source(Tiny)
    finally:
        del MODEL_SOURCES["tinytest"]


# ---------------------------------------------------------------- timm weights

@pytest.mark.parametrize("offline, file", [(True, "model.safetensors"), (False, "model.safetensors"),
                                           (True, "pytorch_model.bin")])
def test_default_timm_weights_come_from_the_hugging_face_cache(hub, monkeypatch, offline, file):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # online, the Hub refuses: the cache is read first
    state = cache_weights(hub, TIMM, file)
    model = build_model(f"timm:{TIMM}", NUM_CLASSES, weights="DEFAULT", flag="--teacher_weights")
    assert_loaded(model, state)


def test_default_timm_weights_resolve_a_tag(hub):
    state = cache_weights(hub, "test_convnext.r160_in1k")
    assert_loaded(build_model("timm:test_convnext.r160_in1k", NUM_CLASSES, weights="DEFAULT"), state, "head.fc.")


def assert_offline_error(message, hub, flag="--student_weights"):
    assert message.startswith(f"{flag}: timm:{TIMM}'s DEFAULT weights ({hub_repo(TIMM)})")
    assert str(hub) in message and "hf download" in message and "pass a local weights file" in message


def test_offline_mode_without_the_weights_is_a_one_line_error_at_once(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    message = build_error(f"timm:{TIMM}", NUM_CLASSES, weights="DEFAULT", flag="--student_weights")
    assert time.monotonic() - start < 5
    assert_offline_error(message, hub)
    assert "HF_HUB_OFFLINE is set" in message


def test_unreachable_hub_without_the_weights_is_a_one_line_error_within_30_s(hub):
    start = time.monotonic()
    message = build_error(f"timm:{TIMM}", NUM_CLASSES, weights="DEFAULT", flag="--student_weights")
    assert time.monotonic() - start < 30
    assert_offline_error(message, hub)
    assert "the Hub did not give them (ConnectError" in message


@pytest.mark.slow
def test_a_hub_that_never_answers_costs_at_most_30_s(hub, monkeypatch):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        point_hub_at(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        message = build_error(f"timm:{TIMM}", NUM_CLASSES, weights="DEFAULT", flag="--teacher_weights")
        elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed
    assert_offline_error(message, hub, "--teacher_weights")
    assert "Timeout" in message


@pytest.mark.parametrize("weights, expected", [
    ("IMAGENET1K_V1", f"--student_weights: timm:{TIMM} takes DEFAULT"),
    ("missing.pt", "--student_weights: file missing.pt does not exist"),
])
def test_timm_weights_that_are_neither_default_nor_a_file(tmp_path, monkeypatch, weights, expected):
    monkeypatch.chdir(tmp_path)
    assert build_error(f"timm:{TIMM}", NUM_CLASSES, weights=weights, flag="--student_weights").startswith(expected)


def test_timm_model_without_pretrained_weights():
    message = build_error("timm:test_coatnet", NUM_CLASSES, weights="DEFAULT", flag="--teacher_weights")
    assert message == "--teacher_weights: timm:test_coatnet has no pretrained weights; pass a local weights file"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_timm_model_loads_a_local_weights_file(tmp_path, suffix):
    torch.manual_seed(1)
    source = build_model(f"timm:{TIMM}", NUM_CLASSES).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = build_model(f"timm:{TIMM}", NUM_CLASSES, weights=str(path)).eval()
    torch.testing.assert_close(loaded(images()), source(images()), rtol=0, atol=0)


def test_truncated_safetensors_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"not safetensors")
    assert "not a safetensors file" in build_error(f"timm:{TIMM}", NUM_CLASSES, weights=str(path), flag="--x")


def test_kd_checkpoint_of_a_timm_student_loads_with_load_network(tmp_path):
    torch.manual_seed(2)
    source = build_model(f"timm:{TIMM}", NUM_CLASSES).eval()
    classes = list("abcdefg")
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
                "hyper_parameters": {"arch": f"timm:{TIMM}", "class_names": classes}}, tmp_path / "best.ckpt")
    loaded = load_network(tmp_path / "best.ckpt", f"timm:{TIMM}", classes, 32).eval()
    torch.testing.assert_close(loaded(images()), source(images()), rtol=0, atol=0)


# ---------------------------------------------------------------- feature hooks

@pytest.mark.parametrize("arch, layers", [("timm:resnet10t", ["layer3", "layer4"]), (f"timm:{TIMM}", ["layer3"]),
                                          ("timm:test_convnext", ["stages.2", "stages.3"])])
def test_feature_hooks_by_name_on_timm_models(arch, layers):
    model = build_model(arch, NUM_CLASSES).eval()
    hooks = FeatureHooks(model, layers, "--student_layers")
    model(images())
    features = hooks.take()
    assert list(features) == layers and all(f.dim() == 4 and f.shape[0] == 2 for f in features.values())
    hooks.remove()


def test_unknown_layer_of_a_timm_model_suggests_its_modules():
    with pytest.raises(KDError, match=r"--teacher_layers: ResNet has no module 'layer5' \(did you mean layer"):
        FeatureHooks(build_model(f"timm:{TIMM}", NUM_CLASSES), ["layer5"], "--teacher_layers")


# ---------------------------------------------------------------- bad names

@pytest.mark.parametrize("arch, flag, expected", [
    ("timm:resnet10", "--teacher_arch", "--teacher_arch: unknown timm model 'resnet10' (did you mean timm:resnet10t"),
    ("timm:resnet10t.c3_in1kk", "--x", "--x: timm:resnet10t has no pretrained tag 'c3_in1kk' (did you mean c3_in1k?)"),
    ("timm:", "--x", "--x: unknown timm model '' (see --list_models 'timm:*')"),
    ("timn:resnet18", "--student_arch", "--student_arch: 'timn:resnet18': 'timn' is neither a model source (did you "
                                        "mean timm?) nor an importable module (the sources are kd, torchvision, cifar, "
                                        "timm)"),
    ("no_such_module:Net", "--x", "'no_such_module' is neither a model source nor an importable module"),
    ("no/such/file.py:Net", "--x", "--x: 'no/such/file.py:Net': file no/such/file.py does not exist"),
    ("convnext_nano", "--student_arch", "--student_arch: unknown model 'convnext_nano' (did you mean "
                                        "timm:convnext_nano?)"),
    ("resnet19", "--student_weights", "--student_arch: unknown model 'resnet19' (did you mean resnet18"),
    ("torchvision:resnet19", "--x", "--x: unknown torchvision model 'resnet19' (did you mean resnet18"),
])
def test_unknown_names_are_one_line_errors_naming_the_flag(arch, flag, expected):
    message = build_error(arch, NUM_CLASSES, flag=flag)
    assert expected in message
    with pytest.raises(KDError):
        check_model_name(arch)


def test_names_resolve_to_their_source():
    assert find_source("resnet18", "--x")[0] is MODEL_SOURCES["torchvision"]
    assert find_source("cnn_tiny", "--x")[0] is MODEL_SOURCES["kd"]
    assert find_source("timm:resnet18", "--x") == (MODEL_SOURCES["timm"], "resnet18")


# ---------------------------------------------------------------- --list_models

def listed(capsys, *pattern):
    assert main(["--flags_file", "none", "--list_models", *pattern]) == 0
    return capsys.readouterr().out.splitlines()


def test_list_models_alone_lists_every_source(capsys):
    lines = listed(capsys)
    headers = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert headers == ["kd", "torchvision", "cifar", "timm", "user"]
    names = {line.strip() for line in lines if line.startswith(" ")}
    assert {"cnn_tiny", "resnet18", "timm:resnet18", "timm:convnext_nano", "timm:mobilenetv3_small_100"} <= names
    assert len(names) == (len(timm.list_models()) + len(torchvision.models.list_models(module=torchvision.models)) + 3
                          + len(CIFAR_MODELS.names()))


def test_list_models_with_a_timm_pattern(capsys):
    lines = listed(capsys, "timm:*mobilenetv3*")
    assert lines[0].startswith("timm: ") and "(13; write timm:NAME)" in lines[0]
    assert [line.strip() for line in lines[1:]] == [f"timm:{n}" for n in timm.list_models("*mobilenetv3*")]


def test_list_models_pattern_without_a_prefix_filters_every_source(capsys):
    lines = listed(capsys, "*mobilenet_v3*")
    assert lines[0].startswith("torchvision: ") and lines[1:3] == ["  mobilenet_v3_large", "  mobilenet_v3_small"]
    assert listed(capsys, "zzz")[0] == "no model name matches 'zzz'; --list_models alone lists them all"


def test_list_models_with_an_unknown_source(capsys):
    assert main(["--flags_file", "none", "--list_models", "timn:*"]) == 2
    assert capsys.readouterr().err == ("error: --list_models timn:*: 'timn' is not a model source (did you mean "
                                       "timm?); the sources are kd, torchvision, cifar, timm\n")


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_timm_teacher_distilled_into_a_timm_student_with_hooked_layers(tiny_data, tmp_path):
    result = run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher",
                      "--distill", "--teacher_arch", "timm:resnet10t", "--student_arch", f"timm:{TIMM}",
                      "--kd_loss", "kl_softmax", "at", "--student_layers", "layer3", "--teacher_layers", "layer3",
                      "--image_size", "32"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 4]}
    assert rows["teacher"][1] == "timm:resnet10t" and rows["distill"][2] == f"timm:{TIMM}", lines[header:header + 4]
    checkpoint = tmp_path / "kd" / "distill" / "version_0" / "checkpoints" / "best.ckpt"
    classes = sorted(p.name for p in (tiny_data / "train").iterdir())
    assert load_network(checkpoint, f"timm:{TIMM}", classes, 32, "--evaluate")(images()).shape == (2, len(classes))


def test_a_checkpoint_loads_under_either_spelling_of_its_network(tmp_path):
    """``resnet18`` and ``torchvision:resnet18`` name one network: a checkpoint saved as one loads as the other."""
    model = build_model("cnn_tiny", 3)
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"arch": "cnn_tiny", "class_names": ["a", "b", "c"]}}, path)
    loaded = load_network(path, "kd:cnn_tiny", ["a", "b", "c"], 16)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(KDError, match="holds a cnn_tiny, not the kd:cnn_small asked for"):
        load_network(path, "kd:cnn_small", ["a", "b", "c"], 16)
