"""Where the student's training step spends its time: img/s per setting and a kernel profile.

Not a test. The step is `make bench`'s "student step alone" (the multi-exit KD loss against
fixed teacher logits, AdamW) for the ResNet-50 student with its exits, 100 classes, on random
images. It prints one line of images/s per setting — bf16 autocast with and without
channels_last, fp32, and (with --compile) the compiled module — then torch.profiler's table of
the operators that take the most device time in the default setting.

    python benchmarks/profile_step.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from mlkd_cli.engine import loop
from mlkd_cli.losses.kd import MultiExitKDLoss
from mlkd_cli.models.student import PatchConv2d, build_student

CLASSES = 100


def synchronize(device: torch.device) -> None:
    """Wait for queued device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    args: argparse.Namespace,
    bf16: bool,
    channels_last: bool,
    compiled: bool,
    cudnn_exits: bool = False,
):
    """A closure running one training step of a fresh student in the given setting.

    `cudnn_exits` runs the exits' k x k / stride-k convolutions through cuDNN (plain Conv2d)
    instead of mlkd's patch GEMM, to show what that change is worth.
    """
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = build_student(args.student, CLASSES, None, args.img_size).to(device)
    if cudnn_exits:
        for module in student.modules():
            if isinstance(module, PatchConv2d):
                module.__class__ = torch.nn.Conv2d
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(memory_format=fmt)
    if compiled:
        student.compile()
    optimizer = loop.build_optimizer(student, 1e-3, 1e-4)
    loss_fn = MultiExitKDLoss(10.0, 1.0, [1.0] * len(student.exits))
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    images = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    fixed = torch.randn(args.batch_size, CLASSES, device=device)
    targets = torch.softmax(torch.randn(args.batch_size, CLASSES, device=device), dim=1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = loss_fn(student(images), fixed, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rate(args: argparse.Namespace, step) -> float:
    """Images/s over the measured steps, after the warm-up ones."""
    device = torch.device(args.device)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    """Print img/s per setting, then the profile of the default setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--student", default="resnetv2_50x1_bit")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the compiled student")
    parser.add_argument("--rows", type=int, default=20, help="profile rows to print")
    args = parser.parse_args()
    settings = [
        ("bf16 channels_last", True, True, False, False),
        ("bf16 channels_last, exits through cuDNN", True, True, False, True),
        ("bf16 NCHW", True, False, False, False),
        ("fp32 NCHW", False, False, False, False),
    ]
    if args.compile:
        settings.append(("bf16 channels_last compiled", True, True, True, False))
    for label, bf16, channels_last, compiled, cudnn_exits in settings:
        start = time.perf_counter()
        value = rate(args, make_step(args, bf16, channels_last, compiled, cudnn_exits))
        took = time.perf_counter() - start
        print(f"{label}: {value:.1f} img/s ({took:.0f} s with warm-up)", flush=True)
    step = make_step(args, True, True, False)
    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        synchronize(torch.device(args.device))
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
