"""Where a distillation's teacher outputs come from: one seam, chosen once at plan time.

`DistillTask` asks its source for each batch's teacher logits (and, for a feature loss, the
teacher's maps at the exits) and never looks at which source it holds:

- `live`: the teacher (one model or an ensemble) runs on exactly the student's augmented batch;
- `features`: the same, returning the teacher's feature maps at the exits' stages too;
- `cached` (--teacher-cache): the teacher's logits for every training image are computed once
  before training and looked up by image; no teacher forward while training;
- `stored` (--soft-labels): a soft-label store replays the exact views it was labelled on
  (`data/replay.py`); a Mixup/CutMix batch learns its two views' stored outputs blended.

A new source is one class with the `TeacherSource` methods and `serves` (whether a config asks
for it), and one line in `TEACHER_SOURCES`, ahead of the sources it takes precedence over.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

from mlkd_cli.core.console import Reporter
from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.loaders import TrainingBatches
from mlkd_cli.data.replay import mixed_teacher_logits, replay_tables, stored_logits
from mlkd_cli.data.softlabels import SoftLabelStore, read_manifest
from mlkd_cli.engine import loop
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.engine.planning import RunPlan
from mlkd_cli.models.ensemble_config import EnsembleConfig
from mlkd_cli.models.teacher import InputSpec, TeacherEnsemble, build_teacher

# A batch's teacher outputs: logits (batch, classes), and the maps at the exits or None.
Outputs = tuple[torch.Tensor, Sequence[torch.Tensor] | None]


class SourceSetup(NamedTuple):
    """What a source is made ready with, on the training device before training."""

    ctx: DistContext
    batches: TrainingBatches
    precision: loop.Precision
    report: Reporter


class SourcePlan(Protocol):
    """What a source is built from (`DistillPlan` is one)."""

    @property
    def run(self) -> RunPlan: ...

    @property
    def teacher(self) -> EnsembleConfig | None: ...

    @property
    def teacher_features(self) -> tuple[int, ...]: ...


class TeacherSource(Protocol):
    """The one interface the distillation task calls."""

    # The teacher model that runs, if one does (the validation KD loss runs it too).
    teacher: TeacherEnsemble | None

    @staticmethod
    def serves(cfg: DistillConfig, features: tuple[int, ...]) -> bool:
        """Whether a run with these settings (and teacher stages `features` for a feature
        loss) takes its teacher outputs from this source."""
        ...

    def prepare(self, setup: SourceSetup) -> None:
        """Once before training, on the training device: place, compile, cache or load."""
        ...

    def start_epoch(self, epoch: int) -> None:
        """Before each epoch (0-based)."""
        ...

    def outputs(self, images: torch.Tensor, indices: torch.Tensor | None, mix: float) -> Outputs:
        """The teacher outputs for this augmented batch: the images, their dataset positions
        and the batch's Mixup/CutMix share λ (1.0: unmixed)."""
        ...


class LiveTeacher:
    """The teacher runs on every augmented batch the student sees."""

    def __init__(self, plan: SourcePlan, temperature: float) -> None:
        cfg = plan.run.config
        assert isinstance(cfg, DistillConfig) and plan.teacher is not None
        self.cfg = cfg
        self.plan = plan
        image_config = plan.run.image_config
        student_input = InputSpec(image_config.img_size, image_config.mean, image_config.std)
        # Placed in `prepare`, once the precision is known.
        self.teacher, _ = build_teacher(
            plan.teacher, plan.run.card.num_classes, student_input, cfg.teacher_img_size
        )

    @staticmethod
    def serves(cfg: DistillConfig, features: tuple[int, ...]) -> bool:
        """Any run with a teacher to run."""
        return cfg.soft_labels is None

    def prepare(self, setup: SourceSetup) -> None:
        """The teacher on the device in the run's precision; with --compile, compiled."""
        setup.precision.place(self.teacher)
        self.teacher.bf16 = setup.precision.bf16
        if self.cfg.compile:
            for member in self.teacher.members:
                failed = loop.compile_module(member, setup.ctx.device)
                if failed:
                    setup.report.warn(f"--compile is not available for the teacher ({failed})")
                    break

    def start_epoch(self, epoch: int) -> None:
        """The teacher is the same every epoch."""

    def outputs(self, images: torch.Tensor, indices: torch.Tensor | None, mix: float) -> Outputs:
        """The teacher's logits for exactly this batch."""
        return self.teacher(images), None


class LiveFeatures(LiveTeacher):
    """A live teacher that also gives its feature maps at the stages the exits match."""

    @staticmethod
    def serves(cfg: DistillConfig, features: tuple[int, ...]) -> bool:
        """A loss with feature terms (the plan found the stages the exits match)."""
        return cfg.soft_labels is None and bool(features)

    def outputs(self, images: torch.Tensor, indices: torch.Tensor | None, mix: float) -> Outputs:
        """The teacher's logits and its maps at `plan.teacher_features`."""
        return self.teacher.logits_and_features(images, self.plan.teacher_features)


class CachedOutputs(LiveTeacher):
    """--teacher-cache: the teacher's logits for every training image, computed once."""

    def __init__(self, plan: SourcePlan, temperature: float) -> None:
        super().__init__(plan, temperature)
        self.cache: torch.Tensor | None = None

    @staticmethod
    def serves(cfg: DistillConfig, features: tuple[int, ...]) -> bool:
        """--teacher-cache with a teacher to run."""
        return cfg.soft_labels is None and cfg.teacher_cache

    def prepare(self, setup: SourceSetup) -> None:
        """The live teacher's set-up, then one pass over the training split to fill the cache."""
        super().prepare(setup)
        ctx, batches, precision, report = setup
        start = time.perf_counter()
        self.cache = teacher_outputs(
            self.teacher,
            batches,
            ctx,
            precision,
            self.cfg.batch_size,
            self.plan.run.card.num_classes,
        )
        report.info(
            f"teacher outputs cached for {len(batches)} images in "
            f"{time.perf_counter() - start:.1f} s; no teacher forward during training"
        )

    def outputs(self, images: torch.Tensor, indices: torch.Tensor | None, mix: float) -> Outputs:
        """The cached rows of this batch's images (the live teacher before `prepare`, or for
        a batch without positions)."""
        if self.cache is None or indices is None:
            return super().outputs(images, indices, mix)
        return self.cache[indices.to(self.cache.device, non_blocking=True)], None


class StoredOutputs:
    """--soft-labels: no teacher runs; the store's outputs for the views the pipeline replays."""

    teacher = None

    def __init__(self, plan: SourcePlan, temperature: float) -> None:
        cfg = plan.run.config
        assert isinstance(cfg, DistillConfig) and cfg.soft_labels is not None
        self.folder = cfg.soft_labels
        self.output = cfg.output
        self.replay = plan.run.view_replay
        self.num_classes = plan.run.card.num_classes
        self.temperature = temperature  # the loss reads the teacher at it: a blend is made at it
        # The store's logits (images, views, k) on the device with their classes (None when the
        # store holds every class: the logits are then in class order), and the view each image
        # takes this epoch.
        self.tables: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.epoch_views: torch.Tensor | None = None

    @staticmethod
    def serves(cfg: DistillConfig, features: tuple[int, ...]) -> bool:
        """--soft-labels STORE."""
        return cfg.soft_labels is not None

    def prepare(self, setup: SourceSetup) -> None:
        """The whole store's tables on the device."""
        ctx, batches, _, report = setup
        store = SoftLabelStore(self.folder, read_manifest(self.folder))
        logits, classes = store.tables()
        self.tables = replay_tables(logits, classes, self.num_classes, ctx.device)
        report.info(
            f"teacher outputs from {self.folder}: {store.manifest.views} views of "
            f"{len(batches)} images, top {store.manifest.top_k}; no teacher runs"
        )

    def start_epoch(self, epoch: int) -> None:
        """Each image's view for the epoch (the pipeline replays the same ones)."""
        if self.replay is not None and self.tables is not None:
            self.epoch_views = self.replay.epoch_views(epoch).to(self.tables[0].device)

    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        """This batch's stored teacher logits in the images' epoch views (`stored_logits`)."""
        assert self.tables is not None and self.epoch_views is not None
        logits, classes = self.tables
        return stored_logits(logits, classes, self.epoch_views, indices, self.num_classes)

    def outputs(self, images: torch.Tensor, indices: torch.Tensor | None, mix: float) -> Outputs:
        """The stored outputs; a batch mixed by Mixup/CutMix (`mix` = λ < 1) learns those of
        its two views blended with the images' own λ."""
        assert indices is not None, "a soft-label store is read by the images' positions"
        return mixed_teacher_logits(self.logits(indices), mix, self.temperature), None


# Every source by name, in the order they are asked whether they serve a run: the first that
# does is the run's (`choose_source`).
TEACHER_SOURCES: dict[str, type[TeacherSource]] = {
    "stored": StoredOutputs,
    "features": LiveFeatures,
    "cached": CachedOutputs,
    "live": LiveTeacher,
}


def choose_source(cfg: DistillConfig, features: tuple[int, ...]) -> str:
    """The name of the source a run takes its teacher outputs from (at plan time)."""
    return next(name for name, source in TEACHER_SOURCES.items() if source.serves(cfg, features))


def build_source(name: str, plan: SourcePlan, temperature: float) -> TeacherSource:
    """The source `choose_source` named, for a task whose loss reads the teacher at
    `temperature`."""
    return TEACHER_SOURCES[name](plan, temperature)


def teacher_outputs(
    teacher: torch.nn.Module,
    batches: TrainingBatches,
    ctx: DistContext,
    precision: loop.Precision,
    batch_size: int,
    num_classes: int,
) -> torch.Tensor:
    """The teacher's logits for every training image, (N, classes) on every rank's device.

    Each rank runs its share; the rows are summed across ranks (the others' rows are zero).
    """
    cache = torch.zeros(len(batches), num_classes, device=ctx.device)
    for batch in batches.shard_in_order(batch_size):
        if batch.images.shape[0]:
            logits = teacher(precision.to_device(batch.images)).float()
            cache[batch.indices.to(ctx.device)] = logits
    return ctx.all_reduce_sum(cache)
