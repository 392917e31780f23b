"""Every bad input in the table of docs/bad-inputs.md: one line on stderr, exit code 2, no change.

Each case runs `mlkd` in a scratch folder that its `setup` fills; afterwards every file there
must hold exactly what it held before. That table and `CASES` name the same rows.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli, write_cifar, write_image_folder
from PIL import Image

from mlkd_cli.core.checkpoint import ModelCard, save_exits_model, save_model
from mlkd_cli.models.exits import exits_record
from mlkd_cli.models.student import MultiExitStudent

BAD_INPUTS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
TRAIN = ("teacher", "train", "-d", "digits", "-m", "test_resnet", "-e", "1", "-q")
DISTILL = ("distill", "-d", "digits", "--student", "test_resnet", "-e", "1", "-q")
FOLDER = ("teacher", "train", "-d", "imagefolder", "-m", "test_resnet", "--data-dir", "pets")
CSV = ("teacher", "train", "-d", "csv", "-m", "test_resnet", "--data-dir", "data")


class _RunsCode:
    """Unpickling this creates a file: proof that code from a file ran."""

    def __reduce__(self):
        return (os.system, ("touch code-ran",))


def _card(num_classes: int) -> ModelCard:
    return ModelCard(
        arch="test_resnet",
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        dataset="digits",
        img_size=16,
        crop_pct=1.0,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        interpolation="bicubic",
    )


def _checkpoint(path: str, num_classes: int) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        model = timm.create_model("test_resnet", num_classes=num_classes)
        save_model(root / path, model, _card(num_classes), 1, {})

    return setup


def _exits_checkpoint(root: Path) -> None:
    """s_exits.pth: an untrained test_convnext student with exits, as mlkd distill writes it."""
    student = MultiExitStudent(
        timm.create_model("test_convnext", num_classes=10), "test_convnext", [0, 1, 2], 10, 32
    )
    card = ModelCard(**{**_card(10).__dict__, "arch": "test_convnext", "img_size": 32})
    save_exits_model(
        root / "s_exits.pth", student, card, exits_record(student, [0, 1, 2], 32), 1, {}
    )


def _write(path: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)

    return setup


def _truncated_checkpoint(root: Path) -> None:
    _checkpoint("t.pth", 10)(root)
    data = (root / "t.pth").read_bytes()
    (root / "t.pth").write_bytes(data[: len(data) // 2])


def _evil_checkpoint(root: Path) -> None:
    torch.save({"state_dict": {}, "payload": _RunsCode()}, root / "evil.pth")


def _evil_cifar(root: Path) -> None:
    write_cifar(root / "data", classes=10, per_file=10, fine=False)
    batch = root / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _RunsCode()}, protocol=2))


def _empty_class(root: Path) -> None:
    write_image_folder(root / "pets", {"train": 3})
    (root / "pets" / "train" / "bird").mkdir()


def _corrupt_image(root: Path) -> None:
    write_image_folder(root / "pets", {"train": 4, "val": 2})
    image = root / "pets" / "train" / "cat" / "2.png"
    image.write_bytes(image.read_bytes()[:50])


def _mixed_sizes(root: Path) -> None:
    write_image_folder(root / "pets", {"train": 4, "val": 2})
    Image.new("RGB", (30, 24)).save(root / "pets" / "train" / "cat" / "2.png")


def _csv(table: str, classes: str | None = None) -> Callable[[Path], None]:
    """data/train.csv holding `table`, beside one real image data/img/a.png."""

    def setup(root: Path) -> None:
        (root / "data" / "img").mkdir(parents=True)
        Image.new("L", (8, 8), 128).save(root / "data" / "img" / "a.png")
        (root / "data" / "train.csv").write_text(table)
        if classes is not None:
            (root / "data" / "classes.txt").write_text(classes)

    return setup


def _resumable_run(root: Path) -> None:
    result = invoke_cli(*TRAIN, "--img-size", "16", "--output-dir", root / "models")
    assert result.exit_code == 0, result.stderr


@dataclass(frozen=True)
class Case:
    """One row of the table in docs/bad-inputs.md."""

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    setup: Callable[[Path], None] | None = None


CASES = [
    Case("unknown option", ("teacher", "train", "--batchsize", "8"), ("--batchsize",)),
    Case(
        "option value of the wrong type",
        ("teacher", "train", "--batch-size", "many"),
        ("--batch-size", "valid integer"),
    ),
    Case("required option missing", ("teacher", "train", "-d", "digits"), ("--model is required",)),
    Case("zero or negative count", (*TRAIN, "--epochs", "0"), ("--epochs", "at least 1")),
    Case(
        "unknown dataset",
        ("teacher", "train", "-d", "mnist", "-m", "test_resnet"),
        ("'mnist'", "cifar-10"),
    ),
    Case(
        "unknown model (typo)",
        ("teacher", "train", "-d", "digits", "-m", "resnet5O"),
        ("unknown model 'resnet5O'", "did you mean"),
    ),
    Case(
        "dataset files missing",
        ("teacher", "train", "-d", "oxford-iiit", "-m", "test_resnet", "--data-dir", "nowhere"),
        ("nowhere", "--download"),
    ),
    Case(
        "CIFAR batch whose pickle would run code",
        ("teacher", "train", "-d", "cifar-10", "-m", "test_resnet", "--data-dir", "data"),
        ("data_batch_1", "not a readable CIFAR batch", "posix.system"),
        _evil_cifar,
    ),
    Case(
        "image folder with an empty class folder",
        FOLDER,
        ("bird", "holds no images"),
        _empty_class,
    ),
    Case(
        "corrupt image under --strict-data",
        (*FOLDER, "--img-size", "16", "-b", "4", "--strict-data", "-q"),
        ("2.png", "not a readable image", "--strict-data"),
        _corrupt_image,
    ),  # fmt: skip
    Case(
        "CSV row whose image is missing",
        CSV,
        ("data/train.csv row 3", "img/b.png does not exist"),
        _csv("path,label\nimg/a.png,cat\nimg/b.png,dog\n"),
    ),
    Case(
        "CSV label that is not a listed class",
        CSV,
        ("data/train.csv row 2", "'bird'", "classes.txt"),
        _csv("path,label\nimg/a.png,bird\n", "cat\ndog\n"),
    ),
    Case("empty CSV", CSV, ("data/train.csv has no rows",), _csv("path,label\n")),
    Case(
        "CSV without a path,label header",
        CSV,
        ("data/train.csv row 1", "path,label"),
        _csv("file,class\nimg/a.png,cat\n"),
    ),
    Case(
        "truncated checkpoint",
        ("eval", "t.pth"),
        ("t.pth", "not a readable checkpoint", "truncated"),
        _truncated_checkpoint,
    ),
    Case(
        "checkpoint that needs code to unpickle",
        ("eval", "evil.pth"),
        ("evil.pth", "arbitrary code", "safetensors"),
        _evil_checkpoint,
    ),
    Case(
        "checkpoint of another architecture",
        ("teacher", "train", "-d", "digits", "-m", "resnet10t", "--init-checkpoint", "t.pth"),
        ("does not fit", "same --model"),
        _checkpoint("t.pth", 10),
    ),
    Case(
        "teacher of another class count",
        (*DISTILL, "--model", "test_resnet", "--checkpoint", "five.pth"),
        ("five.pth predicts 5 classes", "dataset has 10"),
        _checkpoint("five.pth", 5),
    ),
    Case(
        "ensemble member missing",
        (*DISTILL, "--ensemble", "e.json"),
        ("models/missing.pth does not exist",),
        _write("e.json", '{"models": ["test_resnet"], "names": ["missing"], "weights": [1]}'),
    ),
    Case(
        "ensemble file that is not JSON",
        (*DISTILL, "--ensemble", "e.json"),
        ("e.json is not valid JSON",),
        _write("e.json", "models: [test_resnet"),
    ),
    Case(
        "image too small for the model",
        ("teacher", "train", "-d", "digits", "-m", "test_convnext", "--img-size", "16"),
        ("test_convnext cannot run on 16x16", "--img-size"),
    ),
    Case(
        "negative restart count",
        (*TRAIN, "--max-restarts", "-1"),
        ("--max-restarts", "must not be negative"),
    ),
    Case(
        "batch smaller than the world size",
        (*TRAIN, "--effective-batch-size", "1", "--world-size", "2"),
        ("--effective-batch-size 1", "2 processes", "--world-size"),
    ),
    Case(
        "unknown data pipeline",
        (*TRAIN, "--data-pipeline", "gpu"),
        ("--data-pipeline", "'gpu' is not one of 'auto', 'device', 'cpu'"),
    ),
    Case(
        "device pipeline for image files that cannot all be held in memory",
        (*FOLDER, "--data-pipeline", "device"),
        (
            "--data-pipeline device needs the training images in memory",
            "differ in size (24x24, 30x24)",
            "--data-pipeline cpu",
        ),
        _mixed_sizes,
    ),  # fmt: skip
    Case(
        "teacher cache with random augmentation",
        (*DISTILL, "--model", "test_resnet", "--checkpoint", "t.pth", "--teacher-cache"),
        ("--teacher-cache", "--no-augment --mixup-alpha 0 --cutmix-alpha 0"),
        _checkpoint("t.pth", 10),
    ),
    pytest.param(
        Case("CUDA asked for, none present", (*TRAIN, "--device", "cuda"), ("--device cpu",)),
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without GPU"),
    ),
    Case(
        "--resume with nothing to resume",
        (*TRAIN, "--name", "x", "--resume"),
        ("nothing to resume", "x_last.pth"),
    ),
    Case(
        "a run of that name exists",
        (*TRAIN, "--name", "x"),
        ("already exists", "--resume", "--overwrite"),
        _write("models/x.pth", b"precious"),
    ),
    Case(
        "--resume with another model",
        (
            "teacher",
            "train",
            "-d",
            "digits",
            "-m",
            "resnet10t",
            "--name",
            "digits_test_resnet",
            "--resume",
            "-q",
        ),
        ("trained with --model test_resnet", "another --name"),
        _resumable_run,
    ),  # fmt: skip
    Case(
        "output folder is a file",
        (*TRAIN, "--output-dir", "afile"),
        ("afile is a file, not a folder",),
        _write("afile", "x"),
    ),
    Case(
        "preset with an unknown key",
        ("teacher", "train", "--preset", "p.yaml"),
        ("'epochz'", "p.yaml"),
        _write("p.yaml", "dataset: digits\nteacher:\n  model: test_resnet\n  epochz: 3\n"),
    ),
    Case(
        "preset with a wrong type",
        ("teacher", "train", "--preset", "p.yaml"),
        ("epochs must be int", "'three'"),
        _write("p.yaml", "dataset: digits\nteacher:\n  model: test_resnet\n  epochs: three\n"),
    ),
    Case(
        "preset that is not YAML",
        ("teacher", "train", "--preset", "p.yaml"),
        ("p.yaml is not valid YAML",),
        _write("p.yaml", "teacher: [1, 2\n"),
    ),
    Case(
        "preset with an unknown section",
        ("teacher", "train", "--preset", "p.yaml"),
        ("unknown section 'teachr'", "p.yaml"),
        _write("p.yaml", "dataset: digits\nteachr:\n  epochs: 1\n"),
    ),
    Case(
        "preset YAML whose aliases explode",
        ("teacher", "train", "--preset", "p.yaml"),
        ("p.yaml expands (through its aliases) past the size limit",),
        _write(
            "p.yaml",
            "a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n"
                for i in range(8)
            ),
        ),
    ),
    Case(
        "dataset name with a typo",
        ("teacher", "train", "-d", "imagefoldr", "-m", "test_resnet"),
        ("unknown dataset 'imagefoldr'", "did you mean imagefolder?"),
    ),
    Case("learning rate that is not a number", (*TRAIN, "--lr", "nan"), ("--lr", "finite")),
    Case(
        "run name with a path in it",
        (*TRAIN, "--name", "../../escaped"),
        ("--name '../../escaped' is not a plain file name",),
    ),
    Case(
        "export onto its own checkpoint",
        ("export", "t.pth", "-f", "torchscript", "-o", "t.pth", "--overwrite"),
        ("t.pth is the input t.pth itself", "--overwrite never replaces an input"),
        _checkpoint("t.pth", 10),
    ),
    Case(
        "--early-exit on a plain checkpoint",
        ("eval", "s.pth", "--split", "val", "--early-exit"),
        ("--early-exit needs a student with exits", "_exits.pth"),
        _checkpoint("s.pth", 10),
    ),
    Case(
        "threshold outside (0, 1]",
        ("eval", "s_exits.pth", "--thresholds", "0.9,1.5,0.9"),
        ("--thresholds must lie in (0, 1]", "1.5"),
        _exits_checkpoint,
    ),
    Case(
        "--max-drop below 0",
        ("eval", "s_exits.pth", "--split", "val", "--early-exit", "--max-drop", "-1"),
        ("--max-drop must be 0 or more",),
        _exits_checkpoint,
    ),
    Case(
        "--risk outside (0, 1)",
        ("eval", "s_exits.pth", "--split", "val", "--early-exit", "--risk", "1.5"),
        ("--risk is the chance the guarantee fails", "strictly between 0 and 1"),
        _exits_checkpoint,
    ),
    Case(
        "thresholds chosen on the test split",
        ("eval", "s_exits.pth", "--early-exit"),
        ("never on the test split", "--split val"),
        _exits_checkpoint,
    ),
]


def _case_id(case: object) -> str:
    return case.id if isinstance(case, Case) else "?"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    before = _files(tmp_path)
    result = invoke_cli(*case.args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert_error_line(result.stderr, *case.expect)
    assert _files(tmp_path) == before
    assert not (tmp_path / "code-ran").exists()


def _table_rows() -> list[str]:
    text = BAD_INPUTS_PAGE.read_text()
    section = text.split("## Bad input, and what you see", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| ([^|]+?) \|", section, flags=re.MULTILINE)[1:]  # after the header


def test_the_bad_inputs_table_lists_exactly_these_cases() -> None:
    ids = [(c.values[0] if not isinstance(c, Case) else c).id for c in CASES]
    assert _table_rows() == ids
