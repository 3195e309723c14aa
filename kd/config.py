"""The run configuration: every flag with its default, check, help and roles (what --resume compares, what keys
the teacher cache); how flags are read and layered is :mod:`kd.flags`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from collections.abc import Callable

import yaml

from kd.files import write_text

PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64")  # Lightning's
# kd trains float32 weights, under autocast for the mixed modes; the true modes would cast the networks but not the
# images and losses, so they are refused by name rather than failing in the first step.
TRAINED_PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed")
FLOAT32_MAX = 3.4028234663852886e38  # the largest value a float32 weight, and so the optimiser's factor on it, holds


class Role(str, Enum):
    """What a flag means for a run; every Config field declares its roles where it is defined.

    ``--resume`` reuses a stage only where every flag of that stage's role is the same, the teacher
    cache is keyed by the flags of role CACHE_KEY, and INVOCATION flags are not saved with a run.
    """

    TEACHER = "teacher"  # makes the teacher stage what it is
    BASELINE = "baseline"  # makes the baseline stage what it is
    DISTILL = "distill"  # makes a distill (or assistant) stage what it is
    CACHE_KEY = "cache_key"  # changes the teacher's outputs: part of the teacher-cache key
    RECORDED = "recorded"  # saved with the run, but changes no stage's result (speed, hardware, places)
    INVOCATION = "invocation"  # what this invocation does (print, report, resume...): not saved


R = Role  # short, for the field table below
TRAINING = (R.TEACHER, R.BASELINE, R.DISTILL)  # flags of training itself: they make every stage what it is


def _flag(default: Any, help: str, *, roles: tuple[Role, ...], choices: tuple = (),
          check: Callable[[Any], bool] | None = None, must: str = "", group: str = "", path: bool = False,
          bare: Any = None) -> Any:
    """A config field with its help text, roles, allowed choices and a value check (``must`` explains it).

    ``path`` marks a file or folder, compared normalised (``data/`` is ``data``); ``bare`` is the value
    of the flag given without one (``--list_models`` alone).
    """
    meta = {"help": help, "roles": frozenset(roles), "choices": choices, "check": check, "must": must,
            "group": group, "path": path, "bare": bare}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(x: float) -> bool:
    return x > 0


def _utf8(x: str) -> bool:
    """Whether ``x`` is text in UTF-8 (a name with bytes that are not arrives holding surrogates)."""
    try:
        x.encode()
    except UnicodeEncodeError:
        return False
    return True


def _float32(x: float) -> bool:
    return 0 <= x <= FLOAT32_MAX


def _seed_range(x: int) -> bool:
    return 0 <= x < 2**32


@dataclass
class Config:
    """Every setting of a run; field names are the flag names without ``--``."""

    # What to run
    train_teacher: bool = _flag(False, "train the teacher", group="stages", roles=(R.RECORDED,))
    baseline: bool = _flag(False, "train the student on labels alone", group="stages", roles=(R.RECORDED,))
    distill: bool = _flag(False, "train the student with distillation from the teacher",
                          group="stages", roles=(R.RECORDED,))
    teacher_checkpoint: list[str] = _flag(
        [], "teacher checkpoint(s) to distill from (default: the teacher trained in this run); several distill from "
        "their ensemble: the teachers' logits averaged", group="stages", roles=(R.DISTILL,), path=True)
    # Data
    data_dir: str = _flag("demo", "ImageFolder root (train/ and val/ inside, or class folders); 'demo' generates the "
                          "built-in demo dataset; torchvision:NAME:ROOT reads torchvision's dataset NAME (CIFAR10, "
                          "CIFAR100, MNIST, ...) from folder ROOT", group="data", roles=TRAINING, path=True)
    download_data: bool = _flag(False, "download a torchvision:NAME:ROOT dataset into ROOT when it is not there",
                                group="data", roles=(R.RECORDED,))
    val_fraction: float = _flag(0.2, "share of each class held out for validation when data_dir has no val/",
                                check=lambda x: 0 < x < 1, must="be between 0 and 1", group="data", roles=TRAINING)
    num_classes: int | None = _flag(None, "expected number of classes (checked against the data)",
                                       check=_positive, must="be positive", group="data", roles=(R.RECORDED,))
    image_size: int = _flag(224, "side of the square crop fed to the networks",
                            check=lambda x: x >= 8, must="be at least 8", group="data", roles=(*TRAINING, R.CACHE_KEY))
    augment: str = _flag("imagenet", "image recipe: 'imagenet' trains on random resized crops and validates on a "
                         "256/224 centre crop, ImageNet-normalised; 'cifar' trains on random crops of the image padded "
                         "by 4 px, validates on the image itself, CIFAR-100-normalised (RepDistiller's recipe)",
                         choices=("imagenet", "cifar"), group="data", roles=(*TRAINING, R.CACHE_KEY))
    min_crop_scale: float = _flag(0.08, "smallest area share of a training crop (RandomResizedCrop scale)",
                                  check=lambda x: 0 < x <= 1, must="be in (0, 1]",
                                  group="data", roles=(*TRAINING, R.CACHE_KEY))
    skip_bad_images: bool = _flag(False, "decode every image up front and train without the unreadable ones "
                                  "(listed in skipped_images.txt beside the logs)", group="data", roles=TRAINING)
    hflip: bool = _flag(True, "random horizontal flips in training (turn off for digits and text)",
                        group="data", roles=(*TRAINING, R.CACHE_KEY))
    batch_size: int = _flag(64, "images per batch", check=_positive, must="be positive", group="data", roles=TRAINING)
    num_workers: int = _flag(2, "DataLoader worker processes (0 loads in the main process)",
                             check=lambda x: x >= 0, must="be 0 or more", group="data", roles=(R.RECORDED,))
    # Models
    teacher_arch: list[str] = _flag(["resnet50"], "teacher network: a kd or torchvision name, timm:NAME or "
                                    "module:Class (see --list_models); one per --teacher_checkpoint, or one for all",
                                    group="models", roles=(R.TEACHER, R.DISTILL, R.CACHE_KEY))
    ensemble_weights: list[float] = _flag([], "weights of the teachers' logits in an ensemble's average, one per "
                                          "--teacher_checkpoint (default: equal)", check=lambda x: x >= 0,
                                          must="be 0 or more", group="models", roles=(R.DISTILL, R.CACHE_KEY))
    student_arch: str = _flag("resnet18", "student network: a kd or torchvision name, timm:NAME or module:Class "
                              "(see --list_models)", group="models", roles=(R.BASELINE, R.DISTILL))
    teacher_weights: str | None = _flag(
        None, "initial teacher weights: DEFAULT (pretrained, for torchvision and timm models), another "
        "torchvision weights name, or a local file",
        group="models", roles=(R.TEACHER,), path=True)
    student_weights: str | None = _flag(
        None, "initial student weights: DEFAULT, another torchvision weights name, or a local file",
        group="models", roles=(R.BASELINE, R.DISTILL), path=True)
    # Distillation
    kd_loss: list[str] = _flag(["kl_softmax"], "distillation losses, summed with --kd_weights: registered names "
                               "(see the README's methods table) or module:Class",
                               group="distillation", roles=(R.DISTILL,))
    kd_weights: list[float] = _flag([], "one weight per --kd_loss (default: each method's weight from its paper)",
                                    check=lambda x: x >= 0, must="be 0 or more",
                                    group="distillation", roles=(R.DISTILL,))
    ce_weight: float | None = _flag(None, "weight of the cross-entropy on labels (default: the smallest the chosen "
                                    "methods' papers use: 0.1 with kl_softmax, 1 for most)",
                                    check=lambda x: x >= 0, must="be 0 or more",
                                    group="distillation", roles=(R.DISTILL,))
    temperature: float | None = _flag(None, "softmax temperature of every loss that has one (default: each "
                                      "loss's own, from its paper)", check=_positive, must="be positive",
                                      group="distillation", roles=(R.DISTILL,))
    loss_options: list[str] = _flag([], "a loss's own settings as NAME.SETTING=VALUE (or SETTING=VALUE for every "
                                    "loss that has it), e.g. dkd.beta=4", group="distillation", roles=(R.DISTILL,))
    student_layers: list[str] = _flag([], "student modules whose outputs feature losses compare (names as in "
                                      "named_modules(), e.g. layer3 layer4)", group="distillation", roles=(R.DISTILL,))
    teacher_layers: list[str] = _flag([], "teacher modules paired in order with --student_layers",
                                      group="distillation", roles=(R.DISTILL,))
    assistant_arch: list[str] = _flag([], "teacher assistants: distill teacher → A → B → ... → student, each "
                                      "from the one before (Mirzadeh et al. 2020)",
                                      group="distillation", roles=(R.RECORDED,))
    assistant_lr: list[float] = _flag([], "peak learning rate of each --assistant_arch stage, one per assistant in "
                                      "order (default: --lr)", check=lambda x: _positive(x) and _float32(x),
                                      must=f"be positive and at most {FLOAT32_MAX:.4g}", group="distillation",
                                      roles=(R.RECORDED,))
    born_again: int | None = _flag(None, "born-again networks (Furlanello et al. 2018): instead of one distill stage, "
                                   "N generations of the student, the first distilled from the teacher (or, with "
                                   "none, from the baseline student), each later one from the one before; then "
                                   "their ensemble is evaluated", check=_positive, must="be at least 1",
                                   group="distillation", roles=(R.RECORDED,))
    mutual: list[str] = _flag([], "deep mutual learning (Zhang et al. 2018): train these peer networks together "
                              "with the student in its distill stage, each learning from the labels (and the teacher, "
                              "if any) and from the others' outputs; each keeps its own checkpoints and result",
                              group="distillation", roles=(R.DISTILL,))
    mutual_weight: float = _flag(1.0, "weight of each network's mutual term: the mean over the other networks of "
                                 "KL(their softmax || its softmax), at temperature 1 (the paper's)",
                                 check=lambda x: x >= 0, must="be 0 or more", group="distillation", roles=(R.DISTILL,))
    teacher_cache: str | None = _flag(None, "store the teacher's logits here on the first distillation and read "
                                      "them on later runs with the same teacher, data, transforms and seed",
                                      group="speed", roles=(R.DISTILL,), path=True)
    teacher_cache_dtype: str = _flag("float16", "how cached logits are stored", choices=("float16", "float32"),
                                     group="speed", roles=(R.DISTILL, R.CACHE_KEY))
    teacher_cache_topk: int | None = _flag(None, "cache only each sample's k largest logits (for many classes; "
                                           "the rest share the remaining probability mass)", check=_positive,
                                           must="be positive", group="speed", roles=(R.DISTILL, R.CACHE_KEY))
    teacher_cache_only: bool = _flag(False, "refuse to run the teacher: fail unless --teacher_cache holds every "
                                     "epoch this run needs", group="speed", roles=(R.RECORDED,))
    image_cache: str | None = _flag(None, "decode every image once into memory-mapped arrays under this folder "
                                    "and augment from them (no image decoding per epoch)",
                                    group="speed", roles=(*TRAINING, R.CACHE_KEY), path=True)
    channels_last: bool = _flag(False, "channels-last memory format for the networks and batches (faster "
                                "convolutions on GPUs with tensor cores)", group="speed", roles=(R.CACHE_KEY,))
    compile: bool = _flag(False, "torch.compile the student and the teacher", group="speed", roles=(R.RECORDED,))
    # Optimisation
    epochs: int = _flag(10, "training epochs of each stage", check=_positive, must="be positive",
                        group="training", roles=TRAINING)
    lr: float = _flag(0.05, "peak learning rate", check=lambda x: _positive(x) and _float32(x),
                      must=f"be positive and at most {FLOAT32_MAX:.4g} (float32, the weights' type)", group="training",
                      roles=TRAINING)
    teacher_lr: float | None = _flag(None, "peak learning rate of the teacher stage (default: --lr), so that a student "
                                     "can train at its own, as the references' MobileNet and ShuffleNet students do",
                                     check=lambda x: _positive(x) and _float32(x),
                                     must=f"be positive and at most {FLOAT32_MAX:.4g}", group="training",
                                     roles=(R.TEACHER,))
    optimizer: str = _flag("sgd", "optimizer (dot: Zhao et al. 2023's distillation-oriented trainer, SGD with one "
                           "momentum for the distillation loss's gradient and another for the cross-entropy's)",
                           choices=("sgd", "adam", "adamw", "dot"), group="training", roles=TRAINING)
    momentum: float = _flag(0.9, "SGD momentum (Adam's beta1)", check=lambda x: 0 <= x < 1,
                            must="be in [0, 1)", group="training", roles=TRAINING)
    dot_delta: float = _flag(0.075, "--optimizer dot's momentum gap: the distillation loss's gradient gets momentum "
                             "--momentum + this, the cross-entropy's --momentum - this (DOT's default, 0.075)",
                             check=lambda x: 0 <= x < 1, must="be in [0, 1)", group="training", roles=TRAINING)
    weight_decay: float = _flag(5e-4, "weight decay", check=_float32,
                                must=f"be 0 or more and at most {FLOAT32_MAX:.4g} (float32, the weights' type)",
                                group="training", roles=TRAINING)
    scheduler: str = _flag("cosine", "learning-rate schedule after warm-up (step: /10 at 1/2 and 3/4 of the run; "
                           "multistep: x --lr_decay at each of --milestones)",
                           choices=("cosine", "step", "multistep", "none"), group="training", roles=TRAINING)
    milestones: list[int] = _flag([], "epochs after which --scheduler multistep multiplies the learning rate by "
                                  "--lr_decay, e.g. 150 180 210", check=_positive, must="be positive",
                                  group="training", roles=TRAINING)
    lr_decay: float = _flag(0.1, "factor of the learning rate at each of --milestones", check=lambda x: 0 < x <= 1,
                            must="be in (0, 1]", group="training", roles=TRAINING)
    warmup_epochs: float = _flag(0.0, "epochs of linear learning-rate warm-up", check=lambda x: x >= 0,
                                 must="be 0 or more", group="training", roles=TRAINING)
    label_smoothing: float = _flag(0.0, "label smoothing of the cross-entropy on labels (0: none; e.g. 0.1)",
                                   check=lambda x: 0 <= x < 1, must="be in [0, 1)", group="training", roles=TRAINING)
    mixup: float = _flag(0.0, "mixup's Beta(alpha, alpha) on training batches, which the student and the teacher both "
                         "see (0: off); with --cutmix, one of the two per batch", check=lambda x: x >= 0,
                         must="be 0 or more", group="training", roles=(*TRAINING, R.CACHE_KEY))
    cutmix: float = _flag(0.0, "cutmix's Beta(alpha, alpha) on training batches, which the student and the teacher "
                          "both see (0: off)", check=lambda x: x >= 0, must="be 0 or more",
                          group="training", roles=(*TRAINING, R.CACHE_KEY))
    ema: float | None = _flag(None, "decay of an exponential moving average of the trained network's weights and "
                              "buffers, updated every step (e.g. 0.999); the average is validated, checkpointed as "
                              "the network and reported, the raw weights beside it", check=lambda x: 0 < x < 1,
                              must="be in (0, 1), e.g. 0.999", group="training", roles=TRAINING)
    resume: bool = _flag(False, "continue this experiment: reuse finished stages, resume unfinished ones from "
                         "their last checkpoint", group="training", roles=(R.INVOCATION,))
    seed: int = _flag(0, "random seed of models, augmentation and batch order", check=_seed_range,
                      must="be between 0 and 2**32 - 1", group="training", roles=(*TRAINING, R.CACHE_KEY))
    seeds: list[int] = _flag([], "repeat the stages for each of these seeds (overrides --seed) and report "
                             "mean ± std", check=_seed_range, must="be between 0 and 2**32 - 1",
                             group="training", roles=(R.RECORDED,))
    repeat_teacher: bool = _flag(False, "with --seeds, train a teacher per seed (default: once, first seed)",
                                 group="training", roles=(R.RECORDED,))
    # Tuning: they choose each student stage's learning rate, weight decay and label smoothing, and the distill
    # stage's weights, temperatures and loss settings, which the stages then record (as --lr, --kd_weights,
    # --loss_options, ...) and --resume compares; so they are only recorded.
    tune: int | None = _flag(None, "before each student stage (--baseline, --distill), run N trials of an Optuna "
                             "search of its learning rate, weight decay and label smoothing (and the losses' "
                             "weights, temperatures and settings) on a held-out slice of the training set, then "
                             "train with the best", check=lambda x: x >= 2, must="be at least 2 (the first trial is "
                             "the flags' own values)", group="tuning", roles=(R.RECORDED,))
    tune_fraction: float = _flag(0.1, "share of each class of the training set held out to score --tune trials "
                                 "(a fixed split; val/ is never seen while tuning)", check=lambda x: 0 < x < 1,
                                 must="be between 0 and 1", group="tuning", roles=(R.RECORDED,))
    tune_epochs: int | None = _flag(None, "epochs of each --tune trial (default: --epochs)", check=_positive,
                                    must="be positive", group="tuning", roles=(R.RECORDED,))
    tune_space: list[str] = _flag([], "search ranges replacing kd's own: NAME.SETTING=LOW:HIGH[:log], "
                                  "e.g. kl_softmax.temperature=1:8, ce_weight=0.05:1:log or lr=0.01:0.2:log",
                                  group="tuning", roles=(R.RECORDED,))
    tune_storage: str | None = _flag(None, "Optuna storage URL of the study (default: an SQLite file in the "
                                     "experiment folder); one PostgreSQL or MySQL URL shared by several machines "
                                     "makes them work on one study (not saved: it may hold a password)",
                                     group="tuning", roles=(R.INVOCATION,))
    # Hardware
    accelerator: str = _flag("auto", "Lightning accelerator (auto, cpu, gpu, ...)",
                             group="hardware", roles=(R.RECORDED,))
    devices: str = _flag("1", "Lightning devices per node (a count, a list like 0,1, or auto)",
                         group="hardware", roles=(R.RECORDED,))
    num_nodes: int = _flag(1, "machines taking part (Lightning num_nodes)", check=_positive, must="be positive",
                           group="hardware", roles=(R.RECORDED,))
    strategy: str = _flag("auto", "Lightning strategy: auto, ddp, ddp_spawn, fsdp, ...",
                          group="hardware", roles=(R.RECORDED,))
    precision: str = _flag("32-true", "Lightning precision (16-true, bf16-true and 64-true are refused: kd trains "
                           "float32 weights, in half precision under autocast with 16-mixed or bf16-mixed)",
                           choices=PRECISIONS, check=lambda x: x in TRAINED_PRECISIONS,
                           must="be 32-true, 16-mixed or bf16-mixed (kd trains float32 weights; a true mode would cast "
                           "the networks but not the images fed to them)", group="hardware",
                           roles=(*TRAINING, R.CACHE_KEY))
    # Output
    output_dir: str = _flag("runs", "where runs are written", check=_utf8, must="be a name in UTF-8 (TensorBoard names "
                            "its log files so)", group="output", roles=(R.RECORDED,), path=True)
    experiment_name: str = _flag("kd", "runs go to output_dir/experiment_name/<stage>/version_N",
                                 check=lambda x: bool(x) and not Path(x).is_absolute() and ".." not in Path(x).parts
                                 and x.isprintable() and _utf8(x), must="be a non-empty relative name without .., line "
                                 "breaks or bytes that are not UTF-8", group="output", roles=(R.RECORDED,))
    # Configuration itself
    config: list[str] = _flag([], "YAML presets applied after the flags file, in the order named",
                              group="config", roles=(R.INVOCATION,))
    evaluate: str | None = _flag(None, "evaluate this checkpoint on the validation data (top-1, top-5, per class, "
                                 "confusion matrix), without training",
                                 group="deployment", roles=(R.INVOCATION,), path=True)
    export: str | None = _flag(None, "write each trained student (or the --evaluate checkpoint) beside its "
                               "checkpoint for deployment, checked against PyTorch", choices=("onnx", "torchscript"),
                               group="deployment", roles=(R.RECORDED,))
    report: list[str] = _flag([], "compare the finished runs under these folders in one table and plot, "
                              "without training", group="config", roles=(R.INVOCATION,), path=True)
    print_config: bool = _flag(False, "print the resolved configuration with each value's source and exit",
                               group="config", roles=(R.INVOCATION,))
    list_models: str | None = _flag(None, "print the model names each source offers (kd, torchvision, timm:...) "
                                    "matching a shell pattern such as 'timm:*mobilenetv3*' (all when given alone) "
                                    "and exit", group="config", roles=(R.INVOCATION,), bare="*")
    list_layers: str | None = _flag(None, "print the modules of this network that a forward pass runs, with their "
                                    "output shapes at --image_size (what --student_layers / --teacher_layers may "
                                    "name), and exit", group="config", roles=(R.INVOCATION,))

    def to_dict(self) -> dict[str, Any]:
        """The settings that define a run (not what this invocation did), for saving beside its logs."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in with_role(Role.INVOCATION)}

    def identity(self, role: Role) -> dict[str, Any]:
        """The flags of ``role`` with their values, paths normalised: what --resume compares for a stage."""
        return identity(self.to_dict(), role)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def with_role(role: Role) -> frozenset[str]:
    """The names of the flags that have ``role``."""
    return frozenset(name for name, f in FIELDS.items() if role in f.metadata["roles"])


def _normal_path(value: Any) -> Any:
    """A path (or list of paths) as compared: ``~`` expanded, ``data/`` and ``./data`` read as ``data``."""
    if isinstance(value, list):
        return [_normal_path(item) for item in value]
    return os.path.normpath(os.path.expanduser(value)) if isinstance(value, str) else value


def identity(values: dict[str, Any], role: Role) -> dict[str, Any]:
    """``values`` (a Config's, or a saved config.yaml's) restricted to the flags of ``role``, paths normalised.

    A flag missing from ``values`` (a file saved before kd had it) reads as its default: the behaviour it kept.
    """
    defaults = dataclasses.asdict(Config())
    found = {name: values.get(name, defaults[name]) for name in sorted(with_role(role))}
    found |= {name: [] if value is None else [value] for name, value in found.items()  # saved when it took one
              if is_list(name) and not isinstance(value, list)}
    return {name: _normal_path(value) if FIELDS[name].metadata["path"] else value for name, value in found.items()}


def cache_settings(config: Config) -> dict[str, Any]:
    """The teacher-cache key's settings: the CACHE_KEY flags; a path flag counts by being set or not.

    (A folder such as --image_cache has its own content key: where it lies does not change the pixels.)
    """
    return {name: bool(value) if FIELDS[name].metadata["path"] else value
            for name, value in identity(config.to_dict(), Role.CACHE_KEY).items()}
# Flags that may name a user's file.py:Name.
CODE_FLAGS = ("teacher_arch", "student_arch", "assistant_arch", "mutual", "kd_loss")


def named_paths(config: Config) -> list[tuple[str, str]]:
    """(flag, path) of every file or folder ``config`` names: the path flags' values and the .py file of each
    ``file.py:Name`` network or loss, for :func:`kd.files.checked_path` to look at before anything opens them."""
    found = []
    for name, f in FIELDS.items():
        value = getattr(config, name)
        for item in value if isinstance(value, list) else [value]:
            if f.metadata["path"] and item is not None:
                found.append((f"--{name}", item))
            elif name in CODE_FLAGS and (module := item.rpartition(":")[0]).endswith(".py"):
                found.append((f"--{name}", module))
    return found


TYPES = get_type_hints(Config)


def scalar_type(name: str) -> type:
    hint = TYPES[name]
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if get_origin(hint) is not None else hint


def is_list(name: str) -> bool:
    return get_origin(TYPES[name]) is list


def save_config(config: Config, path: Path) -> None:
    """Write the run-defining settings as a YAML preset that repeats the run (``--config path``).

    Written to a temporary file and renamed, so a kill leaves no half-written file behind.
    """
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
