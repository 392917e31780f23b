"""Ensemble weight fitting: member logits over one split, then a likelihood fit on them.

Members run once over the held-out validation split (no augmentation); the logits are kept and
the weights (and optionally a temperature) fitted by minimising the ensemble's negative
log-likelihood on them. Nothing else of the dataset is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mlkd_cli.core.console import OutputOptions, Reporter
from mlkd_cli.core.constants import DEFAULT_MEAN, DEFAULT_STD
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.metrics import classification_metrics
from mlkd_cli.data.registry import DEFAULT_VAL_FRACTION, get_dataset_spec, load_splits
from mlkd_cli.data.transforms import ImageConfig
from mlkd_cli.engine.launch import launch, launcher_rank, resolve_device
from mlkd_cli.engine.precision import check_precision
from mlkd_cli.models.ensemble_config import (
    EnsembleConfig,
    read_ensemble_config,
    write_ensemble_config,
)
from mlkd_cli.models.teacher import InputSpec, build_teacher, combine_logits, load_member
from mlkd_cli.passes.logits import PlannedPass, place_for_pass, split_dataset, split_logits


@dataclass(frozen=True, kw_only=True)
class EnsemblePlan(PlannedPass):
    """A checked ensemble job: which file, which data, which split, how to run."""

    config: EnsembleConfig


@dataclass(frozen=True, kw_only=True)
class LogitsRequest:
    """A pass of an ensemble file's members over a split (`ensemble build/eval`, the pipeline)."""

    config_path: Path
    models_dir: Path | None = None  # where the original format's names resolve
    dataset: str | None = None  # None: the members' cards say
    data_dir: Path = Path("data")
    split: str = "val"
    val_fraction: float | None = None  # None: the members'
    batch_size: int = 128
    world_size: int = 1
    device: str = "auto"
    precision: str = "auto"  # --precision: auto, bf16 or fp32
    teacher_ema: bool = True  # members saved by timm's train.py: their EMA weights
    workers: int | None = None
    output: OutputOptions = field(default_factory=OutputOptions)


def plan_ensemble_run(request: LogitsRequest, config: EnsembleConfig) -> EnsemblePlan:
    """Check every member and the data before any worker starts."""
    dataset, data_dir, split = request.dataset, request.data_dir, request.split
    val_fraction, batch_size = request.val_fraction, request.batch_size
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_precision(request.precision, resolve_device(request.device))
    num_classes = get_dataset_spec(dataset).num_classes if dataset else None
    config = config.with_ema(request.teacher_ema)
    members = [load_member(spec, num_classes) for spec in config.members]
    for member in members:
        if member.note:
            Reporter(request.output).info(f"member {member.note}")
    cards = [m.card for m in members if m.card is not None]
    recorded = sorted({c.dataset for c in cards})
    if dataset is None:
        if len(recorded) != 1 or len(cards) != len(members):
            raise UserError(
                "the members do not record one common dataset; pass --dataset"
                + (f" (they say {', '.join(recorded)})" if recorded else "")
            )
        dataset = recorded[0]
    if val_fraction is None:
        fractions = {c.extra.get("val_fraction") for c in cards} - {None}
        if len(fractions) > 1:
            raise UserError(
                f"the members were trained with different validation splits ({sorted(fractions)}); "
                "pass --val-fraction"
            )
        val_fraction = fractions.pop() if fractions else DEFAULT_VAL_FRACTION
    splits = load_splits(dataset, data_dir, False, val_fraction)
    for member in members:
        classes = member.card.num_classes if member.card else splits.num_classes
        if classes != splits.num_classes:
            raise UserError(
                f"{member.spec.checkpoint} predicts {classes} classes but {dataset} has "
                f"{splits.num_classes}; use teachers trained on {dataset}"
            )
    spec = splits.spec
    first = cards[0] if cards else None
    img_size = max((c.img_size for c in cards), default=spec.img_size)
    image_config = ImageConfig(
        img_size=img_size,
        crop_pct=first.crop_pct if first else spec.crop_pct,
        mean=tuple(first.mean) if first else DEFAULT_MEAN,
        std=tuple(first.std) if first else DEFAULT_STD,
    )
    split_dataset(
        splits, split, image_config
    )  # refuses an unknown or absent split, before any worker
    return EnsemblePlan(
        config=config,
        dataset=dataset,
        data_dir=data_dir,
        split=split,
        val_fraction=val_fraction,
        image_config=image_config,
        batch_size=batch_size,
        workers=request.workers,
        precision=request.precision,
        output=request.output,
    )


def collect_member_logits(ctx: DistContext, plan: EnsemblePlan) -> dict[str, Any]:
    """Every member's logits over the plan's split, gathered in dataset order (rank 0 returns)."""
    splits = load_splits(plan.dataset, plan.data_dir, False, plan.val_fraction)
    dataset = split_dataset(splits, plan.split, plan.image_config)
    input_spec = InputSpec(
        plan.image_config.img_size, plan.image_config.mean, plan.image_config.std
    )
    teacher, loaded = build_teacher(plan.config, splits.num_classes, input_spec)
    precision, report = place_for_pass(plan, teacher, ctx, len(dataset))
    logits, labels, _ = split_logits(
        ctx,
        teacher.member_logits,
        precision,
        dataset,
        plan.batch_size,
        plan.workers,
        report,
        f"{len(teacher.members)} members on {plan.split}",
    )
    return {
        "logits": logits,
        "labels": labels,
        "names": teacher.names,
        "archs": [m.arch for m in loaded],
    }


def ensemble_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (percent) and mean NLL of one set of logits."""
    metrics = classification_metrics(logits, labels)
    return {"top1": metrics["top1"], "nll": metrics["nll"]}


@dataclass
class EnsembleFit:
    """Fitted weights and temperature, with the held-out NLL before and after."""

    weights: list[float]
    temperature: float | None
    equal_nll: float
    fitted_nll: float


def fit_ensemble_weights(
    member_logits: torch.Tensor,
    labels: torch.Tensor,
    fit_temperature: bool = False,
    max_iter: int = 200,
) -> EnsembleFit:
    """Minimise the ensemble's NLL over its weights, and over a temperature if asked.

    The weights are a mixture held to mean 1 (`n * softmax`), like the original's fitted weights
    (all near 1): free in scale they would, on a validation split every member already classifies
    perfectly, grow without bound and make the teacher wildly over-confident. The temperature
    carries a weak Gaussian prior on its logarithm (strength 1/N) for the same reason. Starts from
    equal weights at temperature 1, so the fit is never worse than them on the fitting split.
    """
    z = member_logits.double()
    y = labels.long()
    n, count = z.shape[0], max(1, z.shape[1])
    equal = torch.ones(n, dtype=torch.float64)
    equal_nll = float(F.cross_entropy(combine_logits(z, equal), y))
    raw = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def weights_of() -> torch.Tensor:
        return n * torch.softmax(raw, 0)

    def nll() -> torch.Tensor:
        temperature = log_t.exp() if fit_temperature else 1.0
        return F.cross_entropy(combine_logits(z, weights_of(), temperature), y)

    def objective() -> torch.Tensor:
        prior = 0.5 * log_t.square() / count if fit_temperature else 0.0
        return nll() + prior

    params = [raw, log_t] if fit_temperature else [raw]
    optimiser = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        fitted_nll = float(nll())
        weights = weights_of().tolist()
        temperature = float(log_t.exp()) if fit_temperature else None
    if not math.isfinite(fitted_nll) or fitted_nll > equal_nll:
        return EnsembleFit(equal.tolist(), 1.0 if fit_temperature else None, equal_nll, equal_nll)
    return EnsembleFit(weights, temperature, equal_nll, fitted_nll)


def ensemble_table_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    archs: list[str],
    rows: list[tuple[str, list[float], float]],
) -> list[dict[str, Any]]:
    """Each member's figures, then one row per (label, weights, temperature) ensemble."""
    table = []
    for i, (name, arch) in enumerate(zip(names, archs, strict=True)):
        table.append({"name": name, "arch": arch, **ensemble_metrics(logits[i], labels)})
    for label, weights, temperature in rows:
        combined = combine_logits(
            logits.double(), torch.tensor(weights, dtype=torch.float64), temperature
        )
        table.append(
            {
                "name": label,
                "arch": "ensemble",
                "weights": list(weights),
                "temperature": temperature,
                **ensemble_metrics(combined, labels),
            }
        )
    return table


@dataclass
class LogitsPass:
    """One pass of every member over a split, as the commands need it."""

    config: EnsembleConfig
    plan: EnsemblePlan
    logits: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    archs: list[str]

    def rows(self, label: str, weights: list[float], temperature: float) -> list[dict[str, Any]]:
        """Member rows, the equal-weight ensemble, and the ensemble with these weights."""
        equal = ("equal weights", [1.0] * len(self.config.members), 1.0)
        return ensemble_table_rows(
            self.logits, self.labels, self.names, self.archs, [equal, (label, weights, temperature)]
        )


def run_logits_pass(request: LogitsRequest) -> LogitsPass | None:
    """Run the members over the split; None on ranks other than 0 under torchrun."""
    config = read_ensemble_config(request.config_path, request.models_dir)
    plan = plan_ensemble_run(request, config)
    collected = launch(
        collect_member_logits,
        plan,
        request.world_size,
        request.device,
        memory_hint=f"lower --batch-size, now {request.batch_size} per process",
        workers=request.workers,
    )
    if launcher_rank() != 0:
        return None
    return LogitsPass(
        config,
        plan,
        torch.from_numpy(collected["logits"]),
        torch.from_numpy(collected["labels"]),
        collected["names"],
        collected["archs"],
    )


def fit_and_write(
    run: LogitsPass, fit_temperature: bool, destination: Path
) -> tuple[EnsembleFit, list[dict[str, Any]]]:
    """Fit the weights on the pass's logits and write the file; returns the fit and table rows."""
    fit = fit_ensemble_weights(run.logits, run.labels, fit_temperature)
    rows = run.rows("fitted", fit.weights, fit.temperature or 1.0)
    # Without a fitted temperature the weights were fitted at temperature 1: the file says so.
    write_ensemble_config(run.config.with_fit(fit.weights, fit.temperature or 1.0), destination)
    return fit, rows
