#!/usr/bin/env bash
# On a CUDA machine: build fastcl, run the GPU tests and the GPU benchmarks.
#
#   benchmarks/gpu_session.sh [STAGE ...]      (default: every stage, in this order)
#
# Stages: build   pip install -e . (skipped when fastcl._C of this checkout already imports)
#         test    pytest -m gpu (first autotuning configuration only: FASTCL_AUTOTUNE=0)
#         report  the report's GPU suite with the PERFORMANCE.md verdicts (rewrites the GPU
#                 section of docs/benchmarks.md)
#         siglip  SigLIP on every GPU backend against eager and torch.compile
#         ntxent  NT-Xent: the self-similarity paths against two feature sets
#                 (fastcl-triton-pairs, fastcl-cuda-pairs), the forward over the full
#                 square or the half (fastcl-triton-squarefwd, -halffwd; through the
#                 statistics op on CUDA C++: fastcl-cuda-stats, -stats-squarefwd), eager
#                 and torch.compile
#         infonce InfoNCE in one direction (the one-sweep fused path of the CUDA C++ backend)
#                 on every GPU backend against eager and torch.compile
#         hcl     the hard-negative loss (two views) on every GPU backend: both log-sum-exps
#                 of the negatives from one pass against a second run of the kernels
#                 (fastcl-<backend>-twopass), and the materializing reference
#         topk    top-k similarity search
#
# Each stage runs under its own time limit (LIMIT_<stage> seconds) and all of them under
# DEADLINE seconds in all (default 570), so a command with a 10-minute limit always ends by
# itself: a stage that runs long is stopped and the ones after it still run or are reported
# as skipped. Split the stages over several commands when they do not fit in one, e.g.
# `build test`, then `report`, then `siglip ntxent infonce`, then `hcl topk` (a later command
# finds the build).
#
# Logs and results are written under $WORK and packed at exit into $OUT/gpu-results.tar.gz,
# with the stage table in $OUT/summary.txt (default OUT: ./gpu-results): two files, whatever
# the number of plots and logs. Optional pure-Python wheels (e.g. inf-cl, the peer to beat)
# are taken from .whl/ if present:   pip download --no-deps -d .whl inf-cl==1.2.1
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
WORK=${WORK:-/tmp/fastcl-gpu-session}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT" "$WORK/docs"
export WORK
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
T0=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/fastcl-site \
    .whl/*.whl && export PYTHONPATH=/tmp/fastcl-site${PYTHONPATH:+:$PYTHONPATH}
fi

pack() {
  (cd "$WORK" && tar czf - .) > "$OUT/gpu-results.tar.gz"
  cp "$WORK/summary.txt" "$OUT/summary.txt" 2>/dev/null
  echo; cat "$WORK/summary.txt" 2>/dev/null
}
trap pack EXIT

built() {
  python3 - <<'EOF' 2>/dev/null
import os, fastcl, fastcl._C
assert os.path.dirname(os.path.dirname(os.path.abspath(fastcl.__file__))) == os.getcwd()
EOF
}

stage_build() {
  if built; then echo "fastcl._C already built in $(pwd)"; return 0; fi
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -40
  built && python3 -m fastcl info
}
stage_test() {
  FASTCL_AUTOTUNE=0 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 \
    ${GPU_TEST_ARGS:-} 2>&1
}
stage_report() {
  python3 -m benchmarks.report --device cuda ${REPORT_ARGS:-} 2>&1 || return
  cp docs/benchmarks.md benchmarks/results/gpu.json docs/img/gpu_*.png "$WORK/docs/"
}
stage_siglip() {
  python3 -m benchmarks.bench_clip --loss siglip --n ${SIGLIP_N:-16384 65536} --d 1024 \
    --dtype bf16 --reps 5 --json "$WORK/bench_siglip.json" 2>&1
}
stage_ntxent() {
  python3 -m benchmarks.bench_clip --loss ntxent --n ${NTXENT_N:-8192 32768} --d 1024 \
    --dtype bf16 --reps 5 --json "$WORK/bench_ntxent.json" 2>&1
}
stage_infonce() {
  python3 -m benchmarks.bench_clip --loss infonce --n ${INFONCE_N:-16384 65536} --d 1024 \
    --dtype bf16 --reps 5 --json "$WORK/bench_infonce.json" 2>&1
}
stage_hcl() {
  python3 -m benchmarks.bench_clip --loss hcl --n ${HCL_N:-8192 16384} --d 1024 \
    --dtype bf16 --reps 5 --json "$WORK/bench_hcl.json" 2>&1
}
stage_topk() {
  python3 -m benchmarks.bench_topk --json "$WORK/bench_topk.json" 2>&1
}

declare -A LIMIT=([build]=${LIMIT_build:-300} [test]=${LIMIT_test:-420} [report]=${LIMIT_report:-420}
                  [siglip]=${LIMIT_siglip:-150} [ntxent]=${LIMIT_ntxent:-200}
                  [infonce]=${LIMIT_infonce:-150} [hcl]=${LIMIT_hcl:-100} [topk]=${LIMIT_topk:-90})
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test report siglip ntxent infonce hcl topk)
for s in "${STAGES[@]}"; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "unknown stage: $s (stages: ${!LIMIT[*]})" >&2; exit 2; }
done

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; } > "$WORK/device.txt" 2>&1
cat "$WORK/device.txt"
printf '%-8s %6s %8s  %s\n' stage rc seconds log > "$WORK/summary.txt"
export -f built stage_build stage_test stage_report stage_siglip stage_ntxent stage_infonce \
  stage_hcl stage_topk
for s in "${STAGES[@]}"; do
  left=$(( DEADLINE - ($(date +%s) - T0) - 10 ))
  lim=$(( left < ${LIMIT[$s]} ? left : ${LIMIT[$s]} ))
  if [ "$lim" -lt 20 ]; then
    printf '%-8s %6s %8s  %s\n' "$s" skip 0 "no time left" >> "$WORK/summary.txt"; continue
  fi
  echo "=== $s (limit ${lim} s)"
  t=$(date +%s)
  timeout -k 10 "$lim" bash -c "stage_$s" 2>&1 | tee "$WORK/$s.log" | tail -25
  rc=${PIPESTATUS[0]}
  printf '%-8s %6s %8s  %s\n' "$s" "$rc" "$(( $(date +%s) - t ))" "$s.log" >> "$WORK/summary.txt"
  if [ "$s" = build ] && [ "$rc" -ne 0 ]; then echo "build failed: later stages skipped"; break; fi
done
