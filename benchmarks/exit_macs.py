"""MACs per image of each exit branch, `original` against `light`, as a share of the plain model,
for the students users train (timm models at 224 px, 1,000 classes). Counted by torch's
FlopCounterMode through the cascade's own cost count (`StagedStudent.count_costs`).

    python benchmarks/exit_macs.py [--markdown] [--img-size 224] [--models resnet50,...]
"""

from __future__ import annotations

import argparse

import timm
import torch

from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.models.student import EXIT_HEADS, MultiExitStudent, find_stages

MODELS = ("resnetv2_50x1_bit", "resnet50", "convnext_tiny", "efficientnet_b0", "regnety_016")


def exit_costs(arch: str, head: str, size: int, classes: int) -> tuple[int, list[int]]:
    """(plain MACs, each exit branch's MACs) of `arch` with `head` exits on every stage but the
    last."""
    torch.manual_seed(0)
    backbone = timm.create_model(arch, num_classes=classes)
    exits = list(range(len(find_stages(backbone, arch)) - 1))
    student = MultiExitStudent(backbone, arch, exits, classes, size, head).eval()
    costs = StagedStudent(student, size).count_costs(size)
    return costs.plain, list(costs.branches)


def main() -> None:
    """Print one row per model: plain GMACs and each exit's share for each head."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    header = ["model", "plain GMACs", *(f"{h}: each exit, % of plain" for h in EXIT_HEADS)]
    rows = []
    for arch in args.models.split(","):
        cells = []
        plain = 0
        for head in EXIT_HEADS:
            plain, branches = exit_costs(arch, head, args.img_size, args.classes)
            cells.append(", ".join(f"{100 * b / plain:.1f}" for b in branches))
        rows.append([arch, f"{plain / 1e9:.2f}", *cells])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |" if args.markdown else "  ".join(row))


if __name__ == "__main__":
    main()
