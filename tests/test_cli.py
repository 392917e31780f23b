"""The command line as a user meets it: groups, version, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
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
    assert names == ["cifar-10", "cifar-100", "oxford-iiit", "imagefolder", "digits"]


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


def test_unknown_dataset(run_cli, tmp_path: Path) -> None:
    _assert_one_line_error(train(run_cli, tmp_path, dataset="mnist"), "'mnist'", "cifar-10")


def test_unknown_model_suggests_names(run_cli, tmp_path: Path) -> None:
    result = train(run_cli, tmp_path, model="resnet5O")
    _assert_one_line_error(result, "unknown model 'resnet5O'", "did you mean")


def test_missing_data_directory(run_cli, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = train(run_cli, tmp_path, "--data-dir", missing, dataset="oxford-iiit")
    _assert_one_line_error(result, str(missing), "--download")


def test_unreadable_init_checkpoint(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    result = train(run_cli, tmp_path / "out", "--init-checkpoint", bad)
    _assert_one_line_error(result, str(bad), "not a readable checkpoint")
    assert not (tmp_path / "out").exists()


def test_init_checkpoint_of_another_architecture(run_cli, tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"blocks.0.weight": torch.zeros(3)}}, other)
    result = train(run_cli, tmp_path / "out", "--init-checkpoint", other)
    _assert_one_line_error(result, "does not fit", "same --model")


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs", "--world-size"])
def test_zero_counts_are_refused(run_cli, tmp_path: Path, flag: str) -> None:
    _assert_one_line_error(train(run_cli, tmp_path, flag, "0"), flag, "at least 1")


def test_image_size_too_small_for_the_model(run_cli, tmp_path: Path) -> None:
    result = train(run_cli, tmp_path, "--img-size", "16", model="test_convnext")
    _assert_one_line_error(result, "test_convnext cannot run on 16x16", "--img-size")


def test_bad_option_value_is_one_line(run_cli) -> None:
    result = run_cli("teacher", "train", "--batch-size", "many")
    _assert_one_line_error(result, "--batch-size", "valid integer")


def test_unknown_option_is_one_line(run_cli) -> None:
    result = run_cli("teacher", "train", "--batchsize", "8")
    _assert_one_line_error(result, "--batchsize")


def test_effective_batch_must_be_a_multiple(run_cli, tmp_path: Path) -> None:
    result = train(run_cli, tmp_path, "--batch-size", "8", "--effective-batch-size", "12")
    _assert_one_line_error(result, "--effective-batch-size 12", "multiple")


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a GPU")
def test_cuda_requested_without_gpu(run_cli, tmp_path: Path) -> None:
    _assert_one_line_error(train(run_cli, tmp_path, "--device", "cuda"), "--device cpu")


def test_resume_without_a_run(run_cli, tmp_path: Path) -> None:
    result = train(run_cli, tmp_path, "--name", "x", "--resume")
    _assert_one_line_error(result, "nothing to resume", "x_last.pth")


def test_existing_run_is_not_overwritten(run_cli, tmp_path: Path) -> None:
    (tmp_path / "x.pth").write_bytes(b"precious")
    result = train(run_cli, tmp_path, "--name", "x")
    _assert_one_line_error(result, "already exists", "--resume", "--overwrite")
    assert (tmp_path / "x.pth").read_bytes() == b"precious"


def test_preset_with_unknown_key_names_key_and_file(run_cli, tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("dataset: digits\nteacher:\n  model: test_resnet\n  epochz: 3\n")
    result = run_cli("teacher", "train", "--preset", preset, "--output-dir", tmp_path)
    _assert_one_line_error(result, "'epochz'", str(preset))


def test_preset_with_wrong_type(run_cli, tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("dataset: digits\nteacher:\n  model: test_resnet\n  epochs: three\n")
    result = run_cli("teacher", "train", "--preset", preset, "--output-dir", tmp_path)
    _assert_one_line_error(result, "epochs must be int", "'three'")


def test_missing_required_option(run_cli, tmp_path: Path) -> None:
    result = run_cli("teacher", "train", "--dataset", "digits", "--output-dir", tmp_path)
    _assert_one_line_error(result, "--model is required")


def test_module_entry_point_runs() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "mlkd_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"mlkd {__version__}"
