"""Hinton KD (`mlkd_cli/losses/kd.py`) and the heads' weighing and naming it shares with every
loss (`mlkd_cli/losses/heads.py`), against the formula written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlkd_cli.losses.kd import MultiExitKDLoss, kd_loss


def test_kd_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.softmax(torch.randn(6, 5), 1)
    T = 4.0
    kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    ce = -(y * F.log_softmax(s, 1)).sum(1).mean()
    assert kd_loss(s, t, y, T, 1.0) == pytest.approx(float(T * T * kl), rel=1e-5)
    assert kd_loss(s, t, y, T, 0.0) == pytest.approx(float(ce), rel=1e-5)
    assert kd_loss(s, t, y, T, 0.3) == pytest.approx(float(0.3 * T * T * kl + 0.7 * ce), rel=1e-5)
    assert float(kd_loss(t, t, y, T, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_multi_exit_loss_weights_each_head() -> None:
    torch.manual_seed(0)
    t, y = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    heads = [torch.randn(4, 3) for _ in range(3)]
    loss = MultiExitKDLoss(temperature=2.0, alpha=1.0, exit_weights=[0.5, 0.0])
    expected = kd_loss(heads[0], t, y, 2.0, 1.0) + 0.5 * kd_loss(heads[1], t, y, 2.0, 1.0)
    assert float(loss(heads, t, y)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError):
        loss(heads[:2], t, y)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_named_losses_add_up_to_the_loss(alpha: float) -> None:
    torch.manual_seed(0)
    t, y = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    heads = [torch.randn(4, 3) for _ in range(3)]
    loss = MultiExitKDLoss(temperature=3.0, alpha=alpha, exit_weights=[0.5, 2.0])
    parts = loss.named(heads, t, y)
    expected = {"loss", "kd", "exit1_loss", "exit2_loss"} | ({"ce"} if alpha < 1 else set())
    assert set(parts) == expected
    final = alpha * parts["kd"] + (1 - alpha) * parts.get("ce", 0.0)
    assert float(final) == pytest.approx(float(kd_loss(heads[0], t, y, 3.0, alpha)), rel=1e-6)
    assert float(parts["exit1_loss"]) == pytest.approx(
        float(kd_loss(heads[1], t, y, 3.0, alpha)), rel=1e-6
    )
    total = final + 0.5 * parts["exit1_loss"] + 2.0 * parts["exit2_loss"]
    assert float(parts["loss"]) == pytest.approx(float(total), rel=1e-6)
    assert float(loss(heads, t, y)) == float(parts["loss"])
