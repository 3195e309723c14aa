"""Evaluation of a trained classifier: top-1/top-5, accuracy per class and the confusion matrix."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from kd.data.transforms import normalize
from kd.tables import text_table

ABSURD = 1e6  # a weight this large (in magnitude) is the mark of a diverged run, not of training


@dataclass
class Evaluation:
    """How a classifier did on a validation set; accuracies in percent, confusion rows are true classes."""

    class_names: list[str]
    top1: float
    top5: float  # top-k with k = min(5, classes)
    per_class: list[float]  # recall of each class; NaN for a class without images
    confusion: torch.Tensor  # (C, C) int64: [true class, predicted class]
    count: int


def device_of(accelerator: str) -> str:
    """Where an evaluation runs: the GPU when there is one and --accelerator allows it, else the CPU."""
    return "cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a while, then give every submodule back its own train/eval mode."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def evaluate(model: nn.Module, loader: DataLoader, class_names: list[str], device: torch.device | str = "cpu",
             augment: str = "imagenet") -> Evaluation:
    """Run ``model`` (moved to ``device``, in eval mode) over ``loader``'s (images, labels, ...) batches.

    uint8 batches are normalised as the --augment recipe the model was trained with says.
    """
    num_classes = len(class_names)
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    per_class = MulticlassAccuracy(num_classes, average=None).to(device)
    confusion = MulticlassConfusionMatrix(num_classes).to(device)
    model.to(device)
    with eval_mode(model), torch.inference_mode():
        for images, labels, *_ in loader:
            logits, labels = model(normalize(images.to(device), augment)), labels.to(device)
            for metric in (top1, top5, per_class, confusion):
                metric.update(logits, labels)
    matrix = confusion.compute().cpu()
    images_per_class = matrix.sum(1)
    recall = torch.where(images_per_class > 0, per_class.compute().cpu(), math.nan)
    return Evaluation(list(class_names), 100 * top1.compute().item(), 100 * top5.compute().item(),
                      (100 * recall).tolist(), matrix, int(images_per_class.sum()))


def weight_problems(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """What is wrong with a state_dict's floating-point tensors: (NaN or infinite values, absurdly large ones).

    Each a list of lines such as ``fc.weight holds 12 NaN values``, naming the tensors in their order.
    """
    broken, absurd = [], []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        counts = [f"{n} {what} value{'s' * (n > 1)}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n]
        if counts:
            broken.append(f"{name} holds {' and '.join(counts)}")
        elif tensor.numel() and (largest := tensor.abs().max().item()) > ABSURD:
            absurd.append(f"{name} holds values up to {largest:.3g} in magnitude")
    return broken, absurd


def format_evaluation(ev: Evaluation) -> str:
    """Plain text: the headline accuracies, a table per class and the confusion matrix."""
    images = ev.confusion.sum(1).tolist()
    classes = [(name, str(n), "-" if math.isnan(acc) else f"{acc:.2f}")
               for name, n, acc in zip(ev.class_names, images, ev.per_class)]
    # Columns numbered, names in full on the rows: readable with many classes and long names alike.
    matrix = [(f"{i} {name}", *map(str, row))
              for i, (name, row) in enumerate(zip(ev.class_names, ev.confusion.tolist()))]
    top_k = min(5, len(ev.class_names))
    return "\n".join([
        f"{ev.count} images: top-1 {ev.top1:.2f} %, top-{top_k} {ev.top5:.2f} %", "",
        text_table(("class", "images", "accuracy %"), classes), "",
        "confusion matrix (rows: true class, columns: predicted class, numbered as the rows)",
        text_table(("true \\ predicted", *map(str, range(len(ev.class_names)))), matrix),
    ])


def confusion_figure(ev: Evaluation) -> Figure:
    """A heat map of the confusion matrix with the counts in its cells, e.g. for SummaryWriter.add_figure.

    A bare Figure (no pyplot): it needs no display and nothing has to close it.
    """
    size = 2.5 + 0.45 * len(ev.class_names)
    figure = Figure(figsize=(size + 1, size), layout="tight")
    axes = figure.add_subplot()
    counts = ev.confusion.numpy()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = range(len(ev.class_names))
    axes.set_xticks(ticks, ev.class_names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, ev.class_names)
    dark = counts.max() / 2
    for (row, column), count in np.ndenumerate(counts):
        axes.text(column, row, str(count), ha="center", va="center", fontsize="small",
                  color="white" if count > dark else "black")
    axes.set(xlabel="predicted class", ylabel="true class",
             title=f"Confusion matrix: top-1 {ev.top1:.2f} % of {ev.count} images")
    return figure
