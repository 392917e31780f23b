"""Sharing the cores: compute threads are each process's share of the affinity less its loader
workers; OpenMP spins briefly unless the user chose."""

from __future__ import annotations

import os

import pytest
import torch

from mlkd_cli.core import cpus
from mlkd_cli.data.loaders import default_cpu_workers
from mlkd_cli.engine import launch


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
