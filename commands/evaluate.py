"""`mlkd eval`: measure a checkpoint (lands in a later release)."""

from __future__ import annotations

from mlkd_cli.console import UserError


def evaluate() -> None:
    """Evaluate a checkpoint on a dataset split (not available yet)."""
    raise UserError("`mlkd eval` is not available in this version of mlkd yet")
