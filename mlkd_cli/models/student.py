"""The multi-exit student: any timm CNN with auxiliary classifiers after its intermediate stages.

Stages come from timm's feature information (`feature_info`, `forward_intermediates`), so no
architecture is hard-coded. Two kinds of exit (`EXIT_HEADS`):
- `original`, as in the original project: 1x1 conv to a quarter of the final feature width, a
  k x k conv with stride k that brings the map to the last stage's resolution, a 1x1 conv to the
  final feature width (each with BatchNorm + ReLU), global pooling, a classifier. On a ResNet-50
  at 224 px that is about 1.3 GMACs an exit, a third of the plain model.
- `light`: a 3x3 depthwise conv on the stage's map, a k x k depthwise conv with stride k to the
  last stage's resolution, a 1x1 conv to the final feature width (BatchNorm + ReLU after each
  conv), global pooling, a classifier: 1-3 % of a ResNet-50's MACs an exit, so an image that
  leaves early saves nearly all of what the rest of the backbone costs.
The saved student is the plain timm model inside; `<name>_exits.pth` keeps the exits too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlkd_cli.core.errors import UserError
from mlkd_cli.models.factory import build_model

# Feature maps finer than this are stems (ResNet's act1, stem convs), not stages.
MIN_STAGE_REDUCTION = 4
CNN_EXAMPLES = "resnet50, resnetv2_50x1_bit, convnext_tiny or efficientnet_b0"


@dataclass(frozen=True)
class Stage:
    """One stage of a backbone as timm describes it."""

    feature_index: int  # index into the model's feature_info
    module: str
    channels: int
    reduction: int


def find_stages(model: nn.Module, arch: str) -> list[Stage]:
    """The model's stages (feature maps at stride 4 or coarser), from timm's feature_info."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise UserError(
            f"timm gives no stage information for {arch}, so exits cannot be attached; "
            f"choose a CNN such as {CNN_EXAMPLES}"
        )
    stages = [
        Stage(i, str(f.get("module", i)), int(f["num_chs"]), int(f["reduction"]))
        for i, f in enumerate(info)
        if int(f["reduction"]) >= MIN_STAGE_REDUCTION
    ]
    if len(stages) < 2:
        raise UserError(f"{arch} has fewer than two stages; exits need intermediate stages")
    return stages


def parse_exits(text: str | None, stages: Sequence[Stage], arch: str) -> list[int]:
    """Stage positions for `--exits` ("0,1,2"); default every stage but the last."""
    last = len(stages) - 1
    if text is None:
        return list(range(last))
    if text.strip().lower() in ("", "none"):
        return []
    try:
        chosen = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise UserError(f"--exits takes stage numbers like 0,1,2, not {text!r}") from None
    if chosen[0] < 0 or chosen[-1] >= last:
        names = ", ".join(f"{i}={s.module}" for i, s in enumerate(stages[:-1]))
        raise UserError(f"--exits {text}: {arch} has exit stages {names}; choose among them")
    return chosen


def parse_exit_weights(text: str | None, count: int) -> list[float]:
    """Per-exit loss weights for `--exit-weights` ("1,0.5,0.5"); default 1 each."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--exit-weights takes numbers like 1,1,0.5, not {text!r}") from None
    if len(weights) != count or any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserError(f"--exit-weights needs {count} non-negative numbers, one per exit")
    return weights


def _patch_view(x: torch.Tensor, k: int, channels_inner: bool) -> torch.Tensor:
    """(N, C, H, W) viewed as (N, H/k, W/k, patch), the patch ordered (k, k, C) or (C, k, k)."""
    _, _, h, w = x.shape
    grid = x.unflatten(3, (w // k, k)).unflatten(2, (h // k, k))  # (N, C, H/k, k, W/k, k)
    if channels_inner:
        return grid.permute(0, 2, 4, 3, 5, 1)
    return grid.permute(0, 2, 4, 1, 3, 5)


def _patch_rows(x: torch.Tensor, k: int, channels_inner: bool) -> torch.Tensor:
    """The patches copied into rows: (N, H/k, W/k, k*k*C)."""
    n, _, h, w = x.shape
    return _patch_view(x, k, channels_inner).reshape(n, h // k, w // k, -1)


class _Patches(torch.autograd.Function):
    """Copies the non-overlapping k x k patches into rows; the gradient keeps the input's layout.

    Left to autograd, the gradient of that copy is a view with the patches' strides, which every
    layer below (BatchNorm, ReLU, the 1x1 conv) then reads out of order: on a CPU that made the
    first exit's ReLU backward 5x and its conv backward 3x slower than on a contiguous gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: int, channels_inner: bool) -> torch.Tensor:
        ctx.k, ctx.channels_inner, ctx.shape = k, channels_inner, x.shape
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last
        )
        return _patch_rows(x, k, channels_inner)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
        view = _patch_view(out, ctx.k, ctx.channels_inner)
        view.copy_(grad.view(view.shape))
        return out, None, None


class PatchConv2d(nn.Conv2d):
    """A k x k convolution with stride k, computed as one matrix product over the patches.

    The same parameters (and state-dict keys) as `nn.Conv2d`. cuDNN runs this shape (an exit's
    8x8/stride-8 conv on a 56 px map, 512 channels) with a slow implicit-GEMM kernel: on an H100 it
    took a quarter of the ResNet-50 student's whole training step. As non-overlapping patches it
    is a plain GEMM, which runs on the tensor cores at full rate (and the same on a CPU). The
    patch's element order follows the weight's memory layout, so the weight (16.8M values in a
    ResNet-50's first exit) is used as it lies, never copied into another order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        if k == 1 or x.shape[-2] % k or x.shape[-1] % k:
            return super().forward(x)
        weight = self.weight
        channels_inner = not weight.is_contiguous() and weight.is_contiguous(
            memory_format=torch.channels_last
        )
        if channels_inner:  # (out, C, k, k) stored as (out, k, k, C): a free view
            weight = weight.permute(0, 2, 3, 1)
        if torch.is_grad_enabled() and x.requires_grad:
            patches = _Patches.apply(x, k, channels_inner)
        else:  # inference and export: the same copy, no autograd node
            patches = _patch_rows(x, k, channels_inner)
        out = F.linear(patches, weight.reshape(self.out_channels, -1), self.bias)
        # Back to (N, C, H/k, W/k) logically, stored channels-last (what the next layers want).
        return out.permute(0, 3, 1, 2)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    conv = PatchConv2d if kernel == stride and kernel > 1 else nn.Conv2d
    return nn.Sequential(
        conv(cin, cout, kernel, stride=stride, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ExitBranch(nn.Module):
    """An auxiliary classifier on one stage's feature map."""

    def __init__(self, in_channels: int, width: int, factor: int, num_classes: int) -> None:
        super().__init__()
        mid = max(1, width // 4)
        self.factor = factor
        self.reduce = _conv_bn_relu(in_channels, mid, 1)
        self.downsample = _conv_bn_relu(mid, mid, factor, stride=factor)
        self.expand = _conv_bn_relu(mid, width, 1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.reduce(features)
        # Pad to a multiple of the stride so odd sizes reach the last stage's resolution too.
        pad_h, pad_w = (-x.shape[-2]) % self.factor, (-x.shape[-1]) % self.factor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.expand(self.downsample(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _depthwise_bn_relu(channels: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class LightExitBranch(nn.Module):
    """A cheap auxiliary classifier: a depthwise 3x3 conv, a depthwise k x k conv with stride k
    to the last stage's resolution (a learned pooling per channel), a 1x1 conv to the final
    width, global pooling, a classifier. The dense work is the 1x1 at the coarsest resolution."""

    def __init__(self, in_channels: int, width: int, factor: int, num_classes: int) -> None:
        super().__init__()
        self.factor = factor
        self.spatial = _depthwise_bn_relu(in_channels, 3, 1, 1)
        self.downsample = (
            _depthwise_bn_relu(in_channels, factor, factor, 0) if factor > 1 else nn.Identity()
        )
        self.expand = _conv_bn_relu(in_channels, width, 1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.spatial(features)
        # Pad to a multiple of the stride so odd sizes reach the last stage's resolution too.
        pad_h, pad_w = (-x.shape[-2]) % self.factor, (-x.shape[-1]) % self.factor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.expand(self.downsample(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# `--exit-head`: what each exit is (see the module's docstring).
EXIT_HEADS: dict[str, type[nn.Module]] = {"original": ExitBranch, "light": LightExitBranch}


def check_exit_head(name: str) -> str:
    """Refuse an exit head mlkd does not know (one line naming the choices)."""
    if name not in EXIT_HEADS:
        raise UserError(f"--exit-head must be one of {', '.join(EXIT_HEADS)}, not {name!r}")
    return name


class MultiExitStudent(nn.Module):
    """A timm backbone plus exits; forward returns (final logits, exit logits...)."""

    def __init__(
        self,
        backbone: nn.Module,
        arch: str,
        exits: Sequence[int],
        num_classes: int,
        img_size: int,
        exit_head: str = "original",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.exit_head = check_exit_head(exit_head)
        stages = find_stages(backbone, arch)
        self.stages = [stages[i] for i in exits]
        self.feature_indices = [s.feature_index for s in self.stages]
        self.exits = nn.ModuleList()
        if not self.stages:  # --exits none: plain training of the final head
            return
        final, maps = self._probe(img_size)
        if final.ndim != 4:
            raise UserError(
                f"{arch} does not end in a convolutional feature map, so exits cannot be "
                f"attached; choose a CNN such as {CNN_EXAMPLES}"
            )
        width, final_size = final.shape[1], final.shape[-1]
        branch = EXIT_HEADS[exit_head]
        self.exits.extend(
            branch(m.shape[1], width, max(1, math.ceil(m.shape[-1] / final_size)), num_classes)
            for m in maps
        )

    def _probe(self, img_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Shapes of the final and exit feature maps for one image of the training size."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                probe = torch.zeros(1, 3, img_size, img_size)
                return self.backbone.forward_intermediates(probe, indices=self.feature_indices)
        except (RuntimeError, NotImplementedError, AssertionError, TypeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"cannot take {img_size}x{img_size} intermediate features from this model "
                f"({detail}); raise --img-size or choose another --student"
            ) from None
        finally:
            self.backbone.train(was_training)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.forward_with_maps(images)[0]

    def forward_with_maps(
        self, images: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """The heads' logits (final first) and the stage feature maps the exits read."""
        if not self.exits:
            return (self.backbone(images),), []
        final, maps = self.backbone.forward_intermediates(images, indices=self.feature_indices)
        logits = self.backbone.forward_head(final)
        heads = (logits, *(branch(m) for branch, m in zip(self.exits, maps, strict=True)))
        return heads, maps

    @property
    def head_names(self) -> list[str]:
        """'final', then each exit's stage module name."""
        return ["final", *(f"exit {s.module}" for s in self.stages)]


class FeatureAdaptedStudent(nn.Module):
    """A multi-exit student with a learned 1x1 convolution per exit that maps the exit's stage
    features to a teacher stage's width, for feature distillation (training only).

    In training, forward returns (heads' logits, adapted maps); in eval mode the heads alone, as
    the student does. The adapters are dropped with the exits: `student` is what is saved.
    """

    def __init__(self, student: MultiExitStudent, teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(teacher_channels) != len(student.stages):
            raise ValueError("one teacher width per exit is needed")
        self.student = student
        self.adapters = nn.ModuleList(
            nn.Conv2d(stage.channels, channels, 1, bias=False)
            for stage, channels in zip(student.stages, teacher_channels, strict=True)
        )

    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        heads, maps = self.student.forward_with_maps(images)
        if not self.training:
            return heads
        return heads, [adapter(m) for adapter, m in zip(self.adapters, maps, strict=True)]

    @property
    def exits(self) -> nn.ModuleList:
        """The student's exit branches."""
        return self.student.exits

    @property
    def head_names(self) -> list[str]:
        """The student's head names."""
        return self.student.head_names


def unwrap_student(model: nn.Module) -> MultiExitStudent:
    """The multi-exit student inside `model` (itself, or inside its feature adapters)."""
    if isinstance(model, FeatureAdaptedStudent):
        model = model.student
    assert isinstance(model, MultiExitStudent)
    return model


def build_student(
    arch: str,
    num_classes: int,
    exits: list[int] | None,
    img_size: int,
    pretrained: bool = False,
    init_checkpoint: Path | None = None,
    exits_text: str | None = None,
    exit_head: str = "original",
    drop_path_rate: float | None = None,
) -> MultiExitStudent:
    """A timm model wrapped with exits (`exit_head`, see `EXIT_HEADS`) after the chosen stages
    (default: all but the last); `drop_path_rate` is timm's, for the backbone."""
    backbone = build_model(
        arch, num_classes, pretrained, init_checkpoint, drop_path_rate=drop_path_rate
    )
    if exits is None:
        exits = parse_exits(exits_text, find_stages(backbone, arch), arch)
    return MultiExitStudent(backbone, arch, exits, num_classes, img_size, exit_head)
