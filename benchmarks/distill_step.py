"""Throughput of one distillation step: student forward/backward + ensemble teacher forward.

Not a test: it prints images/s of the real training step (`mlkd_cli.engine.loop.train_one_epoch`
with the multi-exit KD loss) on random data, for the default ResNet-50 student and a three-model
teacher built from the original project's ensemble (random weights: speed does not depend on
them). On CUDA it runs as `mlkd distill` does: bf16 autocast and channels_last.

    python benchmarks/distill_step.py                       # 224 px, batch 32, this machine
    python benchmarks/distill_step.py --device cuda --steps 30
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from mlkd_cli.engine import loop
from mlkd_cli.engine.distiller import build_student
from mlkd_cli.engine.launch import DistContext, resolve_device
from mlkd_cli.losses import MultiExitKDLoss
from mlkd_cli.models.teacher import TeacherEnsemble

ORIGINAL_TEACHERS = "deit_small_distilled_patch16_224,convnextv2_nano,hrnet_w18"


def cpu_name() -> str:
    """The processor's model name (Linux), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    """Parse flags, time warm-up then measured steps, print one summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnetv2_50x1_bit")
    parser.add_argument("--teachers", default=ORIGINAL_TEACHERS)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = torch.device(resolve_device(args.device))
    ctx = DistContext(0, 1, 0, device)
    precision = loop.Precision(device)
    torch.manual_seed(0)
    student = build_student(args.student, args.classes, None, args.img_size).to(device)
    members = [
        timm.create_model(name, num_classes=args.classes) for name in args.teachers.split(",")
    ]
    teacher = TeacherEnsemble(members, [1.0] * len(members)).to(device)
    if precision.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    loss = MultiExitKDLoss(10.0, 1.0, [1.0] * len(student.exits))
    optimizer = loop.build_optimizer(student, 1e-3, 1e-4)
    mixer = loop.BatchMixer(args.classes, 1.0, 1.0, 0.0)

    def step(model, images, targets):
        return loss(model(images), teacher(images), targets)

    def run(batches: int) -> float:
        n = batches * args.batch_size
        data = TensorDataset(
            torch.randn(n, 3, args.img_size, args.img_size), torch.randint(0, args.classes, (n,))
        )
        loader = DataLoader(data, batch_size=args.batch_size, pin_memory=device.type == "cuda")
        scheduler = loop.build_scheduler(optimizer, batches, 0, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loop.train_one_epoch(student, loader, step, optimizer, scheduler, mixer, ctx, precision, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    run(args.warmup)
    rate = run(args.steps)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(
        f"distill step: {rate:.1f} img/s | student {args.student} ({len(student.exits)} exits), "
        f"teacher {args.teachers}, {args.img_size} px, batch {args.batch_size}, "
        f"{args.steps} steps after {args.warmup} warm-up | {device.type} ({where}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        + (", bf16 autocast + channels_last" if device.type == "cuda" else ", fp32")
    )


if __name__ == "__main__":
    main()
