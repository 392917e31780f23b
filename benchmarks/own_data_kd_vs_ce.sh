#!/usr/bin/env bash
# Distillation vs plain cross-entropy on data of a user's own, as a new user runs it: an image
# folder of real handwritten digits written as 28 px grayscale PNGs (the embedded UCI digits,
# upscaled: 1,437 train / 360 test), three 8-epoch teachers of different architectures, a fitted
# ensemble, and a test_efficientnet student for 4 epochs over 3 seeds, CE vs KD.
#
#   bash benchmarks/own_data_kd_vs_ce.sh                        # mlkd's defaults
#   EXTRA="--no-augment" bash benchmarks/own_data_kd_vs_ce.sh     # extra flags for every run
#   TEACHER_EXTRA="--no-augment" bash benchmarks/own_data_kd_vs_ce.sh   # for the teachers only
#
# Run from an empty folder (about 5 minutes on 2 CPU cores). Prints each student's test top-1
# and NLL, and the means and standard deviations over seeds.
set -euo pipefail
MLKD=${MLKD:-mlkd}
PY=${PY:-python3}
read -r -a EXTRA <<<"${EXTRA:-}"
read -r -a TEACHER_EXTRA <<<"${TEACHER_EXTRA:-}"
DATA=(-d imagefolder --data-dir digits28 --img-size 32)

"$PY" "$(dirname "$0")/digits_png.py" digits28

for teacher in resnet18 test_convnext resnet10t; do
  $MLKD teacher train "${DATA[@]}" -m $teacher -n t_$teacher -e 8 -q --overwrite "${EXTRA[@]}" "${TEACHER_EXTRA[@]}" >/dev/null
done
cat > config.json <<'JSON'
{"models": ["resnet18", "test_convnext", "resnet10t"], "names": ["t_resnet18", "t_test_convnext", "t_resnet10t"]}
JSON
$MLKD ensemble build -d imagefolder --data-dir digits28 --fit-temperature -q
for teacher in resnet18 test_convnext resnet10t; do
  $MLKD eval models/t_$teacher.pth --data-dir digits28 --json > eval_t_$teacher.json
done
for seed in 0 1 2; do
  $MLKD teacher train "${DATA[@]}" -m test_efficientnet -n ce_s$seed -e 4 --seed $seed -q --overwrite "${EXTRA[@]}" >/dev/null
  $MLKD distill "${DATA[@]}" --student test_efficientnet -n kd_s$seed -e 4 --seed $seed -q --overwrite "${EXTRA[@]}" >/dev/null
  for kind in ce kd; do
    $MLKD eval models/${kind}_s$seed.pth --data-dir digits28 --json > eval_${kind}_s$seed.json
  done
done

"$PY" - <<'PY'
import json
import statistics as st

def figures(name):
    report = json.load(open(f"eval_{name}.json"))
    return report["top1"], report["nll"]

print("teachers test top-1:", " / ".join(f"{figures('t_' + t)[0]:.1f}" for t in ("resnet18", "test_convnext", "resnet10t")))
for kind in ("ce", "kd"):
    runs = [figures(f"{kind}_s{seed}") for seed in range(3)]
    tops, nlls = [r[0] for r in runs], [r[1] for r in runs]
    print(
        f"{kind}: top-1 {st.mean(tops):.2f} ± {st.stdev(tops):.2f} (seeds {', '.join(f'{t:.2f}' for t in tops)}), "
        f"NLL {st.mean(nlls):.3f} ± {st.stdev(nlls):.3f}"
    )
PY
