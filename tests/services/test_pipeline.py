"""`mlkd pipeline` end to end on a tiny preset: every stage, and a restart after an interruption."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli import pipeline
from mlkd_cli.core.console import Reporter
from mlkd_cli.engine import loop
from mlkd_cli.models.teacher import TeacherEnsemble
from mlkd_cli.presets import resolve_preset

pytestmark = pytest.mark.slow

TINY = """\
description: two tiny teachers, a tiny student
dataset: digits
baseline: true
img_size: 32
teacher: {epochs: 1, batch_size: 32}
teachers:
  - {name: ta, model: test_resnet}
  - {name: tb, model: test_convnext}
ensemble: {fit_temperature: true}
distill: {name: s, student: test_resnet, epochs: 2, batch_size: 32, mixup_alpha: 0, cutmix_alpha: 0}
"""


def test_interrupted_pipeline_finishes_without_redoing_teachers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY)
    run = tmp_path / "run"
    real, calls = loop.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # teachers take calls 1-2, the student's first epoch call 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    stopped = invoke_cli("pipeline", "--preset", preset, "--run-dir", run, "-q")
    assert stopped.exit_code == 130
    monkeypatch.setattr(loop, "train_one_epoch", real)
    models = run / "models"
    teachers = {p: p.stat().st_mtime_ns for p in models.glob("t[ab]*")}
    assert len(teachers) >= 8  # .pth, _last, history json/csv for each

    result = invoke_cli("pipeline", "--preset", preset, "--run-dir", run, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["stages"] == {
        "ta": "skipped",
        "tb": "skipped",
        "ensemble": "skipped",
        "s": "resumed",
        "s_ce_baseline": "trained",
        "export": "exported",
    }
    assert {p: p.stat().st_mtime_ns for p in teachers} == teachers  # teachers untouched
    history = json.loads((models / "s_history.json").read_text())["epochs"]
    assert [row["epoch"] for row in history] == [1, 2]
    roles = [row["role"] for row in summary["rows"]]
    assert roles == [
        "teacher",
        "teacher",
        "ensemble",
        "student",
        "exit",
        "exit",
        "exit",
        "cascade",
        "baseline",
    ]
    assert all(0 <= row["top1"] <= 100 for row in summary["rows"])
    # The cascade at thresholds chosen on validation, written into the exits checkpoint.
    cascade = next(row for row in summary["rows"] if row["role"] == "cascade")
    chosen = torch.load(models / "s_exits.pth", weights_only=True)["exits"]["thresholds"]
    assert chosen["split"] == "val" and chosen["values"] == cascade["thresholds"]
    assert chosen["rule"] == cascade["exit_rule"]
    assert 0 < cascade["macs_pct"] < 110 and sum(cascade["exit_shares"]) == pytest.approx(100)
    for png in [run / "comparison.png", *(models / f"{n}_curves.png" for n in ("ta", "s"))]:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert (run / "export" / "s" / "model.safetensors").is_file()
    assert json.loads((run / "results.json").read_text())["rows"] == summary["rows"]

    again = json.loads(
        invoke_cli("pipeline", "--preset", preset, "--run-dir", run, "--json", "-q").stdout
    )
    assert set(again["stages"].values()) == {"skipped"}


STORE_PRESET = """\
description: a tiny teacher, a store labelled once from its fitted "ensemble"
dataset: digits
img_size: 16
soft_labels: {views: 2}
teacher: {epochs: 1, batch_size: 64}
teachers:
  - {name: ta, model: test_resnet}
ensemble: {fit_temperature: true}
distill: {name: s, student: test_resnet, epochs: 1, batch_size: 64, mixup_alpha: 0.5}
"""


def test_a_pipeline_with_soft_labels_labels_once_from_the_fitted_ensemble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset = tmp_path / "store.yaml"
    preset.write_text(STORE_PRESET)
    run = tmp_path / "run"
    teachers_ran = []
    real_forward = TeacherEnsemble.member_logits  # what the labelling and the live teacher run

    def counted(self, *args, **kwargs):
        teachers_ran.append(1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(TeacherEnsemble, "member_logits", counted)
    real_distill, during = pipeline.distill_student, []

    def watched(ctx, plan):
        before = len(teachers_ran)
        summary = real_distill(ctx, plan)
        during.append(len(teachers_ran) - before)
        return summary

    monkeypatch.setattr(pipeline, "distill_student", watched)
    result = invoke_cli("pipeline", "--preset", preset, "--run-dir", run, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["stages"]["soft_labels"] == "labelled"
    assert summary["stages"]["s"] == "trained"
    manifest = json.loads((run / "soft_labels" / "manifest.json").read_text())
    ensemble = json.loads((run / "ensemble.json").read_text())
    assert manifest["views"] == 2 and manifest["images"] == 1_294
    assert manifest["teacher"]["models"] == ["test_resnet"]
    assert manifest["teacher"]["weights"] == pytest.approx(ensemble["weights"])
    # The teachers ran for the labelling (2 views of shards of 1,000 and 294 images in
    # batches of 64), and not once while the student trained.
    assert during == [0]
    assert len(teachers_ran) >= 2 * (math.ceil(1_000 / 64) + math.ceil(294 / 64))
    history = json.loads((run / "models" / "s_history.json").read_text())["epochs"]
    assert history[-1]["kd"] > 0

    # Run again, the complete store is not labelled again (the stage's own check).
    resolved = resolve_preset(str(preset))
    student = replace(resolved.distill, ensemble=run / "ensemble.json", models_dir=run / "models")
    settings = resolved.soft_labels
    assert pipeline.label_stage(student, settings, run / "soft_labels", Reporter()) == "skipped"


def test_a_pipeline_whose_student_cannot_learn_from_a_store_is_refused_first(
    tmp_path: Path,
) -> None:
    preset = tmp_path / "cached.yaml"
    preset.write_text(
        STORE_PRESET.replace("mixup_alpha: 0.5", "augment: false, teacher_cache: true")
    )
    run = tmp_path / "run"
    result = invoke_cli("pipeline", "--preset", preset, "--run-dir", run)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "stage s", "--soft-labels cannot be used with --teacher-cache")
    assert not (run / "models").exists()
    preset.write_text(STORE_PRESET.replace("{views: 2}", "{views: 0}"))
    result = invoke_cli("pipeline", "--preset", preset, "--run-dir", run)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "soft_labels.views must be at least 1")
    # A top-k the dataset cannot have: found before the teacher trains, not at labelling.
    preset.write_text(STORE_PRESET.replace("{views: 2}", "{views: 2, top_k: 11}"))
    result = invoke_cli("pipeline", "--preset", preset, "--run-dir", run)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "soft_labels", "between 1 and the 10 classes, got 11")
    assert not (run / "models").exists()


def test_the_distillation_gain_compares_the_student_with_its_baseline() -> None:
    rows = [
        {"role": "teacher", "top1": 99.0, "nll": 0.01},
        {"role": "student", "top1": 96.5, "nll": 0.12},
        {"role": "exit", "top1": 90.0, "nll": 0.3},
        {"role": "baseline", "top1": 90.0, "nll": 0.40},
    ]
    gain = pipeline.distillation_gain(rows)
    assert gain["top1_points"] == pytest.approx(6.5) and gain["nll_change"] == pytest.approx(-0.28)
    assert pipeline.distillation_gain(rows[:3]) is None
