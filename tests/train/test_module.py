"""The LightningModule: a frozen teacher, the combined loss, and the learning-rate schedules."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force
from kd.losses.logits import kl_softmax
from kd.models.build import build_model
from kd.train.distiller import Distiller
from kd.train.module import KDModule
from kd.train.optim import OptimSettings

CLASSES = [f"c{i}" for i in range(6)]


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    y = torch.randint(len(CLASSES), (n,), generator=generator)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch_size)  # (images, labels, indices)


class LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(module: KDModule, epochs: int = 1, callbacks: list | None = None) -> None:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [])
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(16))


def _distiller(kd_weight: float = 0.7, ce_weight: float = 0.3, **kwargs) -> KDModule:
    torch.manual_seed(0)
    teacher = build_model("cnn_small", len(CLASSES))
    student = build_model("cnn_tiny", len(CLASSES))
    objective = build_objective(losses_in_force(["kl_softmax"], [kd_weight], ce_weight, 3.0, []),
                                num_classes=len(CLASSES))
    return KDModule(Distiller(student, teacher=teacher, objective=objective, **kwargs), "cnn_tiny", CLASSES)


def test_teacher_is_frozen_in_eval_mode_and_never_updated():
    module = _distiller()
    before = copy.deepcopy(module.distiller.teacher.state_dict())
    student_before = copy.deepcopy(module.model.state_dict())
    _fit(module, epochs=2)
    after = module.distiller.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics alike
    assert not any(torch.equal(student_before[k], v) for k, v in module.model.state_dict().items()
                   if k.endswith("weight"))
    module.train()
    assert not module.distiller.teacher.training and module.model.training
    assert all(not p.requires_grad and p.grad is None for p in module.distiller.teacher.parameters())


def test_training_loss_is_weighted_sum_of_distillation_and_cross_entropy():
    module = _distiller(kd_weight=0.7, ce_weight=0.3)
    x, y, indices = next(iter(_loader()))
    module.log = module.log_dict = lambda *a, **k: None  # the step outside a Trainer: no logging
    loss = module.training_step((x, y, indices), 0)
    student, teacher = module.model(x), module.distiller.teacher(x)
    expected = 0.7 * kl_softmax(student, teacher, 3.0) + 0.3 * F.cross_entropy(student, y)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters())


@pytest.mark.parametrize("scheduler, warmup", [("cosine", 0.0), ("cosine", 1.0), ("step", 0.0), ("multistep", 0.0),
                                               ("none", 0.5)])
def test_learning_rate_schedules(scheduler, warmup):
    milestones = (2, 3) if scheduler == "multistep" else ()  # epochs: the same steps as "step" over 4 epochs
    module = KDModule(Distiller(build_model("cnn_tiny", len(CLASSES))), "cnn_tiny", CLASSES,
                      optim=OptimSettings(lr=0.1, scheduler=scheduler, warmup_epochs=warmup, milestones=milestones))
    rates = LearningRates()
    _fit(module, epochs=4, callbacks=[rates])
    lr, total = rates.values, 16  # 4 epochs of 4 batches
    warm = int(warmup * total / 4)
    assert len(lr) == total
    if warm:
        assert lr[0] < lr[warm - 1] < 0.1 and math.isclose(lr[warm], 0.1)
    after = lr[warm:]
    if scheduler == "cosine":
        assert math.isclose(after[0], 0.1) and all(a > b for a, b in zip(after, after[1:]))
        assert after[-1] < 0.01
    elif scheduler in ("step", "multistep"):
        assert lr[:8] == [0.1] * 8 and all(math.isclose(v, 0.01) for v in lr[8:12])
        assert all(math.isclose(v, 0.001) for v in lr[12:])
    else:
        assert all(math.isclose(v, 0.1) for v in after)


def test_the_distiller_step_runs_without_a_trainer():
    """The training step is a plain nn.Module: logits, the weighted loss and its named terms."""
    distiller = _distiller(kd_weight=0.7, ce_weight=0.3).distiller
    x, y, indices = next(iter(_loader()))
    logits, loss, terms = distiller.step(x, y, indices, epoch=0)
    student, teacher = distiller.model(x), distiller.teacher(x)
    assert logits.shape == (8, len(CLASSES)) and set(terms) == {"ce", "kd/kl_softmax"}
    torch.testing.assert_close(terms["kd/kl_softmax"], kl_softmax(student, teacher, 3.0))
    torch.testing.assert_close(loss, 0.7 * terms["kd/kl_softmax"] + 0.3 * terms["ce"])
    plain = Distiller(build_model("cnn_tiny", len(CLASSES)))
    _, loss, terms = plain.step(x, y, indices, epoch=0)
    assert not plain.distilling and set(terms) == {"ce"} and torch.equal(loss, terms["ce"])


def test_checkpoints_keep_the_flat_layout_and_resume_into_the_distiller(tmp_path):
    """Checkpoints hold model.* (what --evaluate and --teacher_checkpoint read), never the teacher."""
    module = _distiller()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(16))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()}
    assert saved["hyper_parameters"]["arch"] == "cnn_tiny" and saved["hyper_parameters"]["optim"]["lr"] == 0.05
    again = _distiller()
    resumed = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    resumed.fit(again, train_dataloaders=_loader(), val_dataloaders=_loader(16), ckpt_path=tmp_path / "a.ckpt")
    assert resumed.current_epoch == 2


def test_multistep_milestones_count_epochs_from_the_start_warm_up_included():
    module = KDModule(Distiller(build_model("cnn_tiny", len(CLASSES))), "cnn_tiny", CLASSES,
                      optim=OptimSettings(lr=0.1, scheduler="multistep", warmup_epochs=1, milestones=(3,),
                                          lr_decay=0.5))
    rates = LearningRates()
    _fit(module, epochs=4, callbacks=[rates])
    lr = rates.values  # 4 batches per epoch
    assert lr[0] < lr[3] < 0.1 and all(math.isclose(v, 0.1) for v in lr[4:12])
    assert all(math.isclose(v, 0.05) for v in lr[12:])
