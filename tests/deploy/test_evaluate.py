"""Tests of kd.deploy.metrics: accuracies, per-class recall, confusion matrix against counts by hand; text, figure."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd.deploy.metrics import confusion_figure, evaluate, format_evaluation, weight_problems

NAMES = ["red_circle", "orange_triangle", "blue", "orange_ring", "green_square", "x"]


class Lookup(nn.Module):
    """Returns preset logits for each sample, whose index is written in its pixels; records how it was run."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.runs: list[tuple[bool, bool]] = []  # (training, inference mode) of every forward pass

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.runs.append((self.training, torch.is_inference_mode_enabled()))
        return self.logits[images[:, 0, 0, 0].long()]


def _case(num_classes: int, count: int, seed: int = 0) -> tuple[Lookup, DataLoader, list[int]]:
    """A Lookup model with random logits, and a loader of ``count`` samples (batches of 4, the last one short)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, num_classes, generator=generator)
    labels = torch.randint(num_classes, (count,), generator=generator)
    images = torch.arange(count, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    return Lookup(logits), DataLoader(TensorDataset(images, labels), batch_size=4), labels.tolist()


def _by_hand(logits: list[list[float]], labels: list[int], num_classes: int) -> dict:
    """Top-1, top-k (k = min(5, C)), recall per class and the confusion matrix by plain counting."""
    k = min(5, num_classes)
    confusion = [[0] * num_classes for _ in range(num_classes)]
    in_top_k = 0
    for scores, label in zip(logits, labels):
        ranked = sorted(range(num_classes), key=lambda c: -scores[c])
        confusion[label][ranked[0]] += 1
        in_top_k += label in ranked[:k]
    n = len(labels)
    per_class = [100 * row[c] / sum(row) if sum(row) else math.nan for c, row in enumerate(confusion)]
    return {"top1": 100 * sum(confusion[c][c] for c in range(num_classes)) / n, "top5": 100 * in_top_k / n,
            "per_class": per_class, "confusion": confusion}


@pytest.mark.parametrize("num_classes", [6, 3])
def test_metrics_match_counts_by_hand(num_classes):
    model, loader, labels = _case(num_classes, 23)
    expected = _by_hand(model.logits.tolist(), labels, num_classes)
    ev = evaluate(model, loader, NAMES[:num_classes])
    assert ev.count == 23 and ev.class_names == NAMES[:num_classes]
    assert ev.top1 == pytest.approx(expected["top1"], abs=1e-4)
    assert ev.top5 == pytest.approx(expected["top5"], abs=1e-4)
    assert 0 < ev.top1 < ev.top5 <= 100
    assert ev.per_class == pytest.approx(expected["per_class"], abs=1e-4)
    assert ev.confusion.dtype == torch.int64 and ev.confusion.tolist() == expected["confusion"]


def test_a_class_without_images_has_no_accuracy():
    model, loader, labels = _case(4, 20, seed=3)
    images, labels = loader.dataset.tensors
    keep = labels != 2
    loader = DataLoader(TensorDataset(images[keep], labels[keep]), batch_size=4)
    ev = evaluate(model, loader, NAMES[:4])
    assert ev.count == int(keep.sum()) and ev.confusion[2].sum() == 0
    assert math.isnan(ev.per_class[2]) and not any(math.isnan(v) for i, v in enumerate(ev.per_class) if i != 2)
    row = next(line for line in format_evaluation(ev).splitlines() if line.startswith(NAMES[2]))
    assert row.split()[1:] == ["0", "-"]


def test_runs_in_eval_and_inference_mode_then_restores_training_mode():
    model, loader, _ = _case(3, 10)
    model.train()
    evaluate(model, loader, NAMES[:3])
    assert model.runs == [(False, True)] * 3
    assert model.training


def test_format_shows_every_class_and_number():
    model, loader, labels = _case(6, 23)
    ev = evaluate(model, loader, NAMES)
    text = format_evaluation(ev)
    lines = text.splitlines()
    assert lines[0] == f"23 images: top-1 {ev.top1:.2f} %, top-5 {ev.top5:.2f} %"
    for c, name in enumerate(NAMES):
        row = next(line for line in lines if line.startswith(name + " "))  # the per-class table
        assert row.split()[1:] == [str(labels.count(c)), f"{ev.per_class[c]:.2f}"]
    header = lines.index(next(line for line in lines if line.startswith("true \\ predicted")))
    assert lines[header].split()[3:] == [str(c) for c in range(len(NAMES))]  # columns numbered as the rows
    matrix = lines[header + 2:]
    assert [line.split()[:2] for line in matrix] == [[str(c), name] for c, name in enumerate(NAMES)]  # names whole
    assert [[int(v) for v in line.split()[2:]] for line in matrix] == ev.confusion.tolist()


def test_confusion_matrix_keeps_twelve_long_class_names_whole_and_narrow():
    names = [f"{colour}_{shape}_with_a_long_suffix" for colour in ("blue", "red", "green")
             for shape in ("circle", "ring", "square", "triangle")]
    model, loader, _ = _case(12, 40)
    text = format_evaluation(evaluate(model, loader, names))
    matrix = text.split("true \\ predicted")[1].splitlines()[2:]
    assert [line.split()[1] for line in matrix] == names
    assert max(map(len, text.splitlines())) <= len(max(names, key=len)) + 4 * 12 + 4  # one narrow column per class


def test_confusion_figure_labels_both_axes_and_every_cell(tmp_path):
    model, loader, _ = _case(6, 23)
    ev = evaluate(model, loader, NAMES)
    figure = confusion_figure(ev)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == NAMES
    assert [t.get_text() for t in axes.get_yticklabels()] == NAMES
    cells = sorted((round(t.get_position()[1]), round(t.get_position()[0]), t.get_text()) for t in axes.texts)
    assert cells == [(r, c, str(v)) for r, row in enumerate(ev.confusion.tolist()) for c, v in enumerate(row)]
    assert f"{ev.top1:.2f}" in axes.get_title()
    figure.savefig(tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_problems_names_each_broken_tensor_and_count():
    state = {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(7),
             "conv.weight": torch.full((2, 2), 3e9)}
    state["fc.weight"][0, :3] = math.nan
    state["fc.weight"][1, 0] = math.inf
    state["fc.bias"][2] = -math.inf
    broken, absurd = weight_problems(state)
    assert broken == ["fc.weight holds 3 NaN values and 1 infinite value", "fc.bias holds 1 infinite value"]
    assert absurd == ["conv.weight holds values up to 3e+09 in magnitude"]
    assert weight_problems({"w": torch.randn(3, 3), "steps": torch.tensor(10**9)}) == ([], [])
