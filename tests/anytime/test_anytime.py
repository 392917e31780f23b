"""Anytime students: the exits kept, counted, run as an early-exit cascade, chosen, exported."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli
from torch import nn

from mlkd_cli.anytime.rules import EXIT_RULES, exits_taken
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.anytime.thresholds import (
    PER_EXIT_FROM,
    HeadOutputs,
    choose_thresholds,
    evaluate_cascade,
)
from mlkd_cli.core.checkpoint import load_checkpoint
from mlkd_cli.data.registry import load_splits
from mlkd_cli.models.exits import load_exits_checkpoint
from mlkd_cli.models.student import MultiExitStudent
from mlkd_cli.passes.logits import card_image_config, split_dataset

STUDENTS = [
    ("test_convnext", 32, "original"),
    ("test_efficientnet", 32, "original"),
    ("test_resnet", 32, "original"),
    ("test_resnet", 32, "light"),
    ("test_efficientnet", 30, "light"),  # odd map sizes: the pooling rounds up
]


def _student(arch: str, size: int, seed: int = 0, head: str = "original") -> MultiExitStudent:
    torch.manual_seed(seed)
    backbone = timm.create_model(arch, num_classes=7)
    return MultiExitStudent(backbone, arch, [0, 1, 2], 7, size, head).eval()


@pytest.mark.parametrize(("arch", "size", "head"), STUDENTS)
def test_cascade_takes_each_image_from_the_head_the_thresholds_pick(
    arch: str, size: int, head: str
) -> None:
    """The running cascade and the one measured from logits agree, under every exit rule."""
    student = _student(arch, size, head=head)
    staged = StagedStudent(student, size)
    images = torch.randn(24, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        heads = torch.stack(student(images))  # final, exit 1, exit 2, exit 3
        outputs = HeadOutputs.from_logits(heads, torch.zeros(24))
        for rule in EXIT_RULES:
            confidence = outputs.confidence_of(rule)
            # A threshold between two of the first exit's confidences, near their median: some
            # images leave at each head, so every path of the cascade runs (none sits on it).
            ordered = confidence[0].sort().values
            middle = float(ordered[11] + ordered[12]) / 2
            for thresholds in ([1e-6] * 3, [1.0] * 3, [middle, middle, 1e-6], [middle, 1.0, 1.0]):
                logits, taken = staged.cascade(images, thresholds, rule)
                expected = exits_taken(confidence, thresholds)
                assert torch.equal(taken, expected), (rule, thresholds)
                ordered = torch.cat([heads[1:], heads[:1]])
                want = ordered[taken, torch.arange(24)]
                assert torch.allclose(logits, want, atol=1e-5), (rule, thresholds)
            assert set(expected.tolist()) == {0, 3}  # the last case: exit 1 or the final head


def test_pooled_batches_give_what_each_batch_gives_alone() -> None:
    student = _student("test_convnext", 32)
    staged = StagedStudent(student, 32)
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 3, 32, 32, generator=generator) for n in (9, 16, 5, 16)]
    with torch.no_grad():
        confidence = torch.stack(student(batches[0]))[1].softmax(1).amax(1)
        threshold = float(confidence.median())
        pooled, taken = staged.cascade_batches(batches, [threshold] * 3)
        singles = [staged.cascade(b, [threshold] * 3) for b in batches]
    assert torch.allclose(pooled, torch.cat([s[0] for s in singles]), atol=1e-5)
    assert torch.equal(taken, torch.cat([s[1] for s in singles]))
    assert 0 < int((taken == 0).sum()) < len(taken)


def _conv_linear_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of every convolution and linear layer, counted from their shapes (fvcore-style)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = module.in_channels // module.groups * kh * kw
        total += output[0].numel() * per_output

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("head", ["original", "light"])
def test_resnet50_student_macs_agree_with_an_independent_count(head: str) -> None:
    student = _student("resnetv2_50x1_bit", 224, head=head)
    costs = StagedStudent(student, 224).count_costs(224)
    independent = _conv_linear_macs(student.backbone, (3, 224, 224))
    assert abs(costs.plain - independent) / independent < 0.01
    assert 4.0e9 < costs.plain < 4.2e9  # ResNet-50 at 224 px: about 4.1 GMACs
    shares = [b / costs.plain for b in costs.branches]
    if head == "light":  # the bound: at most 3 % of the plain model an exit
        assert max(shares) <= 0.03
    else:  # the original's first exit: about a third of the plain model
        assert 0.25 < shares[0] < 0.35
    # Each exit alone costs its backbone prefix and its branch, less than the whole model.
    for j in range(3):
        stage = student.stages[j]  # the branch runs on its stage's map
        side = 224 // stage.reduction
        branch = _conv_linear_macs(student.exits[j], (stage.channels, side, side))
        assert costs.branches[j] == pytest.approx(branch, rel=0.01)
        assert costs.alone(j) < costs.plain
    assert costs.up_to(3) == costs.plain + sum(costs.branches)


def test_a_backbone_that_is_not_sequential_is_refused() -> None:
    student = _student("test_resnet", 32)

    class Shuffled(type(student.backbone)):  # same modules, run in another order
        def forward_features(self, x):
            return super().forward_features(x.flip(-1))

    student.backbone.__class__ = Shuffled
    with pytest.raises(Exception, match="cannot stop early"):
        StagedStudent(student, 32)


# ----------------------------------------------------------------------------- choosing


def _heads(exit_correct: list[list[bool]], exit_conf: list[list[float]], final: list[bool]):
    """HeadOutputs from per-head correctness and confidence (2 classes, label 0)."""
    rows = []
    for correct, conf in [*zip(exit_correct, exit_conf, strict=True), (final, [0.9] * len(final))]:
        p = torch.tensor(conf, dtype=torch.float64)
        margin = torch.log(p / (1 - p))  # softmax of (margin, 0) gives (p, 1 - p)
        right = torch.tensor(correct)
        zero = torch.zeros_like(margin)
        rows.append(
            torch.stack([torch.where(right, margin, zero), torch.where(right, zero, margin)], 1)
        )
    return HeadOutputs(torch.stack(rows).float(), torch.zeros(len(final), dtype=torch.long))


def test_choice_never_trades_the_final_heads_hits_for_fixes() -> None:
    # 100 images; the final head is right on all but the last 2. The exit is right on the
    # 2 it misses (confidence 0.95) and wrong on 3 others at 0.8 confidence.
    n = 100
    correct = [True] * n
    conf = [0.99] * n
    for i in (10, 11, 12):
        correct[i], conf[i] = False, 0.8
    for i in (98, 99):
        conf[i] = 0.95
    final = [True] * 98 + [False] * 2
    heads = _heads([correct], [conf], final)
    costs = [30, 110]
    # 0.5 % of 100 images: not one of the final head's hits may be lost; the net (+2 - 3) would
    # have allowed 0.8 (a drop of 1 point) under a net rule with a 1-point margin.
    chosen = choose_thresholds(heads, costs, max_drop=0.5)
    assert chosen[0] > 0.8
    result = evaluate_cascade(heads, chosen, costs, 100)
    assert result.top1 == 100.0 and result.shares[0] == 97.0
    loose = choose_thresholds(heads, costs, max_drop=3.0)
    assert loose[0] <= 0.8
    assert evaluate_cascade(heads, loose, costs, 100).shares[0] == 100.0


def test_choice_searches_each_exit_on_a_large_split() -> None:
    # Exit 1 is right whenever it is confident above 0.9; exit 2 always: on a large split the
    # thresholds differ per exit, and every image leaves early.
    n = PER_EXIT_FROM
    generator = torch.Generator().manual_seed(0)
    conf1 = (torch.rand(n, generator=generator) * 0.49 + 0.5).tolist()
    correct1 = [c > 0.9 for c in conf1]
    heads = _heads([correct1, [True] * n], [conf1, [0.6] * n], [True] * n)
    chosen = choose_thresholds(heads, [10, 20, 100], max_drop=0.0)
    assert chosen[1] <= 0.6 < chosen[0]
    result = evaluate_cascade(heads, chosen, [10, 20, 100], 100)
    assert result.top1 == 100.0 and result.shares[2] == 0.0


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def exits_run(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test_convnext student with exits, distilled 3 epochs at 32 px (read-only: copy it)."""
    out = tmp_path_factory.mktemp("anytime") / "models"
    result = invoke_cli(
        "distill", "--dataset", "digits", "--quiet", "--model", "test_resnet", "--checkpoint",
        digits_teacher, "--student", "test_convnext", "-e", "3", "-b", "32", "-n", "s",
        "--output-dir", out, "--precision", "fp32", "--lr", "0.003",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def exits_ckpt(exits_run: Path, tmp_path: Path) -> Path:
    """A private copy of the student with exits."""
    shutil.copy(exits_run / "s_exits.pth", tmp_path / "s_exits.pth")
    return tmp_path / "s_exits.pth"


@pytest.mark.slow
def test_distill_writes_the_student_with_its_exits_and_their_macs(exits_run: Path) -> None:
    saved = load_checkpoint(exits_run / "s_exits.pth")
    plain = load_checkpoint(exits_run / "s.pth")
    assert saved["format"] == "mlkd-exits/1" and saved["epoch"] == plain["epoch"]
    exits = saved["exits"]
    assert exits["stages"] == [0, 1, 2] and exits["modules"] == ["stages.0", "stages.1", "stages.2"]
    assert exits["thresholds"] is None
    macs = exits["macs"]
    assert macs["img_size"] == 32 and len(macs["cascade"]) == 4
    assert macs["cascade"][0] < macs["plain"] < macs["cascade"][3]
    # The plain model inside is exactly <name>.pth, which plain timm loads.
    for key, tensor in plain["state_dict"].items():
        assert torch.equal(saved["state_dict"][f"backbone.{key}"], tensor), key
    model = timm.create_model(
        "test_convnext", checkpoint_path=str(exits_run / "s.pth"), num_classes=10
    )
    assert sum(p.numel() for p in model.parameters()) > 0


def _split_heads(path: Path, split: str) -> HeadOutputs:
    loaded = load_exits_checkpoint(path)
    splits = load_splits("digits", Path("data"), False, 0.1)
    dataset = split_dataset(splits, split, card_image_config(loaded.card))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        return HeadOutputs.from_logits(torch.stack(loaded.student(images)), labels)


@pytest.mark.slow
def test_early_exit_on_val_writes_thresholds_that_test_then_uses(
    exits_ckpt: Path, tmp_path: Path
) -> None:
    base = ("eval", exits_ckpt, "--precision", "fp32", "--json", "--quiet")
    chose = invoke_cli(*base, "--split", "val", "--early-exit", "--timing-images", "0")
    assert chose.exit_code == 0, chose.stderr
    picked = json.loads(chose.stdout)
    record = load_checkpoint(exits_ckpt)["exits"]["thresholds"]
    assert record["split"] == "val" and record["max_drop"] == 0.5
    assert record["values"] == picked["chosen"]["values"] and len(record["values"]) == 3
    # The record's figures are the validation cascade's, recomputed here from every head.
    val = _split_heads(exits_ckpt, "val")
    macs = load_checkpoint(exits_ckpt)["exits"]["macs"]
    again = evaluate_cascade(val, record["values"], macs["cascade"], macs["plain"], record["rule"])
    assert again.top1 == pytest.approx(record["top1"]) and again.top1 >= record["final_top1"] - 0.5
    assert again.macs_pct == pytest.approx(record["macs_pct"])

    test = invoke_cli(*base, "--split", "test", "--timing-images", "48", "--plots", tmp_path)
    assert test.exit_code == 0, test.stderr
    result = json.loads(test.stdout)
    assert [h["head"] for h in result["heads"]][0] == "final" and len(result["heads"]) == 4
    first = result["cascades"][0]
    assert first["rule"] == "chosen" and first["thresholds"] == record["values"]
    assert sum(first["exit_shares"]) == pytest.approx(100.0)
    assert all(c["images_per_s"] > 0 for c in result["cascades"])
    assert result["timed_images"] == 48
    assert Path(result["plots"]["accuracy_vs_macs"]).stat().st_size > 10_000
    test_heads = _split_heads(exits_ckpt, "test")
    expected = evaluate_cascade(
        test_heads, record["values"], macs["cascade"], macs["plain"], record["rule"]
    )
    assert first["top1"] == pytest.approx(expected.top1)
    assert first["macs_pct"] == pytest.approx(expected.macs_pct)


@pytest.mark.slow
def test_a_budget_picks_the_most_accurate_point_within_it_and_every_rule_has_a_frontier(
    exits_ckpt: Path,
) -> None:
    from mlkd_cli.anytime import AnytimeClassifier

    untimed = invoke_cli("eval", exits_ckpt, "--latency")
    assert untimed.exit_code == 2
    assert_error_line(untimed.stderr, "has none yet: add --early-exit")
    base = ("eval", exits_ckpt, "--precision", "fp32", "--json", "--quiet", "--timing-images", "0")
    chose = invoke_cli(*base, "--split", "val", "--early-exit", "--budget", "0.6")
    assert chose.exit_code == 0, chose.stderr
    result = json.loads(chose.stdout)
    record = load_checkpoint(exits_ckpt)["exits"]["thresholds"]
    assert record["budget"] == 0.6 and record["max_drop"] is None and record["met"]
    assert record["rule"] in ("max_softmax", "margin", "entropy")
    assert record["macs_pct"] <= 60.0 + 1e-6
    assert set(result["frontiers"]) == {"max_softmax", "margin", "entropy"}
    # No point of any rule's frontier within the budget beats the chosen one on validation
    # (the frontier's shared thresholds are among the candidates on this small split).
    for points in result["frontiers"].values():
        affordable = [p["top1"] for p in points if p["macs_pct"] <= 60.0 + 1e-6]
        assert max(affordable, default=0.0) <= record["top1"] + 1e-9
    # The classifier runs the chosen rule; a file chosen before rules existed runs max_softmax.
    assert AnytimeClassifier.load(exits_ckpt).rule == record["rule"]
    content = load_checkpoint(exits_ckpt)
    del content["exits"]["thresholds"]["rule"]
    torch.save(content, exits_ckpt)
    del content["exits"]["exit_head"]  # and before light exits: the original's branches
    torch.save(content, exits_ckpt)
    older = AnytimeClassifier.load(exits_ckpt)
    assert older.rule == "max_softmax" and older.thresholds == record["values"]
    shown = invoke_cli(*base)  # the test split, at the saved thresholds
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["cascades"][0]["exit_rule"] == "max_softmax"


@pytest.mark.slow
def test_light_exits_train_save_choose_and_run(digits_teacher: Path, tmp_path: Path) -> None:
    from mlkd_cli.anytime import AnytimeClassifier

    out = tmp_path / "models"
    run = ("distill", "--dataset", "digits", "-q", "-m", "test_resnet", "-c", digits_teacher,
           "--student", "test_resnet", "--img-size", "32", "-e", "1", "-b", "64", "-n", "s",
           "--output-dir", out)  # fmt: skip
    bad = invoke_cli(*run, "--exit-head", "tiny")
    assert bad.exit_code == 2
    assert_error_line(bad.stderr, "--exit-head 'tiny' is not one of light, original")
    assert not out.exists()
    done = invoke_cli(*run, "--exit-head", "light")
    assert done.exit_code == 0, done.stderr
    exits = load_checkpoint(out / "s_exits.pth")["exits"]
    assert exits["exit_head"] == "light"
    light = MultiExitStudent(timm.create_model("test_resnet", num_classes=10), "test_resnet",
                             [0, 1, 2], 10, 32, "light")  # fmt: skip
    assert exits["macs"]["branches"] == list(StagedStudent(light, 32).count_costs(32).branches)
    chose = invoke_cli("eval", out / "s_exits.pth", "--split", "val", "--early-exit",
                       "--budget", "0.9", "--timing-images", "0", "--json", "-q")  # fmt: skip
    assert chose.exit_code == 0, chose.stderr
    assert json.loads(chose.stdout)["chosen"]["macs_pct"] <= 90.0 + 1e-6
    classifier = AnytimeClassifier.load(out / "s_exits.pth")
    result = classifier.predict(torch.randn(8, 3, 32, 32))
    assert result.exits.max() <= 3 and result.labels.shape == (8,)


@pytest.mark.slow
def test_anytime_classifier_predicts_what_the_eval_cascade_scores(exits_ckpt: Path) -> None:
    from mlkd_cli.anytime import AnytimeClassifier

    heads = _split_heads(exits_ckpt, "test")
    thresholds = [0.9, 0.8, 0.7]
    classifier = AnytimeClassifier.load(exits_ckpt, thresholds=thresholds)
    loaded = load_exits_checkpoint(exits_ckpt)
    splits = load_splits("digits", Path("data"), False, 0.1)
    dataset = split_dataset(splits, "test", card_image_config(loaded.card))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    result = classifier.predict(images)
    taken = exits_taken(heads.confidence_of("max_softmax"), thresholds)
    assert torch.equal(result.exits, taken)
    expected = heads.probs[taken, torch.arange(len(taken))].argmax(1)
    assert torch.equal(result.labels, expected)
    scored = evaluate_cascade(heads, thresholds, *_macs(exits_ckpt))
    assert result.mean_macs == pytest.approx(scored.macs)
    assert 100 * float((result.labels == heads.labels).double().mean()) == pytest.approx(
        scored.top1
    )
    # Without thresholds given, the checkpoint's chosen ones are needed.
    with pytest.raises(Exception, match="no thresholds yet"):
        AnytimeClassifier.load(exits_ckpt)


def _test_images(path: Path) -> list:
    loaded = load_exits_checkpoint(path)
    splits = load_splits("digits", Path("data"), False, 0.1)
    dataset = split_dataset(splits, "test", card_image_config(loaded.card))
    return [dataset[i] for i in range(len(dataset))]


def _macs(path: Path) -> tuple[list[int], int]:
    macs = load_checkpoint(path)["exits"]["macs"]
    return macs["cascade"], macs["plain"]


def test_anytime_classifier_imports_without_typer() -> None:
    code = (
        # The package loads its classifier on first use: ask for it, so that it loads here.
        "import sys; from mlkd_cli.anytime import AnytimeClassifier; "
        "assert 'typer' not in sys.modules and 'rich' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_export_writes_safetensors_and_an_onnx_output_per_exit(
    exits_ckpt: Path, tmp_path: Path
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx

    chose = invoke_cli("eval", exits_ckpt, "--split", "val", "--early-exit", "--budget", "0.7",
                       "--timing-images", "0", "-q")  # fmt: skip
    assert chose.exit_code == 0, chose.stderr
    point = load_checkpoint(exits_ckpt)["exits"]["thresholds"]
    result = invoke_cli("export", exits_ckpt, "--json")
    assert result.exit_code == 0, result.stderr
    exports = {e["format"]: e for e in json.loads(result.stdout)["exports"]}
    folder, onnx_path = Path(exports["safetensors"]["output"]), Path(exports["onnx"]["output"])
    assert (folder / "model.safetensors").is_file() and (folder / "exits.json").is_file()
    assert "onnxruntime" in exports["onnx"]["checked_with"]
    loaded = load_exits_checkpoint(exits_ckpt)
    again = load_exits_checkpoint(folder)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = loaded.student(images)
        assert all(torch.equal(a, b) for a, b in zip(again.student(images), expected, strict=True))
    # Both exports carry the operating point: rule, thresholds and what they were chosen for.
    assert json.loads((folder / "exits.json").read_text())["exits"]["thresholds"] == point
    assert again.thresholds == point["values"] and again.rule == point["rule"]
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["mlkd_exits"])["thresholds"] == point
    assert json.loads(meta["mlkd"])["arch"] == "test_convnext"
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["final", "exit1", "exit2", "exit3"]
    outputs = session.run(None, {"images": images.numpy()})
    for got, want in zip(outputs, expected, strict=True):
        assert (torch.from_numpy(got) - want).abs().max() < 1e-4
    # The folder serves eval and the runtime like the .pth it came from.
    evaluated = invoke_cli("eval", folder, "--timing-images", "0", "--json", "--quiet")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert len(json.loads(evaluated.stdout)["heads"]) == 4
    # Thresholds are chosen on the .pth: an export is not rewritten.
    before = (folder / "model.safetensors").read_bytes()
    refused = invoke_cli("eval", folder, "--split", "val", "--early-exit")
    assert refused.exit_code == 2
    assert_error_line(refused.stderr, "is an export; choose them on the .pth")
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--split", "val", "--early-exit", "--plain"), "needs a student with exits"),
        (("--thresholds", "0,0.5,0.9"), "must lie in (0, 1]"),
        (("--thresholds", "0.5,1.5,0.9"), "must lie in (0, 1]"),
        (("--thresholds", "0.5,0.9"), "needs 3 values"),
        (("--thresholds", "high"), "takes numbers"),
        (("--split", "val", "--early-exit", "--max-drop", "-1"), "--max-drop must be 0 or more"),
        (("--split", "test", "--early-exit"), "never on the test split"),
        (("--split", "val", "--early-exit", "--thresholds", "0.9,0.9,0.9"), "pass one"),
        (("--img-size", "64"), "records its student and size"),
        (("--split", "val", "--early-exit", "--budget", "0.5", "--max-drop", "1"), "pass one"),
        (("--split", "val", "--early-exit", "--budget", "0"), "must be above 0"),
        (("--split", "val", "--early-exit", "--budget", "0.01"), "below the first exit's own"),
        (("--split", "val", "--budget", "0.5"), "add --early-exit"),
        (("--split", "val", "--early-exit", "--exit-rule", "vote"), "--exit-rule must be one of"),
        (("--latency",), "--timing-images must be above 0"),
    ],
)
def test_bad_exit_flags_are_one_line_and_write_nothing(
    exits_ckpt: Path, exits_run: Path, args: tuple[str, ...], fragment: str
) -> None:
    target = exits_ckpt
    if "--plain" in args:
        args = tuple(a for a in args if a != "--plain")
        target = exits_run / "s.pth"
    before = target.read_bytes()
    result = invoke_cli("eval", target, *args, "--timing-images", "0")
    assert result.exit_code == 2
    assert_error_line(result.stderr, fragment)
    assert target.read_bytes() == before


@pytest.mark.slow
def test_export_of_exits_refuses_a_format_without_exits(exits_ckpt: Path) -> None:
    result = invoke_cli("export", exits_ckpt, "--format", "torchscript")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "exports as safetensors or onnx")
    assert sorted(p.name for p in exits_ckpt.parent.iterdir()) == ["s_exits.pth"]


@pytest.mark.slow
def test_exit_eval_on_two_processes_counts_every_image_once(exits_ckpt: Path) -> None:
    base = ("eval", exits_ckpt, "--precision", "fp32", "--timing-images", "0", "--json", "-q")
    one = invoke_cli(*base)
    two = invoke_cli(*base, "--world-size", "2")
    assert one.exit_code == 0 and two.exit_code == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["images"] == b["images"] == 359
    for x, y in zip(a["heads"] + a["cascades"], b["heads"] + b["cascades"], strict=True):
        assert x["top1"] == pytest.approx(y["top1"]) and x["nll"] == pytest.approx(
            y["nll"], abs=1e-5
        )


def test_timing_of_a_slow_model_keeps_to_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlkd_cli.anytime import timing
    from mlkd_cli.engine.precision import Precision

    staged = StagedStudent(_student("test_convnext", 32), 32)
    precision = Precision.resolve("fp32", torch.device("cpu"))
    batches = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    kept, rounds = timing._fit_budget(staged, batches, precision, 12)
    assert len(kept) == 4 and rounds == timing.TIMING_ROUNDS  # a tiny model: everything
    monkeypatch.setattr(timing, "TIMING_BUDGET_S", 1e-9)  # as if each image took an hour
    kept, rounds = timing._fit_budget(staged, batches, precision, 12)
    assert len(kept) == 1 and rounds == 1  # one batch, one round, however slow


@pytest.mark.slow
def test_int8_export_of_a_student_with_exits_agrees_with_fp32_and_carries_its_exits(
    exits_ckpt: Path, exits_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx

    from mlkd_cli.anytime import AnytimeClassifier

    chose = invoke_cli("eval", exits_ckpt, "--split", "val", "--early-exit", "--max-drop", "1",
                       "--timing-images", "0", "-q")  # fmt: skip
    assert chose.exit_code == 0, chose.stderr
    # avx2: 7-bit weights, which no CPU saturates, so that the figures do not hang on the CPU
    # that runs the test (8-bit weights saturate without VNNI). The bar is 95 %, not the
    # default 99 (one image in 144): this 3-epoch student's final head has near-ties that
    # either weight width flips on an image or three (97.92-99.31 % on an AMD EPYC).
    result = invoke_cli("export", exits_ckpt, "--int8", "--int8-target", "avx2", "--json",
                        "--calibration-images", "64", "--min-agreement", "95")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    # onnxruntime's quantizer warns on the root logger for each 1-D weight: kept quiet.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    exports = {e["format"]: e for e in json.loads(result.stdout)["exports"]}
    int8 = exports["onnx-int8"]
    path = Path(int8["output"])
    assert path.name == "s_exits.int8.onnx" and path.is_file()
    assert int8["calibration_images"] == 64 and int8["images"] == 144  # the validation split
    assert int8["heads"] == ["final", "exit1", "exit2", "exit3"]
    assert len(int8["agreement"]) == 4 and min(int8["agreement"]) >= 95.0  # every head
    assert int8["target"] == "avx2" and int8["reduce_range"]
    # The operating point chosen above is checked too: the same exit and class, fp32 and int8.
    chosen = load_checkpoint(exits_ckpt)["exits"]["thresholds"]
    assert int8["cascade"]["thresholds"] == chosen["values"]
    assert int8["cascade"]["rule"] == chosen["rule"] and int8["cascade"]["agreement"] >= 95.0
    assert int8["int8_bytes"] < int8["fp32_bytes"] / 2
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["mlkd_int8_target"] == "avx2" and "7-bit weights" in meta["mlkd_quantized"]
    assert "int8" in meta["mlkd_quantized"] and json.loads(meta["mlkd_exits"])["stages"] == [
        0,
        1,
        2,
    ]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["final", "exit1", "exit2", "exit3"]
    types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" in types and "DequantizeLinear" in types
    # The classifier runs either ONNX file with the rule and thresholds it carries, deciding as
    # the PyTorch cascade does (fp32: the same exits; int8: nearly every image).
    torch_side = AnytimeClassifier.load(exits_ckpt)
    images = torch.stack([d[0] for d in _test_images(exits_ckpt)])
    want = torch_side.predict(images)
    fp32 = AnytimeClassifier.load(exits_ckpt.with_suffix(".onnx")).predict(images)
    assert float((fp32.exits == want.exits).double().mean()) >= 0.99
    assert float((fp32.labels == want.labels).double().mean()) >= 0.99
    quantized = AnytimeClassifier.load(path)
    assert (quantized.rule, quantized.thresholds) == (torch_side.rule, torch_side.thresholds)
    got = quantized.predict(images)
    assert float((got.labels == want.labels).double().mean()) >= 0.95
    assert got.macs.shape == (len(images),) and got.exits.max() <= 3
    # Latency: PyTorch's plain model and cascade, and the ONNX files found beside it (the
    # plain student's s.onnx too).
    shutil.copy(exits_run / "s.pth", exits_ckpt.parent / "s.pth")
    plain = invoke_cli("export", exits_ckpt.parent / "s.pth", "--format", "onnx", "-q")
    assert plain.exit_code == 0, plain.stderr
    timed = invoke_cli("eval", exits_ckpt, "--latency", "--timing-images", "16", "-b", "8",
                       "--json", "-q")  # fmt: skip
    assert timed.exit_code == 0, timed.stderr
    rows = json.loads(timed.stdout)["latency"]
    seen = {(r["runtime"], r["model"], r["batch"]) for r in rows}
    assert seen == {
        (runtime, model, batch)
        for batch in (1, 8)
        for runtime, model in [
            ("pytorch", "plain"), ("pytorch", "cascade"), ("onnxruntime fp32", "plain"),
            ("onnxruntime fp32", "one-graph cascade"), ("onnxruntime fp32", "staged cascade"),
            ("onnxruntime int8", "one-graph cascade"), ("onnxruntime int8", "staged cascade"),
        ]
    }  # fmt: skip
    assert json.loads(timed.stdout)["latency_missing"] == [
        f"no plain int8 row: s.int8.onnx not found; mlkd export {exits_ckpt.parent / 's.pth'} "
        "--format onnx --int8 --overwrite"
    ]
    assert all(r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows)


@pytest.mark.slow
def test_int8_export_is_refused_below_the_agreement_bound_and_bad_flags_before_any_work(
    exits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlkd_cli.export import int8

    plain = tmp_path / "s.pth"
    shutil.copy(exits_run / "s.pth", plain)
    cases = [
        (("--int8",), "add --format onnx"),
        (("--int8", "--format", "onnx", "--calibration-images", "0"), "at least 1"),
        (("--int8", "--format", "onnx", "--min-agreement", "0"), "percentage in (0, 100]"),
    ]
    for args, fragment in cases:
        refused = invoke_cli("export", plain, *args)
        assert refused.exit_code == 2, (args, refused.stderr)
        assert_error_line(refused.stderr, fragment)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pth"]
    real = int8.compare_on_validation

    def poor(*args, **kwargs):
        return {**real(*args, **kwargs), "agreement": [97.5]}

    monkeypatch.setattr(int8, "compare_on_validation", poor)
    low = invoke_cli("export", plain, "--format", "onnx", "--int8", "--calibration-images", "32",
                     "--int8-target", "vnni")  # fmt: skip
    assert low.exit_code == 2
    assert_error_line(
        low.stderr,
        "agrees with fp32 on 97.50 % (logits) of the 144 validation images",
        "--min-agreement 99; not written (try --int8-target avx2 (7-bit weights)",
    )
    assert not (tmp_path / "s.int8.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
