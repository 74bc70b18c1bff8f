#!/usr/bin/env bash
# One run on a lent GPU machine (see DEVELOPERS.md): build with nvcc for the local GPU, run
# the whole test suite (the gpu tier included), then the benchmark at production shapes.
# Logs and the CSV go to $OUT (the device tool brings them back); commit the CSV under
# benchmarks/results/ with the device name in the file name.
#   device run: bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/sslfast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cap=$(python3 -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
SSLFAST_CUDA=1 SSLFAST_CUDA_ARCHS=${SSLFAST_CUDA_ARCHS:-$cap} python3 -m pip install -q --no-build-isolation --no-deps -e . \
  2>&1 | tee "$OUT/build.log" || exit 1
python3 -m sslfast env 2>&1 | tee "$OUT/env.txt"
python3 -m pytest tests -q -m gpu 2>&1 | tee "$OUT/tests_gpu.log"
python3 -m pytest tests -q -m "not gpu" -x 2>&1 | tail -5 | tee "$OUT/tests_rest.log"
python3 -m sslfast bench --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log"
