"""Tests of kd.models.build: building built-in and torchvision networks, name checks and loading weights files."""

import re
import socket
import time
import urllib.request

import pytest
import torch

from kd.errors import KDError
from kd.models.build import build_model, check_forward, check_model_name
from kd.models.kd_cnns import CNNS as MODELS
from kd.models.checkpoints import load_weights

TORCHVISION = ["resnet18", "mobilenet_v3_small"]
NUM_CLASSES = 7


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No reachable network and an empty torch cache; returns the list of addresses anything tried to connect to."""
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen caches its proxy settings
    attempts = []
    connect = socket.socket.connect

    def recording_connect(sock, address):
        attempts.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    return attempts


def side(arch):
    return 64 if arch in TORCHVISION else 32


def images(seed, arch="cnn_tiny"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, side(arch), side(arch), generator=generator)


def built(arch, num_classes=NUM_CLASSES, seed=0, **kwargs):
    """``build_model`` under a fixed seed, so two calls initialise the same weights."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes, **kwargs).eval()


def saved(model_or_state, path):
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    torch.save(state, path)
    return path


def build_error(*args, **kwargs):
    with pytest.raises(KDError) as info:
        build_model(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- building

@pytest.mark.parametrize("arch", MODELS.names() + TORCHVISION)
def test_builds_with_num_classes_and_trains(arch):
    model = build_model(arch, NUM_CLASSES).train()
    out = model(images(0, arch))
    assert out.shape == (2, NUM_CLASSES)
    out.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("arch", MODELS.names())
def test_builtin_models_take_any_image_size(arch):
    model = build_model(arch, 3).eval()
    for size in (16, 48):
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 3)


@pytest.mark.parametrize("name", ["cnn_tiny", "resnet18", "vit_b_16", "kd.models.build:SimpleCNN", "{tmp}/nets.py:Net"])
def test_check_model_name_accepts_known_names_and_plugins(tmp_path, name):
    (tmp_path / "nets.py").write_text("")
    check_model_name(name.format(tmp=tmp_path))  # a plug-in's module or file must exist; it is imported on use


@pytest.mark.parametrize("name, suggestion", [("resnet19", "resnet18"), ("cnn_tiney", "cnn_tiny"),
                                              ("mobilenet_v3_smal", "mobilenet_v3_small")])
def test_check_model_name_suggests_close_names(name, suggestion):
    with pytest.raises(KDError, match=f"did you mean.*\\b{suggestion}\\b"):
        check_model_name(name)
    assert suggestion in build_error(name, NUM_CLASSES)


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_models_with_auxiliary_heads_return_plain_logits_in_training(arch):
    model = build_model(arch, NUM_CLASSES)
    check_forward(model, arch, 80, NUM_CLASSES, "--student_arch")  # raises unless (2, 7) logits come back


def test_forward_check_names_models_that_cannot_take_the_image_size():
    with pytest.raises(KDError, match=r"--student_arch vit_b_16 does not run on 16 px images: .*"):
        check_forward(build_model("vit_b_16", NUM_CLASSES), "vit_b_16", 16, NUM_CLASSES, "--student_arch")


USER_MODELS = """
from torch import nn

def broken(num_classes):
    raise RuntimeError("bad net")

def not_a_module(num_classes):
    return 42

def wrong_width(num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))
"""


@pytest.mark.parametrize("name, message", [
    ("broken", "building it failed: RuntimeError: bad net"),
    ("not_a_module", "built a int, not a torch.nn.Module"),
    ("wrong_width", "returns (2, 8), not logits of shape (batch, 7)"),
])
def test_user_models_that_do_not_work_are_one_line_errors(tmp_path, name, message):
    (tmp_path / "nets.py").write_text(USER_MODELS)
    arch = f"{tmp_path / 'nets.py'}:{name}"
    with pytest.raises(KDError, match=re.escape(message)):
        check_forward(build_model(arch, NUM_CLASSES), arch, 16, NUM_CLASSES, "--student_arch")


def test_teacher_weights_must_fit_including_the_head(tmp_path):
    path = tmp_path / "five.pt"
    torch.save(build_model("cnn_small", 5).state_dict(), path)
    with pytest.raises(KDError, match=r"five.pt does not fit this model: fc.weight has shape \(5, 64\)"):
        load_weights(build_model("cnn_small", NUM_CLASSES), torch.load(path), NUM_CLASSES, str(path), "--x",
                     new_head=False)


# ---------------------------------------------------------------- local weights files

def assert_same_state(model, state, skip=()):
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith(skip):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("arch", MODELS.names())
def test_state_dict_file_reproduces_the_model(tmp_path, arch):
    source = built(arch, seed=1)
    path = saved(source, tmp_path / "weights.pt")
    loaded = built(arch, seed=2, weights=str(path))
    assert_same_state(loaded, source.state_dict())
    x = images(3, arch)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch, head", [("cnn_tiny", "fc."), ("mobilenet_v3_small", "classifier.3.")])
def test_other_class_count_loads_all_but_the_head(tmp_path, arch, head):
    source = built(arch, num_classes=5, seed=1)
    path = saved(source, tmp_path / "five_classes.pth")
    fresh = built(arch, seed=2)
    loaded = built(arch, seed=2, weights=str(path))
    assert loaded(images(4, arch)).shape == (2, NUM_CLASSES)
    assert_same_state(loaded, source.state_dict(), skip=head)
    head_state = {k: v for k, v in fresh.state_dict().items() if k.startswith(head)}
    assert head_state and all(loaded.state_dict()[k].shape[0] == NUM_CLASSES for k in head_state)
    assert_same_state(loaded, head_state)


def test_lightning_checkpoint_loads_the_model_part(tmp_path):
    source = built("cnn_small", seed=1)
    other = built("cnn_medium", seed=1)
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {**{f"model.{k}": v for k, v in source.state_dict().items()},
                       **{f"teacher.{k}": v for k, v in other.state_dict().items()}},
        "hyper_parameters": {"arch": "cnn_small", "class_names": list("abcdefg")},
    }
    path = saved(checkpoint, tmp_path / "best.ckpt")
    loaded = built("cnn_small", seed=2, weights=str(path))
    x = images(5)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_torchvision_arch_loads_a_local_file(tmp_path):
    source = built("mobilenet_v3_small", seed=1)
    path = saved(source, tmp_path / "weights.bin")
    loaded = built("mobilenet_v3_small", seed=2, weights=str(path))
    x = images(6, "mobilenet_v3_small")
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def tiny_state(change):
    state = built("cnn_tiny", seed=1).state_dict()
    if change == "missing key":
        del state["features.0.weight"]
    elif change == "unexpected key":
        state["extra.weight"] = torch.zeros(3)
    return state


@pytest.mark.parametrize("content, parts", [
    (lambda: built("cnn_small").state_dict(), ["does not fit", "features.0.weight", "(16, 3, 3, 3)", "(8, 3, 3, 3)"]),
    (lambda: built("cnn_medium", num_classes=3).state_dict(), ["does not fit"]),
    (lambda: tiny_state("missing key"), ["missing features.0.weight"]),
    (lambda: tiny_state("unexpected key"), ["unexpected extra.weight"]),
    (lambda: {"state_dict": {"teacher.fc.weight": torch.zeros(1)}}, ["no state_dict"]),
    (lambda: [torch.zeros(1)], ["no state_dict"]),
    (lambda: {"fc.weight": torch.zeros(1), "note": "text"}, ["no state_dict"]),
    (lambda: b"this is not a torch file\n", ["cannot load"]),
], ids=["other width", "other depth", "missing key", "unexpected key", "checkpoint without model",
        "a list", "not all tensors", "text file"])
def test_unusable_weights_file_is_an_error_naming_it(tmp_path, content, parts):
    path = tmp_path / "weights.pt"
    data = content()
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        torch.save(data, path)
    message = build_error("cnn_tiny", NUM_CLASSES, weights=str(path), flag="--student_weights")
    assert message.startswith("--student_weights") and str(path) in message
    for part in parts:
        assert part in message


def test_empty_weights_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert str(path) in build_error("cnn_tiny", NUM_CLASSES, weights=str(path))


@pytest.mark.parametrize("arch, weights", [("cnn_tiny", "missing.pt"), ("cnn_tiny", "DEFAULT"),
                                           ("mobilenet_v3_small", "no/such/file.pth")])
def test_missing_weights_file(tmp_path, monkeypatch, arch, weights):
    monkeypatch.chdir(tmp_path)
    message = build_error(arch, NUM_CLASSES, weights=weights)
    assert weights in message and "does not exist" in message


# ---------------------------------------------------------------- torchvision weights, offline

@pytest.mark.parametrize("weights", ["IMAGENET1K_V9", "ResNet18_Weights.IMAGENET1K_V9"])
def test_unknown_torchvision_weights_lists_valid_ones_without_network(offline, weights):
    message = build_error("resnet18", 5, weights=weights, flag="--teacher_weights")
    assert message.startswith("--teacher_weights") and "IMAGENET1K_V9" in message
    assert "IMAGENET1K_V1" in message and "DEFAULT" in message
    assert offline == []


def test_offline_download_fails_fast_with_a_clear_error(offline, tmp_path):
    start = time.monotonic()
    message = build_error("mobilenet_v3_small", 5, weights="DEFAULT")
    assert time.monotonic() - start < 15
    assert "download" in message and "offline" in message
    assert str(tmp_path / "torch_home") in message
    assert offline and all(address[0] == "127.0.0.1" for address in offline)
