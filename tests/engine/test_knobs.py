"""timm's names and knobs: train.py's flag names as aliases, drop-path, gradient clipping and the
model EMA in teacher training and distillation (docs/distilling.md, "timm's names and knobs")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_TEACHER, assert_error_line, invoke_cli
from mlkd_cli.commands.requests import TIMM_ALIASES
from torch import nn

from mlkd_cli.core.checkpoint import ModelCard, load_checkpoint
from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.loaders import Batch
from mlkd_cli.data.transforms import ImageConfig
from mlkd_cli.engine import distiller, ema, loop, teacher, trainer
from mlkd_cli.engine.checkpointing import Checkpointer
from mlkd_cli.engine.config import DistillConfig, TeacherTrainConfig
from mlkd_cli.engine.history import History
from mlkd_cli.engine.planning import RunFiles, RunPlan
from mlkd_cli.engine.precision import Precision
from mlkd_cli.models.factory import drop_path_rate_of
from mlkd_cli.models.student import build_student, unwrap_student

CPU = DistContext(0, 1, 0, torch.device("cpu"))
# A value for each setting timm names otherwise, none of them the default.
TIMM_VALUES = {
    "optimizer": "sgd",
    "schedule": "constant",
    "label_smoothing": "0.2",
    "mixup_alpha": "0.5",
    "cutmix_alpha": "0.3",
    "auto_augment": "rand-m9-mstd0.5",
}


class Planned(Exception):
    """Raised in place of planning: the command built its config and stops there."""


def _config_of(monkeypatch: pytest.MonkeyPatch, command: str, *args: object):
    """The config `mlkd teacher train` / `mlkd distill` builds from `args` (nothing runs)."""
    seen = []

    def capture(cfg):
        seen.append(cfg)
        raise UserError("planned")

    if command == "teacher":
        monkeypatch.setattr(teacher, "plan_teacher_training", capture)
        base = ("teacher", "train", "-d", "digits", "-m", "test_resnet")
    else:
        monkeypatch.setattr(distiller, "plan_distillation", capture)
        base = ("distill", "-d", "digits")
    result = invoke_cli(*base, *args)
    assert result.exit_code == 2 and "planned" in result.stderr, result.stderr
    return seen[0]


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_timm_names_set_what_mlkd_names_set(monkeypatch, command: str) -> None:
    timm_args, mlkd_args = [], []
    for flag, setting in TIMM_ALIASES.values():
        timm_args += [flag, TIMM_VALUES[setting]]
        mlkd_args += ["--" + setting.replace("_", "-"), TIMM_VALUES[setting]]
    by_timm = _config_of(monkeypatch, command, *timm_args)
    by_mlkd = _config_of(monkeypatch, command, *mlkd_args)
    assert by_timm.to_record() == by_mlkd.to_record()
    default = _config_of(monkeypatch, command).to_record()
    for setting, value in TIMM_VALUES.items():
        assert str(by_timm.to_record()[setting]) == value != str(default[setting])


def test_a_timm_name_and_its_mlkd_name_must_agree(monkeypatch) -> None:
    same = _config_of(monkeypatch, "teacher", "--opt", "sgd", "--optimizer", "sgd")
    assert same.optimizer == "sgd"
    result = invoke_cli(*DIGITS_TEACHER, "--opt", "sgd", "--optimizer", "adamw")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--opt is timm's name for --optimizer")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--clip-grad", "-1"], "--clip-grad"),
        (["--clip-grad", "0"], "must be positive"),
        (["--clip-mode", "agc"], "--clip-mode must be norm or value"),
        (["--model-ema-decay", "1"], "--model-ema-decay"),
        (["--model-ema-decay", "-0.5"], "(0, 1)"),
        (["--drop-path", "1"], "--drop-path"),
        (["--drop-path", "nan"], "finite"),
        (["--opt", "lamb"], "--optimizer 'lamb' is not one of"),
        (["--sched", "step"], "--schedule 'step' is not one of"),
    ],
)
def test_a_bad_knob_is_one_line_before_any_work(
    tmp_path: Path, flags: list[str], fragment: str
) -> None:
    result = invoke_cli(*DIGITS_TEACHER, *flags, "--output-dir", tmp_path)
    assert result.exit_code == 2
    assert_error_line(result.stderr, fragment)
    assert not any(tmp_path.iterdir())


def test_drop_path_is_refused_by_an_architecture_without_it(tmp_path: Path) -> None:
    args = ("teacher", "train", "-d", "digits", "-m", "ghostnet_050", "--drop-path", "0.1")
    result = invoke_cli(*args, "--output-dir", tmp_path)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "ghostnet_050 has no stochastic depth", "drop --drop-path")


def test_drop_path_reaches_the_teacher_that_trains(tmp_path: Path) -> None:
    rates = {}
    for rate in (None, 0.1):
        cfg = TeacherTrainConfig(
            dataset="digits", model="test_resnet", img_size=16, drop_path=rate, output_dir=tmp_path
        )
        model = teacher.TeacherTask(teacher.plan_teacher_training(cfg)).build(CPU)
        rates[rate] = drop_path_rate_of(model)
    assert rates[None] == 0.0  # the architecture's default: none
    assert rates[0.1] == pytest.approx(0.1)  # timm's schedule: the deepest block gets the rate


def test_drop_path_reaches_the_student_that_trains(digits_teacher: Path, tmp_path: Path) -> None:
    cfg = DistillConfig(
        dataset="digits",
        teacher_model="test_resnet",
        teacher_checkpoint=digits_teacher,
        student="test_resnet",
        img_size=16,
        drop_path=0.1,
        output_dir=tmp_path,
    )
    plan = distiller.plan_distillation(cfg)
    student = distiller.DistillTask(CPU, plan).build(CPU)
    assert drop_path_rate_of(unwrap_student(student).backbone) == pytest.approx(0.1)
    # the exits were built beside the same backbone
    assert len(unwrap_student(student).exits) == len(plan.exits) > 0
    assert drop_path_rate_of(build_student("test_resnet", 10, None, 16)) == 0.0


# ------------------------------------------------------------------------ gradient clipping


def _one_step(clip: loop.GradientClip | None) -> tuple[torch.Tensor, float]:
    """One plain-SGD step of a small model on a loss scaled by 1e6: how far each weight moved,
    and the gradients' norm the optimiser saw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []

    def record(opt, args, kwargs) -> None:
        grads = [p.grad for p in model.parameters()]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    optimizer.register_step_pre_hook(record)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def huge(m, images, targets, indices=None, mix=1.0):
        return 1e6 * loop.cross_entropy_step(m, images, targets)

    batch = Batch(torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,)))
    mixer = loop.BatchMixer(5, 0.0, 0.0, 0.0)
    loop.train_one_epoch(
        model, [batch], 1, huge, optimizer, scheduler, mixer, CPU, loop.Precision(CPU.device), 1,
        clip=clip,
    )  # fmt: skip
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (after - before).abs(), seen[0]


def test_clipping_by_value_bounds_each_weight_s_move() -> None:
    moved, _ = _one_step(None)
    assert moved.max() > 0.01 * 1.0 * 10  # unclipped, the huge loss moves weights far
    moved, _ = _one_step(loop.GradientClip(1.0, "value"))
    assert moved.max() <= 0.01 * 1.0 * (1 + 1e-5)  # at most lr x clip
    assert moved.max() >= 0.01 * 1.0 * (1 - 1e-5)  # and the clip bit


def test_clipping_by_norm_bounds_the_gradient_the_optimiser_sees() -> None:
    _, norm = _one_step(None)
    assert norm > 1000.0
    _, norm = _one_step(loop.GradientClip(1.0, "norm"))
    assert norm == pytest.approx(1.0, rel=1e-4)


# -------------------------------------------------------------------------------- model EMA


def test_the_better_weights_are_chosen_and_a_tie_keeps_the_raw_ones() -> None:
    assert ema.better_weights(80.0, 81.0) == ema.EMA
    assert ema.better_weights(80.0, 80.0) == ema.RAW
    assert ema.better_weights(80.0, 79.0) == ema.RAW
    assert ema.better_weights(80.0, math.nan) == ema.RAW
    row = {"val_top1": 1.0, "ema_val_top1": 2.0, "ema_exit1_top1": 3.0, "epoch": 4}
    assert ema.ema_metrics(row) == {"val_top1": 2.0, "exit1_top1": 3.0}


def test_the_ema_follows_timm_and_its_state_is_restored_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    average = ema.ModelEma(model, decay=0.5, warmup=False)
    start = model.weight.detach().clone()
    average.update(model)  # timm's first update copies the weights
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)
    assert torch.allclose(average.module.weight, start + 0.5)
    again = ema.ModelEma(nn.Linear(4, 3), decay=0.5, warmup=False)
    again.load_state_dict(average.state_dict())
    assert again.updates == 2 and torch.equal(again.module.weight, average.module.weight)


def _teacher(out: Path, *extra: object) -> dict:
    result = invoke_cli(
        *DIGITS_TEACHER, "--name", "t", "--output-dir", out, "--json", "--label-fraction", "0.1",
        "--batch-size", "16", "--schedule", "constant", "--model-ema", "--model-ema-decay", "0.9",
        *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_the_ema_is_validated_saved_when_better_and_resumed_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the EMA scores better (made so here: the chooser itself is tested above), its weights
    # are what the run saves, with their metrics, and the run says so.
    monkeypatch.setattr(trainer, "better_weights", lambda raw, average: ema.EMA)
    whole = _teacher(tmp_path / "whole", "--epochs", "2")
    state = load_checkpoint(tmp_path / "whole/t_last.pth")
    rows = json.loads((tmp_path / "whole/t_history.json").read_text())["epochs"]
    assert all("ema_val_top1" in row and row["weights"] == "ema" for row in rows)
    steps = rows[-1]["optimizer_steps"]
    assert state["ema"]["updates"] == 2 * steps
    weights = state["ema"]["weights"]
    assert not torch.equal(weights["fc.weight"], state["model"]["fc.weight"])  # an average
    assert whole["best_weights"] == "ema"
    best = whole["best_row"]
    assert best["val_top1"] == best["ema_val_top1"] == rows[best["epoch"] - 1]["ema_val_top1"]
    saved = torch.load(tmp_path / "whole/t.pth", weights_only=True)
    assert saved["metrics"]["val_top1"] == best["val_top1"]
    if whole["best_epoch"] == 2:  # the last state's average is the saved one
        for key, value in weights.items():
            assert torch.equal(saved["state_dict"][key], value), key
    # One epoch, then resumed to two: the average continues as if never stopped.
    _teacher(tmp_path / "parts", "--epochs", "1")
    _teacher(tmp_path / "parts", "--epochs", "2", "--resume")
    resumed = load_checkpoint(tmp_path / "parts/t_last.pth")["ema"]
    assert resumed["updates"] == 2 * steps
    for key, value in weights.items():
        assert torch.equal(resumed["weights"][key], value), key


class _PlainTask:
    def plain_model(self, model: nn.Module) -> nn.Module:
        return model

    def save_best(self, model, files, card, epoch, metrics) -> None:
        pass


def _checkpointer(folder: Path, parts: dict) -> Checkpointer:
    cfg = TeacherTrainConfig(dataset="digits", model="test_resnet", output_dir=folder, epochs=2)
    card = ModelCard("test_resnet", 3, ["a", "b", "c"], "digits", 16, 1.0, [0.5] * 3, [0.5] * 3)
    plan = RunPlan(cfg, card, ImageConfig(img_size=16), RunFiles(folder, "t"), "teacher")
    history = History(folder, "t", {})
    return Checkpointer(
        plan, _PlainTask(), CPU, parts, history, Precision.resolve("fp32", CPU.device)
    )


def test_a_state_without_an_ema_is_continued_by_a_run_with_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, average = nn.Linear(4, 3), ema.ModelEma(nn.Linear(4, 3), 0.9, warmup=False)
    writer = _checkpointer(tmp_path, {"model": model})
    writer.restore(None)
    row = {"epoch": 1, "train_loss": 1.0, "val_top1": 40.0}
    writer.history.append(row)
    writer.save_epoch({"top1": 40.0, "epoch": 1, "score": 40.0}, row, improved=True)
    reader = _checkpointer(tmp_path, {"model": nn.Linear(4, 3), "ema": average})
    resumed = reader.restore(load_checkpoint(tmp_path / "t_last.pth"))
    assert resumed.missing_parts == ["ema"] and resumed.epoch == 1
    average.restart_from(model)  # what the trainer does with a missing average
    assert torch.equal(average.module.weight, model.weight) and average.updates == 0


@pytest.mark.slow
def test_a_distillation_with_timm_s_knobs_records_each(
    digits_teacher: Path, tmp_path: Path
) -> None:
    result = invoke_cli(
        "distill", "-d", "digits", "--model", "test_resnet", "--checkpoint", digits_teacher,
        "--student", "test_resnet", "--img-size", "16", "-e", "1", "-n", "s", "--output-dir",
        tmp_path, "--json", "--opt", "sgd", "--sched", "cosine", "--drop-path", "0.1",
        "--clip-grad", "1", "--model-ema",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    history = json.loads((tmp_path / "s_history.json").read_text())
    knobs = ("optimizer", "schedule", "drop_path", "clip_grad", "clip_mode", "model_ema")
    assert [history["config"][k] for k in knobs] == ["sgd", "cosine", 0.1, 1.0, "norm", True]
    (row,) = history["epochs"]
    assert {"ema_val_top1", "ema_val_nll", "ema_exit1_top1"} <= set(row)
    assert row["weights"] == summary["best_weights"]
    # The plain student saved is the backbone of the weights chosen.
    state = load_checkpoint(tmp_path / "s_last.pth")
    chosen = state["ema"]["weights"] if row["weights"] == "ema" else state["model"]
    saved = torch.load(tmp_path / "s.pth", weights_only=True)["state_dict"]
    for key, value in saved.items():
        assert torch.equal(value, chosen[f"backbone.{key}"]), key


def test_a_preset_sets_the_knobs_and_a_flag_wins(monkeypatch, tmp_path: Path) -> None:
    preset = tmp_path / "knobs.yaml"
    preset.write_text(
        "distill:\n  drop_path: 0.05\n  clip_grad: 2\n  clip_mode: value\n"
        "  model_ema: true\n  model_ema_decay: 0.99\n  model_ema_warmup: true\n"
    )
    cfg = _config_of(monkeypatch, "distill", "--preset", preset, "--clip-grad", "0.5")
    assert (cfg.drop_path, cfg.clip_grad, cfg.clip_mode) == (0.05, 0.5, "value")
    assert (cfg.model_ema, cfg.model_ema_decay, cfg.model_ema_warmup) == (True, 0.99, True)
    off = _config_of(monkeypatch, "distill", "--preset", preset, "--no-model-ema")
    assert off.model_ema is False
