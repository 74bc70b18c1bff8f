"""The CPU samplers on one thread against two, beside busy processes (issue 12.1).

    python benchmarks/contention.py [--busy 3] [--reps 200] [--threads 1 2]

Starts ``--busy`` processes that spin (each stops by itself after ``--max-seconds``, and all
are terminated at the end), then times each case with ``torch.set_num_threads(n)`` for every
n in ``--threads``, in blocks of ``--block`` calls per thread count, the blocks interleaved so
that every count sees the same load (call-by-call interleaving measured the scheduler: a call
right after another thread count's call starts on a fresh time slice or on none).
Prints median and p20-p80 per case and thread count, and the ratio of the slowest
multi-thread median to the one-thread median (the claim: at most noise above 1).
Cases: sample_negatives (B=16, T=781, K=100, hf layout; the data-loader shape of issue 12)
and compute_mask_indices (B=16, T=781, wav2vec 2.0's p=0.65, L=10).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def _spin(deadline: float) -> None:
    x = 0
    while time.time() < deadline:
        x += 1


def _cases():
    import sslfast

    B, T = 16, 781
    mask = sslfast.compute_mask_indices((B, T), None, 0.65, 10, seed=0)
    return {
        "sample_negatives hf B=16 T=781 K=100": lambda: sslfast.sample_negatives(mask, 100, layout="hf", seed=1,
                                                                                backend="cpu"),
        "compute_mask_indices B=16 T=781": lambda: sslfast.compute_mask_indices((B, T), None, 0.65, 10, seed=2,
                                                                               backend="cpu"),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busy", type=int, default=3)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="the busy processes stop by then at the latest")
    args = ap.parse_args(argv)

    cases = _cases()
    before = torch.get_num_threads()
    ctx = mp.get_context("spawn")
    busy = [ctx.Process(target=_spin, args=(time.time() + args.max_seconds,), daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    results = {}
    try:
        time.sleep(0.5)  # let the spinners get going
        for name, fn in cases.items():
            times = {n: [] for n in args.threads}
            for n in args.threads:  # warm-up
                torch.set_num_threads(n)
                fn()
            for _ in range(max(1, args.reps // args.block)):
                for n in args.threads:
                    torch.set_num_threads(n)
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        fn()
                        times[n].append(time.perf_counter() - t0)
            results[name] = times
    finally:
        torch.set_num_threads(before)
        for p in busy:
            p.terminate()
        for p in busy:
            p.join()

    print(f"busy processes: {args.busy}, reps: {args.reps}, CPUs: {mp.cpu_count()}")
    for name, times in results.items():
        med = {}
        for n, ts in times.items():
            q = statistics.quantiles(ts, n=10)
            med[n] = statistics.median(ts)
            print(f"{name:40s} threads={n}: median {med[n] * 1e3:7.3f} ms  p20-p80 "
                  f"{q[1] * 1e3:7.3f}-{q[7] * 1e3:7.3f} ms")
        if 1 in med and len(med) > 1:
            worst = max(v for k, v in med.items() if k != 1)
            print(f"{name:40s} slowest multi-thread median / one-thread median: {worst / med[1]:.2f}")
    return results


if __name__ == "__main__":
    main()
