"""mlkd from Python: what each command does, as a function that returns its results as objects.

    from mlkd_cli import api

    teacher = api.train_teacher(dataset="digits", model="resnet10t", epochs=10, name="t")
    student = api.distill(dataset="digits", teacher_model="resnet10t",
                          teacher_checkpoint=teacher.files.best, student="resnet10t", epochs=10)
    student.val_top1, student.files.exits

A training function takes the settings of its config as keyword arguments, named as the config's
fields (`engine/config.py`: a flag's name with `_` for `-`), over a `preset=` as the command
merges them, or a ready config; a setting added to the config is taken here with no edit. Every
function runs the command's own checks before any work and raises `UserError` with the line the
command would print; nothing is printed but warnings unless `progress=True`. The commands call
these functions and only render what they return, so the two stay one path.

The functions return `None` only on a torchrun rank other than 0 (rank 0 holds the results).
Sits above the engine, passes and services (pipeline, presets, export), below the commands; it
imports torch only when a function runs, so importing it (and the CLI's `--help`) stays light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from mlkd_cli.core.atomic import check_new_files, check_writable
from mlkd_cli.core.coerce import config_field_names
from mlkd_cli.core.console import OutputOptions, Reporter, new_run
from mlkd_cli.core.constants import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_VIEWS,
    SHARD_SIZE,
)
from mlkd_cli.core.cpus import prefer_short_spin
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import quote, shown
from mlkd_cli.engine.config import DistillConfig, TeacherTrainConfig
from mlkd_cli.presets import resolve_preset, settings_config

if TYPE_CHECKING:  # the engine's runtime loads when a function runs
    from mlkd_cli.anytime.evaluation import AnytimeJob
    from mlkd_cli.passes.evaluation import EvalJob, Measured

# As the CLI does: OpenMP reads its spin count once, when torch loads (after this import).
prefer_short_spin()

C = TypeVar("C", TeacherTrainConfig, DistillConfig)
R = TypeVar("R", bound="TrainingResult")
PathLike = str | Path
# `progress=`: False (warnings only), True (the commands' lines and bars on stderr), or the
# command line's own --quiet/--json as `OutputOptions`.
Progress = bool | OutputOptions


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class RunFilesWritten:
    """The files a training run wrote."""

    best: Path  # the best model by validation (plain timm)
    last: Path  # the training state `resume=True` continues from
    history_json: Path
    history_csv: Path
    curves: Path
    periodic: list[Path]  # every `save_frequency` epochs
    exits: Path | None = None  # a student with its exits (`AnytimeClassifier.load` reads it)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunFilesWritten:
        """From a run summary's `files`."""
        exits = record.get("exits")
        return cls(
            best=Path(record["best"]),
            last=Path(record["last"]),
            history_json=Path(record["history_json"]),
            history_csv=Path(record["history_csv"]),
            curves=Path(record["curves"]),
            periodic=[Path(p) for p in record.get("periodic", [])],
            exits=None if exits is None else Path(exits),
        )


@dataclass(frozen=True)
class TrainingResult:
    """A finished training run (`train_teacher`, `distill`): its best epoch and files."""

    name: str
    kind: str  # "teacher", "student", ...
    model: str
    dataset: str
    epochs: int
    best_epoch: int
    best: dict[str, Any]  # the best epoch's row of the history (val_top1, val_nll, ...)
    last: dict[str, Any]  # the last epoch's row
    files: RunFilesWritten
    record: dict[str, Any] = field(repr=False)  # the summary as `--json` prints it

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> TrainingResult:
        """From the summary the engine returns."""
        return cls(
            name=summary["name"],
            kind=summary["kind"],
            model=summary["model"],
            dataset=summary["dataset"],
            epochs=summary["epochs"],
            best_epoch=summary["best_epoch"],
            best=summary["best_row"] or {},
            last=summary["last"] or {},
            files=RunFilesWritten.from_record(summary["files"]),
            record=summary,
        )

    @property
    def val_top1(self) -> float | None:
        """Validation top-1 (%) of the best epoch."""
        return self.best.get("val_top1")

    @property
    def val_nll(self) -> float | None:
        """Validation NLL of the best epoch."""
        return self.best.get("val_nll")

    def history(self) -> list[dict[str, Any]]:
        """Every epoch's row, as the run's history file holds them."""
        return json.loads(self.files.history_json.read_text())["epochs"]


@dataclass(frozen=True)
class DistillResult(TrainingResult):
    """A finished distillation: the student's run, its exits and their validation top-1."""

    exits: list[int] = field(default_factory=list)  # the stages the exits sit after

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> DistillResult:
        """From the summary the engine returns."""
        base = TrainingResult.from_summary(summary)
        return cls(**{**vars(base), "exits": list(summary.get("exits", []))})

    @property
    def exit_top1(self) -> list[float | None]:
        """Validation top-1 (%) of each exit at the best epoch, first exit first."""
        return [self.best.get(f"exit{i}_top1") for i in range(1, len(self.exits) + 1)]


@dataclass(frozen=True)
class LabelResult:
    """A soft-label store: a teacher's outputs for numbered augmented views of every image."""

    store: Path
    manifest: Path
    images: int
    views: int
    top_k: int
    shards: int
    skipped: int  # shards already written (a continued labelling)
    record: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class EnsembleResult:
    """A fitted ensemble file: its weights and how much they lowered the held-out NLL."""

    written: Path
    dataset: str
    images: int  # validation images the weights were fitted on
    weights: list[float]
    temperature: float | None
    equal_nll: float  # held-out NLL with equal weights
    fitted_nll: float  # ... with the fitted ones
    members: list[dict[str, Any]]  # each member's and the ensemble's top-1 and NLL

    @property
    def record(self) -> dict[str, Any]:
        """As `--json` prints it."""
        return {
            "dataset": self.dataset,
            "split": "val",
            "images": self.images,
            "weights": self.weights,
            "temperature": self.temperature,
            "equal_nll": self.equal_nll,
            "fitted_nll": self.fitted_nll,
            "written": str(self.written),
            "rows": self.members,
        }


@dataclass(frozen=True)
class EvalResult:
    """One checkpoint (or ensemble file) evaluated on a split."""

    checkpoint: Path
    dataset: str
    split: str
    images: int
    top1: float
    nll: float
    ece: float | None
    record: dict[str, Any] = field(repr=False)  # every figure, as `--json` prints it
    plots: dict[str, Path] = field(default_factory=dict)  # what `plots=` wrote
    job: AnytimeJob | EvalJob | None = field(default=None, repr=False, compare=False)

    @property
    def heads(self) -> list[dict[str, Any]] | None:
        """For a student with exits: each head alone (final first), else None."""
        return self.record.get("heads")

    @property
    def chosen(self) -> dict[str, Any] | None:
        """With `early_exit=True`: the exit rule and thresholds chosen and written."""
        return self.record.get("chosen")


@dataclass(frozen=True)
class ExportResult:
    """One file (or folder) an export wrote, checked against PyTorch."""

    format: str
    output: Path
    checked_with: str | None
    max_abs_diff: float | None
    record: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PipelineResult:
    """A finished pipeline: every model's test figures and what distillation gained."""

    run_dir: Path
    stages: dict[str, str]  # stage -> trained, resumed, skipped, ...
    rows: list[dict[str, Any]]  # each model's (and exit's, cascade's) test figures
    distillation_gain: dict[str, float] | None  # against the cross-entropy baseline
    ensemble: Path
    export: Path
    comparison_png: Path
    record: dict[str, Any] = field(repr=False)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> PipelineResult:
        """From the summary `run_pipeline` returns."""
        return cls(
            run_dir=Path(summary["run_dir"]),
            stages=summary["stages"],
            rows=summary["rows"],
            distillation_gain=summary["distillation_gain"],
            ensemble=Path(summary["ensemble"]),
            export=Path(summary["export"]),
            comparison_png=Path(summary["comparison_png"]),
            record=summary,
        )


# ------------------------------------------------------------------------------ settings


def _output(progress: Progress) -> OutputOptions:
    if isinstance(progress, OutputOptions):
        return progress
    return OutputOptions(quiet=not progress)


def training_config(
    cls: type[C], section: str, preset: str | None, settings: dict[str, Any], progress: Progress
) -> C:
    """A run's config as the command builds it: class defaults, the preset's `section`, then
    the settings given (None: not given). An unknown setting names the nearest known ones."""
    known = config_field_names(cls)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(
            f"unknown setting {quote(unknown[0], 40)}; the settings are {cls.__name__}'s "
            f"fields, e.g. {', '.join(_near(unknown[0], known))}"
        )
    given = {k: v for k, v in settings.items() if v is not None}
    given["output"] = _output(progress)
    return settings_config(cls, section, preset, given)


def _near(name: str, known: set[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5) or sorted(known)[:3]


def _config(
    cls: type[C],
    section: str,
    config: C | None,
    preset: str | None,
    settings: dict[str, Any],
    progress: Progress,
) -> C:
    if config is None:
        return training_config(cls, section, preset, settings, progress)
    if settings or preset is not None:
        raise UserError("pass a config or settings (and preset=), not both")
    if not isinstance(config, cls):
        raise UserError(f"config must be a {cls.__name__}, not a {type(config).__name__}")
    return config


# ------------------------------------------------------------------------------ training


def train_teacher(
    config: TeacherTrainConfig | None = None,
    /,
    *,
    preset: str | None = None,
    progress: Progress = False,
    **settings: Any,
) -> TrainingResult | None:
    """Fine-tune a timm model (`mlkd teacher train`); keeps the best model by validation top-1.

    `settings` are `TeacherTrainConfig` fields (dataset, model, epochs, lr, output_dir, ...).
    """
    new_run()
    cfg = _config(TeacherTrainConfig, "teacher", config, preset, settings, progress)
    from mlkd_cli.engine.teacher import plan_teacher_training
    from mlkd_cli.engine.teacher import train_teacher as worker

    return _launched(worker, plan_teacher_training(cfg), TrainingResult)


def distill(
    config: DistillConfig | None = None,
    /,
    *,
    preset: str | None = None,
    progress: Progress = False,
    **settings: Any,
) -> DistillResult | None:
    """Distil a teacher (model, ensemble or soft-label store) into a student with exits
    (`mlkd distill`); saves the plain timm student and `<name>_exits.pth`.

    `settings` are `DistillConfig` fields (dataset, ensemble or teacher_model and
    teacher_checkpoint, student, epochs, loss, loss_params={"nckd_weight": 4}, ...).
    """
    new_run()
    cfg = _config(DistillConfig, "distill", config, preset, settings, progress)
    from mlkd_cli.engine.distiller import distill_student, plan_distillation

    return _launched(distill_student, plan_distillation(cfg), DistillResult)


def _launched(worker: Any, plan: Any, result: type[R]) -> R | None:
    """Run a planned training `worker` on the run's processes; its result on rank 0 (None on
    the other ranks of a torchrun launch)."""
    from mlkd_cli.engine.launch import launcher_rank
    from mlkd_cli.engine.trainer import launch_training

    summary = launch_training(worker, plan)
    if summary is None or launcher_rank() != 0:
        return None
    return result.from_summary(summary)


def label(
    config: DistillConfig | None = None,
    /,
    *,
    output: PathLike,
    views: int = DEFAULT_VIEWS,
    top_k: int | None = None,
    shard_size: int = SHARD_SIZE,
    preset: str | None = None,
    progress: Progress = False,
    **settings: Any,
) -> LabelResult | None:
    """Store a teacher's outputs for `views` augmented views of every training image in the
    folder `output` (`mlkd teacher label`); `distill(soft_labels=output)` replays them. A
    store left unfinished is continued.

    `settings` are the `DistillConfig` fields that name the data, the teacher (ensemble, or
    teacher_model and teacher_checkpoint), the augmentation and how processes run.
    """
    new_run()
    cfg = _config(DistillConfig, "distill", config, preset, settings, progress)
    store = Path(output)
    _check_store_folder(store)
    from mlkd_cli.engine.launch import launcher_rank
    from mlkd_cli.passes.labeling import label_store, plan_labeling

    plan = plan_labeling(cfg, store, views, top_k, shard_size)
    summary = label_store(plan)
    if summary is None or launcher_rank() != 0:
        return None
    manifest = plan.manifest
    return LabelResult(
        store=store,
        manifest=store / "manifest.json",
        images=manifest.images,
        views=manifest.views,
        top_k=manifest.top_k,
        shards=manifest.shard_count,
        skipped=summary["skipped"],
        record={**summary, "manifest": str(store / "manifest.json")},
    )


def _check_store_folder(output: Path) -> None:
    """Before any work: the store is a folder that can be written, new, empty, or a store
    (which the labelling continues; one made with other settings is refused when planned)."""
    from mlkd_cli.data.softlabels import MANIFEST

    if output.exists() and not output.is_dir():
        raise UserError(
            f"--output {shown(output)} is a file; a soft-label store is a folder: name a new one"
        )
    check_writable(output, "--output")
    if output.is_dir() and not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise UserError(
            f"--output {shown(output)} holds files but no {MANIFEST}, so it is no soft-label "
            "store; name a new or empty folder"
        )


# ------------------------------------------------------------------------------ ensembles


def build_ensemble(
    config_path: PathLike,
    *,
    output: PathLike | None = None,
    in_place: bool = False,
    dataset: str | None = None,
    data_dir: PathLike | None = None,
    models_dir: PathLike | None = None,
    val_fraction: float | None = None,
    batch_size: int = 128,
    teacher_ema: bool = True,
    fit_temperature: bool | None = None,
    preset: str | None = None,
    overwrite: bool = False,
    world_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    workers: int | None = None,
    progress: Progress = False,
) -> EnsembleResult | None:
    """Fit an ensemble file's member weights on the validation split (`mlkd ensemble build`)
    and write them into it, or into `output`."""
    new_run()
    config_path = Path(config_path)
    out = None if output is None else Path(output)
    members_dir = None if models_dir is None else Path(models_dir)
    if out is not None and in_place:
        raise UserError("--output writes a new file and --in-place rewrites CONFIG; pass one")
    _check_ensemble_destination(config_path, out, overwrite, members_dir)
    if preset is not None:  # the preset's dataset and ensemble settings, under those given
        resolved = resolve_preset(preset)
        dataset = dataset or (resolved.distill.dataset if resolved.distill else None)
        if fit_temperature is None:
            fit_temperature = resolved.fit_temperature
    from mlkd_cli.models.ensemble_config import ORIGINAL
    from mlkd_cli.passes.ensemble import LogitsRequest, fit_and_write, run_logits_pass

    options = _output(progress)
    run = run_logits_pass(
        LogitsRequest(
            config_path=config_path,
            models_dir=members_dir,
            dataset=dataset,
            data_dir=Path(data_dir) if data_dir is not None else Path("data"),
            split="val",
            val_fraction=val_fraction,
            batch_size=batch_size,
            world_size=world_size or 1,
            device=device or "auto",
            precision=precision or "auto",
            teacher_ema=teacher_ema,
            workers=workers,
            output=options,
        )
    )
    if run is None:
        return None
    destination = out or config_path
    fit, rows = fit_and_write(run, bool(fit_temperature), destination)
    moved = destination.resolve().parent != config_path.resolve().parent
    if moved and run.config.layout == ORIGINAL:
        Reporter(options).warn(
            f"{destination}'s names resolve against models/ beside it; "
            f"pass --models-dir {run.config.members[0].checkpoint.parent} when using it"
        )
    return EnsembleResult(
        written=destination,
        dataset=run.plan.dataset,
        images=len(run.labels),
        weights=list(fit.weights),
        temperature=fit.temperature,
        equal_nll=fit.equal_nll,
        fitted_nll=fit.fitted_nll,
        members=rows,
    )


def _check_ensemble_destination(
    config_path: Path, output: Path | None, overwrite: bool, models_dir: Path | None
) -> None:
    """Before any work: the fitted file's folder exists and is writable, and `output` is
    neither an existing file (unless overwrite) nor CONFIG (which in_place rewrites) nor a
    member's checkpoint (ever)."""
    from mlkd_cli.models.ensemble_config import read_ensemble_config

    destination = output or config_path
    folder = destination.parent
    if not folder.is_dir():
        raise UserError(
            f"cannot write {shown(destination)}: folder {shown(folder)} does not exist; "
            "create it first"
        )
    check_writable(folder, "--output" if output is not None else "--in-place")
    if output is None:
        return  # in place: CONFIG is rewritten with its weights, by request
    if config_path.exists() and output.resolve() == config_path.resolve():
        raise UserError(
            f"--output {shown(output)} is CONFIG itself; drop --output (or pass --in-place) "
            "to rewrite it"
        )
    members = read_ensemble_config(config_path, models_dir).members
    inputs = [config_path, *(m.checkpoint for m in members)]
    check_new_files([output], overwrite, "--output", sources=inputs)


# ------------------------------------------------------------------------------ evaluation


@overload
def evaluate(checkpoints: PathLike, **options: Any) -> EvalResult | None: ...
@overload
def evaluate(checkpoints: Sequence[PathLike], **options: Any) -> list[EvalResult] | None: ...
def evaluate(
    checkpoints: PathLike | Sequence[PathLike],
    *,
    dataset: str | None = None,
    split: str = "test",
    data_dir: PathLike | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    models_dir: PathLike | None = None,
    batch_size: int = 128,
    plots: PathLike | None = None,
    early_exit: bool = False,
    max_drop: float | None = None,
    budget: float | None = None,
    risk: float | None = None,
    exit_rule: str | None = None,
    thresholds: Sequence[float] | None = None,
    timing_images: int = 512,
    latency: bool = False,
    overwrite: bool = False,
    world_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    workers: int | None = None,
    progress: Progress = False,
) -> EvalResult | list[EvalResult] | None:
    """Top-1, top-5, NLL and ECE of a checkpoint or ensemble file on a split (`mlkd eval`);
    for a student with exits every exit and the early-exit cascade too (`early_exit=True` on
    the val split chooses thresholds and writes them into it). One path gives one result, a
    list of paths a list."""
    new_run()
    single = isinstance(checkpoints, (str, Path))
    paths = [Path(checkpoints)] if single else [Path(p) for p in checkpoints]  # type: ignore[union-attr]
    folder = None if plots is None else Path(plots)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    given = None if thresholds is None else tuple(float(v) for v in thresholds)
    anytime = _students_with_exits(paths, early_exit, given is not None)
    if anytime and any(flag is not None for flag in (model, num_classes, img_size)):
        raise UserError(
            f"{anytime[0]} records its student and size; drop --model, --num-classes, --img-size"
        )
    if folder is not None:
        _check_plots(folder, paths, anytime, overwrite)
    from mlkd_cli.anytime.evaluation import AnytimeRequest, plan_anytime_job
    from mlkd_cli.engine.launch import launcher_rank
    from mlkd_cli.passes.evaluation import EvalRequest, plan_eval_job

    common = {
        "dataset": dataset,
        "data_dir": None if data_dir is None else Path(data_dir),
        "split": split,
        "batch_size": batch_size,
        "workers": workers,
        "precision": precision or "auto",
        "output": _output(progress),
    }
    jobs: list[EvalJob | AnytimeJob] = [
        plan_anytime_job(
            AnytimeRequest(
                path=path,
                early_exit=early_exit,
                max_drop=max_drop,
                budget=budget,
                risk=risk,
                exit_rule=exit_rule,
                thresholds=given,
                timing_images=timing_images,
                latency=latency,
                **common,
            )
        )
        if path in anytime
        else plan_eval_job(
            EvalRequest(
                path=path,
                arch=model,
                num_classes=num_classes,
                img_size=img_size,
                models_dir=None if models_dir is None else Path(models_dir),
                **common,
            )
        )
        for path in paths
    ]
    results = [_run_job(job, world_size or 1, device or "auto", folder) for job in jobs]
    if launcher_rank() != 0 or any(r is None for r in results):
        return None
    done = [r for r in results if r is not None]
    return done[0] if single else done


def _run_job(
    job: EvalJob | AnytimeJob, world_size: int, device: str, plots: Path | None
) -> EvalResult | None:
    """One job's result (None off rank 0), its figures written when asked."""
    from mlkd_cli.anytime.evaluation import AnytimeJob, measure_anytime
    from mlkd_cli.passes.evaluation import measure

    if isinstance(job, AnytimeJob):
        record = measure_anytime(job, world_size, device)
        if record is None:
            return None
        if plots is not None:
            record["plots"] = _anytime_plot(plots, job, record)
    else:
        measured = measure(job, world_size, device)
        if measured is None:
            return None
        record = measured.result
        if plots is not None:
            record["plots"] = _plots(plots, job, measured)
    return EvalResult(
        checkpoint=job.path,
        dataset=record["dataset"],
        split=record["split"],
        images=record["images"],
        top1=record["top1"],
        nll=record["nll"],
        ece=record.get("ece"),
        record=record,
        plots={k: Path(v) for k, v in record.get("plots", {}).items()},
        job=job,
    )


def _students_with_exits(checkpoints: list[Path], early_exit: bool, given: bool) -> list[Path]:
    """The checkpoints that hold a student with exits; the exit options need every one to."""
    from mlkd_cli.models.exits import is_exits_checkpoint

    anytime = [path for path in checkpoints if is_exits_checkpoint(path)]
    plain = [path for path in checkpoints if path not in anytime]
    if (early_exit or given) and plain:
        flag = "--early-exit" if early_exit else "--thresholds"
        raise UserError(
            f"{flag} needs a student with exits, and {plain[0]} has none; pass the "
            "<name>_exits.pth that mlkd distill writes beside <name>.pth"
        )
    return anytime


def _plot_files(folder: Path, path: Path, anytime: bool) -> list[Path]:
    """The PNGs `plots=` writes for one checkpoint."""
    kinds = ("anytime",) if anytime else ("confusion", "reliability")
    return [folder / f"{path.stem}_{kind}.png" for kind in kinds]


def _check_plots(
    folder: Path, checkpoints: list[Path], anytime: list[Path], overwrite: bool
) -> None:
    """Before any work: the plots folder can be written, and no figure in it exists (unless
    overwrite) or would be written twice; then the folder is created."""
    check_writable(folder, "--plots")
    files = [f for path in checkpoints for f in _plot_files(folder, path, path in anytime)]
    twice = next((f for i, f in enumerate(files) if f in files[:i]), None)
    if twice is not None:
        raise UserError(
            f"--plots would write {shown(twice)} twice (two checkpoints named "
            f"{shown(twice.stem.rsplit('_', 1)[0])}); evaluate them one at a time"
        )
    check_new_files(files, overwrite, "--plots", sources=checkpoints)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --plots {shown(folder)} ({exc.strerror or exc})") from None


def _anytime_plot(folder: Path, job: AnytimeJob, result: dict[str, Any]) -> dict[str, str]:
    from mlkd_cli.core.plots import anytime_png

    (path,) = _plot_files(folder, job.path, anytime=True)
    anytime_png(result, f"{job.label} on {job.dataset} {job.split}", path)
    return {"accuracy_vs_macs": str(path)}


def _plots(folder: Path, job: EvalJob, measured: Measured) -> dict[str, str]:
    from mlkd_cli.core.metrics import confusion_matrix, reliability_bins
    from mlkd_cli.core.plots import confusion_matrix_png, reliability_png

    title = f"{job.label} on {job.dataset} {job.split}"
    confusion, reliability = _plot_files(folder, job.path, anytime=False)
    logits, labels = measured.logits, measured.labels
    confusion_matrix_png(confusion_matrix(logits, labels), measured.class_names, title, confusion)
    bins = reliability_bins(logits.double().softmax(1), labels)
    reliability_png(bins, measured.result["ece"], title, reliability)
    return {"confusion_matrix": str(confusion), "reliability": str(reliability)}


# ------------------------------------------------------------------------------ export


def export(
    checkpoint: PathLike,
    *,
    format: str | None = None,  # noqa: A002  (the command's --format)
    output: PathLike | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    int8: bool = False,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    int8_target: str | None = None,
    data_dir: PathLike | None = None,
    overwrite: bool = False,
    progress: Progress = False,
) -> list[ExportResult]:
    """A checkpoint as safetensors (+ timm config.json), ONNX or TorchScript, each checked
    against PyTorch (`mlkd export`); with `int8`, an int8 ONNX checked against the fp32 one."""
    new_run()
    if int8_target is not None and not int8:
        raise UserError("--int8-target chooses how --int8 quantizes: add --int8")
    from mlkd_cli.export import Int8Options, export_any

    options = (
        Int8Options(
            None if data_dir is None else Path(data_dir),
            calibration_images,
            min_agreement,
            int8_target or "auto",
            _output(progress),
        )
        if int8
        else None
    )
    records = export_any(
        Path(checkpoint),
        format,
        None if output is None else Path(output),
        model,
        num_classes,
        img_size,
        options,
        overwrite=overwrite,
    )
    return [
        ExportResult(
            format=r["format"],
            output=Path(r["output"]),
            checked_with=r.get("checked_with"),
            max_abs_diff=r.get("max_abs_diff"),
            record=r,
        )
        for r in records
    ]


# ------------------------------------------------------------------------------ pipeline


def pipeline(
    preset: str | None = None,
    *,
    dataset: str | None = None,
    run_dir: PathLike | None = None,
    data_dir: PathLike | None = None,
    overwrite: bool = False,
    baseline: bool | None = None,
    world_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    workers: int | None = None,
    max_restarts: int | None = None,
    progress: Progress = False,
) -> PipelineResult | None:
    """The whole method from a preset into one run folder (`mlkd pipeline`): teachers,
    ensemble, student, baseline, test-split comparison and export; a stopped run continues.
    Without a preset, `dataset` (and `data_dir`) gets a recipe chosen for the data and this
    machine, written as `recipe.yaml` in the run folder (default runs/<data folder's name>)."""
    new_run()
    from mlkd_cli.pipeline import PipelineOptions, run_pipeline

    if run_dir is None:
        named = preset or (Path(data_dir).name if data_dir is not None else dataset) or "run"
        run_dir = Path("runs") / Path(named).stem
    summary = run_pipeline(
        PipelineOptions(
            preset=preset,
            dataset=dataset,
            overwrite=overwrite,
            run_dir=Path(run_dir),
            data_dir=None if data_dir is None else Path(data_dir),
            baseline=baseline,
            world_size=world_size or 1,
            device=device or "auto",
            precision=precision or "auto",
            workers=workers,
            output=_output(progress),
            max_restarts=max_restarts or 0,
        )
    )
    from mlkd_cli.engine.launch import launcher_rank

    if summary is None or launcher_rank() != 0:
        return None
    return PipelineResult.from_summary(summary)
