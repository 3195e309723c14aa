"""Tests of kd.deploy.export: ONNX and TorchScript files that reproduce the model, and MACs, parameters and latency."""

import sys

import onnxruntime
import pytest
import torch
from torch import nn

from kd.errors import KDError
from kd.deploy.export import Profile, export_model, format_profiles, profile_model, read_metadata
from kd.models.build import build_model

FORMATS = ["onnx", "torchscript"]
SIDE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(arch: str) -> nn.Module:
    """``arch`` for 3 classes, in train mode, its BatchNorm statistics moved away from their defaults as by training."""
    torch.manual_seed(0)
    model = build_model(arch, 3)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, SIDE, SIDE) * 2 + 1)
    return model


def _run_exported(fmt: str, path, images: torch.Tensor) -> torch.Tensor:
    """Outputs of the exported file, loaded the way a deployment would load it."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    return torch.jit.load(str(path))(images)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # from _run_exported
@pytest.mark.parametrize("arch", ["cnn_tiny", "resnet18"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_file_gives_the_models_outputs_for_any_batch_size(tmp_path, fmt, arch):
    model = _trained_like(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "out" / f"model.{fmt}"
    difference = export_model(model, fmt, path, SIDE)
    assert 0 <= difference <= 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    images = torch.randn(5, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(images)
    got = _run_exported(fmt, path, images)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(_run_exported(fmt, path, images[:1]), expected[:1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_existing_file_is_never_overwritten(tmp_path, fmt):
    path = tmp_path / "model.bin"
    path.write_bytes(b"keep me")
    with pytest.raises(KDError, match=rf"--export {fmt}: {path} already exists"):
        export_model(build_model("cnn_tiny", 3), fmt, path, SIDE)
    assert path.read_bytes() == b"keep me"
    assert list(tmp_path.iterdir()) == [path]


def test_unknown_format_lists_the_formats(tmp_path):
    with pytest.raises(KDError, match=r"--export: unknown format 'tflite' \(choose from onnx, torchscript\)"):
        export_model(build_model("cnn_tiny", 3), "tflite", tmp_path / "m", SIDE)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(KDError, match=r"--export onnx needs onnxruntime: pip install onnxruntime$"):
        export_model(build_model("cnn_tiny", 3), "onnx", tmp_path / "m.onnx", SIDE)
    assert list(tmp_path.iterdir()) == []


class ExportsDifferently(nn.Module):
    """Adds 1 to its logits while being exported or traced, so the exported file disagrees with it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.linear(images.mean((2, 3)))
        return logits + 1 if torch.compiler.is_exporting() or torch.jit.is_tracing() else logits


@pytest.mark.filterwarnings("ignore:Output nr 1. of the traced function does not match")  # jit's own check agrees
@pytest.mark.parametrize("fmt", FORMATS)
def test_outputs_that_differ_beyond_tolerance_leave_no_file(tmp_path, fmt):
    path = tmp_path / "model"
    with pytest.raises(KDError, match=rf"--export {fmt}: {path} was not written: .* differ .* by up to 1 "):
        export_model(ExportsDifferently(), fmt, path, SIDE)
    assert list(tmp_path.iterdir()) == []


class FixedBatch(nn.Module):
    """Runs on any batch size, but its Python int freezes the batch size of an export to the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.mean((2, 3))) + torch.zeros(int(images.shape[0]), 2)


@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python integer")
@pytest.mark.parametrize("model", [nn.Conv2d(1, 4, 3), FixedBatch()], ids=["wrong_channels", "fixed_batch"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_model_that_does_not_export_is_refused_without_a_file(tmp_path, fmt, model):
    path = tmp_path / "model"
    with pytest.raises(KDError, match=rf"--export {fmt}: cannot export to {path}: \w+"):
        export_model(model, fmt, path, SIDE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("layer", "size", "macs"), [
    (nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4)), 2, 12 * 4),
    (nn.Conv2d(3, 8, 3, padding=1), 16, 3 * 8 * 9 * 16 * 16),
    (nn.Conv2d(3, 8, 3, stride=2), 17, 3 * 8 * 9 * 8 * 8),
])
def test_macs_and_params_are_counted_by_hand(layer, size, macs):
    profile = profile_model(layer, size, runs=3)
    assert profile.macs == macs
    assert profile.params == sum(p.numel() for p in layer.parameters())
    assert profile.latency_ms > 0


def test_macs_and_params_of_a_cnn_add_up_its_layers():
    profile = profile_model(build_model("cnn_small", 3), 32, runs=1)  # 3×3 convs at 32, 16, 8 px, then a head
    assert profile.macs == 3 * 16 * 9 * 32 * 32 + 16 * 32 * 9 * 16 * 16 + 32 * 64 * 9 * 8 * 8 + 64 * 3
    assert profile.params == (3 * 16 + 16 * 32 + 32 * 64) * 9 + 2 * (16 + 32 + 64) + 64 * 3 + 3  # + BatchNorm, bias


def test_profile_leaves_weights_and_modes_unchanged():
    model = build_model("cnn_tiny", 3)
    model.train()
    model.features[1].eval()  # a BatchNorm frozen on purpose: it must stay in eval mode
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    profile_model(model, SIDE, runs=2)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm statistics too


def test_format_profiles_shows_units_and_the_students_gains():
    profiles = {"teacher": Profile(11_200_000, 1_820_000_000, 12.0), "student": Profile(1_620, 2_500_000, 0.5)}
    lines = format_profiles(profiles).splitlines()
    assert lines[2].split() == ["teacher", "11,200,000", "1.8", "G", "12.00"]
    assert lines[3].split() == ["student", "1,620", "2.5", "M", "0.50"]
    assert lines[4] == "the student is 6913.6× smaller, needs 728.0× fewer MACs and runs 24.0× faster than the teacher"
    alone = format_profiles({"student": Profile(10, 999, 1.0)})
    assert "999" in alone and "smaller" not in alone


@pytest.mark.filterwarnings("ignore:Output nr 1. of the traced function does not match")
@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=pytest.mark.slow), "torchscript"])  # onnx: ~20 s
def test_metadata_is_read_back_and_a_replacement_that_fails_leaves_the_old_file_in_place(tmp_path, fmt):
    path, previous = tmp_path / "model", tmp_path / "model.old"
    export_model(build_model("cnn_tiny", 3), fmt, path, SIDE, metadata={"class_names": '["a", "b", "c"]'})
    assert read_metadata(fmt, path) == {"class_names": '["a", "b", "c"]'}
    first = path.read_bytes()
    with pytest.raises(KDError, match="was not written"):
        export_model(ExportsDifferently(), fmt, path, SIDE, previous=previous)
    assert path.read_bytes() == first and not previous.exists()
    export_model(build_model("cnn_tiny", 3), fmt, path, SIDE, metadata={"k": "v"}, previous=previous)
    assert previous.read_bytes() == first and read_metadata(fmt, path) == {"k": "v"}
    assert read_metadata(fmt, tmp_path) == {} and sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old"]
