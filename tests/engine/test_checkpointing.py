"""The checkpointing component: every stateful part saved under its key and restored bitwise, the
training state's keys as files on disk have them, and a refused resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_TEACHER, assert_error_line, invoke_cli
from torch import nn

from mlkd_cli.core.checkpoint import TRAINING_STATE_FORMAT, ModelCard, load_checkpoint
from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.transforms import ImageConfig
from mlkd_cli.engine import checkpointing, loop
from mlkd_cli.engine.checkpointing import Checkpointer
from mlkd_cli.engine.config import TeacherTrainConfig
from mlkd_cli.engine.history import History
from mlkd_cli.engine.planning import RunFiles, RunPlan
from mlkd_cli.engine.precision import Precision

CPU = torch.device("cpu")
# The keys of `<name>_last.pth` beside the parts' state dicts, as every saved state holds them:
# states written before the checkpointing component must still resume.
POSITION_KEYS = {"format", "epoch", "partial_epoch", "best", "history", "restarts"}
ABOUT_KEYS = {"channels_last", "bf16", "config", "card", "mlkd_version"}
BOOKKEEPING = POSITION_KEYS | ABOUT_KEYS


class PlainTask:
    """A task's two model-saving answers: the model as it is, nothing beside the best."""

    def plain_model(self, model: nn.Module) -> nn.Module:
        return model

    def save_best(self, model, files, card, epoch, metrics) -> None:
        pass


def _parts(seed: int) -> dict:
    """A model, optimiser and schedule a step into training, and a part added later (an EMA)."""
    torch.manual_seed(seed)
    model, ema = nn.Linear(4, 3), nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema}


def _checkpointer(folder: Path, parts: dict, restart: int = 0) -> Checkpointer:
    cfg = TeacherTrainConfig(dataset="digits", model="test_resnet", output_dir=folder, epochs=2)
    card = ModelCard("test_resnet", 3, ["a", "b", "c"], "digits", 16, 1.0, [0.5] * 3, [0.5] * 3)
    plan = RunPlan(cfg, card, ImageConfig(img_size=16), RunFiles(folder, "t"), "teacher")
    ctx = DistContext(0, 1, 0, CPU, restart)
    history = History(folder, "t", {})
    precision = Precision.resolve("fp32", CPU)
    return Checkpointer(plan, PlainTask(), ctx, parts, history, precision)


def _assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        if isinstance(left[key], dict):
            _assert_same_tensors(left[key], right[key])
        elif isinstance(left[key], torch.Tensor):
            assert torch.equal(left[key], right[key]), key
        else:
            assert left[key] == right[key], key


def test_every_stateful_part_is_saved_under_its_key_and_restored_bitwise(tmp_path: Path) -> None:
    saved = _parts(seed=0)
    writer = _checkpointer(tmp_path, saved)
    writer.restore(None)
    row = {"epoch": 2, "train_loss": 1.0, "val_top1": 40.0}
    writer.history.append(row)
    writer.save_epoch({"top1": 40.0, "epoch": 2, "score": 40.0}, row, improved=True)
    state = torch.load(tmp_path / "t_last.pth", weights_only=True)
    # The part added to the mapping is saved with no other edit, beside the same keys as ever.
    assert set(state) == BOOKKEEPING | {"model", "optimizer", "scheduler", "ema"}
    assert state["format"] == TRAINING_STATE_FORMAT and state["partial_epoch"] is None
    assert (tmp_path / "t.pth").is_file()  # improved: the best model beside it
    fresh = _parts(seed=1)
    assert not torch.equal(fresh["model"].weight, saved["model"].weight)
    reader = _checkpointer(tmp_path, fresh)
    resumed = reader.restore(load_checkpoint(tmp_path / "t_last.pth"))
    for name in ("model", "ema", "optimizer", "scheduler"):
        _assert_same_tensors(fresh[name].state_dict(), saved[name].state_dict())
    assert resumed.epoch == 2 and resumed.progress is None and resumed.where == "after epoch 2"
    assert resumed.best["top1"] == 40.0 and reader.history.rows == [row]


def test_a_state_as_saved_on_disk_resumes_part_way_through_an_epoch(tmp_path: Path) -> None:
    saved = _parts(seed=0)
    progress = {**vars(loop.EpochProgress(batches_done=5, optimizer_steps=5)), "part_sums": {}}
    rng = {"torch": torch.get_rng_state()}
    state = {
        "format": TRAINING_STATE_FORMAT,
        **{name: saved[name].state_dict() for name in ("model", "optimizer", "scheduler")},
        "epoch": 1,
        "partial_epoch": {"world_size": 1, "progress": [progress], "rng": [rng]},
        "best": {"top1": 30.0, "epoch": 1, "score": 30.0},
        "history": [{"epoch": 1, "val_top1": 30.0}],
        "restarts": [{"restart": 1, "resumed_from": "the start"}],
        "channels_last": False,
        "bf16": False,
        "config": {},
        "card": {},
        "mlkd_version": "0",
    }
    torch.save(state, tmp_path / "t_last.pth")
    fresh = _parts(seed=1)
    del fresh["ema"]  # a state from before a part was added holds the parts of its day
    reader = _checkpointer(tmp_path, fresh, restart=2)
    resumed = reader.restore(load_checkpoint(tmp_path / "t_last.pth"))
    for name in ("model", "optimizer", "scheduler"):
        _assert_same_tensors(fresh[name].state_dict(), saved[name].state_dict())
    assert resumed.epoch == 1 and resumed.progress == loop.EpochProgress(5, 5)
    assert torch.equal(resumed.rng["torch"], rng["torch"])
    # A launcher restart is recorded after the ones the state holds, saying where it went on.
    assert reader.history.run_info["restarts"] == [
        {"restart": 1, "resumed_from": "the start"},
        {"restart": 2, "resumed_from": "in epoch 2 after batch 5"},
    ]


def test_a_part_done_epoch_of_two_processes_is_not_resumed_by_one(
    digits_teacher: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models"
    out.mkdir()
    state = torch.load(digits_teacher.parent / "t_last.pth", weights_only=True)
    progress = vars(loop.EpochProgress(batches_done=1, optimizer_steps=1))
    state["epoch"] = 1
    state["partial_epoch"] = {"world_size": 2, "progress": [progress] * 2, "rng": [{}, {}]}
    state["config"]["output_dir"] = str(out)  # the same run, moved: no changed settings
    torch.save(state, out / "t_last.pth")
    shutil.copy(digits_teacher, out / "t.pth")
    args = ("--name", "t", "--epochs", "2", "--quiet", "--output-dir", out, "--resume")
    result = invoke_cli(*DIGITS_TEACHER, *args)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "part-way through an epoch by 2 processes", "--world-size 2")
    assert torch.load(out / "t_last.pth", weights_only=True)["epoch"] == 1  # left as it was


@pytest.mark.parametrize("name", ["epoch", "history"])
def test_a_part_may_not_take_a_key_of_the_state_itself(tmp_path: Path, name: str) -> None:
    parts = _parts(seed=0)
    parts[name] = parts.pop("ema")
    with pytest.raises(ValueError, match=f"may not be named \\['{name}'\\]"):
        _checkpointer(tmp_path, parts)


def test_the_state_is_written_every_few_seconds_and_always_after_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpointing, "STATE_EVERY_S", 3600.0)
    written = []
    real = checkpointing.Checkpointer._write_state

    def record(self, epoch, best, partial):
        written.append(epoch)
        real(self, epoch, best, partial)

    monkeypatch.setattr(checkpointing.Checkpointer, "_write_state", record)
    result = invoke_cli(*DIGITS_TEACHER, "-n", "t", "-e", "4", "-q")
    assert result.exit_code == 0, result.stderr
    assert written == [1, 4]  # the first epoch, then the last: none in between within an hour
    history = json.loads((tmp_path / "models" / "t_history.json").read_text())
    assert len(history["epochs"]) == 4  # the history is written every epoch
