"""Running models over a dataset split: logits gathered in dataset order, and `mlkd eval`'s jobs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mlkd_cli.console import OutputOptions, Reporter, UserError
from mlkd_cli.data.loaders import ShardSampler, TransformedSubset, build_eval_loader
from mlkd_cli.data.registry import DataSplits, get_dataset_spec, load_splits
from mlkd_cli.data.transforms import ImageRecipe, build_eval_transform
from mlkd_cli.engine.checkpoint import ModelCard
from mlkd_cli.engine.launch import DistContext
from mlkd_cli.engine.loop import Precision
from mlkd_cli.models.ensemble_config import EnsembleConfig
from mlkd_cli.models.factory import load_trained_model
from mlkd_cli.models.teacher import InputSpec, build_teacher

SPLITS = ("val", "test")


def split_dataset(splits: DataSplits, split: str, recipe: ImageRecipe) -> TransformedSubset:
    """The evaluation-transformed images of one split ('val' or 'test')."""
    if split == "val":
        return TransformedSubset(splits.val, splits.val_indices, build_eval_transform(recipe))
    if split == "test":
        if splits.test is None:
            raise UserError(f"{splits.spec.name} has no test split here; use --split val")
        return TransformedSubset(splits.test, range(len(splits.test)), build_eval_transform(recipe))
    raise UserError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")


def split_logits(
    ctx: DistContext,
    forward: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int,
    workers: int | None,
    report: Reporter,
    description: str,
) -> tuple[np.ndarray, np.ndarray, float]:
    """`forward`'s logits over `dataset` (batch on the second-to-last axis), in dataset order.

    Each rank runs its shard (items r, r + W, ...); rank 0 reassembles them. Also returns the
    wall-clock seconds of the pass.
    """
    loader = build_eval_loader(dataset, batch_size, ctx, workers)
    precision = Precision(ctx.device)
    chunks, unreadable = [], []
    start = time.perf_counter()
    with report.step_progress(description, len(loader)) as tick, torch.inference_mode():
        for step, batch in enumerate(loader, start=1):
            logits = None
            if batch.images.shape[0]:
                with precision.autocast():
                    logits = forward(precision.to_device(batch.images)).float().cpu()
            chunks.append((logits, batch))
            unreadable.extend(batch.skipped)
            if tick is not None:
                tick(step, None)
    seconds = time.perf_counter() - start
    shard_logits, shard_labels = _assemble_shard(chunks)
    shards = ctx.gather_objects((shard_logits, shard_labels, unreadable))
    total = sum(len(y) for _, y, _ in shards)
    template = next((x for x, _, _ in shards if x is not None), None)
    if template is None:
        raise UserError(f"no image of the split could be read ({description}); check the files")
    logits = np.zeros((*template.shape[:-2], total, template.shape[-1]), dtype=np.float32)
    ordered = np.zeros(total, dtype=np.int64)
    for rank, (shard_x, shard_y, _) in enumerate(shards):
        # The positions the loader's sampler gave this rank, in the order it gave them.
        positions = np.asarray(
            ShardSampler(total, rank, ctx.world_size, batch_size).indices, dtype=np.int64
        )
        if shard_x is not None:  # None: no image of that shard was readable
            logits[..., positions, :] = shard_x
        ordered[positions] = shard_y
    left_out = [image for _, _, part in shards for image in part]
    if left_out:
        # Unreadable images hold label -1; every pass over the split leaves out the same ones.
        for image in left_out:
            report.warn(f"left out unreadable image {image.path} ({image.reason})")
        keep = ordered >= 0
        logits, ordered = logits[..., keep, :], ordered[keep]
    return logits, ordered, seconds


def _assemble_shard(chunks: list) -> tuple[np.ndarray | None, np.ndarray]:
    """One rank's logits and labels in loader order, unreadable items as NaN rows, label -1."""
    template = next((x for x, _ in chunks if x is not None), None)
    if template is None:
        count = sum(len(b.skipped) for _, b in chunks)
        return None, np.full(count, -1, dtype=np.int64)
    rows, labels = [], []
    for logits, batch in chunks:
        size = len(batch.labels) + len(batch.skipped)
        if batch.kept is None:
            rows.append(logits)
            labels.append(batch.labels)
            continue
        full = torch.full((*template.shape[:-2], size, template.shape[-1]), float("nan"))
        full_labels = torch.full((size,), -1, dtype=torch.long)
        if logits is not None:
            full[..., batch.kept, :] = logits
            full_labels[batch.kept] = batch.labels
        rows.append(full)
        labels.append(full_labels)
    return torch.cat(rows, dim=-2).numpy(), torch.cat(labels).numpy()


@dataclass(frozen=True)
class EvalJob:
    """One checkpoint (or ensemble file) to evaluate on one split."""

    path: Path
    label: str
    dataset: str
    data_dir: Path
    split: str
    val_fraction: float
    recipe: ImageRecipe
    arch: str | None = None
    num_classes: int | None = None
    ensemble: EnsembleConfig | None = None
    batch_size: int = 128
    workers: int | None = None
    output: OutputOptions = field(default_factory=OutputOptions)


def plan_model_job(
    path: Path,
    arch: str | None,
    num_classes: int | None,
    dataset: str | None,
    data_dir: Path,
    split: str,
    img_size: int | None,
    batch_size: int,
    workers: int | None,
    output: OutputOptions,
) -> EvalJob:
    """Check a model checkpoint and settle what to run it on, from its card or the flags."""
    _, card = load_trained_model(path, arch, num_classes)
    dataset = dataset or (card.dataset if card else None)
    if dataset is None:
        raise UserError(f"{path} does not record its dataset; pass --dataset")
    spec = get_dataset_spec(dataset)
    if card is not None:
        recipe = card_recipe(card)
    else:
        recipe = ImageRecipe(img_size=spec.img_size, crop_pct=spec.crop_pct)
    if img_size is not None:
        recipe = replace(recipe, img_size=img_size)
    val_fraction = float(card.extra.get("val_fraction", 0.1)) if card else 0.1
    splits = load_splits(dataset, data_dir, False, val_fraction)
    classes = card.num_classes if card else num_classes
    if classes != splits.num_classes:
        raise UserError(
            f"{path} predicts {classes} classes but {dataset} has {splits.num_classes}; "
            "pass the --dataset it was trained on"
        )
    split_dataset(splits, split, recipe)  # refuses a split the dataset lacks, before any worker
    return EvalJob(
        path,
        path.name,
        dataset,
        data_dir,
        split,
        val_fraction,
        recipe,
        arch or (card.arch if card else None),
        classes,
        None,
        batch_size,
        workers,
        output,
    )


def run_eval_job(ctx: DistContext, job: EvalJob) -> dict[str, Any]:
    """Logits of one checkpoint or ensemble over the job's split (rank 0's result is complete)."""
    splits = load_splits(job.dataset, job.data_dir, False, job.val_fraction)
    dataset = split_dataset(splits, job.split, job.recipe)
    if job.ensemble is not None:
        input_spec = InputSpec(job.recipe.img_size, job.recipe.mean, job.recipe.std)
        model, _, _ = build_teacher(job.ensemble, splits.num_classes, input_spec)
    else:
        model, _ = load_trained_model(job.path, job.arch, job.num_classes)
        model.eval()
    model.to(ctx.device)
    if ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    report = Reporter(job.output, ctx.rank)
    logits, labels, seconds = split_logits(
        ctx, model, dataset, job.batch_size, job.workers, report, f"{job.label} on {job.split}"
    )
    return {
        "logits": logits,
        "labels": labels,
        "seconds": seconds,
        "class_names": splits.class_names,
        "params": sum(p.numel() for p in model.parameters()),
    }


def card_recipe(card: ModelCard) -> ImageRecipe:
    """The evaluation recipe a model card records."""
    return ImageRecipe(
        img_size=card.img_size,
        crop_pct=card.crop_pct,
        mean=tuple(card.mean),
        std=tuple(card.std),
        interpolation=card.interpolation,
    )


ENSEMBLE_SUFFIXES = (".json", ".yaml", ".yml")


def plan_eval_job(
    path: Path,
    dataset: str | None,
    data_dir: Path,
    split: str,
    arch: str | None,
    num_classes: int | None,
    img_size: int | None,
    models_dir: Path | None,
    batch_size: int,
    workers: int | None,
    output: OutputOptions,
) -> EvalJob:
    """An evaluation job for a checkpoint, or for an ensemble file (by its suffix)."""
    if path.suffix.lower() not in ENSEMBLE_SUFFIXES:
        return plan_model_job(
            path, arch, num_classes, dataset, data_dir, split, img_size, batch_size, workers, output
        )
    from mlkd_cli.engine.ensemble import plan_ensemble_run  # it builds on this module
    from mlkd_cli.models.ensemble_config import read_ensemble_config

    config = read_ensemble_config(path, models_dir)
    plan = plan_ensemble_run(config, dataset, data_dir, split, None, batch_size, workers, output)
    return EvalJob(
        path,
        path.name,
        plan.dataset,
        data_dir,
        split,
        plan.val_fraction,
        plan.recipe,
        ensemble=config,
        batch_size=batch_size,
        workers=workers,
        output=output,
    )


@dataclass
class Measured:
    """One evaluation's figures, with the logits behind them (rank 0 only)."""

    result: dict[str, Any]
    logits: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def measure(job: EvalJob, world_size: int, device: str) -> Measured | None:
    """Run a job on `world_size` processes; rank 0 gets the metrics, other torchrun ranks None."""
    from mlkd_cli.engine.launch import launch, launcher_rank
    from mlkd_cli.metrics import classification_metrics

    collected = launch(
        run_eval_job,
        job,
        world_size,
        device,
        memory_hint=f"lower --batch-size, now {job.batch_size} per process",
    )
    if launcher_rank() != 0:
        return None
    logits = torch.from_numpy(collected["logits"])
    labels = torch.from_numpy(collected["labels"])
    metrics = classification_metrics(logits, labels, collected["class_names"])
    seconds = collected["seconds"]
    metrics["images_per_s"] = len(labels) / seconds if seconds else None
    metrics["params_m"] = collected["params"] / 1e6
    result = {"checkpoint": str(job.path), "dataset": job.dataset, "split": job.split, **metrics}
    return Measured(result, logits, labels, collected["class_names"])
