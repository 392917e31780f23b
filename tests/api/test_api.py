"""`mlkd_cli.api`: the README's example runs as typed, a mistake raises the line the CLI prints,
any config field is a keyword argument, and importing the API stays light and silent."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_error_line, invoke_cli, working_dir

from mlkd_cli import api
from mlkd_cli.core.errors import UserError
from mlkd_cli.engine.config import DistillConfig, TeacherTrainConfig

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## From Python"


def readme_example() -> str:
    """The first Python code block of the README's "From Python" section, as typed there."""
    text = README.read_text().partition(SECTION)[2]
    assert text, f"README.md has no {SECTION!r} section"
    block = re.search(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert block is not None, f"no python block under {SECTION!r}"
    return block.group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_typed(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    names: dict = {"__name__": "readme_example"}
    with working_dir(tmp_path):
        exec(compile(readme_example(), "README.md", "exec"), names)  # noqa: S102
        out, err = capfd.readouterr()
        _check_example(names, out, err)


def _check_example(names: dict, out: str, err: str) -> None:
    teacher, student = names["teacher"], names["student"]
    chosen, test, prediction = names["chosen"], names["test"], names["prediction"]
    # The runs' results are objects holding the files they wrote and their figures.
    assert isinstance(teacher, api.TrainingResult) and isinstance(student, api.DistillResult)
    assert teacher.files.best == Path("models/t.pth") and teacher.files.best.is_file()
    assert student.files.exits.is_file() and student.files.exits.name == "s_exits.pth"
    assert teacher.best_epoch == 1 and [row["epoch"] for row in teacher.history()] == [1]
    assert 0 <= student.val_top1 <= 100 and len(student.exit_top1) == len(student.exits) == 3
    assert student.record["teacher"] == [str(teacher.files.best)]  # it learnt from that teacher
    # evaluate: the thresholds chosen on val were written into the checkpoint and loaded back.
    assert chosen.split == "val" and chosen.chosen["rule"] in ("max_softmax", "margin", "entropy")
    classifier = names["classifier"]
    assert list(classifier.thresholds) == pytest.approx(chosen.chosen["values"])
    assert test.split == "test" and test.images == 359 and 0 <= test.top1 <= 100
    # The classifier names each prediction with the card's class name of its index.
    assert len(prediction.names) == 8
    assert list(prediction.names) == [classifier.class_names[i] for i in prediction.labels]
    assert set(classifier.class_names) == {str(i) for i in range(10)}
    # Nothing printed but what the example prints itself (no progress, no tables).
    assert err == "" and len(out.splitlines()) == 3, (out, err)


# Each: the API call, and the command line that makes the same mistake.
MISTAKES = {
    "epochs": (
        lambda: api.train_teacher(dataset="digits", model="test_resnet", epochs=0),
        ("teacher", "train", "-d", "digits", "-m", "test_resnet", "-e", "0"),
    ),
    "lr": (
        lambda: api.distill(dataset="digits", student="test_resnet", lr=-1.0),
        ("distill", "-d", "digits", "--student", "test_resnet", "--lr", "-1"),
    ),
    "preset": (
        lambda: api.train_teacher(preset="no-such-preset", model="test_resnet"),
        ("teacher", "train", "--preset", "no-such-preset", "-m", "test_resnet"),
    ),
    "int8-target": (
        lambda: api.export("t.pth", int8_target="avx2"),
        ("export", "t.pth", "--int8-target", "avx2"),
    ),
    "batch-size": (
        lambda: api.evaluate("t.pth", batch_size=0),
        ("eval", "t.pth", "--batch-size", "0"),
    ),
    "views": (
        lambda: api.label(output="store", dataset="digits", views=0),
        ("teacher", "label", "-o", "store", "-d", "digits", "--views", "0"),
    ),
    "in-place": (
        lambda: api.build_ensemble("e.json", output="out.json", in_place=True),
        ("ensemble", "build", "e.json", "--output", "out.json", "--in-place"),
    ),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_raises_the_line_the_command_prints(case: str, tmp_path: Path) -> None:
    call, argv = MISTAKES[case]
    with working_dir(tmp_path):
        with pytest.raises(UserError) as raised:
            call()
        result = invoke_cli(*argv)
    assert result.exit_code == 2
    assert assert_error_line(result.stderr) == f"mlkd: error: {raised.value}"
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_an_unknown_setting_names_the_nearest_ones() -> None:
    with pytest.raises(UserError, match=r"unknown setting 'epoch'.*e\.g\. epochs"):
        api.train_teacher(dataset="digits", model="test_resnet", epoch=1)
    with pytest.raises(UserError, match="a config or settings"):
        api.distill(DistillConfig(dataset="digits"), epochs=1)


@dataclass(kw_only=True)
class _WithNewKnob(TeacherTrainConfig):
    """A config with a setting the API was not written for."""

    new_knob: float = 0.0


def test_a_setting_added_to_a_config_is_a_keyword_with_no_edit() -> None:
    cfg = api.training_config(
        _WithNewKnob, "teacher", "digits", {"new_knob": 0.5, "model": "test_resnet"}, False
    )
    # the new setting given, the preset's own under it, and output quiet (progress=False)
    assert cfg.new_knob == 0.5 and cfg.model == "test_resnet" and cfg.dataset == "digits"
    assert cfg.output.quiet and not cfg.output.json
    loud = api.training_config(_WithNewKnob, "teacher", None, {"dataset": "d", "model": "m"}, True)
    assert loud.new_knob == 0.0 and not loud.output.quiet
    with pytest.raises(UserError, match="new_knob must be float"):
        api.training_config(
            _WithNewKnob, "teacher", None, {"dataset": "d", "model": "m", "new_knob": "x"}, False
        )


def test_importing_the_api_loads_no_torch_and_prints_nothing() -> None:
    code = (
        "import sys\nfrom mlkd_cli import api\n"
        "print([m for m in ('torch', 'timm', 'torchvision', 'numpy') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout == "[]\n" and done.stderr == ""
