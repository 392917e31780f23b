"""The teacher task: cross-entropy training of one timm model (`mlkd teacher train`).

Beside `distiller.py` (the distillation task); both hand a `Task` to `trainer.fit`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from mlkd_cli.core.checkpoint import ModelCard, read_weights
from mlkd_cli.core.console import Reporter
from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.loaders import TrainingBatches
from mlkd_cli.data.registry import get_dataset_spec, load_splits
from mlkd_cli.engine import loop, planning, trainer
from mlkd_cli.engine.config import TeacherTrainConfig
from mlkd_cli.engine.planning import RunFiles, RunPlan
from mlkd_cli.models.factory import (
    build_model,
    check_input_size,
    check_model_name,
    pretrained_source,
    weights_note,
)


def plan_teacher_training(cfg: TeacherTrainConfig) -> RunPlan:
    """Validate flags, data, model and files in the launching process; raise UserError early."""
    cfg.validate()
    check_model_name(cfg.model)
    get_dataset_spec(cfg.dataset)  # the default run name is made of it: checked first
    if cfg.pretrained:
        pretrained_source(cfg.model)  # offline without the weights: refused before any file
    # the name and the files first: a refusal there costs nothing
    files = planning.RunFiles(cfg.output_dir, cfg.run_name)
    planning.check_output_files(cfg, files, identity=("model", "dataset"))
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    image_config = planning.dataset_image_config(cfg, splits)
    planning.data_pipeline(cfg, splits, image_config)
    planning.check_image_config(image_config)
    # Built once here, on the CPU, so a bad checkpoint or image size fails before any worker.
    model = build_model(
        cfg.model,
        splits.num_classes,
        init_checkpoint=cfg.init_checkpoint,
        init_ema=cfg.init_ema,
        drop_path_rate=cfg.drop_path,
    )
    check_input_size(model, cfg.model, image_config.img_size)
    if cfg.init_checkpoint is not None:
        _, meta = read_weights(cfg.init_checkpoint, cfg.init_ema)
        note = weights_note(cfg.init_checkpoint, meta, "--no-init-ema")
        if note:
            Reporter(cfg.output).info(f"--init-checkpoint {note}")
    return planning.make_plan(cfg, cfg.model, splits, image_config, "teacher")


class TeacherTask:
    """Cross-entropy training of one timm model."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan

    def build(self, ctx: DistContext) -> nn.Module:
        """The timm model, from scratch, the hub or a local checkpoint."""
        cfg = self.plan.config
        assert isinstance(cfg, TeacherTrainConfig)
        return build_model(
            cfg.model,
            self.plan.card.num_classes,
            cfg.pretrained,
            cfg.init_checkpoint,
            cfg.init_ema,
            cfg.drop_path,
        )

    def start_epoch(self, epoch: int) -> None:
        """Nothing changes from epoch to epoch in plain training."""

    def prepare(
        self, ctx: DistContext, batches: TrainingBatches, precision: loop.Precision
    ) -> None:
        """Nothing to prepare for cross-entropy training."""

    step = staticmethod(loop.cross_entropy_step)

    def evaluate(
        self, model: nn.Module, loader: DataLoader, ctx: DistContext, precision: loop.Precision
    ) -> dict[str, float]:
        """Top-1, top-5 and NLL of the model on the validation split."""
        metrics = loop.evaluate(model, loader, ctx, precision)
        return {f"val_{k}" if k != "count" else "val_images": v for k, v in metrics.items()}

    def score(self, row: dict[str, Any]) -> float:
        """Validation top-1: the best model is the most accurate one."""
        return row["val_top1"]

    def plain_model(self, model: nn.Module) -> nn.Module:
        """A teacher is already a plain timm model."""
        return model

    def save_best(
        self, model: nn.Module, files: RunFiles, card: ModelCard, epoch: int, metrics: dict
    ) -> None:
        """Nothing goes beside a teacher's best model."""

    def report_epoch(self, report: Reporter, row: dict[str, Any], improved: bool) -> None:
        """One line per epoch, as a distillation's: loss, validation top-1, top-5 and NLL."""
        report.info(
            f"epoch {row['epoch']}/{self.plan.config.epochs}: loss {row['train_loss']:.4f}, "
            f"top-1 {row['val_top1']:.2f}, top-5 {row['val_top5']:.2f}, "
            f"nll {row['val_nll']:.4f}, {row['images_per_s']:.0f} img/s"
            + (" *best*" if improved else "")
        )


def train_teacher(ctx: DistContext, plan: RunPlan) -> dict[str, Any]:
    """Fine-tune one timm model on one dataset (the worker `mlkd teacher train` launches)."""
    return trainer.fit(ctx, plan, TeacherTask(plan))
