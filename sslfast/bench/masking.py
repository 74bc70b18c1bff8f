"""Benchmark cases of compute_mask_indices: sslfast backends against Hugging Face's numpy
sampler (wav2vec 2.0 base: p = 0.65, L = 10, T = 781, B in {4, 16, 64}).

The sslfast rows run fairseq style with min_masks=2 and require_same_masks (more work than
HF's algorithm: equalisation is a second pass); the "hf-style" row runs sslfast with
style="hf", the like-for-like comparison. On GPU the "hf" row includes the copy to the device.
"""
from __future__ import annotations

import os

import torch

from .. import _dispatch
from ..ops.masking import compute_mask_indices
from .harness import Case, Unavailable


def _backend(name, B, T, device, **kw):
    def factory():
        if name is None:  # sslfast's choice
            return lambda: compute_mask_indices((B, T), None, 0.65, 10, seed=1, device=device, **kw)
        if name not in _dispatch.implemented_backends("compute_mask_indices"):
            raise Unavailable(f"compute_mask_indices has no {name} backend")
        reason = _dispatch.backend_unavailable_reason(name, device)
        if reason:
            raise Unavailable(reason)
        return lambda: compute_mask_indices((B, T), None, 0.65, 10, seed=1, device=device, backend=name, **kw)

    return factory


def _hf(B, T, device):
    def factory():
        try:
            from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices
        except ImportError as exc:
            raise Unavailable(f"transformers is not installed ({exc})")
        if device.type == "cuda":
            return lambda: torch.from_numpy(_compute_mask_indices((B, T), 0.65, 10, min_masks=2)).to(device)
        return lambda: _compute_mask_indices((B, T), 0.65, 10, min_masks=2)

    return factory


def _compile_allowed(device) -> None:
    # The reference has data-dependent sizes (n.max(), nonzero): dynamo splits it at each and
    # inductor compiles every piece; on a shared 2-core CPU that took over 6 minutes (measured),
    # which would stall the whole run. Opt in with SSLFAST_BENCH_COMPILE=1.
    if device.type == "cpu" and os.environ.get("SSLFAST_BENCH_COMPILE", "0") != "1":
        raise Unavailable("torch.compile(reference) graph-breaks at data-dependent sizes and compiles for minutes "
                          "on CPU; set SSLFAST_BENCH_COMPILE=1 to time it")


def _compile(B, T, device):
    def factory():
        _compile_allowed(torch.device(device))
        from ..reference.masking import compute_mask_indices as ref

        lengths = torch.full((B,), T, dtype=torch.int64, device=device)
        fn = torch.compile(ref, dynamic=False)
        return lambda: fn(B, T, lengths, 0.65, 10, "static", 0.0, 2, True, 0.0, "fairseq", 1)

    return factory


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    shapes = [(2, 101)] if quick else [(4, 781), (16, 781), (64, 781)]
    fast = "cuda" if device.type == "cuda" else "cpu"
    out = []
    for B, T in shapes:
        providers = {"sslfast": _backend(None, B, T, device, min_masks=2)}
        providers.update({name: _backend(name, B, T, device, min_masks=2)
                          for name in ("cpu", "cuda", "triton", "reference")})
        providers["hf-style"] = _backend(fast, B, T, device, min_masks=2, style="hf")
        providers["hf"] = _hf(B, T, device)
        providers["compile"] = _compile(B, T, device)
        out.append(Case("compute_mask_indices", f"B={B} T={T} p=0.65 L=10", "fwd", providers,
                        bytes_moved=B * T, params=dict(B=B, T=T), default=(B, T) == shapes[0]))
    return out
