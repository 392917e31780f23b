"""Shared fixtures: tiny datasets in the real on-disk formats, and a CLI runner."""

from __future__ import annotations

import os
import pickle
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mlkd_cli.cli import app

RNG_SEED = 1234
# Separate runs that a test compares must compute identically; the memory format mlkd would
# otherwise measure (and could choose differently run to run) is pinned for the whole suite,
# subprocesses included. tests/engine/test_precision.py tests the measurement itself.
os.environ["MLKD_MEMORY_FORMAT"] = "contiguous"
# Under pytest-xdist (`make test`: one worker a core) every worker, and every process it starts,
# computes on one thread: two workers' OpenMP teams on the same cores wait for each other at
# every barrier (a 25 s training test took 256 s with two threads a worker on 2 cores).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def short_timing_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Throughput rounds of a whole pass or two, not 0.3 s each: a tiny model's timing then costs
    well under a second instead of ~10 s a command. No test asserts a throughput figure; the
    rounds, budgets and medians themselves are tested in tests/anytime/test_anytime.py."""
    from mlkd_cli.anytime import timing

    monkeypatch.setattr(timing, "MIN_ROUND_SECONDS", 0.01)


@dataclass
class CliResult:
    """What a user sees from one command."""

    exit_code: int
    stdout: str
    stderr: str


def assert_error_line(stderr: str, *fragments: str) -> str:
    """Stderr is one `mlkd: error:` line holding every fragment, with no traceback; returns it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mlkd: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    return lines[0]


def invoke_cli(*args: object) -> CliResult:
    """Run `mlkd ARGS...` in-process through the real root group (its error handling included)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def run_cli():
    """The `invoke_cli` function, as a fixture."""
    return invoke_cli


def _pickle(path: Path, content: dict) -> None:
    # Protocol 2 with plain str keys: what torchvision's reader (latin1) also accepts.
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar(root: Path, classes: int, per_file: int, fine: bool) -> dict:
    """Write a tiny CIFAR-10 (or -100 with `fine`) in the official python-pickle layout."""
    rng = np.random.default_rng(RNG_SEED)
    label_key = "fine_labels" if fine else "labels"
    folder = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ["train", "test"] if fine else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    written = {}
    for name in files:
        labels = [i % classes for i in range(per_file)]
        data = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)
        content = {
            "batch_label": name,
            label_key: labels,
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(per_file)],
        }
        if fine:
            content["coarse_labels"] = [label // 5 for label in labels]
        _pickle(folder / name, content)
        written[name] = content
    names = [f"class_{i}" for i in range(classes)]
    if fine:
        _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": names[:20]})
    else:
        _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_file})
    return written


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A data dir holding a 10-class CIFAR-10 with 20 images per file (100 train, 20 test)."""
    write_cifar(tmp_path, classes=10, per_file=20, fine=False)
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    """A data dir holding a CIFAR-100 with 200 training and 200 test images."""
    write_cifar(tmp_path, classes=100, per_file=200, fine=True)
    return tmp_path


# The real list has 37 breeds; the first three keep their real names, the rest are stand-ins.
PET_BREEDS = [("Abyssinian", 1), ("american_bulldog", 2), ("great_pyrenees", 2)] + [
    (f"breed{i:02d}", 1 + i % 2) for i in range(4, 38)
]


@pytest.fixture
def oxford_dir(tmp_path: Path) -> Path:
    """A tiny Oxford-IIIT Pet: 37 breeds x 4 JPEGs in images/, trainval.txt and test.txt lists."""
    root = tmp_path / "oxford-iiit-pet"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(RNG_SEED)
    lists = {"trainval": ["#Image CLASS-ID SPECIES BREED ID"], "test": []}
    for class_id, (breed, species) in enumerate(PET_BREEDS, start=1):
        for i in range(1, 5):
            image_id = f"{breed}_{i}"
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{image_id}.jpg")
            split = "trainval" if i <= 3 else "test"
            lists[split].append(f"{image_id} {class_id} {species} {i}")
    for split, lines in lists.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def write_image_folder(root: Path, splits: dict[str, int], classes=("cat", "dog")) -> Path:
    """train/<class>/*.png (and other splits) with `splits[split]` images per class."""
    rng = np.random.default_rng(RNG_SEED)
    for split, count in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# `mlkd teacher train` of a tiny model on the embedded digits, at 16 px (add name, epochs, ...).
DIGITS_TEACHER = (
    "teacher",
    "train",
    "--dataset",
    "digits",
    "--model",
    "test_resnet",
    "--img-size",
    "16",
)


@contextmanager
def working_dir(folder: Path) -> Iterator[Path]:
    """Run the block in `folder` (relative paths in a command resolve there), then come back."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


@contextmanager
def reaped(job: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """A background job that is killed if it is still running when the block ends."""
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def process_table() -> dict[int, tuple[int, bytes]]:
    """Every live process: pid -> (parent pid, command line)."""
    table: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(stat[1]), (entry / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            continue
    return table


def ended_after(job: subprocess.Popen, seconds: float) -> tuple[str, float]:
    """Wait (at most `seconds`) for the job to end: its stderr and how long it took."""
    start = time.monotonic()
    _, stderr = job.communicate(timeout=seconds)
    return stderr if isinstance(stderr, str) else stderr.decode(), time.monotonic() - start


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<tmp>/models/t.pth: a test_resnet digits teacher, 2 epochs at 16 px (read-only: share it)."""
    folder = tmp_path_factory.mktemp("digits-teacher")
    result = invoke_cli(
        *DIGITS_TEACHER,
        "--name",
        "t",
        "--epochs",
        "2",
        "--quiet",
        "--output-dir",
        folder / "models",
    )
    assert result.exit_code == 0, result.stderr
    return folder / "models" / "t.pth"


def independent_test_top1(checkpoint: Path) -> float:
    """The digits test top-1 of a test_resnet checkpoint at 16 px, counted without mlkd's eval:
    plain timm model, plain loop over the test split, the card's eval transform."""
    import timm
    import torch

    from mlkd_cli.data.registry import load_splits
    from mlkd_cli.data.transforms import ImageConfig, build_eval_transform

    model = timm.create_model("test_resnet", checkpoint_path=str(checkpoint), num_classes=10)
    model.eval()
    transform = build_eval_transform(ImageConfig(img_size=16, crop_pct=1.0))
    test = load_splits("digits", Path("data")).test
    hits = 0
    with torch.no_grad():
        for index in range(len(test)):
            image, label = test[index]
            hits += int(model(transform(image)[None]).argmax(1).item() == label)
    return 100.0 * hits / len(test)


def assert_same_weights(a: Path, b: Path, key: str) -> None:
    """Two checkpoints hold bitwise-equal tensors under `key` ("model", "state_dict")."""
    import torch

    left = torch.load(a, weights_only=True)[key]
    right = torch.load(b, weights_only=True)[key]
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# Hugging Face and WebDataset layouts (`--dataset hfds/...`, `wds/...`): three classes of 8x8
# images, each class its own colour, so that a model can tell them apart.
HUB_CLASSES = ("ant", "bee", "cat")


def tiny_png(label: int, rng: np.random.Generator) -> bytes:
    """An 8x8 PNG whose dominant channel is its class."""
    import io

    pixels = rng.integers(0, 60, size=(8, 8, 3), dtype=np.uint8)
    pixels[..., label % 3] += 150
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_hub_split(path: Path, count: int, names=HUB_CLASSES, labels=None) -> None:
    """A parquet file as the Hub holds a split: an Image column of PNG bytes and a ClassLabel."""
    import datasets

    rng = np.random.default_rng(RNG_SEED + count)
    labels = [i % len(names) for i in range(count)] if labels is None else labels
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}
    )
    images = [{"bytes": tiny_png(label, rng), "path": None} for label in labels]
    table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    table.to_parquet(str(path))


HUB_TRAIN, HUB_TEST = 1_600, 400


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<tmp>/pets: data/train-*.parquet (1,600 images, two files) and data/test-*.parquet (400),
    in the Hub's layout (read-only: share it; pass --data-dir as the `datasets` cache)."""
    root = tmp_path_factory.mktemp("hub") / "pets"
    half = HUB_TRAIN // 2
    write_hub_split(root / "data" / "train-00000-of-00002.parquet", half)
    write_hub_split(root / "data" / "train-00001-of-00002.parquet", HUB_TRAIN - half)
    write_hub_split(root / "data" / "test-00000-of-00001.parquet", HUB_TEST)
    return root


def write_shards(folder: Path, split: str, count: int, per_shard: int, labels=None) -> None:
    """`split`-000000.tar, ...: WebDataset shards of (png, cls) samples, written by its writer."""
    import webdataset

    rng = np.random.default_rng(RNG_SEED + count)
    labels = [i % len(HUB_CLASSES) for i in range(count)] if labels is None else labels
    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / f"{split}-%06d.tar")
    with webdataset.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, label in enumerate(labels):
            sink.write({"__key__": f"{split}{i:06d}", "png": tiny_png(label, rng),
                        "cls": str(label).encode()})  # fmt: skip


SHARD_TRAIN, SHARD_VAL, SHARD_TEST = 600, 90, 120


@pytest.fixture(scope="session")
def shard_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<tmp>/shards: train-*.tar (600 samples in 3 shards), val-*.tar (90), test-*.tar (120) and
    classes.txt (read-only: share it)."""
    root = tmp_path_factory.mktemp("wds") / "shards"
    write_shards(root, "train", SHARD_TRAIN, 200)
    write_shards(root, "val", SHARD_VAL, 100)
    write_shards(root, "test", SHARD_TEST, 100)
    (root / "classes.txt").write_text("\n".join(HUB_CLASSES) + "\n")
    return root


STAGED_SPREAD = 40.0  # how much the staged export's students' classifier weights are scaled


@pytest.fixture(scope="session")
def staged_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of an untrained 32 px test_convnext digits student with exits, as mlkd distill
    writes it (thresholds not chosen yet), after `mlkd export s_exits.pth --format onnx`:
    s_exits.pth, s_exits.onnx and s_exits_staged/. Read-only: the session exports it once (five
    verified ONNX traces) for tests/export/test_staged_onnx.py and tests/anytime/test_latency.py."""
    import json

    import timm
    import torch

    from mlkd_cli.core.checkpoint import ModelCard, save_exits_model
    from mlkd_cli.models.exits import exits_record
    from mlkd_cli.models.student import MultiExitStudent

    folder = tmp_path_factory.mktemp("staged")
    torch.manual_seed(0)
    backbone = timm.create_model("test_convnext", num_classes=10)
    student = MultiExitStudent(backbone, "test_convnext", [0, 1, 2], 10, 32)
    card = ModelCard(
        "test_convnext", 10, [str(d) for d in range(10)], "digits", 32, 1.0, [0.5] * 3, [0.5] * 3
    )
    # Untrained heads are all near 1/10 sure of every image; scaled up, their confidences spread
    # over (0, 1) as a trained student's do, so thresholds can stand clear of every image.
    with torch.no_grad():
        for classifier in (*(e.fc for e in student.exits), student.backbone.get_classifier()):
            classifier.weight.mul_(STAGED_SPREAD)
    checkpoint = folder / "s_exits.pth"
    save_exits_model(checkpoint, student, card, exits_record(student, [0, 1, 2], 32), 1, {})
    result = invoke_cli("export", checkpoint, "--format", "onnx", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    staged = json.loads(result.stdout)["staged"]
    assert staged["output"] == str(folder / "s_exits_staged")
    assert staged["max_abs_diff"] <= 1e-4
    return folder


class CountedSession:
    """An onnxruntime session that counts the images (rows) it is fed, run by run."""

    def __init__(self, session: object) -> None:
        self.session, self.rows = session, []

    def run(self, names: list[str], feeds: dict) -> list:
        self.rows.extend(value.shape[0] for value in feeds.values())
        return self.session.run(names, feeds)
