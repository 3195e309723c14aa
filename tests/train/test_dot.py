"""--optimizer dot: DOT's update against mdistiller's rule, its reduction to SGD, its state in checkpoints, a
distill run end to end, and the combinations refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import FAST, PROJECT
from kd.cli import main
from kd.config import Config
from kd.errors import KDError
from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force
from kd.models.build import build_model
from kd.train.distiller import Distiller
from kd.train.hooks import feature_shapes
from kd.train.module import KDModule
from kd.train.optim import DistillationOrientedTrainer, OptimSettings, check_dot_backward, check_optimizer

CLASSES = [f"c{i}" for i in range(6)]
LAYERS = ["features.3", "features.7"]  # two conv blocks of every SimpleCNN
Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------- the update rule, on plain tensors


def _start(seed: int = 0) -> Tensors:
    """A trunk both losses reach, a classifier only the cross-entropy reaches, a connector only distillation."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"trunk": (5, 4), "head": (3, 5), "connector": (2, 5)}
    return {name: torch.randn(*shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}


def _losses(p: Tensors, step: int, connector: bool = True, switching: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and distillation losses of batch ``step``; if ``switching``, distillation reaches the head too
    on odd steps."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g)
    h = torch.tanh(x @ p["trunk"].T)
    logits = h @ p["head"].T
    target = torch.randn(8, 2 if connector else 5, generator=g, dtype=torch.float64)
    kd = ((h @ p["connector"].T if connector else h) - target).pow(2).mean()
    if switching and step % 2:
        kd = kd + 0.3 * logits.pow(2).mean()
    return F.cross_entropy(logits, y), kd


def _gradients(loss: torch.Tensor, p: Tensors, retain: bool = False) -> Tensors:
    grads = torch.autograd.grad(loss, list(p.values()), retain_graph=retain, allow_unused=True)
    return {name: g for name, g in zip(p, grads) if g is not None}


def _reference_step(p: Tensors, ce: Tensors, kd: Tensors, state: dict[str, Tensors], lr: float, momentum: float,
                    delta: float, wd: float) -> Tensors:
    """mdistiller's DOT update (engine/dot.py, ``dot()``), written out on plain tensors."""
    m_task, m_kd = momentum - delta, momentum + delta
    new = dict(p)
    for name, grad in ce.items():  # the task (cross-entropy) gradient first
        d = grad + wd * p[name]
        if m_task != 0:
            if name not in state["task"]:
                state["task"][name] = d.clone()
            elif name in kd:
                state["task"][name] = m_task * state["task"][name] + d
            else:
                state["task"][name] = (m_kd + m_task) / 2.0 * state["task"][name] + d
            d = state["task"][name]
        new[name] = new[name] - lr * d
    for name, grad in kd.items():
        if name not in state["kd"]:
            state["kd"][name] = grad.clone()
        elif name in ce:
            state["kd"][name] = m_kd * state["kd"][name] + grad
        else:
            state["kd"][name] = (m_kd + m_task) / 2.0 * state["kd"][name] + grad + wd * p[name]
        new[name] = new[name] - lr * state["kd"][name]
    return new


def _dot_steps(steps: int, lr: float, momentum: float, delta: float, wd: float, connector: bool = True,
               switching: bool = True) -> Tensors:
    """DOT's weights after ``steps``, given the cross-entropy gradient as .grad and the distillation one held."""
    params = {name: nn.Parameter(value) for name, value in _start().items()}
    if not connector:
        del params["connector"]
    optimizer = DistillationOrientedTrainer(params.values(), lr=lr, momentum=momentum, delta=delta, weight_decay=wd)
    for step in range(steps):
        ce, kd = _losses(params, step, connector, switching)
        grads = torch.autograd.grad(kd, list(params.values()), retain_graph=True, allow_unused=True)
        optimizer.zero_grad()
        optimizer.hold_distillation_gradients(list(params.values()), grads)
        ce.backward()
        optimizer.step()
    return {name: p.detach() for name, p in params.items()}


@pytest.mark.parametrize("momentum, delta, wd", [(0.9, 0.075, 5e-4), (0.9, 0.0, 0.0), (0.8, 0.15, 1e-2),
                                                 (0.4, 0.4, 1e-2)])  # the last: no cross-entropy momentum
def test_the_update_is_mdistillers_for_parameters_reached_by_both_losses_or_one(momentum, delta, wd):
    lr, steps = 0.1, 5
    reference, state = {k: v.requires_grad_() for k, v in _start().items()}, {"task": {}, "kd": {}}
    for step in range(steps):
        ce, kd = _losses(reference, step)
        ce_grads, kd_grads = _gradients(ce, reference, retain=True), _gradients(kd, reference)
        reached_by_kd = {"trunk", "connector", "head"} if step % 2 else {"trunk", "connector"}
        assert set(ce_grads) == {"trunk", "head"} and set(kd_grads) == reached_by_kd
        reference = {k: v.detach().requires_grad_() for k, v in
                     _reference_step({k: v.detach() for k, v in reference.items()}, ce_grads, kd_grads, state, lr,
                                     momentum, delta, wd).items()}
    dot = _dot_steps(steps, lr, momentum, delta, wd)
    for name, value in reference.items():
        torch.testing.assert_close(dot[name], value.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dot["trunk"], _start()["trunk"])


@pytest.mark.parametrize("wd, connector", [(0.0, True), (1e-2, False)])
def test_with_no_delta_it_is_sgd_with_momentum_on_the_summed_loss(wd, connector):
    """As long as each loss reaches the same parameters at every step (a parameter a loss skips keeps that loss's
    momentum unapplied, as in mdistiller). With weight decay, as in mdistiller, a parameter only distillation
    reaches has none on its first step: the comparison with weight decay leaves the connector out."""
    lr, steps, momentum = 0.1, 5, 0.9
    params = {name: nn.Parameter(value) for name, value in _start().items() if connector or name != "connector"}
    sgd = torch.optim.SGD(params.values(), lr=lr, momentum=momentum, weight_decay=wd)
    for step in range(steps):
        sgd.zero_grad()
        sum(_losses(params, step, connector, switching=False)).backward()
        sgd.step()
    dot = _dot_steps(steps, lr, momentum, 0.0, wd, connector, switching=False)
    for name, value in params.items():
        torch.testing.assert_close(dot[name], value.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- through Lightning


def _loader(n: int = 32, batch_size: int = 8, dtype: torch.dtype = torch.float32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=generator, dtype=dtype)
    y = torch.randint(len(CLASSES), (n,), generator=generator)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch_size)


def _logit_module(optim: OptimSettings) -> KDModule:
    """cnn_tiny distilled from cnn_small with kl_softmax: every student parameter is reached by both losses."""
    torch.manual_seed(0)
    objective = build_objective(losses_in_force(["kl_softmax"], [0.7], 0.3, 3.0, []), num_classes=len(CLASSES))
    distiller = Distiller(build_model("cnn_tiny", len(CLASSES)), teacher=build_model("cnn_small", len(CLASSES)),
                          objective=objective)
    return KDModule(distiller, "cnn_tiny", CLASSES, image_size=16, optim=optim)


def _feature_module(optim: OptimSettings) -> KDModule:
    """cnn_tiny distilled from cnn_small with FitNets through connectors: the classifier is reached by the
    cross-entropy alone, the connectors by distillation alone."""
    torch.manual_seed(0)
    student, teacher = build_model("cnn_tiny", len(CLASSES)), build_model("cnn_small", len(CLASSES))
    shapes = (feature_shapes(student, LAYERS, 16, "--student_layers"),
              feature_shapes(teacher, LAYERS, 16, "--teacher_layers"))
    objective = build_objective(losses_in_force(["fitnets"], [], None, None, []), num_classes=len(CLASSES),
                                num_samples=32, student_shapes=shapes[0], teacher_shapes=shapes[1])
    distiller = Distiller(student, teacher=teacher, objective=objective, student_layers=LAYERS, teacher_layers=LAYERS,
                          feature_shapes=shapes)
    return KDModule(distiller, "cnn_tiny", CLASSES, image_size=16, optim=optim)


def _trainer(epochs: int, **options) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **options)


def _trained(module: KDModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.distiller.named_parameters() if not k.startswith("teacher.")}


def test_a_stage_with_dot_and_no_delta_trains_as_sgd_on_the_summed_loss():
    """The module hands DOT the two parts of its loss: with delta 0 the weights are SGD's (float64)."""
    runs = {}
    for optimizer in ("sgd", "dot"):
        module = _logit_module(OptimSettings(optimizer=optimizer, lr=0.1, dot_delta=0.0)).double()
        _trainer(1).fit(module, train_dataloaders=_loader(dtype=torch.float64))
        runs[optimizer] = _trained(module)
    assert runs["dot"].keys() == runs["sgd"].keys()
    for name, value in runs["sgd"].items():
        torch.testing.assert_close(runs["dot"][name], value, rtol=1e-10, atol=1e-12)


class StopAfterOneEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def test_dot_state_round_trips_through_a_checkpoint(tmp_path):
    """Resuming from the end of epoch 1 gives the weights of an uninterrupted run; without DOT's buffers it does not."""
    optim = OptimSettings(optimizer="dot", lr=0.05)
    straight = _feature_module(optim)
    _trainer(2).fit(straight, train_dataloaders=_loader(16))
    first = _feature_module(optim)
    trainer = _trainer(2, callbacks=[StopAfterOneEpoch()])  # the schedule of a 2-epoch run, stopped as a kill would
    trainer.fit(first, train_dataloaders=_loader(16))
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")

    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)
    names = {id(p): name for name, p in first.distiller.named_parameters()}
    names = [names[id(p)] for p in first.distiller.trained_parameters()]  # the optimiser's order
    buffers = {names[index]: set(state) for index, state in saved["optimizer_states"][0]["state"].items()}
    assert buffers["model.fc.weight"] == {"ce_momentum_buffer"}  # the cross-entropy's alone
    assert buffers["connectors.0.project.0.weight"] == {"kd_momentum_buffer"}  # distillation's alone
    assert buffers["model.features.0.weight"] == {"ce_momentum_buffer", "kd_momentum_buffer"}

    resumed = _feature_module(optim)
    _trainer(2).fit(resumed, train_dataloaders=_loader(16), ckpt_path=tmp_path / "epoch1.ckpt")
    expected, got = _trained(straight), _trained(resumed)
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    saved["optimizer_states"][0]["state"] = {}
    torch.save(saved, tmp_path / "no_buffers.ckpt")
    forgetful = _feature_module(optim)
    _trainer(2).fit(forgetful, train_dataloaders=_loader(16), ckpt_path=tmp_path / "no_buffers.ckpt")
    assert not torch.equal(_trained(forgetful)["model.features.0.weight"], expected["model.features.0.weight"])


def _scaled_run(kd_weight: float, scaler: torch.amp.GradScaler) -> tuple[KDModule, dict[str, torch.Tensor]]:
    """One step of DOT under float16 autocast on the CPU with ``scaler``, as --precision 16-mixed runs on a GPU."""
    module = _logit_module(OptimSettings(optimizer="dot", lr=0.05))
    module.distiller.objective.weights["kl_softmax"] = kd_weight
    before = _trained(module)
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    _trainer(1, plugins=[precision], limit_train_batches=1).fit(module, train_dataloaders=_loader())
    return module, before


def test_under_a_loss_scaler_the_distillation_gradient_is_unscaled():
    """Two loss scales give the same step: the distillation gradient, taken with the scale, is divided by it."""
    low, before = _scaled_run(0.7, torch.amp.GradScaler("cpu", init_scale=2.0**4))
    high, _ = _scaled_run(0.7, torch.amp.GradScaler("cpu", init_scale=2.0**12))
    low_weights, high_weights = _trained(low), _trained(high)
    assert not torch.equal(low_weights["model.features.0.weight"], before["model.features.0.weight"])
    for name, value in low_weights.items():
        torch.testing.assert_close(high_weights[name], value, rtol=1e-3, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # the skipped step
def test_under_a_loss_scaler_an_overflowing_distillation_gradient_skips_the_step_and_lowers_the_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    module, before = _scaled_run(1e38, scaler)  # distillation's gradient overflows float32; the cross-entropy's not
    assert all(torch.equal(value, before[name]) for name, value in _trained(module).items())
    assert scaler.get_scale() == 2.0**9


@pytest.mark.slow
def test_a_distill_run_with_dot_trains_every_stage(tiny_data, tmp_path):
    """The teacher stage (the cross-entropy alone: SGD) and the distill stage, with DOT's buffers in last.ckpt."""
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--optimizer", "dot"]) == 0
    both = {"ce_momentum_buffer", "kd_momentum_buffer"}
    for stage, kinds in (("teacher", {"ce_momentum_buffer"}), ("distill", both)):
        run = tmp_path / "kd" / stage / "version_0"
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert {key for state in saved["optimizer_states"][0]["state"].values() for key in state} == kinds
        assert (run / "result.json").is_file()


DDP_SCRIPT = """
import torch, pytorch_lightning as pl, torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force
from kd.models.build import build_model
from kd.train.distiller import Distiller
from kd.train.module import KDModule
from kd.train.optim import OptimSettings

class Compare(pl.Callback):
    def on_train_end(self, trainer, module):
        flat = torch.cat([p.detach().reshape(-1) for p in module.distiller.trained_parameters()])
        both = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(both, flat)
        if trainer.global_rank == 0:
            print("ranks differ by", (both[0] - both[1]).abs().max().item(), flush=True)

g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(6, (32,), generator=g), torch.arange(32))
torch.manual_seed(0)
objective = build_objective(losses_in_force(["kl_softmax"], [0.7], 0.3, 3.0, []), num_classes=6)
distiller = Distiller(build_model("cnn_tiny", 6), teacher=build_model("cnn_small", 6), objective=objective)
module = KDModule(distiller, "cnn_tiny", list("abcdef"), image_size=16, optim=OptimSettings(optimizer="dot"))
pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
           enable_progress_bar=False, enable_model_summary=False, callbacks=[Compare()]).fit(
    module, train_dataloaders=DataLoader(data, batch_size=8))
"""


@pytest.mark.slow
def test_under_ddp_the_distillation_gradient_is_averaged_over_the_processes(tmp_path):
    """Two processes on the CPU: each sees its own batches, and their weights stay the same only if the gradient
    DOT takes apart is averaged as DDP averages the other."""
    script = tmp_path / "ddp_dot.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks differ by 0.0\n" in result.stdout


# ---------------------------------------------------------------- refused combinations


@pytest.mark.parametrize("flags, message", [
    ({"dot_delta": 0.1}, "--dot_delta 0.1: it is for --optimizer dot, not sgd"),
    ({"optimizer": "dot", "momentum": 0.05}, "--optimizer dot --dot_delta 0.075 --momentum 0.05: the cross-entropy's "
                                             "momentum, --momentum - --dot_delta, would be negative"),
    ({"optimizer": "dot", "momentum": 0.95}, "--optimizer dot --dot_delta 0.075 --momentum 0.95: the distillation "
                                             "gradient's momentum, --momentum + --dot_delta, must stay below 1"),
    ({"optimizer": "dot", "strategy": "fsdp"}, "--optimizer dot --strategy fsdp: DOT takes the distillation gradient"),
])
def test_combinations_dot_cannot_run_are_one_line_errors_naming_the_flags(flags, message):
    with pytest.raises(KDError) as info:
        check_optimizer(Config(**flags))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("flags", [{}, {"optimizer": "dot"}, {"optimizer": "dot", "dot_delta": 0.0},
                                   {"optimizer": "dot", "momentum": 0.4, "dot_delta": 0.4},
                                   {"optimizer": "dot", "strategy": "ddp"}])
def test_combinations_dot_can_run_pass(flags):
    check_optimizer(Config(**flags))


def test_ddp_without_unused_parameter_detection_is_refused_when_distillation_has_parameters(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        connector = nn.Linear(2, 2)
        for find_unused, own, refused in ((False, [connector.weight], True), (True, [connector.weight], False),
                                          (False, [], False)):
            model = nn.parallel.DistributedDataParallel(nn.Linear(2, 2), find_unused_parameters=find_unused)
            if refused:
                with pytest.raises(KDError, match="use --strategy ddp_find_unused_parameters_true$"):
                    check_dot_backward(model, own)
            else:
                check_dot_backward(model, own)
    finally:
        dist.destroy_process_group()
    check_dot_backward(nn.Linear(2, 2), [connector.weight])  # one process: nothing to wait for
