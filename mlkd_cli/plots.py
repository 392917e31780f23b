"""PNG figures: confusion matrices and reliability diagrams (matplotlib, the `plots` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlkd_cli.console import UserError
from mlkd_cli.engine.atomic import atomic_write


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'mlkd[plots]'") from None
    return plt


def _save(figure: Any, path: Path) -> None:
    plt = _pyplot()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    plt.close(figure)


def confusion_matrix_png(
    matrix: torch.Tensor, class_names: list[str], title: str, path: Path
) -> None:
    """Row-normalised confusion matrix (true class down, predicted across)."""
    plt = _pyplot()
    counts = matrix.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(class_names)
    size = min(16.0, 3.0 + 0.3 * n)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        axes.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        axes.set_yticks(range(n), class_names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.tight_layout()
    _save(figure, path)


def reliability_png(bins: list[dict], ece: float, title: str, path: Path) -> None:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    width = bins[0]["upper"] - bins[0]["lower"]
    centres = [b["lower"] + width / 2 for b in bins if b["count"]]
    accuracy = [b["accuracy"] for b in bins if b["count"]]
    axes.bar(centres, accuracy, width=width * 0.9, color="tab:blue", label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title}\nECE {ece:.4f}")
    axes.legend(loc="upper left")
    figure.tight_layout()
    _save(figure, path)
