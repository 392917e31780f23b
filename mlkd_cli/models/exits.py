"""Anytime inference with a multi-exit student: the backbone cut at its exits, run stage by stage.

A cascade runs the first segment of the backbone (stem to the first exit's stage) and that exit's
branch; the images whose confidence under the exit rule (`EXIT_RULES`: the top softmax
probability by default) reaches the exit's threshold leave with its prediction, the rest go on to
the next segment, and so on to the final head. What each image costs
is counted in multiply-accumulates (MACs) with torch's FlopCounterMode, segment by segment.

The cut is taken from the backbone's own modules in order (timm's sequential CNNs: ResNet,
ResNetV2, EfficientNet, ConvNeXt, RegNet, ...) and checked once against timm's
`forward_intermediates` and `forward_features`, so a model whose forward is not that sequence is
refused instead of giving wrong answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mlkd_cli.core.checkpoint import EXITS_FORMAT, ModelCard, load_checkpoint, read_safetensors
from mlkd_cli.core.errors import UserError
from mlkd_cli.models.factory import check_model_name
from mlkd_cli.models.student import MultiExitStudent

# How sure a head is of an image, in [0, 1] (higher: surer); an image leaves at the first exit
# whose confidence reaches that exit's threshold. Files written before rules existed used the
# first.
EXIT_RULES = {
    "max_softmax": "the top softmax probability",
    "margin": "the top probability minus the second",
    "entropy": "1 minus the softmax's entropy divided by log(classes)",
}
EXIT_RULE = "max_softmax"  # the default, and what a file without a rule was chosen with


def exit_confidence(logits: torch.Tensor, rule: str = EXIT_RULE) -> torch.Tensor:
    """How sure each row of `logits` (..., classes) is under `rule` (`EXIT_RULES`), in [0, 1],
    from the float32 softmax: the arithmetic every cascade decides by."""
    probs = logits.float().softmax(dim=-1)
    if rule == "max_softmax":
        return probs.amax(dim=-1)
    if rule == "margin":
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        return top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0)
    if rule == "entropy":
        entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
        return (1.0 - entropy / math.log(max(probs.shape[-1], 2))).clamp(0.0, 1.0)
    raise ValueError(f"unknown exit rule {rule!r}; rules are {', '.join(EXIT_RULES)}")


def check_rule(rule: str) -> str:
    """Refuse an exit rule mlkd does not know (one line naming the choices)."""
    if rule not in EXIT_RULES:
        raise UserError(f"--exit-rule must be one of {', '.join(EXIT_RULES)}, not {rule!r}")
    return rule


@dataclass(frozen=True)
class ExitCosts:
    """MACs per image of each part of the cascade, at one image size.

    `segments[j]` is the backbone from the previous cut to exit j's stage (the last one runs on
    to the end of the features), `branches[j]` exit j's branch, `head` the final classifier.
    """

    img_size: int
    segments: tuple[int, ...]
    branches: tuple[int, ...]
    head: int

    @property
    def plain(self) -> int:
        """The plain model (no exits): every segment and the head."""
        return sum(self.segments) + self.head

    def up_to(self, exit_index: int) -> int:
        """What an image leaving at `exit_index` costs (len(branches) means the final head,
        after every exit's branch has run)."""
        if exit_index >= len(self.branches):
            return self.plain + sum(self.branches)
        return sum(self.segments[: exit_index + 1]) + sum(self.branches[: exit_index + 1])

    @property
    def cascade(self) -> list[int]:
        """`up_to` every head, in cascade order (the exits, then the final head)."""
        return [self.up_to(j) for j in range(len(self.branches) + 1)]

    def alone(self, exit_index: int) -> int:
        """What exit `exit_index` costs used by itself (its backbone prefix and its branch)."""
        if exit_index >= len(self.branches):
            return self.plain
        return sum(self.segments[: exit_index + 1]) + self.branches[exit_index]

    def to_record(self) -> dict:
        """Plain types for a checkpoint's card."""
        return {
            "img_size": self.img_size,
            "segments": list(self.segments),
            "branches": list(self.branches),
            "head": self.head,
            "plain": self.plain,
            "cascade": self.cascade,
        }

    @classmethod
    def from_record(cls, record: dict) -> ExitCosts:
        """Read back `to_record`'s dict."""
        return cls(
            int(record["img_size"]),
            tuple(int(v) for v in record["segments"]),
            tuple(int(v) for v in record["branches"]),
            int(record["head"]),
        )


def _flat_modules(backbone: nn.Module, stages: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The backbone's top-level modules in order; a Sequential that holds stages (ResNetV2's
    `stages`, EfficientNet's `blocks`) is opened one level."""
    flat = []
    for name, child in backbone.named_children():
        if isinstance(child, nn.Sequential) and any(s.startswith(f"{name}.") for s in stages):
            flat.extend((f"{name}.{sub}", module) for sub, module in child.named_children())
        else:
            flat.append((name, child))
    return flat


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same map up to arithmetic noise (a GPU's TF32 or another kernel choice); modules run in
    the wrong order give a different map altogether."""
    if a.shape != b.shape:
        return False
    return float((a - b).abs().max()) <= 1e-3 * max(1.0, float(b.abs().max()))


class StagedStudent:
    """A multi-exit student's backbone as segments ending at each exit's stage, then the rest.

    Holds references to the student's own modules (nothing copied, nothing registered twice):
    moving or converting the student moves these too.
    """

    def __init__(self, student: MultiExitStudent, img_size: int) -> None:
        if not student.exits:
            raise UserError("the student has no exits (trained with --exits none)")
        self.student = student
        backbone = student.backbone
        flat = _flat_modules(backbone, [s.module for s in student.stages])
        names = [name for name, _ in flat]
        arch = type(backbone).__name__
        cuts = []
        for stage in student.stages:
            if stage.module not in names:
                raise UserError(
                    f"{arch}'s stage {stage.module} is not one of its top-level modules, so it "
                    "cannot stop early; choose a sequential CNN such as resnet50 or efficientnet_b0"
                )
            cuts.append(names.index(stage.module) + 1)
        probe = self._probe_input(backbone, img_size)
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                features = backbone.forward_features(probe)
                _, maps = backbone.forward_intermediates(probe, indices=student.feature_indices)
                x, start, outputs = probe, 0, []
                for cut in cuts:
                    for _, module in flat[start:cut]:
                        x = module(x)
                    outputs.append(x)
                    start = cut
                end = None
                for stop in range(start, len(flat)):
                    x = flat[stop][1](x)
                    if _close(x, features):
                        end = stop + 1
                        break
        finally:
            student.train(was_training)
        if end is None or not all(_close(a, b) for a, b in zip(outputs, maps, strict=True)):
            raise UserError(
                f"{arch} does not run its modules in order, so it cannot stop early; choose a "
                "sequential CNN such as resnet50 or efficientnet_b0"
            )
        bounds = [0, *cuts, end]
        # Plain tuples: the segments must not become registered submodules (state-dict keys).
        self.segments = tuple(
            nn.Sequential(*(m for _, m in flat[a:b])) for a, b in pairwise(bounds)
        )

    @staticmethod
    def _probe_input(backbone: nn.Module, img_size: int) -> torch.Tensor:
        parameter = next(backbone.parameters())
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 3, img_size, img_size, generator=generator)
        return probe.to(parameter.device, parameter.dtype)

    @property
    def exit_count(self) -> int:
        """How many exits the cascade has before the final head."""
        return len(self.student.exits)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The final classifier on the backbone's features."""
        return self.student.backbone.forward_head(features)

    def exit_logits(self, images: torch.Tensor, exit_index: int) -> torch.Tensor:
        """One exit used alone: its backbone prefix and its branch (the final head for the last)."""
        x = images
        for segment in self.segments[: exit_index + 1]:
            x = segment(x)
        if exit_index >= self.exit_count:
            return self.head(x)
        return self.student.exits[exit_index](x)

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """The plain model: every segment and the final head, no exit branch."""
        return self.exit_logits(images, self.exit_count)

    def cascade(
        self, images: torch.Tensor, thresholds: Sequence[float], rule: str = EXIT_RULE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (float) of the head each image left at, and that head's index (exits 0..E-1,
        E the final head). Images leave as soon as an exit's confidence under `rule` reaches
        its threshold; the rest of the batch runs on."""
        return self.cascade_batches([images], thresholds, rule)

    def cascade_batches(
        self, batches: Sequence[torch.Tensor], thresholds: Sequence[float], rule: str = EXIT_RULE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`cascade` over several batches in order, as one result; the images that run on past
        an exit wait for a full batch's worth before the next segment runs, so that the few
        hard images of each batch do not each pay a whole small-batch pass (on a CPU the
        per-operation cost of those passes undid the savings)."""
        if len(thresholds) != self.exit_count:
            raise ValueError(f"{self.exit_count} thresholds needed, got {len(thresholds)}")
        run = _CascadeRun(self, list(thresholds), batches, rule)
        offset = 0
        for batch in batches:
            positions = torch.arange(offset, offset + batch.shape[0], device=run.device)
            offset += batch.shape[0]
            run.run(0, batch, positions)
        for level in range(1, self.exit_count + 1):
            run.flush(level)  # what is left runs on, deeper levels after shallower ones
        return run.logits, run.taken

    def count_costs(self, img_size: int) -> ExitCosts:
        """MACs per image of every segment, branch and the head, for one image of `img_size`."""
        student = self.student
        was_training = student.training
        student.eval()
        parameter = next(student.parameters())
        x = torch.zeros(1, 3, img_size, img_size, device=parameter.device, dtype=parameter.dtype)
        segments, branches = [], []
        try:
            with torch.no_grad():
                for j, segment in enumerate(self.segments):
                    x, macs = _counted(segment, x)
                    segments.append(macs)
                    if j < self.exit_count:
                        branches.append(_counted(student.exits[j], x)[1])
                head = _counted(self.head, x)[1]
        finally:
            student.train(was_training)
        return ExitCosts(img_size, tuple(segments), tuple(branches), head)


class _CascadeRun:
    """One `cascade_batches` call: results so far and the images waiting at each segment."""

    def __init__(
        self,
        staged: StagedStudent,
        thresholds: list[float],
        batches: Sequence[torch.Tensor],
        rule: str,
    ) -> None:
        self.staged, self.thresholds, self.rule = staged, thresholds, rule
        self.total = sum(b.shape[0] for b in batches)
        self.full = max((b.shape[0] for b in batches), default=1)
        self.device = batches[0].device if batches else torch.device("cpu")
        exits = staged.exit_count
        self.taken = torch.full((self.total,), exits, dtype=torch.long, device=self.device)
        self.logits = torch.empty(0)  # (total, classes) once the first result is known
        self.waiting: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(exits + 1)]

    def record(self, positions: torch.Tensor, logits: torch.Tensor, head: int) -> None:
        if self.logits.numel() == 0:
            self.logits = logits.new_empty(self.total, logits.shape[1])
        self.logits[positions] = logits
        self.taken[positions] = head

    def run(self, level: int, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Segment `level` on `x`; then its exit lets confident images leave (or the head
        takes them all)."""
        staged = self.staged
        x = staged.segments[level](x)
        if level == staged.exit_count:
            self.record(positions, staged.head(x).float(), level)
            return
        logits = staged.student.exits[level](x).float()
        leave = exit_confidence(logits, self.rule) >= self.thresholds[level]
        # Positions, once each (one host sync per exit): who leaves here, who runs on.
        gone = leave.nonzero().squeeze(1)
        stay = (~leave).nonzero().squeeze(1)
        if gone.numel():
            self.record(positions[gone], logits[gone], level)
        if stay.numel():
            self.waiting[level + 1].append((x[stay], positions[stay]))
            if sum(p.shape[0] for _, p in self.waiting[level + 1]) >= self.full:
                self.flush(level + 1)

    def flush(self, level: int) -> None:
        """Run the images waiting at segment `level`, whatever their number."""
        parts, self.waiting[level] = self.waiting[level], []
        if len(parts) == 1:
            self.run(level, *parts[0])
        elif parts:
            self.run(level, torch.cat([x for x, _ in parts]), torch.cat([p for _, p in parts]))


def _counted(function, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`function(x)` and the MACs it took (FlopCounterMode counts 2 FLOPs per MAC)."""
    counter = FlopCounterMode(display=False)
    with counter:
        y = function(x)
    return y, counter.get_total_flops() // 2


def check_thresholds(values: Sequence[float], exit_count: int) -> list[float]:
    """Refuse thresholds outside (0, 1] or of the wrong count; returns them as floats."""
    values = [float(v) for v in values]
    if len(values) != exit_count:
        raise UserError(f"--thresholds needs {exit_count} values, one per exit, got {len(values)}")
    bad = [v for v in values if not (math.isfinite(v) and 0 < v <= 1)]
    if bad:
        raise UserError(
            f"--thresholds must lie in (0, 1] (a top softmax probability), not {bad[0]:g}"
        )
    return values


def exits_record(student: MultiExitStudent, positions: Sequence[int], img_size: int) -> dict:
    """What an exits checkpoint says about its exits: stages, heads and MACs per image.

    MACs are counted at `img_size` (the training size); they are None for a backbone that
    cannot be run stage by stage.
    """
    try:
        costs: dict | None = StagedStudent(student, img_size).count_costs(img_size).to_record()
    except UserError:
        costs = None
    return {
        "stages": list(positions),
        "modules": [s.module for s in student.stages],
        "head_names": student.head_names,
        "exit_head": student.exit_head,
        "macs": costs,
        "rule": EXIT_RULE,
        "thresholds": None,
    }


@dataclass
class ExitsCheckpoint:
    """A loaded student with its exits: the network (eval mode), its card and exits record."""

    path: Path
    student: MultiExitStudent
    card: ModelCard
    exits: dict[str, Any]

    @property
    def costs(self) -> ExitCosts | None:
        """MACs per image of the cascade's parts, as counted when it was saved."""
        macs = self.exits.get("macs")
        return ExitCosts.from_record(macs) if macs else None

    @property
    def exported(self) -> bool:
        """True when loaded from `mlkd export`'s safetensors (not a `<name>_exits.pth`)."""
        return _is_export(self.path)

    @property
    def thresholds(self) -> list[float] | None:
        """The thresholds chosen on validation, if they have been."""
        chosen = self.exits.get("thresholds")
        return list(chosen["values"]) if chosen else None

    @property
    def rule(self) -> str:
        """The exit rule the thresholds were chosen for (older files: the top probability)."""
        chosen = self.exits.get("thresholds") or {}
        return str(chosen.get("rule", EXIT_RULE))


def is_exits_checkpoint(path: Path) -> bool:
    """True when `path` holds a student with exits: `<name>_exits.pth`, or its safetensors
    export (the folder or its `model.safetensors`)."""
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return "mlkd_exits" in _safetensors_header(path)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return False  # an ensemble file
    try:
        content = load_checkpoint(path, mmap=True)  # the metadata, not every tensor
    except UserError:
        return False  # unreadable (or an old format that cannot be mapped): the loader says why
    return isinstance(content, dict) and content.get("format") == EXITS_FORMAT


def _safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError):
        return {}  # not readable: whoever loads it says so


def _is_export(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".safetensors"


def load_exits_checkpoint(path: Path) -> ExitsCheckpoint:
    """The student with its exits from `<name>_exits.pth`, or from its safetensors export (the
    folder or its `model.safetensors`), checked and in eval mode."""
    if _is_export(path):
        return load_exits_safetensors(path / "model.safetensors" if path.is_dir() else path)
    content = load_checkpoint(path)
    if not isinstance(content, dict) or content.get("format") != EXITS_FORMAT:
        raise UserError(
            f"{path} is a plain model without exits; pass the <name>_exits.pth that "
            "mlkd distill writes beside it"
        )
    card = ModelCard.from_checkpoint(content)
    exits = dict(content["exits"])
    student = build_exits_student(card, exits, content["state_dict"], path)
    return ExitsCheckpoint(path, student, card, exits)


def build_exits_student(
    card: ModelCard, exits: dict[str, Any], state_dict: dict[str, torch.Tensor], path: Path
) -> MultiExitStudent:
    """The multi-exit network a card and exits record describe, holding `state_dict`."""
    check_model_name(card.arch)
    backbone = timm.create_model(card.arch, num_classes=card.num_classes)
    # Files written before light exits existed hold the original's branches.
    student = MultiExitStudent(
        backbone,
        card.arch,
        exits["stages"],
        card.num_classes,
        card.img_size,
        exits.get("exit_head", "original"),
    )
    try:
        student.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise UserError(f"{path} does not fit its recorded student ({detail})") from None
    return student.eval()


def exits_header(meta: dict[str, str], path: Path) -> tuple[ModelCard, dict[str, Any]]:
    """The card and exits record an export carries (safetensors header, ONNX metadata)."""
    if "mlkd_exits" not in meta or "mlkd" not in meta:
        raise UserError(f"{path} is not a student with exits exported by mlkd")
    card = ModelCard.from_json(meta["mlkd"], str(path))  # checked: it sizes allocations
    try:
        return card, json.loads(meta["mlkd_exits"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} has a damaged mlkd header ({exc})") from None


def load_exits_safetensors(path: Path) -> ExitsCheckpoint:
    """A student with exits from the `model.safetensors` that `mlkd export` writes."""
    tensors, meta = read_safetensors(path)
    card, exits = exits_header(meta, path)
    student = build_exits_student(card, exits, tensors, path)
    return ExitsCheckpoint(path, student, card, exits)
