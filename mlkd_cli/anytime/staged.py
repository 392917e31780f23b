"""The staged runner: a multi-exit student's backbone cut at its exits and run stage by stage.

A cascade runs the first segment of the backbone (stem to the first exit's stage) and that exit's
branch; the images whose confidence under the exit rule (`rules.EXIT_RULES`: the top softmax
probability by default) reaches the exit's threshold leave with its prediction, the rest go on to
the next segment, and so on to the final head. What each part costs is counted here too
(`StagedStudent.count_costs`, in `costs.ExitCosts`).

The cut is taken from the backbone's own modules in order (timm's sequential CNNs: ResNet,
ResNetV2, EfficientNet, ConvNeXt, RegNet, ...) and checked once against timm's
`forward_intermediates` and `forward_features`, so a model whose forward is not that sequence is
refused instead of giving wrong answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from mlkd_cli.anytime.costs import ExitCosts, count_macs
from mlkd_cli.anytime.rules import EXIT_RULE, exit_confidence
from mlkd_cli.core.errors import UserError
from mlkd_cli.models.student import MultiExitStudent


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
                    x, macs = count_macs(segment, x)
                    segments.append(macs)
                    if j < self.exit_count:
                        branches.append(count_macs(student.exits[j], x)[1])
                head = count_macs(self.head, x)[1]
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
