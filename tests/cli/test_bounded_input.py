"""Bounded input: every file a user hands mlkd is read with limits, every number is checked
finite and in range, and each refusal is one short line with exit code 2, before any work."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_error_line, invoke_cli, write_image_folder
from PIL import Image
from safetensors.torch import save_file

from mlkd_cli.core.checkpoint import ModelCard, save_model
from mlkd_cli.core.safeload import MAX_DEPTH, MAX_FILE_BYTES, QUOTE_CHARS, quote
from mlkd_cli.data.sources import MAX_IMAGE_PIXELS
from mlkd_cli.models.ensemble_config import MAX_MEMBERS

TRAIN = ("teacher", "train", "-d", "digits", "-m", "test_resnet", "-e", "1", "-q")
DISTILL = ("distill", "-d", "digits", "--student", "test_resnet", "-e", "1", "-q")
# Every command that takes --preset, as a user would type it with `p.yaml`.
PRESET_COMMANDS = {
    "teacher train": ("teacher", "train", "-d", "digits", "-m", "test_resnet", "--preset"),
    "distill": ("distill", "-d", "digits", "--student", "test_resnet", "--preset"),
    "teacher label": ("teacher", "label", "-o", "store", "-d", "digits", "--preset"),
    "ensemble build": ("ensemble", "build", "out.json", "--preset"),
    "pipeline": ("pipeline", "--preset"),
}
# The longest error line a refusal may print: the message plus ~100 characters of a value.
LONGEST_LINE = 300


def alias_bomb(levels: int, width: int = 9) -> tuple[str, str]:
    """`teachers:` holding YAML anchors, each a list of `width` aliases of the one before (9^9
    strings at 9 levels), and an alias of the last one to use as a value."""
    items = [f"  - &b0 [{', '.join(['xxxxxxxxx'] * width)}]"]
    for level in range(1, levels):
        items.append(f"  - &b{level} [{', '.join([f'*b{level - 1}'] * width)}]")
    return "teachers:\n" + "\n".join(items) + "\n", f"*b{levels - 1}"


def refused(*args: object, expect: tuple[str, ...] = ()) -> str:
    """Run mlkd; it must end with one short error line holding `expect`, exit code 2."""
    result = invoke_cli(*args)
    assert result.exit_code == 2, result.stdout + result.stderr[-2000:]
    line = assert_error_line(result.stderr, *expect)
    assert len(line) <= LONGEST_LINE, line[:1000]
    return line


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch folder the command runs in."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- YAML aliases


def test_an_alias_bomb_as_a_preset_value_is_refused_without_expanding(workdir: Path) -> None:
    anchors, alias = alias_bomb(9)
    (workdir / "p.yaml").write_text(f"{anchors}teacher:\n  lr: {alias}\n")
    (workdir / "warm.yaml").write_text("teachr: {epochs: 1}\n")
    refused(*TRAIN, "--preset", "warm.yaml")  # the command's imports, before measuring
    tracemalloc.start()
    try:
        refused(*TRAIN, "--preset", "p.yaml", expect=("p.yaml", "aliases", "size limit"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Expanded, the value is 9^9 strings (GBs as objects or as a repr).
    assert peak < 20 * 2**20


def test_an_alias_bomb_as_an_ensemble_weight_is_refused(workdir: Path) -> None:
    anchors, alias = alias_bomb(9)
    members = f"members:\n  - checkpoint: t.pth\n    model: test_resnet\n    weight: {alias}\n"
    (workdir / "e.yaml").write_text(anchors.replace("teachers:", "anchors:") + members)
    refused(*DISTILL, "--ensemble", "e.yaml", expect=("e.yaml", "aliases", "size limit"))
    refused("ensemble", "eval", "e.yaml", "-d", "digits", expect=("e.yaml", "size limit"))


def test_loading_an_alias_bomb_peaks_far_below_200_mb(tmp_path: Path) -> None:
    # The process's own peak (VmHWM: ru_maxrss would include the forking pytest's), in a fresh
    # interpreter that loads only the YAML loader.
    anchors, alias = alias_bomb(9)
    path = tmp_path / "p.yaml"
    path.write_text(f"{anchors}teacher:\n  lr: {alias}\n")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mlkd_cli.core.errors import UserError\n"
        "from mlkd_cli.core.safeload import load_data_file\n"
        "try:\n"
        "    load_data_file(Path(sys.argv[1]), 'preset', 'yaml')\n"
        "    print('loaded')\n"
        "except UserError as exc:\n"
        "    print('refused', exc)\n"
        "status = Path('/proc/self/status').read_text().splitlines()\n"
        "print(next(line.split()[1] for line in status if line.startswith('VmHWM:')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    verdict, peak_kib = done.stdout.strip().splitlines()
    assert verdict.startswith("refused"), done.stdout + done.stderr
    assert int(peak_kib) < 200 * 1024


def test_a_smaller_alias_bomb_gives_a_short_line_not_its_expansion(workdir: Path) -> None:
    # Five levels once gave a 481 KB error line (the value's repr).
    anchors, alias = alias_bomb(5)
    (workdir / "p.yaml").write_text(f"{anchors}teacher:\n  lr: {alias}\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("p.yaml",))


def test_an_alias_that_contains_itself_is_refused(workdir: Path) -> None:
    (workdir / "p.yaml").write_text("teacher:\n  scale: &loop [0.5, *loop]\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("p.yaml", "refers to itself"))


def test_anchors_within_the_budget_still_work(workdir: Path) -> None:
    # A merge key shares settings; the preset resolves (and is then refused for its typo'd
    # `epochz`, proving the shared values were read).
    (workdir / "p.yaml").write_text(
        "dataset: digits\n"
        "teachers:\n  - &base {model: test_resnet, epochs: 1}\n  - {<<: *base, epochz: 2}\n"
    )
    refused("pipeline", "--preset", "p.yaml", expect=("'epochz'", "teacher entry"))


def test_quote_cuts_a_shared_structure_without_building_its_repr() -> None:
    value: object = "x" * 9
    for _ in range(12):  # 9^12 strings if expanded
        value = [value] * 9
    text = quote(value)
    assert len(text) <= QUOTE_CHARS
    assert text.startswith("[[[")
    assert len(quote("y" * 10_000)) <= QUOTE_CHARS
    assert len(quote(10**400)) <= QUOTE_CHARS


# ----------------------------------------------------------------------------- size, depth, text


@pytest.mark.parametrize("syntax", ["json", "yaml"])
def test_a_file_nested_5000_deep_is_one_line(workdir: Path, syntax: str) -> None:
    (workdir / f"e.{syntax}").write_text("[" * 5000 + "]" * 5000 + "\n")
    refused(*DISTILL, "--ensemble", f"e.{syntax}", expect=(f"e.{syntax}", f"{MAX_DEPTH} levels"))
    (workdir / "p.yaml").write_text("teacher:\n  scale: " + "[" * 5000 + "]" * 5000 + "\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("p.yaml", f"{MAX_DEPTH} levels"))


def test_a_preset_over_the_size_cap_is_refused(workdir: Path) -> None:
    (workdir / "p.yaml").write_text("# " + "x" * MAX_FILE_BYTES + "\nteacher: {}\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("p.yaml", "MiB"))


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("p.yaml", (*TRAIN, "--preset", "p.yaml")),
        ("e.json", (*DISTILL, "--ensemble", "e.json")),
        ("e.yaml", ("ensemble", "eval", "e.yaml", "-d", "digits")),
    ],
)
def test_a_file_that_is_not_utf8_is_one_line(workdir: Path, name: str, args: tuple) -> None:
    content = (
        "description: caf\xe9\n"
        if name.endswith("yaml")
        else '{"members": [{"checkpoint": "caf\xe9.pth"}]}'
    )
    (workdir / name).write_bytes(content.encode("latin-1"))
    refused(*args, expect=(name, "not UTF-8", "save it as UTF-8"))


@pytest.mark.parametrize("file", ["train.csv", "classes.txt"])
def test_a_csv_dataset_file_that_is_not_utf8_is_one_line(workdir: Path, file: str) -> None:
    (workdir / "data" / "img").mkdir(parents=True)
    Image.new("L", (8, 8), 128).save(workdir / "data" / "img" / "a.png")
    (workdir / "data" / "train.csv").write_text("path,label\nimg/a.png,cat\n")
    (workdir / "data" / "classes.txt").write_text("cat\ndog\n")
    (workdir / "data" / file).write_bytes("path,label\nimg/a.png,caf\xe9\n".encode("latin-1"))
    args = ("teacher", "train", "-d", "csv", "-m", "test_resnet", "--data-dir", "data")
    refused(*args, expect=(file, "not UTF-8"))


# ----------------------------------------------------------------------------- ensemble files


def _members(count: int, **member: object) -> str:
    return json.dumps({"members": [{"checkpoint": f"m{i}.pth", **member} for i in range(count)]})


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (_members(10_000), ("10000 members", f"at most {MAX_MEMBERS}")),
        (
            json.dumps({"models": ["test_resnet"] * 65, "names": [f"n{i}" for i in range(65)]}),
            ("65 members",),
        ),
        (_members(1, model=5), ("member 1's model must be text", "got 5")),
        (_members(1, model="test_resnet", name=["a"]), ("member 1's name must be text",)),
        ('{"members": [{"checkpoint": 7}]}', ("member 1's checkpoint must be text",)),
        (
            '{"members": [{"checkpoint": "t.pth", "weight": 1' + "0" * 400 + "}]}",
            ("weight of member 1", "too large"),
        ),
        (
            '{"models": ["test_resnet"], "names": ["t"], "weights": [NaN]}',
            ("weight of 't'", "nan"),
        ),
    ],
    ids=["10000 members", "65 models", "model 5", "name list", "checkpoint 7", "1e400", "NaN"],
)
def test_an_ensemble_file_out_of_bounds_is_one_line(
    workdir: Path, content: str, expect: tuple[str, ...]
) -> None:
    (workdir / "e.json").write_text(content)
    line = refused(*DISTILL, "--ensemble", "e.json", expect=("e.json", *expect))
    assert "0" * 100 not in line  # the 401-digit weight is quoted short


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--warmup-epochs", "nan"),
        ("--weight-decay", "nan"),
        ("--val-fraction", "nan"),
    ],
)
def test_a_non_finite_number_is_refused_before_training(
    workdir: Path, flag: str, value: str
) -> None:
    refused(*TRAIN, flag, value, expect=(flag,))
    refused(*DISTILL, flag, value, expect=(flag,))
    assert not list(workdir.rglob("*.pth"))


def test_a_non_finite_or_huge_preset_number_is_refused(workdir: Path) -> None:
    (workdir / "p.yaml").write_text("teacher:\n  lr: .nan\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("--lr", "finite"))
    (workdir / "p.yaml").write_text("teacher:\n  lr: 1" + "0" * 400 + "\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("p.yaml", "lr is too large"))
    (workdir / "p.yaml").write_text("teacher:\n  scale: [0.5, .inf]\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("--scale", "finite"))


@pytest.mark.parametrize(
    ("flag", "value", "most"), [("--img-size", "100000", "4096"), ("--workers", "100000", "64")]
)
def test_a_size_past_its_cap_is_refused(workdir: Path, flag: str, value: str, most: str) -> None:
    refused(*TRAIN, flag, value, expect=(flag, f"at most {most}"))
    (workdir / "p.yaml").write_text(f"teacher:\n  {flag[2:].replace('-', '_')}: {value}\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=(flag, f"at most {most}"))


def test_a_non_finite_loss_parameter_is_refused(workdir: Path) -> None:
    args = (*DISTILL, "--loss", "dkd", "--loss-param", "beta=nan")
    refused(*args, expect=("--loss-param beta", "finite"))


# ----------------------------------------------------------------------------- checkpoint cards


def _card() -> ModelCard:
    return ModelCard(
        arch="test_resnet",
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        dataset="digits",
        img_size=16,
        crop_pct=1.0,
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("img_size", "big", "img_size 'big'"),
        ("img_size", 100_000, "img_size 100000"),
        ("img_size", True, "img_size True"),
        ("num_classes", 10**9, "num_classes 1000000000"),
        ("crop_pct", float("nan"), "crop_pct nan"),
        ("std", [0.0, 0.5, 0.5], "std [0.0, 0.5, 0.5]"),
        ("class_names", ["a"], "1 class names"),
    ],
)
def test_checkpoint_metadata_out_of_bounds_is_one_line(
    workdir: Path, key: str, value: object, expect: str
) -> None:
    save_model(workdir / "t.pth", timm.create_model("test_resnet", num_classes=10), _card(), 1, {})
    content = torch.load(workdir / "t.pth", weights_only=True)
    content[key] = value
    torch.save(content, workdir / "t.pth")
    refused("eval", "t.pth", "-d", "digits", expect=("t.pth", expect))
    refused(*DISTILL, "--model", "test_resnet", "--checkpoint", "t.pth", expect=("t.pth", expect))


def test_a_safetensors_card_out_of_bounds_is_one_line(workdir: Path) -> None:
    model = timm.create_model("test_resnet", num_classes=10)
    card = {**_card().__dict__, "img_size": 100_000}
    save_file(model.state_dict(), workdir / "t.safetensors", metadata={"mlkd": json.dumps(card)})
    refused("eval", "t.safetensors", "-d", "digits", expect=("t.safetensors", "img_size 100000"))


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("command", sorted(PRESET_COMMANDS))
def test_every_command_taking_a_preset_refuses_an_unknown_section(
    workdir: Path, command: str
) -> None:
    (workdir / "p.yaml").write_text("dataset: digits\nteachr: {epochs: 1}\n")
    refused(*PRESET_COMMANDS[command], "p.yaml", expect=("p.yaml", "unknown section 'teachr'"))
    assert sorted(p.name for p in workdir.iterdir()) == ["p.yaml"]  # nothing written


def test_a_preset_with_more_teachers_than_an_ensemble_holds_is_one_line(workdir: Path) -> None:
    teachers = "".join("  - {model: test_resnet}\n" for _ in range(MAX_MEMBERS + 1))
    (workdir / "p.yaml").write_text(f"dataset: digits\nteachers:\n{teachers}")
    refused("pipeline", "--preset", "p.yaml", expect=("p.yaml", f"{MAX_MEMBERS + 1} teachers"))
    assert not (workdir / "runs").exists()


def test_a_preset_setting_name_that_is_not_text_is_one_line(workdir: Path) -> None:
    (workdir / "p.yaml").write_text("teacher:\n  5: 1\n")
    refused(*TRAIN, "--preset", "p.yaml", expect=("p.yaml", "setting names are text"))


# ----------------------------------------------------------------------------- image pixels


def _declared_png(path: Path, side: int) -> None:
    """A real 8x8 PNG whose header (CRC fixed) declares `side` x `side` pixels: a few bytes
    on disk, like a decompression bomb, without writing one."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))


def test_an_image_over_the_pixel_limit_is_left_out_or_refused(workdir: Path) -> None:
    write_image_folder(workdir / "pets", {"train": 3, "val": 1})
    huge = workdir / "pets" / "train" / "cat" / "huge.png"
    _declared_png(huge, 13_000)
    assert MAX_IMAGE_PIXELS < 13_000**2
    args = ("teacher", "train", "-d", "imagefolder", "-m", "test_resnet", "--data-dir", "pets")
    args = (*args, "--img-size", "16", "-b", "4", "-e", "1", "--workers", "0")
    refused(*args, "-q", "--strict-data", expect=("huge.png", "13000x13000 pixels", "limit"))
    result = invoke_cli(*args)
    assert result.exit_code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "huge.png" in line]
    assert len(warning) == 1 and "left out" in warning[0] and "13000x13000" in warning[0]
    assert "DecompressionBomb" not in result.stderr


def test_a_list_setting_at_the_top_of_a_preset_is_told_where_it_goes(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("dataset: digits\nscale: [0.35, 1.0]\nteacher:\n  model: test_resnet\n")
    result = invoke_cli("teacher", "train", "--preset", preset, "--output-dir", tmp_path / "m")
    assert result.exit_code == 2
    line = assert_error_line(result.stderr, "'scale' holds a list", "inside `teacher:`")
    assert "unknown section" not in line
