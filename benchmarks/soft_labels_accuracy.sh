#!/usr/bin/env bash
# Distilling from a soft-label store against the live teacher, on the digits image folder of
# own_data_kd_vs_ce.sh (real 28 px grayscale PNGs, no test tunes to it): one resnet18 teacher
# (8 epochs, --no-augment), a test_efficientnet student for 4 epochs at batch 32, seeds 0-2:
#   live      the teacher runs on every augmented batch (mlkd's default augmentation)
#   store     `mlkd teacher label --views 8` once, then `distill --soft-labels` (same augmentation)
#   cache     `--teacher-cache --no-augment` (outputs computed once, no augmentation)
#
#   bash benchmarks/soft_labels_accuracy.sh     # from an empty folder, a few minutes on 2 cores
set -euo pipefail
MLKD=${MLKD:-mlkd}
PY=${PY:-python3}
VIEWS=${VIEWS:-8}
DATA=(-d imagefolder --data-dir digits28 --img-size 32)
STUDENT=(--student test_efficientnet -e 4 -b 32 -q --overwrite --output-dir models)

[ -d digits28 ] || "$PY" "$(dirname "$0")/digits_png.py" digits28
[ -f models/t_resnet18.pth ] || $MLKD teacher train "${DATA[@]}" -m resnet18 -n t_resnet18 -e 8 --no-augment -q >/dev/null
TEACHER=(-m resnet18 -c models/t_resnet18.pth)

start=$(date +%s.%N)
$MLKD teacher label "${DATA[@]}" "${TEACHER[@]}" --views "$VIEWS" --output store -q >/dev/null
echo "labelled $VIEWS views in $(echo "$(date +%s.%N) - $start" | bc) s; store $(du -sh store | cut -f1)"
for seed in 0 1 2; do
  $MLKD distill "${DATA[@]}" "${TEACHER[@]}" "${STUDENT[@]}" -n live_s$seed --seed $seed >/dev/null
  $MLKD distill "${DATA[@]}" --soft-labels store "${STUDENT[@]}" -n store_s$seed --seed $seed >/dev/null
  $MLKD distill "${DATA[@]}" "${TEACHER[@]}" "${STUDENT[@]}" -n cache_s$seed --seed $seed --teacher-cache --no-augment >/dev/null
  for kind in live store cache; do
    $MLKD eval models/${kind}_s$seed.pth --data-dir digits28 --json > eval_${kind}_s$seed.json
  done
done
"$PY" - <<'PY'
import json
import statistics as st

for kind in ("live", "store", "cache"):
    runs = [json.load(open(f"eval_{kind}_s{seed}.json")) for seed in range(3)]
    tops, nlls = [r["top1"] for r in runs], [r["nll"] for r in runs]
    print(f"{kind}: top-1 {st.mean(tops):.2f} ± {st.stdev(tops):.2f} (seeds {', '.join(f'{t:.2f}' for t in tops)}), NLL {st.mean(nlls):.3f} ± {st.stdev(nlls):.3f}")
PY
