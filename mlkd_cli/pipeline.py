"""`mlkd pipeline`: the whole method from a preset, into one run folder, resumable stage by stage.

Stages: train each teacher → fit the ensemble on the validation split → (with `soft_labels:`)
label a soft-label store from the fitted ensemble once → distil the student (from the store) →
(optionally) train a cross-entropy-only student of the same architecture and budget → evaluate
everything on the test split → export the student. A stage whose outputs are complete is skipped;
an interrupted training stage resumes from its `_last.pth`; so running the same command again
after any interruption finishes the run without redoing what is done.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlkd_cli.anytime.evaluation import AnytimeRequest, measure_anytime, plan_anytime_job
from mlkd_cli.core.atomic import atomic_write_text
from mlkd_cli.core.console import OutputOptions, Reporter
from mlkd_cli.core.errors import RunInterrupted, UserError
from mlkd_cli.core.plots import comparison_png
from mlkd_cli.core.safeload import quote
from mlkd_cli.data.registry import load_splits
from mlkd_cli.engine.config import DistillConfig, TeacherTrainConfig, TrainConfig
from mlkd_cli.engine.distiller import check_feature_loss, distill_student, plan_distillation
from mlkd_cli.engine.planning import RunFiles
from mlkd_cli.engine.teacher import plan_teacher_training, train_teacher
from mlkd_cli.engine.trainer import launch_training
from mlkd_cli.export import export_checkpoint
from mlkd_cli.models.ensemble_config import read_ensemble_config
from mlkd_cli.models.factory import check_model_name
from mlkd_cli.passes.ensemble import LogitsRequest, fit_and_write, run_logits_pass
from mlkd_cli.passes.evaluation import EvalRequest, measure, plan_eval_job
from mlkd_cli.passes.labeling import label_store, plan_labeling, resolve_top_k
from mlkd_cli.presets import SoftLabelSettings, resolve_preset
from mlkd_cli.recipes import (
    RECIPE_FILE,
    choose_recipe,
    detect_machine,
    measure_shape,
    write_recipe,
)

ENSEMBLE_FILE = "ensemble.json"
STORE_DIR = "soft_labels"  # the run folder's soft-label store (preset key `soft_labels`)
# The top-1 points the pipeline's early-exit thresholds may give up on the validation split.
PIPELINE_MAX_DROP = 0.5
# Images the early-exit speed is timed on in each configuration (`mlkd eval` times 512): the
# pipeline's figure is a first look, kept to seconds on a laptop.
PIPELINE_TIMING_IMAGES = 256
PIPELINE_TIMING_BUDGET_S = 5.0
# What the cross-entropy student's run calls itself (its first lines, history and curves).
BASELINE_KIND = "cross-entropy baseline"


@dataclass(frozen=True)
class PipelineOptions:
    """What `mlkd pipeline` was asked to do: a preset, or a dataset to choose a recipe for."""

    preset: str | None
    run_dir: Path
    dataset: str | None = None  # without a preset: the recipe is chosen from this data
    overwrite: bool = False  # replace a recipe.yaml of another plan in the run folder
    data_dir: Path | None = None
    baseline: bool | None = None  # None: as the preset says
    world_size: int = 1
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    output: OutputOptions = OutputOptions()
    max_restarts: int = 0


def run_complete(files: RunFiles, epochs: int) -> bool:
    """True when a training run has its best model and a history of every epoch."""
    if not (files.best.is_file() and files.history_json.is_file()):
        return False
    try:
        rows = json.loads(files.history_json.read_text())["epochs"]
    except (ValueError, KeyError):
        return False
    return len(rows) >= epochs


@contextmanager
def continued_by_the_pipeline() -> Iterator[None]:
    """A stage stopped by a signal says to run the pipeline again (which continues it), instead
    of the single command's own way to continue."""
    try:
        yield
    except RunInterrupted as exc:
        message = str(exc).split(": run the same command", 1)[0]
        raise RunInterrupted(
            f"{message}: run the same pipeline command again to continue", exc.signum
        ) from None


def train_stage(
    cfg: TrainConfig,
    planner: Callable,
    worker: Callable,
    report: Reporter,
    what: str,
    kind: str | None = None,
) -> str:
    """Run (or resume, or skip when complete) one training stage; `kind` renames what the run
    says it trains (the cross-entropy baseline is planned as a teacher run but is no teacher)."""
    files = RunFiles(cfg.output_dir, cfg.run_name)
    if run_complete(files, cfg.epochs):
        report.info(f"skip {what}: {files.best} is complete")
        return "skipped"
    resume = files.last.is_file()
    cfg = replace(cfg, resume=resume, overwrite=not resume)
    report.info(f"{'resume' if resume else 'run'} {what}")
    with continued_by_the_pipeline():
        plan = planner(cfg)
        launch_training(worker, plan if kind is None else replace(plan, kind=kind))
    return "resumed" if resume else "trained"


def label_stage(
    student: DistillConfig, settings: SoftLabelSettings, store: Path, report: Reporter
) -> str:
    """Label the run's soft-label store from the fitted ensemble with the student's
    augmentation (or skip it when every shard is written; a partial one is finished)."""
    plan = plan_labeling(student, store, settings.views, settings.top_k)
    if plan.complete:
        report.info(f"skip soft labels: {store} is complete")
        return "skipped"
    report.info(f"run soft labels: {settings.views} views of every training image into {store}")
    with continued_by_the_pipeline():
        label_store(plan)
    return "labelled"


def from_store(student: DistillConfig, store: Path) -> DistillConfig:
    """The student's run from the store instead of the live ensemble."""
    return replace(student, ensemble=None, models_dir=None, soft_labels=store)


def baseline_config(
    student: DistillConfig,
    common: dict[str, Any],
    data_dir: Path | None,
    settings: dict[str, Any] | None = None,
) -> TeacherTrainConfig:
    """The cross-entropy student: the student's architecture, data and budget, no teacher, and
    the preset's `baseline: {...}` settings (a recipe's: no random crops, as its student).

    Under a label budget it trains on the labelled images alone, as many times over as makes
    the student's number of training images: epochs / label fraction."""
    return TeacherTrainConfig(
        dataset=student.dataset,
        model=student.student,
        name=f"{student.run_name}_ce_baseline",
        epochs=max(1, round(student.epochs / student.label_fraction)),
        batch_size=student.batch_size,
        img_size=student.img_size,
        seed=student.seed,
        val_fraction=student.val_fraction,
        label_fraction=student.label_fraction,
        **(settings or {}),
        **common,
        **({"data_dir": student.data_dir} if data_dir is None else {}),
    )


def _check_stages(
    configs: list[TrainConfig],
    options: PipelineOptions,
    teachers: int,
    soft_labels: SoftLabelSettings | None = None,
) -> None:
    """Validate every training stage's settings (batch arithmetic at this world size included),
    model names, data and the store's top-k before the first stage runs; raises UserError
    naming the stage."""
    for cfg in configs:
        try:
            cfg.validate()
            check_model_name(cfg.student if isinstance(cfg, DistillConfig) else cfg.model)
            if isinstance(cfg, DistillConfig) and cfg.soft_labels is None:
                check_feature_loss(cfg, teachers)
        except UserError as exc:
            raise UserError(f"{options.preset}: stage {cfg.run_name}: {exc}") from None
    first = configs[0]
    splits = load_splits(first.dataset, first.data_dir, first.download, first.val_fraction)
    if soft_labels is not None:
        try:
            resolve_top_k(soft_labels.top_k, splits.num_classes)
        except UserError as exc:
            raise UserError(f"{options.preset}: soft_labels: {exc}") from None


def chosen_preset(options: PipelineOptions, report: Reporter) -> PipelineOptions:
    """The options with a preset: the one given (checked against `-d`), else a recipe chosen
    from the data and this machine, printed and written as `recipe.yaml` in the run folder."""
    if options.preset is not None:
        if options.dataset is not None:
            named = resolve_preset(options.preset).teachers
            if named and named[0].dataset != options.dataset:
                raise UserError(
                    f"preset {quote(options.preset)} trains on {quote(named[0].dataset, 40)}, "
                    f"not -d {quote(options.dataset, 40)}: drop -d, or drop --preset to get "
                    "a recipe for your data"
                )
        return options
    if options.dataset is None:
        raise UserError(
            "mlkd pipeline needs -d DATASET (a recipe is chosen for it) or --preset NAME"
        )
    recipe = choose_recipe(
        measure_shape(options.dataset, options.data_dir), detect_machine(options.device)
    )
    path = options.run_dir / RECIPE_FILE
    written = write_recipe(recipe, path, options.overwrite)  # refuses another plan first
    for line in recipe.lines():
        report.info(line)
    report.info(f"{'wrote' if written else 'kept'} {path}: edit it and rerun with --preset {path}")
    return replace(options, preset=str(path))


def run_pipeline(options: PipelineOptions) -> dict[str, Any] | None:
    """Run (or finish) every stage of the preset (or of a recipe chosen for `options.dataset`);
    returns the comparison on the test split."""
    options = chosen_preset(options, Reporter(options.output))
    assert options.preset is not None  # chosen_preset gives one or raises
    resolved = resolve_preset(options.preset)
    distill = resolved.distill
    if distill is None or not resolved.teachers:
        raise UserError(f"{resolved.origin} needs teachers and a distill section for a pipeline")
    report = Reporter(options.output)
    run_dir, models = options.run_dir, options.run_dir / "models"
    common: dict[str, Any] = {
        "output_dir": models,
        "world_size": options.world_size,
        "device": options.device,
        "precision": options.precision,
        "workers": options.workers,
        "output": options.output,
        "max_restarts": options.max_restarts,
    }
    if options.data_dir is not None:
        common["data_dir"] = options.data_dir
    stages: dict[str, str] = {}
    ensemble_path = run_dir / ENSEMBLE_FILE

    teachers = [replace(t, **common) for t in resolved.teachers]
    student = replace(distill, **common, ensemble=ensemble_path, models_dir=models)
    use_baseline = resolved.baseline if options.baseline is None else options.baseline
    baseline = (
        baseline_config(student, common, options.data_dir, resolved.baseline_settings)
        if use_baseline
        else None
    )
    store = run_dir / STORE_DIR
    learner = student if resolved.soft_labels is None else from_store(student, store)
    # Every stage is checked now, so that a bad setting of a late stage is not found only
    # after the teachers have trained for hours.
    _check_stages(
        [*teachers, student, learner, *([baseline] if baseline else [])],
        options,
        len(teachers),
        resolved.soft_labels,
    )

    for t in teachers:
        stages[t.run_name] = train_stage(
            t, plan_teacher_training, train_teacher, report, f"teacher {t.run_name} ({t.model})"
        )

    fit_temperature = resolved.fit_temperature
    if ensemble_path.is_file() and read_ensemble_config(ensemble_path, models).has_weights:
        report.info(f"skip ensemble: {ensemble_path} has fitted weights")
        stages["ensemble"] = "skipped"
    else:
        report.info(f"run ensemble of {len(teachers)} teachers")
        original = {"models": [t.model for t in teachers], "names": [t.run_name for t in teachers]}
        atomic_write_text(ensemble_path, json.dumps(original, indent=4) + "\n")
        run = run_logits_pass(
            LogitsRequest(
                config_path=ensemble_path,
                models_dir=models,
                dataset=teachers[0].dataset,
                data_dir=teachers[0].data_dir,
                split="val",
                world_size=options.world_size,
                device=options.device,
                precision=options.precision,
                workers=options.workers,
                output=options.output,
            )
        )
        if run is not None:
            fit_and_write(run, fit_temperature, ensemble_path)
        stages["ensemble"] = "fitted"

    if resolved.soft_labels is not None:
        stages["soft_labels"] = label_stage(student, resolved.soft_labels, store, report)
    stages[student.run_name] = train_stage(
        learner,
        plan_distillation,
        distill_student,
        report,
        f"student {student.run_name} ({student.student})"
        + ("" if resolved.soft_labels is None else f" from {store}"),
    )
    if baseline is not None:
        stages[baseline.run_name] = train_stage(
            baseline,
            plan_teacher_training,
            train_teacher,
            report,
            f"cross-entropy baseline {baseline.run_name}",
            kind=BASELINE_KIND,
        )

    export_dir = run_dir / "export" / student.run_name
    if (export_dir / "model.safetensors").is_file():
        stages["export"] = "skipped"
    else:
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        export_checkpoint(models / f"{student.run_name}.pth", "safetensors", export_dir)
        stages["export"] = "exported"

    rows = _compare(options, teachers, ensemble_path, student, baseline)
    if rows is None:
        return None
    comparison_png(rows, f"{Path(resolved.origin).stem}: test split", run_dir / "comparison.png")
    summary = {
        "preset": options.preset,
        "run_dir": str(run_dir),
        "stages": stages,
        "rows": rows,
        "distillation_gain": distillation_gain(rows),
        "ensemble": str(ensemble_path),
        "export": str(export_dir),
        "comparison_png": str(run_dir / "comparison.png"),
    }
    atomic_write_text(run_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    return summary


def distillation_gain(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """The distilled student against its cross-entropy baseline on the test split: both top-1
    and NLL, and the differences (None without a baseline)."""
    student = next((r for r in rows if r["role"] == "student"), None)
    baseline = next((r for r in rows if r["role"] == "baseline"), None)
    if student is None or baseline is None:
        return None
    return {
        "student_top1": student["top1"],
        "baseline_top1": baseline["top1"],
        "top1_points": student["top1"] - baseline["top1"],
        "student_nll": student["nll"],
        "baseline_nll": baseline["nll"],
        "nll_change": student["nll"] - baseline["nll"],
    }


def _compare(
    options: PipelineOptions,
    teachers: list[TeacherTrainConfig],
    ensemble_path: Path,
    student: DistillConfig,
    baseline: TeacherTrainConfig | None,
) -> list[dict[str, Any]] | None:
    models = options.run_dir / "models"
    data_dir = student.data_dir
    entries = [(t.run_name, "teacher", models / f"{t.run_name}.pth") for t in teachers]
    entries.append(("ensemble", "ensemble", ensemble_path))
    entries.append((student.run_name, "student", models / f"{student.run_name}.pth"))
    if baseline is not None:
        entries.append((baseline.run_name, "baseline", models / f"{baseline.run_name}.pth"))
    rows = []
    for name, role, path in entries:
        job = plan_eval_job(
            EvalRequest(
                path=path,
                data_dir=data_dir,
                split="test",
                models_dir=models,
                workers=options.workers,
                precision=options.precision,
                output=options.output,
            )
        )
        measured = measure(job, options.world_size, options.device)
        if measured is None:
            return None
        rows.append(
            {
                "name": name,
                "role": role,
                "params_m": measured.result["params_m"],
                "top1": measured.result["top1"],
                "nll": measured.result["nll"],
                "ece": measured.result["ece"],
                "images_per_s": measured.result["images_per_s"],
                "macs_pct": 100.0 if role == "student" else None,
            }
        )
        if role == "student":
            rows.extend(_exit_rows(models, student, data_dir, options))
    return rows


def _exit_rows(
    models: Path, student: DistillConfig, data_dir: Path, options: PipelineOptions
) -> list[dict[str, Any]]:
    """Each exit of the student on the test split, and the early-exit cascade at thresholds
    chosen on the validation split (written into `<name>_exits.pth`)."""
    path = RunFiles(models, student.run_name).exits
    report = Reporter(options.output)
    if not path.is_file():
        report.warn(f"no {path} (a run from an older mlkd, or --exits none): no exit rows")
        return []
    request = AnytimeRequest(
        path=path,
        data_dir=data_dir,
        timing_images=PIPELINE_TIMING_IMAGES,
        timing_budget_s=PIPELINE_TIMING_BUDGET_S,
        workers=options.workers,
        precision=options.precision,
        output=options.output,
    )
    try:
        chose = plan_anytime_job(
            replace(
                request, split="val", early_exit=True, max_drop=PIPELINE_MAX_DROP, timing_images=0
            )
        )
    except UserError as exc:
        report.warn(f"no early-exit rows: {exc}")
        return []
    if measure_anytime(chose, options.world_size, options.device) is None:
        return []
    test = measure_anytime(plan_anytime_job(request), options.world_size, options.device)
    if test is None:
        return []
    # Model-only speeds (images in memory) are not the other rows' (data loading included): the
    # cascade's speed-up goes in its own record, beside the final head's measured the same way.
    rows = [
        {
            "name": f"{student.run_name} exit {i}",
            "role": "exit",
            "params_m": None,
            "top1": head["top1"],
            "nll": head["nll"],
            "ece": head["ece"],
            "images_per_s": None,
            "macs_pct": head["macs_pct"],
        }
        for i, head in enumerate(test["heads"][1:], start=1)
    ]
    cascade = next(c for c in test["cascades"] if c["rule"] == "chosen")
    rows.append(
        {
            "name": f"{student.run_name} early exit",
            "role": "cascade",
            "params_m": None,
            "top1": cascade["top1"],
            "nll": cascade["nll"],
            "ece": None,
            "images_per_s": None,
            "macs_pct": cascade["macs_pct"],
            "thresholds": cascade["thresholds"],
            "exit_rule": cascade["exit_rule"],
            "exit_shares": cascade["exit_shares"],
            "model_images_per_s": cascade["images_per_s"],
            "plain_model_images_per_s": test["heads"][0]["images_per_s"],
        }
    )
    return rows
