"""`mlkd study`: its statistics by hand, its runs as `mlkd eval` sees them, resume, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import assert_error_line, invoke_cli

from mlkd_cli.engine import loop
from mlkd_cli.models.teacher import TeacherEnsemble
from mlkd_cli.study import paired, summarise, t_quantile

STUDY = ("study", "-d", "digits", "--student", "test_resnet", "--img-size", "16", "-b", "64")


@pytest.fixture
def store(digits_teacher: Path, tmp_path: Path) -> Path:
    """A soft-label store of the digits teacher (2 views), for studies that share it."""
    folder = tmp_path / "store"
    labelled = invoke_cli(
        "teacher", "label", "-d", "digits", "--img-size", "16", "-m", "test_resnet",
        "-c", digits_teacher, "--views", "2", "--output", folder, "-q",
    )  # fmt: skip
    assert labelled.exit_code == 0, labelled.stderr
    return folder


def test_the_paired_interval_is_the_t_interval_by_hand() -> None:
    got = paired([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 dof) = 4.303
    half = 4.303 / math.sqrt(3)
    assert got["mean"] == 2.0 and got["wins"] == 3
    assert got["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert t_quantile(1) == 12.706 and t_quantile(4) == 2.776 and t_quantile(200) == 1.96
    assert paired([0.5, -0.5])["wins"] == 1


def test_each_arm_is_compared_with_ce_and_kd_seed_by_seed() -> None:
    results = {
        "ce": {0: {"top1": 90.0, "nll": 0.4}, 1: {"top1": 92.0, "nll": 0.3}},
        "kd": {0: {"top1": 93.0, "nll": 0.2}, 1: {"top1": 94.0, "nll": 0.25}},
        "dkd": {0: {"top1": 91.0, "nll": 0.3}, 1: {"top1": 95.0, "nll": 0.2}},
    }
    rows = {r["arm"]: r for r in summarise(results, (0, 1))}
    assert rows["kd"]["vs_ce"]["per_seed"] == [3.0, 2.0]
    assert rows["dkd"]["vs_kd"]["per_seed"] == [-2.0, 1.0]
    assert rows["dkd"]["nll_vs_ce"]["per_seed"] == pytest.approx([-0.1, -0.1])
    assert rows["dkd"]["nll_vs_ce"]["wins"] == 2 and rows["dkd"]["vs_kd"]["wins"] == 1
    assert rows["ce"]["top1"] == {
        "mean": 91.0,
        "sd": pytest.approx(math.sqrt(2)),
        "per_seed": [90.0, 92.0],
    }
    assert "vs_ce" not in rows["ce"] and "vs_kd" not in rows["kd"]


def test_a_study_continues_where_it_stopped_and_prints_what_eval_measures(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arms share one soft-label store (no teacher runs in any of them)."""
    run_dir = tmp_path / "study"
    args = (*STUDY, "--soft-labels", store, "-e", "1", "--losses", "kd,dkd",
            "--seeds", "0,1", "--run-dir", run_dir, "--json", "-q")  # fmt: skip

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher ran in a study from a store")

    monkeypatch.setattr(TeacherEnsemble, "forward", no_teacher)
    real, calls = loop.train_one_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # ce_s0, ce_s1 and kd_s0 done; Ctrl-C in kd_s1
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    assert invoke_cli(*args).exit_code == 130
    monkeypatch.setattr(loop, "train_one_epoch", real)
    done = invoke_cli(*args)
    assert done.exit_code == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["arms"] == ["ce", "kd", "dkd"]
    assert summary["stages"] == {
        "ce_s0": "skipped", "ce_s1": "skipped", "kd_s0": "skipped",
        "kd_s1": "trained", "dkd_s0": "trained", "dkd_s1": "trained",
    }  # fmt: skip
    rows = {r["arm"]: r for r in summary["rows"]}
    for arm, row in rows.items():
        for seed, top1, nll in zip(
            (0, 1), row["top1"]["per_seed"], row["nll"]["per_seed"], strict=True
        ):
            path = run_dir / "models" / f"{arm}_s{seed}.pth"
            evaluated = json.loads(invoke_cli("eval", path, "--json", "-q").stdout)
            assert (evaluated["top1"], evaluated["nll"]) == (top1, nll)
    kd, ce = rows["kd"]["top1"]["per_seed"], rows["ce"]["top1"]["per_seed"]
    expected = [k - c for k, c in zip(kd, ce, strict=True)]
    assert rows["kd"]["vs_ce"]["per_seed"] == pytest.approx(expected)
    assert (run_dir / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "study.json").read_text())["rows"] == summary["rows"]
    table = invoke_cli(*args[:-2], "-q")  # all skipped: the table again, the same numbers
    assert table.exit_code == 0 and f"{rows['dkd']['top1']['mean']:.2f}" in table.stdout


def test_study_refusals_are_one_line_before_any_run(
    digits_teacher: Path, store: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "study"
    teacher = ("-m", "test_resnet", "-c", digits_teacher, "--run-dir", run_dir)
    cases = [
        (["--losses", "kd,l2"], "--losses", "kd, dkd, dist"),
        (["--seeds", "0"], "--seeds", "two or more"),
    ]
    for extra, *fragments in cases:
        result = invoke_cli(*STUDY, *teacher, *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert_error_line(result.stderr, *fragments)
    config = tmp_path / "ensemble.json"
    config.write_text(json.dumps({"models": ["test_resnet"] * 2, "names": ["t", "t"]}))
    result = invoke_cli(
        *STUDY, "--ensemble", config, "--models-dir", digits_teacher.parent,
        "--losses", "kd,kd+feature", "--run-dir", run_dir,
    )  # fmt: skip
    assert result.exit_code == 2
    assert_error_line(result.stderr, "study arm kd+feature", "an ensemble of 2")
    from_store = invoke_cli(*STUDY, "--soft-labels", store, "--losses", "kd,kd+feature",
                            "--run-dir", run_dir)  # fmt: skip
    assert from_store.exit_code == 2
    assert_error_line(from_store.stderr, "study arm kd+feature", "needs the teacher's features")
    assert not run_dir.exists()
