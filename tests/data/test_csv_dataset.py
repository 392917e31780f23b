"""`--dataset csv`: images listed in train.csv / test.csv, trained on, evaluated and distilled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke_cli
from PIL import Image

from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.sources import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digits_csv(root: Path, labels: str = "names", per_class: int = 12) -> Path:
    """Real digits as 28 px grayscale PNGs under root/lists/images, listed in root/lists/*.csv
    (paths relative to the CSV: images/...; mlkd refuses paths outside the CSV's folder)."""
    raw = load_digits()
    lists = root / "lists"
    lists.mkdir(parents=True)
    for split, source in (("train", raw.train), ("test", raw.test)):
        rows, seen = ["path,label"], dict.fromkeys(range(10), 0)
        for index in range(len(source)):
            image, label = source[index]
            if seen[label] >= per_class:
                continue
            seen[label] += 1
            path = lists / "images" / split / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.convert("L").resize((28, 28), Image.BICUBIC).save(path)
            name = NAMES[label] if labels == "names" else str(label)
            rows.append(f"images/{split}/{index}.png,{name}")
        (lists / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return lists


def test_labels_as_names_are_sorted_and_integers_follow_classes_txt(tmp_path: Path) -> None:
    named = load_splits("csv", write_digits_csv(tmp_path / "a"))
    assert named.class_names == sorted(NAMES)
    image, label = named.train[0]
    assert image.size == (28, 28) and named.class_names[label] in NAMES
    numbered = write_digits_csv(tmp_path / "b", labels="integers")
    (numbered / "classes.txt").write_text("\n".join(NAMES) + "\n")
    splits = load_splits("csv", numbered)
    assert splits.class_names == NAMES  # classes.txt's order; label 3 is "three"
    first = (numbered / "train.csv").read_text().splitlines()[1]
    _, label = splits.train[0]
    assert splits.class_names[label] == NAMES[int(first.rsplit(",", 1)[1])]
    assert splits.test is not None and len(splits.test) == 120
    no_list = write_digits_csv(tmp_path / "c", labels="integers")
    assert load_splits("csv", no_list).class_names == [str(i) for i in range(10)]


@pytest.mark.slow
def test_csv_trains_evaluates_and_distils(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_digits_csv(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    common = ("-d", "csv", "--data-dir", data, "--img-size", "16", "-q")
    trained = invoke_cli("teacher", "train", *common, "-m", "test_resnet", "-e", "2", "-n", "t")
    assert trained.exit_code == 0, trained.stderr
    evaluated = invoke_cli("eval", "models/t.pth", "--data-dir", data, "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["dataset"] == "csv" and report["images"] == 120
    assert {c["class"] for c in report["worst_classes"]} <= set(NAMES)
    distilled = invoke_cli(
        "distill", *common, "-m", "test_resnet", "-c", "models/t.pth", "--student",
        "test_resnet", "-e", "1", "-n", "s", "--json",
    )  # fmt: skip
    assert distilled.exit_code == 0, distilled.stderr
    assert np.isfinite(json.loads(distilled.stdout)["best_val_top1"])
