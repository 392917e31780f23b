"""`mlkd eval`: honest numbers for a checkpoint, several checkpoints, or an ensemble file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlkd_cli.core.atomic import check_new_files, check_writable
from mlkd_cli.core.console import Reporter
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import shown

from . import options as opt
from .requests import OutputFlags, RunFlags, takes

if TYPE_CHECKING:  # the engine loads when a command runs, not for --help
    from mlkd_cli.anytime.evaluation import AnytimeJob
    from mlkd_cli.passes.evaluation import EvalJob, Measured


@dataclass(kw_only=True)
class EvaluateRequest(OutputFlags, RunFlags):
    """`mlkd eval`'s flags."""

    checkpoints: Annotated[
        list[Path],
        typer.Argument(help="Checkpoints (.pth, .safetensors) or ensemble files to evaluate."),
    ]
    dataset: opt.Dataset = None
    split: Annotated[
        opt.SplitChoice, typer.Option("--split", help="Which split.", rich_help_panel=opt.DATA)
    ] = opt.SplitChoice.test
    data_dir: opt.DataDir = None
    model: opt.PlainModel = None
    num_classes: opt.PlainClasses = None
    img_size: opt.ImgSize = None
    models_dir: Annotated[
        Path | None,
        typer.Option(
            "--models-dir",
            help="Where an ensemble file's names resolve.",
            rich_help_panel=opt.MODEL,
        ),
    ] = None
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", "-b", help="Images per step.", rich_help_panel=opt.PROCESSES),
    ] = 128
    plots: Annotated[
        Path | None,
        typer.Option(
            "--plots",
            help="Write a confusion matrix and a reliability diagram here (for a student with "
            "exits: accuracy against MACs).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None
    early_exit: Annotated[
        bool,
        typer.Option(
            "--early-exit",
            help="For a student with exits (<name>_exits.pth), on --split val: choose the exit "
            "rule and thresholds with the fewest MACs that keep top-1 within --max-drop of the "
            "final head (or the most accurate within --budget), print each rule's frontier, and "
            "write the choice into the checkpoint.",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = False
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            help="Top-1 points --early-exit may lose (default 0.5, unless --budget).",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = None
    budget: Annotated[
        float | None,
        typer.Option(
            "--budget",
            help="--early-exit takes the most accurate thresholds whose mean MACs stay within "
            "this share of the plain model's, e.g. 0.5.",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = None
    risk: Annotated[
        float | None,
        typer.Option(
            "--risk",
            help="--early-exit certifies --max-drop on new images with probability at least 1 "
            "minus this, e.g. 0.1 (Learn-then-Test on the validation split); without it, the "
            "drop holds on the split itself.",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = None
    exit_rule: Annotated[
        str | None,
        typer.Option(
            "--exit-rule",
            help="max_softmax, margin (top two probabilities apart) or entropy; --early-exit "
            "without it tries all three and keeps the best.",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = None
    thresholds: Annotated[
        str | None,
        typer.Option(
            "--thresholds",
            help="For a student with exits: also evaluate the cascade at these per-exit "
            "thresholds (confidence under --exit-rule, in (0, 1]), e.g. 0.9,0.9,0.95.",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = None
    timing_images: Annotated[
        int,
        typer.Option(
            "--timing-images",
            help="For a student with exits: images timed per head and cascade (0: no timing).",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = 512
    latency: Annotated[
        bool,
        typer.Option(
            "--latency",
            help="For a student with exits: images/s and per-request latency (p50, p95) of the "
            "plain model and the cascade, 1 and --batch-size images a request, in PyTorch and "
            "in onnxruntime where the exports lie beside the checkpoint.",
            rich_help_panel=opt.EARLY_EXIT,
        ),
    ] = False
    provenance: Annotated[
        bool,
        typer.Option(
            "--provenance",
            help="Print where each model came from (its teacher and their SHA-256, the data, "
            "the software versions, the command) and exit without evaluating.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False
    overwrite: opt.OverwriteFiles = False


@takes(EvaluateRequest)
def evaluate(request: EvaluateRequest) -> None:
    """Top-1, top-5, NLL, calibration (ECE) and the worst classes of a model on a split; for a
    student with exits, every exit and the early-exit cascade too."""
    checkpoints, plots = request.checkpoints, request.plots
    out = request.output_options
    if request.provenance:
        show_provenance(checkpoints, Reporter(out))
        return
    if request.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {request.batch_size}")
    given = _parse_thresholds(request.thresholds)
    anytime = _students_with_exits(checkpoints, request.early_exit, given is not None)
    plain_flags = (request.model, request.num_classes, request.img_size)
    if anytime and any(flag is not None for flag in plain_flags):
        raise UserError(
            f"{anytime[0]} records its student and size; drop --model, --num-classes, --img-size"
        )
    if plots is not None:
        _check_plots(plots, checkpoints, anytime, request.overwrite)
    from mlkd_cli.anytime.evaluation import AnytimeRequest, plan_anytime_job
    from mlkd_cli.engine.launch import launcher_rank
    from mlkd_cli.passes.evaluation import EvalRequest, plan_eval_job

    common = {
        "dataset": request.dataset,
        "data_dir": request.data_dir,
        "split": request.split,
        "batch_size": request.batch_size,
        "workers": request.workers,
        "precision": request.precision or "auto",
        "output": out,
    }
    jobs: list[EvalJob | AnytimeJob] = [
        plan_anytime_job(
            AnytimeRequest(
                path=path,
                early_exit=request.early_exit,
                max_drop=request.max_drop,
                budget=request.budget,
                risk=request.risk,
                exit_rule=request.exit_rule,
                thresholds=given,
                timing_images=request.timing_images,
                latency=request.latency,
                **common,
            )
        )
        if path in anytime
        else plan_eval_job(
            EvalRequest(
                path=path,
                arch=request.model,
                num_classes=request.num_classes,
                img_size=request.img_size,
                models_dir=request.models_dir,
                **common,
            )
        )
        for path in checkpoints
    ]
    world_size, device = request.world_size or 1, request.device or "auto"
    results = [_run_job(job, world_size, device, plots, Reporter(out)) for job in jobs]
    results = [r for r in results if r is not None]
    if launcher_rank() != 0:
        return
    plain_results = [r for r in results if "heads" not in r]
    if plain_results:
        _render(Reporter(out), plain_results)
    report = Reporter(out)
    if len(results) == 1:
        report.result(results[0])
    else:
        report.result({"results": results})


def _run_job(
    job: EvalJob | AnytimeJob, world_size: int, device: str, plots: Path | None, report: Reporter
) -> dict[str, Any] | None:
    """One job's result (None off rank 0); a student with exits is rendered at once."""
    from mlkd_cli.anytime.evaluation import AnytimeJob, measure_anytime
    from mlkd_cli.passes.evaluation import measure

    if isinstance(job, AnytimeJob):
        result = measure_anytime(job, world_size, device)
        if result is None:
            return None
        if plots is not None:
            result["plots"] = _anytime_plot(plots, job, result)
        _render_anytime(report, result, job)
        return result
    measured = measure(job, world_size, device)
    if measured is None:
        return None
    result = measured.result
    if plots is not None:
        result["plots"] = _plots(plots, job, measured)
    return result


def _students_with_exits(checkpoints: list[Path], early_exit: bool, given: bool) -> list[Path]:
    """The checkpoints that hold a student with exits; the exit flags need every one to."""
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


def _parse_thresholds(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--thresholds takes numbers like 0.9,0.9,0.95, not {text!r}") from None


def _plot_files(folder: Path, path: Path, anytime: bool) -> list[Path]:
    """The PNGs --plots writes for one checkpoint."""
    kinds = ("anytime",) if anytime else ("confusion", "reliability")
    return [folder / f"{path.stem}_{kind}.png" for kind in kinds]


def _check_plots(
    folder: Path, checkpoints: list[Path], anytime: list[Path], overwrite: bool
) -> None:
    """Before any work: the --plots folder can be written, and no figure in it exists (unless
    --overwrite) or would be written twice; then the folder is created."""
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


def _rate(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def _render_anytime(report: Reporter, result: dict[str, Any], job: AnytimeJob) -> None:
    from mlkd_cli.anytime.costs import macs_label
    from mlkd_cli.anytime.rules import EXIT_RULES

    title = f"{job.label} on {result['dataset']} {result['split']} ({result['images']} images)"
    report.table(
        f"{title}: each head alone",
        ["head", "top-1 %", "NLL", "ECE", "MACs/image", "% of plain", "img/s"],
        [
            [
                h["head"] if h.get("module") is None else f"{h['head']} ({h['module']})",
                f"{h['top1']:.2f}",
                f"{h['nll']:.4f}",
                f"{h['ece']:.4f}",
                macs_label(h["macs"]),
                f"{h['macs_pct']:.1f}",
                _rate(h["images_per_s"]),
            ]
            for i, h in enumerate(result["heads"])
        ],
    )
    exits = [f"exit {i}" for i in range(1, len(result["heads"]))]
    rule = result["exit_rule"]
    report.table(
        f"early exit: an image leaves at the first exit whose confidence ({rule}: "
        f"{EXIT_RULES[rule]}) reaches the threshold; % of images leaving at each head",
        [
            "thresholds",
            "top-1 %",
            "NLL",
            *[f"% at {e}" for e in exits],
            "% final",
            "MACs %",
            "img/s",
        ],
        [
            [
                _thresholds_label(c),
                f"{c['top1']:.2f}",
                f"{c['nll']:.4f}",
                *[f"{share:.1f}" for share in c["exit_shares"]],
                f"{c['macs_pct']:.1f}",
                _rate(c["images_per_s"]),
            ]
            for c in result["cascades"]
        ],
    )
    if result["timed_images"]:
        report.info(
            f"img/s: the model alone on {result['timed_images']} images in memory, images "
            "leaving the batch at their exit; MACs counted at "
            f"{result['macs_img_size']} px (plain model {macs_label(result['macs_plain'])})"
        )
    if result.get("frontiers"):
        _render_frontiers(report, result["frontiers"])
    if result.get("latency"):
        report.table(
            "latency on this machine: images in memory; a request is 1 image or a batch, and "
            "each of its images waits for the whole of it",
            ["runtime", "model", "images a request", "img/s", "p50 ms", "p95 ms"],
            [
                [
                    r["runtime"],
                    r["model"]
                    + (
                        " (every head computed)"
                        if "onnx" in r["runtime"] and r["model"] == "cascade"
                        else ""
                    ),
                    str(r["batch"]),
                    f"{r['images_per_s']:.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p95_ms']:.2f}",
                ]
                for r in result["latency"]
            ],
        )
    chosen = result.get("chosen")
    if job.early_exit and chosen:
        values = ",".join(f"{v:g}" for v in chosen["values"])
        report.info(
            f"chose {chosen['rule']} thresholds {values} on {chosen['split']}: top-1 "
            f"{chosen['top1']:.2f} (final head {chosen['final_top1']:.2f}), "
            f"{chosen['macs_pct']:.1f} % of the plain model's MACs; written into {job.path}"
        )
        if chosen.get("certificate"):
            _render_certificate(report, chosen["certificate"])
        elif not chosen.get("met", True) and job.budget is not None:
            report.warn(
                f"no thresholds kept the mean MACs within {job.budget:g} of the plain model's; "
                "these are the cheapest found"
            )
        elif not chosen.get("met", True):
            report.warn(
                f"no thresholds kept top-1 within {job.max_drop:g} points of the final head; "
                "these are the most cautious ones"
            )


def _points(value: float) -> str:
    return "point" if value == 1 else "points"


def _render_certificate(report: Reporter, certificate: dict[str, Any]) -> None:
    """One line: the drop --risk certified, or that the split is too small and what would do."""
    from mlkd_cli.anytime.certify import MAX_SUGGESTED

    risk, drop, images = certificate["risk"], certificate["max_drop"], certificate["images"]
    confidence = f"{100 * (1 - risk):g} %"
    if certificate["certified"]:
        report.info(
            f"certified: on new images top-1 stays within {drop:g} {_points(drop)} of the final "
            f"head's with probability >= {confidence} (risk {risk:g}; {images} validation "
            f"images, of which the cascade got {certificate['harm']:.2f} % wrong that the final "
            "head got right)"
        )
        return
    needed = certificate["images_needed"]
    if needed is not None:
        would = f"about {needed:,} would"
    elif certificate["harm"] < drop:
        would = f"more than {MAX_SUGGESTED:,} would be needed"
    else:
        would = "no size would: the most cautious thresholds already lose that much on the split"
    report.warn(
        f"--risk {risk:g}: {images} validation images cannot certify a drop of {drop:g} "
        f"{_points(drop)} (the most cautious thresholds, kept, are certified to "
        f"{certificate['bound']:.2f} points); {would}"
    )


def _render_frontiers(report: Reporter, frontiers: dict[str, list[dict[str, Any]]]) -> None:
    """Each rule's accuracy-against-MACs frontier, a row per point (cheapest first)."""
    rows = []
    for rule, points in frontiers.items():
        for i, p in enumerate(points):
            rows.append(
                [
                    rule if i == 0 else "",
                    f"{p['thresholds'][0]:g}",
                    f"{p['macs_pct']:.1f}",
                    f"{p['top1']:.2f}",
                    f"{p['nll']:.4f}",
                ]
            )
    report.table(
        "frontier of each exit rule: one threshold for every exit; each row more accurate than "
        "every cheaper one",
        ["rule", "threshold", "MACs %", "top-1 %", "NLL"],
        rows,
    )


def _thresholds_label(cascade: dict[str, Any]) -> str:
    values = cascade["thresholds"]
    text = f"{values[0]:g}" if len(set(values)) == 1 else ",".join(f"{v:g}" for v in values)
    return text if cascade["rule"] not in ("chosen", "given") else f"{text} ({cascade['rule']})"


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


def _render(report: Reporter, results: list[dict[str, Any]]) -> None:
    columns = ["checkpoint", "params (M)", "images", "top-1 %", "top-5 %", "NLL", "ECE", "img/s"]
    rows = [
        [
            r["checkpoint"],
            f"{r['params_m']:.2f}",
            r["images"],
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['nll']:.4f}",
            f"{r['ece']:.4f}",
            f"{r['images_per_s']:.0f}" if r["images_per_s"] else None,
        ]
        for r in results
    ]
    first = results[0]
    report.table(f"{first['dataset']} {first['split']}", columns, rows)
    if len(results) == 1:
        report.table(
            "worst classes",
            ["class", "images", "top-1 %"],
            [[c["class"], c["images"], f"{c['top1']:.2f}"] for c in first["worst_classes"]],
        )


def show_provenance(checkpoints: list[Path], report: Reporter) -> None:
    """Each checkpoint's provenance record (what its card says made it), as a table and JSON."""
    from mlkd_cli.models.factory import read_card

    records = []
    for path in checkpoints:
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            raise UserError(f"{path} is an ensemble file; --provenance reads a trained model")
        card = read_card(path)
        record = card.extra.get("provenance") if card is not None else None
        if record is None:
            raise UserError(
                f"{path} records no provenance (trained outside mlkd, or by an mlkd from before "
                "provenance was recorded); nothing to show"
            )
        records.append({"checkpoint": str(path), "provenance": record})
        report.table(f"{path}: where it came from", ["what", "value"], _flattened(record))
    report.result(records[0] if len(records) == 1 else {"results": records})


def _flattened(record: dict[str, Any], prefix: str = "") -> list[list[str]]:
    """A nested record as (dotted key, value) rows; lists joined with commas."""
    rows: list[list[str]] = []
    for key, value in record.items():
        if isinstance(value, dict):
            rows += _flattened(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            rows.append([f"{prefix}{key}", ", ".join(str(v) for v in value)])
        else:
            rows.append([f"{prefix}{key}", "-" if value is None else str(value)])
    return rows
