"""Thresholds with a guarantee (`--risk`): the certified drop holds on fresh draws in at least
1 - R of the validation splits, a split too small says so with a size that would do, and the
command takes the flag as it takes the other early-exit flags."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli.anytime.certify import (
    CERTIFY_PATH,
    _path_steps,
    binomial_cdf,
    certify_operating_point,
    images_needed,
)
from mlkd_cli.anytime.rules import exits_taken
from mlkd_cli.anytime.thresholds import HeadOutputs, choose_operating_point
from mlkd_cli.core.checkpoint import ModelCard, load_checkpoint, save_exits_model
from mlkd_cli.data.registry import load_splits
from mlkd_cli.models.exits import exits_record, load_exits_checkpoint
from mlkd_cli.models.student import MultiExitStudent
from mlkd_cli.passes.logits import card_image_config, split_dataset

CLASSES = 10
# The exit's confidence takes values on a lattice in [0.2, 1) whose points lie at least 1.5e-4
# from every threshold of the path, so no CPU's last bit of softmax decides where an image
# leaves. The exit is right with probability equal to its confidence; the final head is right
# where the exit is, and on a share RESCUED of the rest. The cascade then never fixes what the
# final head gets wrong, so its drop is exactly its harm rate, the quantity certified: the
# simulation tests the bound where it is tight.
LATTICE = torch.tensor([0.2 + 0.0005 * (j + 0.5) for j in range(1600)], dtype=torch.float64)
RESCUED = 0.9


def _exact_cdf(k: int, n: int, rate: float) -> float:
    """P(Binomial(n, rate) <= k) in exact rational arithmetic, as the module's reference."""
    p = Fraction(rate)
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


def _true_drop(threshold: float) -> float:
    """The top-1 drop of the constructed cascade against the final head at a shared threshold,
    in closed form over the lattice: an image of confidence c >= t leaves at the exit, right
    with probability c, where the final head is right with c + (1 - c) RESCUED."""
    leaving = threshold <= LATTICE
    return float((RESCUED * (1 - LATTICE) * leaving).sum() / len(LATTICE))


def _logits(confidence: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax puts `confidence` on `predicted` and the rest evenly elsewhere."""
    rest = (1 - confidence) / (CLASSES - 1)
    probs = rest[:, None].expand(-1, CLASSES).clone()
    probs[torch.arange(len(predicted)), predicted] = confidence
    return probs.log().float()


def _draw(images: int, generator: torch.Generator) -> HeadOutputs:
    """A validation split of the constructed heads (one exit, then the final head)."""
    labels = torch.randint(CLASSES, (images,), generator=generator)
    confidence = LATTICE[torch.randint(len(LATTICE), (images,), generator=generator)]
    exit_right = torch.rand(images, generator=generator, dtype=torch.float64) < confidence
    final_right = exit_right | (torch.rand(images, generator=generator) < RESCUED)
    wrong = (labels + 1) % CLASSES
    exit_logits = _logits(confidence, torch.where(exit_right, labels, wrong))
    final_confidence = torch.full((images,), 0.9, dtype=torch.float64)
    final_logits = _logits(final_confidence, torch.where(final_right, labels, wrong))
    return HeadOutputs(torch.stack([exit_logits, final_logits]), labels)


def _heads_with_harms(images: int, harms: int) -> HeadOutputs:
    """`images` images, each leaving at the exit whatever the threshold (its softmax rounds to
    exactly 1.0); the final head right on all, the exit wrong on the first `harms`."""
    labels = torch.arange(images) % CLASSES
    predicted = labels.clone()
    predicted[:harms] = (labels[:harms] + 1) % CLASSES
    sure = 30.0 * torch.stack([torch.eye(CLASSES)[predicted], torch.eye(CLASSES)[labels]])
    return HeadOutputs(sure, labels)


def test_binomial_tail_matches_exact_arithmetic() -> None:
    for k, n, rate in [(0, 144, 0.01), (5, 100, 0.05), (35, 2000, 0.022), (90, 300, 0.25)]:
        assert binomial_cdf(k, n, rate) == pytest.approx(_exact_cdf(k, n, rate), rel=1e-9)


@pytest.mark.parametrize("rule", ["max_softmax", "margin", "entropy"])
def test_every_step_of_the_path_is_the_cascade_the_search_scores(rule: str) -> None:
    # Three exits, random heads: each step's hits, harms and MACs (all steps computed at once)
    # are the cascade's at that shared threshold, image by image.
    generator = torch.Generator().manual_seed(7)
    heads = HeadOutputs(
        3 * torch.randn(4, 300, CLASSES, generator=generator),
        torch.randint(CLASSES, (300,), generator=generator),
    )
    macs = [1, 2, 3, 10]
    correct = heads.correct
    for step, threshold in zip(_path_steps(heads, rule, macs), CERTIFY_PATH, strict=True):
        taken = exits_taken(heads.confidence_of(rule), [threshold] * 3)
        hits = correct[taken, torch.arange(300)]
        assert step.hits == int(hits.sum())
        assert step.harms == int((correct[-1] & ~hits).sum())
        assert step.macs == float(torch.tensor(macs)[taken].sum())


@pytest.mark.parametrize(("max_drop", "risk"), [(2.2, 0.1), (0.55, 0.05)])
def test_the_certified_drop_holds_on_fresh_draws_in_at_least_1_minus_r_of_them(
    max_drop: float, risk: float
) -> None:
    draws, images, compared = 200, 2000, 60
    generator = torch.Generator().manual_seed(35)
    chosen, estimated = [], []
    for draw in range(draws):
        heads = _draw(images, generator)
        point, certificate = certify_operating_point(
            heads, [1, 2], 2, max_drop=max_drop, risk=risk, rules=["max_softmax"]
        )
        assert certificate.images == images and certificate.certified == point.met
        chosen.append(point.result.thresholds[0])
        if draw < compared:  # today's point estimate, on the first draws
            naive = choose_operating_point(
                heads, [1, 2], 2, max_drop=max_drop, rules=["max_softmax"]
            )
            estimated.append(naive.result.thresholds[0])
    limit = max_drop / 100
    failed = sum(_true_drop(t) > limit for t in chosen)
    # Monte-Carlo slack: were each draw to fail with probability exactly `risk`, more than
    # `allowed` of the 200 would fail with probability under 0.1 %.
    allowed = next(m for m in range(draws) if 1 - _exact_cdf(m, draws, risk) < 1e-3)
    assert failed <= allowed, (failed, allowed)
    # Not vacuous: the certified thresholds save compute on most draws (a path step below 1.0),
    # and the point estimate on the same draws misses its bound far more often than `risk`.
    assert sum(t < 1.0 for t in chosen) >= 0.9 * draws
    assert sum(_true_drop(t) > limit for t in estimated) >= 3 * risk * compared


def test_a_split_too_small_says_what_it_certifies_and_what_size_would() -> None:
    # No harm at all on 144 images: a 1-point drop at risk 0.1 still needs 0.99^n <= 0.1.
    point, certificate = certify_operating_point(
        _heads_with_harms(144, 0), [1, 2], 2, max_drop=1.0, risk=0.1, rules=["max_softmax"]
    )
    assert not certificate.certified and not point.met
    assert point.result.thresholds == (CERTIFY_PATH[0],) == (1.0,)
    assert certificate.bound == pytest.approx(100 * (1 - 0.1 ** (1 / 144)), rel=1e-6)
    assert certificate.images_needed == math.ceil(math.log(0.1) / math.log(0.99)) == 230
    for images, certified in [(229, False), (230, True)]:
        _, again = certify_operating_point(
            _heads_with_harms(images, 0), [1, 2], 2, max_drop=1.0, risk=0.1, rules=["max_softmax"]
        )
        assert again.certified == certified
    # With harms, the size suggested is where the same harm rate would be certified, and no
    # smaller one would.
    rate = 2 / 250
    needed = images_needed(rate, 0.02, 0.1)
    assert needed is not None
    for images, certified in [(needed - 1, False), (needed, True)]:
        heads = _heads_with_harms(images, math.floor(rate * images))
        _, again = certify_operating_point(
            heads, [1, 2], 2, max_drop=2.0, risk=0.1, rules=["max_softmax"]
        )
        assert again.certified == certified
    # A split whose safest cascade already harms more than the bound: no size would do.
    _, hopeless = certify_operating_point(
        _heads_with_harms(500, 50), [1, 2], 2, max_drop=2.0, risk=0.1, rules=["max_softmax"]
    )
    assert not hopeless.certified and hopeless.images_needed is None


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def untrained_exits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained test_convnext digits student with exits, as mlkd distill writes it (read-only:
    copy it)."""
    torch.manual_seed(0)
    student = MultiExitStudent(
        timm.create_model("test_convnext", num_classes=CLASSES), "test_convnext", [0, 1, 2], 10, 32
    )
    card = ModelCard(
        "test_convnext", CLASSES, [str(d) for d in range(CLASSES)], "digits", 32, 1.0,
        [0.5] * 3, [0.5] * 3,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("certify") / "s_exits.pth"
    save_exits_model(path, student, card, exits_record(student, [0, 1, 2], 32), 1, {})
    return path


@pytest.fixture
def exits_copy(untrained_exits: Path, tmp_path: Path) -> Path:
    shutil.copy(untrained_exits, tmp_path / "s_exits.pth")
    return tmp_path / "s_exits.pth"


EVAL = ("--split", "val", "--early-exit", "--timing-images", "0", "--precision", "fp32")


def test_a_small_split_gets_one_line_with_the_size_that_would_certify(exits_copy: Path) -> None:
    result = invoke_cli(
        "eval", exits_copy, *EVAL, "--exit-rule", "max_softmax", "--max-drop", "1",
        "--risk", "0.1", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: --risk 0.1: 144 validation images")
    assert "certified to 1.59 points" in lines[0] and "about 230 would" in lines[0]
    chosen = json.loads(result.stdout)["chosen"]
    assert chosen["values"] == [1.0, 1.0, 1.0] and not chosen["met"]
    certificate = chosen["certificate"]
    assert not certificate["certified"] and certificate["images_needed"] == 230
    assert load_checkpoint(exits_copy)["exits"]["thresholds"] == chosen


def test_a_certified_choice_is_reported_saved_and_holds_up(exits_copy: Path) -> None:
    result = invoke_cli("eval", exits_copy, *EVAL, "--max-drop", "30", "--risk", "0.1")
    assert result.exit_code == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "certified: on new images top-1 stays within 30 points of the final head's" in said
    assert "with probability >= 90 % (risk 0.1; 144 validation images" in said
    chosen = load_checkpoint(exits_copy)["exits"]["thresholds"]
    certificate = chosen["certificate"]
    assert chosen["met"] and chosen["risk"] == 0.1 and certificate["certified"]
    assert certificate["bound"] == 30.0 and certificate["images"] == 144
    # Recomputed from the student's own heads on the split: the harms the certificate counts,
    # and their exact binomial p-value under H0 (harm rate 30 %) within the Bonferroni level.
    loaded = load_exits_checkpoint(exits_copy)
    splits = load_splits("digits", Path("data"), False, 0.1)
    dataset = split_dataset(splits, "val", card_image_config(loaded.card))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        heads = HeadOutputs.from_logits(torch.stack(loaded.student(images)), labels)
    taken = exits_taken(heads.confidence_of(chosen["rule"]), chosen["values"])
    correct = heads.correct
    harms = int((correct[-1] & ~correct[taken, torch.arange(len(labels))]).sum())
    assert certificate["harm"] == pytest.approx(100 * harms / 144)
    assert _exact_cdf(harms, 144, 0.3) <= 0.1 / 3


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--risk", "0"), "must lie strictly between 0 and 1, not 0"),
        (("--risk", "1"), "must lie strictly between 0 and 1, not 1"),
        (("--risk", "-0.1"), "not -0.1"),
        (("--risk", "nan"), "not nan"),
        (("--risk", "0.1", "--budget", "0.5"), "pass --max-drop, not --budget"),
        (("--risk", "0.1", "--max-drop", "0"), "pass --max-drop above 0"),
    ],
)
def test_bad_risk_is_one_line_and_writes_nothing(
    exits_copy: Path, args: tuple[str, ...], fragment: str
) -> None:
    before = exits_copy.read_bytes()
    result = invoke_cli("eval", exits_copy, *EVAL, *args)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--risk", fragment)
    assert exits_copy.read_bytes() == before


def test_risk_without_early_exit_is_refused(exits_copy: Path) -> None:
    result = invoke_cli("eval", exits_copy, "--split", "val", "--risk", "0.1")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--risk certifies", "add --early-exit")
