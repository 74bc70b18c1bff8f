"""The benchmark harness: median times after warm-up, peak memory, a summary, a CSV, a plot.

A ``Case`` is one op at one shape in one mode (forward, or forward+backward) with several
providers. A provider is a factory returning the zero-argument callable to time; a factory
raises ``Unavailable`` when it cannot run here (the run summarises those once, and never
writes them to the CSV). Provider names: ``sslfast`` (the public op with ``backend=None``,
what a user gets), one per sslfast backend (``cpu``, ``cuda``, ``triton``, ``reference``),
the peers a user runs today (``hf``, ``eager``, ``dot``, ``cdist``, ``speechbrain``, see
``PROVIDERS``) and ``compile`` (``torch.compile`` of the reference).

Three runs (``python -m sslfast bench``):
* default: the case of each op marked ``default=True`` (one production shape per op),
  providers ``sslfast`` and the op's peer (the first available of ``peer_order``);
* ``--full``: every case and provider (the sweep, tens of minutes on a small CPU);
* ``--quick``: every case at tiny shapes, every provider but ``compile`` (a smoke test).

Timing: CUDA events around each call on GPU (after a synchronize), ``perf_counter`` on CPU;
``warmup`` calls first (compilation, caches), then up to ``reps`` timed calls, fewer (never
fewer than ``MIN_REPS``) once a provider has spent ``budget_s`` seconds; median, p20, p80.

Peak memory, above what was allocated before the call, during one extra call after the
timed ones: ``torch.cuda.max_memory_allocated`` on GPU. On CPU (Linux, glibc) the process's
resident-set high-water mark: for that call malloc maps every block over 64 KiB on its own
(so a freed block leaves the resident set), free heap pages are returned to the OS
(``malloc_trim``), the mark is reset (``/proc/self/clear_refs``, "5") and ``VmHWM`` minus
the ``VmRSS`` before the call is the peak. It sees every allocation that is touched,
torch's, numpy's and the C++ extension's scratch alike, with no profiler (so no profiler
output); resolution about 0.1 MB (the kernel's RSS counters are approximate by a few
hundred kB at most). Timings run with malloc fixed at its long-run settings
(``settle_malloc``). Elsewhere the CPU peak is not measured (left empty).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import datetime
import gc
import importlib
import math
import os
import pkgutil
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _dispatch

BACKENDS = ("cuda", "triton", "cpu")  # sslfast's kernel backends (reference is listed apart)
NOT_PEERS = ("sslfast", "compile", "hf-style") + BACKENDS
MIN_REPS = 3
MEMORY_RESOLUTION_MB = 0.1  # peaks below this are not told apart (page counts, RSS counters)
DEFAULT_CSV = "sslfast_bench.csv"

# What each provider is; printed as the legend (only the providers a run used).
PROVIDERS = {
    "sslfast": "sslfast's public op with backend=None, what you get by default (the backend it ran: column backend)",
    "cpu": "sslfast's C++/OpenMP backend",
    "cuda": "sslfast's CUDA backend",
    "triton": "sslfast's Triton backend",
    "reference": "sslfast's pure-PyTorch reference (the specification; the peer when no library has the op)",
    "hf": "Hugging Face transformers' own code for the op (wav2vec 2.0 / CLIP modules)",
    "hf-style": "sslfast's kernel run with style='hf' (Hugging Face's masking algorithm)",
    "eager": "the plain PyTorch code trainers write today (BEST-RQ noise: y[mask] = randn * std)",
    "dot": "the plain formulation: normalised projection, one score tensor by bmm, argmax",
    "cdist": "torch.cdist then argmin (k-means labels the plain way)",
    "speechbrain": "SpeechBrain's BEST-RQ formula (argmin over a (B, V, T, d) broadcast)",
    "compile": "torch.compile of sslfast's reference",
}

COLUMNS = {
    "sslfast ms": "median time of one call (forward, or forward+backward), milliseconds",
    "backend": "the backend sslfast's backend=None ran here (cpu, cuda, triton or reference)",
    "peer": "what you would run without sslfast: Hugging Face where installed, else the plain PyTorch "
            "formula, else sslfast's reference",
    "speed-up": "peer ms / sslfast ms (above 1: sslfast is faster)",
    "MB": "peak memory of one call above what was allocated before it, 10^6 bytes",
    "memory": "peer MB / sslfast MB (above 1: sslfast needs less; '>' when sslfast's peak is under the "
              "0.1 MB resolution, so only a bound is known; '-' when both are)",
}


class Unavailable(Exception):
    """A provider cannot run here; the message says why."""


@dataclass
class Case:
    op: str
    shape: str  # human-readable shape, e.g. "B=4 T=781 D=256 K=100"
    mode: str  # "fwd" or "fwd+bwd"
    providers: dict[str, Callable[[], Callable[[], object]]]
    baseline: str = "reference"  # speed-ups in the CSV are against this provider and "hf"
    bytes_moved: int | None = None  # fewest bytes the op must move (GB/s on GPU)
    reps: int | None = None  # a cap on timed reps for cases that take seconds per call
    warmup: int | None = None
    flops: int | None = None
    params: dict = field(default_factory=dict)
    default: bool = False  # the op's representative production shape, run by default

    def peer_order(self) -> list[str]:
        """The peers in order of preference: hf, the other formulas, then the reference."""
        others = [p for p in self.providers if p not in NOT_PEERS + ("hf", "reference")]
        return [p for p in ("hf",) if p in self.providers] + others + \
            [p for p in ("reference",) if p in self.providers]


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
    backend: str | None = None  # for "sslfast": the backend(s) backend=None resolved to


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable, device: torch.device, *, warmup: int, reps: int, min_time_s: float = 0.0,
                  budget_s: float | None = None) -> list[float]:
    """Milliseconds of up to ``reps`` calls after ``warmup`` calls: more reps until
    ``min_time_s`` has passed (at most 10 * reps), fewer (not under ``MIN_REPS``) once the
    warm-up and the timed calls have spent ``budget_s`` seconds."""
    start_all = time.perf_counter()
    for _ in range(warmup):
        fn()
        if budget_s is not None and time.perf_counter() - start_all > budget_s / 2:
            break  # one slow call is warm-up enough
    _sync(device)
    times: list[float] = []
    start_timed = time.perf_counter()
    while True:
        spent = time.perf_counter() - start_all
        if len(times) >= reps and (time.perf_counter() - start_timed >= min_time_s or len(times) >= 10 * reps):
            break
        if budget_s is not None and len(times) >= min(MIN_REPS, reps) and spent > budget_s:
            break
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


_LIBC = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MEASURE_MMAP_THRESHOLD = 64 * 1024
TIMING_MMAP_THRESHOLD, TIMING_TRIM_THRESHOLD = 32 * 1024 * 1024, 64 * 1024 * 1024


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    return _LIBC if _LIBC and hasattr(_LIBC, "mallopt") and hasattr(_LIBC, "malloc_trim") else None


def settle_malloc() -> None:
    """glibc malloc as it settles in a long-running process (mmap above 32 MiB, trim above
    64 MiB, its dynamic rule's upper bounds), fixed, so that every timing of a run, before
    and after a memory call, sees the same allocator."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, TIMING_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TIMING_TRIM_THRESHOLD)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def cpu_peak_unavailable_reason() -> str | None:
    """None when the CPU peak can be measured here (Linux, a writable /proc/self/clear_refs)."""
    try:
        _proc_status_bytes("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        return f"peak CPU memory needs Linux's /proc/self/clear_refs and VmHWM ({exc})"
    return None


def peak_memory_mb(fn: Callable, device: torch.device) -> float | None:
    """Peak memory above the starting point during one call, in MB (10^6 bytes); None where
    it cannot be measured (CPU peaks off Linux)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 1e6
    if cpu_peak_unavailable_reason() is not None:
        return None
    libc = _libc()
    gc.collect()
    if libc is not None:
        # Blocks over 64 KiB get their own mapping, returned to the OS when freed, so the
        # resident set follows the live allocations (a freed block kept by malloc would
        # otherwise hide, or a fragmented heap inflate, the peak); free heap pages leave
        # the resident set, so reusing them counts again.
        libc.mallopt(_M_MMAP_THRESHOLD, MEASURE_MMAP_THRESHOLD)
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _proc_status_bytes("VmRSS")
        out = fn()
        peak = _proc_status_bytes("VmHWM") - base
        del out
    finally:
        settle_malloc()
    return max(peak, 0) / 1e6


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _backend_label(choices: list[tuple[str, str]]) -> str | None:
    names = list(dict.fromkeys(name for _, name in choices))
    return "+".join(names) if names else None


def run_provider(case: Case, name: str, device: torch.device, *, warmup: int, reps: int, memory: bool = True,
                 budget_s: float | None = None) -> Result:
    """Time one provider of ``case`` (and its peak memory); a skipped Result if it is unavailable."""
    res = Result(case, name)
    try:
        fn = case.providers[name]()
        t0 = time.perf_counter()
        with _dispatch.record_choices() as choices:
            fn()  # the first call: which backend backend=None runs (and a warm-up call)
        first_s = time.perf_counter() - t0
        res.backend = _backend_label(choices)
        warm = min(warmup, case.warmup if case.warmup is not None else warmup) - 1
        if budget_s is not None and first_s > budget_s / 2:
            warm = 0  # one slow call is warm-up enough (as in time_callable)
        times = time_callable(fn, device, warmup=max(warm, 0), reps=min(reps, case.reps or reps),
                              budget_s=budget_s)
        res.median_ms = statistics.median(times)
        res.p20_ms, res.p80_ms = _percentile(times, 0.2), _percentile(times, 0.8)
        res.reps = len(times)
        if memory:
            res.peak_mb = peak_memory_mb(fn, device)
        del fn
    except Unavailable as exc:
        res.skipped = str(exc)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def run_case(case: Case, device: torch.device, *, warmup: int, reps: int, providers: list[str] | None = None,
             memory: bool = True, budget_s: float | None = None) -> list[Result]:
    """Every provider of ``case`` (or those named in ``providers``)."""
    return [run_provider(case, name, device, warmup=warmup, reps=reps, memory=memory, budget_s=budget_s)
            for name in case.providers if not providers or name in providers]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def versions() -> dict:
    """The versions written to every CSV row."""
    from .. import __version__

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return {"sslfast": __version__, "torch": torch.__version__, "triton": tv, "python": sys.version.split()[0]}


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


CSV_FIELDS = ["timestamp", "op", "mode", "shape", "provider", "median_ms", "p20_ms", "p80_ms", "reps", "peak_mb",
              "speedup_vs_reference", "speedup_vs_hf", "gb_per_s", "device", "device_name", "sslfast", "torch",
              "triton", "python", "backend"]


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
    """Append one row per measured result; a file written before the ``backend`` column
    existed keeps its header (that column is then left out)."""
    ts = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    vers = versions()
    speed = _speedups(results)
    fields = CSV_FIELDS
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            fields = next(csv.reader(f), CSV_FIELDS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
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
                "backend": r.backend or "",
            })
            n += 1
    return n


def format_table(results: list[Result]) -> str:
    """Every measured provider of every case (``--full`` prints it before the summary)."""
    speed = _speedups(results)
    header = f"{'op':<26} {'mode':<7} {'shape':<34} {'provider':<16} {'median ms':>11} {'p20-p80 ms':>19} " \
             f"{'peak MB':>9} {'x ref':>7} {'x hf':>7}"
    lines = [header, "-" * len(header)]
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for r in results:
        if r.skipped:
            continue
        s = speed[(id(r.case), r.provider)]
        name = f"{r.provider}[{r.backend}]" if r.provider == "sslfast" and r.backend else r.provider
        lines.append(
            f"{r.case.op:<26} {r.case.mode:<7} {r.case.shape:<34} {name:<16} {r.median_ms:>11.3f} "
            f"{r.p20_ms:>9.3f}-{r.p80_ms:<9.3f} {fmt(r.peak_mb):>9} {fmt(s['reference']):>7} {fmt(s['hf']):>7}"
        )
    return "\n".join(lines)


@dataclass
class Summary:
    """One line of the summary: sslfast (backend=None) against the op's peer."""
    case: Case
    ours: Result | None
    peer: Result | None

    @property
    def speedup(self) -> float | None:
        if self.ours and self.peer and self.ours.median_ms and self.peer.median_ms:
            return self.peer.median_ms / self.ours.median_ms
        return None

    @property
    def memory_ratio(self) -> float | None:
        """peer MB / sslfast MB; with sslfast under the 0.1 MB resolution, the lower bound
        peer MB / 0.1 (``memory_is_bound``); None when the peer is under it too."""
        a = self.ours.peak_mb if self.ours else None
        b = self.peer.peak_mb if self.peer else None
        if a is None or b is None or b < MEMORY_RESOLUTION_MB:
            return None
        return b / max(a, MEMORY_RESOLUTION_MB)

    @property
    def memory_is_bound(self) -> bool:
        return self.memory_ratio is not None and self.ours.peak_mb < MEMORY_RESOLUTION_MB


def summarize(results: list[Result]) -> list[Summary]:
    """Per case: the ``sslfast`` row and the first measured peer of ``Case.peer_order``."""
    by_case: dict[int, dict[str, Result]] = {}
    cases: dict[int, Case] = {}
    for r in results:
        by_case.setdefault(id(r.case), {})[r.provider] = r
        cases[id(r.case)] = r.case
    out = []
    for cid, rows in by_case.items():
        case = cases[cid]
        ours = rows.get("sslfast")
        ours = ours if ours and not ours.skipped else None
        peer = next((rows[p] for p in case.peer_order() if p in rows and not rows[p].skipped), None)
        out.append(Summary(case, ours, peer))
    return out


def _ratio_text(s: Summary) -> str:
    r = s.memory_ratio
    if r is None:
        return "-"
    return (">" if s.memory_is_bound else "") + (f"{r:.0f}x" if r >= 100 else f"{r:.1f}x")


def format_summary(summary: list[Summary]) -> str:
    header = f"{'op':<26} {'mode':<7} {'shape':<34} {'sslfast ms':>11} {'backend':<10} {'peer ms':>10} " \
             f"{'peer':<12} {'speed-up':>8} {'sslfast MB':>10} {'peer MB':>9} {'memory':>7}"
    lines = [header, "-" * len(header)]

    def num(v, spec, width):
        return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"

    for s in summary:
        o, p = s.ours, s.peer
        lines.append(
            f"{s.case.op:<26} {s.case.mode:<7} {s.case.shape:<34} {num(o and o.median_ms, '.2f', 11)} "
            f"{(o.backend or '?') if o else '-':<10} {num(p and p.median_ms, '.2f', 10)} {p.provider if p else '-':<12} "
            f"{num(s.speedup, '.2f', 7)}{'x' if s.speedup else ' '} {num(o and o.peak_mb, '.1f', 10)} "
            f"{num(p and p.peak_mb, '.1f', 9)} {_ratio_text(s):>7}")
    return "\n".join(lines)


def format_skipped(results: list[Result]) -> str:
    """Skipped providers, once per (provider, reason), with how many cases it affected."""
    groups: dict[tuple[str, str], int] = {}
    for r in results:
        if r.skipped:
            groups[(r.provider, r.skipped)] = groups.get((r.provider, r.skipped), 0) + 1
    if not groups:
        return ""
    lines = ["Not run here:"]
    for (name, reason), n in sorted(groups.items()):
        lines.append(f"  {name} ({n} case{'s' if n > 1 else ''}): {reason}")
    return "\n".join(lines)


def format_legend(results: list[Result]) -> str:
    used = {r.provider for r in results if not r.skipped}
    lines = ["Providers:"]
    lines += [f"  {name:<12} {text}" for name, text in PROVIDERS.items() if name in used]
    lines.append("Columns:")
    lines += [f"  {name:<12} {text}" for name, text in COLUMNS.items()]
    return "\n".join(lines)


def plot(path: str, summary: list[Summary], title: str) -> None:
    """Speed-up and memory ratio (peer / sslfast) per case, log scale, to ``path``
    (format from its extension). Needs matplotlib (``pip install sslfast[bench]``)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(f"--plot needs matplotlib ({exc}); pip install 'sslfast[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s.speedup is not None]
    labels = [f"{s.case.op} {s.case.mode}\n{s.case.shape} vs {s.peer.provider}" for s in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) + 2.2), sharey=True)
    ys = list(range(len(rows)))[::-1]
    for ax, values, what in ((axes[0], [s.speedup for s in rows], "speed-up (peer time / sslfast time)"),
                             (axes[1], [s.memory_ratio for s in rows], "memory ratio (peer peak / sslfast peak)")):
        vals = [v if v is not None else float("nan") for v in values]
        colors = ["tab:gray" if 0.9 <= v <= 1.1 else ("tab:green" if v > 1 else "tab:red") for v in vals]
        ax.barh(ys, [v if not math.isnan(v) else 0 for v in vals], color=colors, left=0)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(what + ", log scale")
        bounds = [False] * len(rows) if ax is axes[0] else [s.memory_is_bound for s in rows]
        for y, v, bound in zip(ys, vals, bounds):
            text = " both under 0.1 MB" if math.isnan(v) else f" {'>' if bound else ''}{v:.3g}x"
            ax.text(1.0 if math.isnan(v) else v, y, text, va="center", fontsize=8)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def families() -> list[str]:
    """The op-family modules of this package (every module but the harness)."""
    from . import __path__ as pkg_path

    return sorted(m.name for m in pkgutil.iter_modules(pkg_path) if m.name not in ("harness",))


def collect_cases(device: torch.device, *, quick: bool, ops: list[str] | None = None,
                  default_only: bool = False) -> list[Case]:
    """The cases of every family (``quick``: tiny shapes; ``default_only``: each op's
    representative case), optionally only those of ``ops`` (op or family names)."""
    cases = []
    for fam in families():
        mod = importlib.import_module(f"{__package__}.{fam}")
        for case in mod.cases(device, quick):
            if ops and case.op not in ops and fam not in ops:
                continue
            if default_only and not case.default:
                continue
            cases.append(case)
    return cases


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Time sslfast against what you run today. Default: one production shape per op (wav2vec 2.0 base), "
        "sslfast (backend=None) beside its peer (Hugging Face where installed, else the plain PyTorch formula), "
        "a few minutes on a 2-core CPU. Prints a summary table and a legend; appends one CSV row per measurement.")
    parser.epilog = (f"Files: the CSV goes to ./{DEFAULT_CSV} (in the working directory) unless --csv says "
                     "otherwise; no plot is drawn without --plot. Both paths are printed at the start.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="every case at tiny shapes, every provider but compile, few reps: a smoke test (seconds)")
    size.add_argument("--full", action="store_true",
                      help="every case at every production shape with every provider (sslfast's backends, the "
                           "reference, peers, torch.compile): the sweep, tens of minutes on a small CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, else cpu)")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help="op names or family names to run (default: all)")
    parser.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                        help="providers to run, e.g. sslfast hf cpu reference (default: sslfast and the peer; "
                             "all with --full or --quick)")
    parser.add_argument("--warmup", type=_count(0), default=None, metavar="N",
                        help="untimed calls before timing each provider (default: 1 with --quick, else 3; a "
                             "provider whose first call takes over half the budget gets one)")
    parser.add_argument("--reps", type=_count(1), default=None, metavar="N",
                        help="timed calls per provider (default: 3 with --quick, 20 on GPU, else 7), fewer (at "
                             f"least {MIN_REPS}) once the provider has used --budget seconds")
    parser.add_argument("--budget", type=_seconds, default=None, metavar="SECONDS",
                        help="seconds of warm-up and timed calls per provider after which timing stops at "
                             f"{MIN_REPS} reps (default: 3; none with --full)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory call (one extra call per provider)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time torch.compile(reference) (default: only with --full)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="do not time torch.compile (the default without --full)")
    parser.add_argument("--csv", default=DEFAULT_CSV, metavar="PATH",
                        help=f"CSV file to append one row per measurement to (default: ./{DEFAULT_CSV}, in the working "
                             "directory)")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="also draw speed-up and memory ratio per op to PATH (.png, .svg, .pdf; needs "
                             "matplotlib, in the [bench] extra; default: no plot)")
    parser.add_argument("--details", action="store_true",
                        help="print every provider's row (median, p20-p80, peak, speed-ups), not only the summary "
                             "(default: on with --full)")


def _load_text() -> str:
    """The 1-minute load average against the CPU count ("" where unknown): a busy machine's
    timings are not a quiet one's."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (OSError, AttributeError):
        return ""


class _Progress:
    """A tqdm bar on a terminal; one line per case elsewhere (logs); plain lines without tqdm."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        try:
            from tqdm import tqdm

            import shutil

            size = shutil.get_terminal_size((120, 24))  # a pty may report 0 x 0: tqdm would hide the bar
            self.bar = tqdm(total=total, unit="run", ncols=min(size.columns, 160), nrows=max(size.lines, 2),
                            disable=None, file=sys.stderr,
                            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {desc}")
            if self.bar.disable:
                self.bar = None
        except ImportError:
            pass

    def start(self, case: Case, provider: str) -> None:
        label = f"{case.op} {case.mode} {case.shape}: {provider}"
        if self.bar is not None:
            self.bar.set_description_str(label, refresh=True)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", flush=True)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bench_device(name: str | None) -> torch.device:
    """The device to measure on; a clear SystemExit for a name torch does not know or a device
    this torch build cannot use (instead of a torch traceback mid-run)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"sslfast bench: unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"sslfast bench: --device {name} but this torch ({torch.__version__}) sees no CUDA "
                             "device: install a CUDA build of torch on a machine with a GPU, or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"sslfast bench: --device {name} but only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise SystemExit(f"sslfast bench: cases exist for cpu and cuda, not {device.type}")
    return device


def _check_names(kind: str, given: list[str] | None, known: set[str]) -> None:
    unknown = sorted(set(given or ()) - known)
    if unknown:
        raise SystemExit(f"sslfast bench: unknown {kind} {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    settle_malloc()
    device = _bench_device(args.device)
    mode = "quick" if args.quick else ("full" if args.full else "default")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (3 if args.quick else (20 if device.type == "cuda" else 7))
    budget = args.budget if args.budget is not None else (None if args.full else 3.0)
    with_compile = args.compile if args.compile is not None else args.full
    details = args.details or args.full
    csv_path = os.path.abspath(args.csv)

    vers = versions()
    load = _load_text()
    print(f"sslfast bench ({mode}) on {device_name(device)} ({device.type}){'; ' + load if load else ''}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + f", transformers {_transformers_version()}")
    print(f"CSV: {csv_path} (appending)" + (f"; plot: {os.path.abspath(args.plot)}" if args.plot else ""))
    every = collect_cases(device, quick=args.quick)
    _check_names("op", args.ops, {c.op for c in every} | set(families()))
    _check_names("provider", args.providers, {n for c in every for n in c.providers})
    cases = collect_cases(device, quick=args.quick, ops=args.ops, default_only=mode == "default")
    # Each case runs its providers in order; a "first of" group runs until one is measured
    # (the default run: sslfast, then the first available peer).
    plan: list[tuple[Case, list[list[str]]]] = []
    for case in cases:
        names = [n for n in case.providers if with_compile or n != "compile"]
        if args.providers:
            groups = [[n] for n in names if n in args.providers]
        elif mode == "default":
            groups = [["sslfast"], case.peer_order()]
        else:
            groups = [[n] for n in names]
        plan.append((case, [g for g in groups if g]))
    total = sum(len(groups) for _, groups in plan)
    print(f"{len(cases)} cases, {total} measurements; warm-up {warmup}, up to {reps} timed calls per provider"
          + (f", {budget:g} s budget each" if budget else "") + "; medians", flush=True)

    progress = _Progress(total)
    results: list[Result] = []
    n = 0
    try:
        for case, groups in plan:
            rows = []
            for group in groups:
                for name in group:
                    progress.start(case, name)
                    res = run_provider(case, name, device, warmup=warmup, reps=reps, memory=not args.no_memory,
                                       budget_s=budget)
                    rows.append(res)
                    if not res.skipped:
                        break
                progress.step()
            results.extend(rows)
            n += write_csv(csv_path, rows, device)  # per case, so an interrupted run keeps what it measured
    finally:
        progress.close()

    print()
    if details:
        print(format_table(results))
        print()
    summary = summarize(results)
    print(format_summary(summary))
    print()
    print(format_legend(results))
    skipped = format_skipped(results)
    if skipped:
        print(skipped)
    if args.plot:
        title = (f"sslfast bench ({mode}) on {device_name(device)}: " + ", ".join(f"{k} {v}" for k, v in vers.items())
                 + f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
                 + (f" ({load} at the start, {_load_text()} at the end)" if load else "")
                 + "; peer / sslfast: above 1 sslfast is faster / needs less memory")
        plot(args.plot, summary, title)
        print(f"plot written to {os.path.abspath(args.plot)}")
    print(f"{n} rows appended to {csv_path}; {time.perf_counter() - t_start:.0f} s")
    if n == 0:
        print("sslfast bench: nothing was measured (see 'Not run here' above)", file=sys.stderr)
        return 1
    return 0
