"""Distillation methods through kd's public interface: the objective (weights, options, user losses), feature
hooks and connectors, a KDModule distilling features, and experiment.py runs of logit, feature and
teacher-assistant distillation."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from conftest import FAST, run_cli
from kd.cli import main
from kd.errors import KDError
from kd.train.hooks import Connector, FeatureHooks, feature_shapes
from kd.losses import build_loss
from kd.losses.objective import build_objective
from kd.losses.options import parse_loss_options
from kd.losses.spec import losses_in_force
from kd.models.build import build_model
from kd.models.checkpoints import read_checkpoint
from kd.train.distiller import Distiller
from kd.train.module import KDModule

CLASSES = [f"c{i}" for i in range(6)]
LAYERS = ["features.3", "features.7"]  # two conv blocks of every SimpleCNN (cnn_tiny, cnn_small, cnn_medium)


def _logits(seed: int, shape: tuple[int, int] = (5, 7)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def _labels(seed: int, shape: tuple[int, int] = (5, 7)) -> torch.Tensor:
    return torch.randint(shape[1], (shape[0],), generator=torch.Generator().manual_seed(seed))


def _call(objective, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, epoch: int = 0, **features):
    """The objective called as KDModule calls it (no hooked features unless given)."""
    extras = {"student_features": {}, "teacher_features": {}, "connected_features": {}} | features
    return objective(s, t, y, indices=torch.arange(len(y)), epoch=epoch, **extras)


def _hinton(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · batch mean of KL(softmax(t/T) ‖ softmax(s/T)), written out."""
    p_t, log_p_s = F.softmax(t / temperature, 1), F.log_softmax(s / temperature, 1)
    return temperature**2 * (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()


# ---------------------------------------------------------------- the objective

def test_total_is_ce_weight_times_ce_plus_each_weighted_loss():
    s, t, y = _logits(0).requires_grad_(True), _logits(1), _labels(2)
    objective = build_objective(losses_in_force(["kl_softmax", "mse_logits", "dkd"], [0.3, 0.5, 2.0], 0.7, 2.0, []),
                                num_classes=7)
    total, terms = _call(objective, s, t, y, epoch=19)  # dkd fully warmed up
    dkd = build_loss("dkd", temperature=2.0)(s, t, y, epoch=19)
    kl, mse, ce = _hinton(s, t, 2.0), ((s - t) ** 2).mean(), -F.log_softmax(s, 1)[torch.arange(5), y].mean()
    expected = 0.7 * ce + 0.3 * kl + 0.5 * mse + 2.0 * (dkd["tckd"] + dkd["nckd"])
    torch.testing.assert_close(total, expected)
    # Every term is logged on its own, unweighted: a scalar loss by its name, a dict loss term by term.
    assert list(terms) == ["ce", "kd/kl_softmax", "kd/mse_logits", "kd/dkd/tckd", "kd/dkd/nckd"]
    for name, value in {"ce": ce, "kd/kl_softmax": kl, "kd/mse_logits": mse, "kd/dkd/tckd": dkd["tckd"],
                        "kd/dkd/nckd": dkd["nckd"]}.items():
        torch.testing.assert_close(terms[name], value)
    total.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("losses, weights, ce_weight", [
    (["kl_softmax"], {"kl_softmax": 0.9}, 0.1),  # Hinton et al.: alpha = 0.9
    (["mse_logits"], {"mse_logits": 0.9}, 0.1),
    (["dkd"], {"dkd": 1.0}, 1.0),
    (["kl_softmax", "at"], {"kl_softmax": 0.9, "at": 1000.0}, 0.1),  # the smallest CE weight of the two
    (["fitnets", "dist"], {"fitnets": 100.0, "dist": 2.0}, 1.0),
])
def test_default_weights_come_from_the_papers(losses, weights, ce_weight):
    objective = build_objective(losses_in_force(losses, [], None, None, []), num_classes=7)
    assert objective.weights == weights and objective.ce_weight == ce_weight


def test_explicit_weights_replace_the_papers():
    objective = build_objective(losses_in_force(["kl_softmax", "dkd"], [0.25, 3.0], 0.0, None, []), num_classes=7)
    assert objective.weights == {"kl_softmax": 0.25, "dkd": 3.0} and objective.ce_weight == 0.0
    s, t, y = _logits(3), _logits(4), _labels(5)
    total, terms = _call(objective, s, t, y)
    torch.testing.assert_close(total, 0.25 * terms["kd/kl_softmax"] + 3.0 * (terms["kd/dkd/tckd"] +
                                                                             terms["kd/dkd/nckd"]))


def test_temperature_reaches_every_loss_that_has_one_and_defaults_to_each_papers():
    default = build_objective(losses_in_force(["kl_softmax", "logit_std", "mse_logits"], [], None, None, []),
                              num_classes=7)
    assert (default.losses["kl_softmax"].temperature, default.losses["logit_std"].temperature) == (4.0, 2.0)
    chosen = build_objective(losses_in_force(["kl_softmax", "logit_std", "mse_logits"], [], None, 1.5, []),
                             num_classes=7)
    assert chosen.losses["kl_softmax"].temperature == chosen.losses["logit_std"].temperature == 1.5


@pytest.mark.parametrize("losses, weights, parts", [
    (["kl_softmax", "dkd"], [1.0], ["--kd_weights: 1 weight(s) for 2 loss(es)", "kl_softmax dkd"]),
    (["dkd"], [1.0, 2.0], ["--kd_weights: 2 weight(s) for 1 loss(es)"]),
    (["dkd", "kl_softmax", "dkd"], [], ["--kd_loss", "names a loss twice"]),
    (["kd.losses.logits:DKD", "kd.losses.logits:DKD"], [], ["names a loss twice"]),
    ([], [], ["--kd_loss: name at least one"]),
])
def test_weights_and_losses_that_do_not_pair_up_are_errors(losses, weights, parts):
    with pytest.raises(KDError) as info:
        build_objective(losses_in_force(losses, weights, None, None, []), num_classes=7)
    assert all(part in str(info.value) for part in parts), str(info.value)


def test_a_loss_option_reaches_only_the_loss_it_names():
    objective = build_objective(losses_in_force(["kl_softmax", "dkd"], [], None, None, ["dkd.beta=4", "dkd.warmup=1"]),
                                num_classes=7)
    dkd = objective.losses["dkd"]
    assert (dkd.beta, dkd.warmup, dkd.alpha) == (4, 1, 1.0)  # alpha keeps the paper's value
    assert objective.losses["kl_softmax"].temperature == 4.0


def test_a_shared_option_reaches_every_loss_that_has_the_setting():
    objective = build_objective(losses_in_force(["dkd", "dist", "mse_logits"], [], None, None, ["beta=2", "gamma=0.5"]),
                                num_classes=7)
    assert objective.losses["dkd"].beta == objective.losses["dist"].beta == 2
    assert objective.losses["dist"].gamma == 0.5


def test_the_most_specific_option_wins():
    """NAME.SETTING over SETTING=, which beats --temperature."""
    objective = build_objective(losses_in_force(["kl_softmax", "dkd", "logit_std"], [], None, 2.0,
                                ["dkd.temperature=1", "logit_std.temperature=3", "beta=2", "dkd.beta=5"]),
                                num_classes=7)
    assert [objective.losses[k].temperature for k in ("kl_softmax", "dkd", "logit_std")] == [2.0, 1, 3]
    assert objective.losses["dkd"].beta == 5
    shared = build_objective(losses_in_force(["kl_softmax"], [], None, 2.0, ["temperature=6"]), num_classes=7)
    assert shared.losses["kl_softmax"].temperature == 6


@pytest.mark.parametrize("losses, options, parts", [
    (["dkd"], ["dkdd.beta=4"], ["--loss_options dkdd.beta=4", "dkdd is not one of --kd_loss (dkd)",
                                "did you mean dkd?"]),
    (["kl_softmax"], ["dkd.beta=4"], ["dkd is not one of --kd_loss (kl_softmax)"]),
    (["dkd"], ["dkd.betta=4"], ["--loss_options dkd.betta", "dkd has no setting betta", "did you mean beta?",
                                "its settings: alpha, beta, temperature, warmup"]),
    (["kl_softmax", "mse_logits"], ["warmup=3"], ["--loss_options warmup", "none of --kd_loss",
                                                  "kl_softmax, mse_logits"]),
    (["dkd", "dist"], ["betta=3"], ["--loss_options betta", "did you mean beta?",
                                    "their settings: alpha, beta, gamma, temperature, warmup"]),
    (["crd"], ["crd.num_samples=3"], ["num_samples is set by kd from the data and networks"]),
    (["at"], ["student_shapes=7"], ["student_shapes is set by kd"]),
    (["dkd"], ["dkd.beta"], ["expected NAME.SETTING=VALUE or SETTING=VALUE"]),
    (["dkd"], [".beta=4"], ["expected NAME.SETTING=VALUE"]),
    (["dkd"], ["dkd.=4"], ["expected NAME.SETTING=VALUE"]),
])
def test_unknown_loss_or_setting_in_loss_options_is_an_error(losses, options, parts):
    with pytest.raises(KDError) as info:
        build_objective(losses_in_force(losses, [], None, None, options), num_classes=7)
    assert all(part in str(info.value) for part in parts), str(info.value)


def test_loss_option_values_are_read_as_yaml():
    own, shared = parse_loss_options(["a.n=4", "a.x=0.5", "a.on=true", "a.name=hello", "a.sizes=[1, 2]", "k=0.001",
                                      "a.e=1e-3"], ["a", "b"])
    assert own == {"a": {"n": 4, "x": 0.5, "on": True, "name": "hello", "sizes": [1, 2], "e": 0.001}, "b": {}}
    assert shared == {"k": 0.001}


USER_LOSSES = '''
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def gap(student_logits, teacher_logits, labels):
    """A loss of the original three-argument form."""
    return ((student_logits - teacher_logits) ** 2).mean()


def ignores_student(student_logits, teacher_logits, labels):
    return teacher_logits.sum() * 0


class Seen:
    """A user feature loss: says what it was built with and what it receives (written beside this file)."""

    features = True

    def __init__(self, student_shapes, teacher_shapes):
        self.built = {"student_shapes": student_shapes, "teacher_shapes": teacher_shapes}

    def __call__(self, student_logits, teacher_logits, labels, student_features, teacher_features):
        seen = {**self.built, "student": {k: list(v.shape) for k, v in student_features.items()},
                "teacher": {k: list(v.shape) for k, v in teacher_features.items()}}
        Path(__file__).with_name("seen.json").write_text(json.dumps(seen))
        s, t = list(student_features.values())[-1], list(teacher_features.values())[-1]
        return (s.flatten(1).mean(1) - t.flatten(1).mean(1)).pow(2).mean()


class Connected(Seen):
    """The same, with the student's features first mapped to the teacher's shapes by kd's connectors."""

    connect = True

    def __call__(self, student_logits, teacher_logits, labels, student_features, teacher_features):
        Path(__file__).with_name("connected.json").write_text(json.dumps(
            {k: list(v.shape) for k, v in student_features.items()}))
        return sum(F.mse_loss(s, t) for s, t in zip(student_features.values(), teacher_features.values()))
'''


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "user_losses.py"
    path.write_text(textwrap.dedent(USER_LOSSES))
    return path


def test_a_three_argument_user_loss_still_works(user_file):
    objective = build_objective(losses_in_force([f"{user_file}:gap", "kl_softmax"], [], None, None, []), num_classes=7)
    assert objective.weights == {"gap": 1.0, "kl_softmax": 0.9} and objective.ce_weight == 0.1
    s, t, y = _logits(6).requires_grad_(True), _logits(7), _labels(8)
    total, terms = _call(objective, s, t, y)  # features, indices and epoch are offered; gap takes none
    torch.testing.assert_close(terms["kd/gap"], ((s - t) ** 2).mean())
    torch.testing.assert_close(total, 0.1 * terms["ce"] + terms["kd/gap"] + 0.9 * terms["kd/kl_softmax"])
    total.backward()
    assert s.grad.abs().sum() > 0


# ---------------------------------------------------------------- feature hooks and connectors

def test_feature_hooks_record_the_named_outputs_in_the_order_named():
    torch.manual_seed(0)
    model = build_model("cnn_tiny", 6).eval()
    hooks = FeatureHooks(model, ["features.7", "features.3"], "--student_layers")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
        features = hooks.take()
        assert list(features) == ["features.7", "features.3"]
        assert hooks.outputs == {}  # taken once: nothing outlives its step
        torch.testing.assert_close(features["features.3"], model.features[:4](x), rtol=0, atol=0)
        torch.testing.assert_close(features["features.7"], model.features[:8](x), rtol=0, atol=0)
        hooks.take()
        hooks.remove()
        model(x)
    assert hooks.outputs == {}  # removed: no longer recording


@pytest.mark.parametrize("names, parts", [
    (["features.30"], ["--student_layers: SimpleCNN has no module 'features.30'", "did you mean features.3",
                       "its modules: features, features.0, features.1", "pool, fc"]),
    (["layer4"], ["has no module 'layer4'", "its modules: features, features.0"]),
    ([""], ["has no module ''"]),
    (["features.3", "features.3"], ["features.3 features.3 names a module twice"]),
])
def test_feature_hooks_reject_names_the_model_lacks(names, parts):
    with pytest.raises(KDError) as info:
        FeatureHooks(build_model("cnn_tiny", 6), names, "--student_layers")
    assert all(part in str(info.value) for part in parts), str(info.value)


@pytest.mark.parametrize("source, target", [((8, 16, 16), (32, 8, 8)), ((8, 4, 4), (16, 8, 8)),
                                            ((16,), (64,)), ((32, 8, 8), (32, 8, 8))])
def test_connector_maps_student_features_to_the_teachers_shape(source, target):
    torch.manual_seed(0)
    connector = Connector(source, target)
    x = torch.randn(3, *source, requires_grad=True)
    y = connector(x)
    assert y.shape == (3, *target)
    if source == target:
        assert torch.equal(y, x)  # nothing to map
    else:
        y.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


@pytest.mark.parametrize("source, target", [((8, 16, 16), (64,)), ((64,), (8, 4, 4)), ((8, 4), (8, 4))])
def test_connector_refuses_features_of_another_rank(source, target):
    with pytest.raises(KDError, match=r"cannot connect a student feature of shape .* pair maps with maps"):
        Connector(source, target)


# ---------------------------------------------------------------- KDModule distilling features

def _loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    y = torch.randint(len(CLASSES), (n,), generator=generator)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch_size)


def _feature_distiller(loss: str = "fitnets") -> KDModule:
    torch.manual_seed(0)
    student, teacher = build_model("cnn_tiny", len(CLASSES)), build_model("cnn_medium", len(CLASSES))
    shapes = (feature_shapes(student, LAYERS, 16, "--student_layers"),
              feature_shapes(teacher, LAYERS, 16, "--teacher_layers"))
    objective = build_objective(losses_in_force([loss], [], None, None, []), num_classes=len(CLASSES), num_samples=16,
                                student_shapes=shapes[0], teacher_shapes=shapes[1])
    distiller = Distiller(student, teacher=teacher, objective=objective, student_layers=LAYERS, teacher_layers=LAYERS,
                          feature_shapes=shapes)
    return KDModule(distiller, "cnn_tiny", CLASSES, image_size=16)


def test_a_feature_step_trains_the_student_and_the_connectors_not_the_teacher():
    module = _feature_distiller()
    connectors = module.distiller.connectors
    assert [tuple(c(torch.zeros(2, *s)).shape[1:]) for c, s in zip(connectors, [(8, 8, 8), (16, 4, 4)])] == [
        (32, 8, 8), (64, 4, 4)]  # cnn_tiny's blocks mapped onto cnn_medium's
    module.log = module.log_dict = lambda *a, **k: None  # the step outside a Trainer: no logging
    module.train()
    loss = module.training_step(next(iter(_loader())), 0)
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.distiller.connectors.parameters())
    assert all(not p.requires_grad and p.grad is None for p in module.distiller.teacher.parameters())


def test_feature_distillation_keeps_the_teacher_and_saves_connectors_beside_the_student(tmp_path):
    module = _feature_distiller()
    teacher_before = copy.deepcopy(module.distiller.teacher.state_dict())
    connectors_before = copy.deepcopy(module.distiller.connectors.state_dict())
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(8))
    teacher_after = module.distiller.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)  # BN statistics too
    assert not all(torch.equal(v, module.distiller.connectors.state_dict()[k]) for k, v in connectors_before.items())
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=True)["state_dict"]
    assert {k for k in saved if k.startswith("connectors.")} == {f"connectors.{k}" for k in
                                                                 module.distiller.connectors.state_dict()}
    assert not any(k.startswith("teacher.") for k in saved)
    weights, meta = read_checkpoint(tmp_path / "student.ckpt", "--evaluate")
    assert weights.keys() == module.model.state_dict().keys() and meta["arch"] == "cnn_tiny"


def test_check_step_changes_nothing_and_passes_a_feature_loss():
    distiller = _feature_distiller("crd").distiller  # BN statistics and CRD's memory banks and normalisers
    before = copy.deepcopy(distiller.state_dict())
    distiller.train()
    distiller.check_step(16, len(CLASSES))
    assert distiller.training and distiller.teacher is not None and not distiller.teacher.training
    after = distiller.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_check_step_refuses_a_loss_that_ignores_the_student(user_file):
    torch.manual_seed(0)
    objective = build_objective(losses_in_force([f"{user_file}:ignores_student"], [], None, None, []),
                                num_classes=len(CLASSES))
    distiller = Distiller(build_model("cnn_tiny", len(CLASSES)), teacher=build_model("cnn_tiny", len(CLASSES)),
                          objective=objective)
    with pytest.raises(KDError, match="--kd_loss ignores_student: its value does not depend on the student's "
                                      "logits or features"):
        distiller.check_step(16, len(CLASSES))


# ---------------------------------------------------------------- experiment.py end to end

@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory) -> Path:
    """A cnn_medium teacher trained for one epoch on the tiny data: its best checkpoint."""
    out = tmp_path_factory.mktemp("teacher")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher",
                 "--teacher_arch", "cnn_medium"]) == 0
    return (out / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt").resolve()


def _distill(tiny_data: Path, out: Path, teacher: Path, *flags: str) -> list[str]:
    return [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--distill", "--teacher_checkpoint",
            str(teacher), "--teacher_arch", "cnn_medium", *flags]


def _summary(stdout: str) -> dict[str, list[str]]:
    """The summary table's rows by stage label (``distill (dkd)``), each split into its columns."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = {}
    for line in lines[header + 2:]:
        if not line.strip() or line.startswith(("report:", "each stage")) or "gain over" in line:
            break
        label, rest = line.split("  ", 1)
        rows[label.strip()] = rest.split()
    return rows


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [s.value for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_dkd_distills_end_to_end_with_its_options_and_paper_weights(tiny_data, teacher, tmp_path):
    result = run_cli(_distill(tiny_data, tmp_path, teacher, "--kd_loss", "dkd", "--loss_options", "dkd.warmup=1"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _summary(result.stdout)
    assert list(rows) == ["distill (dkd)"] and rows["distill (dkd)"][0] == "cnn_tiny"
    stage = tmp_path / "kd" / "distill" / "version_0"
    scalars = _scalars(stage)
    assert {"train/ce_step", "train/kd/dkd/tckd_step", "train/kd/dkd/nckd_step"} <= set(scalars)
    assert scalars["weight/ce"] == [1.0] and scalars["weight/kd/dkd"] == [1.0]
    saved = yaml.safe_load((stage / "config.yaml").read_text())
    assert saved["kd_loss"] == ["dkd"] and saved["loss_options"] == ["dkd.warmup=1"]
    assert json.loads((stage / "result.json").read_text())["kd_loss"] == "dkd"


@pytest.mark.slow
def test_feature_methods_distill_end_to_end_and_keep_connectors_out_of_the_student(tiny_data, teacher, tmp_path):
    result = run_cli(_distill(tiny_data, tmp_path, teacher, "--kd_loss", "at", "fitnets", "--student_layers",
                              *LAYERS, "--teacher_layers", *LAYERS), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(_summary(result.stdout)) == ["distill (at+fitnets)"]
    stage = tmp_path / "kd" / "distill" / "version_0"
    scalars = _scalars(stage)
    assert {"train/kd/at_step", "train/kd/fitnets_step"} <= set(scalars)
    assert scalars["weight/kd/at"] == [1000.0] and scalars["weight/kd/fitnets"] == [100.0]
    assert scalars["weight/ce"] == [1.0]
    best = stage / "checkpoints" / "best.ckpt"
    state = torch.load(best, weights_only=True)["state_dict"]
    assert any(k.startswith("connectors.") for k in state) and not any(k.startswith("teacher.") for k in state)
    weights, _ = read_checkpoint(best, "--evaluate")
    assert weights.keys() == build_model("cnn_tiny", 12).state_dict().keys()


def test_a_user_feature_loss_gets_the_hooked_features_by_name(tiny_data, teacher, tmp_path, user_file):
    student_layers, teacher_layers = ["features.3", "features.7"], ["features.7", "features.11"]
    assert main(_distill(tiny_data, tmp_path, teacher, "--kd_loss", f"{user_file}:Seen", f"{user_file}:Connected",
                         "--student_layers", *student_layers, "--teacher_layers", *teacher_layers)) == 0
    seen = json.loads((tmp_path / "seen.json").read_text())  # from the last training step (a batch of 8)
    assert seen == {"student_shapes": {"features.3": [8, 8, 8], "features.7": [16, 4, 4]},
                    "teacher_shapes": {"features.7": [64, 4, 4], "features.11": [128, 2, 2]},
                    "student": {"features.3": [8, 8, 8, 8], "features.7": [8, 16, 4, 4]},
                    "teacher": {"features.7": [8, 64, 4, 4], "features.11": [8, 128, 2, 2]}}
    connected = json.loads((tmp_path / "connected.json").read_text())
    assert connected == {"features.3": [8, 64, 4, 4], "features.7": [8, 128, 2, 2]}
    tags = set(_scalars(tmp_path / "kd" / "distill" / "version_0"))
    assert {"train/kd/Seen_step", "train/kd/Connected_step"} <= tags


@pytest.mark.slow
def test_assistant_is_distilled_first_and_teaches_the_student(tiny_data, teacher, tmp_path, capsys):
    flags = _distill(tiny_data, tmp_path, teacher, "--assistant_arch", "cnn_small")
    result = run_cli(flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _summary(result.stdout)
    assert list(rows) == ["assistant1 (kl_softmax)", "distill (kl_softmax)"]
    assert rows["assistant1 (kl_softmax)"][0] == "cnn_small" and rows["distill (kl_softmax)"][0] == "cnn_tiny"
    root = tmp_path / "kd"
    assert result.stdout.index("== assistant1: cnn_small") < result.stdout.index("== distill: cnn_tiny")
    assistant = yaml.safe_load((root / "assistant1" / "version_0" / "config.yaml").read_text())
    assert (assistant["teacher_arch"], assistant["student_arch"]) == (["cnn_medium"], "cnn_small")
    assert assistant["teacher_checkpoint"] == [str(teacher)]
    distill = yaml.safe_load((root / "distill" / "version_0" / "config.yaml").read_text())
    assistant_best = (root / "assistant1" / "version_0" / "checkpoints" / "best.ckpt").resolve()
    assert (distill["teacher_arch"], distill["student_arch"]) == (["cnn_small"], "cnn_tiny")
    assert distill["teacher_checkpoint"] == [str(assistant_best)] and assistant_best.is_file()
    assert read_checkpoint(assistant_best, "--teacher_checkpoint")[1]["arch"] == "cnn_small"

    # --resume finds both stages finished: nothing is trained again, nothing rewritten.
    stamps = {stage: (root / stage / "version_0" / "result.json").stat().st_mtime_ns
              for stage in ("assistant1", "distill")}
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier in") == 2 and "== assistant1: " not in again and "== distill: " not in again
    assert list(_summary(again)) == list(rows)
    for stage, stamp in stamps.items():
        assert sorted(p.name for p in (root / stage).iterdir()) == ["version_0"]
        assert (root / stage / "version_0" / "result.json").stat().st_mtime_ns == stamp


def test_a_finished_stage_leaves_no_hooks_on_the_shared_teacher():
    """Each seed's stage hooks the same teacher: stale hooks would keep its feature maps alive."""
    teacher = build_model("cnn_medium", len(CLASSES)).eval()
    objective = build_objective(losses_in_force(["at"], [], None, None, []), num_classes=len(CLASSES))
    for _ in range(2):
        module = KDModule(Distiller(build_model("cnn_tiny", len(CLASSES)), teacher=teacher, objective=objective,
                                    student_layers=LAYERS, teacher_layers=LAYERS), "cnn_tiny", CLASSES, image_size=16)
        assert any(m._forward_hooks for m in teacher.modules())
        module.teardown("fit")
        assert not any(m._forward_hooks for m in teacher.modules())
