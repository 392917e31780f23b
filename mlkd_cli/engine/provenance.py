"""Where a trained model came from: its teacher (or soft-label store), its data, the software that
made it and the command that ran, recorded in the model card and the history of every run.

The record is plain JSON data, so it travels wherever the card does (checkpoints, the safetensors
and ONNX exports) and `mlkd eval --provenance` prints it back.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from mlkd_cli import __version__
from mlkd_cli.core.invocation import command_line
from mlkd_cli.data.registry import DataSplits
from mlkd_cli.data.softlabels import MANIFEST, StoreManifest, file_sha256
from mlkd_cli.models.ensemble_config import EnsembleConfig


def teacher_identity(teacher: EnsembleConfig) -> dict[str, Any]:
    """Which teacher made the outputs: architectures, checkpoints and their SHA-256, weights,
    temperature, and any input size the ensemble file sets."""
    identity = {
        "models": [m.model for m in teacher.members],
        "checkpoints": [str(m.checkpoint) for m in teacher.members],
        "sha256": [file_sha256(m.checkpoint) for m in teacher.members],
        "weights": list(teacher.weights),
        "temperature": teacher.temperature,
    }
    sizes = [m.img_size for m in teacher.members]
    if any(size is not None for size in sizes):
        identity["img_size"] = sizes
    return identity


def store_identity(folder: Path, manifest: StoreManifest) -> dict[str, Any]:
    """Which soft-label store a student replayed: its folder, manifest SHA-256 and teacher."""
    return {
        "soft_labels": str(folder.resolve()),
        "manifest_sha256": file_sha256(folder / MANIFEST),
        "views": manifest.views,
        "top_k": manifest.top_k,
        "seed": manifest.seed,
        "teacher": manifest.teacher,
    }


def software() -> dict[str, str]:
    """The versions of mlkd, torch, timm and Python doing the work."""
    import timm
    import torch

    return {
        "mlkd": __version__,
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only refuses
        "timm": str(timm.__version__),
        "python": platform.python_version(),
    }


def run_provenance(
    dataset: str, data_dir: Path, splits: DataSplits, teacher: dict[str, Any] | None
) -> dict[str, Any]:
    """The provenance record of a run on `splits` taught by `teacher` (None: from labels)."""
    return {
        "teacher": teacher,
        "data": {
            "dataset": dataset,
            # None for a dataset shipped inside mlkd (no folder is read)
            "data_dir": str(Path(data_dir).resolve()) if splits.spec.reads_files else None,
            "classes": splits.num_classes,
            **splits.counts(),
        },
        "software": software(),
        "command": command_line(),
    }
