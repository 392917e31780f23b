"""Classification metrics from logits: accuracy, likelihood and calibration."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE with `bins` equal-width confidence bins: Σ_b (n_b / N) · |accuracy_b − confidence_b|.

    Confidence is the top class probability; a bin holds confidences in (lower, upper], the first
    bin also 0.
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    total = 0.0
    for b in range(bins):
        lower, upper = edges[b], edges[b + 1]
        in_bin = (confidence > lower) & (confidence <= upper)
        if b == 0:
            in_bin |= confidence == 0
        count = int(in_bin.sum())
        if count:
            gap = correct[in_bin].mean() - confidence[in_bin].double().mean()
            total += count / len(labels) * abs(float(gap))
    return total


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per-bin count, mean confidence and accuracy (for reliability diagrams)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    rows = []
    for b in range(bins):
        in_bin = (confidence > edges[b]) & (confidence <= edges[b + 1])
        count = int(in_bin.sum())
        rows.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "confidence": float(confidence[in_bin].double().mean()) if count else None,
                "accuracy": float(correct[in_bin].mean()) if count else None,
            }
        )
    return rows


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str] | None = None,
    worst: int = 5,
) -> dict[str, Any]:
    """Top-1 and top-5 (percent), mean NLL, ECE (15 bins), and the classes with lowest accuracy."""
    logits = logits.double()
    labels = labels.long()
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    topk = logits.topk(min(5, num_classes), dim=1).indices
    hits = topk == labels[:, None]
    names = class_names or [str(i) for i in range(num_classes)]
    per_class = []
    for c in range(num_classes):
        members = labels == c
        if int(members.sum()):
            per_class.append(
                {
                    "class": names[c],
                    "images": int(members.sum()),
                    "top1": 100.0 * float(hits[members, 0].double().mean()),
                }
            )
    per_class.sort(key=lambda row: (row["top1"], row["class"]))
    return {
        "images": len(labels),
        "top1": 100.0 * float(hits[:, 0].double().mean()),
        "top5": 100.0 * float(hits.any(dim=1).double().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(probs, labels),
        "worst_classes": per_class[:worst],
    }


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Counts of (true class, predicted class)."""
    n = logits.shape[1]
    predicted = logits.argmax(dim=1)
    return torch.bincount(labels.long() * n + predicted, minlength=n * n).reshape(n, n)
