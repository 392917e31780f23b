"""`mlkd export --int8`: the target CPU and its weights' range, agreement on every head and the
cascade, the target recorded and warned about where the file is loaded, flag mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_error_line, invoke_cli

from mlkd_cli.core import cpus
from mlkd_cli.core.cpus import CpuFeatures
from mlkd_cli.core.errors import UserError
from mlkd_cli.export.agreement import agreement_shortfalls, check_agreement
from mlkd_cli.export.int8_plan import resolve_int8_target

ZEN3 = CpuFeatures("x86_64", frozenset({"sse4_2", "avx", "avx2", "fma", "bmi2"}))
ZEN4 = CpuFeatures("x86_64", ZEN3.flags | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"})
SKYLAKE_X = CpuFeatures("x86_64", ZEN3.flags | {"avx512f", "avx512bw", "avx512cd"})
ALDER_LAKE = CpuFeatures("x86_64", ZEN3.flags | {"avx_vnni"})
SAPPHIRE_RAPIDS = CpuFeatures("x86_64", ZEN4.flags | {"amx_tile", "amx_int8"})
GRAVITON = CpuFeatures("aarch64", frozenset({"fp", "asimd", "asimddp"}))
UNREAD_X86 = CpuFeatures("x86_64", None)


@pytest.mark.parametrize(
    ("cpu", "target", "reduce_range", "why"),
    [
        (ZEN3, "avx2", True, "this CPU has no VNNI"),
        (SKYLAKE_X, "avx512", True, "AVX-512 but no VNNI"),
        (ZEN4, "vnni", False, "this CPU has VNNI"),
        (ALDER_LAKE, "vnni", False, "this CPU has VNNI"),  # AVX-VNNI, 256 bits
        (SAPPHIRE_RAPIDS, "vnni", False, "this CPU has VNNI"),
        (GRAVITON, "avx2", True, "aarch64, not x86"),  # 7-bit weights: right on any CPU
        (UNREAD_X86, "avx2", True, "features are unknown"),
    ],
)
def test_auto_int8_target_follows_the_cpu_flags_it_is_given(
    cpu: CpuFeatures, target: str, reduce_range: bool, why: str
) -> None:
    chosen = resolve_int8_target("auto", cpu)
    assert (chosen.name, chosen.reduce_range) == (target, reduce_range)
    assert why in chosen.reason
    state = "on" if reduce_range else "off"
    assert chosen.describe() == f"int8 target {target} ({chosen.reason}): reduce_range {state}"


def test_an_asked_int8_target_is_kept_whatever_the_cpu() -> None:
    # 7-bit weights wherever they are asked for, 8-bit for vnni even on a CPU without it,
    # which the line then says (the agreement check runs on this CPU's arithmetic).
    assert resolve_int8_target("avx2", ZEN4).reduce_range
    assert resolve_int8_target("avx512", ZEN3).reduce_range
    on_zen3 = resolve_int8_target("vnni", ZEN3)
    assert on_zen3.name == "vnni" and not on_zen3.reduce_range
    assert "this CPU has no VNNI" in on_zen3.reason
    assert resolve_int8_target("vnni", ZEN4).reason == "as asked"
    with pytest.raises(UserError, match="--int8-target is one of auto, avx2, avx512, vnni"):
        resolve_int8_target("avx9" * 100, ZEN4)


def test_auto_asks_this_cpu_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlkd_cli.core.checkpoint import ModelCard
    from mlkd_cli.export import int8_plan

    assert cpus.detect_cpu() is cpus.detect_cpu()  # read once a process
    card = ModelCard(**DIGITS_CARD)
    for cpu, target in ((ZEN3, "avx2"), (ZEN4, "vnni")):
        monkeypatch.setattr(int8_plan, "detect_cpu", lambda cpu=cpu: cpu)
        plan = int8_plan.plan_int8(int8_plan.Int8Options(Path("data")), card, Path("s.pth"))
        assert plan.target == resolve_int8_target("auto", cpu) and plan.target.name == target


def test_cpu_flags_are_read_from_cpuinfo_text() -> None:
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512bw\n"
    cpu = CpuFeatures("x86_64", cpus._cpuinfo_flags(text))
    assert cpu.has_avx512 and not cpu.has_vnni
    assert cpu.describe() == "x86_64: AVX-512, no VNNI"
    assert cpus._cpuinfo_flags("processor\t: 0\nFeatures\t: fp asimd\n") is None  # ARM's
    assert ZEN3.describe() == "x86_64: AVX2, no VNNI" and GRAVITON.describe() == "aarch64"


def _parity(agreement: list[float], cascade: float | None = None) -> dict:
    heads = ["final", *(f"exit{i}" for i in range(1, len(agreement)))]
    point = None if cascade is None else {"rule": "max_softmax", "agreement": cascade}
    return {"images": 144, "heads": heads, "agreement": agreement, "cascade": point}


def test_the_agreement_bound_holds_on_every_head_and_the_cascade() -> None:
    avx2, vnni = resolve_int8_target("avx2", ZEN3), resolve_int8_target("vnni", ZEN4)
    check_agreement(_parity([99.31, 99.0, 100.0], 99.0), 99.0, avx2)  # all at or over the bar
    assert agreement_shortfalls(_parity([100.0, 98.5, 99.5], 99.9), 99.0) == ["98.50 % (exit1)"]
    with pytest.raises(UserError) as refused:  # the final head is fine, an exit is not
        check_agreement(_parity([99.5, 98.5, 99.5]), 99.0, avx2)
    message = str(refused.value)
    assert "on 98.50 % (exit1) of the 144 validation images" in message
    assert "under --min-agreement 99; not written" in message and "final" not in message
    assert "--int8-target avx2" not in message  # already 7-bit weights
    with pytest.raises(UserError) as refused:  # every head fine, the cascade's decisions not
        check_agreement(_parity([100.0, 99.5], 97.92), 99.0, vnni)
    message = str(refused.value)
    assert "on 97.92 % (the cascade's exits and classes)" in message
    assert "try --int8-target avx2 (7-bit weights)" in message  # 8-bit weights: say the fix
    with pytest.raises(UserError, match=r"on 97.00 % \(final\), 98.00 % \(exit2\), 90.00 %"):
        check_agreement(_parity([97.0, 99.0, 98.0], 90.0), 99.0, avx2)


def test_the_mismatch_warning_names_target_cpu_and_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    path = tmp_path / "s_exits.int8.onnx"
    vnni = {cpus.INT8_TARGET_KEY: "vnni"}
    line = cpus.int8_target_warning(vnni, path, ZEN3)
    assert line is not None and "s_exits.int8.onnx is int8 for target vnni" in line
    assert "(x86_64: AVX2, no VNNI)" in line
    assert line.endswith("export with --int8-target auto on the machine that runs it")
    # Where the CPU has what the target assumes, the weights are 7-bit, the CPU is not x86
    # or unknown, or the file predates targets: nothing to say.
    for meta, cpu in [
        (vnni, ZEN4), (vnni, ALDER_LAKE), (vnni, GRAVITON), (vnni, UNREAD_X86),
        ({cpus.INT8_TARGET_KEY: "avx2"}, ZEN3), ({cpus.INT8_TARGET_KEY: "avx512"}, ZEN3),
        ({"mlkd_quantized": "int8 (onnxruntime static, QDQ, per channel)"}, ZEN3),
    ]:  # fmt: skip
        assert cpus.int8_target_warning(meta, path, cpu) is None, (meta, cpu)
    monkeypatch.setattr(cpus, "detect_cpu", lambda: ZEN3)  # as if run on a Zen 3
    cpus.warn_int8_target(vnni, path)
    cpus.warn_int8_target({cpus.INT8_TARGET_KEY: "avx2"}, path)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {line}"]


DIGITS_CARD = dict(
    arch="test_resnet", num_classes=10, class_names=[str(d) for d in range(10)],
    dataset="digits", img_size=16, crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3,
)  # fmt: skip


def _two_head_onnx(path: Path) -> Path:
    """A student with one exit as `mlkd export` writes its ONNX file, built by hand (no
    training): conv -> relu -> pool, a final head and an exit head on the pooled features, the
    card and the exits record (an operating point included) in its metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["final"], transB=1),
        helper.make_node("Gemm", ["f", "we", "be"], ["exit1"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two_heads",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 10])
            for name in ("final", "exit1")
        ],
        [
            weight("w1", 16, 3, 3, 3), weight("b1", 16), weight("wf", 10, 16),
            weight("bf", 10), weight("we", 10, 16), weight("be", 10),
        ],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    exits = {
        "stages": [0],
        "macs": {"img_size": 16, "segments": [1000, 500], "branches": [100], "head": 160},
        "thresholds": {"rule": "max_softmax", "values": [0.3]},
    }
    for key, value in (("mlkd", DIGITS_CARD), ("mlkd_exits", exits)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _int8_weights(path: Path) -> list[np.ndarray]:
    """The int8 file's quantized weight matrices (not its zero points, vectors of zeros)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    int8 = [
        numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8
    ]
    return [w for w in int8 if w.ndim >= 2]


@pytest.mark.parametrize(("target", "largest"), [("avx2", 64), ("avx512", 64), ("vnni", 127)])
def test_int8_weights_are_7_bit_for_targets_without_vnni_and_the_target_is_recorded(
    tmp_path: Path, target: str, largest: int
) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from mlkd_cli.core.checkpoint import ModelCard
    from mlkd_cli.export.int8 import quantize_export
    from mlkd_cli.export.int8_plan import Int8Options, plan_int8

    fp32 = _two_head_onnx(tmp_path / "s_exits.onnx")
    # A low bar: this test holds the file's weights and records, not this CPU's arithmetic.
    options = Int8Options(Path("data"), calibration_images=32, min_agreement=1.0, target=target)
    plan = plan_int8(options, ModelCard(**DIGITS_CARD), fp32)
    result = quantize_export(plan, fp32, tmp_path / "s_exits.int8.onnx")
    assert (result["target"], result["reduce_range"]) == (target, largest == 64)
    assert result["heads"] == ["final", "exit1"] and len(result["agreement"]) == 2
    cascade = result["cascade"]
    assert cascade["rule"] == "max_softmax" and cascade["thresholds"] == [0.3]
    assert 0 <= cascade["agreement"] <= 100 and result["images"] == 144
    weights = _int8_weights(tmp_path / "s_exits.int8.onnx")
    assert len(weights) == 3  # the conv's and both heads' (biases are int32)
    # Symmetric per-channel: each channel's largest weight lands on the range's end.
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == largest
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "s_exits.int8.onnx")).metadata_props}
    assert meta[cpus.INT8_TARGET_KEY] == target
    assert ("7-bit" if largest == 64 else "8-bit") in meta["mlkd_quantized"]
    assert json.loads(meta["mlkd_exits"])["thresholds"]["values"] == [0.3]  # carried over


def test_an_int8_file_for_vnni_warns_once_where_it_is_loaded_on_a_cpu_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("onnxruntime")
    from mlkd_cli.anytime import AnytimeClassifier, timing
    from mlkd_cli.core.checkpoint import ModelCard
    from mlkd_cli.export.int8 import quantize_export
    from mlkd_cli.export.int8_plan import Int8Options, plan_int8

    fp32 = _two_head_onnx(tmp_path / "s_exits.onnx")
    written = {}
    for target in ("vnni", "avx2"):
        options = Int8Options(Path("data"), calibration_images=32, min_agreement=1.0, target=target)
        plan = plan_int8(options, ModelCard(**DIGITS_CARD), fp32)
        written[target] = tmp_path / f"{target}.int8.onnx"
        quantize_export(plan, fp32, written[target])
    capsys.readouterr()
    monkeypatch.setattr(cpus, "detect_cpu", lambda: ZEN3)  # as if loaded on a Zen 3
    classifier = AnytimeClassifier.load(written["vnni"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: vnni.int8.onnx is int8 for target")
    assert "this CPU (x86_64: AVX2, no VNNI)" in lines[0] and "--int8-target auto" in lines[0]
    images = torch.zeros(2, 3, 16, 16)
    assert classifier.predict(images).labels.shape == (2,)  # a warning, not a refusal
    assert timing._onnx_cascade(written["vnni"], [0.3], "max_softmax") is not None
    assert len(capsys.readouterr().err.splitlines()) == 1  # eval --latency says it too
    for quiet in (written["avx2"], fp32):  # 7-bit weights; an fp32 file
        AnytimeClassifier.load(quiet)
        timing._onnx_cascade(quiet, [0.3], "max_softmax")
    monkeypatch.setattr(cpus, "detect_cpu", lambda: ZEN4)  # a CPU with VNNI
    AnytimeClassifier.load(written["vnni"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--int8-target", "avx2"), "--int8-target chooses how --int8 quantizes: add --int8"),
        (("--int8", "--int8-target", "avx9"), "'avx9' is not one of 'auto', 'avx2', 'avx512'"),
    ],
)
def test_int8_target_flag_mistakes_are_one_line(tmp_path: Path, args, message: str) -> None:
    result = invoke_cli("export", tmp_path / "s.pth", "--format", "onnx", *args)
    assert result.exit_code == 2, result.stdout
    assert_error_line(result.stderr, message)
    assert list(tmp_path.iterdir()) == []
