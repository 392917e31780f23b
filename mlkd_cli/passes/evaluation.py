"""`mlkd eval`'s jobs: a checkpoint or an ensemble file, planned, run over a split, measured."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mlkd_cli.core.console import OutputOptions, Reporter
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.metrics import classification_metrics
from mlkd_cli.data.registry import DataSplits, get_dataset_spec
from mlkd_cli.data.transforms import ImageConfig
from mlkd_cli.models.ensemble_config import EnsembleConfig, read_ensemble_config
from mlkd_cli.models.factory import load_trained_model
from mlkd_cli.models.teacher import InputSpec, build_teacher
from mlkd_cli.passes.ensemble import LogitsRequest, plan_ensemble_run
from mlkd_cli.passes.logits import (
    DEFAULT_DATA_DIR,
    PlannedPass,
    card_image_config,
    check_split,
    data_dir_for,
    launch_pass,
    model_pass,
)


@dataclass(frozen=True, kw_only=True)
class EvalJob(PlannedPass):
    """One checkpoint (or ensemble file) to evaluate on one split."""

    path: Path
    label: str
    arch: str | None = None
    num_classes: int | None = None
    ensemble: EnsembleConfig | None = None


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """What `mlkd eval` (or the pipeline) asks of one checkpoint or ensemble file."""

    path: Path
    dataset: str | None = None  # None: the checkpoint's card says
    data_dir: Path | None = None  # None: the folder the card records, else ./data
    split: str = "test"
    arch: str | None = None  # for plain state dicts
    num_classes: int | None = None  # for plain state dicts
    img_size: int | None = None  # None: the card's
    models_dir: Path | None = None  # where an ensemble file's names resolve
    batch_size: int = 128
    workers: int | None = None
    precision: str = "auto"  # --precision: auto, bf16 or fp32
    output: OutputOptions = field(default_factory=OutputOptions)


def plan_model_job(request: EvalRequest) -> EvalJob:
    """Check a model checkpoint and settle what to run it on, from its card or the flags."""
    path, arch, num_classes = request.path, request.arch, request.num_classes
    _, card = load_trained_model(path, arch, num_classes)
    dataset = request.dataset or (card.dataset if card else None)
    if dataset is None:
        raise UserError(f"{path} does not record its dataset; pass --dataset")
    spec = get_dataset_spec(dataset)
    if card is not None:
        image_config = card_image_config(card)
    else:
        image_config = ImageConfig(img_size=spec.img_size, crop_pct=spec.crop_pct)
    if request.img_size is not None:
        if card is not None and request.img_size != card.img_size:
            # The user asked for it, so it runs; but the figure describes another model than the
            # one trained, and says so.
            Reporter(request.output).warn(
                f"{path} was trained at {card.img_size} px and is evaluated at "
                f"{request.img_size} px (--img-size): top-1 at another size than the training "
                "one is usually far lower; drop --img-size to use the card's"
            )
        image_config = replace(image_config, img_size=request.img_size)
    classes = card.num_classes if card else num_classes
    data_dir = data_dir_for(request.data_dir, request.dataset, card, path, request.output)
    job = EvalJob(
        **_job_basics(request),
        data_dir=data_dir,
        dataset=dataset,
        val_fraction=float(card.extra.get("val_fraction", 0.1)) if card else 0.1,
        image_config=image_config,
        arch=arch or (card.arch if card else None),
        num_classes=classes,
    )
    check_split(path, job, classes)  # before any worker
    return job


def _job_basics(request: EvalRequest) -> dict[str, Any]:
    """What a job takes from its request as it is, whatever it evaluates."""
    return {
        "path": request.path,
        "label": request.path.name,
        "split": request.split,
        "batch_size": request.batch_size,
        "workers": request.workers,
        "precision": request.precision,
        "output": request.output,
    }


def run_eval_job(ctx: DistContext, job: EvalJob) -> dict[str, Any]:
    """Logits of one checkpoint or ensemble over the job's split (rank 0's result is complete)."""

    def build(splits: DataSplits) -> torch.nn.Module:
        if job.ensemble is not None:
            input_spec = InputSpec(
                job.image_config.img_size, job.image_config.mean, job.image_config.std
            )
            return build_teacher(job.ensemble, splits.num_classes, input_spec)[0]
        return load_trained_model(job.path, job.arch, job.num_classes)[0].eval()

    return model_pass(ctx, job, build, job.label)


ENSEMBLE_SUFFIXES = (".json", ".yaml", ".yml")


def plan_eval_job(request: EvalRequest) -> EvalJob:
    """An evaluation job for a checkpoint, or for an ensemble file (by its suffix)."""
    if request.path.suffix.lower() not in ENSEMBLE_SUFFIXES:
        return plan_model_job(request)
    config = read_ensemble_config(request.path, request.models_dir)
    plan = plan_ensemble_run(
        LogitsRequest(
            config_path=request.path,
            dataset=request.dataset,
            data_dir=request.data_dir or DEFAULT_DATA_DIR,
            split=request.split,
            batch_size=request.batch_size,
            workers=request.workers,
            precision=request.precision,
            output=request.output,
        ),
        config,
    )
    checked = {name: getattr(plan, name) for name in ("dataset", "val_fraction", "image_config")}
    return EvalJob(**_job_basics(request), **checked, data_dir=plan.data_dir, ensemble=config)


@dataclass
class Measured:
    """One evaluation's figures, with the logits behind them (rank 0 only)."""

    result: dict[str, Any]
    logits: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def measure(job: EvalJob, world_size: int, device: str) -> Measured | None:
    """Run a job on `world_size` processes; rank 0 gets the metrics, other torchrun ranks None."""
    collected = launch_pass(run_eval_job, job, world_size, device)
    if collected is None:
        return None
    logits, labels = collected["logits"], collected["labels"]
    metrics = classification_metrics(logits, labels, collected["class_names"])
    seconds = collected["seconds"]
    metrics["images_per_s"] = len(labels) / seconds if seconds else None
    metrics["params_m"] = collected["params"] / 1e6
    result = {
        "checkpoint": str(job.path),
        "dataset": job.dataset,
        "split": job.split,
        "img_size": job.image_config.img_size,
        **metrics,
    }
    return Measured(result, logits, labels, collected["class_names"])
