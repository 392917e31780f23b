#!/usr/bin/env bash
# `mlkd study` on data of a user's own: the digits image folder of own_data_kd_vs_ce.sh (the
# embedded UCI digits as real 28 px grayscale PNGs, 1,437 train / 360 test; no test tunes to it),
# one resnet18 teacher (8 epochs, --no-augment), a test_efficientnet student (4 stages, as the
# teacher: the feature arms pair them) for 4 epochs with the README's short-schedule settings
# (--no-augment --batch-size 32), cross-entropy against every loss, seeds 0-2.
#
#   bash benchmarks/loss_study.sh             # run from an empty folder (minutes on 2 cores)
#   LOSSES=kd,dkd bash benchmarks/loss_study.sh
#
# Prints the study's table; the runs, study.json and study.png land in runs/study.
set -euo pipefail
MLKD=${MLKD:-mlkd}
PY=${PY:-python3}
LOSSES=${LOSSES:-kd,dkd,dist,kd+feature,dkd+feature}
DATA=(-d imagefolder --data-dir digits28 --img-size 32)

if [ ! -d digits28 ]; then
  "$PY" "$(dirname "$0")/digits_png.py" digits28
fi

if [ ! -f models/t_resnet18.pth ]; then
  $MLKD teacher train "${DATA[@]}" -m resnet18 -n t_resnet18 -e 8 --no-augment -q >/dev/null
fi
$MLKD eval models/t_resnet18.pth --data-dir digits28 --json | "$PY" -c \
  'import json, sys; r = json.load(sys.stdin); print("teacher resnet18 test top-1 %.2f, NLL %.4f" % (r["top1"], r["nll"]))'
COLUMNS=${COLUMNS:-160} $MLKD study "${DATA[@]}" -m resnet18 -c models/t_resnet18.pth \
  --student test_efficientnet -e 4 --no-augment --batch-size 32 \
  --losses "$LOSSES" --seeds 0,1,2 --run-dir runs/study
