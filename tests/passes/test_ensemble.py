"""Ensemble files, the teacher module, weight fitting, and `mlkd ensemble` end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line
from conftest import invoke_cli as _cli

from mlkd_cli.core.checkpoint import ModelCard, save_model
from mlkd_cli.core.errors import UserError
from mlkd_cli.data import sources
from mlkd_cli.models.ensemble_config import read_ensemble_config, write_ensemble_config
from mlkd_cli.models.teacher import InputAdapter, InputSpec, TeacherEnsemble
from mlkd_cli.passes.ensemble import fit_ensemble_weights

ORIGINAL_EXAMPLE = """{
    "models": ["deit_small_distilled_patch16_224", "convnextv2_nano", "gmlp_s16_224", "hrnet_w18", "swinv2_cr_tiny_ns_224"],
    "names": ["oxford_deit", "e_convnext", "e_gmlp", "e_hrnet", "e_swin"],
    "weights": [0.9736, 1.0213, 0.9505, 0.9710, 0.9423]
}
"""  # noqa: E501  (verbatim from the original project's README)


def test_original_readme_config_parses_and_resolves(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(ORIGINAL_EXAMPLE)
    config = read_ensemble_config(path)
    names = ["oxford_deit", "e_convnext", "e_gmlp", "e_hrnet", "e_swin"]
    assert [m.checkpoint for m in config.members] == [
        tmp_path / "models" / f"{n}.pth" for n in names
    ]
    assert [m.model for m in config.members][0] == "deit_small_distilled_patch16_224"
    assert config.weights == [0.9736, 1.0213, 0.9505, 0.9710, 0.9423]
    other = read_ensemble_config(path, models_dir=tmp_path / "elsewhere")
    assert other.members[0].checkpoint == tmp_path / "elsewhere" / "oxford_deit.pth"


def test_explicit_yaml_form_resolves_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "ens").mkdir()
    path = tmp_path / "ens" / "teacher.yaml"
    path.write_text(
        "members:\n  - checkpoint: ../models/a.pth\n  - checkpoint: /abs/b.pth\n"
        "    model: resnet10t\ntemperature: 2.0\n"
    )
    config = read_ensemble_config(path)
    assert config.members[0].checkpoint == tmp_path / "ens" / "../models/a.pth"
    assert config.members[1].checkpoint == Path("/abs/b.pth")
    assert config.weights == [1.0, 1.0] and not config.has_weights
    assert config.temperature == 2.0
    write_ensemble_config(config.with_fit([0.5, 1.5], 1.25), path)
    again = read_ensemble_config(path)
    assert again.weights == [0.5, 1.5] and again.temperature == 1.25
    assert again.members[1].model == "resnet10t"


def test_original_form_round_trips_in_its_own_layout(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"models": ["a", "b"], "names": ["x", "y"]}')
    config = read_ensemble_config(path)
    write_ensemble_config(config.with_fit([2.0, 0.5], 1.0), path)
    content = json.loads(path.read_text())
    assert content == {"models": ["a", "b"], "names": ["x", "y"], "weights": [2.0, 0.5]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"models": ["a", "b"], "names": ["x"]}', "same length"),
        ('{"models": ["a"], "names": ["x"], "weights": [NaN]}', "not a finite number"),
        ('{"models": ["a"], "names": ["x"], "weights": ["heavy"]}', "must be a number"),
        ('{"members": [{"model": "a"}]}', "needs a 'checkpoint'"),
        ('{"teachers": []}', "neither 'members' nor"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_files_are_user_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_ensemble_config(path)


def test_fit_prefers_the_informative_member() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (400,))
    good = 4.0 * torch.nn.functional.one_hot(labels, 5).float() + 3.0 * torch.randn(400, 5)
    noise = 2.0 * torch.randn(400, 5)
    fit = fit_ensemble_weights(torch.stack([good, noise]), labels)
    assert fit.weights[0] > fit.weights[1]
    assert sum(fit.weights) == pytest.approx(2.0)  # a mixture: mean weight 1
    assert fit.fitted_nll <= fit.equal_nll and fit.temperature is None
    tempered = fit_ensemble_weights(torch.stack([good, noise]), labels, fit_temperature=True)
    assert sum(tempered.weights) == pytest.approx(2.0)
    assert tempered.temperature is not None and tempered.temperature > 0
    assert tempered.fitted_nll <= fit.fitted_nll + 1e-9


def test_fit_stays_finite_on_a_perfectly_separated_split() -> None:
    labels = torch.arange(50) % 5
    perfect = 3.0 * torch.nn.functional.one_hot(labels, 5).float()
    fit = fit_ensemble_weights(torch.stack([perfect, perfect]), labels, fit_temperature=True)
    assert max(fit.weights) <= 2.0
    # Sharpening helps here, but the prior keeps the temperature from collapsing to zero.
    assert 0.05 < fit.temperature < 1.0


def test_teacher_ensemble_combines_as_the_original_and_stays_frozen() -> None:
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)) for _ in range(2)]
    teacher = TeacherEnsemble(members, [0.5, 2.0])
    images = torch.randn(4, 3, 2, 2)
    separate = teacher.member_logits(images)
    assert separate.shape == (2, 4, 3)
    expected = (0.5 * members[0](images) + 2.0 * members[1](images)) / 2
    assert torch.allclose(teacher(images), expected, atol=1e-6)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.members)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert "weights" in dict(teacher.named_buffers())
    # Its output feeds a student's loss like any tensor.
    student = torch.zeros(4, 3, requires_grad=True)
    target = torch.softmax(teacher(images), dim=1)
    torch.nn.functional.kl_div(student.log_softmax(1), target, reduction="batchmean").backward()
    assert student.grad is not None


def test_input_adapter_renormalises_and_resizes() -> None:
    source = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    target = InputSpec(4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = torch.rand(2, 3, 8, 8)
    prepared = (pixels - 0.5) / 0.5
    adapted = InputAdapter(source, InputSpec(8, target.mean, target.std))(prepared)
    mean, std = (
        torch.tensor(target.mean).view(1, 3, 1, 1),
        torch.tensor(target.std).view(1, 3, 1, 1),
    )
    assert torch.allclose(adapted, (pixels - mean) / std, atol=1e-5)
    assert InputAdapter(source, target)(prepared).shape == (2, 3, 4, 4)
    same = InputAdapter(source, source)
    assert torch.equal(same(prepared), prepared)


# ----------------------------------------------------------------------------- end to end

FAST = ("--dataset", "digits", "--img-size", "16", "--batch-size", "32", "--quiet")


@pytest.fixture(scope="module")
def trained_members(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/good.pth (resnet10t, 4 epochs) and models/bad.pth (test_resnet, barely trained)."""
    folder = tmp_path_factory.mktemp("members")
    for args in (
        ("--model", "resnet10t", "--name", "good", "--epochs", "4"),
        ("--model", "test_resnet", "--name", "bad", "--epochs", "1", "--lr", "1e-6"),
    ):
        result = _cli("teacher", "train", *FAST, *args, "--output-dir", folder / "models")
        assert result.exit_code == 0, result.stderr
    return folder


def _project(trained: Path, tmp_path: Path, config: dict) -> Path:
    shutil.copytree(trained / "models", tmp_path / "models")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


GOOD_BAD = {"models": ["resnet10t", "test_resnet"], "names": ["good", "bad"]}


@pytest.mark.slow
def test_bare_build_fits_and_rewrites_config(
    trained_members: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_project(trained_members, tmp_path, GOOD_BAD))
    result = _cli("ensemble", "build")
    assert result.exit_code == 0, result.stderr
    assert (
        "good" in result.stdout and "fitted" in result.stdout and "equal weights" in result.stdout
    )
    written = json.loads(Path("config.json").read_text())
    assert written["names"] == ["good", "bad"]
    good, bad = written["weights"]
    assert good > bad
    # fp32 here: the build's logits and the later evaluation must be the same arithmetic
    report = json.loads(_cli("ensemble", "build", "--json", "--precision", "fp32").stdout)
    assert report["fitted_nll"] <= report["equal_nll"]
    assert report["split"] == "val" and report["images"] == 144
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["fitted"]["nll"] == pytest.approx(report["fitted_nll"], rel=1e-6)
    assert rows["equal weights"]["nll"] == pytest.approx(report["equal_nll"], rel=1e-6)
    assert rows["good"]["top1"] > rows["bad"]["top1"]
    # What was written is what was fitted: evaluating the file on val gives the fitted NLL.
    evaluated = json.loads(_cli("ensemble", "eval", "--json", "--precision", "fp32").stdout)
    file_row = next(r for r in evaluated["rows"] if r["name"] == "file weights")
    assert file_row["nll"] == pytest.approx(report["fitted_nll"], rel=1e-5)


@pytest.mark.slow
def test_refit_without_temperature_resets_a_stale_one(
    trained_members: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_project(trained_members, tmp_path, {**GOOD_BAD, "temperature": 0.25}))
    report = json.loads(_cli("ensemble", "build", "--json", "--precision", "fp32").stdout)
    assert json.loads(Path("config.json").read_text())["temperature"] == 1.0
    evaluated = json.loads(_cli("ensemble", "eval", "--json", "--precision", "fp32").stdout)
    file_row = next(r for r in evaluated["rows"] if r["name"] == "file weights")
    assert file_row["nll"] == pytest.approx(report["fitted_nll"], rel=1e-5)
    tempered = json.loads(_cli("ensemble", "build", "--json", "--fit-temperature").stdout)
    written = json.loads(Path("config.json").read_text())
    assert written["temperature"] == pytest.approx(tempered["temperature"], rel=1e-5)
    assert sum(written["weights"]) == pytest.approx(2.0, abs=1e-5)


class _Untouchable:
    """A split that fails the test if anything reads it."""

    def __init__(self, wrapped) -> None:
        self.targets = wrapped.targets
        self._length = len(wrapped)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        raise AssertionError("the test split was read")


@pytest.mark.slow
def test_fitting_never_reads_the_test_split(
    trained_members: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_project(trained_members, tmp_path, GOOD_BAD))
    real = sources.load_digits

    def guarded():
        raw = real()
        raw.test = _Untouchable(raw.test)
        return raw

    monkeypatch.setattr(sources, "load_digits", guarded)
    assert _cli("ensemble", "build", "-q").exit_code == 0
    with pytest.raises(AssertionError, match="test split was read"):
        _cli("ensemble", "eval", "--split", "test", "-q")


@pytest.mark.slow
def test_two_processes_fit_the_same_weights(
    trained_members: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_project(trained_members, tmp_path, GOOD_BAD))
    one = json.loads(_cli("ensemble", "build", "--json", "-o", "one.json").stdout)
    two = json.loads(
        _cli("ensemble", "build", "--json", "-o", "two.json", "--world-size", "2").stdout
    )
    assert two["images"] == one["images"]
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-4)
    assert json.loads(Path("config.json").read_text()) == GOOD_BAD  # --output left it alone


def _wrong_classes(folder: Path) -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    card = ModelCard("test_resnet", 3, ["a", "b", "c"], "digits", 16, 1.0, [0.5] * 3, [0.5] * 3)
    save_model(folder / "models" / "three.pth", model, card, 1, {})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"models": ["resnet10t"], "names": ["good", "bad"]}, "same length"),
        ({"models": ["resnet10t"], "names": ["missing"]}, "missing.pth does not exist"),
        ({"models": ["test_resnet"], "names": ["three"]}, "3 classes"),
        (
            {
                "models": ["resnet10t", "test_resnet"],
                "names": ["good", "bad"],
                "weights": [1.0, math.nan],
            },
            "not a finite number",
        ),
        ({"models": ["resnet10tt"], "names": ["good"]}, "unknown model 'resnet10tt'"),
        ({"models": ["test_resnet"], "names": ["good"]}, "holds a resnet10t"),
    ],
)
def test_bad_configs_are_one_line_and_leave_the_file(
    trained_members: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: dict,
    message: str,
) -> None:
    monkeypatch.chdir(_project(trained_members, tmp_path, config))
    _wrong_classes(tmp_path)
    before = Path("config.json").read_bytes()
    result = _cli("ensemble", "build")
    assert result.exit_code == 2, result.stdout
    assert_error_line(result.stderr, message)
    assert Path("config.json").read_bytes() == before


def test_missing_default_config_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _cli("ensemble", "build")
    assert result.exit_code == 2
    assert "no ensemble file config.json" in result.stderr
