"""`mlkd export`: ship a student outside mlkd (lands in a later release)."""

from __future__ import annotations

from mlkd_cli.console import UserError


def export() -> None:
    """Export a checkpoint to safetensors, ONNX or TorchScript (not available yet)."""
    raise UserError("`mlkd export` is not available in this version of mlkd yet")
