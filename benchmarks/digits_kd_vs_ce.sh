#!/usr/bin/env bash
# Does distillation beat plain cross-entropy? The digits experiment behind the distill issue's
# acceptance, end to end with the CLI (about 15 minutes on 2 CPU cores). Run from an empty folder:
#   bash /path/to/benchmarks/digits_kd_vs_ce.sh
# Prints each run's test top-1 / NLL (from `mlkd ensemble eval` of single-member files).
# PRECISION=fp32|bf16|auto (default auto) runs every step in that precision; SKIP_TEACHERS=1
# reuses the teachers and the fitted config.json of an earlier run in this folder (to compare
# students trained in another precision against the same teacher).
set -euo pipefail
MLKD=${MLKD:-mlkd}
EPOCHS=${EPOCHS:-30}
STUDENT=${STUDENT:-test_convnext}
PRECISION=${PRECISION:-auto}
P=(--precision "$PRECISION")

if [ -z "${SKIP_TEACHERS:-}" ]; then
  # Three teachers of different architectures, an ensemble fitted on the validation split.
  $MLKD teacher train -d digits --model resnet10t -n e_resnet -e 30 -q --overwrite "${P[@]}" >/dev/null
  $MLKD teacher train -d digits --model test_convnext -n e_convnext -e 30 -q --overwrite "${P[@]}" >/dev/null
  $MLKD teacher train -d digits --model test_efficientnet -n e_effnet -e 30 -q --overwrite "${P[@]}" >/dev/null
  cat > config.json <<'JSON'
{"models": ["resnet10t", "test_convnext", "test_efficientnet"], "names": ["e_resnet", "e_convnext", "e_effnet"]}
JSON
  $MLKD ensemble build --fit-temperature -q "${P[@]}"
fi
$MLKD ensemble eval --split test "${P[@]}"

echo "members:" > "students_$PRECISION.yaml"
for seed in 0 1 2; do
  $MLKD teacher train -d digits --model "$STUDENT" -n "ce_${PRECISION}_s$seed" -e "$EPOCHS" --seed $seed -q --overwrite "${P[@]}" >/dev/null
  $MLKD distill -d digits --student "$STUDENT" -n "kd_${PRECISION}_s$seed" -e "$EPOCHS" --seed $seed \
    --temperature 10 --alpha 1 --mixup-alpha 0 --cutmix-alpha 0 --effective-batch-size 64 -q --overwrite "${P[@]}" >/dev/null
  printf '  - checkpoint: models/ce_%s_s%s.pth\n  - checkpoint: models/kd_%s_s%s.pth\n' "$PRECISION" $seed "$PRECISION" $seed >> "students_$PRECISION.yaml"
done
$MLKD ensemble eval "students_$PRECISION.yaml" --split val "${P[@]}"
$MLKD ensemble eval "students_$PRECISION.yaml" --split test "${P[@]}"
