"""Replaying a soft-label store as targets (`mlkd_cli/data/replay.py`): a batch's rows in its
images' epoch views, and a Mixup/CutMix image's target blended from its two views' stored
outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlkd_cli.data.replay import STORE_FILL, mixed_teacher_logits, replay_tables, stored_logits
from mlkd_cli.losses.kd import kd_terms


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _softmax(z: list[float], temperature: float) -> list[float]:
    e = [math.exp(v / temperature) for v in z]
    return [v / sum(e) for v in e]


def test_a_stored_mixup_target_is_the_two_distributions_blended_by_the_images_share() -> None:
    """From a store, a mixed image learns λ·p(own view) + (1 − λ)·p(partner's), partner = the
    batch reversed, at the loss's temperature; classes outside a stored top-k (-1e4) stay 0."""
    torch.manual_seed(0)
    logits = torch.randn(6, 7) * 3
    logits[:, 5:] = -1e4  # outside a stored top-5
    for temperature in (1.0, 4.0):
        p = F.softmax(logits / temperature, dim=1)
        for lam in (0.0, 0.3, 0.999):
            mixed = mixed_teacher_logits(logits, lam, temperature)
            assert torch.isfinite(mixed).all()
            got = F.softmax(mixed / temperature, dim=1)
            assert torch.allclose(got, lam * p + (1 - lam) * p.flip(0), atol=1e-6)
            assert got[:, 5:].max() < 1e-30
        assert mixed_teacher_logits(logits, 1.0, temperature) is logits
    # KD against it is the KL to the blend, computed by hand for one image.
    student = torch.randn(6, 7)
    mixed = mixed_teacher_logits(logits, 0.3, 4.0)
    kd, _ = kd_terms(student[:1], mixed[:1], torch.zeros(1, 7), 4.0, with_ce=False)
    pt = (0.3 * F.softmax(logits[0] / 4, 0) + 0.7 * F.softmax(logits[5] / 4, 0)).tolist()
    expected = 16 * _kl(pt, _softmax(student[0].tolist(), 4.0))
    assert kd.item() == pytest.approx(expected, rel=1e-4)


def test_a_batch_reads_its_images_stored_views_whole_or_top_k() -> None:
    """`stored_logits` gathers each image's row in its epoch view: from a store of every class
    (put in class order once by `replay_tables`) and from its top-k (the rest at STORE_FILL),
    the same logits where the top-k holds them."""
    torch.manual_seed(0)
    images, views, classes = 5, 3, 6
    full = torch.randn(images, views, classes)
    order = torch.stack([torch.randperm(classes) for _ in range(images * views)])
    order = order.view(images, views, classes)
    stored = full.gather(2, order)  # as a store keeps them: classes in its own order
    every, none = replay_tables(stored.half(), order.short(), classes, torch.device("cpu"))
    assert none is None
    epoch_views = torch.tensor([2, 0, 1, 1, 0])
    indices = torch.tensor([3, 0, 4])
    whole = stored_logits(every, None, epoch_views, indices, classes)
    assert torch.equal(whole, full[indices, epoch_views[indices]].half().float())
    top, which = replay_tables(
        stored[..., :2].half(), order[..., :2].short(), classes, every.device
    )
    assert which is not None
    part = stored_logits(top, which, epoch_views, indices, classes)
    kept = order[indices, epoch_views[indices], :2].long()
    assert torch.equal(part.gather(1, kept), whole.gather(1, kept))
    assert (part == STORE_FILL).sum() == len(indices) * (classes - 2)
