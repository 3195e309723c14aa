"""A second, strongly augmented view of each training image, for losses that compare two views (MLKD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import FAST
from kd.cli import main
from kd.data.loaders import ImageDataModule, ImageListDataset
from kd.data.sources.folder import scan_image_folder
from kd.data.strong import TwoViews, strong_view
from kd.data.transforms import train_transform
from kd.losses.objective import Objective
from kd.train.distiller import Distiller


def test_the_first_view_is_the_crop_a_single_view_run_sees_and_both_replay_by_seed_epoch_and_index(tiny_data):
    split = scan_image_folder(tiny_data).train
    single = ImageListDataset(split, train_transform(16), seed=3)
    both = ImageListDataset(split, TwoViews(train_transform(16), strong_view(train_transform(16))), seed=3)
    views, label, index = both[5, 2]
    assert views.shape == (2, 3, 16, 16) and views.dtype == torch.uint8 and (label, index) == single[5, 2][1:]
    assert torch.equal(views[0], single[5, 2][0])
    assert torch.equal(views, both[5, 2][0]) and not torch.equal(views, both[5, 3][0])
    assert not torch.equal(views[0], views[1])


def test_the_data_gives_two_views_only_while_a_stage_asks_for_them(tiny_data):
    data = ImageDataModule(scan_image_folder(tiny_data), image_size=16, batch_size=4, num_workers=0)
    assert next(iter(data.train_dataloader()))[0].shape == (4, 3, 16, 16)
    data.strong_view = True
    assert next(iter(data.train_dataloader()))[0].shape == (4, 2, 3, 16, 16)
    assert next(iter(data.val_dataloader()))[0].shape == (4, 3, 16, 16)


class _TwoViewLoss(nn.Module):
    """Records what a loss that names ``strong_view`` is given."""

    def forward(self, student_logits, teacher_logits, labels, strong_view):
        self.seen = (student_logits, teacher_logits, strong_view)
        return (student_logits - teacher_logits).pow(2).mean() + (strong_view[0] - strong_view[1]).pow(2).mean()


def test_a_loss_naming_strong_view_gets_both_networks_logits_of_the_second_view():
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)), nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    loss = _TwoViewLoss()
    distiller = Distiller(student, teacher=teacher, objective=Objective({"two": loss}, {"two": 1.0}, 1.0))
    assert distiller.wants_strong_view
    x = torch.randn(4, 2, 3, 4, 4)
    logits, _, terms = distiller.step(x, torch.tensor([0, 1, 2, 3]), torch.arange(4), 0)
    weak_s, weak_t, (strong_s, strong_t) = loss.seen
    assert torch.equal(logits, student(x[:, 0])) and torch.equal(weak_t, teacher(x[:, 0]))
    assert torch.equal(strong_s, student(x[:, 1])) and torch.equal(strong_t, teacher(x[:, 1]))
    assert strong_s.requires_grad and not strong_t.requires_grad and terms["kd/two"].requires_grad
    assert not Distiller(student, teacher=teacher).wants_strong_view


def test_cutout_fills_a_square_of_the_share_of_the_width_with_the_references_grey():
    from kd.data.strong import CUTOUT_FILL, cutout

    image = Image.new("RGB", (20, 20), (0, 0, 0))
    torch.manual_seed(0)
    filled = (torch.from_numpy(np.array(cutout(image, 0.25))) == torch.tensor(CUTOUT_FILL)).all(2).sum()
    assert 1 <= filled <= 6 * 6  # a side of 5 px, PIL filling both edges, clipped where it meets the border
    assert cutout(image, 0.0) is image


def test_every_strong_operation_keeps_the_image_size_and_pixel_type_at_both_ends_of_its_range():
    from kd.data.strong import OPERATIONS, StrongAugment

    image = Image.fromarray(torch.randint(0, 256, (12, 10, 3), dtype=torch.uint8).numpy())
    for operation, low, high in OPERATIONS:
        for value in (low, high - 1e-6):
            out = operation(image, value)
            assert out.size == image.size and out.mode == "RGB"
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (3, 12, 10), dtype=torch.uint8)
    out = StrongAugment()(pixels)
    assert out.shape == pixels.shape and out.dtype == torch.uint8


@pytest.mark.slow
def test_mlkd_trains_end_to_end_on_two_views_and_the_other_stages_on_one(tiny_data, tmp_path, capsys):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--baseline",
                 "--distill", "--kd_loss", "mlkd"]) == 0
    assert "distill (mlkd)" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "kd" / "distill").glob("version_*"))))
    events.Reload()
    assert {"train/kd/mlkd/instance_epoch", "train/kd/mlkd/ce_strong_epoch"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("flags, message", [
    (["--teacher_cache", "c"], "--teacher_cache: --kd_loss mlkd needs the teacher's logits of a second"),
    (["--mixup", "0.2"], "--kd_loss mlkd with --mixup 0.2 --cutmix 0.0: it compares two augmented views"),
    (["--mutual", "cnn_tiny"], "--mutual cnn_tiny with --kd_loss mlkd"),
])
def test_mlkd_refuses_what_would_break_its_second_view_in_one_line(tiny_data, tmp_path, capsys, flags, message):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--kd_loss", "mlkd", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
