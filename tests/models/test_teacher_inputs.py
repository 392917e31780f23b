"""The input each teacher runs at: recorded, given, or the student's — never a guessed 224."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli.models.ensemble_config import EnsembleConfig, MemberSpec, read_ensemble_config
from mlkd_cli.models.teacher import InputSpec, build_teacher, input_lines


@pytest.fixture(scope="module")
def plain_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare test_resnet state dict (10 classes): no card, no input size recorded."""
    path = tmp_path_factory.mktemp("plain") / "plain.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), path)
    return path


def _one(path: Path, model: str | None = "test_resnet") -> EnsembleConfig:
    return EnsembleConfig(path=path, members=(MemberSpec(path, model),))


def test_a_teacher_that_records_no_input_runs_at_the_students_size(plain_teacher: Path) -> None:
    teacher, loaded = build_teacher(_one(plain_teacher), 10, InputSpec(32))
    lines = input_lines(loaded, InputSpec(32))
    assert teacher.adapters[0].size is None  # no resize: 32 px in, 32 px to the teacher
    assert "32 px input" in lines[0] and "records no input size" in lines[0]
    assert "resized" not in lines[0]
    images = torch.randn(2, 3, 32, 32)
    direct = teacher.members[0](images)
    assert torch.allclose(teacher(images), direct, atol=1e-6)


def test_teacher_img_size_resizes_and_says_so(plain_teacher: Path) -> None:
    teacher, loaded = build_teacher(_one(plain_teacher), 10, InputSpec(32), img_size=48)
    lines = input_lines(loaded, InputSpec(32), img_size=48)
    assert teacher.adapters[0].size == 48
    assert "48 px input (--teacher-img-size), resized from 32 px" in lines[0]


def test_the_ensemble_files_img_size_is_the_members_input(
    plain_teacher: Path, tmp_path: Path
) -> None:
    member = {"checkpoint": str(plain_teacher), "model": "test_resnet", "img_size": 24}
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"members": [member]}))
    teacher, loaded = build_teacher(read_ensemble_config(path), 10, InputSpec(32))
    lines = input_lines(loaded, InputSpec(32))
    assert teacher.adapters[0].size == 24 and "the ensemble file's img_size" in lines[0]
    original = {"models": ["test_resnet"], "names": ["plain"], "img_size": 40}
    (tmp_path / "o.json").write_text(json.dumps(original))
    config = read_ensemble_config(tmp_path / "o.json", plain_teacher.parent)
    assert config.members[0].img_size == 40
    (tmp_path / "bad.json").write_text(json.dumps({**original, "img_size": "big"}))
    with pytest.raises(Exception, match="whole number of pixels"):
        read_ensemble_config(tmp_path / "bad.json", plain_teacher.parent)


def test_a_recorded_input_is_kept_and_the_resize_named(digits_teacher: Path) -> None:
    teacher, loaded = build_teacher(_one(digits_teacher, None), 10, InputSpec(32))
    lines = input_lines(loaded, InputSpec(32))
    assert teacher.adapters[0].size == 16  # trained at 16 px: the student's 32 px scaled down
    assert "16 px input (recorded in its checkpoint), resized from 32 px" in lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--teacher-img-size", "5"), ("--teacher-img-size", "between 8 and 4096")),
        (("--model", "test_resnet"), ("--model", "add --checkpoint")),
        (("--checkpoint", "missing.pth"), ("teacher checkpoint missing.pth does not exist",)),
    ],
)
def test_teacher_naming_mistakes_are_one_line(
    args: tuple[str, ...], fragments: tuple[str, ...], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke_cli("distill", "--dataset", "digits", "--student", "test_resnet", *args)
    assert result.exit_code == 2
    line = assert_error_line(result.stderr, *fragments)
    assert "ensemble member" not in line


@pytest.mark.slow
def test_distill_from_a_checkpoint_alone_names_the_teachers_input(
    digits_teacher: Path, tmp_path: Path
) -> None:
    # --checkpoint without --model: the checkpoint records test_resnet and its 16 px input.
    result = invoke_cli(
        "distill", "--dataset", "digits", "--checkpoint", digits_teacher, "--student",
        "test_resnet", "--img-size", "24", "-e", "1", "--exits", "1", "--mixup-alpha", "0",
        "--cutmix-alpha", "0", "-n", "s", "--output-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    shown = result.stdout + result.stderr
    assert (
        "teacher t (test_resnet): 16 px input (recorded in its checkpoint), resized from 24 px"
        in (" ".join(shown.split()))
    )
    # The student records what taught it, and the history says the same.
    card = torch.load(tmp_path / "s.pth", weights_only=True)
    teacher = card["extra"]["provenance"]["teacher"]
    assert teacher["sha256"] == [hashlib.sha256(digits_teacher.read_bytes()).hexdigest()]
    assert teacher["models"] == [None] and teacher["img_size"] == [16]
    assert teacher["checkpoints"] == [str(digits_teacher)] and teacher["loss"] == "kd"
    history = json.loads((tmp_path / "s_history.json").read_text())
    assert history["provenance"] == card["extra"]["provenance"]
    assert history["provenance"]["command"].startswith("mlkd distill --dataset digits")
    shown = invoke_cli("eval", tmp_path / "s.pth", "--provenance")
    assert shown.exit_code == 0, shown.stderr
    assert "teacher.sha256" in shown.stdout and teacher["sha256"][0][:16] in shown.stdout


def test_eval_at_another_size_than_trained_says_so(digits_teacher: Path) -> None:
    other = invoke_cli("eval", digits_teacher, "--img-size", "24", "--split", "val", "--json")
    assert other.exit_code == 0, other.stderr
    warning = [line for line in other.stderr.splitlines() if "trained at 16 px" in line]
    assert len(warning) == 1 and "evaluated at 24 px" in warning[0]
    assert json.loads(other.stdout)["img_size"] == 24
    same = invoke_cli("eval", digits_teacher, "--split", "val", "--json")
    assert same.exit_code == 0 and "trained at" not in same.stderr
    assert json.loads(same.stdout)["img_size"] == 16


def test_a_teacher_with_a_nan_weight_is_refused_before_distilling(tmp_path: Path) -> None:
    model = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    torch.save(model.state_dict(), tmp_path / "nan.pth")
    result = invoke_cli(
        "distill", "--dataset", "digits", "--checkpoint", tmp_path / "nan.pth", "--model",
        "test_resnet", "--student", "test_resnet", "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 2
    assert_error_line(result.stderr, "teacher member nan (", "non-finite values in")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
