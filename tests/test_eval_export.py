"""`mlkd eval` numbers against independent computations, and exports that reload outside mlkd."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli.core.metrics import (
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
)
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.transforms import ImageRecipe, build_eval_transform


def test_nll_and_ece_against_hand_computed_values() -> None:
    # Two classes; softmax of (log p, 0) gives probability p for class 0.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    logits = probs.log()
    labels = torch.tensor([0, 1, 0, 1])
    metrics = classification_metrics(logits, labels)
    nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.7)) / 4
    assert metrics["nll"] == pytest.approx(nll, rel=1e-9)
    assert metrics["top1"] == pytest.approx(75.0)
    # Confidences 0.9, 0.8, 0.6, 0.7 fall in four different 1/15-wide bins; each holds one image,
    # correct or not: ECE = (|1-0.9| + |0-0.8| + |1-0.6| + |1-0.7|) / 4.
    assert metrics["ece"] == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4, rel=1e-9)
    # Same bin: confidences 0.81 and 0.82 (bin (0.8, 0.8667]), one right -> |0.5 - 0.815|.
    two = torch.tensor([[0.81, 0.19], [0.82, 0.18]], dtype=torch.float64)
    assert expected_calibration_error(two, torch.tensor([0, 1])) == pytest.approx(0.315)


def test_worst_classes_and_confusion_matrix() -> None:
    logits = torch.eye(3)[[0, 0, 1, 2, 2, 2]] * 5
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    metrics = classification_metrics(logits, labels, ["a", "b", "c"], worst=2)
    assert [c["class"] for c in metrics["worst_classes"]] == ["a", "b"]
    assert metrics["worst_classes"][0]["top1"] == pytest.approx(50.0)
    assert confusion_matrix(logits, labels).tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]


@pytest.fixture
def trained(digits_teacher: Path) -> Path:
    """The shared test_resnet digits teacher at 16 px."""
    return digits_teacher


def _independent_test_top1(checkpoint: Path) -> float:
    """Plain timm model, plain loop over the digits test split, the card's eval transform."""
    model = timm.create_model("test_resnet", checkpoint_path=str(checkpoint), num_classes=10)
    model.eval()
    transform = build_eval_transform(ImageRecipe(img_size=16, crop_pct=1.0))
    test = load_splits("digits", Path("data")).test
    hits = 0
    with torch.no_grad():
        for index in range(len(test)):
            image, label = test[index]
            hits += int(model(transform(image)[None]).argmax(1).item() == label)
    return 100.0 * hits / len(test)


@pytest.mark.slow
def test_eval_top1_equals_an_independent_count(trained: Path) -> None:
    # fp32 (the independent count's arithmetic): under bf16 a near-tie can flip an image.
    result = invoke_cli("eval", trained, "--json", "--precision", "fp32")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["split"] == "test" and report["dataset"] == "digits"
    assert report["images"] == 359
    assert report["top1"] == pytest.approx(_independent_test_top1(trained), abs=1e-9)
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
    assert json.loads(ok.stdout)["top1"] == pytest.approx(_independent_test_top1(trained))


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


@pytest.mark.slow
def test_each_export_reloads_outside_mlkd_and_matches(trained: Path, tmp_path: Path) -> None:
    reference = timm.create_model("test_resnet", checkpoint_path=str(trained), num_classes=10)
    reference.eval()
    batch = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = reference(batch)

    out = tmp_path / "student"
    assert invoke_cli("export", trained, "--format", "safetensors", "-o", out, "-q").exit_code == 0
    from safetensors.torch import load_file

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    model = timm.create_model(config["architecture"], num_classes=config["num_classes"])
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    model.eval()
    with torch.no_grad():
        assert (model(batch) - expected).abs().max() <= 1e-4
    again = json.loads(
        invoke_cli("eval", out / "model.safetensors", "--json", "--precision", "fp32").stdout
    )
    assert again["top1"] == pytest.approx(_independent_test_top1(trained))

    onnx_path = tmp_path / "t.onnx"
    result = invoke_cli("export", trained, "--format", "onnx", "-o", onnx_path, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert "onnxruntime" in json.loads(result.stdout)["checked_with"]  # stdout is JSON alone
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4

    script = tmp_path / "t.pt"
    assert (
        invoke_cli("export", trained, "--format", "torchscript", "-o", script, "-q").exit_code == 0
    )
    loaded = torch.jit.load(str(script))
    with torch.no_grad():
        assert (loaded(batch) - expected).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--format", "tflite"), "'tflite' is not one of 'safetensors', 'onnx', 'torchscript'"),
        (("--format", "onnx", "-o", "/nonexistent/dir/t.onnx"), "not a writable folder"),
        (("--model", "resnet10t"), "holds a test_resnet"),
        (("--num-classes", "3"), "has 10 classes, not --num-classes 3"),
    ],
)
def test_export_refusals_write_nothing(trained: Path, tmp_path: Path, args, message: str) -> None:
    before = sorted(p.name for p in trained.parent.iterdir())
    result = invoke_cli("export", trained, *args)
    assert result.exit_code == 2, result.stdout
    assert_error_line(result.stderr, message)
    assert sorted(p.name for p in trained.parent.iterdir()) == before
    assert not Path("/nonexistent").exists()
