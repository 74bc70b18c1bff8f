"""Benchmark cases of sample_negatives: sslfast backends against Hugging Face's numpy sampler.

Production shape: wav2vec 2.0 base, T = 781 frames, about half masked, K = 100 negatives;
B in {4, 16, 64}. On GPU the "hf" row includes copying its indices to the device, the cost
a trainer pays today.
"""
from __future__ import annotations

import os

import torch

from .. import _dispatch
from ..ops.negatives import sample_negatives
from .harness import Case, Unavailable


def _mask(B: int, T: int, device) -> torch.Tensor:
    from ..ops.masking import compute_mask_indices

    return compute_mask_indices((B, T), None, 0.65, 10, min_masks=2, seed=0, backend="reference").to(device)


def _backend(name, mask, K):
    def factory():
        if name is None:  # sslfast's choice
            n = int(mask.sum())
            return lambda: sample_negatives(mask, K, seed=1, num_masked=n)
        reason = _dispatch.backend_unavailable_reason(name, mask.device)
        if name not in _dispatch.implemented_backends("sample_negatives"):
            raise Unavailable(f"sample_negatives has no {name} backend")
        if reason:
            raise Unavailable(reason)
        n = int(mask.sum())
        return lambda: sample_negatives(mask, K, seed=1, num_masked=n, backend=name)

    return factory


def _hf(mask, K):
    def factory():
        try:
            from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices
        except ImportError as exc:
            raise Unavailable(f"transformers is not installed ({exc})")
        m = mask.cpu().numpy()
        B, T = m.shape
        if mask.device.type == "cuda":
            return lambda: torch.from_numpy(_sample_negative_indices((B, T), K, m)).to(mask.device)
        return lambda: _sample_negative_indices((B, T), K, m)

    return factory


def _compile_allowed(device) -> None:
    # The reference has data-dependent sizes (nonzero): dynamo splits it at each and
    # inductor compiles every piece; on a shared 2-core CPU that took over 6 minutes (measured),
    # which would stall the whole run. Opt in with SSLFAST_BENCH_COMPILE=1.
    if device.type == "cpu" and os.environ.get("SSLFAST_BENCH_COMPILE", "0") != "1":
        raise Unavailable("torch.compile(reference) graph-breaks at data-dependent sizes and compiles for minutes "
                          "on CPU; set SSLFAST_BENCH_COMPILE=1 to time it")


def _compile(mask, K):
    def factory():
        _compile_allowed(mask.device)
        from ..reference.negatives import sample_negatives as ref

        fn = torch.compile(ref, dynamic=False)
        return lambda: fn(mask, K, 0, None, True, "packed", 1)

    return factory


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    shapes = [(2, 101, 10)] if quick else [(4, 781, 100), (16, 781, 100), (64, 781, 100)]
    out = []
    for B, T, K in shapes:
        mask = _mask(B, T, device)
        providers = {"sslfast": _backend(None, mask, K)}
        providers.update({name: _backend(name, mask, K) for name in ("cpu", "cuda", "triton", "reference")})
        providers["hf"] = _hf(mask, K)
        providers["compile"] = _compile(mask, K)
        n = int(mask.sum())
        out.append(Case("sample_negatives", f"B={B} T={T} K={K} N={n}", "fwd", providers,
                        bytes_moved=B * T + n * K * 8, params=dict(B=B, T=T, K=K), default=(B, T, K) == shapes[0]))
    return out
