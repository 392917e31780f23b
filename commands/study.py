"""`mlkd study`: cross-entropy against each named loss, over seeds, in one table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

from mlkd_cli.core.console import Reporter
from mlkd_cli.engine.config import DistillConfig

from . import options as opt
from .requests import TrainingFlags, takes

# The study names every run itself and continues by itself: no --name, --seed, --output-dir,
# --resume or --overwrite.
OWN = {"output_dir", "resume", "overwrite", "seed"}
STUDY = opt.STUDY


@dataclass(kw_only=True)
class StudyRequest(TrainingFlags):
    """`mlkd study`'s flags: the arms and seeds, and the base run's `DistillConfig` settings."""

    DEFAULTS: ClassVar[DistillConfig] = DistillConfig(dataset="")
    SECTION: ClassVar[str] = "distill"
    COMMAND_ONLY: ClassVar[frozenset[str]] = frozenset({"losses", "seeds", "run_dir"})

    dataset: opt.Dataset = None
    losses: Annotated[
        str,
        typer.Option(
            "--losses",
            help="The losses compared with cross-entropy, e.g. kd,dkd,dist (see distill "
            "--list-losses).",
            rich_help_panel=STUDY,
        ),
    ] = "kd,dkd,dist"
    seeds: Annotated[
        str,
        typer.Option("--seeds", help="Seeds each arm runs with.", rich_help_panel=STUDY),
    ] = "0,1,2"
    run_dir: Annotated[
        Path,
        typer.Option("--run-dir", help="The study's folder.", rich_help_panel=STUDY),
    ] = Path("runs/study")
    ensemble: opt.EnsembleFile = None
    teacher_model: opt.TeacherModel = None
    teacher_checkpoint: opt.TeacherCheckpoint = None
    models_dir: opt.ModelsDir = None
    teacher_img_size: opt.TeacherImgSize = None
    soft_labels: opt.SoftLabels = None
    student: opt.Student = None
    exits: opt.Exits = None
    exit_head: opt.ExitHead = None
    alpha: opt.Alpha = None
    temperature: opt.Temperature = None


@takes(StudyRequest, without=OWN)
def study(request: StudyRequest) -> None:
    """Compare cross-entropy and each named loss over seeds; continues where it stopped."""
    from mlkd_cli.engine.launch import launcher_rank
    from mlkd_cli.study import CE, REFERENCE, StudyOptions, parse_losses, parse_seeds, run_study

    arms, chosen_seeds = parse_losses(request.losses), parse_seeds(request.seeds)
    base = request.config()
    summary = run_study(StudyOptions(base, arms, chosen_seeds, request.run_dir, base.output))
    if summary is None or launcher_rank() != 0:
        return
    report = Reporter(base.output)
    rows = summary["rows"]
    report.table(
        f"study: {summary['dataset']}, {summary['student']}, {summary['epochs']} epochs, "
        f"seeds {','.join(map(str, summary['seeds']))} (test split)",
        [
            "arm",
            "top-1 % mean ± sd",
            "NLL mean ± sd",
            f"Δ top-1 vs {CE} per seed",
            f"Δ vs {CE} [95 % CI]",
            f"Δ vs {REFERENCE} [95 % CI]",
        ],
        [
            [
                r["arm"],
                f"{r['top1']['mean']:.2f} ± {r['top1']['sd']:.2f}",
                f"{r['nll']['mean']:.4f} ± {r['nll']['sd']:.4f}",
                _per_seed(r.get(f"vs_{CE}")),
                _interval(r.get(f"vs_{CE}")),
                _interval(r.get(f"vs_{REFERENCE}")),
            ]
            for r in rows
        ],
    )
    best = summary["verdict"]
    holds = "its interval above 0" if best["beats_ce"] else "its interval does not exclude 0"
    lead = best["top1_points_vs_ce"]
    against = "" if lead is None else f", {lead:+.2f} points over {CE} ({holds})"
    report.info(f"best mean test top-1: {best['best']} {best['top1']:.2f}{against}")
    report.info(f"figure {summary['figure']}; every run in {summary['run_dir']}/models")
    report.result(summary)


def _per_seed(diff: dict[str, Any] | None) -> str:
    return "-" if diff is None else " ".join(f"{d:+.2f}" for d in diff["per_seed"])


def _interval(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    low, high = diff["ci95"]
    return f"{diff['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"
