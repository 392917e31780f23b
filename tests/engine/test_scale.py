"""Many processes at the sizes users run: results of megabytes, signals mid-pass, torchrun.

A result larger than a pipe's buffer (64 KiB) once hung every `--world-size 2` evaluation; these
tests use a CIFAR-100 in its real on-disk format with 5,000 images a split and 100 classes, so
each logits result is megabytes (30 times the buffer and more), and require the two-process
answers to equal one process's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    CliResult,
    assert_error_line,
    assert_same_weights,
    ended_after,
    invoke_cli,
    process_table,
    reaped,
    working_dir,
    write_cifar,
)

pytestmark = pytest.mark.slow

MLKD = [sys.executable, "-m", "mlkd_cli"]
IMAGES = 5_000  # per split file; --val-fraction 0.8 holds out 4,000 of the training images
VAL_FRACTION = "0.8"


def _run(*args: object, cwd: Path) -> CliResult:
    """`mlkd ARGS` in `cwd`, in this process: the workers it spawns, and what they send back,
    are the same as under a `mlkd` of its own, without a second interpreter importing torch
    (the torchrun and signal tests below need their own processes and start them)."""
    with working_dir(cwd):
        done = invoke_cli(*args)
    assert done.exit_code == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder: CIFAR-100 (5,000 train / 5,000 test images) and two 1-epoch teachers."""
    root = tmp_path_factory.mktemp("big")
    write_cifar(root / "data", classes=100, per_file=IMAGES, fine=True)
    for name, arch in (("a", "test_resnet"), ("b", "test_efficientnet")):
        _run(
            "teacher", "train", "-d", "cifar-100", "-m", arch, "--img-size", "16", "-e", "1",
            "--val-fraction", VAL_FRACTION, "-n", name, "--output-dir", "models", "-q",
            cwd=root,
        )  # fmt: skip
    config = {"models": ["test_resnet", "test_efficientnet"], "names": ["a", "b"]}
    (root / "config.json").write_text(json.dumps(config))
    return root


def _json(done: CliResult | subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout)


def _without_speed(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "images_per_s"}


def _same_figures(a: object, b: object) -> bool:
    """Equal, floats to 1e-9 relative: in fp32 a conv's output can depend on the size of the
    batch an image shares (shards end at other batch boundaries), by a few ulps."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_figures(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_figures(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def test_eval_of_megabytes_on_two_processes_equals_one(big: Path) -> None:
    one = _json(_run("eval", "models/a.pth", "--split", "test", "--json", cwd=big))
    two = _json(
        _run("eval", "models/a.pth", "--split", "test", "--json", "--world-size", "2", cwd=big)
    )
    # 5,000 x 100 float32 logits: 2 MB came back from the workers.
    assert one["images"] == IMAGES and len(one["worst_classes"]) > 0
    assert _same_figures(_without_speed(two), _without_speed(one))
    assert two["top1"] == one["top1"] and two["worst_classes"] == one["worst_classes"]


def test_ensemble_build_and_eval_on_two_processes_equal_one(big: Path) -> None:
    build = ["ensemble", "build", "--json", "--val-fraction", VAL_FRACTION]
    one = _json(_run(*build, "-o", "one.json", cwd=big))
    two = _json(_run(*build, "-o", "two.json", "--world-size", "2", cwd=big))
    assert one["images"] == 4_000  # two members x 4,000 x 100 logits: 3.2 MB
    assert _same_figures(two, {**one, "written": two["written"]})
    assert json.loads((big / "one.json").read_text()) == json.loads((big / "two.json").read_text())
    evaluate = ["ensemble", "eval", "one.json", "--split", "test", "--json"]
    one_eval = _json(_run(*evaluate, cwd=big))
    assert one_eval["images"] == IMAGES
    assert _same_figures(_json(_run(*evaluate, "--world-size", "2", cwd=big)), one_eval)


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...)."""
    parents = {child: parent for child, (parent, _) in process_table().items()}
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_a_two_process_eval_within_15_s_leaving_nothing(big: Path) -> None:
    # One image a batch, so the signal lands mid-pass.
    command = [
        *MLKD,
        "eval",
        "models/a.pth",
        "--split",
        "test",
        "-b",
        "1",
        "--world-size",
        "2",
        "-q",
    ]
    job = subprocess.Popen(command, cwd=big, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with reaped(job):
        # The workers, forked by the launcher's fork server (beside it: its resource tracker).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_descendants(job.pid)) < 4:
            time.sleep(0.05)
        workers = _descendants(job.pid)
        assert len(workers) >= 4, "the workers never started"
        time.sleep(1)  # into the pass (5,000 batches: seconds at the least)
        assert job.poll() is None, job.communicate()[1]
        job.send_signal(signal.SIGTERM)
        stderr, took = ended_after(job, 60)
    assert took < 15
    assert job.returncode == 128 + signal.SIGTERM
    assert_error_line(stderr, "stopped by SIGTERM")
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)]


# ------------------------------------------------------------------- torchrun across "nodes"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`mlkd ARGS` as a two-node torchrun job (one process a node) on this machine."""
    port = str(_free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "-m",
                "mlkd_cli",
                *args,
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [job.communicate(timeout=600) for job in jobs]
    for job, (_, stderr) in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, stderr
    return subprocess.CompletedProcess(args, 0, outputs[0][0], outputs[0][1])


def _same_weights(a: Path, b: Path) -> None:
    assert_same_weights(a, b, "state_dict")


def _metrics(history: Path) -> list[dict]:
    timing = ("images_per_s", "epoch_time_s")
    rows = json.loads(history.read_text())["epochs"]
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def test_two_node_torchrun_equals_a_two_process_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: Path
) -> None:
    # Both "nodes" share this machine: give every process one thread in both launches, as
    # torchrun would for two processes on one node (thread count changes float summation order).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn, nodes = tmp_path / "spawn", tmp_path / "nodes"
    # One teacher for both, the suite's (training under either launcher is the distill step's
    # `fit`, which the runs below hold).
    for folder in (spawn, nodes):
        (folder / "models").mkdir(parents=True)
        shutil.copy(digits_teacher, folder / "models" / "t.pth")
    distill = ["distill", "-d", "digits", "-m", "test_resnet", "-c", "models/t.pth"]
    distill += ["--student", "test_resnet", "--img-size", "16", "-e", "2", "-b", "32", "-n", "s"]
    distill += ["--mixup-alpha", "0.5", "--output-dir", "models", "-q", "--json"]
    evaluate = ["eval", "models/s.pth", "--split", "test", "--json"]
    results = {}
    for folder, run in ((spawn, None), (nodes, _two_nodes)):
        # Training (`fit`) and a logits pass (`launch_pass`) under each launcher; ensemble
        # fitting's two-process path is held by test_ensemble_build_and_eval_on_two_processes.
        for step in (distill, evaluate):
            done = run(step, folder) if run else _run(*step, "--world-size", "2", cwd=folder)
            results[(folder.name, step[0])] = json.loads(done.stdout)
    _same_weights(spawn / "models" / "s.pth", nodes / "models" / "s.pth")
    assert _metrics(spawn / "models" / "s_history.json") == _metrics(
        nodes / "models" / "s_history.json"
    )
    assert _without_speed(results[("nodes", "eval")]) == _without_speed(results[("spawn", "eval")])
    assert results[("nodes", "distill")]["world_size"] == 2
