"""`mlkd eval` numbers against independent computations (the metrics by hand:
tests/core/test_metrics.py; exports: tests/export/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import independent_test_top1, invoke_cli


@pytest.fixture
def trained(digits_teacher: Path) -> Path:
    """The shared test_resnet digits teacher at 16 px."""
    return digits_teacher


@pytest.mark.slow
def test_eval_top1_equals_an_independent_count(trained: Path) -> None:
    # fp32 (the independent count's arithmetic): under bf16 a near-tie can flip an image.
    result = invoke_cli("eval", trained, "--json", "--precision", "fp32")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["split"] == "test" and report["dataset"] == "digits"
    assert report["images"] == 359
    assert report["top1"] == pytest.approx(independent_test_top1(trained), abs=1e-9)
    assert {"top5", "nll", "ece", "worst_classes", "images_per_s"} <= set(report)
    two = json.loads(
        invoke_cli("eval", trained, "--json", "--world-size", "2", "--precision", "fp32").stdout
    )
    assert two["top1"] == pytest.approx(report["top1"], abs=1e-9)
    assert two["nll"] == pytest.approx(report["nll"], rel=1e-6)


@pytest.mark.slow
def test_eval_plain_state_dicts_need_model_and_classes(trained: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(trained, weights_only=True)["state_dict"], plain)
    missing = invoke_cli("eval", plain, "--dataset", "digits")
    assert missing.exit_code == 2 and "pass --model and --num-classes" in missing.stderr
    wrong = invoke_cli(
        "eval", plain, "--dataset", "digits", "--model", "test_resnet", "--num-classes", "7"
    )
    assert wrong.exit_code == 2 and "classifier for 10 classes, not 7" in wrong.stderr
    ok = invoke_cli(
        "eval",
        plain,
        "--dataset",
        "digits",
        "--model",
        "test_resnet",
        "--num-classes",
        "10",
        "--img-size",
        "16",
        "--json",
        "--precision",
        "fp32",  # the independent count's arithmetic
    )
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["top1"] == pytest.approx(independent_test_top1(trained))


@pytest.mark.slow
def test_eval_several_with_plots(trained: Path, tmp_path: Path) -> None:
    ensemble = tmp_path / "ens.yaml"
    ensemble.write_text(f"members:\n  - checkpoint: {trained}\n")
    result = invoke_cli(
        "eval", trained, ensemble, "--split", "val", "--plots", tmp_path / "p", "--json",
        "--precision", "fp32",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [Path(r["checkpoint"]).name for r in rows] == ["t.pth", "ens.yaml"]
    assert rows[0]["top1"] == pytest.approx(rows[1]["top1"])  # an ensemble of one is the model
    for name in ("t_confusion.png", "t_reliability.png", "ens_reliability.png"):
        assert (tmp_path / "p" / name).read_bytes()[:4] == b"\x89PNG"
