"""The benchmark harness: median times after warm-up, peak memory, a table and a CSV.

A ``Case`` is one op at one shape in one mode (forward, or forward+backward) with several
providers: each sslfast backend, the reference, a peer library (``hf``) where installed and
``torch.compile(reference)``. A provider is a factory returning the zero-argument callable
to time; a factory raises ``Unavailable`` when it cannot run here, and that row is printed
as skipped and never written to the CSV.

Timing: CUDA events around each call on GPU (after a synchronize), ``perf_counter`` on CPU;
``warmup`` calls first (compilation, caches), then ``reps`` timed calls; median, p20, p80.
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU, for one call, the peak of
torch's allocations (from the profiler's allocation events) plus the peak of Python and
numpy allocations (tracemalloc), so numpy peers are measured too. Scratch that the C++
extension allocates with plain malloc is not seen; sslfast's kernels allocate their
outputs and large buffers through torch.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import os
import pkgutil
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


class Unavailable(Exception):
    """A provider cannot run here; the message says why."""


@dataclass
class Case:
    op: str
    shape: str  # human-readable shape, e.g. "B=4 T=781 D=256 K=100"
    mode: str  # "fwd" or "fwd+bwd"
    providers: dict[str, Callable[[], Callable[[], object]]]
    baseline: str = "reference"  # speed-ups are reported against this provider and "hf"
    bytes_moved: int | None = None  # fewest bytes the op must move (GB/s on GPU)
    reps: int | None = None  # a cap on timed reps for cases that take seconds per call
    warmup: int | None = None
    flops: int | None = None
    params: dict = field(default_factory=dict)


@dataclass
class Result:
    case: Case
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mb: float | None = None
    reps: int = 0
    skipped: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable, device: torch.device, *, warmup: int, reps: int, min_time_s: float = 0.0) -> list[float]:
    """Milliseconds of ``reps`` calls after ``warmup`` calls (more reps until ``min_time_s``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all < min_time_s and len(times) < 10 * reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory_mb(fn: Callable, device: torch.device) -> float:
    """Peak memory above the starting point during one call, in MB (10^6 bytes)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 1e6
    import tracemalloc

    from torch.profiler import ProfilerActivity, profile

    # Two calls: the profiler's own bookkeeping would show up in tracemalloc's peak.
    tracemalloc.start()
    try:
        fn()
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for ev in prof.events():
        delta = ev.cpu_memory_usage if ev.name == "[memory]" else ev.self_cpu_memory_usage
        if delta:
            deltas.append((ev.time_range.start, delta))
    deltas.sort()
    current = peak = 0
    for _, d in deltas:
        current += d
        peak = max(peak, current)
    return (peak + py_peak) / 1e6


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_case(case: Case, device: torch.device, *, warmup: int, reps: int, providers: list[str] | None = None,
             memory: bool = True) -> list[Result]:
    results = []
    for name, factory in case.providers.items():
        if providers and name not in providers:
            continue
        res = Result(case, name)
        try:
            fn = factory()
            times = time_callable(fn, device, warmup=min(warmup, case.warmup if case.warmup is not None else warmup),
                                  reps=min(reps, case.reps or reps))
            res.median_ms = statistics.median(times)
            res.p20_ms, res.p80_ms = _percentile(times, 0.2), _percentile(times, 0.8)
            res.reps = len(times)
            if memory:
                res.peak_mb = peak_memory_mb(fn, device)
            del fn
        except Unavailable as exc:
            res.skipped = str(exc)
        results.append(res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def versions() -> dict:
    from .. import __version__

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return {"sslfast": __version__, "torch": torch.__version__, "triton": tv, "python": sys.version.split()[0]}


CSV_FIELDS = ["timestamp", "op", "mode", "shape", "provider", "median_ms", "p20_ms", "p80_ms", "reps", "peak_mb",
              "speedup_vs_reference", "speedup_vs_hf", "gb_per_s", "device", "device_name", "sslfast", "torch",
              "triton", "python"]


def _speedups(results: list[Result]) -> dict[tuple[int, str], dict[str, float | None]]:
    out = {}
    by_case: dict[int, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(id(r.case), {})[r.provider] = r
    for cid, rows in by_case.items():
        for name, r in rows.items():
            s = {}
            for base in ("reference", "hf"):
                b = rows.get(base)
                s[base] = (b.median_ms / r.median_ms) if (b and b.median_ms and r.median_ms) else None
            out[(cid, name)] = s
    return out


def write_csv(path: str, results: list[Result], device: torch.device) -> int:
    ts = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    vers = versions()
    speed = _speedups(results)
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in results:
            if r.skipped or r.median_ms is None:
                continue  # a figure that was not measured is not written
            s = speed[(id(r.case), r.provider)]
            gbps = (r.case.bytes_moved / (r.median_ms * 1e-3) / 1e9) if (r.case.bytes_moved and device.type == "cuda") else None
            w.writerow({
                "timestamp": ts, "op": r.case.op, "mode": r.case.mode, "shape": r.case.shape, "provider": r.provider,
                "median_ms": f"{r.median_ms:.4f}", "p20_ms": f"{r.p20_ms:.4f}", "p80_ms": f"{r.p80_ms:.4f}",
                "reps": r.reps, "peak_mb": "" if r.peak_mb is None else f"{r.peak_mb:.2f}",
                "speedup_vs_reference": "" if s["reference"] is None else f"{s['reference']:.2f}",
                "speedup_vs_hf": "" if s["hf"] is None else f"{s['hf']:.2f}",
                "gb_per_s": "" if gbps is None else f"{gbps:.1f}",
                "device": device.type, "device_name": device_name(device), **vers,
            })
            n += 1
    return n


def format_table(results: list[Result]) -> str:
    speed = _speedups(results)
    header = f"{'op':<28} {'mode':<8} {'shape':<34} {'provider':<12} {'median ms':>11} {'p20-p80 ms':>19} {'peak MB':>9} {'x ref':>7} {'x hf':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        if r.skipped:
            lines.append(f"{r.case.op:<28} {r.case.mode:<8} {r.case.shape:<34} {r.provider:<12} skipped: {r.skipped}")
            continue
        s = speed[(id(r.case), r.provider)]
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"{r.case.op:<28} {r.case.mode:<8} {r.case.shape:<34} {r.provider:<12} {r.median_ms:>11.3f} "
            f"{r.p20_ms:>9.3f}-{r.p80_ms:<9.3f} {fmt(r.peak_mb):>9} {fmt(s['reference']):>7} {fmt(s['hf']):>7}"
        )
    return "\n".join(lines)


def families() -> list[str]:
    """The op-family modules of this package (every module but the harness)."""
    from . import __path__ as pkg_path

    return sorted(m.name for m in pkgutil.iter_modules(pkg_path) if m.name not in ("harness",))


def collect_cases(device: torch.device, *, quick: bool, ops: list[str] | None = None) -> list[Case]:
    cases = []
    for fam in families():
        mod = importlib.import_module(f"{__package__}.{fam}")
        for case in mod.cases(device, quick):
            if ops and case.op not in ops and fam not in ops:
                continue
            cases.append(case)
    return cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--ops", nargs="*", default=None, help="op names or families to run (default: all)")
    parser.add_argument("--providers", nargs="*", default=None, help="providers to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few reps (smoke test)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time torch.compile(reference) (default: on, off with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--csv", default="sslfast_bench.csv", help="CSV file to append rows to")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (3 if args.quick else (20 if device.type == "cuda" else 7))
    vers = versions()
    print(f"sslfast bench on {device_name(device)} ({device.type}); " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"warm-up {warmup}, {reps} timed reps per provider; median (p20-p80) in ms", flush=True)
    with_compile = args.compile if args.compile is not None else not args.quick
    results = []
    n = 0
    for case in collect_cases(device, quick=args.quick, ops=args.ops):
        if not with_compile:
            case.providers.pop("compile", None)
        rows = run_case(case, device, warmup=warmup, reps=reps, providers=args.providers, memory=not args.no_memory)
        results.extend(rows)
        print(format_table(rows).split("\n", 2)[-1], flush=True)
        n += write_csv(args.csv, rows, device)  # per case, so an interrupted run keeps what it measured
    print()
    print(format_table(results))
    print(f"\n{n} rows appended to {args.csv}")
    return 0
