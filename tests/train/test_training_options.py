"""Label smoothing, mixup and cutmix seen by both networks, and an EMA of the student's weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from conftest import FAST, run_cli
from kd.cli import main
from kd.config import Config
from kd.flags import resolve
from kd.data.loaders import make_datamodule
from kd.train.distiller import Distiller
from kd.errors import KDError
from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force
from kd.train.mixing import BatchMixing, batch_mixing
from kd.models.build import build_model, load_network
from kd.train.module import KDModule
from kd.report.results import StageResult
from kd.train.stage import StageBuilder

CLASSES = [f"c{i}" for i in range(6)]


def _batch(n: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=generator), torch.randint(len(CLASSES), (n,), generator=generator),
            torch.arange(n))


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    x, y, indices = _batch(n)
    return DataLoader(TensorDataset(x, y, indices), batch_size=batch_size)


def _smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-entropy with label smoothing, written out: q = (1 - eps)·targets + eps / C."""
    if targets.dim() == 1:
        targets = F.one_hot(targets, logits.shape[1]).double()
    q = (1 - eps) * targets.double() + eps / logits.shape[1]
    return -(q * logits.double().log_softmax(1)).sum(1).mean()


# ---------------------------------------------------------------- label smoothing


def test_label_smoothing_ce_equals_the_formula_alone_and_in_the_objective():
    x, y, indices = _batch()
    torch.manual_seed(0)
    plain = Distiller(build_model("cnn_tiny", len(CLASSES)), label_smoothing=0.2)
    logits, loss, terms = plain.step(x, y, indices, epoch=0)
    torch.testing.assert_close(loss.double(), _smoothed_ce(logits, y, 0.2))
    objective = build_objective(losses_in_force(["kl_softmax"], [0.5], 0.5, 4.0, []),
                                label_smoothing=0.2, num_classes=len(CLASSES))
    distill = Distiller(build_model("cnn_tiny", len(CLASSES)), teacher=build_model("cnn_small", len(CLASSES)),
                        objective=objective, label_smoothing=0.2)
    logits, _, terms = distill.step(x, y, indices, epoch=0)
    torch.testing.assert_close(terms["ce"].double(), _smoothed_ce(logits, y, 0.2))
    soft = torch.softmax(torch.randn(8, len(CLASSES)), 1)  # mixed targets are smoothed the same way
    logits, _, terms = distill.step(x, soft, indices, epoch=0)
    torch.testing.assert_close(terms["ce"].double(), _smoothed_ce(logits, soft, 0.2))


# ---------------------------------------------------------------- mixup and cutmix


def _lambda(targets: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The share of each image's own label in its mixed target (when its neighbour's label differs)."""
    return targets[torch.arange(len(y)), y]


def test_the_mix_is_a_function_of_seed_epoch_and_batch_and_leaves_the_global_generator_alone():
    x, y, _ = _batch()
    mixing = BatchMixing(0.4, 1.0, len(CLASSES), seed=3)
    state = torch.get_rng_state()
    first = mixing(x, y, epoch=2, batch=5)
    assert torch.equal(torch.get_rng_state(), state)
    again = BatchMixing(0.4, 1.0, len(CLASSES), seed=3)(x, y, epoch=2, batch=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in ((3, 2, 6), (3, 3, 5), (4, 2, 5)):  # another batch, epoch or seed: another mix
        seed, epoch, batch = other
        assert not torch.equal(BatchMixing(0.4, 1.0, len(CLASSES), seed)(x, y, epoch, batch)[1], first[1])
    assert batch_mixing(0.0, 0.0, len(CLASSES), 0) is None


def test_mixup_mixes_each_image_with_its_neighbour_by_one_lambda():
    x, y, _ = _batch()
    y = torch.arange(8) % len(CLASSES)  # neighbours' labels all differ
    mixed, targets = BatchMixing(0.4, 0.0, len(CLASSES), seed=0)(x, y, epoch=0, batch=0)
    lam = _lambda(targets, y)
    assert torch.allclose(lam, lam[0]) and 0 < lam[0] < 1
    torch.testing.assert_close(mixed, lam[0] * x + (1 - lam[0]) * x.roll(1, 0))
    torch.testing.assert_close(targets[torch.arange(8), y.roll(1, 0)], 1 - lam)


def test_cutmix_pastes_a_box_and_its_lambda_is_the_area_kept():
    x, y, _ = _batch(size=32)
    y = torch.arange(8) % len(CLASSES)
    found = 0
    for batch in range(8):
        mixed, targets = BatchMixing(0.0, 1.0, len(CLASSES), seed=0)(x, y, epoch=0, batch=batch)
        pasted = (mixed == x.roll(1, 0)).all(1)  # (B, H, W): pixels taken from the neighbour
        assert torch.equal(pasted | (mixed == x).all(1), torch.ones_like(pasted))
        assert all(torch.equal(pasted[0], p) for p in pasted)  # one box for the whole batch
        rows, cols = pasted[0].any(1).nonzero(), pasted[0].any(0).nonzero()
        if len(rows):
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box == pasted[0].sum()  # a rectangle
            found += 1
        torch.testing.assert_close(_lambda(targets, y), torch.full((8,), 1 - pasted[0].sum().item() / 32**2))
    assert found  # some draws paste a box at all


def test_with_both_each_batch_gets_one_of_the_two():
    x, y, _ = _batch()
    kinds = set()
    for batch in range(16):
        mixed, _ = BatchMixing(0.4, 1.0, len(CLASSES), seed=0)(x, y, epoch=0, batch=batch)
        kinds.add("cutmix" if ((mixed == x) | (mixed == x.roll(1, 0))).all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


def _distilling_module(**options) -> KDModule:
    torch.manual_seed(0)
    objective = build_objective(losses_in_force(["kl_softmax"], [0.5], 0.5, 4.0, []), num_classes=len(CLASSES))
    distiller = Distiller(build_model("cnn_tiny", len(CLASSES)), teacher=build_model("cnn_small", len(CLASSES)),
                          objective=objective, **options)
    return KDModule(distiller, "cnn_tiny", CLASSES)


def test_teacher_and_student_see_the_same_mixed_batch_and_the_ce_its_mixed_targets():
    module = _distilling_module(mixing=BatchMixing(0.4, 1.0, len(CLASSES), seed=0))
    module.log = module.log_dict = lambda *a, **k: None  # the step outside a Trainer: no logging
    seen = {}

    def record(name: str):  # noqa: ANN202 - a forward hook keeping the first input and output it sees
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, (inputs[0].clone(), output.detach()))
        return hook

    for name in ("model", "teacher"):
        getattr(module.distiller, name).register_forward_hook(record(name))
    x, y, indices = _batch()
    module.training_step((x, y, indices), 3)
    mixed, targets = BatchMixing(0.4, 1.0, len(CLASSES), seed=0)(x, y, epoch=0, batch=3)
    assert not torch.equal(mixed, x)
    assert torch.equal(seen["model"][0], mixed) and torch.equal(seen["teacher"][0], mixed)
    _, _, terms = module.distiller.step(mixed, targets, indices, 0)
    student, teacher = seen["model"][1], seen["teacher"][1]
    torch.testing.assert_close(terms["ce"].double(), _smoothed_ce(student, targets, 0.0))
    kl = F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean") * 16
    torch.testing.assert_close(terms["kd/kl_softmax"], kl)


def _cache_folder(data: Path, tmp_path: Path, **flags) -> Path:
    config = Config(data_dir=str(data), image_size=16, teacher_arch=["cnn_tiny"], teacher_cache=str(tmp_path),
                    **flags)
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():  # one teacher file: its bytes key the cache too
        torch.save(build_model("cnn_tiny", 12).state_dict(), teacher)
    return StageBuilder(config, make_datamodule(config)).teacher_cache((teacher,), config.seed).folder


def test_with_mixing_the_cache_is_keyed_by_the_mix_and_the_batch_size(tiny_data, tmp_path):
    """An image's mix depends on its batch: with mixing, the batch size is part of the key; without, not."""
    plain = _cache_folder(tiny_data, tmp_path)
    assert _cache_folder(tiny_data, tmp_path, batch_size=8) == plain
    mixed = _cache_folder(tiny_data, tmp_path, mixup=0.2)
    assert len({plain, mixed, _cache_folder(tiny_data, tmp_path, mixup=0.3),
                _cache_folder(tiny_data, tmp_path, mixup=0.2, batch_size=8),
                _cache_folder(tiny_data, tmp_path, cutmix=0.2)}) == 5


@pytest.fixture(scope="module")
def teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher",
                 "--teacher_arch", "cnn_small"]) == 0
    return out / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"


def _distill(tiny_data: Path, teacher: Path, out: Path, *flags: str) -> int:
    return main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--distill", "--teacher_arch",
                 "cnn_small", "--teacher_checkpoint", str(teacher), "--batch_size", "8", "--mixup", "0.4",
                 "--cutmix", "1.0", *flags])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "kd" / "distill" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]


def test_a_cached_mixed_run_replays_the_run_that_filled_the_cache(tiny_data, teacher, tmp_path, capsys):
    """The filling run trains on the teacher's logits of its mixed images (float32: exactly); a run that never
    loads the teacher reads them back by (epoch, image) and trains to the very same weights."""
    cache = ["--teacher_cache", str(tmp_path / "cache"), "--teacher_cache_dtype", "float32"]
    assert _distill(tiny_data, teacher, tmp_path / "filling", *cache) == 0
    assert _distill(tiny_data, teacher, tmp_path / "cached", *cache, "--teacher_cache_only") == 0
    filling, cached = _weights(tmp_path / "filling"), _weights(tmp_path / "cached")
    assert cached.keys() == filling.keys() and all(torch.equal(cached[k], v) for k, v in filling.items())
    capsys.readouterr()
    assert _distill(tiny_data, teacher, tmp_path / "other", *cache, "--teacher_cache_only", "--batch_size", "4") == 2
    assert "--teacher_cache_only:" in capsys.readouterr().err  # other batches, other mixes: not in the cache


def test_a_loss_that_learns_per_dataset_image_is_refused_with_mixing_before_anything_is_read(tmp_path, capsys):
    code = _distill(tmp_path / "no_data", tmp_path / "no_teacher.ckpt", tmp_path / "out", "--kd_loss", "crd",
                    "--student_layers", "features", "--teacher_layers", "features")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "error: --kd_loss crd with --mixup 0.4 --cutmix 1.0: it learns per dataset image" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, must", [
    ("label_smoothing", "-0.1", "be in [0, 1)"), ("label_smoothing", "1", "be in [0, 1)"),
    ("mixup", "-1", "be 0 or more"), ("cutmix", "-0.5", "be 0 or more"),
    ("ema", "0", "be in (0, 1)"), ("ema", "1", "be in (0, 1)"), ("ema", "1.5", "be in (0, 1)"),
])
def test_out_of_range_values_are_one_line_errors_naming_the_flag(flag, value, must):
    with pytest.raises(KDError) as info:
        resolve(["--flags_file", "none", f"--{flag}", value])
    assert str(info.value).startswith(f"command line: --{flag} must {must}") and "\n" not in str(info.value)


# ---------------------------------------------------------------- EMA of the student's weights


class RawWeights(pl.Callback):
    """The student's weights and buffers after every optimiser step (before the module's own hook runs)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})


def _ema_module(decay: float = 0.8) -> KDModule:
    torch.manual_seed(0)
    return KDModule(Distiller(build_model("cnn_small", len(CLASSES)), ema_decay=decay), "cnn_small", CLASSES)


def _trainer(epochs: int, callbacks: list | None = None, checkpoints: Path | None = None) -> pl.Trainer:
    """A quiet CPU Trainer; with ``checkpoints``, saving one checkpoint per epoch there (``epoch=N.ckpt``)."""
    saving = [ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1)] if checkpoints else []
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=bool(checkpoints),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[*(callbacks or []), *saving])


def _accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 in percent, the unit kd logs."""
    model.eval()
    with torch.no_grad():
        right = sum((model(x).argmax(1) == y).sum().item() for x, y, _ in loader)
    return 100 * right / len(loader.dataset)


def test_the_average_is_the_hand_computed_ema_and_is_validated_beside_the_raw_weights():
    module, raw = _ema_module(0.8), RawWeights()
    trainer = _trainer(2, [raw])
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(16))
    assert len(raw.steps) == 8  # 2 epochs of 4 batches
    expected = dict(raw.steps[0])  # the first update copies the weights
    for weights in raw.steps[1:]:
        expected = {k: 0.8 * expected[k] + 0.2 * w if w.is_floating_point() else expected[k]
                    for k, w in weights.items()}
    average = module.distiller.ema.module.state_dict()
    assert any("running_mean" in k for k in expected)  # BatchNorm statistics are averaged too
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(average[key], value)
    assert any(not torch.equal(average[k], w) for k, w in raw.steps[-1].items() if w.is_floating_point())
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["val/top1"].item(), _accuracy(module.distiller.ema.module, _loader(16)))
    torch.testing.assert_close(metrics["val/raw_top1"].item(), _accuracy(module.model, _loader(16)))


@pytest.mark.filterwarnings("ignore:.*exists and is not empty")  # the resumed run saves beside the first, on purpose
def test_the_average_is_saved_as_the_network_resumes_exactly_and_is_what_evaluate_loads(tmp_path):
    straight = _ema_module()
    _trainer(2, checkpoints=tmp_path).fit(straight, train_dataloaders=_loader(), val_dataloaders=_loader(16))
    saved = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)["state_dict"]
    average, own = straight.distiller.ema.module.state_dict(), straight.model.state_dict()
    assert set(saved) == {f"model.{k}" for k in average} | {f"raw_model.{k}" for k in own} | {"ema.n_averaged"}
    assert all(torch.equal(saved[f"model.{k}"], v) and torch.equal(saved[f"raw_model.{k}"], own[k])
               for k, v in average.items())
    evaluated = load_network(tmp_path / "epoch=1.ckpt", "cnn_small", CLASSES, 16, "--evaluate")  # what --evaluate runs
    assert all(torch.equal(evaluated.state_dict()[k], v) for k, v in average.items())
    resumed = _ema_module()
    _trainer(2, checkpoints=tmp_path).fit(resumed, train_dataloaders=_loader(), val_dataloaders=_loader(16),
                                          ckpt_path=tmp_path / "epoch=0.ckpt")
    for ours, theirs in ((resumed.distiller.ema, straight.distiller.ema), (resumed.model, straight.model)):
        mine, other = ours.state_dict(), theirs.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in other.items())


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_experiment_runs_every_stage_with_all_three_and_reports_the_average(tiny_data, tmp_path):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--baseline",
             "--distill", "--epochs", "2", "--label_smoothing", "0.1", "--mixup", "0.2", "--cutmix", "1.0",
             "--ema", "0.9"]
    done = run_cli(flags, tmp_path)
    assert done.returncode == 0, done.stderr
    result = StageResult.load(tmp_path / "kd" / "distill" / "version_0" / "result.json")
    config = (tmp_path / "kd" / "distill" / "version_0" / "config.yaml").read_text()
    assert "ema: 0.9" in config and "mixup: 0.2" in config and "label_smoothing: 0.1" in config
    checkpoint = result.best_checkpoint
    assert any(k.startswith("raw_model.") for k in torch.load(checkpoint, weights_only=True)["state_dict"])
    evaluated = run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--evaluate",
                         str(checkpoint)], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    top1 = float(re.search(r"top-1 ([0-9.]+) %", evaluated.stdout).group(1))
    assert top1 == pytest.approx(result.best_top1, abs=0.01)  # the reported top-1 is the average's
    again = run_cli([*flags, "--resume"], tmp_path)
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 3
