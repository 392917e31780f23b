"""Multi-level knowledge distillation: a multi-exit student learns from a frozen teacher.

The run is the shared `fit` loop with a `DistillTask`: every step the teacher's outputs for the
student's augmented batch come from the run's teacher source (`teacher_sources.py`: the live
teacher or ensemble, its cached outputs, or a soft-label store; chosen once when the run is
planned), and every head of the student — the final classifier and each exit — takes the KD loss
against the teacher's softened outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mlkd_cli.core.checkpoint import ModelCard, save_exits_model
from mlkd_cli.core.console import Reporter
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.loaders import TrainingBatches
from mlkd_cli.data.registry import DataSplits, get_dataset_spec, load_splits
from mlkd_cli.data.softlabels import open_store, read_manifest, store_image_config
from mlkd_cli.data.transforms import ImageConfig
from mlkd_cli.data.views import ViewReplay
from mlkd_cli.engine import loop
from mlkd_cli.engine.config import DistillConfig, TrainConfig
from mlkd_cli.engine.planning import (
    RunFiles,
    RunPlan,
    check_image_config,
    check_output_files,
    data_pipeline,
    dataset_image_config,
    make_plan,
)
from mlkd_cli.engine.provenance import store_identity, teacher_identity
from mlkd_cli.engine.teacher_sources import SourceSetup, build_source, choose_source
from mlkd_cli.engine.trainer import fit
from mlkd_cli.losses.heads import Head
from mlkd_cli.losses.registry import build_loss, loss_spec
from mlkd_cli.models.ensemble_config import EnsembleConfig, resolve_teacher
from mlkd_cli.models.exits import exits_record
from mlkd_cli.models.factory import (
    check_input_size,
    check_model_name,
    pretrained_source,
)
from mlkd_cli.models.student import (
    FeatureAdaptedStudent,
    MultiExitStudent,
    build_student,
    find_stages,
    parse_exit_weights,
    parse_exits,
    unwrap_student,
)
from mlkd_cli.models.teacher import (
    InputSpec,
    LoadedMember,
    input_lines,
    input_sizes,
    load_member,
)


@dataclass(frozen=True)
class DistillPlan:
    """A checked distillation run: the shared run plan plus teacher and exits."""

    run: RunPlan
    teacher: EnsembleConfig | None  # None: the outputs come from a soft-label store
    exits: tuple[int, ...]
    exit_weights: tuple[float, ...]
    # Feature distillation: per exit, the teacher's feature_info position and width.
    teacher_features: tuple[int, ...] = ()
    teacher_channels: tuple[int, ...] = ()
    # Where the teacher outputs come from (a name in `teacher_sources.TEACHER_SOURCES`).
    source: str = "live"

    @property
    def config(self) -> TrainConfig:
        """The run's settings (what the launcher reads: world size, restarts, batch)."""
        return self.run.config


def plan_distillation(cfg: DistillConfig) -> DistillPlan:
    """Check flags, teacher, student, data and files before any worker starts."""
    cfg.validate()
    check_model_name(cfg.student)
    get_dataset_spec(cfg.dataset)  # the default run name is made of it: checked first
    if cfg.pretrained:
        pretrained_source(cfg.student)  # offline without the weights: refused before any file
    # the name and the files first: a refusal there costs nothing (no teacher loaded)
    files = RunFiles(cfg.output_dir, cfg.run_name)
    check_output_files(cfg, files, identity=("student", "dataset"))
    teacher = (
        None
        if cfg.soft_labels is not None
        else resolve_teacher(
            cfg.teacher_checkpoint, cfg.teacher_model, cfg.ensemble, cfg.models_dir, cfg.teacher_ema
        )
    )
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    report = Reporter(cfg.output)
    members = teacher.members if teacher is not None else ()
    loaded = [load_member(spec, splits.num_classes) for spec in members]
    for member in loaded:
        if member.note:
            report.info(f"teacher {member.note}")
    image_config = dataset_image_config(cfg, splits)
    pipeline = data_pipeline(cfg, splits, image_config)
    check_image_config(image_config)
    replay, taught_by = learns_from(cfg, teacher, loaded, splits, image_config, pipeline)
    # Built once here, on the CPU, so that an unsuitable student is refused before any worker.
    student = build_student(
        cfg.student,
        splits.num_classes,
        None,
        image_config.img_size,
        False,
        cfg.student_checkpoint,
        cfg.exits,
        cfg.exit_head,
        cfg.drop_path,
    )
    check_input_size(student.backbone, cfg.student, image_config.img_size)
    exits = parse_exits(cfg.exits, find_stages(student.backbone, cfg.student), cfg.student)
    weights = parse_exit_weights(cfg.exit_weights, len(exits))
    features, channels = feature_pairs(cfg, loaded, student, exits)
    run = make_plan(
        cfg,
        cfg.student,
        splits,
        image_config,
        "student",
        learns_from_unlabelled=True,
        teacher=taught_by,
    )
    run = replace(run, view_replay=replay)
    seen = InputSpec(image_config.img_size, image_config.mean, image_config.std)
    for line in input_lines(loaded, seen, cfg.teacher_img_size):  # all checked: said
        report.once(line)
    source = choose_source(cfg, features)
    return DistillPlan(run, teacher, tuple(exits), tuple(weights), features, channels, source)


def learns_from(
    cfg: DistillConfig,
    teacher: EnsembleConfig | None,
    loaded: Sequence[LoadedMember],
    splits: DataSplits,
    image_config: ImageConfig,
    pipeline: str,
) -> tuple[ViewReplay | None, dict[str, Any]]:
    """What the student learns from, checked: a soft-label store (None as `teacher`) and the
    views the run replays, or the teacher. With it, what taught the student, for its provenance:
    the store's identity, or the teacher's with the input each member ran at; the loss and
    temperature it was learnt with."""
    replay = None
    if teacher is None:
        assert cfg.soft_labels is not None
        replay = store_replay(cfg, splits, image_config, pipeline)
        source = store_identity(cfg.soft_labels, read_manifest(cfg.soft_labels))
    else:
        seen = InputSpec(image_config.img_size, image_config.mean, image_config.std)
        sizes = input_sizes(loaded, seen, cfg.teacher_img_size)
        source = {**teacher_identity(teacher), "img_size": sizes}
    return replay, {**source, "loss": cfg.loss, "distill_temperature": cfg.temperature}


def store_replay(
    cfg: DistillConfig, splits: DataSplits, image_config: ImageConfig, pipeline: str
) -> ViewReplay:
    """The soft-label store checked against this run (data, classes, size, augmentation and
    pipeline, completeness, checksums): which views the run replays."""
    assert cfg.soft_labels is not None
    expected = {
        "dataset": cfg.dataset,
        "split": "train",
        "images": len(splits.train_indices),
        "classes": list(splits.class_names),
        "img_size": image_config.img_size,
        # the image config, under the manifest's stored key (see StoreManifest)
        "recipe": store_image_config(image_config, pipeline, cfg.augment),
    }
    manifest = open_store(cfg.soft_labels, expected).manifest
    return ViewReplay(manifest.seed, manifest.views, manifest.images)


def check_feature_loss(cfg: DistillConfig, teachers: int) -> None:
    """Refuse what a loss with feature terms cannot run with (before any work)."""
    if not loss_spec(cfg.loss).has_features():
        return
    logit_loss = cfg.loss.split("+")[0]
    if teachers != 1:
        raise UserError(
            f"--loss {cfg.loss} matches the exits' features to one teacher's stages, and an "
            f"ensemble of {teachers} has no single set of stages: use --loss {logit_loss}, or "
            "one teacher (--model with --checkpoint)"
        )
    if cfg.teacher_cache:
        raise UserError(
            f"--teacher-cache keeps the teacher's logits only, and --loss {cfg.loss} needs its "
            f"features every step: drop --teacher-cache or use --loss {logit_loss}"
        )
    if cfg.exits is not None and cfg.exits.strip().lower() in ("", "none"):
        raise UserError(
            f"--loss {cfg.loss} puts its feature terms at the exits and --exits none leaves "
            f"none: give the student exits or use --loss {logit_loss}"
        )


def feature_pairs(
    cfg: DistillConfig,
    teachers: list[LoadedMember],
    student: MultiExitStudent,
    exits: list[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For a loss with feature terms: per exit, the teacher stage it matches (feature_info
    position, width); the stages pair in order, so teacher and student need as many."""
    check_feature_loss(cfg, len(teachers))
    if not loss_spec(cfg.loss).has_features():
        return (), ()
    (teacher,) = teachers
    logit_loss = cfg.loss.split("+")[0]
    try:
        stages = find_stages(teacher.model, teacher.arch)
    except UserError:
        stages = []
    reductions = [s.reduction for s in stages]
    if len(stages) < 2 or any(b <= a for a, b in zip(reductions, reductions[1:], strict=False)):
        raise UserError(
            f"the teacher {teacher.arch} has no stages of falling resolution (a ViT has one "
            f"resolution throughout), so --loss {cfg.loss} has nothing to match the exits to: "
            f"use --loss {logit_loss} or a CNN teacher"
        )
    student_stages = find_stages(student.backbone, cfg.student)
    if len(stages) != len(student_stages):
        raise UserError(
            f"the teacher {teacher.arch} has {len(stages)} stages and the student {cfg.student} "
            f"{len(student_stages)}; --loss {cfg.loss} pairs them in order: choose a teacher "
            f"with {len(student_stages)} stages or use --loss {logit_loss}"
        )
    return (
        tuple(stages[p].feature_index for p in exits),
        tuple(stages[p].channels for p in exits),
    )


class DistillTask:
    """The student with exits learns from the teacher's softened outputs."""

    def __init__(self, ctx: DistContext, plan: DistillPlan) -> None:
        self.plan = plan
        cfg = plan.run.config
        assert isinstance(cfg, DistillConfig)
        self.cfg = cfg
        self.loss = build_loss(
            cfg.loss, cfg.temperature, cfg.alpha, plan.exit_weights, cfg.loss_params
        )
        self.source = build_source(plan.source, plan, self.loss.teacher_temperature)
        self.head_names: list[str] = []
        self.exits_record: dict[str, Any] | None = None
        # Under a label budget: which training images' labels the CE term may use (placed on
        # the device in `prepare`). Mixup and CutMix blend each image with the batch reversed,
        # so a blended image's label is usable only when both of its images are labelled.
        self.labelled: torch.Tensor | None = None
        self.mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0

    def build(self, ctx: DistContext) -> nn.Module:
        """The student backbone (scratch, hub or local weights) with its exits."""
        cfg = self.cfg
        student = build_student(
            cfg.student,
            self.plan.run.card.num_classes,
            list(self.plan.exits),
            self.plan.run.image_config.img_size,
            cfg.pretrained,
            cfg.student_checkpoint,
            exit_head=cfg.exit_head,
            drop_path_rate=cfg.drop_path,
        )
        self.head_names = student.head_names
        if self.plan.teacher_channels:
            return FeatureAdaptedStudent(student, self.plan.teacher_channels)
        return student

    def prepare(
        self, ctx: DistContext, batches: TrainingBatches, precision: loop.Precision
    ) -> None:
        """The label budget's mask on the device, and the teacher source made ready (the
        teacher placed and compiled, its outputs cached, or the store loaded)."""
        labelled = self.plan.run.labelled
        if labelled is not None and self.loss.reads_labels:
            mask = torch.zeros(len(batches), dtype=torch.bool)
            mask[list(labelled)] = True
            self.labelled = mask.to(ctx.device)
        self.source.prepare(
            SourceSetup(ctx, batches, precision, Reporter(self.cfg.output, ctx.rank))
        )

    def start_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch begins (DKD warms up over the first ones), and the teacher
        source (a store chooses each image's view for the epoch)."""
        self.loss.start_epoch(epoch, self.cfg.epochs)
        self.source.start_epoch(epoch)

    def step(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor | None = None,
        mix: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """The loss and its named parts: the teacher's outputs for exactly this augmented batch
        from the source (`mix` = λ, the batch's Mixup/CutMix share), the student's, the loss."""
        teacher_logits, teacher_features = self.source.outputs(images, indices, mix)
        outputs, features = model(images), None
        if teacher_features is not None:
            outputs, features = outputs
        return self.loss.named(
            outputs, teacher_logits, targets, self._labelled(indices), features, teacher_features
        )

    def _labelled(self, indices: torch.Tensor | None) -> torch.Tensor | None:
        """Under a label budget, which of the batch's (possibly blended) images have labels."""
        if self.labelled is None:
            return None
        # Every pipeline gives the positions; without them no label could be told apart.
        assert indices is not None, "a label budget needs the batch's dataset positions"
        labelled = self.labelled[indices.to(self.labelled.device, non_blocking=True)]
        return labelled & labelled.flip(0) if self.mixing else labelled

    def evaluate(
        self, model: nn.Module, loader: DataLoader, ctx: DistContext, precision: loop.Precision
    ) -> dict[str, float]:
        """Top-1/top-5/NLL of the final head, top-1 and NLL of each exit; with `best_by
        val_kd_loss`, the final head's KD loss against the teacher too."""
        extra = self._val_kd_loss if self.cfg.best_by == "val_kd_loss" else None
        heads = loop.evaluate_heads(model, loader, ctx, precision, extra)
        final = heads[0]
        row = {
            "val_top1": final["top1"],
            "val_top5": final["top5"],
            "val_nll": final["nll"],
            "val_images": final["count"],
        }
        if extra is not None:
            row["val_kd_loss"] = final.get("extra", float("nan"))
        for i, head in enumerate(heads[1:], start=1):
            row[f"exit{i}_top1"] = head["top1"]
            row[f"exit{i}_nll"] = head["nll"]
        return row

    def _val_kd_loss(
        self, heads: Sequence[torch.Tensor], images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The final head's loss against the teacher on a validation batch (summed), with hard
        labels in the CE term, as the original validated."""
        targets = F.one_hot(labels, heads[0].shape[1]).float()
        assert self.source.teacher is not None  # a store is refused with val_kd_loss
        loss, _ = self.loss.head_loss(Head(heads[0], self.source.teacher(images), targets))
        return loss * labels.shape[0]

    def score(self, row: dict[str, Any]) -> float:
        """How good an epoch is (higher is better): top-1, or the negated validation KD loss."""
        return -row["val_kd_loss"] if self.cfg.best_by == "val_kd_loss" else row["val_top1"]

    def plain_model(self, model: nn.Module) -> nn.Module:
        """The timm model inside, exits (and feature adapters) dropped."""
        return unwrap_student(model).backbone

    def save_best(
        self, model: nn.Module, files: RunFiles, card: ModelCard, epoch: int, metrics: dict
    ) -> None:
        """`<name>_exits.pth`: the student with its exits and the MACs up to each (counted
        once, at the training size); feature adapters are not part of it."""
        model = unwrap_student(model)
        if not model.exits:
            return  # --exits none: nothing beyond the plain model
        if self.exits_record is None:
            self.exits_record = exits_record(model, self.plan.exits, card.img_size)
        save_exits_model(files.exits, model, card, self.exits_record, epoch, metrics)

    def report_epoch(self, report: Reporter, row: dict[str, Any], improved: bool) -> None:
        """One line an epoch: the loss, the final head's validation top-1 and NLL, and the exit
        that scored best (exits are `exit 1`, `exit 2`, ... as in the table at the end)."""
        line = (
            f"epoch {row['epoch']}/{self.cfg.epochs}: loss {row['train_loss']:.4f}, "
            f"top-1 {row['val_top1']:.2f}, nll {row['val_nll']:.4f}, "
        )
        exits = [(row[f"exit{i}_top1"], -i) for i in range(1, len(self.head_names))]
        if exits:
            top1, i = max(exits)  # the earliest exit among equals
            line += f"exit {-i} {top1:.2f}, "
        line += f"{row['images_per_s']:.0f} img/s" + (" *best*" if improved else "")
        report.info(line)


def distill_student(ctx: DistContext, plan: DistillPlan) -> dict[str, Any]:
    """The worker `mlkd distill` launches on every rank."""
    summary = fit(ctx, plan.run, DistillTask(ctx, plan))
    if plan.teacher is not None:
        summary["teacher"] = [str(m.checkpoint) for m in plan.teacher.members]
    else:
        summary["teacher"] = {"soft_labels": str(plan.run.config.soft_labels)}
    summary["exits"] = list(plan.exits)
    if plan.exits:
        summary["files"]["exits"] = str(plan.run.files.exits)
    return summary
