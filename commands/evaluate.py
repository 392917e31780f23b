"""`mlkd eval`: honest numbers for a checkpoint, several checkpoints, or an ensemble file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlkd_cli import api
from mlkd_cli.core.console import Reporter
from mlkd_cli.core.errors import UserError

from . import options as opt
from .requests import OutputFlags, RunFlags, takes

if TYPE_CHECKING:  # the engine loads when a command runs, not for --help
    from mlkd_cli.anytime.evaluation import AnytimeJob


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
            "in onnxruntime (fp32 and int8; plain, one-graph and staged cascade) where mlkd "
            "export wrote them beside the checkpoint.",
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
    r = request
    out = r.output_options
    if r.provenance:
        show_provenance(r.checkpoints, Reporter(out))
        return
    results = api.evaluate(
        r.checkpoints,
        dataset=r.dataset,
        split=r.split,
        data_dir=r.data_dir,
        model=r.model,
        num_classes=r.num_classes,
        img_size=r.img_size,
        models_dir=r.models_dir,
        batch_size=r.batch_size,
        plots=r.plots,
        early_exit=r.early_exit,
        max_drop=r.max_drop,
        budget=r.budget,
        risk=r.risk,
        exit_rule=r.exit_rule,
        thresholds=_parse_thresholds(r.thresholds),
        timing_images=r.timing_images,
        latency=r.latency,
        overwrite=r.overwrite,
        world_size=r.world_size,
        device=r.device,
        precision=r.precision,
        workers=r.workers,
        progress=out,
    )
    if results is None:  # a torchrun rank other than 0
        return
    for result in results:  # a student with exits: its own tables
        if result.heads is not None:
            _render_anytime(Reporter(out), result.record, result.job)
    plain_results = [result.record for result in results if result.heads is None]
    if plain_results:
        _render(Reporter(out), plain_results)
    report = Reporter(out)
    if len(results) == 1:
        report.result(results[0].record)
    else:
        report.result({"results": [result.record for result in results]})


def _parse_thresholds(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--thresholds takes numbers like 0.9,0.9,0.95, not {text!r}") from None


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
        _render_latency(report, result)
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


def _render_latency(report: Reporter, result: dict) -> None:
    """The latency table (one row per runtime, model and request size), what its models are,
    and one line per ONNX form not found beside the checkpoint."""
    report.table(
        "latency on this machine: images in memory; a request is 1 image or a batch, and "
        "each of its images waits for the whole of it",
        ["runtime", "model", "batch", "img/s", "p50 ms", "p95 ms", "MACs %"],
        [
            [
                r["runtime"],
                r["model"],
                str(r["batch"]),
                f"{r['images_per_s']:.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p95_ms']:.2f}",
                f"{r['macs_pct']:.1f}",
            ]
            for r in result["latency"]
        ],
    )
    report.info("staged cascade: segments run on the images still in; one-graph: every head")
    report.info("MACs %: the work the timed images took, of the plain model's")
    for line in result.get("latency_missing") or []:
        report.info(line)


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
