"""Teacher sources (`mlkd_cli/engine/teacher_sources.py`): each run's is chosen once, at plan
time, from its settings; the distillation step learns from whatever its source gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlkd_cli.core.dist import DistContext
from mlkd_cli.engine import teacher_sources
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.engine.distiller import DistillTask, plan_distillation
from mlkd_cli.engine.teacher_sources import (
    TEACHER_SOURCES,
    CachedOutputs,
    LiveFeatures,
    LiveTeacher,
    StoredOutputs,
    choose_source,
)

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("settings", "features", "expected"),
    [
        ({"soft_labels": Path("store")}, (), "stored"),
        ({"teacher_model": "m", "teacher_checkpoint": Path("t.pth")}, (), "live"),
        ({"teacher_model": "m", "teacher_checkpoint": Path("t.pth")}, (1, 2), "features"),
        ({"teacher_checkpoint": Path("t.pth"), "teacher_cache": True}, (), "cached"),
    ],
    ids=["store", "live", "features", "cache"],
)
def test_each_run_takes_the_source_its_settings_ask_for(
    settings: dict, features: tuple[int, ...], expected: str
) -> None:
    cfg = DistillConfig(dataset="digits", student="test_resnet", **settings)
    assert choose_source(cfg, features) == expected
    kinds = {
        "stored": StoredOutputs,
        "features": LiveFeatures,
        "cached": CachedOutputs,
        "live": LiveTeacher,
    }
    assert TEACHER_SOURCES[expected] is kinds[expected]


class _Uniform:
    """A source whose teacher is sure of nothing (equal logits for every class), recording what
    the task asks of it."""

    teacher = None

    def __init__(self, plan, temperature: float) -> None:
        self.classes = plan.run.card.num_classes
        self.calls: list[str] = []

    @staticmethod
    def serves(cfg: DistillConfig, features: tuple[int, ...]) -> bool:
        return True

    def prepare(self, ctx, batches, precision, report) -> None:
        self.calls.append("prepare")

    def start_epoch(self, epoch: int) -> None:
        self.calls.append(f"epoch {epoch}")

    def outputs(self, images, indices, mix):
        self.calls.append(f"outputs {images.shape[0]}")
        return torch.zeros(images.shape[0], self.classes), None


def test_a_source_added_to_the_registry_is_chosen_and_taught_from(
    digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One class and one registry line: planning picks it, the step learns its outputs."""
    registry = {"uniform": _Uniform, **TEACHER_SOURCES}
    monkeypatch.setattr(teacher_sources, "TEACHER_SOURCES", registry)
    cfg = DistillConfig(
        dataset="digits", teacher_model="test_resnet", teacher_checkpoint=digits_teacher,
        student="test_resnet", img_size=16, epochs=1, batch_size=8, output_dir=tmp_path,
    )  # fmt: skip
    plan = plan_distillation(cfg)
    assert plan.source == "uniform"
    task = DistillTask(CPU, plan)
    assert isinstance(task.source, _Uniform)
    task.start_epoch(0)
    torch.manual_seed(0)
    model = task.build(CPU).train()
    images, targets = torch.randn(8, 3, 16, 16), torch.eye(10)[torch.arange(8)]
    named = task.step(model, images, targets)
    assert task.source.calls == ["epoch 0", "outputs 8"]
    with torch.no_grad():
        uniform = task.loss.named(model(images), torch.zeros(8, 10), targets, None, None, None)
        confident = task.loss.named(model(images), torch.eye(10)[:8] * 50, targets, None)
    assert torch.allclose(named["loss"], uniform["loss"], atol=1e-6)
    assert not torch.allclose(named["loss"], confident["loss"], atol=1e-3)
