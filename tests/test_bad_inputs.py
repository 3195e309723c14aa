"""The README's bad-input table, row by row: experiment.py as a subprocess, its exit code, its one-line
message, and every file written before it left exactly as it was."""

from __future__ import annotations

import resource
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli
from kd.cli import main
from kd.models.build import build_model

pytestmark = pytest.mark.slow  # every case runs experiment.py as a subprocess (~10 s each)


@pytest.fixture(scope="module")
def earlier(tiny_data, tmp_path_factory) -> Path:
    """An output folder holding a finished teacher + baseline run: the work no bad input may touch."""
    out = tmp_path_factory.mktemp("earlier")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher", "--baseline",
                 "--teacher_arch", "cnn_small"]) == 0
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# Helpers that break a copy of the tiny dataset (or write a bad file) and return the --data_dir to use.
def _copy(data: Path, tmp: Path) -> Path:
    return shutil.copytree(data, tmp / "data")


def _empty_class(data: Path, tmp: Path) -> Path:
    root = _copy(data, tmp)
    for image in (root / "train" / "blue_ring").iterdir():
        image.unlink()
    return root


def _no_images(data: Path, tmp: Path) -> Path:
    root = _copy(data, tmp)
    for image in root.rglob("*.png"):
        image.unlink()
    return root


def _val_classes_differ(data: Path, tmp: Path) -> Path:
    root = _copy(data, tmp)
    shutil.rmtree(root / "val" / "red_triangle")
    return root


def _unreadable(data: Path, tmp: Path) -> Path:
    root = _copy(data, tmp)
    (root / "train" / "red_ring" / "0000.png").write_bytes(b"\x89PNG not really")
    return root


def _truncated(data: Path, tmp: Path) -> Path:
    root = _copy(data, tmp)
    image = root / "val" / "blue_square" / "0001.png"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    return root


def _two_classes(data: Path, tmp: Path) -> Path:
    root = _copy(data, tmp)
    for split in ("train", "val"):
        for folder in sorted((root / split).iterdir())[2:]:
            shutil.rmtree(folder)
    return root


def _files(**files: str | bytes) -> Callable[[Path, Path], Path]:
    """A setup writing ``files`` into the test's folder, the data left as it is."""
    def write(data: Path, tmp: Path) -> Path:
        for name, content in files.items():
            path = tmp / name.replace("__", ".")
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return data
    return write


def _five_class_teacher(data: Path, tmp: Path) -> Path:
    torch.save(build_model("cnn_small", 5).state_dict(), tmp / "five.pt")
    return data


LOSSES = ("import torch\n"
          "def Constant(s, t, y):\n    return torch.tensor(1.0)\n"
          "def Nothing(s, t, y):\n    return {}\n"
          "def Explode(s, t, y):\n    return (s * 0).sum() / torch.zeros(()) if s.requires_grad else s.sum()\n")
TEACHER = ["--distill", "--teacher_checkpoint", "{teacher}", "--teacher_arch", "cnn_small"]


@dataclass
class Case:
    """A bad input: how to make it, the flags, the message the user must see, and what it may write."""

    setup: Callable[[Path, Path], Path] = lambda data, tmp: data
    flags: list[str] = field(default_factory=list)
    message: str = ""
    writes: bool = False  # may it add files (a stage that started)? Earlier files stay untouched regardless.
    code: int = 2
    limit_file_size: int | None = None


CASES = {
    # Flags, presets and values
    "unknown flag in the flags file": Case(_files(commandline_args__txt="--baseline\n--epohcs 3\n"),
                                           ["--flags_file", "commandline_args.txt"],
                                           "commandline_args.txt:2: unknown flag --epohcs (did you mean --epochs?)"),
    "two flags on one line": Case(_files(commandline_args__txt="--epochs 3 --lr 0.1\n"),
                                  ["--flags_file", "commandline_args.txt"],
                                  "commandline_args.txt:1: one flag per line, found 2"),
    "unknown key in a preset": Case(_files(p__yaml="epochs: 3\nlrr: 0.1\n"), ["--config", "p.yaml"],
                                    "p.yaml:2: unknown flag --lrr (did you mean --lr?)"),
    "preset that is not YAML": Case(_files(p__yaml="epochs: 3\nlr: [0.1\n"), ["--config", "p.yaml"],
                                    "p.yaml:3: not valid YAML"),
    "value out of range": Case(flags=["--ce_weight", "-1"],
                               message="command line: --ce_weight must be 0 or more, got -1.0"),
    "value of the wrong type": Case(flags=["--epochs", "ten"], message="command line: --epochs expects int, got 'ten'"),
    "experiment name leaving the output folder": Case(flags=["--experiment_name", "../elsewhere"],
                                                      message="--experiment_name must be a non-empty relative name"),
    "nothing to run": Case(flags=["--baseline", "false"], message="nothing to run: pass --train_teacher"),
    "distill without a teacher": Case(flags=["--distill"], message="--distill needs a teacher"),
    # Data
    "missing data folder": Case(lambda d, t: t / "nowhere", message="--data_dir: {tmp}/nowhere does not exist"),
    "no images": Case(_no_images, message="--data_dir: no images"),
    "empty class folder": Case(_empty_class,
                               message="--data_dir: class folder {tmp}/data/train/blue_ring has no images"),
    "class folders differ between train and val": Case(_val_classes_differ,
                                                       message="differ from train/: missing ['red_triangle']"),
    "class count differs from --num_classes": Case(flags=["--num_classes", "3"],
                                                   message="--num_classes is 3 but {data} holds 12 classes"),
    "unreadable image": Case(_unreadable, message="--data_dir: cannot read image {tmp}/data/train/red_ring/0000.png"),
    "truncated image met in training": Case(_truncated, ["--num_workers", "1"],
                                            "baseline (seed 0): cannot read image {tmp}/data/val/blue_square/0001.png",
                                            writes=True),
    # Models and losses
    "unknown architecture": Case(flags=["--student_arch", "resnet19"],
                                 message="unknown model 'resnet19' (did you mean resnet18"),
    "network that cannot take the image size": Case(flags=["--student_arch", "vit_b_16"],
                                                    message="--student_arch vit_b_16 does not run on 16 px images"),
    "unknown loss": Case(flags=[*TEACHER, "--kd_loss", "kl_sofmax"],
                         message="unknown loss 'kl_sofmax' (did you mean kl_softmax?)"),
    "loss that ignores the student": Case(_files(losses__py=LOSSES),
                                          [*TEACHER, "--kd_loss", "{tmp}/losses.py:Constant"],
                                          "does not depend on the student's logits"),
    "loss returning nothing": Case(_files(losses__py=LOSSES), [*TEACHER, "--kd_loss", "{tmp}/losses.py:Nothing"],
                                   "returned an empty dict"),
    # Distillation methods: losses, weights, options, layers, assistants and the teacher cache
    "duplicate loss": Case(flags=[*TEACHER, "--kd_loss", "dkd", "kl_softmax", "dkd"],
                           message="--kd_loss: dkd, kl_softmax, dkd names a loss twice"),
    "weights that do not match the losses": Case(flags=[*TEACHER, "--kd_loss", "kl_softmax", "dkd", "--kd_weights",
                                                        "1"],
                                                 message="--kd_weights: 1 weight(s) for 2 loss(es) in --kd_loss "
                                                         "(kl_softmax dkd)"),
    "negative loss weight": Case(flags=["--kd_weights", "0.5", "-1"],
                                 message="command line: --kd_weights must be 0 or more, got -1.0"),
    "loss option for a loss not chosen": Case(flags=[*TEACHER, "--loss_options", "dkd.beta=4"],
                                              message="--loss_options dkd.beta=4: dkd is not one of --kd_loss "
                                                      "(kl_softmax)"),
    "loss option a loss does not have": Case(flags=[*TEACHER, "--kd_loss", "dkd", "--loss_options", "dkd.betta=4"],
                                             message="--loss_options dkd.betta: dkd has no setting betta (did you "
                                                     "mean beta?); its settings: alpha, beta, temperature, warmup"),
    "feature loss without layers": Case(flags=[*TEACHER, "--kd_loss", "kl_softmax", "at"],
                                        message="--kd_loss kl_softmax at: feature losses need --student_layers and "
                                                "--teacher_layers"),
    "unequal layer counts": Case(flags=[*TEACHER, "--kd_loss", "at", "--student_layers", "features.3", "features.7",
                                        "--teacher_layers", "features.7"],
                                 message="--student_layers names 2 module(s) but --teacher_layers 1"),
    "unknown layer name": Case(flags=[*TEACHER, "--kd_loss", "fitnets", "--student_layers", "features.7",
                                      "--teacher_layers", "layer4"],
                               message="--teacher_layers: SimpleCNN has no module 'layer4'; its modules: features, "
                                       "features.0, features.1"),
    "unknown assistant architecture": Case(flags=[*TEACHER, "--assistant_arch", "cnn_smal"],
                                           message="unknown model 'cnn_smal' (did you mean cnn_small"),
    "teacher cache only, without a teacher cache": Case(flags=[*TEACHER, "--teacher_cache_only"],
                                                        message="--teacher_cache_only needs --teacher_cache DIR"),
    "teacher cache with a feature loss": Case(flags=[*TEACHER, "--kd_loss", "at", "--student_layers", "features.7",
                                                     "--teacher_layers", "features.7", "--teacher_cache",
                                                     "{tmp}/cache"],
                                              message="--teacher_cache: feature losses need the teacher's features, "
                                                      "and the cache holds logits only"),
    "teacher cache keeping no logits": Case(flags=[*TEACHER, "--teacher_cache", "{tmp}/cache", "--teacher_cache_topk",
                                                   "0"],
                                            message="command line: --teacher_cache_topk must be positive, got 0"),
    # Teacher checkpoints
    "missing teacher checkpoint": Case(flags=["--distill", "--teacher_checkpoint", "{tmp}/no.ckpt"],
                                       message="--teacher_checkpoint: file {tmp}/no.ckpt does not exist"),
    "teacher checkpoint that is no PyTorch file": Case(_files(bad__ckpt=b"not a checkpoint"),
                                                       ["--distill", "--teacher_checkpoint", "{tmp}/bad.ckpt"],
                                                       "cannot load {tmp}/bad.ckpt: not a PyTorch file"),
    "teacher of another architecture": Case(flags=[*TEACHER[:-1], "cnn_medium"],
                                            message="holds a cnn_small, not the cnn_medium asked for"),
    "teacher trained on other classes": Case(_two_classes, TEACHER, "was trained on 12 classes"),
    "teacher weights of another class count": Case(_five_class_teacher,
                                                   ["--distill", "--teacher_checkpoint", "{tmp}/five.pt",
                                                    "--teacher_arch", "cnn_small"],
                                                   "five.pt does not fit this model: fc.weight has shape (5, 64)"),
    # Hardware and the file system
    "GPU asked for on a machine without one": Case(flags=["--accelerator", "gpu"], message="--accelerator gpu"),
    "unknown strategy": Case(flags=["--strategy", "dpp"], message="--strategy dpp"),
    "output folder that is a file": Case(_files(afile=b"x"), ["--output_dir", "{tmp}/afile"],
                                         "--output_dir: cannot create {tmp}/afile/kd"),
    "disk full while saving a checkpoint": Case(flags=["--output_dir", "{tmp}/small"], writes=True,
                                                message="baseline (seed 0): cannot write", limit_file_size=20_000),
    # Training
    "loss that becomes NaN": Case(_files(losses__py=LOSSES), [*TEACHER, "--kd_loss", "{tmp}/losses.py:Explode"],
                                  "distill (seed 0): the loss became nan at step 0 (epoch 0), first in kd/Explode",
                                  writes=True),
}


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child: files may not grow past ``limit`` (a full disk, as far as it can tell)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, earlier, tiny_data, tmp_path):
    case = CASES[name]
    if case.writes:  # a run that gets as far as training writes its own stage: give it a copy to write beside
        earlier = shutil.copytree(earlier, tmp_path / "earlier")
    data = case.setup(tiny_data, tmp_path)
    fill = {"tmp": tmp_path, "data": data, "earlier": earlier,
            "teacher": earlier / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"}
    flags = [*FAST, "--data_dir", str(data), "--output_dir", str(earlier), "--baseline",
             "--teacher_arch", "cnn_small", *(f.format(**fill) for f in case.flags)]
    before = _snapshot(earlier)
    result = run_cli(flags, cwd=tmp_path,
                     preexec_fn=_limit_file_size(case.limit_file_size) if case.limit_file_size else None)
    err = result.stderr.strip().splitlines()
    assert result.returncode == case.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert err[-1].startswith("error: ") and case.message.format(**fill) in err[-1], err[-1]
    after = _snapshot(earlier)
    assert {k: after[k] for k in before} == before  # nothing earlier changed
    if not case.writes:
        assert after == before  # and nothing was written at all
