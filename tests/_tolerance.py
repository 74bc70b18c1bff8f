"""The error rule every parity test uses (op-contract.md), in one place.

A result ``got`` in some dtype is compared with ``truth`` (fp64 math on the same stored
inputs) and with ``ref``: the reference implementation (or the peer library) run in the
same dtype as ``got``. The rule, per element i:

    |got_i - truth_i| <= 2 * max_j |ref_j - truth_j| + ulps * ulp(out_dtype, truth_i)

The factor 2 is the contract: a kernel may be at most twice as wrong as the reference is in
that dtype. The floor is ``ulps`` (default 2) units in the last place of the result's own
dtype at the true value: rounding the exact value to that dtype costs half an ulp, and a
reduction added in another order than the reference's (tiles, threads) costs up to about
one more in its last additions, so where the reference's error is small by luck on one
instance the rule still leaves that room. It is never a fixed number: an fp32 loss gets fp32
ulps, a bf16 gradient bf16 ulps, each at its own magnitude. (First tried with 1 ulp: the
Triton info_nce temperature gradient, a sum of N^2 fp32 terms, was 1.4 ulp off where the
reference was 0.2 ulp off.)
"""
from __future__ import annotations

import torch


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (fp64), the subnormal spacing below the smallest normal."""
    info = torch.finfo(dtype)
    ax = x.detach().double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(ax))) * info.eps


def error_bound(ref: torch.Tensor, truth: torch.Tensor, out_dtype: torch.dtype, *, factor: float = 2.0,
                ulps: float = 2.0) -> torch.Tensor:
    """The per-element bound of the rule above (fp64, truth's shape)."""
    truth = truth.detach().double().cpu()
    ref = ref.detach().double().cpu()
    err_ref = (ref - truth).abs().max().item() if truth.numel() else 0.0
    return factor * err_ref + ulps * ulp(truth, out_dtype)


def assert_error_rule(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, what: str, *,
                      out_dtype: torch.dtype | None = None, factor: float = 2.0, ulps: float = 2.0) -> None:
    """Assert the rule; ``out_dtype`` defaults to got's dtype (pass it when got was upcast)."""
    out_dtype = out_dtype or got.dtype
    g = got.detach().double().cpu()
    t = truth.detach().double().cpu()
    assert g.shape == t.shape, f"{what}: shape {tuple(g.shape)} != {tuple(t.shape)}"
    if not t.numel():
        return
    assert torch.isfinite(g).all() == torch.isfinite(t).all(), f"{what}: non-finite values differ from the truth"
    bound = error_bound(ref, t, out_dtype, factor=factor, ulps=ulps)
    err = (g - t).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).reshape(-1)))
        err_ref = (ref.detach().double().cpu() - t).abs().max().item()
        raise AssertionError(
            f"{what}: error {err.reshape(-1)[i].item():.3g} at flat index {i} (truth {t.reshape(-1)[i].item():.6g}) "
            f"> {factor:g} x reference error {err_ref:.3g} + {ulps:g} ulp of {out_dtype} "
            f"({bound.reshape(-1)[i].item():.3g}); {int(bad.sum())} of {t.numel()} elements out")
