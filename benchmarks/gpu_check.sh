#!/usr/bin/env bash
# The checks to run when a GPU machine is lent (one short script; about 5 minutes on an H100).
# Run from the repository root after `make install`; prints the figures BENCHMARKS.md records.
set -euo pipefail
PY=${PY:-.venv/bin/python}
MLKD=${MLKD:-.venv/bin/mlkd}
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# 1. bf16 + channels_last + the device pipeline + torch.compile, end to end on CUDA.
$MLKD teacher train -d digits -m resnet10t -e 2 --img-size 32 --device cuda \
  --data-pipeline device --compile --output-dir "$work" --json | tail -c 400
# 2. Throughput table, reference vs default vs compiled, 224 px, CIFAR-100 recipe.
$PY benchmarks/bench.py --device cuda --modes reference,default,compiled --markdown
