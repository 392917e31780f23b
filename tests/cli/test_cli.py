"""The command line as a user meets it: groups, version, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import assert_error_line

from mlkd_cli import __version__

GROUPS = ("teacher", "ensemble", "distill", "eval", "export", "data")


def test_help_lists_every_group(run_cli) -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    for group in GROUPS:
        assert group in result.stdout


def test_version(run_cli) -> None:
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mlkd {__version__}"


def test_data_list_json_names_every_dataset(run_cli) -> None:
    result = run_cli("data", "list", "--json")
    assert result.exit_code == 0
    names = [d["name"] for d in json.loads(result.stdout)["datasets"]]
    assert names == [
        *("cifar-10", "cifar-100", "oxford-iiit", "imagefolder", "csv", "digits"),
        *("hfds/NAME", "wds/FOLDER"),
    ]


def test_data_info_counts_a_real_layout(run_cli, cifar10_dir: Path) -> None:
    result = run_cli("data", "info", "cifar-10", "--data-dir", cifar10_dir, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["counts"] == {"train": 90, "val": 10, "test": 20}
    assert info["class_names"][:2] == ["class_0", "class_1"]


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout
    assert_error_line(result.stderr, *fragments)


def train(run_cli, out: Path, *extra, dataset: str = "digits", model: str = "test_resnet"):
    """`mlkd teacher train` with a quick default for every option the test does not care about."""
    args = ["--dataset", dataset, "--model", model, "--output-dir", out, *extra]
    if "--epochs" not in extra:
        args += ["--epochs", "1"]
    return run_cli("teacher", "train", "--quiet", *args)


def test_unreadable_init_checkpoint(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    result = train(run_cli, tmp_path / "out", "--init-checkpoint", bad)
    _assert_one_line_error(result, str(bad), "not a readable checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs", "--world-size"])
def test_zero_counts_are_refused(run_cli, tmp_path: Path, flag: str) -> None:
    _assert_one_line_error(train(run_cli, tmp_path, flag, "0"), flag, "at least 1")


def test_module_entry_point_runs() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "mlkd_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"mlkd {__version__}"


def test_every_flag_of_a_training_request_is_a_setting_of_its_config() -> None:
    # A request hands every field but its COMMAND_ONLY ones to its config by name, so a flag
    # added without its config field (or misnamed) is caught here, not by a user.
    from mlkd_cli.commands import distill, study, teacher

    from mlkd_cli.core.coerce import config_field_names

    requests = [
        distill.DistillRequest,
        study.StudyRequest,
        teacher.TeacherTrainRequest,
        teacher.LabelRequest,
    ]
    for request in requests:
        settings = config_field_names(type(request.DEFAULTS))
        assert request.setting_names() <= settings, (request, request.setting_names() - settings)
        assert not request.COMMAND_ONLY & settings, request  # a command-only flag shadows none


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["study", "--seed", "1"], "--seed"),  # the study seeds its runs itself (--seeds)
        (["study", "--resume"], "--resume"),
        (["teacher", "label", "-o", "store", "--epochs", "3"], "--epochs"),  # labels, trains not
    ],
)
def test_a_flag_the_command_does_not_take_is_a_usage_error(run_cli, args, flag) -> None:
    result = run_cli(*args)
    assert result.exit_code == 2
    assert_error_line(result.stderr, f"No such option: {flag}")


def test_a_request_names_only_flags_it_has() -> None:
    from mlkd_cli.commands.requests import TrainingFlags, takes

    with pytest.raises(ValueError, match="no flags \\['sede'\\]"):
        takes(TrainingFlags, without={"seed", "sede"})
