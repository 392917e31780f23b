"""Classification metrics against hand-computed values: NLL, ECE, worst classes, confusion."""

from __future__ import annotations

import math

import pytest
import torch

from mlkd_cli.core.metrics import (
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
)


def test_nll_and_ece_against_hand_computed_values() -> None:
    # Two classes; softmax of (log p, 0) gives probability p for class 0.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    logits = probs.log()
    labels = torch.tensor([0, 1, 0, 1])
    metrics = classification_metrics(logits, labels)
    nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.7)) / 4
    assert metrics["nll"] == pytest.approx(nll, rel=1e-9)
    assert metrics["top1"] == pytest.approx(75.0)
    # Confidences 0.9, 0.8, 0.6, 0.7 fall in four different 1/15-wide bins; each holds one image,
    # correct or not: ECE = (|1-0.9| + |0-0.8| + |1-0.6| + |1-0.7|) / 4.
    assert metrics["ece"] == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4, rel=1e-9)
    # Same bin: confidences 0.81 and 0.82 (bin (0.8, 0.8667]), one right -> |0.5 - 0.815|.
    two = torch.tensor([[0.81, 0.19], [0.82, 0.18]], dtype=torch.float64)
    assert expected_calibration_error(two, torch.tensor([0, 1])) == pytest.approx(0.315)


def test_worst_classes_and_confusion_matrix() -> None:
    logits = torch.eye(3)[[0, 0, 1, 2, 2, 2]] * 5
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    metrics = classification_metrics(logits, labels, ["a", "b", "c"], worst=2)
    assert [c["class"] for c in metrics["worst_classes"]] == ["a", "b"]
    assert metrics["worst_classes"][0]["top1"] == pytest.approx(50.0)
    assert confusion_matrix(logits, labels).tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
