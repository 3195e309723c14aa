"""The CIFAR-100 rows (configs/cifar100/) and scripts/reproduce.py: every row builds and takes a distillation step,
has its published figures, runs end to end on a fake CIFAR-100, and is compared with what was published."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fake_datasets import FAKES, skip_md5_check
from kd.cli import main as kd_main
from kd.flags import resolve
from kd.models.build import build_model
from kd.train.stage import StageBuilder

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT / "scripts" / "reproduce.py"
_spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)
PUBLISHED = yaml.safe_load(reproduce.PUBLISHED.read_text())
# A cheap stand-in for each pair's networks on a CPU: the resnet family has every layer the resnet rows hook.
SMALL = ["--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--accelerator", "cpu",
         "--teacher_arch", "cifar:resnet20", "--student_arch", "cifar:resnet8"]


def _config(row: str):
    return resolve(["--flags_file", "none", "--config", *map(str, reproduce.presets(row))]).config


@pytest.fixture
def cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake CIFAR-100 in torchvision's format (2 training and 1 test image per class), its MD5 check off."""
    skip_md5_check(monkeypatch)
    FAKES["CIFAR100"](tmp_path / "cifar")
    return tmp_path / "cifar"


def test_there_is_a_row_per_pair_and_method_of_the_tables():
    pairs = {"res32x4_res8x4", "wrn40_2_wrn16_2", "res56_res20", "vgg13_vgg8", "res32x4_shuv2"}
    methods = {"kl_softmax", "dkd", "crd", "fitnets", "at", "rkd", "pkt", "sp", "logit_std", "mlkd", "nst", "cc", "vid"}
    assert {row for row in reproduce.ROWS if row.endswith("/reviewkd")} == {  # the pairs with a published figure
        "res56_res20/reviewkd", "res32x4_res8x4/reviewkd", "res32x4_shuv2/reviewkd"}
    assert {row.split("/")[0] for row in reproduce.ROWS} == pairs
    assert {f"{pair}/{method}" for pair in pairs for method in methods} <= set(reproduce.ROWS)
    assert {row for row in reproduce.ROWS if row.endswith("/dist")} == {  # DIST's README has these three
        "res32x4_res8x4/dist", "res56_res20/dist", "res32x4_shuv2/dist"}
    assert {row for row in reproduce.ROWS if row.endswith("/ctkd")} == {  # CTKD's README has these three
        "res56_res20/ctkd", "wrn40_2_wrn16_2/ctkd", "vgg13_vgg8/ctkd"}
    assert {row for row in reproduce.ROWS if row.endswith("/mlkd")} == {f"{pair}/mlkd" for pair in pairs}


class _Training(list):
    """CIFAR-100's training split as the stage builder reads it: its length, and each image's class."""

    def __init__(self, size: int) -> None:
        super().__init__(index % 100 for index in range(size))

    @property
    def labels(self) -> list[int]:
        return self


@pytest.mark.parametrize("row", reproduce.ROWS)
def test_a_row_builds_its_networks_and_takes_a_distillation_step(row, one_thread):
    config = _config(row)
    assert (config.epochs, config.milestones, config.augment, config.image_size) == (240, [150, 180, 210], "cifar", 32)
    assert config.kd_loss == [row.split("/")[1]] and config.experiment_name == f"cifar100/{row.split('/')[0]}"
    data = SimpleNamespace(classes=[str(c) for c in range(100)], layout=SimpleNamespace(train=_Training(50_000)))
    student, teacher = build_model(config.student_arch, 100), build_model(config.teacher_arch[0], 100)
    distiller = StageBuilder(config, data).distiller(student, config, teacher, None)
    distiller.check_step(config.image_size, 100)  # kd's own trial step: every term depends on the student


def test_every_row_has_its_published_figures_and_sources():
    figures, sources = PUBLISHED["figures"], PUBLISHED["sources"]
    for row in reproduce.ROWS:
        pair, method = row.split("/")
        assert {"teacher", "student", method} <= set(figures[pair])
    for pair, row in figures.items():
        assert {f"{pair}/{m}" for m in row if m not in ("teacher", "student")} <= set(reproduce.ROWS)
        assert set(row) <= set(sources) and all(60 < figure < 80 for figure in row.values())
    assert (figures["res32x4_res8x4"]["student"], figures["res32x4_res8x4"]["kl_softmax"],
            figures["res32x4_res8x4"]["crd"], figures["res32x4_res8x4"]["dkd"]) == (72.50, 73.33, 75.51, 76.32)


def test_help_lists_every_row():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.split("rows (PAIR/METHOD):")[1].splitlines()
             if line.strip()}
    assert {f"{pair}{method}" for pair, methods in lines.items() for method in methods} == set(reproduce.ROWS)


@pytest.mark.parametrize("row, hint", [("res32x4_res8x/dkd", "did you mean res32x4_res8x4/dkd"),
                                       ("res32x4_res8x4", "--help lists the rows")])
def test_an_unknown_row_is_a_one_line_error(row, hint, capsys):
    assert reproduce.main([row]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: row {row!r}") and hint in err and err.count("\n") == 1


def test_the_script_translates_its_flags_for_kd():
    args, extra = reproduce.parser().parse_known_args(["res56_res20/dkd", "--data", "cifar", "--seeds", "0", "1",
                                                       "--teacher_checkpoint", "t.pth", "--epochs", "1"])
    argv = reproduce.kd_arguments(args, extra)
    assert argv[:2] == ["--flags_file", "none"] and "--resume" in argv and argv[-2:] == ["--epochs", "1"]
    config = resolve(argv).config
    assert (config.data_dir, config.seeds) == ("torchvision:CIFAR100:cifar", [0, 1])
    assert config.teacher_checkpoint == ["t.pth"]
    assert not config.train_teacher and config.baseline and config.distill and config.kd_loss == ["dkd"]
    assert config.loss_options == ["dkd.beta=2"]


@pytest.mark.slow
def test_a_feature_row_runs_end_to_end_on_a_fake_cifar100(cifar100, tmp_path, one_thread):
    row = [str(path) for path in reproduce.presets("res56_res20/crd")]
    # 16,384 negatives per image suit CIFAR-100's 50,000 images; the fake one has 200, so 199 span them all.
    assert kd_main(["--flags_file", "none", "--config", *row, "--data_dir", f"torchvision:CIFAR100:{cifar100}",
                    "--output_dir", str(tmp_path / "runs"), "--baseline", "false", "--loss_options", "crd.nce_k=199",
                    *SMALL]) == 0
    result = json.loads((tmp_path / "runs/cifar100/res56_res20/distill/version_0/result.json").read_text())
    assert result["kd_loss"] == "crd" and result["arch"] == "cifar:resnet8" and len(result["val_top1"]) == 1


# The methods and paradigms of the recent logit methods issue, each as it runs on a CIFAR pair at 32 px.
RECENT = {"mlkd": ["--kd_loss", "mlkd"], "nkd": ["--kd_loss", "nkd"], "wsld": ["--kd_loss", "wsld"],
          "skd": ["--kd_loss", "skd"], "ctkd": ["--kd_loss", "ctkd"],
          "dist_plus": ["--kd_loss", "dist_plus", "--student_layers", "layer3", "--teacher_layers", "layer3"],
          "dot": ["--optimizer", "dot"], "born_again": ["--born_again", "2"],
          "tf_kd": ["--kd_loss", "tf_kd", "--train_teacher", "false"],
          "uskd": ["--kd_loss", "uskd", "--student_layers", "layer2", "--train_teacher", "false"],
          "self_distill": ["--kd_loss", "self_distill", "--student_layers", "layer1", "layer2", "layer3",
                           "--train_teacher", "false"],
          "mutual": ["--mutual", "cifar:resnet8", "--train_teacher", "false"],
          "srd": ["--kd_loss", "srd", "--student_layers", "avgpool", "--teacher_layers", "avgpool"]}
# The methods with an init phase (RepDistiller's FSP, AB, FT), on resnet20 -> resnet8 as their presets hook them; at
# --lr 0.005, as the recipe's 0.05 leaves a teacher of one epoch on 200 images with maps whose FSP/FT losses overflow.
STAGES = ["--student_layers", "relu", "layer1", "layer2", "layer3", "--teacher_layers", "relu", "layer1", "layer2",
          "layer3"]
PREACT = ["--student_layers", "layer1.0.preact", "layer2.0.preact", "layer3.0.preact",
          "--teacher_layers", "layer1.2.preact", "layer2.2.preact", "layer3.2.preact"]
WITH_INIT = {"fsp": [*STAGES, "--loss_options", "fsp.init_epochs=1"],
             "ab": [*PREACT, "--loss_options", "ab.init_epochs=1"],
             "ft": ["--student_layers", "layer3", "--teacher_layers", "layer3", "--loss_options", "ft.init_epochs=1",
                    "ft.init_lr=0.01"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", [*RECENT, *WITH_INIT])
def test_each_recent_method_and_paradigm_trains_a_cifar_pair_at_32_px(method, cifar100, tmp_path, one_thread):
    flags = RECENT[method] if method in RECENT else ["--kd_loss", method, *WITH_INIT[method], "--lr", "0.005"]
    assert kd_main(["--flags_file", "none", "--config", str(PROJECT / "configs/cifar100/recipe.yaml"),
                    str(PROJECT / "configs/cifar100/res56_res20.yaml"), "--output_dir", str(tmp_path),
                    "--data_dir", f"torchvision:CIFAR100:{cifar100}", "--baseline", "false", *SMALL, *flags]) == 0
    results = [json.loads(path.read_text()) for path in tmp_path.rglob("result.json")]
    students = [r for r in results if r["stage"] != "teacher"]
    assert students and all(r["arch"] == "cifar:resnet8" and len(r["val_top1"]) == 1 for r in students)
    if method in WITH_INIT:
        assert sorted(r["stage"] for r in students) == ["distill", "init_distill"]


@pytest.mark.parametrize("row", [row for row in reproduce.ROWS if row.endswith(("/fsp", "/ab", "/ft"))])
def test_the_init_phase_rows_hook_layers_their_networks_have_and_their_losses_take(row):
    """Each FSP, AB and FT preset names layers of its real pair that its loss accepts (shapes at 32 px)."""
    from kd.losses.base import build_loss
    from kd.models.build import build_model
    from kd.train.hooks import feature_shapes

    config = _config(row)
    shapes = [feature_shapes(build_model(arch, 100), layers, 32, flag)
              for arch, layers, flag in ((config.student_arch, config.student_layers, "--student_layers"),
                                         (config.teacher_arch[0], config.teacher_layers, "--teacher_layers"))]
    build_loss(config.kd_loss[0], student_shapes=shapes[0], teacher_shapes=shapes[1])


def _table(output: str) -> dict[str, list[str]]:
    """The comparison table's three rows (teacher, baseline, distill) by run label, cut into cells at its rule."""
    lines = output.split("kd against the published CIFAR-100 top-1\n")[1].splitlines()
    spans = [match.span() for match in re.finditer("-+", lines[1])]
    rows = [[line[start:end].strip() for start, end in spans] for line in lines[2:5]]
    return {cells[0]: cells for cells in rows}


@pytest.mark.slow
def test_reproduce_trains_a_row_then_reuses_its_teacher_and_baseline_for_another(cifar100, tmp_path, capsys,
                                                                                  one_thread):
    common = ["--data", str(cifar100), "--output_dir", str(tmp_path / "runs"), *SMALL]
    assert reproduce.main(["res56_res20/dkd", *common]) == 0
    dkd = _table(capsys.readouterr().out)
    assert [cells[5] for cells in dkd.values()] == ["72.34", "69.06", "71.97"]  # resnet56, resnet20, DKD: published
    assert list(dkd) == ["teacher", "baseline", "distill (dkd)"]

    assert reproduce.main(["res56_res20/kl_softmax", *common]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 2  # the teacher and the baseline; the distilled student is new
    kl = _table(out)
    folder = tmp_path / "runs/cifar100/res56_res20"
    student = json.loads((folder / "distill/version_1/result.json").read_text())
    assert student["kd_loss"] == "kl_softmax" and kl["distill (kl_softmax)"][3] == f"{student['val_top1'][-1]:.2f}"
    assert kl["distill (kl_softmax)"][4] == f"{student['best_top1']:.2f}"  # the best epoch, which val/ selected
    assert kl["distill (kl_softmax)"][5] == "70.66" and kl["teacher"][3] == dkd["teacher"][3]
    assert kl["distill (kl_softmax)"][6] == f"{student['val_top1'][-1] - 70.66:+.2f}"
    assert kl["distill (kl_softmax)"][7] == f"{student['best_top1'] - 70.66:+.2f}"

    teacher = folder / "teacher/version_0/checkpoints/best.ckpt"
    assert reproduce.main(["res56_res20/kl_softmax", *common, "--teacher_checkpoint", str(teacher)]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 2  # the same teacher file: the same distilled student
    given = _table(out)
    assert given["teacher"][3] == "given" and given["distill (kl_softmax)"] == kl["distill (kl_softmax)"]
    assert f"teacher: given, {teacher}" in out
