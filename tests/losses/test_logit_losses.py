"""The formulas of DKD and DIST, checked against independent computations, and `--loss`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_error_line, invoke_cli

from mlkd_cli.losses.dist import dist_terms
from mlkd_cli.losses.dkd import dkd_per_image, dkd_terms
from mlkd_cli.losses.heads import Head
from mlkd_cli.losses.kd import kd_terms
from mlkd_cli.losses.registry import LOSSES


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _softmax(z: list[float], temperature: float) -> list[float]:
    e = [math.exp(v / temperature) for v in z]
    return [v / sum(e) for v in e]


def test_dkd_on_a_three_class_example_by_hand() -> None:
    student, teacher, target, temperature = [1.0, 2.0, 0.5], [3.0, 0.0, -1.0], 0, 2.0
    ps, pt = _softmax(student, temperature), _softmax(teacher, temperature)
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    qs = [ps[1] / (1 - ps[0]), ps[2] / (1 - ps[0])]
    qt = [pt[1] / (1 - pt[0]), pt[2] / (1 - pt[0])]
    nckd = _kl(qt, qs)
    got_t, got_n = dkd_per_image(
        torch.tensor([student]), torch.tensor([teacher]), torch.tensor([target]), temperature
    )
    assert got_t.item() == pytest.approx(temperature**2 * tckd, rel=1e-5)
    assert got_n.item() == pytest.approx(temperature**2 * nckd, rel=1e-5)


def test_dkd_with_alpha_1_and_beta_1_minus_the_teachers_target_probability_is_hinton_kd() -> None:
    # The paper's identity, image by image: KD = TCKD + (1 − p_teacher,target) · NCKD.
    torch.manual_seed(0)
    student, teacher = torch.randn(64, 100) * 3, torch.randn(64, 100) * 3
    target = torch.randint(0, 100, (64,))
    for temperature in (1.0, 4.0):
        tckd, nckd = dkd_per_image(student, teacher, target, temperature)
        p_target = F.softmax(teacher / temperature, 1).gather(1, target[:, None]).squeeze(1)
        decoupled = (tckd + (1 - p_target) * nckd).mean()
        kd, _ = kd_terms(student, teacher, F.one_hot(target, 100).float(), temperature, False)
        assert decoupled.item() == pytest.approx(kd.item(), rel=1e-4)


def test_dkd_of_a_mixed_target_weighs_the_two_labels_by_their_shares() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    a, b = torch.randint(0, 10, (8,)), (torch.randint(1, 10, (8,)) + torch.arange(8)) % 10
    b = torch.where(a == b, (b + 1) % 10, b)
    lam = 0.7
    mixed = lam * F.one_hot(a, 10).float() + (1 - lam) * F.one_hot(b, 10).float()
    tckd, nckd = dkd_terms(student, teacher, mixed, 4.0)
    ta, na = dkd_per_image(student, teacher, a, 4.0)
    tb, nb = dkd_per_image(student, teacher, b, 4.0)
    assert tckd.item() == pytest.approx((lam * ta + (1 - lam) * tb).mean().item(), rel=1e-5)
    assert nckd.item() == pytest.approx((lam * na + (1 - lam) * nb).mean().item(), rel=1e-5)
    one_t, one_n = dkd_terms(student, teacher, F.one_hot(a, 10).float(), 4.0)
    assert one_t.item() == pytest.approx(ta.mean().item(), rel=1e-6)
    assert one_n.item() == pytest.approx(na.mean().item(), rel=1e-6)


def test_dist_terms_equal_a_direct_pearson_computation() -> None:
    torch.manual_seed(2)
    student, teacher = torch.randn(16, 12) * 2, torch.randn(16, 12) * 2
    for tau in (1.0, 3.0):
        inter, intra = dist_terms(student, teacher, tau)
        y_s = F.softmax(student.double() / tau, 1)
        y_t = F.softmax(teacher.double() / tau, 1)
        rows = [torch.corrcoef(torch.stack([y_s[i], y_t[i]]))[0, 1] for i in range(16)]
        cols = [torch.corrcoef(torch.stack([y_s[:, c], y_t[:, c]]))[0, 1] for c in range(12)]
        assert inter.item() == pytest.approx(
            tau**2 * (1 - torch.stack(rows).mean().item()), rel=1e-4
        )
        assert intra.item() == pytest.approx(
            tau**2 * (1 - torch.stack(cols).mean().item()), rel=1e-4
        )
    same_inter, same_intra = dist_terms(teacher, teacher, 1.0)
    assert same_inter.item() == pytest.approx(0.0, abs=1e-6)
    assert same_intra.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("which", ["dkd", "dist"])
def test_gradients_are_finite_in_bf16_autocast(which: str) -> None:
    torch.manual_seed(3)
    student = torch.nn.Linear(20, 10)
    inputs, teacher = torch.randn(32, 20), torch.randn(32, 10) * 5
    targets = F.one_hot(torch.randint(0, 10, (32,)), 10).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(inputs)
        assert logits.dtype == torch.bfloat16
        if which == "dkd":
            tckd, nckd = dkd_terms(logits, teacher, targets, 4.0)
            loss = tckd + 8 * nckd
        else:
            inter, intra = dist_terms(logits, teacher, 1.0)
            loss = inter + intra
    loss.backward()
    assert torch.isfinite(loss)
    assert all(
        torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in student.parameters()
    )


@pytest.mark.parametrize(
    ("loss", "terms"), [("dkd", ("tckd", "nckd")), ("dist", ("inter", "intra"))]
)
def test_distill_with_loss_logs_its_terms_and_trains_by_them(
    digits_teacher: Path, tmp_path: Path, loss: str, terms: tuple[str, str]
) -> None:
    result = invoke_cli(
        "distill", "-d", "digits", "-m", "test_resnet", "-c", digits_teacher, "--student",
        "test_resnet", "--img-size", "16", "-e", "2", "-b", "64", "--loss", loss, "-n", "s",
        "--output-dir", tmp_path, "-q", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = json.loads((tmp_path / "s_history.json").read_text())["epochs"]
    exits = sorted(k for k in rows[0] if k.startswith("exit") and k.endswith("_loss"))
    assert exits and all(set(terms) <= set(row) and "kd" not in row for row in rows)
    for row in rows:  # as in both papers, the terms add to a CE of weight 1; every head weighs 1
        final = row[terms[0]] + row[terms[1]] + row["ce"]
        assert row["train_loss"] == pytest.approx(final + sum(row[e] for e in exits), rel=1e-5)
    if loss == "dkd":  # 2 epochs: the warm-up (1/12 of the run) is over by the first epoch's end
        student = LOSSES["dkd"](4.0, 1.0, [])
        student.start_epoch(0, 24)
        assert student.warmup == pytest.approx(0.5)
        student.start_epoch(1, 24)
        assert student.warmup == 1.0


def test_an_unknown_loss_is_one_line_naming_the_choices(digits_teacher: Path) -> None:
    result = invoke_cli(
        "distill", "-d", "digits", "-m", "test_resnet", "-c", digits_teacher, "--loss", "l2"
    )
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--loss 'l2'", "dkd", "dist", "kd")


def test_dkd_under_a_label_budget_never_reads_a_hidden_label() -> None:
    torch.manual_seed(4)
    loss = LOSSES["dkd"](4.0, 1.0, [])
    assert loss.reads_labels and not LOSSES["kd"](4.0, 1.0, []).reads_labels
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labelled = torch.tensor([True, False, True, False, False, True])
    labels = torch.randint(0, 5, (6,))
    other = torch.where(labelled, labels, (labels + 1) % 5)  # the hidden labels changed
    first = loss.distill_terms(Head(student, teacher, F.one_hot(labels, 5).float(), labelled))
    second = loss.distill_terms(Head(student, teacher, F.one_hot(other, 5).float(), labelled))
    assert all(torch.equal(first[k], second[k]) for k in ("tckd", "nckd"))
    # The hidden images take the teacher's top class as their target.
    guessed = torch.where(labelled, labels, teacher.argmax(1))
    by_hand = dkd_terms(student, teacher, F.one_hot(guessed, 5).float(), 4.0)
    assert first["tckd"].item() == pytest.approx(by_hand[0].item(), rel=1e-6)
    assert first["nckd"].item() == pytest.approx(8.0 * by_hand[1].item(), rel=1e-6)


def test_dkd_and_dist_add_to_cross_entropy_and_refuse_alpha(digits_teacher: Path) -> None:
    torch.manual_seed(5)
    logits, teacher = torch.randn(8, 5), torch.randn(8, 5)
    targets = F.one_hot(torch.randint(0, 5, (8,)), 5).float()
    ce = F.cross_entropy(logits, targets).item()
    for name in ("dkd", "dist"):
        loss = LOSSES[name](4.0, 0.9, [], ce_weight=0.5)  # α is not DKD's or DIST's mix
        total, parts = loss.head_loss(Head(logits, teacher, targets))
        terms = sum(v.item() for k, v in parts.items() if k != "ce")
        assert total.item() == pytest.approx(terms + 0.5 * ce, rel=1e-6)
        assert not LOSSES[name](4.0, 0.9, [], ce_weight=0.0).mixing[1]
    result = invoke_cli(
        "distill", "-d", "digits", "-m", "test_resnet", "-c", digits_teacher, "--loss", "dkd",
        "--alpha", "0.5",
    )  # fmt: skip
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--alpha", "--loss dkd", "ce_weight")
