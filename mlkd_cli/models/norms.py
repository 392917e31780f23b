"""GroupNorm on channels-last CPU tensors, each pass in the layout that measures faster.

PyTorch's channels-last GroupNorm kernels on a CPU are slow when a group holds few channels —
BiT's ResNet-v2 has 32 groups, so its 64- to 256-channel maps have 2 to 8 channels a group. At
batch 32, bf16, the backward on a 64-channel 56 px map took 40 ms against 7 ms for copying to
NCHW, running PyTorch's NCHW kernel and copying back (BENCHMARKS.md); that is what kept BiT
students out of channels_last, whose convolutions run 2-3x faster there. Which pass gains
depends on the shape and on the machine's caches (the copies of a large map cost more than they
save), so for each new shape the forward and the backward are timed both ways, once a process,
and the faster is kept. The arithmetic is PyTorch's own GroupNorm in either layout; parameters
and state-dict keys are untouched. Only training on a CPU takes this path.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct
from torch import nn

# Channels per group above which channels-last GroupNorm is never slow enough to pay for copies.
MAX_GROUP_CHANNELS = 8
# Timed calls per pass and layout when a shape is first met (after one untimed call).
TIMED_CALLS = 5
_CL = torch.channels_last
# (shape, dtype, groups) -> (forward in NCHW, backward in NCHW)
_CHOICES: dict[tuple[Any, ...], tuple[bool, bool]] = {}


def _forward(x: torch.Tensor, norm: nn.GroupNorm, nchw: bool) -> tuple[torch.Tensor, ...]:
    n, c = x.shape[:2]
    source = x.contiguous() if nchw else x
    out, mean, rstd = torch.ops.aten.native_group_norm(
        source, norm.weight, norm.bias, n, c, x.numel() // (n * c), norm.num_groups, norm.eps
    )
    return (out.contiguous(memory_format=_CL) if nchw else out), source, mean, rstd


def _backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    groups: int,
    nchw: bool,
    wanted: list[bool],
) -> tuple[torch.Tensor | None, ...]:
    n, c = x.shape[:2]
    fmt = torch.contiguous_format if nchw else _CL
    dx, dw, db = torch.ops.aten.native_group_norm_backward(
        grad.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), mean, rstd, weight,
        n, c, x.numel() // (n * c), groups, wanted,
    )  # fmt: skip
    if dx is not None:  # the layout the layers below run in (a no-op when already so)
        dx = dx.contiguous(memory_format=_CL)
    return dx, dw, db


def _seconds(work: Any) -> float:
    """The fastest of TIMED_CALLS calls (after an untimed one): a busy machine only adds time."""
    work()  # untimed: allocation
    best = float("inf")
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def _choose(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[bool, bool]:
    """Time each pass of `norm` on random data shaped like `x` in both layouts."""
    wanted = [True, norm.weight is not None, norm.bias is not None]
    with torch.no_grad():
        sample = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=_CL)
        grad = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=_CL)
        _, _, mean, rstd = _forward(sample, norm, False)

        def forward(nchw: bool) -> float:
            return _seconds(lambda: _forward(sample, norm, nchw))

        def backward(nchw: bool) -> float:
            return _seconds(
                lambda: _backward(
                    grad, sample, mean, rstd, norm.weight, norm.num_groups, nchw, wanted
                )
            )

        return forward(True) < forward(False), backward(True) < backward(False)


class _GroupNormByLayout(torch.autograd.Function):
    """GroupNorm of a channels-last tensor, each pass in the layout chosen for its shape."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, norm: nn.GroupNorm,
                choice: tuple[bool, bool]) -> torch.Tensor:  # fmt: skip
        out, source, mean, rstd = _forward(x, norm, choice[0])
        ctx.save_for_backward(source, weight, mean, rstd)
        ctx.groups, ctx.nchw = norm.num_groups, choice[1]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        source, weight, mean, rstd = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = _backward(grad, source, mean, rstd, weight, ctx.groups, ctx.nchw, wanted)
        return dx, dw, db, None, None


def _compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)  # torch 2.3 and later
    return bool(check and check())


def _candidate(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    """Training on a CPU, a channels-last input, few channels a group: worth choosing a layout."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and torch.is_grad_enabled()
        and not _compiling()
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=_CL)
        and norm.num_channels // norm.num_groups <= MAX_GROUP_CHANNELS
    )


def group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm`'s GroupNorm of `x` (no activation), each pass in the faster layout."""
    if _candidate(norm, x):
        key = (tuple(x.shape), x.dtype, norm.num_groups)
        if key not in _CHOICES:
            _CHOICES[key] = _choose(x, norm)
        choice = _CHOICES[key]
        if any(choice):
            return _GroupNormByLayout.apply(x, norm.weight, norm.bias, norm, choice)
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


class FastGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` through `group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(self, x)


class FastGroupNormAct(GroupNormAct):
    """timm's `GroupNormAct` (norm, dropout, activation) through `group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(group_norm(self, x)))


_FAST = {nn.GroupNorm: FastGroupNorm, GroupNormAct: FastGroupNormAct}


def use_fast_group_norms(model: nn.Module) -> int:
    """Let the model's GroupNorm layers (exactly `nn.GroupNorm` or timm's `GroupNormAct`) choose
    their layout per pass; returns how many there are. Subclasses with forwards of their own are
    left alone."""
    count = 0
    for module in model.modules():
        fast = _FAST.get(type(module))
        if fast is not None and not getattr(module, "_fast_norm", False):
            module.__class__ = fast
            count += 1
    return count
