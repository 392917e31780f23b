#!/usr/bin/env bash
# Distilling from a soft-label store against the live teacher, on the digits image folder of
# own_data_kd_vs_ce.sh (real 28 px grayscale PNGs, no test tunes to it): one resnet18 teacher
# (8 epochs, --no-augment), a test_efficientnet student at batch 32, same seeds and budget:
#   live      the teacher runs on every augmented batch (mlkd's default augmentation)
#   store     `mlkd teacher label --views $VIEWS` once, then `distill --soft-labels` (same augmentation)
#   cache     `--teacher-cache --no-augment` (outputs computed once, no augmentation)
# Prints each arm's test top-1 and NLL, and store minus live paired by seed.
#
#   bash benchmarks/soft_labels_accuracy.sh                  # from an empty folder, 4 epochs, seeds 0-2
#   EPOCHS=12 SEEDS="0 1 2 3 4 5 6 7" VIEWS=8 bash benchmarks/soft_labels_accuracy.sh
set -euo pipefail
MLKD=${MLKD:-mlkd}
PY=${PY:-python3}
VIEWS=${VIEWS:-8}
EPOCHS=${EPOCHS:-4}
SEEDS=${SEEDS:-0 1 2}
ARMS=${ARMS:-live store cache}
DATA=(-d imagefolder --data-dir digits28 --img-size 32)
STUDENT=(--student test_efficientnet -e "$EPOCHS" -b 32 -q --overwrite --output-dir models)
STORE=store_v$VIEWS

[ -d digits28 ] || "$PY" "$(dirname "$0")/digits_png.py" digits28
[ -f models/t_resnet18.pth ] || $MLKD teacher train "${DATA[@]}" -m resnet18 -n t_resnet18 -e 8 --no-augment -q --output-dir models >/dev/null
TEACHER=(-m resnet18 -c models/t_resnet18.pth)

if [[ " $ARMS " == *" store "* ]]; then
  start=$(date +%s.%N)
  $MLKD teacher label "${DATA[@]}" "${TEACHER[@]}" --views "$VIEWS" --output "$STORE" -q >/dev/null
  echo "labelled $VIEWS views in $(echo "$(date +%s.%N) - $start" | bc) s; store $(du -sh "$STORE" | cut -f1)"
fi
for seed in $SEEDS; do
  for arm in $ARMS; do
    name=${arm}_e${EPOCHS}_s$seed
    [ "$arm" = store ] && name=store_v${VIEWS}_e${EPOCHS}_s$seed
    [ -f "eval_$name.json" ] && continue
    case $arm in
      live) $MLKD distill "${DATA[@]}" "${TEACHER[@]}" "${STUDENT[@]}" -n "$name" --seed "$seed" >/dev/null ;;
      store) $MLKD distill "${DATA[@]}" --soft-labels "$STORE" "${STUDENT[@]}" -n "$name" --seed "$seed" >/dev/null ;;
      cache) $MLKD distill "${DATA[@]}" "${TEACHER[@]}" "${STUDENT[@]}" -n "$name" --seed "$seed" --teacher-cache --no-augment >/dev/null ;;
    esac
    $MLKD eval "models/$name.pth" --data-dir digits28 --json > "eval_$name.json"
  done
done
EPOCHS=$EPOCHS VIEWS=$VIEWS SEEDS=$SEEDS ARMS=$ARMS "$PY" - <<'PY'
import json
import math
import os
import statistics as st

epochs, views = os.environ["EPOCHS"], os.environ["VIEWS"]
seeds = os.environ["SEEDS"].split()
names = {"live": f"live_e{epochs}", "store": f"store_v{views}_e{epochs}", "cache": f"cache_e{epochs}"}
tops = {}
for arm in os.environ["ARMS"].split():
    runs = [json.load(open(f"eval_{names[arm]}_s{seed}.json")) for seed in seeds]
    tops[arm] = [r["top1"] for r in runs]
    nlls = [r["nll"] for r in runs]
    spread = lambda xs: st.stdev(xs) if len(xs) > 1 else 0.0
    print(f"{arm}: top-1 {st.mean(tops[arm]):.2f} ± {spread(tops[arm]):.2f} "
          f"(seeds {', '.join(f'{t:.2f}' for t in tops[arm])}), "
          f"NLL {st.mean(nlls):.3f} ± {spread(nlls):.3f}")
if "live" in tops and "store" in tops and len(seeds) > 1:
    diffs = [s - l for s, l in zip(tops["store"], tops["live"])]
    se = st.stdev(diffs) / math.sqrt(len(diffs))
    print(f"store - live by seed: {', '.join(f'{d:+.2f}' for d in diffs)}; "
          f"mean {st.mean(diffs):+.2f}, standard error {se:.2f}")
PY
