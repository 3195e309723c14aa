"""Tests of the cifar: model source (kd/models/cifar/): RepDistiller's and mdistiller's CIFAR-100 networks with their
parameter counts and state_dict keys, their released teacher files, feature hooks by name, and a distillation run
end to end. The expected counts were computed from the references' code (see kd/models/cifar/*.py), not from kd's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd.models.cifar import MODELS
from kd.cli import main
from kd.errors import KDError
from kd.train.hooks import FeatureHooks
from kd.models.sources import MODEL_SOURCES, find_source
from kd.models.build import build_model, load_network
from conftest import FAST

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = [f"class{i}" for i in range(100)]

# name: (parameters at 100 classes, {state_dict key: shape} for its first key, some in the middle and its last)
NETWORKS = {
    "resnet8": (83_892, {"conv1.weight": (16, 3, 3, 3), "layer1.0.bn1.running_mean": (16,),
                         "layer3.0.downsample.0.weight": (64, 32, 1, 1), "fc.bias": (100,)}),
    "resnet14": (181_108, {"conv1.weight": (16, 3, 3, 3), "layer1.1.conv2.weight": (16, 16, 3, 3),
                           "layer3.1.bn2.num_batches_tracked": (), "fc.bias": (100,)}),
    "resnet20": (278_324, {"conv1.weight": (16, 3, 3, 3), "layer2.0.downsample.0.weight": (32, 16, 1, 1),
                           "layer2.2.bn2.running_var": (32,), "fc.bias": (100,)}),
    "resnet32": (472_756, {"conv1.weight": (16, 3, 3, 3), "layer3.4.conv2.weight": (64, 64, 3, 3),
                           "fc.bias": (100,)}),
    "resnet44": (667_188, {"conv1.weight": (16, 3, 3, 3), "layer3.6.conv1.weight": (64, 64, 3, 3),
                           "fc.bias": (100,)}),
    "resnet56": (861_620, {"conv1.weight": (16, 3, 3, 3), "layer2.8.bn1.weight": (32,),
                           "layer3.8.conv2.weight": (64, 64, 3, 3), "fc.bias": (100,)}),
    "resnet110": (1_736_564, {"conv1.weight": (16, 3, 3, 3), "layer1.17.conv1.weight": (16, 16, 3, 3),
                              "layer3.17.bn2.running_var": (64,), "fc.bias": (100,)}),
    "resnet8x4": (1_233_540, {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                              "layer3.0.downsample.1.running_mean": (256,), "fc.bias": (100,)}),
    "resnet32x4": (7_433_860, {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                               "layer3.4.conv2.weight": (256, 256, 3, 3), "fc.bias": (100,)}),
    "wrn_16_1": (180_916, {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,),
                           "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
                           "block3.layer.1.conv2.weight": (64, 64, 3, 3), "bn1.running_var": (64,), "fc.bias": (100,)}),
    "wrn_16_2": (703_284, {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
                           "block3.layer.1.bn2.running_mean": (128,), "bn1.weight": (128,), "fc.bias": (100,)}),
    "wrn_40_1": (569_780, {"conv1.weight": (16, 3, 3, 3), "block3.layer.5.conv2.weight": (64, 64, 3, 3),
                           "bn1.bias": (64,), "fc.bias": (100,)}),
    "wrn_40_2": (2_255_156, {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
                             "block2.layer.5.bn1.running_var": (64,), "fc.weight": (100, 128), "fc.bias": (100,)}),
    "vgg8": (3_965_028, {"block0.0.weight": (64, 3, 3, 3), "block2.1.running_mean": (256,), "block4.0.bias": (512,),
                         "classifier.bias": (100,)}),
    "vgg11": (9_277_284, {"block0.0.weight": (64, 3, 3, 3), "block2.3.weight": (256, 256, 3, 3),
                          "block4.4.running_var": (512,), "classifier.bias": (100,)}),
    "vgg13": (9_462_180, {"block0.0.weight": (64, 3, 3, 3), "block0.3.weight": (64, 64, 3, 3),
                          "block1.4.running_mean": (128,), "classifier.bias": (100,)}),
    "vgg16": (14_774_436, {"block0.0.weight": (64, 3, 3, 3), "block2.6.weight": (256, 256, 3, 3),
                           "block4.7.num_batches_tracked": (), "classifier.bias": (100,)}),
    "vgg19": (20_086_692, {"block0.0.weight": (64, 3, 3, 3), "block3.9.weight": (512, 512, 3, 3),
                           "block4.10.running_var": (512,), "classifier.bias": (100,)}),
    "MobileNetV2": (812_836, {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                              "blocks.1.0.conv.3.weight": (48, 1, 3, 3), "blocks.6.0.conv.7.running_var": (160,),
                              "conv2.0.weight": (1280, 160, 1, 1), "classifier.0.bias": (100,)}),
    "ShuffleV1": (949_258, {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                            "layer1.0.conv3.weight": (216, 18, 1, 1), "layer2.7.bn3.running_mean": (480,),
                            "layer3.3.conv3.weight": (960, 80, 1, 1), "linear.bias": (100,)}),
    "ShuffleV2": (1_355_528, {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (24, 1, 3, 3),
                              "layer1.0.conv5.weight": (58, 58, 1, 1), "layer2.7.conv3.weight": (116, 116, 1, 1),
                              "layer3.3.bn3.bias": (232,), "conv2.weight": (1024, 464, 1, 1), "linear.bias": (100,)}),
}

# Per family, the modules to hook for feature losses (as the README lists them) and their outputs on 32 px images.
HOOKS = {
    "resnet8x4": {"layer1": (64, 32), "layer2": (128, 16), "layer3": (256, 8)},
    "wrn_16_2": {"block1": (32, 32), "block2": (64, 16), "block3": (128, 8)},
    "vgg8": {"block0": (64, 32), "block1": (128, 16), "block2": (256, 8), "block3": (512, 4), "block4": (512, 4)},
    "MobileNetV2": {"blocks.1": (12, 16), "blocks.2": (16, 8), "blocks.4": (48, 4), "blocks.6": (160, 2),
                    "conv2": (1280, 2)},
    "ShuffleV1": {"layer1": (240, 16), "layer2": (480, 8), "layer3": (960, 4)},
    "ShuffleV2": {"layer1": (116, 16), "layer2": (232, 8), "layer3": (464, 4)},
}


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_every_network_of_the_references_is_registered_under_their_name():
    assert set(MODELS.names()) == set(NETWORKS)


@pytest.mark.parametrize("name", NETWORKS)
def test_parameters_and_state_dict_keys_are_the_references(name):
    parameters, keys = NETWORKS[name]
    model = build_model(f"cifar:{name}", len(CLASSES))
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert [next(iter(state)), next(reversed(state))] == [next(iter(keys)), next(reversed(keys))]
    assert {key: tuple(state[key].shape) for key in keys if key in state} == keys
    assert sum(p.numel() for p in MODELS.get(name)().parameters()) == parameters  # num_classes defaults to 100


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_train_on_32_px_images_and_return_logits_only(name):
    model = build_model(f"cifar:{name}", 7).train()
    logits = model(images())
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 7)
    logits.logsumexp(dim=1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", HOOKS)
def test_the_readme_layers_hook_features(name):
    model = build_model(f"cifar:{name}", 10).eval()
    hooks = FeatureHooks(model, list(HOOKS[name]), "--student_layers")
    with torch.no_grad():
        model(images())
    features = hooks.take()
    hooks.remove()
    assert {layer: (f.shape[1], f.shape[2]) for layer, f in features.items()} == HOOKS[name]
    assert all(f.shape[0] == 2 and f.shape[2] == f.shape[3] for f in features.values())


def test_a_bare_name_stays_torchvision_and_a_cifar_name_is_suggested():
    assert find_source("vgg13", "--x")[0] is MODEL_SOURCES["torchvision"]
    assert find_source("cifar:vgg13", "--x") == (MODEL_SOURCES["cifar"], "vgg13")
    with pytest.raises(KDError, match=r"^--student_arch: unknown model 'resnet8x4' \(did you mean cifar:resnet8x4"):
        build_model("resnet8x4", 10, flag="--student_arch")
    with pytest.raises(KDError, match=r"^--teacher_arch: unknown cifar model 'resnet9' \(did you mean cifar:resnet8"):
        build_model("cifar:resnet9", 10, flag="--teacher_arch")


def test_list_models_lists_the_cifar_networks(capsys):
    assert main(["--flags_file", "none", "--list_models", "cifar:*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cifar: ") and f"({len(NETWORKS)}; write cifar:NAME)" in lines[0]
    assert sorted(line.strip() for line in lines[1:]) == sorted(f"cifar:{name}" for name in NETWORKS)


# ---------------------------------------------------------------- released teachers

def released_teacher(path: Path, arch: str = "resnet8", extras: tuple[str, ...] = ("epoch", "best_acc", "optimizer"),
                     zipped: bool = True) -> torch.nn.Module:
    """A file as RepDistiller's train_teacher.py saves it (``model`` beside ``extras``), and the network in it."""
    torch.manual_seed(0)
    model = MODELS.get(arch)()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model(images(1)).logsumexp(dim=1).mean().backward()
    optimizer.step()  # momentum buffers in the optimizer state, BatchNorm statistics moved
    entries = {"epoch": 240, "best_acc": torch.tensor(73.1), "accuracy": torch.tensor(72.9),
               "optimizer": optimizer.state_dict()}
    torch.save({"model": model.state_dict(), **{key: entries[key] for key in extras}}, path,
               _use_new_zipfile_serialization=zipped)
    return model.eval()


@pytest.mark.parametrize("file, extras, zipped", [
    ("ckpt_epoch_240.pth", ("epoch", "accuracy", "optimizer"), False),  # RepDistiller's released teachers (2019)
    ("resnet8_best.pth", ("epoch", "best_acc", "optimizer"), True),  # RepDistiller's best teacher
    ("student_best", (), True),  # mdistiller's students: {'model': state_dict}, no suffix
])
def test_a_released_file_loads_as_it_is(tmp_path, file, extras, zipped):
    path = tmp_path / file
    saved = released_teacher(path, extras=extras, zipped=zipped)
    teacher = load_network(path, "cifar:resnet8", CLASSES, 32).eval()
    student = build_model("cifar:resnet8", len(CLASSES), weights=str(path), flag="--student_weights").eval()
    with torch.no_grad():
        expected = saved(images(2))
        torch.testing.assert_close(teacher(images(2)), expected, rtol=0, atol=0)
        torch.testing.assert_close(student(images(2)), expected, rtol=0, atol=0)


def test_a_released_file_of_another_network_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    released_teacher(path, "resnet8")
    with pytest.raises(KDError) as info:
        load_network(path, "cifar:resnet14", CLASSES, 32)
    assert str(info.value).startswith(f"--teacher_checkpoint: {path} does not fit this model (missing layer1.1.")
    assert "\n" not in str(info.value)


def test_a_released_teacher_for_other_classes_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    released_teacher(path, "resnet8")
    with pytest.raises(KDError, match=r"^--teacher_checkpoint: .* fc.weight has shape \(100, 64\), "
                                      r"the model expects \(10, 64\)$"):
        load_network(path, "cifar:resnet8", CLASSES[:10], 32)


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_cifar_teacher_distilled_into_a_cifar_student_with_attention_transfer(tiny_data, tmp_path):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--teacher_arch", "cifar:resnet8", "--student_arch", "cifar:resnet8", "--image_size", "32",
                 "--kd_loss", "kl_softmax", "at", "--student_layers", "layer3", "--teacher_layers", "layer3"]) == 0
    checkpoint = tmp_path / "kd" / "distill" / "version_0" / "checkpoints" / "best.ckpt"
    classes = sorted(p.name for p in (tiny_data / "train").iterdir())
    assert load_network(checkpoint, "cifar:resnet8", classes, 32, "--evaluate")(images()).shape == (2, len(classes))
