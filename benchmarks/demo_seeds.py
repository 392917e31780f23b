"""The demo over seeds: `mlkd pipeline --preset digits` once per seed, student against baseline.

Not a test. For each seed (0-4 by default) it runs the whole shipped preset — teachers, ensemble,
student, cross-entropy baseline — with that `seed` (a top-level preset key, so every stage takes
it) in its own run folder, then prints each seed's test top-1 and NLL of the distilled student and
of the baseline, the difference, and mean ± sd over the seeds, as a Markdown table. The labelled
images of the label budget are the same in every seed (drawn with their own fixed seed, as the
validation split is).

    python benchmarks/demo_seeds.py --out runs/demo_seeds            # about 10 minutes on 2 cores
    python benchmarks/demo_seeds.py --preset digits --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mlkd_cli.presets import load_preset


def run_seed(preset: str, seed: int, out: Path) -> tuple[dict, float]:
    """One whole pipeline with `seed`; its distillation gain and wall time."""
    content, _ = load_preset(preset)
    content["seed"] = seed
    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "preset.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    start = time.perf_counter()
    command = [sys.executable, "-m", "mlkd_cli", "pipeline", "--preset", str(path)]
    done = subprocess.run(
        [*command, "--run-dir", str(folder / "run"), "-q", "--json"],
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return summary["distillation_gain"], took


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` (sample sd) of the values."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    """Run every seed, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        gain, took = run_seed(args.preset, seed, args.out)
        rows.append((seed, gain, took))
        print(
            f"seed {seed}: student {gain['student_top1']:.2f} % (NLL {gain['student_nll']:.4f}), "
            f"baseline {gain['baseline_top1']:.2f} % (NLL {gain['baseline_nll']:.4f}), "
            f"{gain['top1_points']:+.2f} points, {took:.0f} s",
            flush=True,
        )
    print()
    print("| seed | student top-1 % | baseline top-1 % | difference | student NLL | baseline NLL |")
    print("|---|---|---|---|---|---|")
    for seed, g, _ in rows:
        print(
            f"| {seed} | {g['student_top1']:.2f} | {g['baseline_top1']:.2f} | "
            f"{g['top1_points']:+.2f} | {g['student_nll']:.4f} | {g['baseline_nll']:.4f} |"
        )
    column = {k: [g[k] for _, g, _ in rows] for k in rows[0][1]}
    print(
        f"| mean ± sd | {mean_sd(column['student_top1'])} | {mean_sd(column['baseline_top1'])} "
        f"| {mean_sd(column['top1_points'])} | {mean_sd(column['student_nll'])} | "
        f"{mean_sd(column['baseline_nll'])} |"
    )
    won = sum(g["top1_points"] > 0 and g["nll_change"] < 0 for _, g, _ in rows)
    print(
        f"\nstudent ahead on top-1 and NLL in {won} of {len(rows)} seeds; wall time per seed "
        f"{mean_sd([t for *_, t in rows])} s"
    )


if __name__ == "__main__":
    main()
