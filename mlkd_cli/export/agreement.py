"""Whether an int8 file is kept: the share of validation images on which it agrees with the fp32
model, on every head and on the cascade's decisions (the head each image leaves at and its class)
where the file carries an operating point, against `--min-agreement`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from mlkd_cli.anytime.rules import EXIT_RULE, cascade_from_outputs
from mlkd_cli.core.errors import UserError
from mlkd_cli.export.int8_plan import Int8Target


def saved_operating_point(metadata: dict[str, str], heads: int) -> tuple[list[float], str] | None:
    """The thresholds and exit rule an exported student with exits carries (`mlkd eval --split
    val --early-exit` chose them), None for a plain model or a student without them."""
    try:
        exits = json.loads(metadata.get("mlkd_exits", "null"))
    except ValueError:
        return None
    return operating_point(exits, heads)


def operating_point(exits: Any, heads: int) -> tuple[list[float], str] | None:
    """The thresholds and exit rule in an exits record (`models/exits.py`) for a student with
    `heads` heads, None where it records none (or not one for every exit)."""
    try:
        chosen = (exits or {}).get("thresholds") or {}
        values = [float(v) for v in chosen.get("values") or []]
    except (ValueError, TypeError, AttributeError):
        return None
    if not values or len(values) != heads - 1:
        return None
    return values, str(chosen.get("rule", EXIT_RULE))


def cascade_decisions(outputs: list[np.ndarray], thresholds: list[float], rule: str) -> np.ndarray:
    """(2, images): the head each image leaves the cascade at and the class it is given there,
    from every head's logits (an exported graph's outputs: final first)."""
    logits, taken = cascade_from_outputs([torch.from_numpy(o) for o in outputs], thresholds, rule)
    return np.stack([taken.numpy(), logits.argmax(dim=1).numpy()])


def agreement_shortfalls(parity: dict[str, Any], min_agreement: float) -> list[str]:
    """`98.50 % (exit1)` for each head, and the cascade, that agrees on less than
    `min_agreement` % of the images."""
    short = [
        f"{agreement:.2f} % ({head})"
        for head, agreement in zip(parity["heads"], parity["agreement"], strict=True)
        if agreement < min_agreement
    ]
    cascade = parity.get("cascade")
    if cascade is not None and cascade["agreement"] < min_agreement:
        short.append(f"{cascade['agreement']:.2f} % (the cascade's exits and classes)")
    return short


def check_agreement(parity: dict[str, Any], min_agreement: float, target: Int8Target) -> None:
    """Refuse an int8 model any of whose heads, or whose cascade, agrees too little."""
    short = agreement_shortfalls(parity, min_agreement)
    if not short:
        return
    fix = "calibrate on more images with --calibration-images, or keep fp32"
    if not target.reduce_range:
        fix = f"try --int8-target avx2 (7-bit weights), {fix}"
    raise UserError(
        f"the int8 model agrees with fp32 on {', '.join(short)} of the {parity['images']} "
        f"validation images, under --min-agreement {min_agreement:g}; not written ({fix})"
    )
