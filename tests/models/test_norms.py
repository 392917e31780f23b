"""GroupNorm on channels-last CPU tensors, each pass in the layout that measured faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct
from torch import nn

from mlkd_cli.models import norms
from mlkd_cli.models.norms import FastGroupNorm, FastGroupNormAct, use_fast_group_norms

CL = torch.channels_last


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = (torch.randn(4, 16, 6, 6) * 3 + 2).to(dtype).contiguous(memory_format=CL)
    grad = torch.randn(4, 16, 6, 6).to(dtype).contiguous(memory_format=CL)
    return x, grad


@pytest.mark.parametrize("choice", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layout_choice_gives_pytorchs_group_norm(
    choice: tuple[bool, bool], dtype: torch.dtype
) -> None:
    # Forward in NCHW or channels_last, backward likewise: the values and gradients of
    # F.group_norm, and the input's gradient handed back channels-last.
    norm = nn.GroupNorm(8, 16)  # 2 channels a group, as BiT's 64-channel maps
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x, grad = _inputs(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = norms._GroupNormByLayout.apply(a, norm.weight, norm.bias, norm, choice)
    assert ours.is_contiguous(memory_format=CL) and ours.dtype == dtype
    ours.backward(grad)
    ours_grads = (a.grad, norm.weight.grad.clone(), norm.bias.grad.clone())
    norm.zero_grad()
    theirs = F.group_norm(b, 8, norm.weight, norm.bias, norm.eps)
    theirs.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(ours.float(), theirs.float(), atol=tol, rtol=tol)
    for mine, ref in zip(ours_grads, (b.grad, norm.weight.grad, norm.bias.grad), strict=True):
        assert torch.allclose(mine.float(), ref.float(), atol=tol * 4, rtol=tol)
    assert a.grad.is_contiguous(memory_format=CL)


def test_the_swap_keeps_parameters_and_leaves_other_calls_alone(monkeypatch) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), GroupNormAct(16, 8), nn.GroupNorm(8, 16), nn.BatchNorm2d(16)
    )
    keys = list(model.state_dict())
    assert use_fast_group_norms(model) == 2
    assert isinstance(model[1], FastGroupNormAct) and isinstance(model[2], FastGroupNorm)
    assert type(model[3]) is nn.BatchNorm2d
    assert list(model.state_dict()) == keys
    chosen = []
    monkeypatch.setattr(norms, "_choose", lambda x, norm: chosen.append(x.shape) or (True, True))
    monkeypatch.setattr(norms, "_CHOICES", {})
    x = torch.randn(2, 3, 8, 8)
    reference = nn.Sequential(nn.Conv2d(3, 16, 3), GroupNormAct(16, 8), nn.GroupNorm(8, 16))
    reference.load_state_dict(model[:3].state_dict())
    # NCHW input, and inference on channels-last input: PyTorch's own path, bit for bit.
    assert torch.equal(model[:3](x), reference(x))
    model.to(memory_format=CL)
    reference.to(memory_format=CL)
    with torch.no_grad():
        assert torch.equal(
            model[:3](x.contiguous(memory_format=CL)), reference(x.contiguous(memory_format=CL))
        )
    assert chosen == []
    # Training on channels-last input: one measurement a shape, then the remembered choice.
    out = model[:3](x.contiguous(memory_format=CL))
    out.sum().backward()
    model[:3](x.contiguous(memory_format=CL)).sum().backward()
    assert chosen == [torch.Size([2, 16, 6, 6])]  # both norms share the shape: timed once
    assert torch.allclose(out, reference(x), atol=1e-5)


def test_the_measurement_picks_the_faster_layout_per_pass(monkeypatch) -> None:
    # Each pass runs both ways and the faster is kept: here the NCHW forward and the
    # channels-last backward (timings in the order _choose takes them).
    timings = iter([1.0, 5.0, 5.0, 1.0])  # forward NCHW, forward CL, backward NCHW, backward CL
    ran = []
    monkeypatch.setattr(norms, "_seconds", lambda work: (ran.append(work()), next(timings))[1])
    x, _ = _inputs(torch.float32)
    assert norms._choose(x, nn.GroupNorm(8, 16)) == (True, False)
    assert len(ran) == 4  # every variant really ran


def test_a_real_measurement_then_training_matches_group_norm(monkeypatch) -> None:
    # No stand-ins: the first training call times both layouts for real, remembers the choice,
    # and the result is F.group_norm's whichever layout won.
    monkeypatch.setattr(norms, "_CHOICES", {})
    norm = FastGroupNormAct(16, 8)
    x, grad = _inputs(torch.float32)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = norm(a)
    ours.backward(grad)
    assert list(norms._CHOICES.values())[0] in {
        (f, g) for f in (False, True) for g in (False, True)
    }
    theirs = F.relu(F.group_norm(b, 8, norm.weight, norm.bias, norm.eps))
    theirs.backward(grad)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_timing_keeps_the_fastest_call(monkeypatch) -> None:
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 29.0, 30.0, 32.0, 40.0, 47.0])
    monkeypatch.setattr(norms.time, "perf_counter", lambda: next(clock))
    calls = []
    assert norms._seconds(lambda: calls.append(1)) == 1.0  # the calls took 5, 1, 9, 2, 7
    assert len(calls) == norms.TIMED_CALLS + 1  # one untimed first
