#!/usr/bin/env bash
# Does augmenting on the device train as well as torchvision on CPU workers? Same model, data,
# epochs and seeds through each pipeline (the performance issue's acceptance 3; about 5 minutes
# on 2 CPU cores). Run from an empty folder:
#   bash /path/to/benchmarks/pipeline_accuracy.sh
# Prints one line per run: pipeline, seed, last-epoch val top-1, test top-1 (mlkd eval).
set -euo pipefail
MLKD=${MLKD:-mlkd}
EPOCHS=${EPOCHS:-8}
MODEL=${MODEL:-resnet10t}
SEEDS=${SEEDS:-"0 1 2 3 4"}
for pipeline in cpu device; do
  for seed in $SEEDS; do
    name="${pipeline}_s${seed}"
    $MLKD teacher train -d digits --model "$MODEL" --img-size 32 -e "$EPOCHS" --seed "$seed" \
      --data-pipeline "$pipeline" -n "$name" -q --overwrite >/dev/null
    val=$(python3 -c "import json; print(json.load(open('models/${name}_history.json'))['epochs'][-1]['val_top1'])")
    test=$($MLKD eval "models/${name}.pth" --split test --json | python3 -c "import json,sys; print(json.load(sys.stdin)['top1'])")
    echo "$pipeline $seed $val $test"
  done
done
