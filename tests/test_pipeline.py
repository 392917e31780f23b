"""`mlkd pipeline` end to end on a tiny preset: every stage, and a restart after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli

from mlkd_cli.engine import loop

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
    assert 0 < cascade["macs_pct"] < 110 and sum(cascade["exit_shares"]) == pytest.approx(100)
    for png in [run / "comparison.png", *(models / f"{n}_curves.png" for n in ("ta", "s"))]:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert (run / "export" / "s" / "model.safetensors").is_file()
    assert json.loads((run / "results.json").read_text())["rows"] == summary["rows"]

    again = json.loads(
        invoke_cli("pipeline", "--preset", preset, "--run-dir", run, "--json", "-q").stdout
    )
    assert set(again["stages"].values()) == {"skipped"}
