#!/usr/bin/env bash
# The checks to run when a GPU machine is lent: one short script (about 6 minutes on an H100).
#
#   bash benchmarks/gpu_check.sh            # here, after `make install` (uses .venv)
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# On a machine without .venv (the lent GPU machine) it installs mlkd into the system python3
# with --no-deps --no-index, or, if that python's setuptools cannot build it, puts a copy of the
# package on PYTHONPATH. Each step runs under its own time limit and logs to $OUT, so one
# failure does not hide the others; the exit status counts the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
work=$(mktemp -d)
if [ -x .venv/bin/python ]; then
  PY=${PY:-.venv/bin/python}
else
  PY=${PY:-python3}
  if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index . >"$OUT/install.log" 2>&1; then
    echo "pip install failed (see install.log); using a PYTHONPATH copy"
    site=$work/site
    mkdir -p "$site"
    cp -r mlkd_cli "$site/"
    cp -r commands "$site/mlkd_cli/commands"
    cp -r presets "$site/mlkd_cli/shipped_presets"
    export PYTHONPATH=$site
  fi
fi
repo=$(pwd)
case $PY in /*) ;; */*) PY=$repo/$PY ;; esac
# Run from the scratch folder: `python -m mlkd_cli` in the repository root would import the
# source folder (which lacks the installed commands subpackage) instead of the installed package.
cd "$work"
MLKD="$PY -m mlkd_cli"
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu rehearses the script on a machine without a GPU
failed=0
step() {  # step NAME SECONDS COMMAND... : run, log to $OUT/NAME.log, report the outcome
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name"
  timeout -s TERM -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available())'
# 1. bf16 + channels_last + the device pipeline + torch.compile, end to end on CUDA.
step teacher_compile 240 $MLKD teacher train -d digits -m resnet10t -e 2 --img-size 32 \
  --device $DEVICE --data-pipeline device --compile --output-dir "$work" --name t --json --quiet
# 2. Distillation (multi-exit KD, teacher in bf16 under inference mode) and eval on CUDA.
step distill 120 $MLKD distill -d digits -m resnet10t -c "$work/t.pth" --student resnet10t -e 1 --img-size 32 \
  --device $DEVICE --output-dir "$work" --name s --json --quiet
step eval 60 $MLKD eval "$work/s.pth" --split test --device $DEVICE --json
step eval_fp32 60 $MLKD eval "$work/s.pth" --split test --device $DEVICE --precision fp32 --json
# The anytime student on CUDA: thresholds on val, then the cascade with real early stopping.
step early_exit 90 bash -c "$MLKD eval '$work/s_exits.pth' --split val --early-exit --device $DEVICE \
  --timing-images 0 --quiet && $MLKD eval '$work/s_exits.pth' --split test --device $DEVICE --json"
# 3. NCCL: the same eval under torchrun (one process, process group on NCCL, DDP eval path).
step eval_torchrun 90 $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m mlkd_cli eval "$work/s.pth" --split test --device $DEVICE --json
# 4. Throughput: reference vs default at 224 px (CIFAR-100 recipe, the original's 5 teachers).
step bench 330 $PY "$repo/benchmarks/bench.py" --device $DEVICE ${BENCH_ARGS:-} --modes ${BENCH_MODES:-reference,default,compiled} --markdown
# 5. Where the student step's time goes: img/s per precision/layout, compiled, and a profile.
small=(); [ "$DEVICE" = cuda ] || small=(--img-size 64 --batch-size 8 --steps 2 --warmup 1)
[ -n "${SKIP_PROFILE:-}" ] || step profile 150 $PY "$repo/benchmarks/profile_step.py" --device $DEVICE --compile "${small[@]}"
echo "gpu_check: $failed step(s) failed; logs in $OUT"
rm -rf "$work"
exit $failed
