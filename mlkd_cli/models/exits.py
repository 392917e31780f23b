"""The exits file format: a student saved with its exits, and loaded back.

`<name>_exits.pth` (mlkd's checkpoint format, `core.checkpoint.EXITS_FORMAT`) holds the student's
weights with a card and an exits record: the stages its exits read, their heads, MACs per image
of each part of the cascade, and the rule and thresholds `mlkd eval --early-exit` chose. Its
safetensors export (a folder with `model.safetensors`) and ONNX metadata carry the same record.
Running a cascade lives in `mlkd_cli.anytime`; this module only writes and reads the record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from mlkd_cli.anytime.costs import ExitCosts
from mlkd_cli.anytime.rules import EXIT_RULE
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.core.checkpoint import EXITS_FORMAT, ModelCard, load_checkpoint, read_safetensors
from mlkd_cli.core.errors import UserError
from mlkd_cli.models.factory import check_model_name
from mlkd_cli.models.student import MultiExitStudent


def exits_record(student: MultiExitStudent, positions: Sequence[int], img_size: int) -> dict:
    """What an exits checkpoint says about its exits: stages, heads and MACs per image.

    MACs are counted at `img_size` (the training size); they are None for a backbone that
    cannot be run stage by stage.
    """
    try:
        costs: dict | None = StagedStudent(student, img_size).count_costs(img_size).to_record()
    except UserError:
        costs = None
    return {
        "stages": list(positions),
        "modules": [s.module for s in student.stages],
        "head_names": student.head_names,
        "exit_head": student.exit_head,
        "macs": costs,
        "rule": EXIT_RULE,
        "thresholds": None,
    }


@dataclass
class ExitsCheckpoint:
    """A loaded student with its exits: the network (eval mode), its card and exits record."""

    path: Path
    student: MultiExitStudent
    card: ModelCard
    exits: dict[str, Any]

    @property
    def costs(self) -> ExitCosts | None:
        """MACs per image of the cascade's parts, as counted when it was saved."""
        macs = self.exits.get("macs")
        return ExitCosts.from_record(macs) if macs else None

    @property
    def exported(self) -> bool:
        """True when loaded from `mlkd export`'s safetensors (not a `<name>_exits.pth`)."""
        return _is_export(self.path)

    @property
    def thresholds(self) -> list[float] | None:
        """The thresholds chosen on validation, if they have been."""
        chosen = self.exits.get("thresholds")
        return list(chosen["values"]) if chosen else None

    @property
    def rule(self) -> str:
        """The exit rule the thresholds were chosen for (older files: the top probability)."""
        chosen = self.exits.get("thresholds") or {}
        return str(chosen.get("rule", EXIT_RULE))


def is_exits_checkpoint(path: Path) -> bool:
    """True when `path` holds a student with exits: `<name>_exits.pth`, or its safetensors
    export (the folder or its `model.safetensors`)."""
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return "mlkd_exits" in _safetensors_header(path)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return False  # an ensemble file
    try:
        content = load_checkpoint(path, mmap=True)  # the metadata, not every tensor
    except UserError:
        return False  # unreadable (or an old format that cannot be mapped): the loader says why
    return isinstance(content, dict) and content.get("format") == EXITS_FORMAT


def _safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError):
        return {}  # not readable: whoever loads it says so


def _is_export(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".safetensors"


def load_exits_checkpoint(path: Path) -> ExitsCheckpoint:
    """The student with its exits from `<name>_exits.pth`, or from its safetensors export (the
    folder or its `model.safetensors`), checked and in eval mode."""
    if _is_export(path):
        return load_exits_safetensors(path / "model.safetensors" if path.is_dir() else path)
    content = load_checkpoint(path)
    if not isinstance(content, dict) or content.get("format") != EXITS_FORMAT:
        raise UserError(
            f"{path} is a plain model without exits; pass the <name>_exits.pth that "
            "mlkd distill writes beside it"
        )
    card = ModelCard.from_checkpoint(content)
    exits = dict(content["exits"])
    student = build_exits_student(card, exits, content["state_dict"], path)
    return ExitsCheckpoint(path, student, card, exits)


def build_exits_student(
    card: ModelCard, exits: dict[str, Any], state_dict: dict[str, torch.Tensor], path: Path
) -> MultiExitStudent:
    """The multi-exit network a card and exits record describe, holding `state_dict`."""
    check_model_name(card.arch)
    backbone = timm.create_model(card.arch, num_classes=card.num_classes)
    # Files written before light exits existed hold the original's branches.
    student = MultiExitStudent(
        backbone,
        card.arch,
        exits["stages"],
        card.num_classes,
        card.img_size,
        exits.get("exit_head", "original"),
    )
    try:
        student.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise UserError(f"{path} does not fit its recorded student ({detail})") from None
    return student.eval()


def exits_header(meta: dict[str, str], path: Path) -> tuple[ModelCard, dict[str, Any]]:
    """The card and exits record an export carries (safetensors header, ONNX metadata)."""
    if "mlkd_exits" not in meta or "mlkd" not in meta:
        raise UserError(f"{path} is not a student with exits exported by mlkd")
    card = ModelCard.from_json(meta["mlkd"], str(path))  # checked: it sizes allocations
    try:
        return card, json.loads(meta["mlkd_exits"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} has a damaged mlkd header ({exc})") from None


def load_exits_safetensors(path: Path) -> ExitsCheckpoint:
    """A student with exits from the `model.safetensors` that `mlkd export` writes."""
    tensors, meta = read_safetensors(path)
    card, exits = exits_header(meta, path)
    student = build_exits_student(card, exits, tensors, path)
    return ExitsCheckpoint(path, student, card, exits)
