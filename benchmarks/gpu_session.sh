#!/usr/bin/env bash
# One session on a lent GPU machine: build with nvcc for the local GPU, run the test suite
# (the gpu tier included), then the benchmark at production shapes. Logs and the CSV go to
# $OUT (the device tool brings them back); commit the CSV under benchmarks/results/ with the
# device name in the file name.
#
#   bash benchmarks/gpu_session.sh            # every stage in one command
#   bash benchmarks/gpu_session.sh build      # or one stage per command, for tools that
#   bash benchmarks/gpu_session.sh gpu-tests  # cap a command's time (the device tool: 10
#   bash benchmarks/gpu_session.sh rest-tests # minutes); later stages reuse the build
#   bash benchmarks/gpu_session.sh bench      # (keep build/ and sslfast/*.so between calls)
set -uo pipefail
OUT=${OUT:-/tmp/sslfast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage=${1:-all}

build() {
  local cap
  cap=$(python3 -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
  SSLFAST_CUDA=1 SSLFAST_CUDA_ARCHS=${SSLFAST_CUDA_ARCHS:-$cap} python3 -m pip install -q --no-build-isolation --no-deps -e . \
    2>&1 | tee "$OUT/build.log" || exit 1
  python3 -m sslfast env 2>&1 | tee "$OUT/env.txt"
}
gpu_tests() { python3 -m pytest tests -q -m gpu -rs 2>&1 | tee "$OUT/tests_gpu.log"; }
rest_tests() { python3 -m pytest tests -q -m "not gpu" 2>&1 | tail -15 | tee "$OUT/tests_rest.log"; }
bench() { python3 -m sslfast bench --full --csv "$OUT/bench.csv" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log"; }

case "$stage" in
  build) build ;;
  gpu-tests) gpu_tests ;;
  rest-tests) rest_tests ;;
  bench) bench ;;
  all) build; gpu_tests; rest_tests; bench ;;
  *) echo "usage: $0 [all|build|gpu-tests|rest-tests|bench]" >&2; exit 2 ;;
esac
