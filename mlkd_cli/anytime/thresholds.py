"""Threshold search, from every head's logits: what a cascade at given thresholds scores and
costs; the operating point chosen for an accuracy bound (the cheapest thresholds that keep top-1
within a margin of the final head) or a compute budget (the most accurate thresholds whose mean
MACs stay within a share of the plain model's), under each exit rule; and each rule's
accuracy-against-MACs frontier.

Heads are in cascade order here: exit 0, exit 1, ..., the final head last. An image leaves at the
first exit whose confidence under the rule (`rules.EXIT_RULES`) reaches that exit's
threshold (the final head takes the rest), exactly as `StagedStudent.cascade` runs it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from mlkd_cli.anytime.rules import EXIT_RULE, EXIT_RULES, exit_confidence, exits_taken

# Thresholds tried per exit when choosing; 1.0 lets only certain images leave, the low ones
# nearly every image (a margin or an entropy rule's confidence runs lower than the top
# probability, and a tight budget needs most images to leave early).
THRESHOLD_GRID = (
    0.01,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.75,
    0.8,
    0.85,
    0.9,
    0.925,
    0.95,
    0.97,
    0.98,
    0.99,
    0.995,
    0.999,
    0.9999,
    1.0,
)
# Shared thresholds (the same for every exit) shown as the cascade table's rows.
TABLE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
# Validation splits smaller than this choose one threshold shared by every exit.
PER_EXIT_FROM = 2_000
# Above this many threshold combinations the choice is made exit by exit (coordinate descent).
EXHAUSTIVE_LIMIT = 20_000


@dataclass(frozen=True)
class HeadOutputs:
    """Every head's logits over a split, in cascade order, and the labels."""

    logits: torch.Tensor  # (heads, images, classes), float32
    labels: torch.Tensor  # (images,)
    _scores: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor) -> HeadOutputs:
        """From the student's outputs in its own order (final first, then the exits)."""
        return cls(torch.cat([logits[1:], logits[:1]]).float(), labels.long())

    @property
    def exit_count(self) -> int:
        """Exits before the final head."""
        return self.logits.shape[0] - 1

    @cached_property
    def probs(self) -> torch.Tensor:
        """(heads, images, classes): float32 softmax, the arithmetic the cascade decides by."""
        return self.logits.softmax(dim=-1)

    def confidence_of(self, rule: str) -> torch.Tensor:
        """(heads, images): how sure each head is of each image under `rule` (computed once)."""
        if rule not in self._scores:
            self._scores[rule] = exit_confidence(self.logits, rule)
        return self._scores[rule]

    @property
    def correct(self) -> torch.Tensor:
        """(heads, images): whether each head's top class is the label."""
        return self.logits.argmax(dim=-1) == self.labels


@dataclass(frozen=True)
class CascadeResult:
    """One cascade's figures over a split."""

    thresholds: tuple[float, ...]
    top1: float
    nll: float
    shares: tuple[float, ...]  # % of images leaving at each head (exits, then final)
    macs: float  # mean MACs per image
    macs_pct: float  # of the plain model's

    def to_record(self) -> dict:
        """Plain types for JSON."""
        return {
            "thresholds": list(self.thresholds),
            "top1": self.top1,
            "nll": self.nll,
            "exit_shares": list(self.shares),
            "macs": self.macs,
            "macs_pct": self.macs_pct,
        }


def evaluate_cascade(
    heads: HeadOutputs,
    thresholds: Sequence[float],
    cascade_macs: Sequence[int],
    plain_macs: int,
    rule: str = EXIT_RULE,
) -> CascadeResult:
    """Top-1, NLL, exit shares and mean MACs of the cascade at `thresholds` under `rule`."""
    taken = exits_taken(heads.confidence_of(rule), thresholds)
    images = torch.arange(len(heads.labels))
    logits = heads.logits[taken, images].double()
    count = max(len(heads.labels), 1)
    shares = torch.bincount(taken, minlength=heads.exit_count + 1).double() * 100 / count
    macs = float(torch.tensor(list(cascade_macs), dtype=torch.float64)[taken].mean())
    return CascadeResult(
        thresholds=tuple(float(t) for t in thresholds),
        top1=100.0 * float((logits.argmax(dim=1) == heads.labels).double().mean()),
        nll=float(F.cross_entropy(logits, heads.labels)),
        shares=tuple(shares.tolist()),
        macs=macs,
        macs_pct=100.0 * macs / plain_macs,
    )


def choose_thresholds(
    heads: HeadOutputs,
    cascade_macs: Sequence[int],
    max_drop: float | None = None,
    grid: Sequence[float] = THRESHOLD_GRID,
    *,
    max_macs: float | None = None,
    rule: str = EXIT_RULE,
) -> tuple[float, ...] | None:
    """Thresholds for one of two criteria (exactly one given), under `rule`:

    - `max_drop`: the fewest mean MACs (ties: the higher top-1) losing at most `max_drop` top-1
      points against the final head, counted conservatively: the images the final head gets
      right and the cascade gets wrong are at most `max_drop` % of the split (images the cascade
      gets right where the final head fails do not buy further losses). On digits the net
      difference picked thresholds that were 2 points better than the final head on its 144
      validation images and a point worse on the test split; this bound held.
    - `max_macs`: the highest top-1 (ties: fewer MACs) whose mean MACs per image stay within
      `max_macs`.

    None when no thresholds on the grid meet the criterion.

    A split of fewer than `PER_EXIT_FROM` images picks one threshold shared by every exit (per-
    exit thresholds overfit it); larger ones search each exit's threshold.
    """
    if (max_drop is None) == (max_macs is None):
        raise ValueError("give max_drop or max_macs")
    correct = heads.correct
    final = correct[-1]
    count = max(len(heads.labels), 1)
    exits = heads.exit_count
    costs = torch.tensor(list(cascade_macs), dtype=torch.float64)
    images = torch.arange(len(heads.labels))
    limits = torch.tensor(list(grid), dtype=torch.float32)
    # leave[j, g, n]: image n leaves at exit j under the g-th threshold.
    leave = heads.confidence_of(rule)[:exits, None, :] >= limits[None, :, None]

    def score(choice: Sequence[int]) -> tuple[float, float] | None:
        """(mean MACs, top-1) of a choice of grid positions; None when it breaks the bound."""
        rows = torch.stack([leave[j, g] for j, g in enumerate(choice)])
        taken = torch.cat([rows, torch.ones_like(rows[:1])]).int().argmax(dim=0)
        hits = correct[taken, images]
        macs = float(costs[taken].mean())
        if max_macs is not None and macs > max_macs * (1 + 1e-9):
            return None
        if max_drop is not None and 100.0 * float((final & ~hits).sum()) / count > max_drop + 1e-9:
            return None
        return macs, 100.0 * float(hits.sum()) / count

    def key(figures: tuple[float, float]) -> tuple[float, float]:
        macs, top1 = figures
        return (macs, -top1) if max_drop is not None else (-top1, macs)

    best_choice, best = None, None
    for choice in _candidates(len(grid), exits, count, score, key):
        figures = score(choice)
        if figures is not None and (best is None or key(figures) < key(best)):
            best_choice, best = choice, figures
    return None if best_choice is None else tuple(float(grid[g]) for g in best_choice)


@dataclass(frozen=True)
class OperatingPoint:
    """The thresholds chosen for a deployment: rule, thresholds, their figures on the split,
    and whether the criterion could be met (False: the closest that could be found)."""

    rule: str
    result: CascadeResult
    met: bool


def choose_operating_point(
    heads: HeadOutputs,
    cascade_macs: Sequence[int],
    plain_macs: int,
    *,
    max_drop: float | None = None,
    budget: float | None = None,
    rules: Sequence[str] = tuple(EXIT_RULES),
) -> OperatingPoint:
    """The best thresholds over `rules` for `max_drop` (fewest MACs, then higher top-1) or
    `budget`, a share of `plain_macs` (highest top-1, then fewer MACs). Where no thresholds
    meet the criterion (`met` False): the most cautious ones (1.0) for a top-1 bound, the
    cheapest (every exit at the lowest threshold) for a budget."""
    if (max_drop is None) == (budget is None):
        raise ValueError("give max_drop or budget")
    limit = None if budget is None else budget * plain_macs
    found: list[OperatingPoint] = []
    for rule in rules:
        values = choose_thresholds(heads, cascade_macs, max_drop, max_macs=limit, rule=rule)
        if values is not None:
            result = evaluate_cascade(heads, values, cascade_macs, plain_macs, rule)
            found.append(OperatingPoint(rule, result, True))
    if max_drop is not None:
        key = lambda p: (p.result.macs, -p.result.top1)  # noqa: E731
    else:
        key = lambda p: (-p.result.top1, p.result.macs)  # noqa: E731
    if found:
        return min(found, key=key)
    fallback = [(THRESHOLD_GRID[-1] if max_drop is not None else THRESHOLD_GRID[0])] * (
        heads.exit_count
    )
    return min(
        (
            OperatingPoint(
                rule, evaluate_cascade(heads, fallback, cascade_macs, plain_macs, rule), False
            )
            for rule in rules
        ),
        key=key,
    )


def frontier(
    heads: HeadOutputs,
    cascade_macs: Sequence[int],
    plain_macs: int,
    rule: str,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> list[CascadeResult]:
    """The rule's accuracy-against-MACs frontier: the cascades at one threshold shared by every
    exit, each on the grid, keeping those no cheaper one matches in top-1 (fewest MACs first)."""
    points = sorted(
        (
            evaluate_cascade(heads, [t] * heads.exit_count, cascade_macs, plain_macs, rule)
            for t in grid
        ),
        key=lambda r: (r.macs, -r.top1),
    )
    kept: list[CascadeResult] = []
    for point in points:
        if not kept or point.top1 > kept[-1].top1 + 1e-9:
            kept.append(point)
    return kept


def _candidates(size: int, exits: int, count: int, score, key) -> list[tuple[int, ...]]:
    """Grid positions to try: shared ones for a small split, all combinations when few enough,
    else where coordinate descent (by `key`) settles from the most cautious thresholds and from
    the most eager ones (a budget may rule the cautious end out altogether)."""
    if count < PER_EXIT_FROM:
        return [tuple([g] * exits) for g in range(size)]
    if size**exits <= EXHAUSTIVE_LIMIT:
        return list(itertools.product(range(size), repeat=exits))
    settled = []
    for start in (size - 1, 0):
        current = tuple([start] * exits)
        for _ in range(3):
            for j in range(exits):
                options = [(*current[:j], g, *current[j + 1 :]) for g in range(size)]
                feasible = [(key(f), o) for o in options if (f := score(o)) is not None]
                if feasible:
                    current = min(feasible)[1]
        settled.append(current)
    return settled
