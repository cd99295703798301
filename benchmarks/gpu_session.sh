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
# The GPU suite of the report: symmetric CLIP, bf16, D = 1024, N = 4096 .. 65536, against eager,
# torch.compile, open_clip and Inf-CL, with the PERFORMANCE.md targets checked; it rewrites the
# GPU section of docs/benchmarks.md, whose files are copied to $OUT.
python3 -m benchmarks.report ${REPORT_ARGS:-} 2>&1 | tee "$OUT/report.txt" | tail -40
mkdir -p "$OUT/docs"
cp docs/benchmarks.md benchmarks/results/gpu.json docs/img/gpu_*.png "$OUT/docs/" 2>/dev/null
# SigLIP on every GPU backend (Triton, CUDA C++) against eager and torch.compile; top-k search.
python3 -m benchmarks.bench_clip --loss siglip --n ${SIGLIP_N:-16384 65536} --d 1024 --dtype bf16 \
  --reps 5 --json "$OUT/bench_siglip.json" 2>&1 | tee "$OUT/bench_siglip.txt" | tail -12
# NT-Xent: the Triton self-similarity backward (one launch, G + G.T per tile) against eager,
# torch.compile and the two-launch backward it replaces (fastcl-triton-pairs).
python3 -m benchmarks.bench_clip --loss ntxent --n ${NTXENT_N:-8192 32768} --d 1024 --dtype bf16 \
  --reps 5 --json "$OUT/bench_ntxent.json" 2>&1 | tee "$OUT/bench_ntxent.txt" | tail -8
python3 -m benchmarks.bench_topk --json "$OUT/bench_topk.json" 2>&1 | tee "$OUT/bench_topk.txt" | tail -8
