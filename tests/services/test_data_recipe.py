"""`mlkd pipeline -d NAME` without a preset: the recipe chosen from the data and the machine, its
printed plan, the preset YAML it writes, and the mistakes refused before any work."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import assert_error_line, invoke_cli, working_dir, write_image_folder

from mlkd_cli.core.errors import UserError
from mlkd_cli.pipeline import baseline_config
from mlkd_cli.presets import resolve_preset
from mlkd_cli.recipes import (
    LINE_WIDTH,
    DataShape,
    Machine,
    choose_recipe,
    measure_shape,
    write_recipe,
)

DIGITS_LIKE = DataShape("imagefolder", Path("dir"), 1294, 10, 28, True)
TWO_CORES = Machine(2)
GPU = Machine(16, "NVIDIA H100 80GB HBM3")


def test_more_images_train_fewer_epochs_and_take_longer() -> None:
    small = choose_recipe(replace(DIGITS_LIKE, train_images=400), TWO_CORES)
    mid = choose_recipe(DIGITS_LIKE, TWO_CORES)
    large = choose_recipe(replace(DIGITS_LIKE, train_images=6000), TWO_CORES)
    assert small.teacher_epochs > mid.teacher_epochs > large.teacher_epochs
    assert small.student_epochs > mid.student_epochs > large.student_epochs
    # each model sees about the same number of images, bounded: a few thousand small images
    # finish in minutes on 2 cores
    assert mid.teacher_epochs * 1294 == pytest.approx(8000, rel=0.15)
    assert small.expected_s < mid.expected_s < large.expected_s < 600


def test_image_size_follows_the_images_and_the_machine() -> None:
    sizes = {
        side: (
            choose_recipe(replace(DIGITS_LIKE, side=side), TWO_CORES).img_size,
            choose_recipe(replace(DIGITS_LIKE, side=side), GPU).img_size,
        )
        for side in (8, 28, 64, 150, 500)
    }
    assert sizes == {
        8: (32, 32),
        28: (32, 32),
        64: (64, 64),
        150: (64, 128),  # a CPU stops at 64 px
        500: (64, 224),  # photos at timm's size on a GPU
    }


def test_many_classes_get_a_wider_student_and_a_gpu_larger_models() -> None:
    narrow = choose_recipe(DIGITS_LIKE, TWO_CORES)
    wide = choose_recipe(replace(DIGITS_LIKE, classes=100), TWO_CORES)
    assert narrow.student == "test_efficientnet" and wide.student == "resnet10t"
    assert "100 classes" in wide.reasons["student"]
    photos = replace(DIGITS_LIKE, side=400, grayscale=False, train_images=7000, classes=37)
    cpu, gpu = choose_recipe(photos, TWO_CORES), choose_recipe(photos, GPU)
    assert gpu.teachers == ("resnet50", "resnet26d") and gpu.student == "resnet18"
    assert gpu.teacher_epochs > cpu.teacher_epochs and gpu.augment and not cpu.augment
    assert cpu.preset()["distill"]["teacher_cache"] and not gpu.preset()["distill"]["teacher_cache"]


def test_more_cores_expect_less_time() -> None:
    two, eight = choose_recipe(DIGITS_LIKE, Machine(2)), choose_recipe(DIGITS_LIKE, Machine(8))
    assert (two.teachers, two.teacher_epochs) == (eight.teachers, eight.teacher_epochs)
    assert eight.expected_s < two.expected_s


@pytest.mark.parametrize("machine", [TWO_CORES, GPU, Machine(2, "G" * 200)])
def test_the_printed_plan_fits_80_columns_and_says_why(machine: Machine) -> None:
    shape = replace(DIGITS_LIKE, dataset="wds/" + "x" * 150, classes=1000, train_images=10**6)
    lines = choose_recipe(shape, machine).lines()
    assert 4 <= len(lines) <= 8
    assert all(len(line) <= LINE_WIDTH for line in lines), lines
    text = "\n".join(lines)
    for what in ("image size", "teachers", "student", "expect about"):
        assert what in text


def test_the_written_recipe_reloads_as_a_preset_with_the_same_plan(tmp_path: Path) -> None:
    recipe = choose_recipe(replace(DIGITS_LIKE, data_dir=tmp_path / "data"), TWO_CORES)
    path = tmp_path / "run" / "recipe.yaml"
    assert write_recipe(recipe, path, overwrite=False)
    resolved = resolve_preset(str(path))
    assert [t.model for t in resolved.teachers] == list(recipe.teachers)
    for teacher in resolved.teachers:
        assert (teacher.epochs, teacher.img_size, teacher.augment) == (
            recipe.teacher_epochs,
            recipe.img_size,
            False,
        )
        assert teacher.data_dir == tmp_path / "data" and teacher.dataset == "imagefolder"
    student = resolved.distill
    assert student is not None and resolved.baseline
    assert (student.student, student.epochs, student.batch_size, student.img_size) == (
        recipe.student,
        recipe.student_epochs,
        32,
        recipe.img_size,
    )
    assert student.teacher_cache and not student.augment
    # the cross-entropy baseline trains as the student does: only the loss differs
    assert resolved.baseline_settings == {"augment": False}
    ce = baseline_config(student, {}, None, resolved.baseline_settings)
    assert (ce.model, ce.epochs, ce.batch_size, ce.augment) == (recipe.student, 4, 32, False)
    # the same plan again is kept (a rerun continues); another one needs --overwrite
    assert not write_recipe(recipe, path, overwrite=False)
    other = choose_recipe(replace(DIGITS_LIKE, train_images=400), TWO_CORES)
    with pytest.raises(UserError, match="--overwrite"):
        write_recipe(other, path, overwrite=False)
    assert write_recipe(other, path, overwrite=True)
    assert resolve_preset(str(path)).teachers[0].epochs == other.teacher_epochs


@pytest.mark.parametrize("value", ["{epochs: 3}", "{augment: 1}", "3"])
def test_a_baseline_mapping_takes_only_its_settings(tmp_path: Path, value: str) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text(f"dataset: digits\nbaseline: {value}\n")
    with pytest.raises(UserError, match="baseline"):
        resolve_preset(str(preset))


def test_the_shape_is_read_from_the_folder(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "pets", {"train": 12, "test": 2}, ("a", "b", "c"))
    shape = measure_shape("imagefolder", folder)
    # 36 images, of which a tenth is held out for validation
    assert (shape.train_images, shape.classes, shape.side, shape.grayscale) == (
        32,
        3,
        24,
        False,
    )


def test_a_folder_that_does_not_exist_is_one_line_before_any_work(tmp_path: Path) -> None:
    with working_dir(tmp_path):
        result = invoke_cli("pipeline", "-d", "imagefolder", "--data-dir", tmp_path / "nope")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "nope")
    assert not (tmp_path / "runs").exists()


def test_dataset_with_a_preset_of_another_dataset_is_refused(tmp_path: Path) -> None:
    with working_dir(tmp_path):
        result = invoke_cli("pipeline", "-d", "imagefolder", "--preset", "digits")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "'digits'", "imagefolder", "drop -d")
    assert not (tmp_path / "runs").exists()


def test_neither_dataset_nor_preset_names_both_ways() -> None:
    result = invoke_cli("pipeline")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "-d DATASET", "--preset")


def test_another_recipe_in_the_run_folder_is_not_overwritten(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "data", {"train": 10, "test": 2})
    recipe = tmp_path / "run" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("dataset: imagefolder\n# mine\n")
    result = invoke_cli(
        "pipeline", "-d", "imagefolder", "--data-dir", folder, "--run-dir", recipe.parent
    )
    assert result.exit_code == 2
    assert_error_line(result.stderr, "another recipe", "--overwrite")
    assert recipe.read_text() == "dataset: imagefolder\n# mine\n"
    assert sorted(p.name for p in recipe.parent.iterdir()) == ["recipe.yaml"]


# The end-to-end check: real handwritten digits written as PNG files, a folder no preset or
# recipe was tuned on, at a size no benchmark uses; the recipe alone must make distillation win.
E2E_SIZE, E2E_PER_CLASS = 20, 40


def write_digit_pngs(root: Path, size: int, per_class: int) -> Path:
    """The embedded digits as `root/{train,test}/<class>/<index>.png`, `per_class` training
    images of each class and every test image."""
    from PIL import Image

    from mlkd_cli.data.sources import load_digits

    raw = load_digits()
    for split, source in (("train", raw.train), ("test", raw.test)):
        kept: dict[int, int] = {}
        for index in range(len(source)):
            image, label = source[index]
            if split == "train" and kept.get(label, 0) >= per_class:
                continue
            kept[label] = kept.get(label, 0) + 1
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.convert("L").resize((size, size), Image.BICUBIC).save(folder / f"{index}.png")
    return root


@pytest.mark.slow
def test_pipeline_on_a_new_folder_with_no_other_flag_beats_cross_entropy(tmp_path: Path) -> None:
    folder = write_digit_pngs(tmp_path / "scans", E2E_SIZE, E2E_PER_CLASS)
    with working_dir(tmp_path):
        result = invoke_cli("pipeline", "-d", "imagefolder", "--data-dir", folder)
    assert result.exit_code == 0, result.stderr
    assert "expect about" in result.stderr and "recipe.yaml" in result.stderr
    run = tmp_path / "runs" / "scans"
    assert resolve_preset(str(run / "recipe.yaml")).distill is not None
    gain = json.loads((run / "results.json").read_text())["distillation_gain"]
    assert gain["student_top1"] > gain["baseline_top1"], gain
