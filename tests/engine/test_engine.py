"""The epoch runner, evaluation, batch mixing, schedules, stop requests and the launcher, on tiny
models (checkpoint files: tests/core/test_checkpoint.py; the shard sampler: tests/data/)."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import RunStopped
from mlkd_cli.data.loaders import collate_readable
from mlkd_cli.engine import interrupt, loop
from mlkd_cli.engine.interrupt import StopRequest
from mlkd_cli.engine.launch import launch

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PRECISION = loop.Precision(torch.device("cpu"))


def test_evaluate_matches_a_direct_count() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    images, labels = torch.randn(23, 6), torch.randint(0, 4, (23,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    metrics = loop.evaluate(model, loader, CPU, PRECISION)
    logits = model(images)
    assert metrics["count"] == 23
    assert metrics["top1"] == pytest.approx(
        100 * (logits.argmax(1) == labels).float().mean().item()
    )
    assert metrics["nll"] == pytest.approx(
        nn.functional.cross_entropy(logits, labels).item(), rel=1e-6
    )
    assert metrics["top5"] == 100.0  # four classes: the label is always in the top five


def test_batch_mixer_handles_odd_batches_and_gives_distributions() -> None:
    mixer = loop.BatchMixer(num_classes=5, mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.1)
    images, targets, _ = mixer(torch.randn(7, 3, 8, 8), torch.randint(0, 5, (7,)))
    assert images.shape[0] == 6 and targets.shape == (6, 5)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    single, none, _ = mixer(torch.randn(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))
    assert single.shape[0] == 0 and none.shape == (0, 5)
    plain = loop.BatchMixer(num_classes=4, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.2)
    _, soft, lam = plain(torch.randn(3, 2), torch.tensor([0, 1, 3]))
    assert lam == 1.0
    assert soft[0].tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_batch_mixer_says_which_share_of_each_image_is_its_own(kind: str) -> None:
    """The λ returned is the one the images and targets were mixed with, the partner being the
    batch reversed: Mixup's blend weight, CutMix's share of pixels outside the pasted box."""
    alphas = (1.0, 0.0) if kind == "mixup" else (0.0, 1.0)
    mixer = loop.BatchMixer(num_classes=4, mixup_alpha=alphas[0], cutmix_alpha=alphas[1],
                            label_smoothing=0.0)  # fmt: skip
    seen = []
    for _ in range(20):
        original = torch.rand(6, 3, 16, 16) + 1.0  # no pixel equal across images
        labels = torch.tensor([0, 1, 2, 3, 0, 1])
        images, targets, lam = mixer(original.clone(), labels)
        seen.append(lam)
        expected = lam * nn.functional.one_hot(labels, 4) + (1 - lam) * nn.functional.one_hot(
            labels.flip(0), 4
        )
        assert torch.allclose(targets, expected.float())
        if kind == "mixup":
            assert torch.allclose(images, lam * original + (1 - lam) * original.flip(0), atol=1e-6)
        else:
            own = (images == original).float().mean().item()
            assert own == pytest.approx(lam, abs=1e-6)
    assert len(set(seen)) > 10 and all(0.0 <= lam <= 1.0 for lam in seen)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = loop.build_scheduler(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    rates = []
    for _ in range(100):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] < rates[5] < rates[9] <= 1.0
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert rates[-1] == pytest.approx(0.01, abs=1e-3)


def _one_epoch(model: nn.Module, batch_size: int, accum: int) -> list[float]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_readable)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = loop.build_scheduler(opt, total_steps=10, warmup_steps=0, min_lr_ratio=1.0)
    mixer = loop.BatchMixer(3, 0.0, 0.0, 0.0)
    result = loop.train_one_epoch(
        model,
        loader,
        len(loader),
        loop.cross_entropy_step,
        opt,
        sched,
        mixer,
        CPU,
        PRECISION,
        accum,
    )
    assert result["train_images"] == 16
    return [result["optimizer_steps"], *model.weight.detach().flatten().tolist()]


def test_gradient_accumulation_equals_the_large_batch() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 3)
    big = _one_epoch(copy.deepcopy(base), batch_size=8, accum=1)
    accumulated = _one_epoch(copy.deepcopy(base), batch_size=4, accum=2)
    assert big[0] == accumulated[0] == 2
    assert accumulated[1:] == pytest.approx(big[1:], abs=1e-6)


def test_short_final_accumulation_group_still_steps() -> None:
    torch.manual_seed(0)
    steps = _one_epoch(nn.Linear(6, 3), batch_size=4, accum=3)[0]
    assert steps == 2  # batches 1-3, then batch 4 alone


def test_stop_request_records_a_signal_and_a_second_ctrl_c_interrupts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.agreed(CPU) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler repeating itself: still just a request
        # The launcher's copy of the terminal's Ctrl-C arrives at once: the same request.
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGTERM
        monkeypatch.setattr(interrupt, "SAME_REQUEST_S", 0.0)  # a person's later second Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # handlers put back


def _out_of_memory(ctx: DistContext, payload: None) -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_batch_size_to_lower() -> None:
    with pytest.raises(RunStopped) as stopped:
        launch(_out_of_memory, None, 1, "cpu", memory_hint="lower --batch-size, now 256")
    message = str(stopped.value)
    assert "ran out of memory on rank 0" in message and "Tried to allocate 2.00 GiB" in message
    assert message.endswith("lower --batch-size, now 256")
