"""DDP ranks in step under the KD loss, and `mlkd distill` end to end on tiny models (the
multi-exit student itself: tests/models/test_student.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.loaders import collate_readable
from mlkd_cli.engine import loop
from mlkd_cli.engine.launch import launch
from mlkd_cli.losses.kd import MultiExitKDLoss
from mlkd_cli.models.student import build_student
from mlkd_cli.models.teacher import TeacherEnsemble

# ----------------------------------------------------------------------------- DDP


def _ddp_sync_worker(ctx: DistContext, steps: int) -> list[bool]:
    """Distil on random data; after every optimiser step compare parameters across ranks."""
    torch.manual_seed(0)
    student = build_student("test_resnet", 5, None, 16)
    teacher = TeacherEnsemble([timm.create_model("test_resnet", num_classes=5)], [1.0])
    model = DistributedDataParallel(student)
    torch.manual_seed(1 + ctx.rank)  # different data on each rank
    data = TensorDataset(torch.randn(8 * steps, 3, 16, 16), torch.randint(0, 5, (8 * steps,)))
    loader = DataLoader(
        data,
        batch_size=2,
        sampler=DistributedSampler(data, 2, ctx.rank),
        collate_fn=collate_readable,
    )
    optimizer = loop.build_optimizer(model, 1e-2, 1e-4)
    scheduler = loop.build_scheduler(optimizer, steps, 0, 1.0)
    loss = MultiExitKDLoss(4.0, 0.5, [1.0, 1.0, 1.0])
    same: list[bool] = []

    def step(m: nn.Module, images: torch.Tensor, targets: torch.Tensor, *_: object) -> torch.Tensor:
        return loss(m(images), teacher(images), targets)

    def check(_done: int, _snapshot: object) -> bool:
        # Called after each optimiser step (every 2 batches: accumulation of 2).
        flat = torch.cat([p.detach().flatten() for p in student.parameters()])
        gathered = ctx.gather_objects(flat)
        same.append(all(torch.equal(gathered[0], g) for g in gathered))
        return False

    mixer = loop.BatchMixer(5, 1.0, 1.0, 0.0)
    precision = loop.Precision(ctx.device)
    loop.train_one_epoch(
        model,
        loader,
        len(loader),
        step,
        optimizer,
        scheduler,
        mixer,
        ctx,
        precision,
        2,
        at_boundary=check,
    )
    return same


@pytest.mark.slow
def test_ddp_ranks_hold_identical_parameters_after_every_step() -> None:
    same = launch(_ddp_sync_worker, 3, world_size=2, device="cpu")
    assert same == [True, True, True]


# ----------------------------------------------------------------------------- end to end

FAST = ("--dataset", "digits", "--quiet")


@pytest.fixture
def small_teacher(digits_teacher: Path) -> Path:
    """The folder holding models/t.pth (trained at 16 px; the students use 32)."""
    return digits_teacher.parent.parent


@pytest.mark.slow
def test_distilled_student_is_plain_timm_with_the_training_logits(
    small_teacher: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models"
    result = invoke_cli(
        "distill", *FAST, "--model", "test_resnet", "--checkpoint",
        small_teacher / "models/t.pth", "--student", "test_resnet", "-e", "2", "-b", "32",
        "-n", "s", "-s", "1", "--output-dir", out, "--json", "--effective-batch-size", "128",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["exits"] == [0, 1, 2] and summary["kind"] == "student"
    last = summary["last"]
    assert last["effective_batch"] == 128 and last["optimizer_steps"] == 10  # 40 batches / 4
    assert {"exit1_top1", "exit2_nll", "exit3_top1"} <= set(last)
    assert (out / "s_e1.pth").is_file() and (out / "s_e2.pth").is_file()
    # The epoch-2 model, plain timm, against the training-time model's final head.
    plain = timm.create_model("test_resnet", checkpoint_path=str(out / "s_e2.pth"), num_classes=10)
    trained = build_student("test_resnet", 10, [0, 1, 2], 32)
    trained.load_state_dict(torch.load(out / "s_last.pth", weights_only=True)["model"])
    plain.eval()
    trained.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(images), trained(images)[0], atol=1e-6)
    saved = torch.load(out / "s.pth", weights_only=True)
    assert saved["arch"] == "test_resnet" and saved["img_size"] == 32
    assert not any(k.startswith("exits.") for k in saved["state_dict"])
    history = json.loads((out / "s_history.json").read_text())
    assert history["kind"] == "student" and len(history["epochs"]) == 2
    # The loss by component: the final head's KD and CE terms (mlkd's α = 0.9) and each exit's.
    for row in history["epochs"]:
        final = 0.9 * row["kd"] + 0.1 * row["ce"]
        parts = final + row["exit1_loss"] + row["exit2_loss"] + row["exit3_loss"]
        assert row["train_loss"] == pytest.approx(parts, rel=1e-6)
    header = (out / "s_history.csv").read_text().splitlines()[0].split(",")
    assert {"kd", "exit1_loss", "exit2_loss", "exit3_loss"} <= set(header)


@pytest.mark.slow
def test_config_json_here_is_the_default_teacher(
    small_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = invoke_cli("distill", *FAST, "-e", "1")
    assert missing.exit_code == 2 and "--ensemble FILE" in missing.stderr
    (tmp_path / "config.json").write_text(
        json.dumps({"members": [{"checkpoint": str(small_teacher / "models/t.pth")}]})
    )
    result = invoke_cli(
        "distill", *FAST, "--student", "test_resnet", "-e", "1", "--json", "--exits", "1",
        "--mixup-alpha", "0", "--cutmix-alpha", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["teacher"] == [str(small_teacher / "models/t.pth")]
    assert summary["exits"] == [1] and Path("models/mlkd_student.pth").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "test_resnet"), "add --checkpoint"),
        (("--ensemble", "nowhere.json"), "no ensemble file nowhere.json"),
        (("--student", "test_vit"), "convolutional feature map"),
        (("--exits", "7"), "--exits 7"),
        (("--alpha", "2"), "--alpha"),
        (("--temperature", "0"), "--temperature"),
    ],
)
def test_bad_distill_input_is_one_line(
    small_teacher: Path,
    tmp_path: Path,
    args: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    teacher = ("--ensemble", str(tmp_path / "t.json"))
    (tmp_path / "t.json").write_text(
        json.dumps({"members": [{"checkpoint": str(small_teacher / "models/t.pth")}]})
    )
    given = args if any(a in ("--model", "--ensemble") for a in args) else teacher + args
    result = invoke_cli("distill", *FAST, "--student", "test_resnet", "-e", "1", *given)
    assert result.exit_code == 2, result.stdout
    assert_error_line(result.stderr, message)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_tensorboard_receives_the_loss_by_component(small_teacher: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "models"
    result = invoke_cli(
        "distill", *FAST, "--model", "test_resnet", "--checkpoint", small_teacher / "models/t.pth",
        "--student", "test_resnet", "-e", "2", "-b", "32", "-n", "s", "--alpha", "0.9",
        "--output-dir", out, "--log-to", "tensorboard", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = json.loads((out / "s_history.json").read_text())["epochs"]
    assert {"kd", "ce", "exit1_loss", "exit3_loss"} <= set(rows[-1])
    events = EventAccumulator(str(out / "s_tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/kd", "train/ce", "train/exit1_loss", "val/top1"} <= tags
    kd = events.Scalars("train/kd")
    assert [e.step for e in kd] == [1, 2]
    assert [e.value for e in kd] == pytest.approx([row["kd"] for row in rows], rel=1e-6)


def test_unknown_metric_logger_is_refused(run_cli, tmp_path: Path) -> None:
    result = run_cli(
        "teacher", "train", "-d", "digits", "-m", "test_resnet", "--log-to", "comet",
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--log-to comet", "mlflow, tensorboard, wandb")
    assert not any(tmp_path.iterdir())
