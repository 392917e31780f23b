"""The fast paths: mixing device batches, the teacher-output cache, --compile, no syncs
(augmentation on the device itself: tests/data/test_device_pipeline.py)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke_cli

from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.device import DeviceBatches
from mlkd_cli.data.loaders import TransformedSubset, build_train_batches
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.transforms import ImageConfig, build_eval_transform
from mlkd_cli.engine import loop
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.engine.distiller import DistillTask, plan_distillation
from mlkd_cli.engine.teacher_sources import teacher_outputs
from mlkd_cli.models.teacher import TeacherEnsemble

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
IMAGE_CONFIG = ImageConfig(img_size=24, crop_pct=0.875)


def test_mixing_device_batches_gives_soft_targets() -> None:
    splits = load_splits("digits", Path("data"))
    device = DeviceBatches(splits.train, splits.train_indices, IMAGE_CONFIG, 16, CPU, seed=0)
    mixer = loop.BatchMixer(10, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0)
    batch = next(device.epoch(0))
    np.random.seed(0)
    mixed, targets, _ = mixer(batch.images.clone(), batch.labels)
    assert torch.allclose(targets.sum(1), torch.ones(16))
    lam = targets[0, batch.labels[0]].item() if batch.labels[0] != batch.labels[-1] else None
    if lam is not None:  # image 0 is lam * image 0 + (1 - lam) * the last image
        expected = lam * batch.images[0] + (1 - lam) * batch.images[-1]
        assert torch.allclose(mixed[0], expected, atol=1e-5)


@pytest.fixture
def cached_plan(digits_teacher: Path, tmp_path: Path):
    cfg = DistillConfig(
        dataset="digits",
        teacher_model="test_resnet",
        teacher_checkpoint=digits_teacher,
        student="test_resnet",
        img_size=16,
        epochs=1,
        batch_size=32,
        augment=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        teacher_cache=True,
        output_dir=tmp_path,
    )
    return plan_distillation(cfg)


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_teacher_cache_holds_the_teachers_outputs(cached_plan, pipeline: str) -> None:
    task = DistillTask(CPU, cached_plan)
    splits = load_splits("digits", Path("data"))
    image_config = cached_plan.run.image_config
    if pipeline == "device":
        batches = DeviceBatches(splits.train, splits.train_indices, image_config, 32, CPU, 0, False)
    else:
        subset = TransformedSubset(
            splits.train, splits.train_indices, build_eval_transform(image_config)
        )
        batches = build_train_batches(subset, 32, CPU, 0, workers=0)
    cache = teacher_outputs(task.source.teacher, batches, CPU, loop.Precision(CPU.device), 64, 10)
    batch = next(batches.epoch(0))
    direct = task.source.teacher(batch.images)
    assert torch.allclose(cache[batch.indices], direct, atol=1e-4)


def test_cached_distillation_runs_no_teacher_forward_while_training(
    digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    forward = TeacherEnsemble.forward

    def counted(self, images):
        calls.append(images.shape[0])
        return forward(self, images)

    monkeypatch.setattr(TeacherEnsemble, "forward", counted)
    result = invoke_cli(
        "distill", "-d", "digits", "--model", "test_resnet", "--checkpoint", digits_teacher,
        "--student", "test_resnet", "--img-size", "16", "-e", "2", "-b", "32", "--no-augment",
        "--mixup-alpha", "0", "--cutmix-alpha", "0", "--teacher-cache", "--output-dir", tmp_path,
        "--json", "--workers", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sum(calls) == 1294  # one pass over the training split, then none
    assert json.loads(result.stdout)["best_val_top1"] > 0


def test_compile_without_a_backend_warns_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop.shutil, "which", lambda name: None)
    result = invoke_cli(
        "teacher", "train", "-d", "digits", "-m", "test_resnet", "-e", "1", "--img-size", "16",
        "--compile", "--output-dir", tmp_path, "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "--compile is not available here (no C++ compiler" in result.stderr


class _SyncCounter:
    """Counts the calls that copy a tensor's value to the host, and where they come from.

    The optimiser's step counters are CPU tensors by design (reading them is no device sync),
    so torch.optim's reads are not counted.
    """

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sites: list[str] = []
        self.inside = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(original))

    def _counted(self, original):
        def wrapper(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if not self.inside and "torch/optim/" not in caller.filename:
                self.sites.append(f"{caller.filename}:{caller.lineno}")
            self.inside, was = True, self.inside
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.inside = was

        return wrapper


def test_the_training_step_reads_nothing_back_but_the_logged_loss(
    cached_plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = DistillTask(CPU, cached_plan)
    model = task.build(CPU)
    splits = load_splits("digits", Path("data"))
    image_config = ImageConfig(img_size=16)
    batches = DeviceBatches(splits.train, splits.train_indices, image_config, 16, CPU, 0)
    optimizer = loop.build_optimizer(model, 1e-3, 1e-4)
    scheduler = loop.build_scheduler(optimizer, 100, 5, 0.1)
    mixer = loop.BatchMixer(10, 1.0, 1.0, 0.1)
    epoch = batches.epoch(0)
    counter = _SyncCounter(monkeypatch)
    result = loop.train_one_epoch(
        model, epoch, batches.batches_per_epoch, task.step, optimizer, scheduler, mixer,
        CPU, loop.Precision(CPU.device), 2,
    )  # fmt: skip
    steps = batches.batches_per_epoch
    assert steps == 80
    # The non-finite check every LOSS_READ_EVERY batches, and the epoch's totals at the end.
    in_loop = [site for site in counter.sites if site.startswith(loop.__file__)]
    assert len(in_loop) == len(counter.sites) - 1, counter.sites  # and the epoch's order, once
    assert len(in_loop) <= steps // loop.LOSS_READ_EVERY + 1 + 3, in_loop
    assert result["optimizer_steps"] == 40
