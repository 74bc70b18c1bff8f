"""torch.compile(fullgraph=True) of every random op's reference path, in bounded time (issue 12.2).

Before the fix, inductor fused the reference Philox's ten rounds of int64 arithmetic into
one expression it could not finish: ``gumbel_vector_quantize(logits (4, 8), codebook (8, 2),
backend="reference")`` was killed after 9 minutes at 5.5 GB, and ``compute_mask_indices``'s
reference read ``n.max()`` on the host (no fullgraph at all). Now the draw is one opaque
custom op under compile (sslfast.random.philox4x32) and the mask reference sizes its work
from host bounds.

The compiles run in a child process with a time limit, so a regression fails the test
instead of hanging the suite or exhausting memory. Bound: COMPILE_BOUND_S per op, cold
(an empty inductor cache). On this project's 2-core machine loaded by other processes (load
average 11-14) these took 119 s (compute_mask_indices), 88 s (sample_negatives), 24 s
(apply_mask) and 22 s (gumbel_vector_quantize); the gumbel case took 15 s cold and 2 s warm
at load 9; the unfixed gumbel case did not finish in 540 s. 300 s per op leaves 2.5 times the
worst loaded figure and stays below the failure.
"""
import os
import subprocess
import sys
import textwrap

import pytest

COMPILE_BOUND_S = 300

_CHILD = textwrap.dedent(r"""
    import sys, time, torch, sslfast

    torch.manual_seed(0)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 11:] = True
    mask = torch.rand(2, 16) < 0.5
    x = torch.randn(2, 16, 4)
    logits, cb = torch.randn(4, 8), torch.randn(8, 2)
    ref = dict(backend="reference")
    cases = {
        "compute_mask_indices": (lambda p: sslfast.compute_mask_indices((2, 16), p, 0.5, 3, seed=1, **ref), pad),
        "compute_mask_indices_no_overlap": (
            lambda p: sslfast.compute_mask_indices((2, 16), p, 0.5, 3, no_overlap=True, min_space=1, seed=1, **ref),
            pad),
        "sample_negatives": (lambda m: sslfast.sample_negatives(m, 3, cross_sample_negatives=2, layout="hf", seed=1,
                                                                **ref), mask),
        "apply_mask": (lambda x, m: sslfast.apply_mask(x, m, 0.1, seed=1, **ref), x, mask),
        "gumbel_vector_quantize": (lambda l, c: sslfast.gumbel_vector_quantize(l, c, groups=1, tau=1.0, seed=1,
                                                                              **ref).quantized, logits, cb),
    }
    for name in sys.argv[1:]:
        fn, *args = cases[name]
        torch._dynamo.reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            got = torch.compile(fn, fullgraph=True)(*args)
        seconds = time.perf_counter() - t0
        want = fn(*args)
        if name == "apply_mask":
            # the noise words are the eager bits (the opaque draw); inductor's log/cos/sin may
            # round differently: a few fp32 ulps of |z| < 7 times std 0.1 (test_apply_mask's
            # NOISE_TOL), unmasked frames exact
            assert torch.equal(got[~mask], want[~mask]), name
            torch.testing.assert_close(got, want, rtol=1e-5, atol=4e-6 * 0.1)
        else:
            assert torch.equal(got, want), name  # the opaque draw gives the eager bits
        print(f"{name} {seconds:.1f}", flush=True)
""")

# no_overlap's placement loop unrolls once per span under compile: the slowest case (90 s on
# the loaded machine); it is checked by hand, not in the default run (README, issue 12)
OPS = ["compute_mask_indices", "sample_negatives", "apply_mask", "gumbel_vector_quantize"]


@pytest.mark.cpu
@pytest.mark.slow
def test_reference_random_ops_compile_fullgraph_in_bounded_time(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # cold: the honest case
    proc = subprocess.run([sys.executable, "-c", _CHILD, *OPS], capture_output=True, text=True, env=env,
                          timeout=COMPILE_BOUND_S * len(OPS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)  # per-op compile seconds (pytest -rA shows them)
    seconds = dict(line.split() for line in proc.stdout.splitlines())
    assert set(seconds) == set(OPS)
    for name, s in seconds.items():
        assert float(s) < COMPILE_BOUND_S, f"{name} took {s} s to compile (bound {COMPILE_BOUND_S} s)"
