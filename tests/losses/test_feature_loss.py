"""Feature distillation at the exits (`kd+feature`, `dkd+feature`), loss parameters
(`--loss-param`) and `--list-losses`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli.losses.feature import feature_term, matched_resolution
from mlkd_cli.losses.registry import LOSSES, build_loss
from mlkd_cli.models.exits import load_exits_checkpoint

TEACHER = ("-d", "digits", "-m", "test_resnet", "--img-size", "16")
STUDENT = ("--student", "test_resnet", "-e", "2", "-b", "64")


def _identity_adapter(channels: int) -> torch.nn.Conv2d:
    conv = torch.nn.Conv2d(channels, channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
    return conv


def test_the_feature_term_is_zero_when_features_match_through_an_identity_adapter() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(4, 8, 6, 6).relu()
    adapter = _identity_adapter(8)
    assert feature_term(adapter(teacher.clone()), teacher).item() == pytest.approx(0.0, abs=1e-7)
    # Off by 10 % everywhere: the relative error is 0.01, whatever the features' scale.
    for scale in (1.0, 50.0):
        t = teacher * scale
        assert feature_term(adapter(1.1 * t), t).item() == pytest.approx(0.01, rel=1e-4)


def test_a_finer_map_is_average_pooled_to_the_coarser_resolution() -> None:
    student, teacher = torch.arange(16.0).view(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)
    s, t = matched_resolution(student, teacher)
    assert s.shape == t.shape == (1, 1, 2, 2)
    assert s.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # means of the 2x2 blocks
    # The other way round: a teacher fed a larger input.
    s, t = matched_resolution(teacher, student)
    assert t.flatten().tolist() == [2.5, 4.5, 10.5, 12.5] and s is teacher


def test_feature_gradients_are_finite_in_bf16_autocast() -> None:
    torch.manual_seed(1)
    adapter = torch.nn.Conv2d(6, 8, 1, bias=False)
    student, teacher = torch.randn(4, 6, 8, 8), torch.randn(4, 8, 4, 4)
    loss = build_loss("kd+feature", 4.0, 1.0, [1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (term,) = loss.feature_terms([adapter(student)], [teacher.bfloat16()])
    term.backward()
    assert torch.isfinite(adapter.weight.grad).all() and adapter.weight.grad.abs().sum() > 0


def test_feature_weight_scales_each_exit_term_and_the_loss_sums_them() -> None:
    torch.manual_seed(2)
    heads = [torch.randn(5, 3) for _ in range(3)]
    teacher, targets = torch.randn(5, 3), torch.eye(3)[torch.tensor([0, 1, 2, 0, 1])]
    maps = [torch.randn(5, 4, 2, 2), torch.randn(5, 6, 1, 1)]
    teacher_maps = [torch.randn(5, 4, 2, 2), torch.randn(5, 6, 1, 1)]
    plain = build_loss("kd", 4.0, 0.9, [1.0, 1.0]).named(heads, teacher, targets)
    with_features = build_loss("kd+feature", 4.0, 0.9, [1.0, 1.0], {"feature_weight": 3.0})
    named = with_features.named(heads, teacher, targets, None, maps, teacher_maps)
    for i, (s, t) in enumerate(zip(maps, teacher_maps, strict=True), start=1):
        assert named[f"feat_exit{i}"].item() == pytest.approx(3.0 * feature_term(s, t).item())
    extra = named["feat_exit1"] + named["feat_exit2"]
    assert named["loss"].item() == pytest.approx((plain["loss"] + extra).item(), rel=1e-6)


def test_kd_feature_trains_with_a_single_teacher_and_logs_each_exit_term(
    digits_teacher: Path, tmp_path: Path
) -> None:
    result = invoke_cli(
        "distill", *TEACHER, "-c", digits_teacher, *STUDENT, "--loss", "kd+feature",
        "--loss-param", "feature_weight=2", "-n", "s", "--output-dir", tmp_path, "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = json.loads((tmp_path / "s_history.json").read_text())["epochs"]
    exits = sorted(k for k in rows[0] if k.startswith("exit") and k.endswith("_loss"))
    features = sorted(k for k in rows[0] if k.startswith("feat_exit"))
    assert len(exits) == 3 and features == ["feat_exit1", "feat_exit2", "feat_exit3"]
    for row in rows:  # α = 0.9 at the final head, each exit weighs 1, then the feature terms
        final = 0.9 * row["kd"] + 0.1 * row["ce"]
        total = final + sum(row[e] for e in exits) + sum(row[f] for f in features)
        assert row["train_loss"] == pytest.approx(total, rel=1e-5)
        assert all(row[f] > 0 for f in features)
    # The adapters are training-only: the student with exits loads as any other, the plain
    # student as a timm model.
    student = load_exits_checkpoint(tmp_path / "s_exits.pth").student
    assert len(student.exits) == 3
    plain = timm.create_model(
        "test_resnet", checkpoint_path=str(tmp_path / "s.pth"), num_classes=10
    )
    assert plain.num_classes == 10


def _two_teachers(digits_teacher: Path, folder: Path) -> Path:
    config = folder / "ensemble.json"
    config.write_text(
        json.dumps({"models": ["test_resnet"] * 2, "names": ["t", "t"], "weights": [1.0, 1.0]})
    )
    return config


def test_feature_losses_are_refused_before_any_work_with_what_they_cannot_match(
    digits_teacher: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=10).state_dict(), vit)
    ensemble = _two_teachers(digits_teacher, tmp_path)
    cases = [
        (
            ["--ensemble", ensemble, "--models-dir", digits_teacher.parent],
            "an ensemble of 2",
            "--loss dkd",
        ),
        (["-m", "test_vit", "-c", vit], "test_vit has no stages", "CNN teacher"),
        (
            ["-m", "test_resnet", "-c", digits_teacher, "--teacher-cache", "--no-augment"],
            "--teacher-cache keeps the teacher's logits only",
            "drop --teacher-cache",
        ),
        (["-m", "test_resnet", "-c", digits_teacher, "--exits", "none"], "--exits none", "exits"),
    ]
    for teacher, *fragments in cases:
        result = invoke_cli(
            "distill", "-d", "digits", "--img-size", "16", *teacher, *STUDENT,
            "--loss", "dkd+feature", "--output-dir", out,
        )  # fmt: skip
        assert result.exit_code == 2, (teacher, result.stderr)
        assert_error_line(result.stderr, *fragments)
    assert not out.exists()


def test_a_parameter_of_another_loss_is_refused_naming_its_owner(digits_teacher: Path) -> None:
    base = ("distill", *TEACHER, "-c", digits_teacher)
    result = invoke_cli(*base, "--loss", "kd", "--loss-param", "nckd_weight=4")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "nckd_weight", "kd takes no parameters", "dkd, dkd+feature")
    result = invoke_cli(*base, "--loss", "dist", "--loss-param", "tau=0")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--loss-param tau must be positive")
    result = invoke_cli(*base, "--loss", "dkd", "--loss-param", "nckd_weight")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "NAME=VALUE", "'nckd_weight'")


def test_loss_params_reach_the_loss_from_flags_and_presets(
    digits_teacher: Path, tmp_path: Path
) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("distill:\n  loss: dkd\n  loss_params: {nckd_weight: 0, tckd_weight: 2}\n")
    run = (*TEACHER, "-c", digits_teacher, *STUDENT, "-e", "1", "-q", "--output-dir", tmp_path)
    assert invoke_cli("distill", *run, "--preset", preset, "-n", "p").exit_code == 0
    (row,) = json.loads((tmp_path / "p_history.json").read_text())["epochs"]
    assert row["nckd"] == 0.0 and row["tckd"] > 0
    flag = invoke_cli("distill", *run, "--loss", "dkd", "--loss-param", "nckd_weight=0", "-n", "f")
    assert flag.exit_code == 0, flag.stderr
    (row,) = json.loads((tmp_path / "f_history.json").read_text())["epochs"]
    assert row["nckd"] == 0.0


def test_list_losses_names_every_loss_with_its_parameters() -> None:
    result = invoke_cli("distill", "--list-losses", "--json")
    assert result.exit_code == 0, result.stderr
    listed = {row["loss"]: row for row in json.loads(result.stdout)["losses"]}
    assert set(listed) == set(LOSSES)
    dkd = {"tckd_weight": 1.0, "nckd_weight": 8.0, "warmup": 20 / 240, "ce_weight": 1.0}
    assert listed["dkd"]["params"] == dkd
    assert listed["kd+feature"]["features"] and not listed["kd"]["features"]
    table = invoke_cli("distill", "--list-losses")
    assert all(name in table.stdout for name in LOSSES)
