"""The benchmark harness: timing, CPU peak memory, CSV rows only for measured figures."""
import csv

import pytest
import torch

from sslfast.bench import harness


@pytest.mark.cpu
def test_cpu_peak_memory_sees_torch_allocations():
    n = 1 << 20  # 4 MB per fp32 tensor

    def fn():
        a = torch.ones(n)
        b = a * 2  # a and b alive together: 8 MB
        del a
        c = b + 1  # b and c: 8 MB
        return c.sum()

    peak = harness.peak_memory_mb(fn, torch.device("cpu"))
    assert 8.0 <= peak <= 13.0, peak


@pytest.mark.cpu
def test_cpu_peak_memory_sees_numpy_allocations():
    import numpy as np

    def fn():
        a = np.ones(1 << 20)  # 8 MB of float64
        b = a * 2  # 16 MB together
        return float(b.sum())

    peak = harness.peak_memory_mb(fn, torch.device("cpu"))
    assert 16.0 <= peak <= 21.0, peak


@pytest.mark.cpu
def test_run_case_table_and_csv(tmp_path):
    x = torch.randn(256, 256)

    def unavailable():
        raise harness.Unavailable("not here")

    case = harness.Case(
        op="matmul", shape="256x256", mode="fwd",
        providers={"reference": lambda: (lambda: x @ x), "slow": lambda: (lambda: (x @ x, x @ x)), "hf": unavailable},
    )
    results = harness.run_case(case, torch.device("cpu"), warmup=1, reps=3)
    by = {r.provider: r for r in results}
    assert by["hf"].skipped == "not here" and by["hf"].median_ms is None
    assert by["reference"].median_ms > 0 and by["reference"].reps >= 3
    assert by["reference"].p20_ms <= by["reference"].median_ms <= by["reference"].p80_ms
    table = harness.format_table(results)
    assert "skipped: not here" in table
    path = tmp_path / "out.csv"
    assert harness.write_csv(str(path), results, torch.device("cpu")) == 2
    rows = list(csv.DictReader(open(path)))
    assert {r["provider"] for r in rows} == {"reference", "slow"}  # unmeasured rows are not written
    assert all(r["device"] == "cpu" and r["torch"] == torch.__version__ for r in rows)
    ref = next(r for r in rows if r["provider"] == "reference")
    assert float(ref["speedup_vs_reference"]) == pytest.approx(1.0)


@pytest.mark.cpu
def test_every_family_defines_quick_cases():
    cases = harness.collect_cases(torch.device("cpu"), quick=True)
    assert {c.op for c in cases}, "no benchmark cases were found"
    for case in cases:
        assert case.providers and case.op and case.shape and case.mode in ("fwd", "fwd+bwd")
