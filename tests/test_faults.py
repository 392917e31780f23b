"""Faults a long run meets: a DDP worker killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DDP worker" in lines[0] and "SIGKILL" in lines[0], stderr
    assert "--resume" in lines[0]
