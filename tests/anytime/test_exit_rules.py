"""Exit rules and operating points on constructed logits whose answers are known by hand:
each rule's confidence, thresholds for a top-1 bound or a compute budget, the best rule, the
accuracy-against-MACs frontier."""

from __future__ import annotations

import math

import pytest
import torch

from mlkd_cli.anytime.rules import (
    EXIT_RULES,
    ExitRule,
    cascade_from_outputs,
    check_rule,
    exit_confidence,
)
from mlkd_cli.anytime.thresholds import (
    HeadOutputs,
    choose_operating_point,
    choose_thresholds,
    evaluate_cascade,
    frontier,
)
from mlkd_cli.core.errors import UserError


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is `probs` (row by row)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_each_rule_measures_what_it_says() -> None:
    p = [0.5, 0.3, 0.2]
    logits = _logits([p])
    entropy = -sum(v * math.log(v) for v in p)
    assert exit_confidence(logits, "max_softmax").item() == pytest.approx(0.5, abs=1e-6)
    assert exit_confidence(logits, "margin").item() == pytest.approx(0.2, abs=1e-6)
    assert exit_confidence(logits, "entropy").item() == pytest.approx(
        1 - entropy / math.log(3), abs=1e-6
    )
    sure = _logits([[1.0 - 2e-9, 1e-9, 1e-9]])
    flat = torch.zeros(1, 3)
    for rule in ("max_softmax", "margin", "entropy"):
        assert exit_confidence(sure, rule).item() == pytest.approx(1.0, abs=1e-6)
    assert exit_confidence(flat, "margin").item() == pytest.approx(0.0, abs=1e-6)
    assert exit_confidence(flat, "entropy").item() == pytest.approx(0.0, abs=1e-6)


def _two_heads(exit_probs: list[list[float]], labels: list[int]) -> HeadOutputs:
    """One exit with these probabilities and a final head right on every image."""
    exit_logits = _logits(exit_probs)
    final = torch.nn.functional.one_hot(torch.tensor(labels), len(exit_probs[0])).float() * 20
    return HeadOutputs(torch.stack([exit_logits, final]), torch.tensor(labels))


def _budget_case() -> HeadOutputs:
    # 100 images, label 0. At the exit: 60 sure and right (0.95), 20 at 0.75 of which 10 right,
    # 20 at 0.55 and wrong.
    probs = [[0.95, 0.03, 0.02]] * 60
    probs += [[0.75, 0.2, 0.05]] * 10 + [[0.2, 0.75, 0.05]] * 10
    probs += [[0.3, 0.55, 0.15]] * 20
    return _two_heads(probs, [0] * 100)


def test_a_budget_takes_the_most_accurate_thresholds_that_fit_it() -> None:
    heads, costs, plain = _budget_case(), [10, 110], 100
    # Half the plain model: 10 f + 110 (1 - f) <= 50 needs 60 % to leave at the exit; only the
    # 60 sure images leaving keeps every answer right.
    half = choose_operating_point(heads, costs, plain, budget=0.5, rules=["max_softmax"])
    assert half.met and 0.75 < half.result.thresholds[0] <= 0.95
    assert (half.result.top1, half.result.macs) == (100.0, 50.0)
    # 40 %: 70 % must leave, so the 0.75 images leave too (10 of them wrong), not the 0.55 ones.
    tight = choose_thresholds(heads, costs, max_macs=40.0)
    assert tight is not None and 0.55 < tight[0] <= 0.75
    result = evaluate_cascade(heads, tight, costs, plain)
    assert (result.top1, result.macs) == (90.0, 30.0)
    # 5 %: not even the exit alone fits; the cheapest cascade, flagged.
    assert choose_thresholds(heads, costs, max_macs=5.0) is None
    none = choose_operating_point(heads, costs, plain, budget=0.05, rules=["max_softmax"])
    assert not none.met and none.result.shares[0] == 100.0


def test_the_rule_that_tells_right_from_wrong_is_chosen() -> None:
    # Right at the exit: (0.6, 0.2, 0.2), margin 0.4. Wrong: (0.62, 0.37, 0.01), margin 0.25 but
    # a higher top probability: no top-probability threshold lets the right ones leave alone.
    probs = [[0.6, 0.2, 0.2]] * 50 + [[0.37, 0.62, 0.01]] * 50
    heads = _two_heads(probs, [0] * 100)
    costs, plain = [10, 110], 100
    chosen = choose_operating_point(heads, costs, plain, max_drop=0.0)
    assert chosen.rule == "margin" and chosen.met
    assert 0.25 < chosen.result.thresholds[0] <= 0.4
    assert chosen.result.top1 == 100.0 and chosen.result.shares[0] == 50.0
    softmax_only = choose_operating_point(heads, costs, plain, max_drop=0.0, rules=["max_softmax"])
    assert softmax_only.result.shares[0] == 0.0  # nobody may leave: 110 MACs each
    assert chosen.result.macs < softmax_only.result.macs


def test_the_frontier_rises_with_its_cost_and_each_point_is_a_real_cascade() -> None:
    heads, costs, plain = _budget_case(), [10, 110], 100
    for rule in ("max_softmax", "margin", "entropy"):
        points = frontier(heads, costs, plain, rule)
        assert len(points) >= 2
        for cheaper, dearer in zip(points, points[1:], strict=False):
            assert cheaper.macs <= dearer.macs and cheaper.top1 < dearer.top1
        for point in points:
            again = evaluate_cascade(heads, point.thresholds, costs, plain, rule)
            assert (again.top1, again.macs) == (point.top1, point.macs)
    top = frontier(heads, costs, plain, "max_softmax")
    assert (top[0].top1, top[-1].top1) == (70.0, 100.0)


def test_a_rule_added_to_the_registry_is_refused_nowhere_and_decides_every_cascade(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new exit rule is one function and one registry line: the flag check, the confidence,
    the decision on an export's outputs and the threshold search all find it there."""
    with pytest.raises(UserError, match="--exit-rule must be one of"):
        check_rule("second_class")
    # Confidence: the second class's probability (a rule no built-in one equals).
    second = ExitRule("the second class's probability", lambda probs: probs[..., 1])
    monkeypatch.setitem(EXIT_RULES, "second_class", second)
    assert check_rule("second_class") == "second_class"
    assert str(EXIT_RULES["second_class"]) == "the second class's probability"  # as captioned
    exit_logits = _logits([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    assert exit_confidence(exit_logits, "second_class").tolist() == pytest.approx([0.8, 0.1])
    final = torch.zeros(2, 3)
    _, taken = cascade_from_outputs([final, exit_logits], [0.5], "second_class")
    assert taken.tolist() == [0, 1]  # the first image leaves at the exit, the second runs on
    _, taken = cascade_from_outputs([final, exit_logits], [0.5], "max_softmax")
    assert taken.tolist() == [0, 0]
    # Label 1: the exit is right where it is sure of class 1, wrong where it is as sure of class
    # 0. Only the new rule tells the two apart, so only it lets images leave without a loss.
    heads = _two_heads([[0.1, 0.8, 0.1]] * 6 + [[0.8, 0.1, 0.1]] * 4, [1] * 10)
    point = choose_operating_point(heads, [10, 100], 100, max_drop=0.0, rules=list(EXIT_RULES))
    assert point.met and point.rule == "second_class"
    assert point.result.shares == pytest.approx((60.0, 40.0)) and point.result.top1 == 100.0
