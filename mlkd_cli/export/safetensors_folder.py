"""safetensors export: a folder a user loads without mlkd. A plain classifier's holds
`model.safetensors` and `config.json` in timm's hub form (`timm.create_model` rebuilds it); a
student with exits' holds `model.safetensors` and `exits.json` (card, exits, thresholds), which
`mlkd_cli.anytime` loads. The weights are reloaded and compared with PyTorch before the folder's
description is written beside them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlkd_cli.core.atomic import atomic_write_text
from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.constants import DEFAULT_MEAN, DEFAULT_STD
from mlkd_cli.export.verify import TOLERANCE, Probe, largest_diff, verified_file
from mlkd_cli.models.exits import ExitsCheckpoint, load_exits_safetensors


def timm_config(model: nn.Module, card: ModelCard | None, size: int) -> dict[str, Any]:
    """config.json in timm's hub form: architecture, classes, and the pretrained config."""
    arch = card.arch if card else model.default_cfg.get("architecture", type(model).__name__)
    classes = model.num_classes
    config: dict[str, Any] = {
        "architecture": arch,
        "num_classes": classes,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": card.interpolation if card else "bicubic",
            "mean": list(card.mean) if card else list(DEFAULT_MEAN),
            "std": list(card.std) if card else list(DEFAULT_STD),
            "crop_pct": card.crop_pct if card else 0.875,
            "crop_mode": "center",
            "num_classes": classes,
            "classifier": model.pretrained_cfg.get("classifier", "fc"),
        },
    }
    if card is not None:
        config["label_names"] = list(card.class_names)
    return config


def write_safetensors(
    model: nn.Module, card: ModelCard | None, probe: Probe, destination: Path
) -> tuple[float, str]:
    """A plain classifier's folder; the difference from PyTorch and what checked it."""
    from safetensors.torch import load_file, save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    if card is not None:
        metadata["mlkd"] = json.dumps(asdict(card))

    def verify(path: Path) -> float:
        import timm

        fresh = timm.create_model(
            timm_config(model, card, probe.check.shape[-1])["architecture"],
            num_classes=model.num_classes,
        )
        fresh.load_state_dict(load_file(str(path)))
        fresh.eval()
        with torch.no_grad():
            return largest_diff([fresh(probe.check)], probe.expected)

    diff = verified_file(
        destination / "model.safetensors",
        lambda p: save_file(state, str(p), metadata=metadata),
        verify,
    )
    if diff <= TOLERANCE:
        config = timm_config(model, card, probe.check.shape[-1])
        atomic_write_text(destination / "config.json", json.dumps(config, indent=2) + "\n")
    return diff, "timm.create_model + safetensors"


def write_exits_safetensors(
    loaded: ExitsCheckpoint, probe: Probe, destination: Path
) -> tuple[float, str]:
    """A student with exits' folder; the difference from PyTorch and what checked it."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in loaded.student.state_dict().items()}
    metadata = {
        "format": "pt",
        "mlkd": json.dumps(asdict(loaded.card)),
        "mlkd_exits": json.dumps(loaded.exits),
    }

    def verify(path: Path) -> float:
        fresh = load_exits_safetensors(path)
        with torch.no_grad():
            return largest_diff(list(fresh.student(probe.check)), probe.expected)

    diff = verified_file(
        destination / "model.safetensors",
        lambda p: save_file(state, str(p), metadata=metadata),
        verify,
    )
    if diff <= TOLERANCE:
        about = {"card": asdict(loaded.card), "exits": loaded.exits}
        atomic_write_text(destination / "exits.json", json.dumps(about, indent=2) + "\n")
    return diff, "mlkd_cli.anytime + safetensors"
