"""Early-exit inference with a distilled student, without the command line.

    from mlkd_cli.anytime import AnytimeClassifier

    classifier = AnytimeClassifier.load("models/student_exits.pth")  # or its export folder
    result = classifier.predict(classifier.preprocess(images))  # PIL images, or a tensor
    result.labels, result.exits, result.macs  # class indices, the exit each took, MACs spent

Each image leaves at the first exit whose confidence under the exit rule (the top softmax
probability, the margin between the top two, or one minus the normalised entropy) reaches that
exit's threshold — the rule and thresholds `mlkd eval --split val --early-exit` chose and wrote
into the checkpoint, unless others are given; the rest of the batch runs on to the next stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mlkd_cli.core.errors import UserError
from mlkd_cli.data.transforms import ImageRecipe, build_eval_transform
from mlkd_cli.models.exits import (
    ExitsCheckpoint,
    StagedStudent,
    check_rule,
    check_thresholds,
    load_exits_checkpoint,
)


@dataclass(frozen=True)
class AnytimePrediction:
    """What the cascade decided for a batch."""

    labels: torch.Tensor  # (N,) predicted class indices
    probs: torch.Tensor  # (N, classes) softmax of the head each image left at
    exits: torch.Tensor  # (N,) the head taken: 0.. for the exits, `exit_count` for the final
    macs: torch.Tensor  # (N,) multiply-accumulates each image cost, at the training size

    @property
    def mean_macs(self) -> float:
        """Mean MACs per image of the batch."""
        return float(self.macs.double().mean())


class AnytimeClassifier:
    """A student with exits that stops early on the images it is sure of."""

    def __init__(
        self,
        checkpoint: ExitsCheckpoint,
        thresholds: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        rule: str | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        # Given thresholds go with the rule given (else the checkpoint's, else max_softmax).
        self.rule = check_rule(rule or checkpoint.rule)
        self.device = torch.device(device)
        student = checkpoint.student.to(self.device).eval()
        self.staged = StagedStudent(student, checkpoint.card.img_size)
        chosen = thresholds if thresholds is not None else checkpoint.thresholds
        if chosen is None:
            raise UserError(
                f"{checkpoint.path} has no thresholds yet: run mlkd eval on it with --split val "
                "--early-exit, or pass thresholds"
            )
        self.thresholds = check_thresholds(chosen, self.staged.exit_count)
        costs = checkpoint.costs
        if costs is None:
            raise UserError(f"{checkpoint.path} has no MAC counts; it cannot stop early")
        self._macs = torch.tensor(costs.cascade, dtype=torch.long)
        card = checkpoint.card
        self.class_names = list(card.class_names)
        self.transform = build_eval_transform(
            ImageRecipe(
                img_size=card.img_size,
                crop_pct=card.crop_pct,
                mean=tuple(card.mean),
                std=tuple(card.std),
                interpolation=card.interpolation,
            )
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        thresholds: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        rule: str | None = None,
    ) -> AnytimeClassifier:
        """From `<name>_exits.pth` or the folder `mlkd export` writes from it."""
        return cls(load_exits_checkpoint(Path(path)), thresholds, device, rule)

    @property
    def exit_count(self) -> int:
        """Exits before the final head."""
        return self.staged.exit_count

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images to the normalised batch the student was trained on."""
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> AnytimePrediction:
        """Run the cascade on a preprocessed batch (N, 3, H, W)."""
        logits, taken = self.staged.cascade(images.to(self.device), self.thresholds, self.rule)
        probs = logits.softmax(dim=1)
        return AnytimePrediction(
            labels=probs.argmax(dim=1).cpu(),
            probs=probs.cpu(),
            exits=taken.cpu(),
            macs=self._macs[taken.cpu()],
        )
