#!/usr/bin/env bash
# Light exits against the original's, on the digits image folder of own_data_kd_vs_ce.sh (real
# 28 px grayscale PNGs): one resnet18 teacher (8 epochs, --no-augment), a test_convnext student
# with exits after stages 0-2, distilled $EPOCHS epochs at batch 32 with mlkd's defaults, seeds
# 0-2, once per --exit-head. Prints test top-1 of the final head and of each exit (mean ± sd over
# seeds), each exit's MACs as a share of the plain model, and the paired difference light minus
# original per head.
#
#   bash benchmarks/exit_head_study.sh        # from an empty folder, a few minutes on 2 cores
set -euo pipefail
MLKD=${MLKD:-mlkd}
PY=${PY:-python3}
EPOCHS=${EPOCHS:-8}
SEEDS=${SEEDS:-0 1 2}
DATA=(-d imagefolder --data-dir digits28 --img-size 32)

[ -d digits28 ] || "$PY" "$(dirname "$0")/digits_png.py" digits28
[ -f models/t_resnet18.pth ] || $MLKD teacher train "${DATA[@]}" -m resnet18 -n t_resnet18 -e 8 --no-augment -q --output-dir models >/dev/null
for seed in $SEEDS; do
  for head in original light; do
    name=exits_${head}_e${EPOCHS}_s$seed
    [ -f "eval_$name.json" ] && continue
    $MLKD distill "${DATA[@]}" -m resnet18 -c models/t_resnet18.pth --student test_convnext \
      -e "$EPOCHS" -b 32 -q --overwrite --output-dir models -n "$name" --seed "$seed" \
      --exit-head "$head" >/dev/null
    $MLKD eval "models/${name}_exits.pth" --data-dir digits28 --timing-images 0 --json -q > "eval_$name.json"
  done
done
EPOCHS=$EPOCHS SEEDS=$SEEDS "$PY" - <<'PY'
import json
import os
import statistics as st

epochs, seeds = os.environ["EPOCHS"], os.environ["SEEDS"].split()
runs = {
    head: [json.load(open(f"eval_exits_{head}_e{epochs}_s{s}.json")) for s in seeds]
    for head in ("original", "light")
}
names = [h["head"] for h in runs["original"][0]["heads"]]
print(f"| head | original top-1 | light top-1 | light - original (per seed) | MACs % original / light |")
print("|---|---|---|---|---|")
for i, name in enumerate(names):
    a = [r["heads"][i]["top1"] for r in runs["original"]]
    b = [r["heads"][i]["top1"] for r in runs["light"]]
    diffs = [y - x for x, y in zip(a, b)]
    macs = (runs["original"][0]["heads"][i]["macs_pct"], runs["light"][0]["heads"][i]["macs_pct"])
    print(f"| {name} | {st.mean(a):.2f} ± {st.stdev(a):.2f} | {st.mean(b):.2f} ± {st.stdev(b):.2f} "
          f"| {st.mean(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)}) "
          f"| {macs[0]:.1f} / {macs[1]:.1f} |")
PY
