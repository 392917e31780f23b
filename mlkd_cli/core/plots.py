"""PNG figures: confusion matrices and reliability diagrams (matplotlib, the `plots` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlkd_cli.core.atomic import atomic_write
from mlkd_cli.core.errors import UserError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("drawing figures needs matplotlib: pip install matplotlib") from None
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


def loss_part_keys(row: dict[str, Any]) -> list[str]:
    """The named parts of the training loss a history row holds: kd, ce, exit1_loss, ..."""
    return [k for k in row if k in ("kd", "ce") or (k.startswith("exit") and k.endswith("_loss"))]


def training_curves_png(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Training loss, and validation top-1 of the final head and of each exit, per epoch."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in rows]
    figure, (loss_axes, top1_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(
        epochs, [row["train_loss"] for row in rows], marker="o", markersize=3, label="loss"
    )
    for key in loss_part_keys(rows[-1]):
        loss_axes.plot(epochs, [row.get(key) for row in rows], linestyle="--", label=key)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss")
    loss_axes.legend()
    top1_axes.plot(
        epochs, [row["val_top1"] for row in rows], marker="o", markersize=3, label="final head"
    )
    exit_keys = sorted(k for k in rows[-1] if k.startswith("exit") and k.endswith("_top1"))
    for key in exit_keys:
        top1_axes.plot(
            epochs,
            [row.get(key) for row in rows],
            linestyle="--",
            label=key.removesuffix("_top1").replace("exit", "exit "),
        )
    top1_axes.set_xlabel("epoch")
    top1_axes.set_ylabel("validation top-1 %")
    top1_axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def comparison_png(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Bar chart of test top-1 and NLL for every model of a pipeline run."""
    plt = _pyplot()
    labels = [row["name"] for row in rows]
    figure, (top1_axes, nll_axes) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows) + 4), 4.5))
    colours = [
        {
            "teacher": "tab:grey",
            "ensemble": "tab:purple",
            "student": "tab:blue",
            "exit": "tab:cyan",
            "cascade": "tab:green",
            "baseline": "tab:orange",
        }.get(r["role"], "tab:grey")
        for r in rows
    ]
    top1_axes.bar(labels, [row["top1"] for row in rows], color=colours)
    top1_axes.set_ylabel("test top-1 %")
    low = min(row["top1"] for row in rows)
    top1_axes.set_ylim(max(0, low - 5), 100)
    nll_axes.bar(labels, [row["nll"] for row in rows], color=colours)
    nll_axes.set_ylabel("test NLL")
    for axes in (top1_axes, nll_axes):
        axes.tick_params(axis="x", rotation=60, labelsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def anytime_png(result: dict[str, Any], title: str, path: Path) -> None:
    """Top-1 against mean MACs per image: each head alone, the early-exit cascade over shared
    thresholds (with --early-exit: each exit rule's frontier), and the chosen thresholds."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.5))
    heads = result["heads"]
    axes.scatter(
        [h["macs_pct"] for h in heads],
        [h["top1"] for h in heads],
        color="tab:gray",
        zorder=3,
        label="each head alone",
    )
    for i, h in enumerate(heads):  # "final", "exit 1", ...: as every table names them
        axes.annotate(
            "final" if i == 0 else f"exit {i}",
            (h["macs_pct"], h["top1"]),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    frontiers = result.get("frontiers") or {}
    if frontiers:
        for (rule, points), color in zip(
            frontiers.items(), ("tab:blue", "tab:orange", "tab:purple"), strict=False
        ):
            axes.plot(
                [p["macs_pct"] for p in points],
                [p["top1"] for p in points],
                marker="o",
                markersize=4,
                color=color,
                alpha=0.8,
                zorder=4,  # above the heads' dots: a one-point frontier sits on one
                label=f"frontier, {rule}",
            )
    else:
        shared = [c for c in result["cascades"] if c["rule"] not in ("chosen", "given")]
        shared.sort(key=lambda c: c["macs_pct"])
        axes.plot(
            [c["macs_pct"] for c in shared],
            [c["top1"] for c in shared],
            marker="o",
            color="tab:blue",
            label="cascade, one threshold for all exits "
            f"({result.get('exit_rule', 'max_softmax')})",
        )
    for c in result["cascades"]:
        if c["rule"] in ("chosen", "given"):
            values = ",".join(f"{v:g}" for v in c["thresholds"])
            axes.scatter(
                [c["macs_pct"]],
                [c["top1"]],
                marker="*",
                s=180,
                color="tab:red" if c["rule"] == "chosen" else "tab:green",
                zorder=4,
                label=f"{c['rule']} thresholds {values} ({c.get('exit_rule', 'max_softmax')})",
            )
    axes.axhline(heads[0]["top1"], color="tab:gray", linestyle=":", linewidth=1)
    axes.set_xlabel("mean MACs per image, % of the plain model")
    axes.set_ylabel("top-1 %")
    axes.set_xlim(0, max(105, max(h["macs_pct"] for h in heads) + 5))
    low, high = axes.get_ylim()
    axes.set_ylim(low - 0.35 * (high - low), high)  # room for the legend below the points
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="lower left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def study_png(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Each arm of a study: test top-1 and NLL of every seed (dots) and their mean (bar)."""
    plt = _pyplot()
    labels = [row["arm"] for row in rows]
    figure, (top1_axes, nll_axes) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(rows) + 4), 4.5))
    for axes, key, label in ((top1_axes, "top1", "test top-1 %"), (nll_axes, "nll", "test NLL")):
        means = [row[key]["mean"] for row in rows]
        colours = ["tab:orange" if row["arm"] == "ce" else "tab:blue" for row in rows]
        axes.bar(labels, means, color=colours, alpha=0.6)
        for x, row in enumerate(rows):
            values = row[key]["per_seed"]
            axes.scatter([x] * len(values), values, color="black", s=12, zorder=3)
        axes.set_ylabel(label)
        if key == "top1":
            low = min(min(row["top1"]["per_seed"]) for row in rows)
            axes.set_ylim(max(0, low - 5), min(100, max(means) + 3))
        axes.tick_params(axis="x", rotation=30)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)
