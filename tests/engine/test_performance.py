"""The fast paths: augmentation on the device, the teacher-output cache, --compile, no syncs."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke_cli

from mlkd_cli.core.dist import DistContext
from mlkd_cli.data.device import DeviceAugment, DeviceBatches
from mlkd_cli.data.loaders import TransformedSubset, build_train_batches
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.sources import ArraySource
from mlkd_cli.data.transforms import ImageRecipe, build_eval_transform
from mlkd_cli.engine import loop
from mlkd_cli.engine.config import DistillConfig
from mlkd_cli.engine.distiller import DistillTask, plan_distillation, teacher_outputs
from mlkd_cli.models.teacher import TeacherEnsemble

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
RECIPE = ImageRecipe(img_size=24, crop_pct=0.875)


def _images(count: int = 8, size: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)


def test_device_augmentation_shapes_ranges_and_seeds() -> None:
    augment = DeviceAugment(RECIPE, CPU.device)
    images = _images()
    first = augment(images, torch.Generator().manual_seed(1))
    assert first.shape == (8, 3, 24, 24) and first.dtype == torch.float32
    low = (0 - torch.tensor(RECIPE.mean)) / torch.tensor(RECIPE.std)
    high = (1 - torch.tensor(RECIPE.mean)) / torch.tensor(RECIPE.std)
    per_channel = first.transpose(0, 1).flatten(1)
    assert (per_channel.min(1).values >= low - 1e-5).all()
    assert (per_channel.max(1).values <= high + 1e-5).all()
    again = augment(images, torch.Generator().manual_seed(1))
    other = augment(images, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    # Different images of one batch get different crops: a constant-per-image batch stays
    # constant, a gradient does not give eight identical views.
    ramp = torch.arange(12, dtype=torch.uint8).mul(20).expand(8, 3, 12, 12).contiguous()
    views = augment(ramp, torch.Generator().manual_seed(3))
    assert len({tuple(v[0, 0, :3].tolist()) for v in views}) > 1


def test_crop_boxes_stay_inside_the_image() -> None:
    augment = DeviceAugment(RECIPE, CPU.device)
    draws = torch.rand(4096, 26, generator=torch.Generator().manual_seed(0))
    theta = augment._crop_boxes(draws, 12, 20)
    for axis in (0, 1):
        reach = theta[:, axis, axis].abs() + theta[:, axis, 2].abs()
        assert (reach <= 1 + 1e-5).all()
    areas = (theta[:, 0, 0].abs() * theta[:, 1, 1]).numpy()  # share of the image each crop covers
    assert areas.min() >= RECIPE.crop_scale[0] - 1e-4 and areas.max() <= 1 + 1e-5
    assert np.mean(theta[:, 0, 0].numpy() < 0) == pytest.approx(0.5, abs=0.05)  # flips


def test_without_augmentation_the_device_view_is_the_evaluation_view() -> None:
    # Smooth images, upscaled as CIFAR is (grid_sample vs PIL's bicubic: close, not equal).
    coarse = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")
    images = smooth.mul(255).round().to(torch.uint8)
    device_view = DeviceAugment(RECIPE, CPU.device, augment=False)(images, None)
    cpu_transform = build_eval_transform(RECIPE)
    source = ArraySource(images.permute(0, 2, 3, 1).numpy(), [0] * 4)
    cpu_view = torch.stack([cpu_transform(source[i][0]) for i in range(4)])
    assert (device_view - cpu_view).abs().mean() < 0.08  # in normalised units (std 0.5)
    assert (device_view - cpu_view.roll(1, 0)).abs().mean() > 0.3  # other images: far


def test_device_batches_follow_the_cpu_order_and_resume_part_way() -> None:
    splits = load_splits("digits", Path("data"))
    device = DeviceBatches(splits.train, splits.train_indices, RECIPE, 32, CPU, seed=5)
    subset = TransformedSubset(splits.train, splits.train_indices, build_eval_transform(RECIPE))
    cpu = build_train_batches(subset, 32, CPU, seed=5, workers=0)
    assert device.batches_per_epoch == cpu.batches_per_epoch
    cpu_batches = list(cpu.epoch(2))
    device_batches = list(device.epoch(2))
    for a, b in zip(cpu_batches, device_batches, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices)
    tail = list(device.epoch(2, start_batch=30))
    assert len(tail) == len(device_batches) - 30
    assert all(
        torch.equal(a.images, b.images) for a, b in zip(tail, device_batches[30:], strict=True)
    )


def test_mixing_device_batches_gives_soft_targets() -> None:
    splits = load_splits("digits", Path("data"))
    device = DeviceBatches(splits.train, splits.train_indices, RECIPE, 16, CPU, seed=0)
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
    recipe = cached_plan.run.recipe
    if pipeline == "device":
        batches = DeviceBatches(splits.train, splits.train_indices, recipe, 32, CPU, 0, False)
    else:
        subset = TransformedSubset(splits.train, splits.train_indices, build_eval_transform(recipe))
        batches = build_train_batches(subset, 32, CPU, 0, workers=0)
    cache = teacher_outputs(task.teacher, batches, CPU, loop.Precision(CPU.device), 64, 10)
    batch = next(batches.epoch(0))
    direct = task.teacher(batch.images)
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
    recipe = ImageRecipe(img_size=16)
    batches = DeviceBatches(splits.train, splits.train_indices, recipe, 16, CPU, 0)
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
