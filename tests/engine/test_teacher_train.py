"""`mlkd teacher train` end to end on tiny models: files, loading, resume, seeds, DDP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch

from mlkd_cli.data.loaders import TransformedSubset
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.transforms import ImageConfig, build_eval_transform
from mlkd_cli.engine import checkpointing, loop

pytestmark = pytest.mark.slow

FAST = ("--model", "test_resnet", "--batch-size", "32", "--img-size", "16", "--quiet")


def train(run_cli, out: Path, *extra: str, name: str = "t") -> dict:
    result = run_cli(
        "teacher",
        "train",
        "--dataset",
        "digits",
        *FAST,
        "--name",
        name,
        "--output-dir",
        out,
        "--json",
        *extra,
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_writes_loadable_self_describing_files(run_cli, tmp_path: Path) -> None:
    summary = train(run_cli, tmp_path, "--epochs", "2")
    for key in ("best", "last", "history_json", "history_csv"):
        assert Path(summary["files"][key]).is_file()
    checkpoint = torch.load(tmp_path / "t.pth", weights_only=True)
    assert checkpoint["arch"] == "test_resnet"
    assert checkpoint["num_classes"] == 10 and checkpoint["dataset"] == "digits"
    assert checkpoint["class_names"] == [str(d) for d in range(10)]
    assert checkpoint["img_size"] == 16 and checkpoint["mean"] == [0.5, 0.5, 0.5]
    assert checkpoint["epoch"] == summary["best_epoch"]
    assert checkpoint["metrics"]["val_top1"] == pytest.approx(summary["best_val_top1"])
    # Plain timm, no mlkd: the checkpoint loads and its weights are the saved ones.
    model = timm.create_model(
        "test_resnet", checkpoint_path=str(tmp_path / "t.pth"), num_classes=10
    )
    assert torch.equal(model.fc.weight, checkpoint["state_dict"]["fc.weight"])
    history = json.loads((tmp_path / "t_history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == [1, 2]
    with (tmp_path / "t_history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and float(rows[1]["val_top1"]) == pytest.approx(
        history["epochs"][1]["val_top1"]
    )


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_same_seed_same_result_and_resume_matches_uninterrupted(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(run_cli, tmp_path / "a", "--epochs", "3", "--seed", "5")
    train(run_cli, tmp_path / "b", "--epochs", "3", "--seed", "5")
    # A 3-epoch run interrupted during its third epoch, then resumed to the end; its state is
    # written after every epoch here (engine/test_checkpointing.py: every few seconds by default).
    monkeypatch.setattr(checkpointing, "STATE_EVERY_S", 0.0)
    real_epoch, calls = loop.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    stopped = run_cli(
        "teacher",
        "train",
        "--dataset",
        "digits",
        *FAST,
        "--name",
        "t",
        "--output-dir",
        tmp_path / "c",
        "--epochs",
        "3",
        "--seed",
        "5",
    )
    assert stopped.exit_code == 130
    assert "--resume" in stopped.stderr
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    assert torch.load(tmp_path / "c" / "t_last.pth", weights_only=True)["epoch"] == 2
    resumed = train(run_cli, tmp_path / "c", "--epochs", "3", "--seed", "5", "--resume")
    other_seed = train(run_cli, tmp_path / "d", "--epochs", "1", "--seed", "6")
    a, b, c = (_final_weights(tmp_path / x / "t_last.pth") for x in "abc")
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a[key], c[key]), key
    assert resumed["last"]["epoch"] == 3
    d = _final_weights(tmp_path / "d" / "t_last.pth")
    assert not torch.equal(a["fc.weight"], d["fc.weight"])
    assert other_seed["epochs"] == 1


def _independent_val_count(checkpoint: Path) -> tuple[int, float, int]:
    """Top-1 hits and summed NLL of a saved model over the whole validation split, one process."""
    state = torch.load(checkpoint, weights_only=True)
    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(state["model"])
    model.eval()
    splits = load_splits("digits", Path("data"))
    image_config = ImageConfig(img_size=16, crop_pct=1.0)
    val = TransformedSubset(splits.val, splits.val_indices, build_eval_transform(image_config))
    hits, nll = 0, 0.0
    with torch.no_grad():
        for index in range(len(val)):
            image, label, _ = val[index]
            logits = model(image[None])
            hits += int(logits.argmax(1).item() == label)
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor([label])).item()
    return hits, nll, len(val)


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_two_process_ddp_metrics_equal_an_independent_count(
    run_cli, tmp_path: Path, pipeline: str
) -> None:
    summary = train(
        run_cli,
        tmp_path,
        "--data-pipeline",
        pipeline,
        "--epochs",
        "2",
        "--world-size",
        "2",
        "--batch-size",
        "16",
        "--effective-batch-size",
        "64",
        "--precision",
        "fp32",  # the independent count's arithmetic
    )
    last = summary["last"]
    assert summary["world_size"] == 2 and last["effective_batch"] == 64
    hits, nll, count = _independent_val_count(tmp_path / "t_last.pth")
    assert last["val_images"] == count
    assert last["val_top1"] == pytest.approx(100.0 * hits / count, abs=1e-9)
    assert last["val_nll"] == pytest.approx(nll / count, rel=1e-4)


def test_trains_on_real_cifar_and_pet_layouts(
    run_cli, cifar10_dir: Path, oxford_dir: Path, tmp_path: Path
) -> None:
    for dataset, data_dir in (("cifar-10", cifar10_dir), ("oxford-iiit", oxford_dir)):
        result = run_cli(
            "teacher", "train", "--dataset", dataset, "--data-dir", data_dir, *FAST, "--epochs",
            "1", "--mixup-alpha", "0.8", "--cutmix-alpha", "1.0", "--output-dir", tmp_path,
            "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        checkpoint = torch.load(summary["files"]["best"], weights_only=True)
        assert checkpoint["dataset"] == dataset
        assert summary["last"]["val_images"] == {"cifar-10": 10, "oxford-iiit": 11}[dataset]


def test_init_checkpoint_replaces_the_classifier(run_cli, tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", num_classes=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "init.pth")
    train(
        run_cli,
        tmp_path,
        "--epochs",
        "1",
        "--init-checkpoint",
        str(tmp_path / "init.pth"),
        "--lr",
        "1e-9",
        "--warmup-epochs",
        "0",
    )
    trained = torch.load(tmp_path / "t_last.pth", weights_only=True)["model"]
    assert trained["fc.weight"].shape == (10, source.fc.weight.shape[1])
    # With a negligible learning rate the backbone is still the checkpoint's.
    first_conv = next(k for k in trained if k.endswith("conv.weight") or k.endswith("conv1.weight"))
    assert torch.allclose(trained[first_conv], source.state_dict()[first_conv], atol=1e-5)


def test_resnet10t_learns_digits_to_90_percent(run_cli, tmp_path: Path) -> None:
    """The foundation's promise, as a user types it: 10 epochs of resnet10t on CPU."""
    result = run_cli(
        "teacher", "train", "--dataset", "digits", "--model", "resnet10t", "--name", "t",
        "--epochs", "10", "--output-dir", tmp_path, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["best_val_top1"] >= 90.0
    model = timm.create_model("resnet10t", checkpoint_path=str(tmp_path / "t.pth"), num_classes=10)
    assert model.fc.out_features == 10


def test_optimizer_and_schedule_are_chosen_by_name(run_cli, tmp_path: Path) -> None:
    result = run_cli(
        "teacher", "train", "-d", "digits", "-m", "test_resnet", "--img-size", "16", "-e", "2",
        "--optimizer", "sgd", "--schedule", "constant", "--lr", "0.05", "--output-dir", tmp_path,
        "--name", "t", "--json", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    state = torch.load(tmp_path / "t_last.pth", weights_only=True)
    assert "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))  # SGD's state
    rows = json.loads((tmp_path / "t_history.json").read_text())["epochs"]
    assert [row["lr"] for row in rows] == [0.05, 0.05]  # constant: no warmup, no decay
    refused = run_cli(
        "teacher", "train", "-d", "digits", "-m", "test_resnet", "--optimizer", "lamb"
    )
    assert (
        refused.exit_code == 2
        and "--optimizer 'lamb' is not one of adamw, adamw_all, sgd" in refused.stderr
    )
