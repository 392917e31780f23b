"""Thresholds with a guarantee: `mlkd eval --early-exit --max-drop D --risk R`.

The point estimate (`thresholds.choose_operating_point`) keeps the cascade within D points of the
final head on the validation split itself; on new images it can miss. Here the thresholds are
chosen so that, with probability at least 1 - R over the draw of the validation split (n images
drawn independently from the distribution the student will see), the cascade's top-1 on that
distribution is within D points of the final head's. The method is Learn-then-Test
(Angelopoulos, Bates, Candes, Jordan, Lei, "Learn then Test: Calibrating Predictive Algorithms
to Achieve Risk Control", 2021, arXiv:2110.01052) with fixed-sequence testing.

The loss. For thresholds t, per image: h_i(t) = 1[final head right and cascade wrong], in {0, 1}.
Its mean over the distribution, the harm rate H(t), bounds the drop from above:
    drop(t) = P(final right) - P(cascade right) = H(t) - P(cascade right, final wrong) <= H(t).
So H(t) <= D (D points as a rate, D / 100) implies drop(t) <= D. (The signed loss 1[final
right] - 1[cascade right] has the drop itself as its mean, but it lies in [-1, 1]: a Hoeffding
bound on it needs 4x the images one on a [0, 1] loss needs, and far more than the exact binomial
tail below at small rates. The cascade's fixes elsewhere do not buy harms here, as the point
estimate counts them too.)

The p-value. The harms k(t) = sum_i h_i(t) are Binomial(n, H(t)). For the null H0(t): H(t) > D,
    p(t) = P(Binomial(n, D) <= k(t))
is valid (P(p(t) <= a) <= a under H0(t)): the binomial CDF falls as the rate rises. This is the
exact binomial tail, which the Hoeffding-Bentkus p-value of the paper bounds (for a {0, 1} loss
it is smaller than both terms).

The path. Thresholds are tested along an order fixed before any data is seen: one threshold
shared by every exit, the grid `THRESHOLD_GRID` from the strictest (1.0: only certain images
leave) to the loosest (0.01), one path per exit rule. Loosening a shared threshold only lets
more images leave, earlier, so each step costs no more MACs than the one before (and usually
harms more). Fixed-sequence testing rejects H0(t1), H0(t2), ... at level a while p(t) <= a and
stops at the first that is not; rejecting any true null needs the first true null on the path to
be rejected, which happens with probability <= a (whatever the harms do along the path): so with
probability >= 1 - a every certified t has H(t) <= D. Each rule's path is tested at
a = R / (number of rules) (Bonferroni), so the guarantee holds for every certified (rule, t)
together, and the one chosen (the fewest mean MACs on validation, then the higher top-1) keeps
it. Per-exit threshold vectors are not on the path: ordering them would take the validation
data (or a split of it).

Too small a split. Where even the strictest thresholds are not certified, the answer is the
most cautious cascade (threshold 1.0, as an unmet `--max-drop` falls back to), the drop the
split does certify for it (the (1 - a) upper confidence bound of its harm rate), and the
validation size at which its observed harm rate would give p <= a.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlkd_cli.anytime.rules import EXIT_RULES, exits_taken
from mlkd_cli.anytime.thresholds import (
    THRESHOLD_GRID,
    HeadOutputs,
    OperatingPoint,
    evaluate_cascade,
)

# The path, strictest first: the grid loosened one step at a time.
CERTIFY_PATH = tuple(sorted(THRESHOLD_GRID, reverse=True))
# Validation sizes suggested are searched up to this many images (the search's memory and time
# stay small); beyond it the size is None and said as "more than".
MAX_SUGGESTED = 10**7


@dataclass(frozen=True)
class Certificate:
    """What `--risk` certified: the drop `bound` (top-1 points; `max_drop` where certified,
    else what the split certifies for the most cautious thresholds) at `risk`, from `images`
    validation images, and, where not certified, the size that would be (None: no size would,
    the most cautious thresholds already harm `max_drop` % of the split or more, or more than
    `MAX_SUGGESTED` would be needed)."""

    risk: float
    max_drop: float
    certified: bool
    bound: float
    images: int
    harm: float  # % of the split the chosen cascade gets wrong where the final head is right
    tested: int  # thresholds certified along the chosen rule's path
    images_needed: int | None = None

    def to_record(self) -> dict:
        """Plain types for JSON and the checkpoint's card."""
        return {
            "risk": self.risk,
            "max_drop": self.max_drop,
            "certified": self.certified,
            "bound": self.bound,
            "images": self.images,
            "harm": self.harm,
            "certified_steps": self.tested,
            "images_needed": self.images_needed,
            "method": "Learn-then-Test, exact binomial p-values, fixed sequence over shared "
            "thresholds from 1.0 down",
        }


def binomial_cdf(k: int, n: int, rate: float) -> float:
    """P(Binomial(n, rate) <= k), in float64 (log space, so large n stays exact enough)."""
    if k >= n or rate <= 0.0:
        return 1.0
    if k < 0 or rate >= 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(i + 1)
        - torch.lgamma(n - i + 1)
        + i * math.log(rate)
        + (n - i) * math.log1p(-rate)
    )
    return min(1.0, float(torch.logsumexp(log_pmf, dim=0).exp()))


def harm_upper_bound(harms: int, images: int, level: float) -> float:
    """The (1 - level) upper confidence bound of a harm rate from `harms` of `images`: the
    smallest rate whose binomial p-value for the observed count is at most `level`."""
    if images == 0:
        return 1.0
    low, high = harms / images, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if binomial_cdf(harms, images, middle) <= level:
            high = middle
        else:
            low = middle
    return high


def images_needed(rate: float, max_rate: float, level: float) -> int | None:
    """The fewest validation images at which an observed harm rate `rate` certifies `max_rate`
    at `level` (None where `rate` >= `max_rate`, when no size would, or above `MAX_SUGGESTED`)."""
    if rate >= max_rate or max_rate <= 0:
        return None

    def enough(n: int) -> bool:
        return binomial_cdf(math.floor(rate * n), n, max_rate) <= level

    low, high = 1, 2
    while not enough(high):
        low, high = high, high * 2
        if high > MAX_SUGGESTED:
            return None
    while high - low > 1:  # the smallest size that is enough (the floor makes it ragged)
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


@dataclass(frozen=True)
class _Step:
    """One step of a rule's path on the split: harms (final right, cascade wrong), hits, and
    the total MACs of its images."""

    harms: int
    hits: int
    macs: float


def _path_steps(heads: HeadOutputs, rule: str, cascade_macs: Sequence[int]) -> list[_Step]:
    """Each shared threshold of the path, in its order, on the split."""
    confidence = heads.confidence_of(rule)
    correct = heads.correct
    exits = heads.exit_count
    # (steps, images): the head each image leaves at, one row a threshold of the path
    taken = torch.stack([exits_taken(confidence, [limit] * exits) for limit in CERTIFY_PATH])
    hits = correct[taken, torch.arange(len(heads.labels))]
    harms = (correct[-1] & ~hits).sum(dim=1)
    macs = torch.tensor(list(cascade_macs), dtype=torch.float64)[taken].sum(dim=1)
    return [
        _Step(int(k), int(h), float(m))
        for k, h, m in zip(harms, hits.sum(dim=1), macs, strict=True)
    ]


def certified_steps(harms: Sequence[int], images: int, max_rate: float, level: float) -> int:
    """How many steps of the path fixed-sequence testing certifies: it stops at the first p-value
    above `level`."""
    steps = 0
    for k in harms:
        if binomial_cdf(k, images, max_rate) > level:
            break
        steps += 1
    return steps


def certify_operating_point(
    heads: HeadOutputs,
    cascade_macs: Sequence[int],
    plain_macs: int,
    *,
    max_drop: float,
    risk: float,
    rules: Sequence[str] = tuple(EXIT_RULES),
) -> tuple[OperatingPoint, Certificate]:
    """The cheapest thresholds certified to keep top-1 within `max_drop` points of the final
    head with probability >= 1 - `risk` (module docstring), over `rules`; where none is, the most
    cautious thresholds (`met` False) with what the split certifies and the size that would."""
    if not (0 < risk < 1) or max_drop <= 0:
        raise ValueError("risk must lie in (0, 1) and max_drop above 0")
    n = len(heads.labels)
    level = risk / len(rules)
    max_rate = max_drop / 100.0
    paths = {rule: _path_steps(heads, rule, cascade_macs) for rule in rules}
    found: list[tuple[str, int, int]] = []  # rule, certified position, the rule's steps
    for rule, path in paths.items():
        steps = certified_steps([step.harms for step in path], n, max_rate, level)
        found += [(rule, position, steps) for position in range(steps)]
    if found:  # the fewest MACs, then the most hits, on the split
        rule, position, steps = min(
            found, key=lambda f: (paths[f[0]][f[1]].macs, -paths[f[0]][f[1]].hits)
        )
        harm = 100.0 * paths[rule][position].harms / max(n, 1)
        return _point(heads, rule, position, cascade_macs, plain_macs, True), Certificate(
            risk, max_drop, True, max_drop, n, harm, steps
        )
    # Not even the most cautious cascade: what the split certifies for it (each rule's bound
    # holds at `level`, so the least of them at `risk`), and the size that would certify it.
    rule = min(rules, key=lambda r: paths[r][0].harms)
    harms_at = paths[rule][0].harms
    bound = 100.0 * harm_upper_bound(harms_at, n, level)
    needed = images_needed(harms_at / max(n, 1), max_rate, level)
    harm = 100.0 * harms_at / max(n, 1)
    return _point(heads, rule, 0, cascade_macs, plain_macs, False), Certificate(
        risk, max_drop, False, bound, n, harm, 0, needed
    )


def _point(
    heads: HeadOutputs,
    rule: str,
    position: int,
    cascade_macs: Sequence[int],
    plain_macs: int,
    met: bool,
) -> OperatingPoint:
    """The operating point at a step of the rule's path, with its figures on the split."""
    shared = [CERTIFY_PATH[position]] * heads.exit_count
    return OperatingPoint(
        rule, evaluate_cascade(heads, shared, cascade_macs, plain_macs, rule), met
    )
