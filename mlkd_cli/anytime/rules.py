"""Exit rules: how sure a head is of an image, and where each image leaves the cascade.

A rule turns a head's logits into a confidence in [0, 1] (higher: surer); an image leaves at the
first exit whose confidence reaches that exit's threshold, and the final head takes the rest.
Every cascade decides by this arithmetic: the staged runner, the threshold search, and the
decision taken on an exported graph's outputs (`cascade_from_outputs`).

A new rule is one function of the float32 softmax and one line in `EXIT_RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mlkd_cli.core.errors import UserError


def _max_softmax(probs: torch.Tensor) -> torch.Tensor:
    return probs.amax(dim=-1)


def _margin(probs: torch.Tensor) -> torch.Tensor:
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    return top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0)


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    return (1.0 - entropy / math.log(max(probs.shape[-1], 2))).clamp(0.0, 1.0)


@dataclass(frozen=True)
class ExitRule:
    """One rule: what it measures (in words) and the confidence it computes from the softmax."""

    description: str
    confidence: Callable[[torch.Tensor], torch.Tensor]

    def __str__(self) -> str:
        # Tables and captions print a rule as what it measures.
        return self.description


# The registry: name -> rule. Files written before rules existed used the first.
EXIT_RULES = {
    "max_softmax": ExitRule("the top softmax probability", _max_softmax),
    "margin": ExitRule("the top probability minus the second", _margin),
    "entropy": ExitRule("1 minus the softmax's entropy divided by log(classes)", _entropy),
}
EXIT_RULE = "max_softmax"  # the default, and what a file without a rule was chosen with


def exit_confidence(logits: torch.Tensor, rule: str = EXIT_RULE) -> torch.Tensor:
    """How sure each row of `logits` (..., classes) is under `rule` (`EXIT_RULES`), in [0, 1],
    from the float32 softmax: the arithmetic every cascade decides by."""
    if rule not in EXIT_RULES:
        raise ValueError(f"unknown exit rule {rule!r}; rules are {', '.join(EXIT_RULES)}")
    return EXIT_RULES[rule].confidence(logits.float().softmax(dim=-1))


def check_rule(rule: str) -> str:
    """Refuse an exit rule mlkd does not know (one line naming the choices)."""
    if rule not in EXIT_RULES:
        raise UserError(f"--exit-rule must be one of {', '.join(EXIT_RULES)}, not {rule!r}")
    return rule


def check_thresholds(values: Sequence[float], exit_count: int) -> list[float]:
    """Refuse thresholds outside (0, 1] or of the wrong count; returns them as floats."""
    values = [float(v) for v in values]
    if len(values) != exit_count:
        raise UserError(f"--thresholds needs {exit_count} values, one per exit, got {len(values)}")
    bad = [v for v in values if not (math.isfinite(v) and 0 < v <= 1)]
    if bad:
        raise UserError(
            f"--thresholds must lie in (0, 1] (a top softmax probability), not {bad[0]:g}"
        )
    return values


def exits_taken(confidence: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """(images,): the head each image leaves at (the exit count for the final head), from every
    head's confidence (heads, images) in cascade order."""
    limits = torch.tensor(list(thresholds), dtype=torch.float32)[:, None]
    leave = confidence[:-1] >= limits
    leave = torch.cat([leave, torch.ones_like(leave[:1])])
    return leave.int().argmax(dim=0)  # the first True


def cascade_from_outputs(
    outputs: Sequence[torch.Tensor], thresholds: Sequence[float], rule: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cascade's decision on every head's logits computed at once (an exported graph's
    outputs: final first, then each exit): the logits of the head each image leaves at, and
    that head (exits 0.., the final head last)."""
    heads = torch.stack([*outputs[1:], outputs[0]])
    taken = exits_taken(exit_confidence(heads, rule), thresholds)
    return heads[taken, torch.arange(heads.shape[1])].float(), taken
