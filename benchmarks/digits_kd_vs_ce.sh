#!/usr/bin/env bash
# Does distillation beat plain cross-entropy? The digits experiment behind the distill issue's
# acceptance, end to end with the CLI (about 15 minutes on 2 CPU cores). Run from an empty folder:
#   bash /path/to/benchmarks/digits_kd_vs_ce.sh
# Prints each run's test top-1 / NLL (from `mlkd ensemble eval` of single-member files).
set -euo pipefail
MLKD=${MLKD:-mlkd}
EPOCHS=${EPOCHS:-15}
STUDENT=${STUDENT:-test_efficientnet}

# Three teachers of different architectures, an ensemble fitted on the validation split.
$MLKD teacher train -d digits --model resnet10t -n e_resnet -e 30 -q --overwrite >/dev/null
$MLKD teacher train -d digits --model test_convnext -n e_convnext -e 30 -q --overwrite >/dev/null
$MLKD teacher train -d digits --model test_efficientnet -n e_effnet -e 30 -q --overwrite >/dev/null
cat > config.json <<'JSON'
{"models": ["resnet10t", "test_convnext", "test_efficientnet"], "names": ["e_resnet", "e_convnext", "e_effnet"]}
JSON
$MLKD ensemble build --fit-temperature -q
$MLKD ensemble eval --split test

echo "members:" > students.yaml
for seed in 0 1 2; do
  $MLKD teacher train -d digits --model "$STUDENT" -n ce_s$seed -e "$EPOCHS" --seed $seed -q --overwrite >/dev/null
  $MLKD distill -d digits --student "$STUDENT" -n kd_s$seed -e "$EPOCHS" --seed $seed \
    --mixup-alpha 0 --cutmix-alpha 0 --effective-batch-size 64 -q --overwrite >/dev/null
  printf '  - checkpoint: models/ce_s%s.pth\n  - checkpoint: models/kd_s%s.pth\n' $seed $seed >> students.yaml
done
$MLKD ensemble eval students.yaml --split val
$MLKD ensemble eval students.yaml --split test
