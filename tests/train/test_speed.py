"""The fast path on a CPU: the decoded-image cache in training, channels-last, mixed precision, compile."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST
from kd.cli import main
from kd.config import Config
from kd.data.loaders import ImageDataModule, make_datamodule
from kd.data.transforms import normalize
from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force
from kd.models.build import build_model
from kd.train.distiller import Distiller


def _batches(data: ImageDataModule, train: bool) -> list[tuple[torch.Tensor, ...]]:
    data.set_epoch(1)
    return list(data.train_dataloader() if train else data.val_dataloader())


def test_image_cache_feeds_the_same_samples_as_decoding(tiny_data, tmp_path):
    settings = {"data_dir": str(tiny_data), "image_size": 16, "batch_size": 8, "num_workers": 0}
    plain = make_datamodule(Config(**settings))
    cached = make_datamodule(Config(**settings, image_cache=str(tmp_path / "images")))
    cached.prepare_data()
    cached.setup()
    assert len(list((tmp_path / "images").iterdir())) == 2  # train and val
    for train in (True, False):
        for (x, y, i), (cx, cy, ci) in zip(_batches(plain, train), _batches(cached, train), strict=True):
            assert torch.equal(y, cy) and torch.equal(i, ci) and x.shape == cx.shape
            if not train:  # one resize either way: the pixels agree closely
                assert (normalize(x) - normalize(cx)).abs().mean() < 0.1


def test_cached_images_channels_last_and_bf16_train_on_a_cpu(tiny_data, tmp_path, capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "runs"), "--baseline",
             "--image_cache", str(tmp_path / "images"), "--channels_last", "--precision", "bf16-mixed"]
    assert main(flags) == 0
    folders = sorted(p.name for p in (tmp_path / "images").iterdir())
    err = capsys.readouterr().err  # not a terminal: a summary line per split, no progress bar redrawn
    assert len(folders) == 2 and err.count("image cache: ") == 2 and "caching images" not in err
    assert main([*flags, "--seed", "1"]) == 0  # a second run reuses the decoded images
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == folders
    assert "image cache: " not in capsys.readouterr().err


def test_compile_and_channels_last_apply_to_student_and_teacher():
    student, teacher = build_model("cnn_tiny", 3), build_model("cnn_small", 3)
    objective = build_objective(losses_in_force(["kl_softmax"], [], None, None, []), num_classes=3)
    module = Distiller(student, teacher=teacher, objective=objective, channels_last=True, compile=True)
    assert module.model._compiled_call_impl is not None and module.teacher._compiled_call_impl is not None
    conv = module.model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_teacher_runs_in_inference_mode_under_mixed_precision(precision):
    """Teacher outputs come back as ordinary tensors the student's loss can save for backward."""
    student, teacher = build_model("cnn_tiny", 3), build_model("cnn_small", 3)
    objective = build_objective(losses_in_force(["kl_softmax"], [], None, None, []), num_classes=3)
    module = Distiller(student, teacher=teacher, objective=objective)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    with torch.autocast("cpu", dtype=dtype):
        logits, _ = module.teacher_outputs(torch.randn(2, 3, 16, 16), torch.arange(2), 0)
        loss = module.objective(module.model(torch.randn(2, 3, 16, 16)), logits, torch.tensor([0, 1]))[0]
    assert not logits.is_inference() and logits.dtype == dtype
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
