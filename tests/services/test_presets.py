"""Shipped presets resolve to valid settings of every command they feed; flags win over them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import yaml
from conftest import assert_error_line

from mlkd_cli.core.errors import UserError
from mlkd_cli.engine.config import BatchPlan
from mlkd_cli.presets import available_presets, resolve_preset

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def test_the_four_recipes_ship() -> None:
    assert available_presets() == ["cifar-10", "cifar-100", "digits", "oxford-iiit"]


@pytest.mark.parametrize("name", ["cifar-10", "cifar-100", "digits", "oxford-iiit"])
def test_each_shipped_preset_resolves_to_valid_settings(name: str) -> None:
    resolved = resolve_preset(name)
    assert resolved.teachers and resolved.distill is not None
    for teacher in resolved.teachers:
        assert teacher.dataset == name and timm.is_model(teacher.model)
    distill = resolved.distill
    assert distill.dataset == name and timm.is_model(distill.student)
    names = [t.run_name for t in resolved.teachers]
    assert len(set(names)) == len(names) and distill.run_name not in names


def test_paper_recipes_hold_the_original_settings() -> None:
    resolved = resolve_preset("cifar-100")
    assert [t.model for t in resolved.teachers] == [
        "deit_small_distilled_patch16_224",
        "convnextv2_nano",
        "gmlp_s16_224",
        "hrnet_w18",
        "swinv2_cr_tiny_ns_224",
    ]
    assert all(t.pretrained and t.img_size == 224 for t in resolved.teachers)
    d = resolved.distill
    assert (d.student, d.temperature, d.alpha, d.mixup_alpha, d.cutmix_alpha) == (
        "resnetv2_50x1_bit",
        10.0,
        1.0,
        1.0,
        1.0,
    )
    assert (d.lr, d.weight_decay, d.effective_batch_size, d.img_size) == (1e-3, 1e-4, 128, 224)


def test_presets_show_prints_the_resolved_recipe(run_cli) -> None:
    result = run_cli("presets", "show", "cifar-100")
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["distill"]["student"] == "resnetv2_50x1_bit"
    assert shown["distill"]["temperature"] == 10.0
    assert [t["name"] for t in shown["teachers"]][0] == "e_deit"
    listed = json.loads(run_cli("presets", "list", "--json").stdout)
    assert [p["name"] for p in listed["presets"]] == available_presets()


def test_unknown_section_and_key_are_named(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("dataset: digits\nstudents:\n  - x\n")
    with pytest.raises(UserError, match=r"unknown section 'students'"):
        resolve_preset(str(path))
    path.write_text("dataset: digits\ndistill:\n  temprature: 3\n")
    with pytest.raises(UserError, match=rf"{path}: unknown key 'temprature'"):
        resolve_preset(str(path))


@pytest.mark.slow
def test_a_flag_overrides_the_preset(run_cli, tmp_path: Path) -> None:
    result = run_cli(
        "teacher", "train", "--preset", "digits", "--model", "test_resnet", "--epochs", "1",
        "--img-size", "16", "--output-dir", tmp_path, "--json", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == "test_resnet" and summary["epochs"] == 1  # preset: resnet10t, 50
    config = json.loads((tmp_path / "digits_test_resnet_history.json").read_text())["config"]
    assert config["lr"] == 0.002 and config["batch_size"] == 32  # the rest from the preset
    assert config["label_fraction"] == 0.1  # a top-level key: every stage takes it


@pytest.mark.parametrize("name", ["cifar-10", "cifar-100", "digits", "oxford-iiit"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_every_shipped_preset_runs_at_any_world_size(name: str, world_size: int) -> None:
    resolved = resolve_preset(name)
    for cfg in [*resolved.teachers, resolved.distill]:
        cfg = replace(cfg, world_size=world_size)
        cfg.validate()  # never refused
        plan = cfg.batch_plan(world_size)
        assert plan.per_process <= cfg.batch_size and plan.world_size == world_size
        if cfg.effective_batch_size is not None:
            # The asked-for images per step, or the next multiple of the processes above it.
            target = cfg.effective_batch_size
            assert target <= plan.global_batch < target + world_size * plan.accumulation


@pytest.mark.parametrize(
    ("target", "batch", "world", "expected"),
    [
        (128, 64, 1, (64, 2, 128)),  # accumulation, as before
        (128, 64, 2, (64, 1, 128)),
        (128, 64, 4, (32, 1, 128)),  # one pass was 256 images: the per-process batch shrinks
        (128, 64, 8, (16, 1, 128)),
        (128, 64, 3, (43, 1, 129)),  # not a multiple of 3: the next multiple above
        (100, 16, 2, (13, 4, 104)),
    ],
)
def test_batch_plan_reaches_the_effective_batch(
    target: int, batch: int, world: int, expected: tuple[int, int, int]
) -> None:
    plan = BatchPlan.for_target(target, batch, world)
    assert (plan.per_process, plan.accumulation, plan.global_batch) == expected
    with pytest.raises(UserError, match="smaller than the 4 processes"):
        BatchPlan.for_target(3, batch, 4)


def test_pipeline_refuses_a_bad_late_stage_before_any_teacher_trains(
    run_cli, tmp_path: Path
) -> None:
    recipe = yaml.safe_load((PRESETS / "digits.yaml").read_text())
    recipe["distill"]["effective_batch_size"] = 1  # fewer images a step than processes
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    result = run_cli("pipeline", "--preset", preset, "--run-dir", run_dir, "--world-size", "2")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--effective-batch-size 1", "2 processes")
    assert not (run_dir / "models").exists()  # no teacher started


@pytest.fixture
def planned(monkeypatch) -> list:
    """The configs the training commands plan, caught before any work: each plan is refused."""
    seen: list = []

    def refuse(config, *args, **kwargs):
        seen.append(config)
        raise UserError("planned, not run")

    monkeypatch.setattr("mlkd_cli.engine.teacher.plan_teacher_training", refuse)
    monkeypatch.setattr("mlkd_cli.engine.distiller.plan_distillation", refuse)
    return seen


def test_flags_win_over_the_preset_and_the_preset_over_the_defaults(run_cli, planned) -> None:
    # what the slow test above holds after a run, read from the planned config before any work
    result = run_cli(
        "teacher", "train", "--preset", "digits", "--model", "test_resnet", "--epochs", "1",
        "--vflip", "0.25", "--quiet",
    )  # fmt: skip
    assert_error_line(result.stderr, "planned, not run")
    (config,) = planned
    assert (config.model, config.epochs, config.vflip) == ("test_resnet", 1, 0.25)  # flags
    assert config.lr == 0.002 and config.batch_size == 32  # the preset's teacher section
    assert config.label_fraction == 0.1 and config.dataset == "digits"  # its top level
    assert config.hflip is None and config.seed == 0  # the class defaults
    assert config.output.quiet and not config.output.json and not config.resume


def test_distill_flags_reach_their_settings_under_their_own_names(run_cli, planned) -> None:
    result = run_cli(
        "distill", "--preset", "digits", "-m", "test_resnet", "-c", "t.pth", "--alpha", "0.5",
        "--loss", "dkd", "--loss-param", "nckd_weight=4", "--device", "cpu", "--overwrite",
    )  # fmt: skip
    assert_error_line(result.stderr, "planned, not run")
    (config,) = planned
    # -m and -c name the teacher; --device arrives as the plain string configs hold
    assert config.teacher_model == "test_resnet" and config.teacher_checkpoint == Path("t.pth")
    assert config.device == "cpu" and type(config.device) is str
    assert (config.alpha, config.loss, config.loss_params) == (0.5, "dkd", {"nckd_weight": 4.0})
    assert config.temperature == 4.0 and config.student == "test_convnext"  # the preset's
    assert config.epochs == 15 and config.teacher_cache and not config.augment
    assert config.overwrite and not config.resume
    assert "alpha" not in config.recipe_filled and "schedule" in config.recipe_filled
