"""`mlkd eval` of a student with exits: every head, the cascade at several thresholds, each exit
rule's accuracy-against-MACs frontier, the operating point chosen on validation for a top-1 bound
(on the split, or certified on new images with --risk) or a compute budget (rule and thresholds,
written into the checkpoint), and speeds measured with real early stopping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlkd_cli.anytime.certify import Certificate, certify_operating_point
from mlkd_cli.anytime.costs import ExitCosts
from mlkd_cli.anytime.rules import EXIT_RULE, EXIT_RULES, check_rule, check_thresholds
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.anytime.thresholds import (
    TABLE_THRESHOLDS,
    CascadeResult,
    HeadOutputs,
    OperatingPoint,
    choose_operating_point,
    evaluate_cascade,
    frontier,
)
from mlkd_cli.anytime.timing import (
    TIMING_BUDGET_S,
    latency_sources,
    measure_latency,
    time_anytime,
)
from mlkd_cli.core.atomic import check_writable
from mlkd_cli.core.checkpoint import atomic_save, load_checkpoint
from mlkd_cli.core.console import OutputOptions
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.metrics import classification_metrics
from mlkd_cli.data.loaders import build_eval_loader
from mlkd_cli.data.registry import load_splits
from mlkd_cli.engine.launch import resolve_device
from mlkd_cli.engine.precision import Precision, prepare_forward
from mlkd_cli.models.exits import load_exits_checkpoint
from mlkd_cli.passes.logits import (
    PlannedPass,
    card_image_config,
    check_split,
    data_dir_for,
    launch_pass,
    model_pass,
    split_dataset,
)

DEFAULT_MAX_DROP = 0.5  # top-1 points --early-exit may lose when no --budget is given


@dataclass(frozen=True, kw_only=True)
class AnytimeRequest:
    """What `mlkd eval` asks of a student with exits."""

    path: Path
    dataset: str | None = None
    data_dir: Path | None = None  # None: the folder the card records, else ./data
    split: str = "test"
    early_exit: bool = False  # choose thresholds on this (validation) split and save them
    # The criterion --early-exit chooses by (one of the two): top-1 points the cascade may lose
    # against the final head (None: DEFAULT_MAX_DROP unless a budget is given), or the share
    # of the plain model's mean MACs it may spend.
    max_drop: float | None = None
    budget: float | None = None
    exit_rule: str | None = None  # None: --early-exit tries every rule; else this one
    # With max_drop: certify it with probability >= 1 - risk on new images (anytime/certify.py);
    # None: the point estimate on the split.
    risk: float | None = None
    thresholds: tuple[float, ...] | None = None  # a cascade to evaluate besides the table's
    timing_images: int = 512  # images timed per configuration; 0 skips timing
    timing_budget_s: float = TIMING_BUDGET_S  # about how long timing every configuration takes
    latency: bool = False  # time requests of 1 and of --batch-size images (anytime/timing.py)
    batch_size: int = 128
    workers: int | None = None
    precision: str = "auto"
    output: OutputOptions = field(default_factory=OutputOptions)


@dataclass(frozen=True, kw_only=True)
class AnytimeJob(PlannedPass):
    """A checked evaluation of a student with exits."""

    path: Path
    label: str
    costs: ExitCosts  # MACs per image of the cascade's parts, from the checkpoint
    head_names: tuple[str, ...]  # final, then each exit
    saved_thresholds: dict[str, Any] | None  # what an earlier --early-exit chose and wrote
    early_exit: bool
    max_drop: float | None
    budget: float | None
    exit_rule: str | None
    risk: float | None
    thresholds: tuple[float, ...] | None
    timing_images: int
    timing_budget_s: float = TIMING_BUDGET_S
    latency: bool = False

    @property
    def exit_count(self) -> int:
        """Exits before the final head."""
        return len(self.head_names) - 1


def _criterion(request: AnytimeRequest) -> tuple[float | None, float | None]:
    """(max_drop, budget) as --early-exit uses them: one of the two, checked."""
    max_drop, budget = request.max_drop, request.budget
    if max_drop is not None and budget is not None:
        raise UserError("--max-drop and --budget both choose the thresholds; pass one")
    if max_drop is not None and (not math.isfinite(max_drop) or max_drop < 0):
        raise UserError(f"--max-drop must be 0 or more top-1 points, not {max_drop:g}")
    if budget is not None and (not math.isfinite(budget) or budget <= 0):
        raise UserError(
            f"--budget is a share of the plain model's MACs, like 0.5, and must be above 0, "
            f"not {budget:g}"
        )
    if budget is not None and not request.early_exit:
        raise UserError("--budget chooses thresholds: add --early-exit (on --split val)")
    max_drop = DEFAULT_MAX_DROP if budget is None and max_drop is None else max_drop
    _check_risk(request.risk, request.early_exit, budget, max_drop)
    return max_drop, budget


def _check_risk(
    risk: float | None, early_exit: bool, budget: float | None, max_drop: float | None
) -> None:
    """--risk is a probability in (0, 1) that certifies a positive --max-drop with --early-exit."""
    if risk is None:
        return
    if not (math.isfinite(risk) and 0 < risk < 1):
        raise UserError(
            f"--risk is the chance the guarantee fails, like 0.1, and must lie strictly between "
            f"0 and 1, not {risk:g}"
        )
    if not early_exit:
        raise UserError("--risk certifies the thresholds --early-exit chooses: add --early-exit")
    if budget is not None:
        raise UserError(
            "--risk certifies a top-1 drop, not a budget: pass --max-drop, not --budget"
        )
    if not max_drop:
        raise UserError(
            "--risk cannot certify a drop of 0 points from a sample; pass --max-drop above 0"
        )


def _check_latency(request: AnytimeRequest, has_thresholds: bool) -> None:
    """--latency needs the cascade's thresholds (given, recorded or chosen by this run); the
    staged folders beside the checkpoint are read here, so a damaged manifest is refused before
    any work."""
    if not (request.early_exit or has_thresholds):
        raise UserError(
            f"--latency times the cascade at its thresholds and {request.path} has none yet: "
            "add --early-exit (on --split val) or --thresholds"
        )
    latency_sources(request.path)


def plan_anytime_job(request: AnytimeRequest) -> AnytimeJob:
    """Check the checkpoint, the split and every threshold flag before any work starts."""
    max_drop, budget = _criterion(request)
    if request.exit_rule is not None:
        check_rule(request.exit_rule)
    if request.timing_images < 0:
        raise UserError(f"--timing-images must be 0 or more, not {request.timing_images}")
    if request.latency and request.timing_images == 0:
        raise UserError("--latency times images in memory: --timing-images must be above 0")
    checkpoint = load_exits_checkpoint(request.path)
    card = checkpoint.card
    costs = checkpoint.costs
    if costs is None:
        raise UserError(
            f"{request.path}: {card.arch} cannot be run stage by stage, so it cannot stop early"
        )
    cheapest = costs.up_to(0) / costs.plain
    if budget is not None and budget < cheapest:
        raise UserError(
            f"--budget {budget:g} is below the first exit's own cost ({cheapest:.3f} of the plain "
            f"model's MACs), so no cascade fits it; raise --budget to {cheapest:.3f} or more"
        )
    exit_count = len(checkpoint.student.exits)
    thresholds: tuple[float, ...] | None = None
    if request.thresholds is not None:
        thresholds = tuple(check_thresholds(request.thresholds, exit_count))
    if request.latency:
        _check_latency(request, thresholds is not None or checkpoint.thresholds is not None)
    if request.early_exit:
        if thresholds is not None:
            raise UserError("--thresholds and --early-exit both set the thresholds; pass one")
        if request.split != "val":
            raise UserError(
                "--early-exit chooses thresholds on the validation split, never on the test "
                "split; pass --split val (then evaluate on --split test)"
            )
        if checkpoint.exported:
            raise UserError(
                f"--early-exit writes the thresholds into the <name>_exits.pth it evaluates, and "
                f"{request.path} is an export; choose them on the .pth, then export it again"
            )
        check_writable(request.path.resolve().parent, "--early-exit writes into the folder")
    job = AnytimeJob(
        path=request.path,
        label=request.path.name,
        dataset=request.dataset or card.dataset,
        data_dir=data_dir_for(
            request.data_dir, request.dataset, card, request.path, request.output
        ),
        split=request.split,
        val_fraction=float(card.extra.get("val_fraction", 0.1)),
        image_config=card_image_config(card),
        batch_size=request.batch_size,
        workers=request.workers,
        precision=request.precision,
        output=request.output,
        costs=costs,
        head_names=tuple(checkpoint.student.head_names),
        saved_thresholds=checkpoint.exits.get("thresholds"),
        early_exit=request.early_exit,
        max_drop=max_drop,
        budget=budget,
        exit_rule=request.exit_rule,
        risk=request.risk,
        thresholds=thresholds,
        timing_images=request.timing_images,
        timing_budget_s=request.timing_budget_s,
        latency=request.latency,
    )
    check_split(request.path, job, card.num_classes)
    return job


def run_heads_pass(ctx: DistContext, job: AnytimeJob) -> dict[str, Any]:
    """Every head's logits over the job's split, (heads, images, classes) on rank 0."""
    return model_pass(
        ctx, job, lambda _: load_exits_checkpoint(job.path).student, job.label, heads=True
    )


def measure_anytime(job: AnytimeJob, world_size: int, device: str) -> dict[str, Any] | None:
    """Heads, cascades and (with --early-exit) the chosen thresholds; None off rank 0."""
    collected = launch_pass(run_heads_pass, job, world_size, device)
    if collected is None:
        return None
    costs = job.costs
    logits, labels = collected["logits"], collected["labels"]
    heads = []
    for h, name in enumerate(job.head_names):
        metrics = classification_metrics(logits[h], labels, collected["class_names"])
        position = job.exit_count if h == 0 else h - 1  # cascade order: exits, then final
        heads.append(
            {
                # Named as every table names them; the stage an exit reads, beside.
                "head": "final" if h == 0 else f"exit {h}",
                "module": None if h == 0 else name.removeprefix("exit "),
                "top1": metrics["top1"],
                "top5": metrics["top5"],
                "nll": metrics["nll"],
                "ece": metrics["ece"],
                "macs": costs.alone(position),
                "macs_pct": 100.0 * costs.alone(position) / costs.plain,
            }
        )
    outputs = HeadOutputs.from_logits(logits, labels)
    rows, rule, chosen_record, frontiers = _cascade_rows(job, outputs, heads[0]["top1"])
    # The student, its precision and the timed images, loaded once for every timing below.
    timing = _timing_setup(job, device) if job.timing_images else None
    cascades_timed = [(r.thresholds, row_rule) for _, row_rule, r in rows]
    speeds = time_anytime(timing, cascades_timed, job.timing_budget_s) if timing else None
    for i, head in enumerate(heads):
        head["images_per_s"] = speeds["heads"][i] if speeds else None
    cascades = [
        {
            "rule": label,
            "exit_rule": exit_rule,
            **result.to_record(),
            "images_per_s": speeds["cascades"][i] if speeds else None,
        }
        for i, (label, exit_rule, result) in enumerate(rows)
    ]
    latency, latency_missing = None, None
    if job.latency and timing is not None and timing[2]:  # the chosen (else given) cascade
        _, point_rule, point = next(r for r in rows if r[0] in ("chosen", "given"))
        measured = measure_latency(*timing, point.thresholds, point_rule, job.path, costs)
        latency = [row.to_record() for row in measured.rows]
        latency_missing = list(measured.missing)
    return {
        "latency": latency,
        # One line per ONNX form not found beside the checkpoint, naming the export that writes it.
        "latency_missing": latency_missing,
        "checkpoint": str(job.path),
        "dataset": job.dataset,
        "split": job.split,
        "images": int(len(labels)),
        # The final head's figures, as a plain model's evaluation gives them.
        **{key: heads[0][key] for key in ("top1", "top5", "nll", "ece")},
        "exit_rule": rule,
        "frontiers": frontiers,
        "macs_plain": costs.plain,
        "macs_img_size": costs.img_size,
        "heads": heads,
        "cascades": cascades,
        "chosen": chosen_record or job.saved_thresholds,
        "timed_images": speeds["images"] if speeds else 0,
    }


def _cascade_rows(
    job: AnytimeJob, outputs: HeadOutputs, final_top1: float
) -> tuple[list[tuple[str, str, CascadeResult]], str, dict | None, dict | None]:
    """The cascades to show, as (label, exit rule, figures): the chosen (with --early-exit, chosen
    now and saved; else the saved one), the given, and shared thresholds under the chosen rule
    (else the asked, else the default); that rule; the saved record; each rule's frontier."""
    costs = job.costs
    cascade_macs, plain = costs.cascade, costs.plain
    rows: list[tuple[str, str, CascadeResult]] = []
    chosen_record, frontiers = None, None
    rule = job.exit_rule or EXIT_RULE
    if job.early_exit:
        rules = [job.exit_rule] if job.exit_rule else list(EXIT_RULES)
        certificate = None
        if job.risk is not None and job.max_drop is not None:
            point, certificate = certify_operating_point(
                outputs, cascade_macs, plain, max_drop=job.max_drop, risk=job.risk, rules=rules
            )
        else:
            point = choose_operating_point(
                outputs, cascade_macs, plain, max_drop=job.max_drop, budget=job.budget, rules=rules
            )
        chosen_record = _save_thresholds(job, point, final_top1, certificate)
        rule = point.rule
        rows.append(("chosen", rule, point.result))
        frontiers = {
            r: [p.to_record() for p in frontier(outputs, cascade_macs, plain, r)]
            for r in EXIT_RULES
        }
    elif job.saved_thresholds is not None:
        saved_rule = job.saved_thresholds.get("rule", EXIT_RULE)
        values = job.saved_thresholds["values"]
        rows.append(
            (
                "chosen",
                saved_rule,
                evaluate_cascade(outputs, values, cascade_macs, plain, saved_rule),
            )
        )
        rule = job.exit_rule or saved_rule
    if job.thresholds is not None:
        rows.append(
            ("given", rule, evaluate_cascade(outputs, job.thresholds, cascade_macs, plain, rule))
        )
    for value in TABLE_THRESHOLDS:
        shared = [value] * job.exit_count
        rows.append(
            (f"{value:g}", rule, evaluate_cascade(outputs, shared, cascade_macs, plain, rule))
        )
    return rows, rule, chosen_record, frontiers


def _save_thresholds(
    job: AnytimeJob, point: OperatingPoint, final_top1: float, certificate: Certificate | None
) -> dict[str, Any]:
    """Write the chosen operating point (and what --risk certified of it) into the exits
    checkpoint's card (atomically); returns it."""
    result = point.result
    record = {
        "values": list(result.thresholds),
        "rule": point.rule,
        "split": job.split,
        "dataset": job.dataset,
        "max_drop": job.max_drop,
        "budget": job.budget,
        "met": point.met,
        "top1": result.top1,
        "final_top1": final_top1,
        "macs_pct": result.macs_pct,
        "exit_shares": list(result.shares),
        "risk": job.risk,
        "certificate": None if certificate is None else certificate.to_record(),
    }
    content = load_checkpoint(job.path)
    content["exits"] = {**content["exits"], "thresholds": record}
    atomic_save(content, job.path)
    return record


def _timing_setup(
    job: AnytimeJob, device: str
) -> tuple[StagedStudent, Precision, list[torch.Tensor]]:
    """The student run stage by stage, its precision, and up to `timing_images` images of the
    split in memory on the device (in batches of `batch_size`)."""
    student = load_exits_checkpoint(job.path).student
    ctx = DistContext(0, 1, 0, torch.device(resolve_device(device)))
    precision = prepare_forward(
        job.precision, student, job.image_config.img_size, ctx, job.batch_size
    )
    staged = StagedStudent(student, job.image_config.img_size)
    splits = load_splits(job.dataset, job.data_dir, False, job.val_fraction)
    dataset = split_dataset(splits, job.split, job.image_config)
    batches, count = [], 0
    for batch in build_eval_loader(dataset, job.batch_size, ctx, job.workers):
        images = batch.images[: job.timing_images - count]
        if images.shape[0]:
            batches.append(precision.to_device(images))
            count += images.shape[0]
        if count >= job.timing_images:
            break
    return staged, precision, batches
