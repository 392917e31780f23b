"""Staged ONNX: `mlkd export <name>_exits.pth --format onnx` also writes the student segment by
segment; `AnytimeClassifier` on that folder decides as PyTorch's cascade does, and only the
images that have not exited reach the next segment; nothing is replaced without --overwrite and a
failed export leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CountedSession, assert_error_line, invoke_cli

from mlkd_cli.anytime.rules import EXIT_RULES, exit_confidence
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.registry import load_splits
from mlkd_cli.models.exits import load_exits_checkpoint
from mlkd_cli.passes.logits import card_image_config, split_dataset

pytest.importorskip("onnxruntime")

CLASSES = 10


@pytest.fixture(scope="module")
def exported(staged_export: Path) -> Path:
    """The student's folder after `mlkd export s_exits.pth --format onnx` (read-only; the
    session's one export, shared with tests/anytime/test_latency.py)."""
    return staged_export


@pytest.fixture(scope="module")
def images(exported: Path) -> torch.Tensor:
    """The digits validation and test images (503) as the student sees them."""
    card = load_exits_checkpoint(exported / "s_exits.pth").card
    splits = load_splits("digits", Path("data"), False, 0.1)
    batch = []
    for split in ("val", "test"):
        dataset = split_dataset(splits, split, card_image_config(card))
        batch.extend(dataset[i][0] for i in range(len(dataset)))
    return torch.stack(batch)


def _thresholds_leaving_at_every_exit(
    confidence: torch.Tensor, rule: str
) -> tuple[list[float], list[int]]:
    """Per exit, a threshold that lets about a quarter of the images still in the cascade leave:
    the middle of the widest gap between their sorted confidences near that share, so that no
    image sits within arithmetic noise of it. Also how many images reach each segment."""
    remaining = torch.ones(confidence.shape[1], dtype=torch.bool)
    values, reaching = [], []
    for k in range(confidence.shape[0] - 1):
        reaching.append(int(remaining.sum()))
        ordered = confidence[k][remaining].sort(descending=True).values
        lo, hi = max(1, ordered.numel() // 8), max(2, ordered.numel() // 3)
        gaps = ordered[lo - 1 : hi - 1] - ordered[lo:hi]
        at = lo - 1 + int(gaps.argmax())
        assert float(gaps.max()) > 2e-5, (rule, k)  # ONNX and PyTorch differ by ~1e-7
        values.append(float(ordered[at] + ordered[at + 1]) / 2)
        remaining &= confidence[k] < values[-1]
    reaching.append(int(remaining.sum()))
    return values, reaching


def _pytorch_confidence(exported: Path, images: torch.Tensor, rule: str) -> torch.Tensor:
    """Every exit's confidence under `rule` (exits in cascade order, then the final head)."""
    student = load_exits_checkpoint(exported / "s_exits.pth").student
    with torch.no_grad():
        heads = student(images)
    return exit_confidence(torch.stack([*heads[1:], heads[0]]), rule)


@pytest.mark.parametrize("rule", list(EXIT_RULES))
def test_the_staged_onnx_cascade_decides_as_pytorchs_on_every_image(
    exported: Path, images: torch.Tensor, rule: str
) -> None:
    from mlkd_cli.anytime import AnytimeClassifier

    thresholds, reaching = _thresholds_leaving_at_every_exit(
        _pytorch_confidence(exported, images, rule), rule
    )
    torch_run = AnytimeClassifier.load(exported / "s_exits.pth", thresholds=thresholds, rule=rule)
    staged = AnytimeClassifier.load(exported / "s_exits_staged", thresholds=thresholds, rule=rule)
    expected, got = torch_run.predict(images), staged.predict(images)
    # Images leave at every exit, and the final head takes some.
    left = torch.bincount(expected.exits, minlength=4)
    assert (left > 0).all(), left
    assert left.tolist() == [a - b for a, b in zip(reaching, [*reaching[1:], 0], strict=True)]
    assert torch.equal(got.exits, expected.exits)
    assert torch.equal(got.labels, expected.labels)
    assert torch.equal(got.macs, expected.macs)
    assert (got.probs - expected.probs).abs().max() < 1e-4
    # The manifest itself loads too, and the operating point defaults to the one recorded.
    again = AnytimeClassifier.load(
        exported / "s_exits_staged" / "manifest.json", thresholds=thresholds, rule=rule
    )
    assert torch.equal(again.predict(images[:37]).exits, expected.exits[:37])


def test_only_the_images_still_in_the_cascade_reach_the_next_segment(
    exported: Path, images: torch.Tensor
) -> None:
    from mlkd_cli.anytime import AnytimeClassifier

    rule = "max_softmax"
    thresholds, reaching = _thresholds_leaving_at_every_exit(
        _pytorch_confidence(exported, images, rule), rule
    )
    classifier = AnytimeClassifier.load(exported / "s_exits_staged", thresholds=thresholds)
    assert classifier.segments is not None
    counted = [CountedSession(s) for s in classifier.segments.sessions]
    classifier.segments.sessions = counted
    result = classifier.predict(images)
    assert [c.rows for c in counted] == [[n] for n in reaching]
    assert reaching[0] == images.shape[0] > reaching[1] > reaching[2] > reaching[3] > 0
    for k in range(3):  # segment k+1 ran on exactly the images that did not leave by exit k
        assert reaching[k + 1] == int((result.exits > k).sum())
    # Thresholds every image meets: only the first segment runs.
    for c in counted:
        c.rows.clear()
    everyone = AnytimeClassifier.load(exported / "s_exits_staged", thresholds=[1e-6] * 3)
    everyone.segments.sessions = counted  # type: ignore[union-attr]
    assert (everyone.predict(images).exits == 0).all()
    assert [c.rows for c in counted] == [[images.shape[0]], [], [], []]


def test_the_manifest_records_segments_card_and_exits(exported: Path) -> None:
    import onnxruntime

    folder = exported / "s_exits_staged"
    manifest = json.loads((folder / "manifest.json").read_text())
    loaded = load_exits_checkpoint(exported / "s_exits.pth")
    assert manifest["exits"] == loaded.exits and manifest["card"]["arch"] == "test_convnext"
    assert [s["file"] for s in manifest["segments"]] == [f"segment{k}.onnx" for k in range(4)]
    # Segment k takes the previous one's map and gives exit k+1 and its own map; batch dynamic.
    feeds = {"images": torch.randn(5, 3, 32, 32).numpy()}
    for k, entry in enumerate(manifest["segments"]):
        session = onnxruntime.InferenceSession(
            str(folder / entry["file"]), providers=["CPUExecutionProvider"]
        )
        assert [i.name for i in session.get_inputs()] == [entry["input"]]
        outputs = session.run(entry["outputs"], {entry["input"]: feeds[entry["input"]]})
        assert outputs[0].shape == (5, CLASSES)
        if k < 3:
            assert entry["outputs"] == [f"exit{k + 1}", f"features{k + 1}"]
            feeds[f"features{k + 1}"] = outputs[1]
        else:
            assert entry["outputs"] == ["final"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda m: m["segments"][1].update(file="../s_exits.onnx"), "segment 1 is not what"),
        (lambda m: m["segments"].pop(), "must list 4 segments"),
        (lambda m: m.update(format="other"), "is not a staged export"),
    ],
)
def test_a_damaged_manifest_is_refused_in_one_line(
    exported: Path, tmp_path: Path, change, fragment: str
) -> None:
    from mlkd_cli.anytime import AnytimeClassifier

    folder = shutil.copytree(exported / "s_exits_staged", tmp_path / "s_exits_staged")
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=fragment):
        AnytimeClassifier.load(folder, thresholds=[0.5] * 3)


def test_an_existing_staged_folder_needs_overwrite(exported: Path, tmp_path: Path) -> None:
    checkpoint = shutil.copy(exported / "s_exits.pth", tmp_path / "s_exits.pth")
    staged = shutil.copytree(exported / "s_exits_staged", tmp_path / "s_exits_staged")
    before = {p.name: p.read_bytes() for p in staged.iterdir()}
    # Only the staged folder is there (no s_exits.onnx): still refused, before any work.
    refused = invoke_cli("export", checkpoint, "--format", "onnx")
    assert refused.exit_code == 2
    assert_error_line(refused.stderr, "s_exits_staged/manifest.json already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in staged.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_exits.pth", "s_exits_staged"]
    # A file where the folder goes is refused too.
    shutil.rmtree(staged)
    staged.write_text("not a folder")
    refused = invoke_cli("export", checkpoint, "--format", "onnx", "--overwrite")
    assert refused.exit_code == 2
    assert_error_line(refused.stderr, "is a file; the staged ONNX export is a folder")


def test_a_segment_that_differs_from_pytorch_leaves_nothing_behind(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlkd_cli.export import staged_onnx

    real = staged_onnx.checked_onnx

    def far(*args):  # each segment written and checked, then found 0.5 away
        return 0.5, real(*args)[1]

    monkeypatch.setattr(staged_onnx, "checked_onnx", far)
    checkpoint = shutil.copy(exported / "s_exits.pth", tmp_path / "s_exits.pth")
    result = invoke_cli("export", checkpoint, "--format", "onnx")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "staged onnx (segment 0) export differs from PyTorch")
    # Neither the staged folder, nor the one-graph file, nor any scratch file is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_exits.pth"]


# ----------------------------------------------------------------------------- int8


def _with_thresholds(exported: Path, folder: Path, values: list[float] | None = None) -> Path:
    """A copy of the student whose card records `values`, by default thresholds that let images
    leave at every exit on the validation split (as `mlkd eval --split val --early-exit` would
    write them)."""
    if values is None:
        loaded = load_exits_checkpoint(exported / "s_exits.pth")
        splits = load_splits("digits", Path("data"), False, 0.1)
        val = split_dataset(splits, "val", card_image_config(loaded.card))
        images = torch.stack([val[i][0] for i in range(len(val))])
        values, _ = _thresholds_leaving_at_every_exit(
            _pytorch_confidence(exported, images, "max_softmax"), "max_softmax"
        )
    content = torch.load(exported / "s_exits.pth", weights_only=True)
    content["exits"]["thresholds"] = {"rule": "max_softmax", "values": values}
    torch.save(content, folder / "s_exits.pth")
    return folder / "s_exits.pth"


# 7-bit weights (avx2), which no CPU saturates. The bar is low: this untrained student's heads
# have near-ties that quantization flips (95-97 % agreement); what is tested is that each staged
# segment is quantized, judged on every head and on the staged cascade, and runs.
INT8 = ("--format", "onnx", "--int8", "--int8-target", "avx2", "--calibration-images", "64")


@pytest.mark.slow
def test_the_int8_staged_export_is_judged_on_every_head_and_the_staged_cascade(
    exported: Path, tmp_path: Path
) -> None:
    from mlkd_cli.anytime import AnytimeClassifier

    checkpoint = _with_thresholds(exported, tmp_path)
    result = invoke_cli("export", checkpoint, *INT8, "--min-agreement", "80", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    int8 = {e["format"]: e for e in json.loads(result.stdout)["exports"]}["onnx-int8"]
    staged = int8["staged"]
    folder = tmp_path / "s_exits.int8_staged"
    assert staged["output"] == str(folder) and staged["images"] == 144
    assert staged["heads"] == ["staged final", "staged exit1", "staged exit2", "staged exit3"]
    assert min(staged["agreement"]) >= 80.0 and staged["cascade"]["agreement"] >= 80.0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["mlkd_int8_target"] == "avx2" and "7-bit" in manifest["quantized"]
    import onnx

    for k in range(4):  # every segment is quantized
        types = {n.op_type for n in onnx.load(str(folder / f"segment{k}.onnx")).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= types, k
    # The classifier runs it with the recorded operating point, early exit and all.
    fp32 = AnytimeClassifier.load(tmp_path / "s_exits_staged")
    quantized = AnytimeClassifier.load(folder)
    assert (quantized.rule, quantized.thresholds) == (fp32.rule, fp32.thresholds)
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    got, want = quantized.predict(images), fp32.predict(images)
    assert got.exits.shape == (40,) and float((got.exits == want.exits).double().mean()) >= 0.8


@pytest.mark.slow
def test_an_int8_staged_folder_below_the_bound_is_refused_and_leaves_no_int8_file(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlkd_cli.export import staged_int8

    real, seen = staged_int8.compare_staged, []

    def poor(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return {**seen[-1], "cascade": {**seen[-1]["cascade"], "agreement": 42.0}}

    monkeypatch.setattr(staged_int8, "compare_staged", poor)
    # Every image leaves at the first exit: that head is judged, the unused ones only reported.
    checkpoint = _with_thresholds(exported, tmp_path, [1e-6] * 3)
    result = invoke_cli("export", checkpoint, *INT8, "--min-agreement", "50")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "42.00 % (the cascade's exits and classes)", "not written")
    (parity,) = seen
    assert parity["heads"] == ["staged exit1"] and len(parity["agreement"]) == 1
    assert set(parity["unused_heads"]) == {"staged final", "staged exit2", "staged exit3"}
    # Neither int8 form is left (the fp32 ones are written first, as for the one-graph file).
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["s_exits.onnx", "s_exits.pth", "s_exits_staged"]


def test_a_student_without_counted_stages_gets_the_one_graph_file_alone(
    exported: Path, tmp_path: Path
) -> None:
    # A backbone that cannot be run stage by stage is saved without MACs (models/exits.py).
    content = torch.load(exported / "s_exits.pth", weights_only=True)
    content["exits"]["macs"] = None
    torch.save(content, tmp_path / "s_exits.pth")
    result = invoke_cli("export", tmp_path / "s_exits.pth", "--format", "onnx", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["staged"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_exits.onnx", "s_exits.pth"]
