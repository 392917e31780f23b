"""`make bench` peers row: the same KD job run by mlkd and by the tool a user would pick instead.

Not a test. The job (issue #36): real handwritten digits as an image folder of 28 px grayscale
PNGs (train/, val/, test/), trained at --size px. The digits are the 1,797 UCI digits mlkd embeds
(8x8, upscaled): 1,438 training sources, so --images 4000 writes each up to three times, shifted
by a pixel (val: every 10th source with its copies, 401 images; test: the 359 test digits). A
resnet18 teacher trained once by `mlkd teacher train` (cached in the work folder), a
`test_efficientnet` student (--student), batch 64, T = 4, KD weight 0.9, seed 0. The tools take
turns over --rounds rounds, each run a whole process:

  timm       timm's own `train.py`, extracted at run time from --timm-repo (a clone or a bare
             mirror of pytorch-image-models; never a copy kept in this repository): logit KD
             (`--kd-model-name`), fp32, NCHW, SGD, 2 loader workers, `--no-aug`, cosine schedule.
             Its teacher comes from a local file: mlkd's checkpoint, written into an offline
             Hugging Face cache as `hf-hub:mlkd-peers/teacher-<size>` (config.json with the
             model's mean/std + model.safetensors, the layout of timm's own hub exports) and read
             under HF_HUB_OFFLINE=1 (train.py hands the teacher no checkpoint path of its own).
  mlkd-timm  `mlkd distill` doing timm's work: --exits none --no-augment, no Mixup/CutMix, SGD at
             the same learning rate, no warmup, cosine schedule.
  mlkd       `mlkd distill` with its defaults (exits, augmentation, Mixup/CutMix, AdamW).

Both mlkd rows run with mlkd's automatic precision, layout and loader workers (the first line of
the run says what it chose; the table's last column). Every run goes through peers_stamp.py,
which stamps each optimiser step (a global post-hook on torch's Optimizer.step, nothing of either
tool edited), so each tool is timed by one clock:

  wall       the command's start (before the interpreter starts) to its exit
  first      the start to the end of the first training step (start-up, imports, data set,
             models, probes, loader start, one step)
  img/s      training images/s from the stamps: in every epoch, the images of steps 2..N over the
             time from the end of step 1 to the end of step N (loader start, validation and saving
             between epochs fall outside); `own` is what the tool itself reports (timm: its
             logged average per epoch, mlkd: its history's images_per_s), mean over epochs
  probes s   mlkd's layout and precision measurement: from its teacher line to its `precision:`
             line, printed once both are measured (the student's build falls in it too)
  after      the end of the last step to the exit (last validation, checkpoints, reports)
  MB         what the run wrote into its output folder

    python benchmarks/peers.py --timm-repo ~/src/pytorch-image-models             # 32 px job
    python benchmarks/peers.py --timm-repo DIR --size 64 --student resnet50 --rounds 2
    python benchmarks/peers.py --timm-repo DIR --quick                            # ~2 min check
    python benchmarks/peers.py --original ~/src/MLKD --tools original,mlkd-original

--original DIR runs the original project's `mlkd.py` (from DIR: a clone or a bare mirror, read at
run time) on its own job beside `mlkd distill`: fake CIFAR-10 in the real on-disk format, 320
training images, 224 px, `resnetv2_50x1_bit` student with exits, the resnet18 teacher, batch 32,
1 epoch (its own flags otherwise: AdamW, Mixup/CutMix, 4 loader workers, fp32, 128 images an
optimiser step). Its files are read at run time into the work folder, none changed; two things
are shimmed around it (peers_stamp.py --original): it moves everything with `.to(rank)`, CUDA
device 0, which goes to the CPU here, and it asks torchvision for CIFAR-10 with download=True,
whose MD5 check of the real archive's files the fake ones cannot pass, so that check says yes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pickle
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
STAMP = HERE / "peers_stamp.py"
TOOLS = ("timm", "mlkd-timm", "mlkd")
ORIGINAL_TOOLS = ("original", "mlkd-original")
SHIFTS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)]
SHIFTS += [(2 * dx, 2 * dy) for dx, dy in SHIFTS[1:]]
LR = 0.05  # SGD's learning rate in both timm's and mlkd's "timm's work" runs


@dataclass
class Job:
    """One benchmark setting: what every tool trains."""

    work: Path
    size: int
    student: str
    epochs: int
    batch: int
    images: int
    teacher_epochs: int

    @property
    def data(self) -> Path:
        return self.work / f"digits_{self.images}"

    @property
    def teacher(self) -> Path:
        return self.work / "teachers" / f"teacher_{self.size}_{self.images}.pth"


@dataclass
class Run:
    """What one process did, timed."""

    tool: str
    round: int
    wall: float
    first: float = math.nan
    after: float = math.nan
    rate: float = math.nan
    own: float = math.nan
    megabytes: float = 0.0
    largest: str = ""
    note: str = ""
    log: list[tuple[float, str]] = field(default_factory=list)


# --- data ------------------------------------------------------------------------------------


def write_digits(out: Path, images: int) -> dict[str, int]:
    """The embedded UCI digits (1,438 train / 359 test source images, 8x8 upscaled to 28 px) as
    PNGs: `images` train+val images, each source digit also written shifted by 1-2 px where the
    sources are too few; val is every 10th source digit with all its copies; test the 359 test
    digits as they are. Written once (a finished folder holds DONE)."""
    done = out / "DONE"
    if done.exists():
        return json.loads(done.read_text())
    from mlkd_cli.data.sources import load_digits  # the digits mlkd ships

    shutil.rmtree(out, ignore_errors=True)
    raw = load_digits()
    copies = min(len(SHIFTS), math.ceil(images / len(raw.train)))
    counts = {"train": 0, "val": 0, "test": 0}
    written = 0
    for shift in SHIFTS[:copies]:
        for index in range(len(raw.train)):
            if written == images:
                break
            split = "val" if index % 10 == 0 else "train"
            _save(raw.train[index], out / split, f"{index}_{shift[0]}_{shift[1]}", shift)
            counts[split] += 1
            written += 1
    for index in range(len(raw.test)):
        _save(raw.test[index], out / "test", str(index), (0, 0))
        counts["test"] += 1
    done.write_text(json.dumps(counts))
    return counts


def _save(sample: tuple, folder: Path, stem: str, shift: tuple[int, int]) -> None:
    image, label = sample
    grey = image.convert("L").resize((28, 28), Image.BICUBIC)
    canvas = Image.new("L", (28, 28), 0)
    canvas.paste(grey, shift)
    (folder / str(label)).mkdir(parents=True, exist_ok=True)
    canvas.save(folder / str(label) / f"{stem}.png")


# --- teacher ---------------------------------------------------------------------------------


def mlkd_cmd() -> list[str]:
    """mlkd as the console script runs it, in this interpreter."""
    return [sys.executable, "-m", "mlkd_cli"]


def train_teacher(job: Job) -> None:
    """`mlkd teacher train` of the resnet18 teacher, once per size and data set."""
    if job.teacher.exists():
        return
    out = job.teacher.parent
    cmd = [*mlkd_cmd(), "teacher", "train", "-d", "imagefolder", "--data-dir", str(job.data)]
    cmd += ["--img-size", str(job.size), "-m", "resnet18", "-n", job.teacher.stem]
    cmd += ["-e", str(job.teacher_epochs), "--output-dir", str(out), "-q", "--overwrite"]
    print(f"training the teacher: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def export_teacher_to_hub(job: Job) -> tuple[str, Path]:
    """The teacher as a model of an offline Hugging Face cache (what timm reads for
    `hf-hub:` names): returns the name to give timm and the cache's HF_HOME."""
    import timm
    from safetensors.torch import save_file

    home = job.work / "hf_home"
    repo = f"teacher-{job.size}-{job.images}"
    root = home / "hub" / f"models--mlkd-peers--{repo}"
    revision = "0" * 40
    snapshot = root / "snapshots" / revision
    card = json.loads(job.teacher.with_name(f"{job.teacher.stem}_history.json").read_text())
    card = card["model_card"]
    if not (snapshot / "model.safetensors").exists():
        model = timm.create_model(
            card["arch"], num_classes=card["num_classes"], checkpoint_path=str(job.teacher)
        )
        snapshot.mkdir(parents=True, exist_ok=True)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(revision)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(snapshot / "model.safetensors"))
        cfg = {
            "input_size": [3, card["img_size"], card["img_size"]],
            "mean": card["mean"],
            "std": card["std"],
            "crop_pct": card["crop_pct"],
            "interpolation": card["interpolation"],
            "num_classes": card["num_classes"],
        }
        config = {"architecture": card["arch"], "num_classes": card["num_classes"]}
        (snapshot / "config.json").write_text(json.dumps({**config, "pretrained_cfg": cfg}))

    return f"hf-hub:mlkd-peers/{repo}", home


def extract_timm_train(repo: Path, revision: str, work: Path) -> Path:
    """timm's train.py from a clone, a bare mirror (at `revision`) or a folder holding it."""
    out = work / f"timm_train_{revision.replace('/', '_')}.py"
    if (repo / "train.py").is_file() and revision == "WORKTREE":
        shutil.copyfile(repo / "train.py", out)
        return out
    text = subprocess.run(
        ["git", "-C", str(repo), "show", f"{revision}:train.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    out.write_text(text)
    return out


# --- the runs --------------------------------------------------------------------------------


def tool_command(tool: str, job: Job, out: Path, ctx: dict) -> tuple[list[str], dict[str, str]]:
    """The command line of one tool on the job, and the environment it needs beside ours."""
    common = ["--img-size", str(job.size), "--epochs", str(job.epochs)]
    common += ["--batch-size", str(job.batch), "--seed", "0"]
    if tool == "timm":
        cmd = [str(ctx["timm_train"]), "--data-dir", str(job.data), "--train-split", "train"]
        cmd += ["--val-split", "val", "--model", job.student, "--num-classes", "10", *common]
        cmd += ["--no-aug", "--kd-model-name", ctx["hub_name"], "--kd-temperature", "4"]
        cmd += ["--task-loss-weight", "0.1", "--opt", "sgd", "--lr", str(LR)]
        cmd += ["--warmup-epochs", "0", "--sched", "cosine", "-j", "2", "--device", "cpu"]
        cmd += ["--output", str(out), "--experiment", "run"]
        return cmd, {"HF_HOME": str(ctx["hf_home"]), "HF_HUB_OFFLINE": "1"}
    cmd = ["-m", "mlkd_cli", "distill", "-d", "imagefolder", "--data-dir", str(job.data)]
    cmd += ["--student", job.student, "-c", str(job.teacher), *common]
    cmd += ["--temperature", "4", "--alpha", "0.9", "--output-dir", str(out), "-n", "run"]
    if tool == "mlkd-timm":
        cmd += ["--exits", "none", "--no-augment", "--mixup-alpha", "0", "--cutmix-alpha", "0"]
        cmd += ["--optimizer", "sgd", "--lr", str(LR), "--warmup-epochs", "0"]
    return cmd, {}


def run_stamped(
    tool: str,
    rnd: int,
    cmd: list[str],
    env: dict[str, str],
    out: Path,
    cwd: Path | None = None,
    profile: Path | None = None,
    setup: list[tuple[str, Path]] = (),
) -> Run:
    """Run `cmd` (a script or `-m module` with its arguments) under peers_stamp.py, stamping
    every line it prints on arrival; the clock starts before the interpreter does."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "models").mkdir()
    for name, target in setup:
        (out / name).symlink_to(target)
    stamps = out.parent / f"{out.name}.stamps.json"
    stamps.unlink(missing_ok=True)
    pre = ["--profile", str(profile)] if profile else []
    full = [sys.executable, str(STAMP), str(stamps), *pre, *cmd]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    log: list[tuple[float, str]] = []
    began = time.time()
    with subprocess.Popen(
        full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ, cwd=cwd
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append((time.time() - began, line.rstrip("\n")))
    ended = time.time()
    (out.parent / f"{out.name}.log").write_text(
        "\n".join(f"{t:8.2f} {line}" for t, line in log) + "\n"
    )
    run = Run(tool, rnd, ended - began, log=log)
    if proc.returncode != 0:
        tail = " | ".join(line for _, line in log[-3:])
        run.note = f"exit {proc.returncode}: {tail[:300]}"
        return run
    steps = json.loads(stamps.read_text())["steps"] if stamps.exists() else []
    if steps:
        run.first = steps[0] - began
        run.after = ended - steps[-1]
    run.steps = steps  # type: ignore[attr-defined]
    files = [p for p in out.rglob("*") if p.is_file()]
    run.megabytes = sum(p.stat().st_size for p in files) / 1e6
    if files:
        big = max(files, key=lambda p: p.stat().st_size)
        run.largest = f"{big.name} {big.stat().st_size / 1e6:.0f} MB"
    return run


def stamped_rate(
    steps: list[float], epochs: int, per_step: int, epoch_images: int | None = None
) -> float:
    """Training images/s from step stamps: the images after step 1 of each epoch over the time
    from the end of its step 1 to the end of its last (`epoch_images`: an epoch's images where
    its last step holds fewer than `per_step`; otherwise every step holds `per_step`)."""
    per = len(steps) // epochs
    if per < 2:
        return math.nan
    images = seconds = 0.0
    for e in range(epochs):
        chunk = steps[e * per : (e + 1) * per]
        images += (epoch_images or len(chunk) * per_step) - per_step
        seconds += chunk[-1] - chunk[0]
    return images / seconds


def own_rate(tool: str, run: Run, out: Path) -> float:
    """The tool's own images/s, mean over epochs: timm's logged epoch average, mlkd's history."""
    if tool.startswith("mlkd"):
        history = next(out.glob("*_history.csv"), None)
        if history is None:
            return math.nan
        with history.open() as f:
            rates = [float(row["images_per_s"]) for row in csv.DictReader(f)]
        return statistics.mean(rates) if rates else math.nan
    import re

    last: dict[str, float] = {}
    pattern = re.compile(r"Train: (\d+) \[.*?\(\s*[\d.]+s,\s*([\d.]+)/s\)")
    for _, line in run.log:
        match = pattern.search(line)
        if match:
            last[match.group(1)] = float(match.group(2))
    return statistics.mean(last.values()) if last else math.nan


def probe_seconds(run: Run) -> float:
    """mlkd's layout and precision measurement, part of its start-up: from the line before its
    `precision:` line (the teacher loaded) to that line, which follows the measurement."""
    for (before, _), (at, line) in zip(run.log, run.log[1:], strict=False):
        if line.startswith("precision:"):
            return at - before
    return math.nan


def precision_note(run: Run) -> str:
    """What mlkd chose (its first line), shortened; timm's settings for timm."""
    for _, line in run.log:
        if line.startswith("precision:"):
            return line.removeprefix("precision:").split("(")[0].strip()
    return "fp32, NCHW" if run.tool in ("timm", "original") else ""


# --- the report ------------------------------------------------------------------------------


def machine() -> str:
    """The CPU, its cores, bf16 support, and the load when asked."""
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    bf16 = "bf16 (avx512_bf16/amx)" if "avx512_bf16" in flags or "amx_bf16" in flags else "no bf16"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{name}, {os.cpu_count()} cores, {bf16}; load average {load}"


def print_table(runs: list[Run], title: str, markdown: bool) -> None:
    """Every run, then each tool's mean and its ratio to the first tool's."""
    head = ["tool", "round", "wall s", "first step s", "probes s", "img/s", "own img/s"]
    head += ["after s", "MB", "largest file", "precision / note"]
    rows = [
        [
            r.tool,
            str(r.round),
            f"{r.wall:.1f}",
            f"{r.first:.1f}",
            f"{probe_seconds(r):.1f}",
            _rate(r.rate),
            _rate(r.own),
            f"{r.after:.1f}",
            f"{r.megabytes:.1f}",
            r.largest,
            r.note or precision_note(r),
        ]
        for r in runs
    ]
    print(f"\n{title}")
    _print_rows(head, rows, markdown)
    tools = list(dict.fromkeys(r.tool for r in runs))
    means = {t: _means([r for r in runs if r.tool == t]) for t in tools}
    base = tools[0]
    print(f"\nmeans over rounds, and ratios to {base} (img/s: higher is faster; wall: lower is)")
    head = ["tool", "wall s", "first step s", "img/s", "after s", "img/s ratio", "wall ratio"]
    rows = []
    for t in tools:
        m, b = means[t], means[base]
        rows.append(
            [
                t,
                f"{m['wall']:.1f}",
                f"{m['first']:.1f}",
                _rate(m["rate"]),
                f"{m['after']:.1f}",
                f"{m['rate'] / b['rate']:.2f}x",
                f"{m['wall'] / b['wall']:.2f}x",
            ]
        )
    _print_rows(head, rows, markdown)


def _rate(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _means(runs: list[Run]) -> dict[str, float]:
    def mean(name: str) -> float:
        values = [getattr(r, name) for r in runs if not math.isnan(getattr(r, name))]
        return statistics.mean(values) if values else math.nan

    return {name: mean(name) for name in ("wall", "first", "rate", "after")}


def _print_rows(head: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    for row in [head, *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


# --- the original's job -----------------------------------------------------------------------

ORIGINAL_TITLE = (
    "the original's job: fake CIFAR-10 (320 train images), 224 px, resnetv2_50x1_bit with "
    "exits, resnet18 teacher, batch 32, 1 epoch"
)
ORIGINAL_IMAGES, ORIGINAL_TEST = 320, 64


def write_fake_cifar10(root: Path) -> Path:
    """CIFAR-10 in its on-disk format (python pickles of uint8 rows), random pixels: 320 train
    images over the five data batches, 64 test images. Returns the folder holding
    cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    if (folder / "test_batch").exists():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = ORIGINAL_IMAGES // 5
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in names:
        count = ORIGINAL_TEST if name == "test_batch" else per
        batch = {
            "batch_label": name,
            "labels": [int(x) for x in rng.integers(0, 10, count)],
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)  # the format's own encoding; we only write it
    meta = {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": per}
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(meta, f)
    return root


def extract_original(repo: Path, work: Path) -> Path:
    """The original's files (mlkd.py and utils/) from a clone or a bare mirror, at HEAD."""
    out = work / "original_src"
    if (out / "mlkd.py").exists():
        return out
    out.mkdir(parents=True)
    if (repo / "mlkd.py").is_file():
        shutil.copytree(repo, out, dirs_exist_ok=True)
        return out
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "HEAD"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def original_job(args: argparse.Namespace) -> list[Run]:
    """The original's mlkd.py beside `mlkd distill` on the original's job, in turns."""
    work = args.work / "original"
    data = write_fake_cifar10(work / "data")
    teacher = work / "teachers" / "resnet18_224.pth"
    if not teacher.exists():
        cmd = [*mlkd_cmd(), "teacher", "train", "-d", "cifar-10", "--data-dir", str(data)]
        cmd += ["--img-size", "224", "-m", "resnet18", "-n", teacher.stem, "-e", "1"]
        cmd += ["--output-dir", str(teacher.parent), "-q", "--overwrite"]
        print(f"training the original job's teacher: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    runs = []
    for rnd in range(1, args.rounds + 1):
        for tool in [t for t in args.tools if t in ORIGINAL_TOOLS]:
            out = work / "runs" / f"{tool}_r{rnd}"
            if tool == "original":
                if args.original is None:
                    sys.exit("peers.py: the original row needs --original DIR (MLKD)")
                src = extract_original(args.original, args.work)
                cmd = ["--original", str(src / "mlkd.py"), "-d", "cifar-10", "-b", "32"]
                cmd += ["-e", "1", "-n", "student", "-c", str(teacher), "-m", "resnet18"]
                # It reads data/ and writes models/ under its working folder.
                cwd = out
                setup = [("data", data)]
            else:
                cmd = ["-m", "mlkd_cli", "distill", "-d", "cifar-10", "--data-dir", str(data)]
                cmd += ["--student", "resnetv2_50x1_bit", "-c", str(teacher), "-b", "32"]
                cmd += ["-e", "1", "--output-dir", str(out / "models"), "-n", "run"]
                cmd += shlex.split(args.mlkd_flags)
                cwd, setup = out, []
            run = run_stamped(tool, rnd, cmd, {}, out, cwd=cwd, setup=setup)
            # The original steps once every 128 images (4 batches of 32); mlkd a step a batch.
            # Both hold out a tenth of the 320 images for validation: 288 train, 9 batches.
            per_step = 128 if tool == "original" else 32
            run.rate = stamped_rate(getattr(run, "steps", []), 1, per_step, 288)
            run.own = own_rate(tool, run, out / "models")
            runs.append(run)
            print(f"  round {rnd} {tool}: {run.wall:.1f} s {run.note}", flush=True)
    return runs


# --- main ------------------------------------------------------------------------------------


def peers(args: argparse.Namespace, job: Job) -> list[Run]:
    """The digits job by timm's train.py and mlkd, in turns."""
    counts = write_digits(job.data, job.images)
    print(
        f"data: {job.data} ({counts['train']} train / {counts['val']} val / "
        f"{counts['test']} test PNGs)",
        flush=True,
    )
    train_teacher(job)
    ctx: dict = {}
    if "timm" in args.tools:
        if args.timm_repo is None:
            sys.exit("peers.py: the timm row needs --timm-repo DIR (pytorch-image-models)")
        ctx["timm_train"] = extract_timm_train(args.timm_repo, args.timm_rev, job.work)
        ctx["hub_name"], ctx["hf_home"] = export_teacher_to_hub(job)
    runs = []
    for rnd in range(1, args.rounds + 1):
        for tool in args.tools:
            out = job.work / "runs" / f"{tool}_{job.size}_{job.student}_r{rnd}"
            cmd, env = tool_command(tool, job, out, ctx)
            if tool != "timm":
                cmd += shlex.split(args.mlkd_flags)
            profile = job.work / f"{tool}_{job.size}.prof" if args.profile and rnd == 1 else None
            run = run_stamped(tool, rnd, cmd, env, out, profile=profile)
            run.rate = stamped_rate(getattr(run, "steps", []), job.epochs, job.batch)
            run.own = own_rate(tool, run, out)
            runs.append(run)
            print(
                f"  round {rnd} {tool}: {run.wall:.1f} s, {run.rate:.0f} img/s {run.note}",
                flush=True,
            )
    return runs


def parse_args() -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/peers"), help="work folder (cached)")
    p.add_argument("--timm-repo", type=Path, help="pytorch-image-models: clone or bare mirror")
    p.add_argument("--timm-rev", default="HEAD", help="its revision (WORKTREE: the file as is)")
    p.add_argument("--size", type=int, default=32, choices=(32, 64))
    p.add_argument("--student", default="test_efficientnet")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=4000, help="train+val images (val: 1 in 10)")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--tools", default=",".join(TOOLS), help=f"of {TOOLS + ORIGINAL_TOOLS}")
    p.add_argument("--original", type=Path, help="the original MLKD: clone or bare mirror")
    p.add_argument("--profile", action="store_true", help="cProfile round 1 into the work folder")
    p.add_argument("--quick", action="store_true", help="400 images, 1 epoch, 1 round")
    p.add_argument("--markdown", action="store_true")
    p.add_argument(
        "--mlkd-flags",
        default="",
        help="more flags for every mlkd run, e.g. '--precision fp32' (as on a CPU without bf16)",
    )
    args = p.parse_args()
    if args.quick:
        args.images, args.epochs, args.rounds, args.teacher_epochs = 400, 1, 1, 1
    args.tools = [t for t in args.tools.split(",") if t]
    unknown = set(args.tools) - set(TOOLS + ORIGINAL_TOOLS)
    if unknown:
        p.error(f"unknown --tools {sorted(unknown)}")
    return args


def main() -> None:
    """Run the chosen rows and print the tables."""
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    before = machine()
    print(f"machine: {before}", flush=True)
    job = Job(
        args.work,
        args.size,
        args.student,
        args.epochs,
        args.batch,
        args.images,
        args.teacher_epochs,
    )
    title = (
        f"{job.size} px, {job.student} student, resnet18 teacher, {job.epochs} epochs, "
        f"batch {job.batch}, {job.images} train+val images"
    )
    runs: list[Run] = []
    if any(t in TOOLS for t in args.tools):
        runs = peers(args, job)
        print_table(runs, title, args.markdown)
    if any(t in ORIGINAL_TOOLS for t in args.tools):
        original = original_job(args)
        print_table(original, ORIGINAL_TITLE, args.markdown)
        runs += original
    print(f"\nmachine before: {before}\nmachine after:  {machine()}")
    record = [{k: v for k, v in vars(r).items() if k not in ("log", "steps")} for r in runs]
    (args.work / f"peers_{job.size}_{job.student}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
