"""A label budget (--label-fraction): a fixed stratified share of each class keeps its labels;
teachers train on those images, the student on all; a budget too small is refused first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DIGITS_TEACHER, assert_error_line, invoke_cli

from mlkd_cli.data.registry import labelled_positions, load_splits


def test_the_labelled_images_are_a_fixed_stratified_share_of_each_class() -> None:
    splits = load_splits("digits", Path("data"))
    labelled = labelled_positions(splits, 0.1)
    targets = [splits.train.targets[i] for i in splits.train_indices]
    assert len(labelled) == round(0.1 * len(targets)) == 129
    per_class = {c: sum(targets[p] == c for p in labelled) for c in range(10)}
    assert min(per_class.values()) >= 12 and max(per_class.values()) <= 14  # ~10 % of ~129
    assert labelled_positions(load_splits("digits", Path("data")), 0.1) == labelled  # every run
    assert labelled_positions(splits, 1.0) == list(range(len(targets)))
    with pytest.raises(Exception, match="without a labelled training image"):
        labelled_positions(splits, 0.001)  # one image in all: nine classes get none


def test_a_label_budget_trains_teachers_on_the_labelled_images_and_the_student_on_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    common = ("--label-fraction", "0.1", "-e", "1", "-b", "32", "--output-dir", "models")
    taught = invoke_cli(*DIGITS_TEACHER, "-n", "t", *common)
    assert taught.exit_code == 0, taught.stderr
    assert "129 train (labels of 129 used: --label-fraction 0.1)" in taught.stderr
    # 129 labelled images, batches of 32 with the last partial one dropped: 4 steps.
    assert _steps(tmp_path / "models" / "t_history.json") == 4
    distilled = invoke_cli(
        "distill", "-d", "digits", "-m", "test_resnet", "-c", digits_teacher, "--student",
        "test_resnet", "--img-size", "16", "-n", "s", "--alpha", "0.5", *common,
    )  # fmt: skip
    assert distilled.exit_code == 0, distilled.stderr
    assert "1294 train (labels of 129 used: --label-fraction 0.1)" in distilled.stderr
    assert _steps(tmp_path / "models" / "s_history.json") == 1294 // 32


def _steps(history: Path) -> int:
    return json.loads(history.read_text())["epochs"][-1]["optimizer_steps"]


def test_a_budget_too_small_for_one_batch_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(*DIGITS_TEACHER, "-n", "t", "--label-fraction", "0.05", "-b", "128")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--label-fraction 0.05", "lower --batch-size")
    assert not (tmp_path / "models").exists()
    result = invoke_cli(*DIGITS_TEACHER, "-n", "t", "--label-fraction", "1.5")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--label-fraction must be in (0, 1]")
