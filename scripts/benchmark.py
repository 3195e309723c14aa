"""Benchmark kd's training step against a plain PyTorch loop, and image decoding against the image cache.

One process, the same models (built once, copied per variant) and the same pre-built random batches;
the variants take turns round by round (their order rotates every round), so a slower or busier
moment of the machine hits every variant alike.

    plain_distill   hand-written loop: student forward, teacher forward under inference_mode (cloned),
                    0.1·CE + 0.9·KL(T=4)·T², backward, SGD step, zero_grad, cosine LR step: the floor
    kd_distill      kd's KDModule with the teacher, fitted by a real pl.Trainer (its logging included)
    plain_student   the plain loop without a teacher (CE only), for reference
    kd_student      KDModule without a teacher (CE only): the floor for distillation
    kd_cached       KDModule distilling from a TeacherCache filled beforehand (no teacher forward)
    pipeline_*_wN   one epoch of ImageListDataset (train transform, EpochSampler) over generated 500×375
                    JPEGs, decoded by PIL or read from an ImageCache, with N DataLoader workers

A training round runs W warm-up steps and K timed ones (plus one whose start ends the last timed step);
a step's time runs from one batch start to the next, so every hook, log call and batch fetch counts.
A round's images/s is batch_size over its median step time (robust to another process's bursts; on a
GPU steps are not synchronised, so use enough --steps for the launch queue to fill); a variant's figure
is the median over rounds. A pipeline round is one epoch's images over its wall time, after one untimed
epoch; the one-off image cache build is reported on its own. Every step time is kept in the JSON.

    python scripts/benchmark.py --json /tmp/bench_cpu.json                       # CPU: resnet50 → resnet18
    python scripts/benchmark.py --precision bf16-mixed --channels_last --batch_size 128 --steps 30 --workers 8
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing kd
from kd.data.loaders import EpochSampler, ImageListDataset  # noqa: E402
from kd.data.transforms import normalize, train_transform
from kd.data.image_cache import ImageCache  # noqa: E402
from kd.losses.logits import kl_softmax  # noqa: E402
from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force  # noqa: E402
from kd.models.build import build_model  # noqa: E402
from kd.train.distiller import Distiller  # noqa: E402
from kd.train.module import KDModule  # noqa: E402
from kd.data.sources.folder import FileSplit  # noqa: E402
from kd.tables import text_table  # noqa: E402
from kd.train.teacher_cache import TeacherCache  # noqa: E402

TRAINING = ("plain_distill", "kd_distill", "plain_student", "kd_student", "kd_cached")
# (name, variant, reference, target): time ratio = reference images/s / variant images/s; a string: no target
TIME_RATIOS = [("kd_step / plain_loop time", "kd_distill", "plain_distill", 1.05),
               ("kd_student / plain_student time", "kd_student", "plain_student", "for reference"),
               ("cached_distill / student_only time", "kd_cached", "kd_student", 1.10),
               ("online_distill / student_only time", "kd_distill", "kd_student", "~1.5 for resnet50 → resnet18")]
CACHE_TARGET = 3.0  # image cache images/s over PIL images/s, at least


class Clock(pl.Callback):
    """Timestamps of batch starts; the step times after ``warmup`` steps are the measured ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts = warmup, []

    def tick(self) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.tick()

    def steps(self) -> list[float]:
        return np.diff(self.starts[self.warmup:]).tolist()


def plain_round(student, teacher, batches, device, args, clock: Clock) -> None:
    """The distillation (or, without a teacher, CE-only) step in plain PyTorch, as KDModule configures it."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(batches))
    for x, y, _ in batches:
        clock.tick()
        x, y = x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.inference_mode():
                    teacher_logits = teacher(x)
                loss = 0.1 * loss + 0.9 * kl_softmax(logits, teacher_logits.clone(), 4.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()


def kd_round(module: KDModule, batches, args, clock: Clock) -> None:
    """KDModule fitted by a real Trainer for one pass over the batches."""
    trainer = pl.Trainer(max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         accelerator=args.accelerator, devices=1, precision=args.precision, callbacks=[clock])
    trainer.fit(module, DataLoader(batches, batch_size=None))  # a list is a map-style Dataset: batch i is item i


def bench_training(args, device: torch.device, tmp: Path, results: dict) -> None:
    classes = [f"c{i}" for i in range(args.num_classes)]
    torch.manual_seed(0)
    student, teacher = build_model(args.student, args.num_classes), build_model(args.teacher, args.num_classes)
    steps = args.warmup + args.steps + 1
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=generator),
                torch.arange(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(steps)]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    plain = {"plain_distill": (copy.deepcopy(student), copy.deepcopy(teacher)),
             "plain_student": (copy.deepcopy(student), None)}
    for model in (m for pair in plain.values() for m in pair if m is not None):
        model.to(memory_format=fmt)
        if args.compile:
            model.compile()
    losses = losses_in_force(["kl_softmax"], [], None, None, [])
    objective = lambda: build_objective(losses, num_classes=args.num_classes)  # noqa: E731
    options = {"channels_last": args.channels_last, "compile": args.compile}
    # Fill the teacher-output cache for epoch 0, as a first run with --teacher_cache would.
    cache = TeacherCache(tmp / "teacher_cache", "bench", {"train": steps * args.batch_size, "val": 1}, args.num_classes)
    filler = copy.deepcopy(teacher).to(device, memory_format=fmt).eval()
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16-mixed"):
        for x, _, indices in batches:
            cache.record(0, indices, filler(x.to(device).contiguous(memory_format=fmt)).float())
    cache.commit(0)
    del filler
    distillers = {"kd_distill": Distiller(copy.deepcopy(student), teacher=copy.deepcopy(teacher), objective=objective(),
                                          **options),
                  "kd_student": Distiller(copy.deepcopy(student), **options),
                  "kd_cached": Distiller(copy.deepcopy(student), objective=objective(), teacher_cache=cache, **options)}
    modules = {name: KDModule(distiller, args.student, classes, image_size=args.image_size)
               for name, distiller in distillers.items()}
    for r in range(args.rounds):
        for name in TRAINING[r % len(TRAINING):] + TRAINING[:r % len(TRAINING)]:
            clock = Clock(args.warmup)
            if name in plain:
                plain_round(*plain[name], batches, device, args, clock)
            else:
                kd_round(modules[name], batches, args, clock)
            record(results, name, args.batch_size / statistics.median(clock.steps()), clock.steps())


def make_jpegs(folder: Path, count: int, num_classes: int = 4) -> list[tuple[str, int]]:
    """``count`` 500×375 JPEGs in class folders, deterministic: smooth colours plus grain at quality 90,
    about 95 KB each (ImageNet photos average about 110 KB)."""
    rng, samples = np.random.default_rng(0), []
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(low, np.float32) + rng.normal(0, 20, (375, 500, 3))
        path = folder / f"class{i % num_classes}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        samples.append((str(path), i % num_classes))
    return samples


def bench_pipeline(args, tmp: Path, results: dict) -> float:
    """images/s of an epoch decoded by PIL vs read from the image cache; returns the cache build's seconds."""
    samples = FileSplit(make_jpegs(tmp / "images", args.images))
    start = time.perf_counter()
    images = ImageCache.build(samples, round(args.image_size * 256 / 224), tmp / "image_cache")
    build_s = time.perf_counter() - start
    loaders = {f"pipeline_{source}_w{workers}": DataLoader(
        ImageListDataset(samples, train_transform(args.image_size), 0, cached), batch_size=args.batch_size,
        sampler=EpochSampler(len(samples), 0), num_workers=workers, persistent_workers=workers > 0)
        for workers in sorted({0, args.workers}) for source, cached in (("pil", None), ("cache", images))}
    for loader in loaders.values():  # untimed epoch: workers start, files enter the page cache
        for _ in loader:
            pass
    names = list(loaders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, count = time.perf_counter(), 0
            for x, _, _ in loaders[name]:
                count += len(normalize(x))  # what the device does after the copy
            record(results, name, count / (time.perf_counter() - start))
    return build_s


def record(results: dict, name: str, images_per_s: float, steps: list[float] | None = None) -> None:
    entry = results.setdefault(name, {"rounds": [], "step_s": []})
    entry["rounds"].append(images_per_s)
    entry["images_per_s"] = statistics.median(entry["rounds"])
    if steps is not None:
        entry["step_s"].append(steps)
    print(f"round {len(entry['rounds'])} {name}: {images_per_s:.4g} images/s", file=sys.stderr, flush=True)


def ratios(results: dict, workers: list[int]) -> dict:
    out = {}
    for name, variant, reference, target in TIME_RATIOS:
        if variant in results and reference in results:
            value = results[reference]["images_per_s"] / results[variant]["images_per_s"]
            limit = isinstance(target, float)
            out[name] = {"value": value, "target": f"<= {target}" if limit else target,
                         "met": value <= target if limit else None}
    for w in workers:
        if f"pipeline_pil_w{w}" in results:
            value = results[f"pipeline_cache_w{w}"]["images_per_s"] / results[f"pipeline_pil_w{w}"]["images_per_s"]
            out[f"image_cache / PIL images/s ({w} workers)"] = {"value": value, "target": f">= {CACHE_TARGET}",
                                                                 "met": value >= CACHE_TARGET}
    return out


def machine(device: torch.device) -> dict:
    return {"processor": platform.processor() or platform.machine(), "uname": " ".join(platform.uname()),
            "cpu_count": os.cpu_count(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, about in [("teacher", "resnet50", ""), ("student", "resnet18", ""), ("image_size", 224, ""),
                                 ("batch_size", 16, ""), ("steps", 10, "timed steps per variant and round"),
                                 ("warmup", 3, "untimed steps before them"), ("rounds", 3, ""), ("num_classes", 10, ""),
                                 ("accelerator", "auto", ""), ("workers", 2, "pipeline DataLoader workers (and 0)"),
                                 ("images", 256, "JPEGs generated for the pipeline"), ("json", "benchmark.json", "")]:
        parser.add_argument(f"--{flag}", type=type(default), default=default, help=about or None)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    for flag in ("channels_last", "compile", "skip_training", "skip_pipeline"):
        parser.add_argument(f"--{flag}", action="store_true")
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.batch_size, args.images) < 1 or args.warmup < 0 or args.workers < 0:
        parser.error("--steps, --rounds, --batch_size and --images must be at least 1, --warmup and --workers 0")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available: ..." banner every round
    warnings.filterwarnings("ignore", ".*(many workers|eval mode|logging interval|Tensor Core|val_dataloader|LeafSpec)")
    torch.backends.cudnn.benchmark = True
    device = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False).strategy.root_device
    results: dict = {}
    build_s = None
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        if not args.skip_training:
            bench_training(args, device, Path(tmp), results)
        if not args.skip_pipeline:
            build_s = bench_pipeline(args, Path(tmp), results)
    report = {"machine": machine(device),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "lightning": pl.__version__},
              "torch_threads": torch.get_num_threads(), "settings": vars(args),
              "variants": results, "ratios": ratios(results, sorted({0, args.workers})),
              "image_cache_build_s": build_s}
    Path(args.json).write_text(json.dumps(report, indent=2))
    rows = [(name, f"{entry['images_per_s']:.4g}", " ".join(f"{v:.4g}" for v in entry["rounds"]))
            for name, entry in results.items()]
    print(text_table(("variant", "images/s (median)", "rounds"), rows))
    marks = {None: "", True: "yes", False: "NO"}
    print("\n" + text_table(("ratio", "value", "target", "met"),
                            [(name, f"{r['value']:.3f}", r["target"], marks[r["met"]])
                             for name, r in report["ratios"].items()]))
    if build_s is not None:
        print(f"\nimage cache build: {build_s:.2f} s for {args.images} images (not in the pipeline figures)")
    print(f"{machine(device)['processor']}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"{device}; JSON: {args.json}")


if __name__ == "__main__":
    main()
