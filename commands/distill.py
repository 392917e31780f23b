"""`mlkd distill`: multi-level knowledge distillation (lands in a later release)."""

from __future__ import annotations

from mlkd_cli.console import UserError


def distill() -> None:
    """Distil a teacher into a multi-exit student (not available yet)."""
    raise UserError("`mlkd distill` is not available in this version of mlkd yet")
