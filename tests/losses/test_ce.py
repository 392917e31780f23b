"""Cross-entropy against probability targets (`mlkd_cli/losses/ce.py`), and under a label
budget: the mean over the images whose labels may be used."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkd_cli.losses.ce import soft_cross_entropy
from mlkd_cli.losses.kd import kd_terms


def test_ce_under_a_label_budget_is_the_mean_over_the_labelled_images_only() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    targets = F.one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), 4).float()
    labelled = torch.tensor([True, False, True, False, False, True])
    kd, ce = kd_terms(student, teacher, targets, 4.0, labelled=labelled)
    expected = F.cross_entropy(student[labelled], targets[labelled])
    torch.testing.assert_close(ce, expected)
    # The KD term needs no label: every image counts, as without a budget.
    torch.testing.assert_close(kd, kd_terms(student, teacher, targets, 4.0)[0])
    _, none = kd_terms(student, teacher, targets, 4.0, labelled=torch.zeros(6, dtype=torch.bool))
    assert float(none) == 0.0  # a batch with no labelled image adds no CE (and no NaN)


def test_soft_cross_entropy_is_the_mean_of_minus_target_times_log_probability_in_fp32() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 7) * 4
    targets = torch.softmax(torch.randn(5, 7), 1)
    by_hand = -(targets * F.log_softmax(logits.double(), 1)).sum(1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, targets).double(), by_hand)
    # bf16 logits are computed in fp32, and every image labelled is the plain mean.
    half = soft_cross_entropy(logits.bfloat16(), targets)
    assert half.dtype == torch.float32
    every = soft_cross_entropy(logits, targets, torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(every, soft_cross_entropy(logits, targets))
