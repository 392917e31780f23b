"""Faults a long run meets: a DDP worker killed mid-run, a loss that diverges."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli.engine import loop, trainer

pytestmark = pytest.mark.slow


def _spawned_workers(parent: int) -> list[int]:
    """PIDs of the parent's children that are torch.multiprocessing workers (not helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if (
            int(stat[1]) == parent
            and b"spawn_main" in cmdline
            and b"resource_tracker" not in cmdline
        ):
            found.append(int(entry.name))
    return found


def test_killed_ddp_worker_ends_the_job_quickly_with_one_line(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "mlkd_cli",
        "teacher",
        "train",
        "--dataset",
        "digits",
        "--model",
        "test_resnet",
        "--epochs",
        "200",
        "--img-size",
        "16",
        "--batch-size",
        "16",
        "--world-size",
        "2",
        "--output-dir",
        str(tmp_path),
        "--quiet",
    ]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline and not (tmp_path / "digits_test_resnet_last.pth").exists()
        ):
            time.sleep(0.2)  # wait until training is under way (the first epoch is saved)
        workers = _spawned_workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1
    assert_error_line(stderr, "DDP worker", "SIGKILL", "--resume")


def _nan_on_call(monkeypatch: pytest.MonkeyPatch, which: int) -> None:
    """Make the teacher-training step return NaN on its `which`-th call."""
    calls = []

    def step(model, images, targets):
        calls.append(1)
        loss = loop.cross_entropy_step(model, images, targets)
        return loss * float("nan") if len(calls) == which else loss

    monkeypatch.setattr(trainer.TeacherTask, "step", staticmethod(step))


TINY_RUN = (
    "teacher",
    "train",
    "--dataset",
    "digits",
    "--model",
    "test_resnet",
    "--img-size",
    "16",
    "--batch-size",
    "32",
    "--name",
    "t",
    "-q",
)


def test_nonfinite_loss_stops_naming_step_and_last_good_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_call(monkeypatch, 45)  # 40 batches an epoch: the 5th batch of epoch 2
    result = invoke_cli(*TINY_RUN, "--epochs", "3", "--output-dir", tmp_path)
    assert result.exit_code == 1
    assert_error_line(result.stderr, "epoch 2", str(tmp_path / "t_last.pth"), "--skip-nonfinite")
    state = torch.load(tmp_path / "t_last.pth", weights_only=True)
    assert state["epoch"] == 1  # the good state, not overwritten by NaN weights
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_on_call(monkeypatch, 3)
    result = invoke_cli(
        *TINY_RUN, "--epochs", "1", "--skip-nonfinite", "--json", "--output-dir", tmp_path
    )
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["last"]
    assert row["nonfinite_skipped"] == 1 and row["optimizer_steps"] == 39
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_nll"])


def _distill_command(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlkd_cli",
        "distill",
        "--dataset",
        "digits",
        "--model",
        "test_resnet",
        "--checkpoint",
        str(teacher),
        "--student",
        "test_resnet",
        "-e",
        "3",
        "-b",
        "32",
        "-n",
        "s",
        "--mixup-alpha",
        "0.5",
        "--output-dir",
        str(out),
        "-q",
        "--workers",
        "0",
        *extra,
    ]


def test_sigkilled_distillation_resumes_to_the_same_weights(
    digits_teacher: Path, tmp_path: Path
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_distill_command(digits_teacher, straight), check=True, capture_output=True)

    job = subprocess.Popen(
        _distill_command(digits_teacher, killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    history = killed / "s_history.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if history.exists() and len(json.loads(history.read_text())["epochs"]) == 1:
            time.sleep(0.5)  # into the second epoch
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    assert torch.load(killed / "s_last.pth", weights_only=True)["epoch"] < 3
    resumed = subprocess.run(
        _distill_command(digits_teacher, killed, "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(straight / "s_last.pth", weights_only=True)["model"]
    b = torch.load(killed / "s_last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
