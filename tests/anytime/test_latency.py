"""`mlkd eval --latency` in onnxruntime: the staged cascade's rows (fp32 and int8) beside the plain
and one-graph ones when `mlkd export` wrote them, one line with the export command for each form
not found, and the staged cascade's work counted from what its segments ran. No figure of speed
is asserted (timing depends on the machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CountedSession, assert_error_line, invoke_cli

from mlkd_cli.anytime import timing
from mlkd_cli.anytime.rules import exit_confidence
from mlkd_cli.models.exits import load_exits_checkpoint

pytest.importorskip("onnxruntime")

ROW_KEYS = {"runtime", "model", "batch", "images_per_s", "p50_ms", "p95_ms", "macs_pct"}


@pytest.fixture(scope="module")
def exported(staged_export: Path) -> Path:
    """An untrained 32 px test_convnext digits student with exits after `mlkd export
    s_exits.pth --format onnx` (s_exits.onnx and s_exits_staged/), read-only: conftest's."""
    return staged_export


def _copy(exported: Path, folder: Path, *names: str) -> Path:
    """The checkpoint and the named exports beside it in `folder`; its path."""
    for name in ("s_exits.pth", *names):
        source = exported / name
        if source.is_dir():
            shutil.copytree(source, folder / name)
        else:
            shutil.copy(source, folder / name)
    return folder / "s_exits.pth"


def test_each_onnx_form_not_found_is_one_line_naming_the_export_that_writes_it(
    exported: Path, tmp_path: Path
) -> None:
    bare = _copy(exported, tmp_path)
    sources = timing.latency_sources(bare)
    assert sources.found == ()
    plain_pth = str(tmp_path / "s.pth")
    # One line for each kind: --int8 writes fp32 and int8 alike.
    assert list(sources.missing) == [
        "no plain fp32 and int8 rows: s.onnx, s.int8.onnx not found; mlkd export "
        f"{plain_pth} --format onnx --int8",
        "no staged fp32 and int8 rows: s_exits_staged/, s_exits.int8_staged/ not found; "
        f"mlkd export {bare} --format onnx --int8",
    ]
    # With the fp32 export there, the int8 one must replace it: the command says --overwrite.
    shutil.copy(exported / "s_exits.onnx", tmp_path / "s_exits.onnx")
    shutil.copytree(exported / "s_exits_staged", tmp_path / "s_exits_staged")
    sources = timing.latency_sources(bare)
    assert [(r, m, p.name) for r, m, p in sources.found] == [
        ("onnxruntime fp32", "one-graph cascade", "s_exits.onnx"),
        ("onnxruntime fp32", "staged cascade", "s_exits_staged"),
    ]
    assert list(sources.missing) == [
        sources.missing[0],
        f"no staged int8 row: s_exits.int8_staged/ not found; mlkd export {bare} --format onnx "
        "--int8 --overwrite",
    ]
    # An export from before the staged folders (the one-graph file alone): replacing it needs
    # --overwrite too.
    shutil.rmtree(tmp_path / "s_exits_staged")
    assert timing.latency_sources(bare).missing[-1] == (
        "no staged fp32 and int8 rows: s_exits_staged/, s_exits.int8_staged/ not found; "
        f"mlkd export {bare} --format onnx --int8 --overwrite"
    )


def test_eval_latency_has_the_staged_rows_and_says_what_is_missing(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timing, "ROUNDS", 1)
    monkeypatch.setattr(timing, "SINGLE_IMAGES", 4)
    checkpoint = _copy(exported, tmp_path, "s_exits.onnx", "s_exits_staged")
    # The int8 staged folder is found by its name; a copy of the fp32 one stands in for it (the
    # rows do not depend on what its segments compute, and quantizing takes a validation pass).
    shutil.copytree(exported / "s_exits_staged", tmp_path / "s_exits.int8_staged")
    # Thresholds every image meets under any arithmetic: all leave at the first exit.
    timed = invoke_cli("eval", checkpoint, "--latency", "--thresholds", "1e-6,1e-6,1e-6",
                       "--timing-images", "16", "-b", "8", "--json", "-q")  # fmt: skip
    assert timed.exit_code == 0, timed.stderr
    result = json.loads(timed.stdout)
    rows = {(r["runtime"], r["model"], r["batch"]): r for r in result["latency"]}
    assert set(rows) == {
        (runtime, model, batch)
        for batch in (1, 8)
        for runtime, model in [
            ("pytorch", "plain"), ("pytorch", "cascade"),
            ("onnxruntime fp32", "one-graph cascade"), ("onnxruntime fp32", "staged cascade"),
            ("onnxruntime int8", "staged cascade"),
        ]
    }  # fmt: skip
    assert all(set(r) == ROW_KEYS for r in rows.values())
    assert all(r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows.values())
    macs = load_exits_checkpoint(checkpoint).exits["macs"]
    first, every = (
        100 * macs["cascade"][0] / macs["plain"],
        100 * macs["cascade"][-1] / macs["plain"],
    )
    for (runtime, model, _), row in rows.items():
        want = {"plain": 100.0, "one-graph cascade": every}.get(model, first)
        assert row["macs_pct"] == pytest.approx(want), (runtime, model)
    assert [line.split(";")[0] for line in result["latency_missing"]] == [
        "no plain fp32 and int8 rows: s.onnx, s.int8.onnx not found"
    ]


def test_a_damaged_staged_manifest_is_refused_before_any_work(
    exported: Path, tmp_path: Path
) -> None:
    checkpoint = _copy(exported, tmp_path, "s_exits_staged")
    (tmp_path / "s_exits_staged" / "manifest.json").write_text('{"format": "other"}')
    refused = invoke_cli("eval", checkpoint, "--latency", "--thresholds", "0.5,0.5,0.5")
    assert refused.exit_code == 2
    assert_error_line(refused.stderr, "is not a staged export written by mlkd export")


def test_each_segment_runs_on_the_images_still_in_and_the_work_counts_them(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = []

    class Counting(timing.StagedSessions):
        def __init__(self, manifest) -> None:
            super().__init__(manifest)
            self.sessions = [CountedSession(s) for s in self.sessions]
            sessions.append(self)

    monkeypatch.setattr(timing, "StagedSessions", Counting)
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    student = load_exits_checkpoint(exported / "s_exits.pth").student
    with torch.no_grad():
        confidence = exit_confidence(torch.stack(student(images)[1:]), "max_softmax")
    # Each exit's median confidence: about half the images still in leave at each exit.
    thresholds = [float(c.median()) for c in confidence]
    run = timing._onnx_staged(exported / "s_exits_staged", thresholds, "max_softmax")
    outputs = [run(images[:25].numpy()), run(images[25:].numpy())]
    taken = torch.cat([o[1] for o in outputs])
    counted = [c.rows for c in sessions[0].sessions]
    # Segment k ran on exactly the images that left at no exit before it, request by request.
    for k, rows in enumerate(counted):
        expected = [int((o[1] >= k).sum()) for o in outputs]
        assert rows == [n for n in expected if n], (k, counted)
    assert counted[0] == [25, 15] and taken.max() > 0 and (taken == 0).any()
    # The work is what each image ran up to the head it left at, of the plain model's MACs.
    costs = load_exits_checkpoint(exported / "s_exits.pth").costs
    assert costs is not None
    want = 100 * sum(costs.cascade[t] for t in taken.tolist()) / len(taken) / costs.plain
    assert timing._macs_pct("staged cascade", outputs, costs) == pytest.approx(want)
    assert timing._macs_pct("one-graph cascade", outputs, costs) > 100.0
