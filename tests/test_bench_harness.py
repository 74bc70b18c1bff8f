"""The benchmark harness: timing, CPU peak memory, CSV rows only for measured figures, the
summary against the peer, the command line's output."""
import csv
import ctypes
import ctypes.util
import os
import re
import subprocess
import sys

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

    fn()  # warm: the harness measures after warm-up (first calls fault in code pages)
    peak = harness.peak_memory_mb(fn, torch.device("cpu"))
    assert 7.5 <= peak <= 9.0, peak


@pytest.mark.cpu
def test_cpu_peak_memory_sees_numpy_allocations():
    import numpy as np

    def fn():
        a = np.ones(1 << 20)  # 8 MB of float64
        b = a * 2  # 16 MB together
        return float(b.sum())

    fn()
    peak = harness.peak_memory_mb(fn, torch.device("cpu"))
    assert 15.5 <= peak <= 17.5, peak


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
    assert "not here" not in table  # skipped providers are summarised once, apart
    assert "hf (1 case): not here" in harness.format_skipped(results)
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


@pytest.mark.cpu
def test_cpu_peak_memory_sees_plain_malloc():
    """Scratch a C/C++ library takes with malloc counts too (the profiler did not see it)."""
    if harness.cpu_peak_unavailable_reason():
        pytest.skip(harness.cpu_peak_unavailable_reason())
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 24 * 10**6

    def fn():
        buf = libc.malloc(n)
        ctypes.memset(buf, 1, n)
        libc.free(buf)

    fn()
    peak = harness.peak_memory_mb(fn, torch.device("cpu"))
    assert 23.5 <= peak <= 25.0, peak  # the kernel's RSS counters lag by up to a few hundred kB


@pytest.mark.cpu
def test_cpu_peak_memory_counts_reused_heap_pages():
    """Memory freed by an earlier call and kept by malloc is counted again (malloc_trim)."""
    def fn():
        return torch.ones(3 * 10**6).sum()  # 12 MB, freed before the call returns

    for _ in range(3):
        fn()
    peaks = [harness.peak_memory_mb(fn, torch.device("cpu")) for _ in range(3)]
    assert all(11.5 <= p <= 13.0 for p in peaks), peaks


def _case(op, providers, **kw):
    return harness.Case(op=op, shape="n=1", mode="fwd", providers=providers, **kw)


@pytest.mark.cpu
def test_summary_takes_sslfast_and_the_first_available_peer():
    def unavailable():
        raise harness.Unavailable("transformers is not installed")

    fast = lambda: (lambda: None)  # noqa: E731
    case = _case("op", {"sslfast": fast, "cpu": fast, "hf": unavailable, "eager": fast, "reference": fast})
    assert case.peer_order() == ["hf", "eager", "reference"]
    rows = [harness.Result(case, "sslfast", median_ms=2.0, peak_mb=10.0, backend="cpu"),
            harness.Result(case, "cpu", median_ms=2.0, peak_mb=10.0),
            harness.Result(case, "hf", skipped="transformers is not installed"),
            harness.Result(case, "eager", median_ms=5.0, peak_mb=40.0),
            harness.Result(case, "reference", median_ms=1.0, peak_mb=1.0)]
    (s,) = harness.summarize(rows)
    assert s.peer.provider == "eager" and s.ours.backend == "cpu"
    assert s.speedup == pytest.approx(2.5) and s.memory_ratio == pytest.approx(4.0)
    line = harness.format_summary([s]).splitlines()[2]
    assert re.search(r"2\.00 cpu\s+5\.00 eager\s+2\.50x\s+10\.0\s+40\.0\s+4\.0x", line), line
    # under the 0.1 MB resolution only a bound is known: 40 / 0.1, shown as ">400x"
    rows[0].peak_mb = 0.01
    (s,) = harness.summarize(rows)
    assert s.memory_is_bound and s.memory_ratio == pytest.approx(400.0)
    assert harness.format_summary([s]).splitlines()[2].endswith(">400x")
    rows[3].peak_mb = 0.05  # both under it: no ratio
    (s,) = harness.summarize(rows)
    assert s.memory_ratio is None and harness.format_summary([s]).splitlines()[2].endswith(" -")


@pytest.mark.cpu
def test_run_provider_records_the_backend_none_picked(monkeypatch):
    import sslfast

    monkeypatch.delenv("SSLFAST_BACKEND", raising=False)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[:, ::3] = True
    case = _case("sample_negatives", {"sslfast": lambda: (lambda: sslfast.sample_negatives(mask, 5, seed=0))})
    res = harness.run_provider(case, "sslfast", torch.device("cpu"), warmup=1, reps=2)
    assert res.backend == "cpu" and res.reps == 2 and res.median_ms > 0


@pytest.mark.cpu
def test_budget_stops_slow_providers_at_min_reps():
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    times = harness.time_callable(slow, torch.device("cpu"), warmup=3, reps=20, budget_s=0.08)
    assert len(times) == harness.MIN_REPS and len(calls) <= harness.MIN_REPS + 2


@pytest.mark.cpu
def test_csv_keeps_an_older_header(tmp_path):
    path = tmp_path / "old.csv"
    old = [f for f in harness.CSV_FIELDS if f != "backend"]
    path.write_text(",".join(old) + "\n")
    case = _case("op", {})
    res = harness.Result(case, "sslfast", median_ms=1.0, p20_ms=1.0, p80_ms=1.0, reps=3, backend="cpu")
    assert harness.write_csv(str(path), [res], torch.device("cpu")) == 1
    rows = list(csv.reader(open(path)))
    assert rows[0] == old and len(rows[1]) == len(old)
    new = tmp_path / "new.csv"
    harness.write_csv(str(new), [res], torch.device("cpu"))
    (row,) = csv.DictReader(open(new))
    assert row["backend"] == "cpu" and row["provider"] == "sslfast"


@pytest.mark.cpu
def test_default_run_has_one_production_case_per_op():
    from sslfast import _dispatch

    cases = harness.collect_cases(torch.device("cpu"), quick=False, default_only=True)
    ops = [c.op for c in cases]
    assert len(ops) == len(set(ops)), ops
    public = {op for op in _dispatch.registered_ops() if not op.endswith("_backward")}
    # masked_prediction_loss_soft / _gumbel are the same public function with soft targets / with
    # GumbelRPQTargets (its "birq" rows, not a default case)
    same = {"wav2vec2_contrastive_loss", "masked_prediction_loss_soft", "masked_prediction_loss_gumbel"}
    assert set(ops) >= public - same, public - set(ops)
    for c in cases:
        assert "sslfast" in c.providers and c.peer_order(), c.op
    quick = harness.collect_cases(torch.device("cpu"), quick=True, default_only=True)
    assert sorted(c.op for c in quick) == sorted(ops)


def _help_text():
    return subprocess.run([sys.executable, "-m", "sslfast", "bench", "--help"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.cpu
def test_help_documents_every_flag_and_the_default_paths():
    import argparse

    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    text = _help_text()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text, flag
    assert harness.DEFAULT_CSV in text and "--plot PATH" in text


NOISE = re.compile(r"USDT|SyncActivityProfilerHandler|CPUAllocator|profiler|^\[W\d|Warning|warn\(|Traceback",
                   re.M | re.I)


@pytest.mark.cpu
@pytest.mark.slow  # the whole --quick run: about a minute on a quiet 2-core CPU
def test_quick_run_output_is_readable(tmp_path):
    """python -m sslfast bench --quick: the header first, one summary row per case, the
    legend, skipped providers once each, and no third-party log noise (stdout + stderr)."""
    csv_path = tmp_path / "quick.csv"
    plot_path = tmp_path / "quick.png"
    cmd = [sys.executable, "-m", "sslfast", "bench", "--quick", "--csv", str(csv_path)]
    try:
        import matplotlib  # noqa: F401

        cmd += ["--plot", str(plot_path)]
    except ImportError:
        plot_path = None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert not NOISE.search(out), NOISE.search(out).group(0) + "\n" + out[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sslfast bench (quick) on ") and lines[1].startswith("versions: ")
    assert lines[2] == f"CSV: {csv_path} (appending)" + (f"; plot: {plot_path}" if plot_path else "")
    cases = harness.collect_cases(torch.device("cpu"), quick=True)
    head = next(i for i, l in enumerate(lines) if l.startswith("op ") and "speed-up" in l)
    body = lines[head + 2: head + 2 + len(cases)]
    assert [l.split()[0] for l in body] == [c.op for c in cases]
    assert "Providers:" in lines and "Columns:" in lines and "Not run here:" in lines
    skipped = lines[lines.index("Not run here:") + 1:]
    skipped = [l for l in skipped if l.startswith("  ")]
    assert len(skipped) == len(set(skipped)) and len(skipped) < len(cases)  # once per (provider, reason)
    assert len(list(csv.DictReader(open(csv_path)))) > len(cases)
    if plot_path:
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cpu
def test_bench_peers_compute_the_op():
    """The peers the summary compares against compute the same loss as sslfast's reference."""
    from sslfast.bench.info_nce import simclr_eager
    from sslfast.reference import info_nce as ref

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    torch.testing.assert_close(simclr_eager(z1, z2, 0.5), ref.nt_xent(z1.double(), z2.double(), 0.5).float(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "meta"], "cases exist for cpu and cuda"),
    (["--ops", "bogus", "contrastive_loss"], "unknown op bogus; known: apply_mask"),
    (["--providers", "nope"], "unknown provider nope"),
    (["--reps", "0"], "must be an integer >= 1"),
    (["--warmup", "-1"], "must be an integer >= 0"),
    (["--budget", "-5"], "must be > 0 seconds"),
    (["--ops"], "expected at least one argument"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "sees no CUDA device"),
                                            (["--ops", "apply_mask", "--providers", "cuda"], "nothing was measured")]))
def test_bad_arguments_end_with_a_message_not_a_traceback(argv, message):
    run = subprocess.run([sys.executable, "-m", "sslfast", "bench", "--quick", "--csv", os.devnull, *argv],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode in (1, 2)  # 2: argparse's usage error
    assert message in run.stderr and "Traceback" not in run.stderr
