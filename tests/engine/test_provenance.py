"""What a trained model records about where it came from, and `mlkd eval --provenance`."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli import __version__


def test_a_teachers_provenance_names_data_software_and_command(digits_teacher: Path) -> None:
    result = invoke_cli("eval", digits_teacher, "--provenance", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)["provenance"]
    assert record["teacher"] is None  # trained on labels
    data = record["data"]
    assert data["dataset"] == "digits" and data["classes"] == 10
    assert data["train"] > 1000 and data["val"] > 100
    assert record["software"]["mlkd"] == __version__
    assert record["software"]["torch"] == torch.__version__
    assert record["software"]["timm"] == timm.__version__
    assert record["command"].startswith("mlkd teacher train --dataset digits --model test_resnet")
    table = invoke_cli("eval", digits_teacher, "--provenance")
    assert "data.dataset" in table.stdout and "software.torch" in table.stdout


def test_provenance_of_a_file_without_one_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    result = invoke_cli("eval", path, "--provenance")
    assert result.exit_code == 2
    assert_error_line(result.stderr, str(path), "records no provenance")


def test_an_onnx_export_carries_the_provenance(digits_teacher: Path, tmp_path: Path) -> None:
    onnx = tmp_path / "t.onnx"
    assert invoke_cli("export", digits_teacher, "-f", "onnx", "-o", onnx, "-q").exit_code == 0
    from_onnx = invoke_cli("eval", onnx, "--provenance", "--json")
    assert from_onnx.exit_code == 0, from_onnx.stderr
    from_pth = invoke_cli("eval", digits_teacher, "--provenance", "--json")
    assert json.loads(from_onnx.stdout)["provenance"] == json.loads(from_pth.stdout)["provenance"]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01\x12")
    refused = invoke_cli("eval", junk, "--provenance")
    assert refused.exit_code == 2
