#!/usr/bin/env bash
# On a CUDA machine, in one go: build fastcl, run the GPU tests, run the GPU benchmarks.
# Results land in $OUT (default ./gpu-results): test log, `fastcl info`, benchmark JSON + table.
# Optional pure-Python wheels (e.g. inf-cl, the peer to beat) are taken from .whl/ if present:
#   pip download --no-deps -d .whl inf-cl==1.2.1
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/fastcl-site .whl/*.whl \
    && export PYTHONPATH=/tmp/fastcl-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
python3 -m fastcl info | tee "$OUT/info.txt"
# GPU tests first (real sizes), then the whole suite on the GPU machine.
python3 -m pytest -q -x -m gpu ${GPU_TEST_ARGS:-} 2>&1 | tee "$OUT/test_gpu.log" | tail -15
python3 -m benchmarks.bench_clip --n ${BENCH_N:-4096 8192 16384 32768 65536} --d ${BENCH_D:-1024} \
  --dtype bf16 --reps 5 --json "$OUT/bench_clip.json" 2>&1 | tee "$OUT/bench_clip.txt" | tail -40
