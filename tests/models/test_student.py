"""Multi-exit students: exits found from timm's feature info, the exits' patch convolution, and
the exit choices checked."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mlkd_cli.core.errors import UserError
from mlkd_cli.models.student import (
    PatchConv2d,
    build_student,
    find_stages,
    parse_exit_weights,
    parse_exits,
)


@pytest.mark.parametrize(
    ("arch", "stages"),
    [
        ("test_resnet", ["layer1", "layer2", "layer3"]),  # ResNet v1
        ("resnetv2_18", ["stages.0", "stages.1", "stages.2"]),  # ResNet v2
        ("test_convnext", ["stages.0", "stages.1", "stages.2"]),
        ("test_efficientnet", ["blocks.1", "blocks.2", "blocks.3"]),
    ],
)
def test_exits_found_from_timm_feature_info(arch: str, stages: list[str]) -> None:
    torch.manual_seed(0)
    student = build_student(arch, 7, None, 32)
    assert [s.module for s in student.stages] == stages
    images = torch.randn(2, 3, 32, 32)
    outputs = student(images)
    assert len(outputs) == 4 and all(o.shape == (2, 7) for o in outputs)
    student.eval()
    # The final head is exactly the plain timm model's forward.
    assert torch.allclose(student(images)[0], student.backbone(images), atol=1e-5)


def test_exits_on_odd_sizes_reach_the_last_resolution() -> None:
    student = build_student("test_resnet", 3, None, 40)
    assert all(o.shape == (1, 3) for o in student(torch.randn(1, 3, 40, 40)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_conv_equals_the_strided_convolution(channels_last: bool) -> None:
    # The exits' k x k / stride-k conv runs as a GEMM over patches: same outputs, same gradients,
    # same state-dict keys as nn.Conv2d.
    torch.manual_seed(0)
    patch = PatchConv2d(6, 5, 4, stride=4, bias=True)
    plain = nn.Conv2d(6, 5, 4, stride=4, bias=True)
    plain.load_state_dict(patch.state_dict())
    assert list(patch.state_dict()) == list(plain.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    patch.to(memory_format=fmt)  # the patch order follows the weight's layout
    for size in (16, 18):  # divisible, and not (the latter takes the plain path)
        x = torch.randn(3, 6, size, size).contiguous(memory_format=fmt)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_patch, out_plain = patch(a), plain(b)
        assert out_patch.shape == out_plain.shape
        assert torch.allclose(out_patch, out_plain, atol=1e-5)
        grad = torch.randn_like(out_plain)
        out_patch.backward(grad)
        out_plain.backward(grad)
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
        assert torch.allclose(patch.weight.grad, plain.weight.grad, atol=1e-4)
        # The gradient that reaches the layer below keeps the input's layout (not the patches'
        # strides; `.grad` of a leaf would hide it, autograd reorders those).
        below = x.clone().requires_grad_() * 1.0
        seen: list[torch.Tensor] = []
        below.register_hook(seen.append)
        patch(below).backward(grad)
        assert seen[0].is_contiguous(memory_format=fmt)
        patch.zero_grad(), plain.zero_grad()
        with torch.no_grad():  # inference takes the same patches without an autograd node
            assert torch.allclose(patch(x), plain(x), atol=1e-5)
    student = build_student("test_resnet", 3, None, 32)
    assert any(isinstance(m, PatchConv2d) for m in student.exits.modules())


def test_model_without_stages_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="does not end in a convolutional feature map"):
        build_student("test_vit", 10, None, 32)

    class Plain(nn.Module):
        pass

    with pytest.raises(UserError, match="no stage information"):
        find_stages(Plain(), "plain")


def test_exit_choices_are_checked() -> None:
    stages = find_stages(timm.create_model("test_resnet"), "test_resnet")
    assert parse_exits(None, stages, "x") == [0, 1, 2]
    assert parse_exits("2,0", stages, "x") == [0, 2]
    assert parse_exits("none", stages, "x") == []
    plain = build_student("test_resnet", 3, [], 16)
    assert len(plain(torch.randn(2, 3, 16, 16))) == 1
    with pytest.raises(UserError, match="0=layer1"):
        parse_exits("3", stages, "x")
    with pytest.raises(UserError, match="stage numbers"):
        parse_exits("first", stages, "x")
    assert parse_exit_weights("1,0.5", 2) == [1.0, 0.5]
    with pytest.raises(UserError, match="2 non-negative"):
        parse_exit_weights("1", 2)
