"""pytest-benchmark front end of the shared harness (sslfast/bench): the same cases and
providers as ``python -m sslfast bench``.

    pytest benchmarks/ --benchmark-only                      # production shapes
    SSLFAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only  # small shapes
"""
import os

import pytest
import torch

from sslfast.bench import harness

DEVICE = torch.device(os.environ.get("SSLFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("SSLFAST_BENCH_QUICK", "0") not in ("", "0")

PARAMS = [
    pytest.param(case, name, id=f"{case.op}-{case.mode}-{case.shape.replace(' ', '_')}-{name}")
    for case in harness.collect_cases(DEVICE, quick=QUICK)
    for name in case.providers
]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_bench(benchmark, case, provider):
    try:
        fn = case.providers[provider]()
    except harness.Unavailable as exc:
        pytest.skip(str(exc))
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize(DEVICE)
    else:
        timed = fn
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, device=harness.device_name(DEVICE))
    benchmark.pedantic(timed, warmup_rounds=2, rounds=5 if QUICK else 10, iterations=1)
