#!/usr/bin/env bash
# One session on a lent GPU machine, sized to finish within 10 minutes on one H100/H200 with
# 16 cores (Python 3.12, torch 2.11, Triton 3.6): build for the GPU present only, run the gpu
# test tier, then a benchmark subset at production shapes. Each stage runs under its own time
# budget, is timed and logged to $OUT (the device tool brings $OUT back): build.log,
# env.txt, tests_gpu.log, bench.log, bench.csv, and stages.tsv (stage, seconds, exit status).
# Commit the CSV and stages.tsv under benchmarks/results/ with the device name in the file name.
#
#   bash benchmarks/gpu_session.sh            # build, gpu-tests, bench (about 2 + 4 + 3 minutes)
#   bash benchmarks/gpu_session.sh build      # or one stage per command, for tools that
#   bash benchmarks/gpu_session.sh gpu-tests  # cap a command's time; later stages reuse the
#   bash benchmarks/gpu_session.sh bench      # build (keep build/ and sslfast/*.so between calls)
#   bash benchmarks/gpu_session.sh rest-tests # the cpu and interpreter tiers too (not in "all")
#
# Budgets (seconds; override with BUDGET_BUILD etc.): build 240, gpu-tests 240, bench 180,
# rest-tests 300. A stage over its budget is stopped and recorded with status 124.
set -uo pipefail
export OUT=${OUT:-/tmp/sslfast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
stage=${1:-all}
export JOBS=${SSLFAST_BUILD_JOBS:-$(nproc)}

# run_stage NAME BUDGET FUNCTION: times FUNCTION under `timeout BUDGET`, appends to stages.tsv.
run_stage() {
  local name=$1 budget=$2 fn=$3 t0 rc
  echo "=== $name (budget ${budget}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/session.log"
  t0=$(date +%s%N)
  timeout --foreground "$budget" bash -c "set -o pipefail; $(declare -f "$fn"); $fn"
  rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%d.%03d\t%s\n' "$name" $((ms / 1000)) $((ms % 1000)) "$rc" | tee -a "$OUT/stages.tsv"
  return $rc
}

build() {
  # The GPU's own architecture only (one nvcc pass per file, all files in parallel).
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
  [ -n "$cap" ] || cap=$(python3 -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
  SSLFAST_CUDA=1 SSLFAST_CUDA_ARCHS=${SSLFAST_CUDA_ARCHS:-$cap} SSLFAST_BUILD_JOBS=$JOBS \
    python3 -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  grep -E '^\s*(\[[0-9]+/[0-9]+\]|sslfast:)' "$OUT/build.log"
  python3 -m sslfast env 2>&1 | tee "$OUT/env.txt"
  nvidia-smi -L | tee -a "$OUT/env.txt"
}
gpu_tests() { python3 -m pytest tests -q -m gpu -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests_gpu.log"; }
rest_tests() { python3 -m pytest tests -q -m "not gpu" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests_rest.log"; }
bench() { python3 -m sslfast bench --device cuda --no-compile --csv "$OUT/bench.csv" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log"; }

case "$stage" in
  build) run_stage build "${BUDGET_BUILD:-240}" build ;;
  gpu-tests) run_stage gpu-tests "${BUDGET_GPU_TESTS:-240}" gpu_tests ;;
  rest-tests) run_stage rest-tests "${BUDGET_REST_TESTS:-300}" rest_tests ;;
  bench) run_stage bench "${BUDGET_BENCH:-180}" bench ;;
  all)
    run_stage build "${BUDGET_BUILD:-240}" build || exit 1
    run_stage gpu-tests "${BUDGET_GPU_TESTS:-240}" gpu_tests
    run_stage bench "${BUDGET_BENCH:-180}" bench
    ;;
  *) echo "usage: $0 [all|build|gpu-tests|bench|rest-tests]" >&2; exit 2 ;;
esac
