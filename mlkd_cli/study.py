"""`mlkd study`: cross-entropy and each named loss over seeds, compared honestly.

Every arm trains the same student on the same data, epochs and label budget; each (arm, seed) is
an ordinary `distill` (or, for cross-entropy, `teacher train`) run in `<run-dir>/models`, so any of
them opens with `mlkd eval`. Each saved student is measured on the test split the way `mlkd eval`
measures it. The table gives each arm's mean ± sd, and the paired difference to cross-entropy
(and to `kd`) seed by seed, with its mean and a 95 % t interval. A stopped study continues where it
stopped: complete runs are skipped, a partial one resumes.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlkd_cli.core.atomic import atomic_write_text
from mlkd_cli.core.console import OutputOptions, Reporter
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.plots import study_png
from mlkd_cli.engine.config import DistillConfig, TeacherTrainConfig, TrainConfig
from mlkd_cli.engine.distiller import distill_student, plan_distillation
from mlkd_cli.engine.teacher import plan_teacher_training, train_teacher
from mlkd_cli.losses.registry import LOSSES
from mlkd_cli.passes.evaluation import EvalRequest, measure, plan_eval_job
from mlkd_cli.pipeline import BASELINE_KIND, baseline_config, train_stage

CE = "ce"  # the cross-entropy arm: the student trained on labels alone
REFERENCE = "kd"  # the second reference every arm is compared with
RESULTS = "study.json"
FIGURE = "study.png"

# Two-sided 95 % quantiles of Student's t by degrees of freedom (1-30); beyond, the normal's.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass(frozen=True)
class StudyOptions:
    """What `mlkd study` was asked to do: `base` holds every setting the arms share."""

    base: DistillConfig
    losses: tuple[str, ...]
    seeds: tuple[int, ...]
    run_dir: Path
    output: OutputOptions = OutputOptions()


def parse_losses(text: str) -> tuple[str, ...]:
    """`--losses kd,dkd,dist`: registered names, each once, in the order given."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown:
        raise UserError(
            f"--losses takes names among {', '.join(LOSSES)} separated by commas, "
            f"not {text!r}; cross-entropy ({CE}) is always an arm"
        )
    return names


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2`: at least two distinct non-negative integers (a spread needs two)."""
    try:
        seeds = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        seeds = ()
    if len(seeds) < 2 or any(s < 0 for s in seeds):
        raise UserError(
            f"--seeds takes two or more seeds like 0,1,2 (a spread needs two), not {text!r}"
        )
    return seeds


def t_quantile(dof: int) -> float:
    """The two-sided 95 % quantile of Student's t with `dof` degrees of freedom."""
    return T_975[dof - 1] if dof <= len(T_975) else 1.960


def paired(differences: list[float], lower_is_better: bool = False) -> dict[str, Any]:
    """Mean of per-seed differences, with its 95 % t interval (n − 1 degrees of freedom), and
    the seeds won (a difference above 0; below 0 for a figure where lower is better, NLL)."""
    mean = statistics.fmean(differences)
    sd = statistics.stdev(differences)
    half = t_quantile(len(differences) - 1) * sd / math.sqrt(len(differences))
    return {
        "per_seed": differences,
        "mean": mean,
        "ci95": [mean - half, mean + half],
        "wins": sum((d < 0) if lower_is_better else (d > 0) for d in differences),
    }


def _arms(options: StudyOptions) -> list[tuple[str, int, TrainConfig]]:
    """Every (arm, seed, run config) of the study, cross-entropy first."""
    models = options.run_dir / "models"
    runs: list[tuple[str, int, TrainConfig]] = []
    base = options.base
    common = {
        "output_dir": models,
        "world_size": base.world_size,
        "device": base.device,
        "precision": base.precision,
        "workers": base.workers,
        "output": base.output,
        "max_restarts": base.max_restarts,
    }
    for seed in options.seeds:
        student = replace(base, seed=seed, output_dir=models)
        ce = baseline_config(student, common, None)
        runs.append((CE, seed, replace(ce, name=f"{CE}_s{seed}")))
    for loss in options.losses:
        for seed in options.seeds:
            name = f"{loss}_s{seed}"
            cfg = replace(base, loss=loss, seed=seed, output_dir=models, name=name)
            runs.append((loss, seed, cfg))
    return runs


def _check_plan(runs: list[tuple[str, int, TrainConfig]]) -> None:
    """Every arm planned (flags, teacher, student, data, what its loss needs) before any run
    trains; a run already complete or partly done is not refused for existing."""
    checked: set[str] = set()
    for arm, _, cfg in runs:
        if arm in checked:
            continue
        checked.add(arm)
        # quiet: what a plan says is said when its arm runs, not before another arm's refusal
        probe = replace(cfg, resume=False, overwrite=True, output=OutputOptions(quiet=True))
        try:
            if isinstance(probe, DistillConfig):
                plan_distillation(probe)
            else:
                plan_teacher_training(probe)
        except UserError as exc:
            raise UserError(f"study arm {arm}: {exc}") from None


def _measured(path: Path, base: DistillConfig) -> dict[str, float]:
    """A saved student on the test split, measured as `mlkd eval` measures it."""
    job = plan_eval_job(
        EvalRequest(
            path=path,
            data_dir=base.data_dir,
            split="test",
            workers=base.workers,
            precision=base.precision,
            output=base.output,
        )
    )
    measured = measure(job, base.world_size, base.device)
    if measured is None:  # a worker rank: the launcher reports
        return {}
    return {"top1": measured.result["top1"], "nll": measured.result["nll"]}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values)}


def summarise(
    results: dict[str, dict[int, dict[str, float]]], seeds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """One row per arm: top-1 and NLL mean ± sd, the paired top-1 (and NLL) differences to
    cross-entropy and to `kd` (when both are arms)."""
    rows = []
    for arm, by_seed in results.items():
        top1 = [by_seed[s]["top1"] for s in seeds]
        nll = [by_seed[s]["nll"] for s in seeds]
        row: dict[str, Any] = {
            "arm": arm,
            "runs": [f"{arm}_s{s}" for s in seeds],
            "top1": {**_spread(top1), "per_seed": top1},
            "nll": {**_spread(nll), "per_seed": nll},
        }
        for reference in (CE, REFERENCE):
            if arm == reference or reference not in results:
                continue
            ref = results[reference]
            row[f"vs_{reference}"] = paired([by_seed[s]["top1"] - ref[s]["top1"] for s in seeds])
            nll = [by_seed[s]["nll"] - ref[s]["nll"] for s in seeds]
            row[f"nll_vs_{reference}"] = paired(nll, lower_is_better=True)
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The arm with the best mean test top-1, and whether its lead over cross-entropy holds
    (the interval of the paired difference above 0)."""
    best = max(rows, key=lambda r: r["top1"]["mean"])
    lead = best.get(f"vs_{CE}")
    return {
        "best": best["arm"],
        "top1": best["top1"]["mean"],
        "beats_ce": lead is not None and lead["ci95"][0] > 0,
        "top1_points_vs_ce": None if lead is None else lead["mean"],
    }


def run_study(options: StudyOptions) -> dict[str, Any] | None:
    """Train (or finish) every run of the study, measure each student, compare the arms."""
    base = options.base
    runs = _arms(options)
    _check_plan(runs)
    report = Reporter(options.output)
    stages: dict[str, str] = {}
    for arm, _seed, cfg in runs:
        if isinstance(cfg, DistillConfig):
            what = f"{arm} student {cfg.run_name} ({cfg.student})"
            stages[cfg.run_name] = train_stage(
                cfg, plan_distillation, distill_student, report, what
            )
        else:
            assert isinstance(cfg, TeacherTrainConfig)
            what = f"cross-entropy student {cfg.run_name} ({cfg.model})"
            stages[cfg.run_name] = train_stage(
                cfg, plan_teacher_training, train_teacher, report, what, kind=BASELINE_KIND
            )
    results: dict[str, dict[int, dict[str, float]]] = {}
    for arm, seed, cfg in runs:
        figures = _measured(cfg.output_dir / f"{cfg.run_name}.pth", base)
        if not figures:
            return None
        results.setdefault(arm, {})[seed] = figures
    rows = summarise(results, options.seeds)
    summary = {
        "run_dir": str(options.run_dir),
        "dataset": base.dataset,
        "student": base.student,
        "epochs": base.epochs,
        "label_fraction": base.label_fraction,
        "seeds": list(options.seeds),
        "arms": [CE, *options.losses],
        "stages": stages,
        "rows": rows,
        "verdict": verdict(rows),
        "figure": str(options.run_dir / FIGURE),
    }
    study_png(rows, f"{base.dataset}, {base.student}: test split", options.run_dir / FIGURE)
    atomic_write_text(options.run_dir / RESULTS, json.dumps(summary, indent=2) + "\n")
    return summary
