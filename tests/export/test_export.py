"""`mlkd export`: every format reloads outside mlkd and matches PyTorch; refusals write nothing;
one light onnxruntime session opener."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import assert_error_line, independent_test_top1, invoke_cli


@pytest.fixture
def trained(digits_teacher: Path) -> Path:
    """The shared test_resnet digits teacher at 16 px."""
    return digits_teacher


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
    assert again["top1"] == pytest.approx(independent_test_top1(trained))

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


# --- the one onnxruntime session opener ----------------------------------------------------------

MLKD_CLI = Path(__file__).resolve().parents[2] / "mlkd_cli"


def test_the_session_opener_loads_nothing_heavy_until_a_session_is_opened() -> None:
    # The deploy-time classifier imports the opener: importing it (and the package's public
    # names) must not load torch, onnx, onnxruntime or Typer.
    code = (
        "import sys; from mlkd_cli.export import open_session; "
        "from mlkd_cli.export.session import open_session as same; assert open_session is same; "
        "heavy = {'torch', 'onnx', 'onnxruntime', 'typer', 'rich'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_session_opener_runs_a_file_on_the_cpu(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, save

    from mlkd_cli.export import open_session

    double = helper.make_node("Add", ["images", "images"], ["logits"])
    images, logits = (
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 2])
        for name in ("images", "logits")
    )
    graph = helper.make_graph([double], "double", [images], [logits])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "d.onnx")
    session = open_session(tmp_path / "d.onnx")
    assert session.get_providers() == ["CPUExecutionProvider"]
    (got,) = session.run(None, {"images": np.array([[1.0, -2.5]], np.float32)})
    assert got.tolist() == [[2.0, -5.0]]


def test_only_the_opener_creates_onnxruntime_sessions() -> None:
    # One place says how mlkd opens an ONNX file (the CPU provider): any other module that
    # builds an InferenceSession itself is reported here.
    import ast

    builders = []
    for path in sorted(MLKD_CLI.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            if name == "InferenceSession":
                builders.append(str(path.relative_to(MLKD_CLI)))
    assert builders == ["export/session.py"]
