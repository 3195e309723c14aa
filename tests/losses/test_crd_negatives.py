"""CRD's negatives: uniform over the training images, or, as the references' CIFAR runs, from other classes only."""

from __future__ import annotations

import pytest
import torch

from kd.losses import build_loss
from kd.errors import KDError

SHAPES = {"pool": (8,)}


def _crd(labels: list[int], **options) -> torch.nn.Module:
    return build_loss("crd", student_shapes=SHAPES, teacher_shapes=SHAPES, num_samples=len(labels),
                      sample_labels=labels, **options)


def test_exact_negatives_come_from_every_other_class_image_and_never_the_anchors_class():
    torch.manual_seed(0)
    labels = [0, 1, 2, 0, 1, 2, 2, 0, 1, 1]
    crd = _crd(labels, negatives="exact", nce_k=4000)
    anchors = torch.tensor([0, 4, 6])
    drawn = crd.sample(anchors)
    assert drawn.shape == (3, 4001) and torch.equal(drawn[:, 0], anchors)  # the positive is the image itself
    for row, anchor in zip(drawn, anchors):
        others = {i for i, label in enumerate(labels) if label != labels[anchor]}
        counts = torch.bincount(row[1:], minlength=len(labels))
        assert set(row[1:].tolist()) == others  # every other-class image drawn, no image of the anchor's class
        share = counts[sorted(others)].float() / 4000
        assert torch.allclose(share, torch.full_like(share, 1 / len(others)), atol=0.03)  # uniform among them


def test_exact_negatives_are_distinct_when_there_are_enough_as_the_references_draw_them():
    torch.manual_seed(0)
    labels = [index % 4 for index in range(40)]  # 30 negatives for every anchor
    crd = _crd(labels, negatives="exact", nce_k=25)
    draws = torch.stack([crd.sample(torch.tensor([3]))[0, 1:] for _ in range(400)])
    assert all(len(set(row.tolist())) == 25 for row in draws)  # without replacement
    assert not (torch.tensor(labels)[draws] == labels[3]).any()
    counts = torch.bincount(draws.flatten(), minlength=40)[[i for i in range(40) if i % 4 != 3]].float()
    assert torch.allclose(counts / counts.sum(), torch.full_like(counts, 1 / 30), atol=0.01)  # each equally likely


def test_uniform_negatives_stay_the_default_and_draw_from_every_image():
    torch.manual_seed(0)
    crd = _crd([0, 1, 0, 1], nce_k=500)
    assert crd.negatives == "uniform" and set(crd.sample(torch.tensor([0]))[0, 1:].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("options, message", [
    ({"negatives": "other"}, "negatives is uniform"),
    ({"negatives": "exact", "sample_labels": [0, 0, 0, 0]}, "two classes or more"),
])
def test_bad_negative_settings_are_refused(options, message):
    with pytest.raises((KDError, ValueError), match=message):
        _crd([0, 1, 0, 1], **options) if "sample_labels" not in options else build_loss(
            "crd", student_shapes=SHAPES, teacher_shapes=SHAPES, num_samples=4, **options)
