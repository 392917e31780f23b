"""`--recipe mlkd|original`: what each sets, and the original's loss reproduced on one step."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import invoke_cli
from torch import nn

from mlkd_cli.core.coerce import build_config
from mlkd_cli.core.dist import DistContext
from mlkd_cli.engine import loop
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.engine.distiller import DistillTask, plan_distillation

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def _config(**values: object) -> DistillConfig:
    return build_config(DistillConfig, {"dataset": "digits", **values}, origin="test")


def test_the_original_recipe_sets_every_documented_difference() -> None:
    cfg = _config(recipe="original")
    assert (cfg.temperature, cfg.alpha, cfg.mixup_alpha, cfg.cutmix_alpha) == (10.0, 1.0, 1.0, 1.0)
    assert cfg.label_smoothing == 0.1  # timm Mixup's, in the CE term
    assert (cfg.schedule, cfg.warmup_epochs, cfg.optimizer) == ("constant", 0.0, "adamw_all")
    assert (cfg.loss, cfg.best_by) == ("original", "val_kd_loss")
    assert (cfg.seed, cfg.deterministic, cfg.precision) == (53303, True, "fp32")
    assert (cfg.epochs, cfg.batch_size, cfg.save_frequency) == (1000, 64, 50)
    assert (cfg.hflip, cfg.scale, cfg.color_jitter) == (0.5, (0.08, 1.0), 0.4)
    # 128 images per process per step, whatever the world size, as the original accumulated.
    plan = cfg.batch_plan(2)
    assert (plan.per_process, plan.accumulation, plan.global_batch) == (64, 2, 256)
    # A flag still wins over the recipe; without Mixup/CutMix the original used hard labels.
    given = _config(recipe="original", temperature=3.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert given.temperature == 3.0 and given.label_smoothing == 0.0
    # The run's first line names where fp32 came from: the recipe, or the user's own flag; the
    # pipeline's dataclasses.replace keeps it, and it is no setting of the records.
    assert cfg.source_of("precision") == "--recipe original"
    assert replace(cfg, resume=True).source_of("precision") == "--recipe original"
    assert _config(recipe="original", precision="fp32").source_of("precision") == "--precision fp32"
    assert "recipe_filled" not in cfg.to_record()


def test_the_mlkd_recipe_mixes_only_over_long_schedules() -> None:
    short, long = _config(epochs=4), _config(epochs=300)
    assert (short.mixup_alpha, short.cutmix_alpha) == (0.0, 0.0)
    assert (long.mixup_alpha, long.cutmix_alpha) == (0.8, 1.0)
    assert (short.temperature, short.alpha, short.schedule) == (4.0, 0.9, "cosine")
    assert (short.seed, short.deterministic, short.best_by) == (0, False, "top1")
    assert _config().epochs == 100 and _config().mixup_alpha == 0.8


def _original_formula(
    heads: list[torch.Tensor],
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """The original's TeachLoss, written out: nn.KLDivLoss() (mean over batch x classes) times
    T², plus cross-entropy against the (Mixup) targets, summed over the four heads."""
    teacher_softmax = F.softmax(teacher_logits / temperature, dim=1)
    total = torch.zeros(())
    for logits in heads:
        kd = nn.KLDivLoss(reduction="mean")(
            F.log_softmax(logits / temperature, dim=1), teacher_softmax
        )
        ce = nn.CrossEntropyLoss()(logits, targets)
        total = total + alpha * temperature**2 * kd + (1 - alpha) * ce
    return total


@pytest.mark.filterwarnings("ignore::UserWarning")  # nn.KLDivLoss's 'mean' advice
def test_one_step_of_the_original_recipe_matches_its_formula(
    digits_teacher: Path, tmp_path: Path
) -> None:
    cfg = _config(
        recipe="original", teacher_model="test_resnet", teacher_checkpoint=digits_teacher,
        student="test_resnet", img_size=16, alpha=0.7, epochs=1, output_dir=tmp_path,
    )  # fmt: skip
    plan = plan_distillation(cfg)
    task = DistillTask(CPU, plan)
    torch.manual_seed(0)
    model = task.build(CPU).train()
    task.source.teacher.bf16 = False
    mixer = loop.BatchMixer(10, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    images, targets, _ = mixer(images, labels)
    assert targets.min() > 0  # label smoothing 0.1 in the mixed targets
    torch.manual_seed(1)
    named = task.step(model, images, targets)
    torch.manual_seed(1)  # the same forward again (nothing random in eval-free layers)
    heads = list(model(images))
    expected = _original_formula(heads, task.source.teacher(images), targets, 10.0, 0.7)
    assert len(heads) == 4
    assert abs(named["loss"].item() - expected.item()) <= 1e-6 * max(1.0, abs(expected.item()))


@pytest.mark.slow
def test_distill_with_the_original_recipe_keeps_the_lowest_validation_kd_loss(
    digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(
        "distill", "-d", "digits", "-m", "test_resnet", "-c", digits_teacher,
        "--student", "test_resnet", "--img-size", "16", "--recipe", "original", "-e", "2",
        "--batch-size", "32", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    history = json.loads(Path(summary["files"]["history_json"]).read_text())
    rows = history["epochs"]
    assert all("val_kd_loss" in r for r in rows)
    best = min(rows, key=lambda r: r["val_kd_loss"])
    assert summary["best_epoch"] == best["epoch"]
    assert history["config"]["precision"] == "fp32" and history["precision"].startswith("fp32")
    assert "(--recipe original;" in history["precision"]  # the first line says why
    assert {r["lr"] for r in rows} == {1e-3}  # constant, no warmup
