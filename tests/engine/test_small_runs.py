"""Small runs at the machine's speed, label budgets, and sharing the cores (issue 23)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_TEACHER, assert_error_line, invoke_cli

from mlkd_cli.core import cpus
from mlkd_cli.data.loaders import ReplayedBatches, default_cpu_workers
from mlkd_cli.data.registry import labelled_positions, load_splits
from mlkd_cli.engine import checkpointing, launch, planning
from mlkd_cli.engine.config import TeacherTrainConfig
from mlkd_cli.pipeline import distillation_gain

# ------------------------------------------------------------------------------ label budget


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


def test_the_distillation_gain_compares_the_student_with_its_baseline() -> None:
    rows = [
        {"role": "teacher", "top1": 99.0, "nll": 0.01},
        {"role": "student", "top1": 96.5, "nll": 0.12},
        {"role": "exit", "top1": 90.0, "nll": 0.3},
        {"role": "baseline", "top1": 90.0, "nll": 0.40},
    ]
    gain = distillation_gain(rows)
    assert gain["top1_points"] == pytest.approx(6.5) and gain["nll_change"] == pytest.approx(-0.28)
    assert distillation_gain(rows[:3]) is None


# ----------------------------------------------------------------------------- small epochs


def test_in_memory_data_is_augmented_in_batches_on_a_cpu_too() -> None:
    cfg = TeacherTrainConfig(dataset="digits", model="test_resnet")
    splits = load_splits("digits", Path("data"))
    image_config = planning.dataset_image_config(cfg, splits)
    assert planning.data_pipeline(cfg, splits, "cpu", image_config) == "device"
    erasing = TeacherTrainConfig(dataset="digits", model="test_resnet", reprob=0.25)
    image_config = planning.dataset_image_config(erasing, splits)
    assert planning.data_pipeline(erasing, splits, "cpu", image_config) == "cpu"  # timm's only


def test_a_small_validation_split_is_transformed_once_and_replayed() -> None:
    passes = []

    class Loader:
        def __len__(self) -> int:
            return 2

        def __iter__(self):
            passes.append(1)
            for i in range(2):
                yield (torch.full((4, 3, 8, 8), float(i)), torch.zeros(4, dtype=torch.long))

    replayed = ReplayedBatches(Loader())
    first, second = list(replayed), list(replayed)
    assert len(passes) == 1 and len(second) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    too_big = ReplayedBatches(Loader(), limit_bytes=4 * 3 * 8 * 8 * 4)  # one batch fits, not two
    list(too_big), list(too_big)
    assert len(passes) == 3  # loaded again on every pass


def test_the_state_is_written_every_few_seconds_and_always_after_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpointing, "STATE_EVERY_S", 3600.0)
    written = []
    real = checkpointing.Checkpointer._write_state

    def record(self, epoch, best, partial):
        written.append(epoch)
        real(self, epoch, best, partial)

    monkeypatch.setattr(checkpointing.Checkpointer, "_write_state", record)
    result = invoke_cli(*DIGITS_TEACHER, "-n", "t", "-e", "4", "-q")
    assert result.exit_code == 0, result.stderr
    assert written == [1, 4]  # the first epoch, then the last: none in between within an hour
    history = json.loads((tmp_path / "models" / "t_history.json").read_text())
    assert len(history["epochs"]) == 4  # the history is written every epoch


# --------------------------------------------------------------------------- sharing the CPU


def test_threads_are_the_affinity_share_less_the_loader_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cpus.usable_cores() == 16
    assert cpus.compute_threads(1, 0) == 16
    assert cpus.compute_threads(2, 2) == 6  # 8 cores a process, 2 of them loading
    assert cpus.compute_threads(32, 0) == 1  # never none
    assert default_cpu_workers(1) == 4 and default_cpu_workers(4) == 0  # 16 and 4 cores each
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        assert launch.use_cpu_share(2, None) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert launch.use_cpu_share(2, None) == 3  # the user's count wins
    finally:
        torch.set_num_threads(before)


def test_openmp_is_told_to_spin_briefly_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    cpus.prefer_short_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "1000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    cpus.prefer_short_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "300000"
