"""`--precision auto|bf16|fp32`: what each means on a CPU, the layout choice, the first line."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli.core.dist import DistContext
from mlkd_cli.core.errors import UserError
from mlkd_cli.engine import precision as precision_module
from mlkd_cli.engine.precision import (
    Precision,
    check_precision,
    choose_layout,
    idle_taps,
    keep_idle_tap_convs_fp32,
)
from mlkd_cli.models.student import FeatureAdaptedStudent, MultiExitStudent
from mlkd_cli.models.teacher import TeacherEnsemble

CPU = torch.device("cpu")
CTX = DistContext(0, 1, 0, CPU)
TRAIN = ("teacher", "train", "-d", "digits", "-m", "test_resnet", "-e", "1", "--img-size", "16")


@pytest.fixture(autouse=True)
def measured_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the measurement that the rest of the suite pins (conftest), each
    afresh (a process remembers what it measured)."""
    monkeypatch.delenv(precision_module.LAYOUT_VARIABLE, raising=False)
    monkeypatch.setattr(precision_module, "_MEASURED", {})
    # Their one-epoch runs are short enough to go untimed (PROBE_SHARE): timed all the same.
    monkeypatch.setattr(precision_module, "PROBE_SHARE", math.inf)


def test_the_layout_can_be_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    base = Precision.resolve("fp32", CPU)
    for pinned in ("channels_last", "contiguous"):
        monkeypatch.setenv(precision_module.LAYOUT_VARIABLE, pinned)
        chosen = choose_layout(base, model, (3, 16, 16), CTX, train=True)
        assert chosen.channels_last is (pinned == "channels_last") and pinned in chosen.why
    monkeypatch.setenv(precision_module.LAYOUT_VARIABLE, "nhwc")
    with pytest.raises(UserError, match="channels_last or contiguous"):
        choose_layout(base, model, (3, 16, 16), CTX, train=True)


@pytest.fixture
def no_cpu_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this CPU has no native bf16 arithmetic."""
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: None)


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this CPU has native bf16 arithmetic (autocast runs bf16 on any x86 CPU)."""
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: "avx512_bf16")


def test_auto_is_bf16_where_the_cpu_has_it_and_fp32_where_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: "amx_bf16")
    chosen = Precision.resolve("auto", CPU)
    assert chosen.bf16 and "amx_bf16" in chosen.why
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: None)
    assert not Precision.resolve("auto", CPU).bf16  # silently fp32
    assert not Precision.resolve("fp32", CPU).bf16
    with pytest.raises(UserError, match="no native bf16"):
        Precision.resolve("bf16", CPU)
    with pytest.raises(UserError, match="auto, bf16, fp32"):
        check_precision("fp16", "cpu")


def test_the_detection_reads_the_cpus_features() -> None:
    caps = torch.cpu.get_capabilities()
    expected = any(caps.get(name) for name in precision_module.CPU_BF16_FEATURES)
    assert (precision_module.cpu_bf16_feature() is not None) == expected


def test_bf16_autocast_runs_convolutions_in_bf16_and_fp32_does_not(cpu_bf16: None) -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    images = torch.randn(2, 3, 16, 16)
    with Precision.resolve("bf16", CPU).autocast():
        assert model(images).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), Precision.resolve("fp32", CPU).autocast():
        assert model(images).dtype == torch.float32  # fp32 even inside an outer autocast


def test_a_teacher_follows_the_runs_precision(cpu_bf16: None) -> None:
    member = timm.create_model("test_resnet", num_classes=3)
    teacher = TeacherEnsemble([member], [1.0])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = member(images)
    with Precision.resolve("bf16", CPU).autocast():
        assert torch.equal(teacher(images), reference)  # bf16 off: the members ran in fp32
        teacher.bf16 = True
        in_bf16 = teacher(images)
    assert not torch.equal(in_bf16, reference)
    torch.testing.assert_close(in_bf16, reference, atol=0.1, rtol=0.05)


def test_choosing_the_layout_leaves_the_model_and_the_rng_as_they_were() -> None:
    model = timm.create_model("test_resnet", num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    chosen = choose_layout(Precision.resolve("fp32", CPU), model, (3, 16, 16), CTX, train=True)
    assert torch.equal(torch.rand(3), expected_draw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics too
    assert all(p.grad is None for p in model.parameters())
    assert "channels_last measured" in chosen.why
    assert chosen.bf16 is False


def _fake_times(monkeypatch: pytest.MonkeyPatch, times: dict[tuple[bool, bool], float]) -> list:
    """Make the timing return `times` ((bf16, channels_last) -> s); returns the candidates asked."""
    asked: list = []

    def fake(model, shape, precision, candidates, train):
        asked.extend(candidates)
        return {c: times[c] for c in candidates}

    monkeypatch.setattr(precision_module, "_time_candidates", fake)
    return asked


def test_the_layout_measured_faster_is_the_one_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    for nchw, nhwc, expected in ((2.0, 1.0, True), (1.0, 2.0, False), (1.05, 1.0, False)):
        asked = _fake_times(monkeypatch, {(False, False): nchw, (False, True): nhwc})
        chosen = choose_layout(Precision.resolve("fp32", CPU), model, (3, 16, 16), CTX, train=True)
        assert chosen.channels_last is expected and chosen.bf16 is False
        assert f"{nchw / nhwc:.2f}x" in chosen.why
        assert asked == [(False, False), (False, True)]  # fp32 asked for: bf16 never timed


@pytest.mark.parametrize(
    ("bf16_time", "expected_bf16"),
    [(0.5, True), (0.98, False), (1.5, False)],  # 2x faster; a near tie (1.02x); slower
)
def test_auto_keeps_bf16_only_where_it_is_faster_than_fp32(
    cpu_bf16: None, monkeypatch: pytest.MonkeyPatch, bf16_time: float, expected_bf16: bool
) -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    # fp32 runs fastest channels_last, bf16 fastest in NCHW: each arithmetic gets its own layout.
    times = {(False, False): 2.0, (False, True): 1.0, (True, False): bf16_time, (True, True): 9.0}
    asked = _fake_times(monkeypatch, times)
    chosen = choose_layout(Precision.resolve("auto", CPU), model, (3, 16, 16), CTX, train=True)
    assert sorted(asked) == sorted(times)
    assert chosen.bf16 is expected_bf16
    assert chosen.channels_last is (not expected_bf16)
    assert f"bf16 measured {1.0 / bf16_time:.2f}x the speed of fp32" in chosen.why
    assert ("so fp32" in chosen.why) is (not expected_bf16)
    # --precision bf16 is what the user asked for: bf16 whatever fp32 would have done.
    asked.clear()
    forced = choose_layout(Precision.resolve("bf16", CPU), model, (3, 16, 16), CTX, train=True)
    assert forced.bf16 and all(bf16 for bf16, _ in asked)


def test_a_busy_moment_during_the_timing_does_not_decide_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The candidates take turns and each keeps its fastest step: one step slowed 20-fold (another
    process took the cores then) leaves the verdict as the quiet steps give it."""
    model = timm.create_model("test_resnet", num_classes=3)
    monkeypatch.setattr(precision_module, "LAYOUT_SECONDS", 0.0)  # the minimum rounds only
    calls = {"channels_last": 0}
    clock = [0.0]  # a step's time is what it adds to this clock: no sleeping, no real load

    def step(trial, images, precision, train):  # the step's time alone, no arithmetic
        cl = images.is_contiguous(memory_format=torch.channels_last) and images.shape[1] > 1
        if cl:
            calls["channels_last"] += 1
        # NCHW 10 ms a step, channels_last 5 ms, but its first timed step (after the warm-up)
        # catches a busy moment: 100 ms.
        clock[0] += 0.1 if cl and calls["channels_last"] == 2 else 0.005 if cl else 0.01

    monkeypatch.setattr(precision_module, "_one_step", step)
    monkeypatch.setattr(precision_module.time, "perf_counter", lambda: clock[0])
    chosen = choose_layout(Precision.resolve("fp32", CPU), model, (3, 16, 16), CTX, train=True)
    assert chosen.channels_last, chosen.why
    assert calls["channels_last"] == 1 + precision_module.LAYOUT_ROUNDS


def test_bf16_asked_of_a_cpu_without_it_is_one_line_and_exit_2(
    no_cpu_bf16: None, tmp_path, monkeypatch: pytest.MonkeyPatch, digits_teacher
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(*TRAIN, "--precision", "bf16", "--device", "cpu")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--precision bf16", "no native bf16", "--precision fp32")
    assert list(tmp_path.iterdir()) == []
    result = invoke_cli(
        "eval", digits_teacher, "--precision", "bf16", "--device", "cpu", "--split", "val"
    )
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--precision bf16")


@pytest.mark.parametrize(
    ("flag", "arithmetic"), [("auto", "bf16 autocast"), ("fp32", "fp32"), ("bf16", "bf16 autocast")]
)
def test_the_runs_first_line_says_the_precision_and_layout(
    cpu_bf16: None, tmp_path, monkeypatch: pytest.MonkeyPatch, flag: str, arithmetic: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(*TRAIN, "--precision", flag, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    first = result.stderr.splitlines()[0]
    if flag == "auto":  # bf16 where it measures faster than fp32 for this model
        assert "bf16 measured" in first
        arithmetic = "fp32" if "so fp32" in first else arithmetic
    assert first.startswith(f"precision: {arithmetic}, ")
    assert ("channels_last on cpu" in first) or ("contiguous (NCHW) on cpu" in first)
    history = json.loads((tmp_path / "models" / "digits_test_resnet_history.json").read_text())
    assert history["precision"] == first.removeprefix("precision: ")


def test_auto_on_a_cpu_without_bf16_is_fp32_without_a_word(
    no_cpu_bf16: None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(*TRAIN, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0].startswith("precision: fp32, ")
    assert "warning" not in result.stderr


def test_idle_taps_are_the_kernel_taps_that_only_meet_padding() -> None:
    conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
    assert idle_taps(conv, (1, 1)) and idle_taps(conv, (2, 2))  # tap 0 never sees row 0
    assert not idle_taps(conv, (3, 3)) and not idle_taps(conv, (7, 7))
    assert not idle_taps(torch.nn.Conv2d(4, 4, 1), (1, 1))
    assert idle_taps(torch.nn.Conv2d(4, 4, 3, padding="same"), (1, 1))
    assert not idle_taps(torch.nn.Conv2d(4, 4, 3, padding="valid"), (3, 3))


def test_bf16_training_on_tiny_maps_keeps_finite_weights(cpu_bf16: None) -> None:
    """oneDNN's bf16 weight gradient is garbage for taps that only meet padding (test_resnet's
    last stage is 1x1 at 16 px); the guarded model trains with the fp32 gradient there."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).train()
    precision = keep_idle_tap_convs_fp32(Precision.resolve("bf16", CPU), model, (3, 16, 16))
    assert precision.fp32_convs >= 1 and "kept in fp32" in precision.describe()
    optimizer = torch.optim.AdamW(model.parameters())
    images, labels = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    guarded = [m for m in model.modules() if type(m).__name__.startswith("Fp32")]
    for _ in range(6):
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        for conv in guarded:  # the idle taps' gradient is exactly zero, as in fp32
            assert torch.isfinite(conv.weight.grad).all()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = model.state_dict()  # what checkpoints hold: plain keys, loadable by timm
    plain = timm.create_model("test_resnet", num_classes=10)
    plain.load_state_dict(state)
    assert torch.isfinite(plain.eval()(images)).all()


def _count_measurements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time a layout is timed."""
    measured: list[int] = []
    real = precision_module._measure

    def counting(*args):
        measured.append(1)
        return real(*args)

    monkeypatch.setattr(precision_module, "_measure", counting)
    return measured


def test_a_model_of_the_same_shape_is_measured_once_a_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured = _count_measurements(monkeypatch)
    base = Precision.resolve("fp32", CPU)
    first = choose_layout(base, timm.create_model("test_resnet", num_classes=3), (3, 16, 16), CTX,
                          train=False)  # fmt: skip
    again = choose_layout(base, timm.create_model("test_resnet", num_classes=3), (3, 16, 16), CTX,
                          train=False)  # fmt: skip
    assert len(measured) == 1 and again == first
    choose_layout(base, timm.create_model("test_resnet", num_classes=5), (3, 16, 16), CTX,
                  train=False)  # fmt: skip
    choose_layout(base, timm.create_model("test_resnet", num_classes=3), (3, 16, 16), CTX,
                  train=True)  # fmt: skip
    assert len(measured) == 3  # another classifier shape, then training: measured anew


def test_the_layout_is_measured_on_students_with_exits_and_feature_adapters() -> None:
    # Their training outputs nest: (heads, adapted maps) for feature distillation.
    backbone = timm.create_model("test_resnet", num_classes=3)
    student = MultiExitStudent(backbone, "test_resnet", [0, 1], 3, 16)
    adapted = FeatureAdaptedStudent(student, [8, 8]).train()
    heads, maps = adapted(torch.zeros(2, 3, 16, 16))
    assert len(heads) == 3 and [m.shape[1] for m in maps] == [8, 8]
    for model in (student, adapted):
        chosen = choose_layout(Precision.resolve("fp32", CPU), model, (3, 16, 16), CTX, train=True)
        assert "channels_last measured" in chosen.why


def test_eval_under_auto_on_a_bf16_cpu_is_fp32_so_its_figures_do_not_follow_a_timing(
    cpu_bf16: None, digits_teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the probe would time, evaluation measures in fp32 under auto on a CPU.
    monkeypatch.setattr(precision_module, "BF16_MARGIN", 0.0)  # bf16 would win any timing
    said = invoke_cli("eval", digits_teacher)
    assert said.exit_code == 0, said.stderr
    assert "precision: fp32" in said.stderr and "auto: fp32 for figures" in said.stderr
    bf16 = invoke_cli("eval", digits_teacher, "--precision", "bf16")
    assert "precision: bf16 autocast" in bf16.stderr
    auto = json.loads(invoke_cli("eval", digits_teacher, "--json").stdout)
    fp32 = json.loads(invoke_cli("eval", digits_teacher, "--json", "--precision", "fp32").stdout)
    assert (auto["top1"], auto["nll"]) == (fp32["top1"], fp32["nll"])


def test_a_run_too_short_to_pay_for_the_timing_is_not_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision_module, "PROBE_SHARE", 0.1)
    timed = _count_measurements(monkeypatch)
    model = timm.create_model("test_resnet", num_classes=3)
    base = Precision.resolve("fp32", CPU)
    # 2 candidates x (warm-up + LAYOUT_STEPS rounds) x 32 images = 256 images of timing.
    short = choose_layout(base, model, (3, 16, 16), CTX, train=True, batch=32, run_images=2559)
    assert timed == [] and not short.channels_last
    assert "NCHW, not timed: a run of 2559 images is too short" in short.why
    long = choose_layout(base, model, (3, 16, 16), CTX, train=True, batch=32, run_images=2560)
    assert timed == [1] and "channels_last measured" in long.why
    # Timed once, the answer is kept for a short run too, at no cost.
    again = choose_layout(base, model, (3, 16, 16), CTX, train=True, batch=32, run_images=100)
    assert timed == [1] and again == long
    # bf16 under auto is kept as the CPU offers it, untimed too.
    auto = replace(base, bf16=True, auto=True, why="this CPU has avx512_bf16")
    untimed = choose_layout(auto, model, (3, 16, 16), CTX, train=True, batch=32, run_images=100)
    assert untimed.bf16 and timed == [1] and "not timed" in untimed.why


def test_a_short_runs_first_line_says_the_layout_was_not_timed(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "PROBE_SHARE", 0.1)
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(*TRAIN, "--precision", "fp32", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("precision: fp32, contiguous (NCHW) on cpu"), first
    assert "not timed" in first and "too short" in first
