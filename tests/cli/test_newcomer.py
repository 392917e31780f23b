"""What a newcomer reads: the precision said once, one line an epoch, one name for each exit,
every written file named, tables that fit 80 columns whole, a suggestion for a mistyped dataset,
--pretrained offline in one line, and the data folder taken from the model card."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_TEACHER, assert_error_line, invoke_cli, working_dir, write_image_folder
from mlkd_cli.commands import ensemble as ensemble_command
from mlkd_cli.commands import evaluate as evaluate_command
from rich.console import Console

from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.console import OutputOptions, Reporter, fit_table, new_run
from mlkd_cli.export.int8_plan import Int8Options, plan_int8
from mlkd_cli.models import factory

WIDTH = 80


def rendered(draw) -> str:
    """What `draw(report)` prints on stdout on an 80-column terminal."""
    report = Reporter(OutputOptions())
    buffer = io.StringIO()
    report.out = Console(file=buffer, width=WIDTH, highlight=False, color_system=None)
    draw(report)
    return buffer.getvalue()


def assert_fits(text: str, *values: str) -> None:
    """Every line within 80 columns, no value cut (no ellipsis), each value whole on a line."""
    lines = text.splitlines()
    assert lines and all(len(line) <= WIDTH for line in lines), text
    assert "…" not in text, text
    for value in values:
        assert any(value in line for line in lines), f"{value!r} not whole in\n{text}"


# Each result table as its command fills it, with the longest values a real run gives.
TABLES = {
    "pipeline": (
        "digits: test split (runs/demo)",
        ["model", "role", "params (M)", "top-1 %", "NLL", "ECE", "MACs %", "img/s"],
        [
            ["test_convnext", "teacher", "0.48", "97.22", "0.1234", "0.0123", None, "1234"],
            ["ensemble", "ensemble", "0.85", "97.50", "0.1100", "0.0100", None, None],
            ["s_exits.pth exit 3", "exit", "0.37", "95.83", "0.1500", "0.0211", "78.8", "12345"],
            ["s_ce_baseline", "baseline", "0.37", "93.69", "0.2100", "0.0300", "100.0", "9999"],
        ],
        ["test_convnext", "s_exits.pth exit 3", "s_ce_baseline", "baseline", "12345"],
    ),
    "teacher": (
        "teacher t: test_convnext on digits",
        ["best epoch", "val top-1 %", "val top-5 %", "val NLL", "img/s"],
        [["100/100", "97.22", "100.00", "0.1234", "1234"]],
        ["100/100", "100.00"],
    ),
    "distill": (
        "s: best epoch 30/30",
        ["head", "val top-1 %", "val NLL"],
        [["final", "95.83", "0.1500"], ["exit 1", "90.00", "0.3000"]],
        ["exit 1", "95.83"],
    ),
    "distillation gain": (  # a column without a header
        "distillation against cross-entropy training of the same student (test split)",
        ["", "top-1 %", "NLL"],
        [["distilled student", "95.83", "0.1500"], ["cross-entropy baseline", "93.69", "0.21"]],
        ["cross-entropy baseline", "distilled student", "93.69"],
    ),
    "eval": (
        "digits test",
        ["checkpoint", "params (M)", "images", "top-1 %", "top-5 %", "NLL", "ECE", "img/s"],
        [
            [
                "models/my_student_exits.pth",
                "0.37",
                "359",
                "95.83",
                "100.00",
                "0.15",
                "0.02",
                "999",
            ],
            ["models/teacher_convnext.pth", "0.48", "359", "97.22", "100.00", "0.12", "0.01", None],
        ],
        ["models/my_student_exits.pth", "models/teacher_convnext.pth", "100.00"],
    ),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_each_result_table_fits_80_columns_with_its_values_whole(name: str) -> None:
    title, columns, rows, values = TABLES[name]
    assert_fits(rendered(lambda report: report.table(title, columns, rows)), *values)


@pytest.mark.parametrize(
    ("command", "values"),
    [
        (("data", "list"), ["data/cifar-10-batches-py", "oxford-iiit", "from files"]),
        (("distill", "--list-losses"), ["dkd+feature", "tckd_weight=1:", "nckd_weight=8:"]),
        (("presets", "list"), ["resnetv2_50x1_bit", "oxford-iiit"]),
    ],
)
def test_listing_tables_fit_80_columns_with_words_whole(
    command: tuple[str, ...], values: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    result = invoke_cli(*command)
    assert result.exit_code == 0, result.stderr
    assert_fits(result.stdout, *values)


def test_the_eval_tables_of_a_student_with_exits_fit_80_columns() -> None:
    heads = [
        {"head": f"exit {i}" if i else "final", "module": f"stages.{i - 1}" if i else None}
        | {"top1": 90.0 + i, "nll": 0.3, "ece": 0.02}
        | {"macs": 1.5e6 * (i + 1), "macs_pct": 20.0 * (i + 1), "images_per_s": 12345.0}
        for i in range(4)
    ]
    cascade = {"thresholds": [0.85, 0.9, 0.95], "rule": "chosen", "top1": 95.0, "nll": 0.2}
    cascade |= {"exit_shares": [50.0, 20.0, 10.0, 20.0], "macs_pct": 61.5, "images_per_s": 999.0}
    result = {
        "dataset": "imagefolder",
        "split": "val",
        "images": 1000,
        "heads": heads,
        "exit_rule": "max_softmax",
        "cascades": [cascade],
        "timed_images": 0,
    }
    job = type("Job", (), {"label": "my_student_exits.pth", "early_exit": False})()
    text = rendered(lambda report: evaluate_command._render_anytime(report, result, job))
    assert_fits(text, "0.85,0.9,0.95", "(chosen)", "exit 3 (stages.2)", "12345", "thresholds")


def test_the_ensemble_table_fits_80_columns() -> None:
    rows = [
        {"name": "models/teacher_convnext_long.pth", "arch": "test_convnext", "top1": 97.2}
        | {"nll": 0.1234},
        {"name": "models/teacher_resnet.pth", "arch": "resnet18", "top1": 96.1, "nll": 0.2},
    ]
    text = rendered(lambda report: ensemble_command._render(report, "ensemble", rows, [0.6, 0.4]))
    assert_fits(text, "models/teacher_convnext_long.pth", "test_convnext", "0.6000")


def test_columns_that_cannot_share_80_columns_fold_into_tables_led_by_the_row_name() -> None:
    columns = ["checkpoint", *(f"metric number {i}" for i in range(12))]
    rows = [["models/a_rather_long_student_name.pth", *(f"{i}.123456" for i in range(12))]]
    tables = fit_table("many", columns, rows, WIDTH)
    assert len(tables) > 1
    buffer = io.StringIO()
    console = Console(file=buffer, width=WIDTH, color_system=None)
    for table in tables:
        console.print(table)
    text = buffer.getvalue()
    assert_fits(text, "models/a_rather_long_student_name.pth", "0.123456", "11.123456")
    assert text.count("models/a_rather_long_student_name.pth") == len(tables)


def test_the_precision_line_is_said_once_a_run_and_again_by_the_next_command(
    digits_teacher: Path, tmp_path: Path
) -> None:
    twin = tmp_path / "t2.pth"
    twin.write_bytes(digits_teacher.read_bytes())
    for _ in range(2):  # two commands in one process: each says it once
        result = invoke_cli("eval", digits_teacher, twin, "--world-size", "1")
        assert result.exit_code == 0, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("precision:")]
        assert len(lines) == 1, result.stderr


def test_a_precision_that_differs_is_said_again() -> None:
    new_run()
    buffer = io.StringIO()
    report = Reporter(OutputOptions())
    report.err = Console(file=buffer, width=200, color_system=None)
    report.precision("precision: fp32, contiguous (NCHW) on cpu (a)", "fp32 nchw")
    report.precision("precision: fp32, contiguous (NCHW) on cpu (b)", "fp32 nchw")
    report.precision("precision: fp32, channels_last on cpu (c)", "fp32 nhwc")
    report.precision("precision: fp32, contiguous (NCHW) on cpu (d)", "fp32 nchw")
    assert buffer.getvalue().splitlines() == [
        "precision: fp32, contiguous (NCHW) on cpu (a)",
        "precision: fp32, channels_last on cpu (c)",
        "precision: fp32, contiguous (NCHW) on cpu (d)",  # a change back is said too
    ]


@pytest.fixture(scope="module")
def distilled(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-epoch distillation from the digits teacher, run from its own folder: the folder and
    what the user saw."""
    folder = tmp_path_factory.mktemp("newcomer-distill")
    with working_dir(folder):
        result = invoke_cli(
            "distill", "--dataset", "digits", "--checkpoint", digits_teacher, "--model",
            "test_resnet", "--student", "test_resnet", "--img-size", "16", "-e", "2", "-b", "64",
            "-n", "s", "--world-size", "1", "--save-frequency", "1", "--precision", "fp32",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return folder, result


@pytest.mark.slow
def test_distill_says_one_line_an_epoch_and_names_its_exits_one_way(distilled) -> None:
    _, result = distilled
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all(len(line) <= WIDTH and ", exit " in line for line in epochs), epochs
    assert "┃" not in result.stderr  # no table per epoch on stderr
    # What the run says before its epochs fits 80 columns too (the precision's reasons aside).
    said = [line for line in result.stderr.splitlines() if not line.startswith("precision:")]
    assert all(len(line) <= WIDTH for line in said), result.stderr
    # The one head table, on stdout at the end: final, exit 1, exit 2, exit 3.
    heads = [line.split("│")[1].strip() for line in result.stdout.splitlines() if "│" in line]
    assert heads == ["final", "exit 1", "exit 2", "exit 3"]
    for text in (result.stdout, result.stderr):
        assert "layer1" not in text and "stages." not in text


@pytest.mark.slow
def test_distill_names_every_file_it_wrote(distilled) -> None:
    folder, result = distilled
    written = {p.relative_to(folder).as_posix() for p in (folder / "models").iterdir()}
    assert {"models/s_exits.pth", "models/s_e1.pth", "models/s_e2.pth"} <= written
    for path in written:
        assert path in result.stderr, f"{path} written but not named:\n{result.stderr}"
    assert all(len(line) <= WIDTH for line in result.stderr.splitlines() if "saved" in line)


def test_a_mistyped_dataset_gets_a_suggestion(tmp_path: Path) -> None:
    result = invoke_cli(*DIGITS_TEACHER[:2], "-d", "imagefoldr", "--model", "test_resnet")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "unknown dataset 'imagefoldr'", "did you mean imagefolder?")
    far = invoke_cli(*DIGITS_TEACHER[:2], "-d", "x" * 500, "--model", "test_resnet")
    line = assert_error_line(far.stderr, "choose one of: cifar-10")
    assert "did you mean" not in line and len(line) < 250


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple]:
    """No host answers and both weight caches are empty; the connections tried are recorded."""
    import huggingface_hub.constants

    tried: list[tuple] = []

    def refuse(address, *args, **kwargs):
        tried.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for name in factory.PROXY_VARIABLES:  # a proxy's machine is tested by the proxy test
        monkeypatch.delenv(name, raising=False)
    return tried


def test_pretrained_offline_is_one_line_after_one_try(no_network: list, tmp_path: Path) -> None:
    with working_dir(tmp_path):
        result = invoke_cli(*DIGITS_TEACHER, "--pretrained", "-n", "p", "-e", "1")
    assert result.exit_code == 2
    assert_error_line(result.stderr, "test_resnet", "not in the local cache", "--init-checkpoint")
    assert no_network == [("huggingface.co", 443)]  # one quick check, no retries
    assert not (tmp_path / "models").exists()


def test_pretrained_with_hf_hub_offline_tries_no_connection(
    no_network: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match="--init-checkpoint") as caught:
        factory.build_model("test_resnet", 10, pretrained=True)
    assert type(caught.value).__name__ == "UserError" and no_network == []


def test_pretrained_weights_in_the_local_cache_load_without_the_network(
    no_network: list, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    source = factory.timm.create_model("test_resnet", num_classes=1000)
    snapshot = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    model = factory.build_model("test_resnet", 10, pretrained=True)
    assert no_network == []
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.get_classifier().out_features == 10


@pytest.fixture(scope="module")
def folder_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An image-folder teacher (1 epoch) and the folder it was trained on."""
    root = tmp_path_factory.mktemp("folder-teacher")
    data = write_image_folder(root / "pets", {"train": 16, "val": 4, "test": 3})
    with working_dir(root):
        result = invoke_cli(
            "teacher", "train", "-d", "imagefolder", "--data-dir", "pets", "--model",
            "test_resnet", "--img-size", "16", "-n", "f", "-e", "1", "-b", "8", "-q",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return root / "models" / "f.pth", data


@pytest.mark.slow
def test_eval_reads_the_folder_the_card_records_unless_data_dir_is_given(
    folder_teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, data = folder_teacher
    with working_dir(tmp_path):  # no ./data here: only the card knows where the images are
        result = invoke_cli("eval", checkpoint, "--world-size", "1")
        assert result.exit_code == 0, result.stderr
        said = [line for line in result.stderr.splitlines() if line.startswith("data from")]
        assert said == [f"data from {data.resolve()}, the folder f.pth was trained on "
                        "(--data-dir overrides)"]  # fmt: skip
        counted = invoke_cli("eval", checkpoint, "--world-size", "1", "--json")
        assert '"images": 6' in counted.stdout  # 3 test images of each of 2 classes
        other = write_image_folder(tmp_path / "other", {"train": 8, "test": 5})
        given = invoke_cli("eval", checkpoint, "--data-dir", other, "--world-size", "1", "--json")
        assert given.exit_code == 0, given.stderr
        assert "data from" not in given.stderr and '"images": 10' in given.stdout


@pytest.mark.slow
def test_export_int8_calibrates_on_the_folder_the_card_records(
    folder_teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    checkpoint, data = folder_teacher
    card = ModelCard.from_checkpoint(torch.load(checkpoint, weights_only=True))
    assert card.extra["data_dir"] == str(data.resolve())
    with working_dir(tmp_path):
        plan = plan_int8(Int8Options(), card, checkpoint)
    assert plan.splits.counts()["test"] == 6 and plan.splits.num_classes == 2


@pytest.mark.slow
def test_eval_of_the_student_with_exits_fits_80_columns_and_names_heads_as_distill(
    distilled, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = distilled
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    with working_dir(folder):
        shown = invoke_cli("eval", "models/s_exits.pth", "--timing-images", "0", "--world-size", 1)
        measured = invoke_cli(
            "eval", "models/s_exits.pth", "--timing-images", "0", "--world-size", 1, "--json"
        )
    assert shown.exit_code == 0, shown.stderr
    assert_fits(shown.stdout, "exit 1 (layer1)", "exit 3 (layer3)", "thresholds", "exit 3")
    heads = json.loads(measured.stdout)["heads"]
    assert [h["head"] for h in heads] == ["final", "exit 1", "exit 2", "exit 3"]
    assert [h["module"] for h in heads] == [None, "layer1", "layer2", "layer3"]


def test_an_embedded_dataset_records_no_data_folder(digits_teacher: Path) -> None:
    card = ModelCard.from_checkpoint(torch.load(digits_teacher, weights_only=True))
    assert card.dataset == "digits" and "data_dir" not in card.extra


def test_a_proxy_or_an_endpoints_port_is_respected_by_the_quick_check(
    no_network: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    with pytest.raises(Exception, match="mirror.example cannot be reached"):
        factory.pretrained_source("test_resnet")
    assert no_network == [("mirror.example", 8080)]  # the endpoint's own port
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert factory.host_answers("huggingface.co") is True  # only the proxy can tell
    assert no_network == [("mirror.example", 8080)]  # no direct probe behind a proxy
