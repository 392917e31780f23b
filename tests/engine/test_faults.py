"""Faults a long run meets: a DDP worker killed mid-run, a loss that diverges, a busy master
port."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    DIGITS_TEACHER,
    assert_error_line,
    assert_same_weights,
    ended_after,
    invoke_cli,
    process_table,
    reaped,
)

from mlkd_cli.core import atomic
from mlkd_cli.engine import loop, teacher

pytestmark = pytest.mark.slow

MLKD = [sys.executable, "-m", "mlkd_cli"]  # a command of its own, for the tests that signal it


def _fork_server_of(launcher: int) -> int | None:
    """The launcher's fork server (engine/launch.py), if it has started one."""
    table = process_table()
    return next(
        (pid for pid, (ppid, cmd) in table.items() if ppid == launcher and b"forkserver" in cmd),
        None,
    )


def _spawned_workers(launcher: int) -> list[int]:
    """PIDs of the launcher's DDP workers: the children of its fork server."""
    server = _fork_server_of(launcher)
    return [pid for pid, (ppid, _) in process_table().items() if ppid == server]


def _ddp_command(out: Path) -> list[str]:
    """A two-process CPU teacher run writing to `out` (add --epochs)."""
    return [
        *MLKD,
        *TINY_RUN,
        "--world-size",
        "2",
        "--output-dir",
        str(out),
    ]


def _ddp_training(out: Path) -> subprocess.Popen:
    """A long two-process CPU teacher run in the background, writing to `out`."""
    command = [*_ddp_command(out), "--epochs", "200"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(ready, job: subprocess.Popen, seconds: float = 120, poll: float = 0.05) -> None:
    """Wait until `ready()` holds, the job ends, or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and job.poll() is None and not ready():
        time.sleep(poll)


def test_killed_ddp_worker_ends_the_job_quickly_with_one_line(tmp_path: Path) -> None:
    with reaped(_ddp_training(tmp_path)) as job:
        # Until training is under way (the first epoch is saved).
        _wait_for((tmp_path / "t_last.pth").exists, job, 60, 0.2)
        workers = _spawned_workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        stderr, took = ended_after(job, 60)
    assert took < 60
    assert job.returncode == 1
    assert_error_line(
        stderr, "DDP worker 1 of 2", "SIGKILL", "most likely out of memory: lower --batch-size"
    )
    assert "--resume" in stderr


def test_max_restarts_finishes_a_run_whose_worker_was_killed_with_the_same_weights(
    tmp_path: Path,
) -> None:
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    epochs = ["--epochs", "3"]
    # The straight run in this process (no signal reaches it); the restarted one on its own.
    whole = invoke_cli(*_ddp_command(straight)[len(MLKD) :], *epochs)
    assert whole.exit_code == 0, whole.stderr
    command = [*_ddp_command(restarted), *epochs, "--max-restarts", "1"]
    with reaped(
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ) as job:
        _wait_for((restarted / "t_last.pth").exists, job, 60, 0.05)  # epoch 1 saved
        workers = _spawned_workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        stderr, _ = ended_after(job, 300)
    assert job.returncode == 0, stderr
    assert "DDP worker 1 of 2 died (signal SIGKILL" in stderr and "restart 1 of 1" in stderr
    history = json.loads((restarted / "t_history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3]
    (restart,) = history["restarts"]  # killed after epoch 1 was saved (2 if the kill was slow)
    assert restart["restart"] == 1 and restart["resumed_from"] in ("after epoch 1", "after epoch 2")
    state = torch.load(restarted / "t_last.pth", weights_only=True)
    assert state["restarts"] == history["restarts"]
    _assert_same_weights(straight / "t_last.pth", restarted / "t_last.pth")


def _nan_on_call(monkeypatch: pytest.MonkeyPatch, which: int) -> None:
    """Make the teacher-training step return NaN on its `which`-th call."""
    calls = []

    def step(model, images, targets, indices=None, mix=1.0):
        calls.append(1)
        loss = loop.cross_entropy_step(model, images, targets)
        return loss * float("nan") if len(calls) == which else loss

    monkeypatch.setattr(teacher.TeacherTask, "step", staticmethod(step))


TINY_RUN = (*DIGITS_TEACHER, "--batch-size", "32", "--name", "t", "-q")


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
        *MLKD,
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


@pytest.fixture(scope="module")
def straight_student(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training state of the distillation run below, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    done = invoke_cli(*_distill_command(digits_teacher, out)[len(MLKD) :])
    assert done.exit_code == 0, done.stderr
    return out / "s_last.pth"


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    assert_same_weights(a_path, b_path, "model")


def _saved_part_way(state_file: Path) -> bool:
    try:
        return torch.load(state_file, weights_only=True)["partial_epoch"] is not None
    except (OSError, RuntimeError, KeyError):
        return False


def test_sigkilled_distillation_resumes_mid_epoch_to_the_same_weights(
    digits_teacher: Path, straight_student: Path, tmp_path: Path
) -> None:
    command = _distill_command(digits_teacher, tmp_path, "--save-every-steps", "2")
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "s_last.pth"
    _wait_for(lambda: _saved_part_way(state), job)
    job.send_signal(signal.SIGKILL)  # right after a mid-epoch save: the epoch is part-done
    job.wait()
    assert job.returncode == -signal.SIGKILL
    saved = torch.load(state, weights_only=True)
    assert saved["partial_epoch"]["progress"][0]["batches_done"] > 0
    resumed = invoke_cli(*command[len(MLKD) :], "--resume")  # no signal: in this process
    assert resumed.exit_code == 0, resumed.stderr
    _assert_same_weights(straight_student, state)


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(
    digits_teacher: Path, straight_student: Path, tmp_path: Path
) -> None:
    command = _distill_command(digits_teacher, tmp_path)
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for((tmp_path / "s_curves.png").exists, job, poll=0.02)  # last file of an epoch
    time.sleep(0.4)  # into the second epoch (an epoch takes about 1.4 s here)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM
    assert_error_line(stderr, "stopped by SIGTERM", str(tmp_path / "s_last.pth"), "--resume")
    saved = torch.load(tmp_path / "s_last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["partial_epoch"] is not None
    resumed = invoke_cli(*command[len(MLKD) :], "--resume")  # no signal: in this process
    assert resumed.exit_code == 0, resumed.stderr
    _assert_same_weights(straight_student, tmp_path / "s_last.pth")


def test_sigterm_to_the_launcher_stops_every_ddp_worker_cleanly(tmp_path: Path) -> None:
    with reaped(_ddp_training(tmp_path)) as job:
        _wait_for((tmp_path / "t_last.pth").exists, job, 90, 0.2)
        job.send_signal(signal.SIGTERM)  # the launcher alone, as a scheduler's `kill` would
        stderr, took = ended_after(job, 60)
    assert took < 60
    assert job.returncode == 128 + signal.SIGTERM, stderr
    assert_error_line(stderr, "stopped by SIGTERM", "--resume")
    saved = torch.load(tmp_path / "t_last.pth", weights_only=True)
    assert saved["epoch"] < 200
    assert saved["partial_epoch"] is None or saved["partial_epoch"]["world_size"] == 2


def test_full_disk_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = invoke_cli(*TINY_RUN, "--epochs", "1", "--output-dir", tmp_path)
    assert first.exit_code == 0, first.stderr
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    result = invoke_cli(*TINY_RUN, "--epochs", "2", "--resume", "--output-dir", tmp_path)
    assert result.exit_code == 1
    errors = "\n".join(line for line in result.stderr.splitlines() if "warning:" not in line)
    assert_error_line(
        errors, "could not write", "No space left on device", "previous file is intact"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no stray temp files
    assert torch.load(tmp_path / "t_last.pth", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "t.pth", weights_only=True)["epoch"] == 1


def test_a_signal_while_the_fork_server_imports_stops_the_launch_with_one_line(
    tmp_path: Path,
) -> None:
    # A fork server that takes 2 s to import (as torch and timm do on a loaded machine).
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(2)\n")
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from mlkd_cli.core.errors import RunInterrupted\n"
        "from mlkd_cli.engine import launch\n"
        "launch.FORKSERVER_PRELOAD = ()\n"
        "try:\n"
        "    launch._start_fork_server('slow_import')\n"
        "except RunInterrupted as exc:\n"
        "    print(exc.signum, exc, file=sys.stderr)\n"
        "    sys.exit(3)\n"
    )
    job = subprocess.Popen(
        [sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with reaped(job):
        # Until the server has started (it is importing then), and a moment into its import.
        _wait_for(lambda: _fork_server_of(job.pid) is not None, job, 60, 0.05)
        assert _fork_server_of(job.pid) is not None, job.communicate()
        time.sleep(0.5)
        job.send_signal(signal.SIGTERM)
        # Every holder of the job's stderr (the server and what it forks) has ended by then.
        stderr, _ = ended_after(job, 60)
    assert job.returncode == 3
    assert stderr.splitlines() == [
        f"{signal.SIGTERM.value} stopped by SIGTERM before the workers started; "
        "nothing was written by this pass"
    ]


@pytest.mark.slow
def test_busy_master_port_does_not_stop_a_ddp_run(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        result = run_cli(
            "teacher", "train", "--dataset", "digits", "--model", "test_resnet", "--epochs", "1",
            "--img-size", "16", "--batch-size", "32", "--world-size", "2",
            "--output-dir", tmp_path, "-q",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "MASTER_PORT" in result.stderr and "busy" in result.stderr
