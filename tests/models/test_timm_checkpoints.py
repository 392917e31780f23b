"""Checkpoints written by timm's own train.py: loaded safely, EMA weights preferred, as a teacher,
an ensemble member and an initial checkpoint; any other pickled object still refused."""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli
from timm.utils import CheckpointSaver, ModelEmaV3

from mlkd_cli.core.checkpoint import read_weights
from mlkd_cli.models.ensemble_config import MemberSpec
from mlkd_cli.models.factory import build_model
from mlkd_cli.models.teacher import load_member

ARCH = "test_resnet"


def write_timm_checkpoint(folder: Path) -> tuple[Path, dict, dict]:
    """Save as timm's train.py does (its CheckpointSaver, `args` a Namespace, an EMA model).

    Returns the file and the raw and EMA state dicts, made to differ."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()  # optimizer state in the file, as a real run has
    ema = ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the raw weights move on; the EMA copy stays behind
    args = argparse.Namespace(model=ARCH, lr=0.1, epochs=1, model_ema=True, data_dir="x")
    folder.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(
        model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder), recovery_dir=""
    )
    saver.save_checkpoint(epoch=0, metric=50.0)
    path = folder / "last.pth.tar"
    assert path.is_file()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema_state = {k: v.clone() for k, v in ema.module.state_dict().items()}
    return path, raw, ema_state


def _equal(model: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture
def timm_checkpoint(tmp_path: Path) -> tuple[Path, dict, dict]:
    return write_timm_checkpoint(tmp_path / "timm-run")


def test_a_timm_checkpoint_is_read_with_its_ema_weights_by_default(timm_checkpoint) -> None:
    path, raw, ema = timm_checkpoint
    content = torch.load(path, weights_only=False)  # what the test wrote: timm's layout
    assert isinstance(content["args"], argparse.Namespace) and "state_dict_ema" in content
    weights, meta = read_weights(path)
    assert meta["weights_key"] == "state_dict_ema" and meta["arch"] == ARCH
    assert isinstance(meta["args"], argparse.Namespace) and meta["args"].lr == 0.1
    assert all(torch.equal(weights[k], ema[k]) for k in ema)
    weights, meta = read_weights(path, ema=False)
    assert meta["weights_key"] == "state_dict"
    assert all(torch.equal(weights[k], raw[k]) for k in raw)


def test_as_a_teacher_member_the_arch_comes_from_the_file(timm_checkpoint) -> None:
    path, raw, ema = timm_checkpoint
    member = load_member(MemberSpec(path), num_classes=10)
    assert member.arch == ARCH and _equal(member.model, ema)
    assert "EMA weights" in member.note and "--no-teacher-ema" in member.note
    plain = load_member(MemberSpec(path, ema=False), num_classes=10)
    assert _equal(plain.model, raw) and "raw weights" in plain.note


def test_as_an_init_checkpoint(timm_checkpoint) -> None:
    path, raw, ema = timm_checkpoint
    assert _equal(build_model(ARCH, 10, init_checkpoint=path), ema)
    assert _equal(build_model(ARCH, 10, init_checkpoint=path, init_ema=False), raw)


@pytest.mark.slow
def test_distill_ensemble_and_teacher_train_take_it(
    timm_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = timm_checkpoint
    monkeypatch.chdir(tmp_path)
    common = ("-d", "digits", "--img-size", "16", "-e", "1", "-q")
    distilled = invoke_cli(
        "distill", *common, "-m", ARCH, "-c", path, "--student", "test_resnet", "--json"
    )
    assert distilled.exit_code == 0, distilled.stderr
    assert json.loads(distilled.stdout)["teacher"] == [str(path)]
    (tmp_path / "ens.yaml").write_text(f"members:\n  - checkpoint: {path}\n")
    rows = {}
    for flag in ("--teacher-ema", "--no-teacher-ema"):
        fitted = invoke_cli("ensemble", "eval", "ens.yaml", "-d", "digits", "--json", flag)
        assert fitted.exit_code == 0, fitted.stderr
        rows[flag] = json.loads(fitted.stdout)
    default = invoke_cli("ensemble", "eval", "ens.yaml", "-d", "digits", "--json")
    assert json.loads(default.stdout) == rows["--teacher-ema"]  # the EMA weights by default
    ema_rows, raw_rows = rows["--teacher-ema"], rows["--no-teacher-ema"]
    assert ema_rows != raw_rows  # the two weight sets give different figures
    trained = invoke_cli(
        "teacher", "train", *common, "-m", ARCH, "--init-checkpoint", path, "--name", "init"
    )
    assert trained.exit_code == 0, trained.stderr


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch code-ran",))


@pytest.mark.parametrize(
    "extra",
    [types.SimpleNamespace(model=ARCH), _RunsCode()],
    ids=["another namespace class", "code on load"],
)
def test_any_other_pickled_object_is_still_refused(
    extra: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = timm.create_model(ARCH, num_classes=10)
    path = tmp_path / "bad.pth.tar"
    args = argparse.Namespace(model=ARCH, extra=extra)
    torch.save({"arch": ARCH, "state_dict": model.state_dict(), "args": args}, path)
    result = invoke_cli("eval", path, "--dataset", "digits", "--split", "val")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "need arbitrary code to unpickle")
    assert not (tmp_path / "code-ran").exists()
