"""Benchmark cases of random_projection_quantize (BEST-RQ labels) and nearest_codeword.

RPQ: 80-dim log-mel frames, T = 781 (about 7.8 s at 10 ms), stacked by 4 into 320-dim
vectors (781 // 4 = 195 stacked frames per utterance, the last frame dropped), so
N = B * 195 rows; 8192 x 16 codebooks, H in {1, 16}, B in {4, 16}. Providers: every sslfast
backend usable on the device, "reference", "dot" (normalised projection, one (H, N, V) score
tensor from a batched matmul, argmax: the plain dot-product formulation), "speechbrain"
(SpeechBrain's formula, argmin of |CB - normalize(x P)| over its (B, V, T, d) broadcast; one
codebook, so H = 1 only) and "compile" (torch.compile of the reference).

nearest_codeword: HuBERT's second-iteration k-means labels, N = B * 781 frames of 768-dim
features, V = 500 centroids, against "cdist" (torch.cdist + argmin) and the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch
from ..ops.rp_quantize import nearest_codeword, random_projection_quantize
from ..reference import rp_quantize as ref
from .harness import Case, Unavailable

# SpeechBrain's formulation materialises (B, V, T', d) fp32; above this it is not run here.
SPEECHBRAIN_MAX_BYTES = 1 << 30


def dot_product_labels(x, P, CB, stack):
    """The plain formulation: stack, project, normalise, (H, N, V) scores by bmm, argmax."""
    B, T, Fdim = x.shape
    H, V, d = CB.shape
    t = T // stack
    xs = x[:, : t * stack].reshape(B * t, Fdim * stack)
    y = F.normalize((xs @ P).view(B * t, H, d), dim=-1).transpose(0, 1)
    scores = torch.bmm(y, F.normalize(CB, dim=-1).transpose(1, 2))
    return scores.argmax(-1).t().reshape(B, t, H)


def speechbrain_style_labels(x, P, CB, stack):
    """SpeechBrain's formula per head: argmin_v |CB_v - normalize(x P)| over (B, V, T', d)."""
    B, T, Fdim = x.shape
    H, V, d = CB.shape
    t = T // stack
    xs = x[:, : t * stack].reshape(B, t, Fdim * stack)
    out = []
    for h in range(H):
        y = F.normalize(xs @ P[:, h * d:(h + 1) * d], dim=2)
        out.append(torch.linalg.vector_norm(CB[h].unsqueeze(1) - y.unsqueeze(1), dim=-1).argmin(dim=1))
    return torch.stack(out, dim=-1)


def cdist_labels(x, C):
    """k-means assignment the plain way: torch.cdist then argmin."""
    return torch.cdist(x, C).argmin(-1)


def _backend_provider(op, backend, device, call):
    def factory():
        reason = _dispatch.backend_unavailable_reason(backend, device)
        if reason:
            raise Unavailable(reason)
        if backend not in _dispatch.implemented_backends(op):
            raise Unavailable(f"{op} has no {backend} backend")
        return call

    return factory


def _compile_provider(fn):
    def factory():
        try:
            compiled = torch.compile(fn)
            compiled()
        except Exception as exc:  # pragma: no cover - depends on the toolchain
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: {exc}".splitlines()[0][:200])
        return compiled

    return factory


def _rpq_case(device, B, T, Fdim, k, H, V, d, default=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, Fdim, generator=g).to(device)
    P = torch.nn.init.xavier_normal_(torch.empty(Fdim * k, H * d)).to(device)
    CB = F.normalize(torch.randn(H, V, d, generator=g), dim=-1).to(device)
    t = T // k
    providers = {"sslfast": lambda: (lambda: random_projection_quantize(x, P, CB, stack=k))}
    for backend in ("cuda", "triton", "cpu"):
        providers[backend] = _backend_provider(
            "random_projection_quantize", backend, device,
            lambda backend=backend: random_projection_quantize(x, P, CB, stack=k, backend=backend))
    providers["reference"] = lambda: (lambda: ref.random_projection_quantize(x, P, CB, stack=k))
    providers["dot"] = lambda: (lambda: dot_product_labels(x, P, CB, k))

    def speechbrain():
        if H != 1:
            raise Unavailable("SpeechBrain's quantizer has a single codebook")
        need = B * V * t * d * 4
        if need > SPEECHBRAIN_MAX_BYTES:
            raise Unavailable(f"materialises (B, V, T', d) = {need / 1e9:.1f} GB")
        return lambda: speechbrain_style_labels(x, P, CB, k)

    providers["speechbrain"] = speechbrain
    providers["compile"] = _compile_provider(lambda: ref.random_projection_quantize(x, P, CB, stack=k))
    return Case(
        op="random_projection_quantize", shape=f"B={B} T={T} F={Fdim}x{k} H={H} V={V} d={d}", mode="fwd",
        providers=providers, bytes_moved=x.numel() * 4 + CB.numel() * 4 + B * t * H * 8,
        flops=2 * B * t * (Fdim * k * H * d + H * V * d),
        params=dict(B=B, T=T, F=Fdim, stack=k, H=H, V=V, d=d, N=B * t), default=default,
    )


def _ncw_case(device, N, D, V, default=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g).to(device)
    C = torch.randn(V, D, generator=g).to(device)
    providers = {"sslfast": lambda: (lambda: nearest_codeword(x, C))}
    for backend in ("cuda", "triton", "cpu"):
        providers[backend] = _backend_provider(
            "nearest_codeword", backend, device, lambda backend=backend: nearest_codeword(x, C, backend=backend))
    providers["reference"] = lambda: (lambda: ref.nearest_codeword(x, C))
    providers["cdist"] = lambda: (lambda: cdist_labels(x, C))
    providers["compile"] = _compile_provider(lambda: ref.nearest_codeword(x, C))
    return Case(op="nearest_codeword", shape=f"N={N} D={D} V={V}", mode="fwd", providers=providers,
                bytes_moved=(x.numel() + C.numel()) * 4 + N * 8, flops=2 * N * V * D, params=dict(N=N, D=D, V=V),
                default=default)


def cases(device, quick):
    device = torch.device(device)
    if quick:
        return [
            _rpq_case(device, 2, 101, 80, 4, 1, 512, 16, default=True),
            _rpq_case(device, 2, 101, 80, 4, 2, 512, 16),
            _ncw_case(device, 2 * 101, 64, 50, default=True),
        ]
    out = []
    for B in (4, 16):
        for H in (1, 16):
            out.append(_rpq_case(device, B, 781, 80, 4, H, 8192, 16, default=(B, H) == (4, 1)))
    for B in (4, 16):
        out.append(_ncw_case(device, B * 781, 768, 500, default=B == 4))
    return out
