"""Nothing overwritten, nothing escapes: every written file refuses an existing path unless
--overwrite (and the command's input always), a run's name is locked while it runs, and run
names and CSV rows stay inside their folders. Each refusal is one line, exit 2, before work."""

from __future__ import annotations

import contextlib
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
from conftest import DIGITS_TEACHER, assert_error_line, invoke_cli, working_dir
from PIL import Image

from mlkd_cli.core.atomic import check_new_files, run_lock
from mlkd_cli.core.errors import RunStopped, UserError
from mlkd_cli.data.registry import load_splits

# A folder no process can create files in, root included (tests here often run as root, for
# whom a chmod 555 folder is writable).
UNWRITABLE = Path("/proc/mlkd-test-folder")
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


@pytest.fixture
def teacher(digits_teacher: Path, tmp_path: Path) -> Path:
    """A private copy of the shared digits teacher (a test here must not risk the original)."""
    copy = tmp_path / "models" / "t.pth"
    copy.parent.mkdir()
    shutil.copy(digits_teacher, copy)
    return copy


# ------------------------------------------------------------------------------ exports


def test_export_never_replaces_its_checkpoint_even_with_overwrite(teacher: Path) -> None:
    before = teacher.read_bytes()
    for extra in ((), ("--overwrite",)):
        result = invoke_cli("export", teacher, "-f", "torchscript", "-o", teacher, *extra)
        assert result.exit_code == 2
        assert_error_line(result.stderr, "is the input", "t.pth", "another path")
    # a hard link to the checkpoint is the same file under another name
    link = teacher.with_name("alias.pth")
    os.link(teacher, link)
    result = invoke_cli("export", teacher, "-f", "onnx", "-o", link, "--overwrite")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "is the input")
    assert teacher.read_bytes() == before


def test_export_refuses_an_existing_file_unless_overwrite(teacher: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    refused = invoke_cli("export", teacher, "-f", "torchscript", "-o", notes)
    assert refused.exit_code == 2
    assert_error_line(refused.stderr, "notes.txt already exists", "--overwrite")
    assert notes.read_text() == "precious\n"
    replaced = invoke_cli("export", teacher, "-f", "torchscript", "-o", notes, "--overwrite", "-q")
    assert replaced.exit_code == 0, replaced.stderr
    assert notes.read_bytes()[:2] == b"PK"  # a TorchScript archive now
    # the default destination (a safetensors folder beside the checkpoint) is held the same way
    assert invoke_cli("export", teacher, "-q").exit_code == 0
    again = invoke_cli("export", teacher, "-q")
    assert again.exit_code == 2
    assert_error_line(again.stderr, "model.safetensors already exists", "--overwrite")


def test_export_int8_refuses_an_existing_int8_file_before_writing_the_fp32_one(
    teacher: Path,
) -> None:
    int8 = teacher.with_suffix(".int8.onnx")
    int8.write_bytes(b"an earlier int8 model")
    result = invoke_cli("export", teacher, "-f", "onnx", "--int8")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "t.int8.onnx already exists", "--overwrite")
    assert not teacher.with_suffix(".onnx").exists()
    assert int8.read_bytes() == b"an earlier int8 model"


def test_export_into_an_existing_folder_or_an_unwritable_one_is_one_line(
    teacher: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    result = invoke_cli("export", teacher, "-f", "onnx", "-o", folder, "--overwrite")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "is an existing folder")
    assert list(folder.iterdir()) == []
    missing = invoke_cli("export", teacher, "-f", "onnx", "-o", tmp_path / "no" / "m.onnx")
    assert missing.exit_code == 2
    assert_error_line(missing.stderr, "not a writable folder", "create it")


@needs_proc
def test_export_to_an_unwritable_folder_is_one_line(teacher: Path) -> None:
    result = invoke_cli("export", teacher, "-f", "torchscript", "-o", Path("/proc/m.pt"))
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--output", "not writable")


# ------------------------------------------------------------------------------ ensemble files


def test_ensemble_build_refuses_an_existing_output_and_config_itself(
    digits_teacher: Path, tmp_path: Path
) -> None:
    config = tmp_path / "e.yaml"
    config.write_text(f"members:\n  - checkpoint: {digits_teacher}\n    model: test_resnet\n")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    args = ("ensemble", "build", config, "-d", "digits")
    refused = invoke_cli(*args, "--output", precious)
    assert refused.exit_code == 2
    assert_error_line(refused.stderr, "precious.txt already exists", "--overwrite")
    assert precious.read_text() == "keep me\n"
    itself = invoke_cli(*args, "--output", config, "--overwrite")
    assert itself.exit_code == 2
    assert_error_line(itself.stderr, "is CONFIG itself", "--in-place")
    folder = invoke_cli(*args, "--output", tmp_path)
    assert folder.exit_code == 2
    assert_error_line(folder.stderr, "is an existing folder")
    member = tmp_path / "member.pth"  # a member's checkpoint is an input too, never replaced
    member.write_bytes(digits_teacher.read_bytes())
    config.write_text(f"members:\n  - checkpoint: {member}\n    model: test_resnet\n")
    onto = invoke_cli(*args, "--output", member, "--overwrite")
    assert onto.exit_code == 2
    assert_error_line(onto.stderr, "member.pth is the input", "never replaces an input")
    assert member.read_bytes() == digits_teacher.read_bytes()


# ------------------------------------------------------------------------------ eval --plots


def test_eval_plots_refuses_existing_figures_and_one_name_twice(
    digits_teacher: Path, tmp_path: Path
) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "t_confusion.png").write_bytes(b"an earlier figure")
    args = ("eval", digits_teacher, "-d", "digits", "--img-size", "16", "-q")
    result = invoke_cli(*args, "--plots", plots)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "t_confusion.png already exists", "--overwrite")
    assert (plots / "t_confusion.png").read_bytes() == b"an earlier figure"
    other = tmp_path / "other" / "t.pth"
    other.parent.mkdir()
    shutil.copy(digits_teacher, other)
    twice = invoke_cli(*args, other, "--plots", tmp_path / "fresh")
    assert twice.exit_code == 2
    assert_error_line(twice.stderr, "twice", "one at a time")
    assert not (tmp_path / "fresh").exists()  # refused before anything was made


@needs_proc
def test_eval_plots_into_an_unwritable_folder_is_one_line(digits_teacher: Path) -> None:
    result = invoke_cli(
        "eval", digits_teacher, "-d", "digits", "--img-size", "16", "--plots", UNWRITABLE
    )
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--plots", "not writable")


# ------------------------------------------------------------------------------ stores


def test_teacher_label_output_must_be_a_writable_store_folder(
    digits_teacher: Path, tmp_path: Path
) -> None:
    args = ("teacher", "label", "-d", "digits", "--img-size", "16", "-m", "test_resnet")
    args = (*args, "--checkpoint", digits_teacher)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    as_file = invoke_cli(*args, "-o", notes)
    assert as_file.exit_code == 2
    assert_error_line(as_file.stderr, "notes.txt is a file", "folder")
    assert notes.read_text() == "precious\n"
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "report.md").write_text("mine\n")
    not_store = invoke_cli(*args, "-o", tmp_path / "work")
    assert not_store.exit_code == 2
    assert_error_line(not_store.stderr, "no manifest.json", "new or empty folder")
    if Path("/proc/self").is_dir():
        unwritable = invoke_cli(*args, "-o", UNWRITABLE)
        assert unwritable.exit_code == 2
        assert_error_line(unwritable.stderr, "--output", "not writable")


# ------------------------------------------------------------------------------ run names


def test_a_run_name_with_a_path_in_it_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "models"
    for name in ("../../escaped", "sub/run", ".."):
        result = invoke_cli(*DIGITS_TEACHER, "-n", name, "--epochs", "1", "--output-dir", out)
        assert result.exit_code == 2
        assert_error_line(result.stderr, "--name", "not a plain file name")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


# ------------------------------------------------------------------------------ run lock


def _lock(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": socket.gethostname(), "started": "2026-12-06 10:00:00 UTC"}
    path.write_text(json.dumps(record))


def test_a_running_run_of_the_same_name_refuses_a_second(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path / "models" / "same.lock", sleeper.pid)
        for extra in ((), ("--overwrite",)):
            result = invoke_cli(
                *DIGITS_TEACHER, "-n", "same", "--epochs", "1", "--output-dir",
                tmp_path / "models", *extra,
            )  # fmt: skip
            assert result.exit_code == 2
            assert_error_line(result.stderr, "already running", f"pid {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["same.lock"]


def test_a_stale_lock_is_said_and_taken_over_and_goes_when_the_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    models = tmp_path / "models"
    _lock(models / "t.lock", gone.pid)
    held = []

    def launch(*args: object, **kwargs: object) -> None:  # the run, cut short: it fails
        held.append(json.loads((models / "t.lock").read_text())["pid"])
        raise RunStopped("the run failed")

    monkeypatch.setattr("mlkd_cli.engine.trainer.launch", launch)
    result = invoke_cli(*DIGITS_TEACHER, "-n", "t", "--epochs", "1", "--output-dir", models)
    assert result.exit_code == 1 and "the run failed" in result.stderr
    assert f"pid {gone.pid}" in result.stderr and "taking it over" in result.stderr
    assert held == [os.getpid()]  # this run held the lock while it ran
    assert not (models / "t.lock").exists()


def test_run_lock_holds_its_record_and_goes_on_error(tmp_path: Path) -> None:
    path = tmp_path / "r.lock"
    said: list[str] = []
    with pytest.raises(RuntimeError), run_lock(path, "run 'r'", said.append):
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        second = run_lock(path, "run 'r'", said.append)
        with pytest.raises(UserError, match=f"already running .pid {os.getpid()}"), second:
            pass
        raise RuntimeError("the run failed")
    assert not path.exists() and said == []


# ------------------------------------------------------------------------------ CSV rows


def _csv_folder(root: Path, row: str) -> Path:
    data = root / "data"
    (data / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "img" / "a.png")
    (data / "train.csv").write_text(f"path,label\nimg/a.png,cat\n{row},dog\n")
    return data


@pytest.mark.parametrize("row", ["../../etc/passwd", "/etc/passwd", "img/../../outside.png"])
def test_csv_rows_outside_their_folder_are_refused(tmp_path: Path, row: str) -> None:
    _csv_folder(tmp_path, row)
    with working_dir(tmp_path):
        result = invoke_cli(*DIGITS_TEACHER[:2], "-d", "csv", "-m", "test_resnet")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "data/train.csv row 3", row, "outside", "ALLOW_OUTSIDE")


def test_csv_rows_outside_are_read_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _csv_folder(tmp_path, "../shared/b.png")
    (tmp_path / "shared").mkdir()
    Image.new("RGB", (8, 8), "white").save(tmp_path / "shared" / "b.png")
    with pytest.raises(UserError, match="row 3"):
        load_splits("csv", data)
    monkeypatch.setenv("MLKD_ALLOW_OUTSIDE_PATHS", "1")
    splits = load_splits("csv", data, val_fraction=0.5)
    assert splits.class_names == ["cat", "dog"]


# ------------------------------------------------------------------------------ the check


def test_check_new_files_refuses_inputs_existing_files_and_folders(tmp_path: Path) -> None:
    source, old = tmp_path / "in.pth", tmp_path / "old.onnx"
    source.write_bytes(b"weights")
    old.write_bytes(b"old")
    check_new_files([tmp_path / "new.onnx"], False, "--output", sources=[source])
    check_new_files([old], True, "--output", sources=[source])
    for paths, overwrite, words in (
        ([old], False, "already exists"),
        ([tmp_path], True, "existing folder"),
        ([tmp_path / "." / "in.pth"], True, "is the input"),
    ):
        with pytest.raises(UserError, match=words):
            check_new_files(paths, overwrite, "--output", sources=[source])
    long = tmp_path / ("x" * 200) / ("y" * 200)
    with pytest.raises(UserError) as caught:
        check_new_files([long], True, "--output", sources=[long])
    assert "y" * 100 not in str(caught.value)  # each path is quoted in part


def test_sigterm_outside_the_loop_ends_the_run_in_one_line_and_frees_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"

    def launch(*args: object, **kwargs: object) -> None:  # SIGTERM while the run sets up
        assert (models / "t.lock").is_file()
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("mlkd_cli.engine.trainer.launch", launch)
    result = invoke_cli(*DIGITS_TEACHER, "-n", "t", "--epochs", "1", "--output-dir", models)
    assert result.exit_code == 128 + signal.SIGTERM
    assert_error_line(result.stderr, "stopped by SIGTERM", "run the same command again")
    assert not (models / "t.lock").exists()


def test_a_lock_from_another_host_or_not_from_mlkd_is_never_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "r.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    lock = run_lock(path, "run 'r'", print)
    with (
        pytest.raises(
            UserError, match="already running .pid 1 on elsewhere.*if that run is gone, delete"
        ),
        lock,
    ):
        pass
    path.write_text("my notes\n")
    lock = run_lock(path, "run 'r'", print)
    with pytest.raises(UserError, match="not a lock mlkd wrote; delete it"), lock:
        pass
    assert path.read_text() == "my notes\n"


def test_two_runs_finding_one_stale_lock_do_not_both_take_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from mlkd_cli.core import atomic

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "r.lock"
    _lock(path, gone.pid)
    real_read, both_read = atomic._read_lock, threading.Barrier(2, timeout=2)

    def slow_read(where: Path) -> dict | None:
        record = real_read(where)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait()  # unserialised, both runs would read the stale record here
        return record

    monkeypatch.setattr(atomic, "_read_lock", slow_read)
    outcomes: list[str] = []
    said: list[str] = []

    def say(line: str) -> None:  # said just before a run deletes the stale lock
        said.append(line)
        if len(said) == 2:  # the second to find it stale waits for the first's new lock
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and "token" not in (real_read(path) or {}):
                time.sleep(0.01)

    def start() -> None:
        try:
            atomic._acquire(path, "run 'r'", say)
            outcomes.append("took it")
        except UserError as exc:
            outcomes.append(str(exc))

    runs = [threading.Thread(target=start) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=30)
    assert sorted(outcomes)[-1] == "took it" and outcomes.count("took it") == 1, outcomes
    assert "already running" in sorted(outcomes)[0]
