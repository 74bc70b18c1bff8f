"""Benchmark cases of apply_mask: sslfast backends against the reference and against the
eager formulation trainers use today.

Shapes: wav2vec 2.0 base after the feature projection, T = 781 frames (15.6 s), D = 768,
about half the frames masked (p = 0.65, L = 10), embedding fill; BEST-RQ noise fill (std
0.1) on 80-dim features at T = 3124 (40 ms stacking of 10 ms frames happens later) and at
D = 320. B in {4, 16}. Modes: fwd (no autograd) and fwd+bwd (x and the embedding require
grad; one backward of sum(out * r)).

Peers: "hf" is Hugging Face's and fairseq's in-place write into a fresh activation,
``y = x.clone(); y[mask] = emb.to(y.dtype)`` (the clone stands for the activation they
write into; boolean indexing syncs with the host on GPU). "eager" for noise is the usual
BEST-RQ code, ``y[mask] = torch.randn(n, D) * std`` with n = mask.sum().
"""
from __future__ import annotations

import os

import torch

from .. import _dispatch
from ..ops.apply_mask import apply_mask
from .harness import Case, Unavailable

STD = 0.1


def _mask(B, T, device):
    from ..ops.masking import compute_mask_indices

    return compute_mask_indices((B, T), None, 0.65, 10, min_masks=2, seed=0, backend="reference").to(device)


def _inputs(B, T, D, device, backward):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g).to(device)
    emb = torch.rand(D, generator=g).to(device)
    r = torch.randn(B, T, D, generator=g).to(device)
    if backward:
        x.requires_grad_()
        emb.requires_grad_()
    return x, emb, r


def _step(fn, x, emb, r, backward, noise):
    if not backward:
        def run():
            with torch.no_grad():
                return fn(x)
        return run
    params = [x] if noise else [x, emb]

    def run_bwd():
        out = fn(x)
        return torch.autograd.grad((out * r).sum(), params)
    return run_bwd


def _backend(name, B, T, D, device, backward, noise):
    def factory():
        if name not in (None, "reference"):  # None: sslfast's choice
            reason = _dispatch.backend_unavailable_reason(name, device)
            if reason:
                raise Unavailable(reason)
        mask = _mask(B, T, device)
        x, emb, r = _inputs(B, T, D, device, backward)
        fill = STD if noise else emb
        return _step(lambda x: apply_mask(x, mask, fill, seed=1, backend=name), x, emb, r, backward, noise)

    return factory


def _eager(B, T, D, device, backward, noise):
    def factory():
        mask = _mask(B, T, device)
        x, emb, r = _inputs(B, T, D, device, backward)

        def fn(x):
            y = x.clone()
            if noise:
                y[mask] = torch.randn(int(mask.sum()), D, device=device, dtype=y.dtype) * STD
            else:
                y[mask] = emb.to(y.dtype)
            return y

        return _step(fn, x, emb, r, backward, noise)

    return factory


def _compile(B, T, D, device, backward, noise):
    def factory():
        from ..reference import apply_mask as ref

        if noise and device.type == "cpu" and os.environ.get("SSLFAST_BENCH_COMPILE", "0") != "1":
            # Inductor on the reference's int64 Philox rounds compiles for minutes on a small
            # CPU (gumbel_quantize's bench measured over 7 minutes); opt in to time it.
            raise Unavailable("torch.compile of the noise reference (int64 Philox rounds) compiles for minutes on "
                              "CPU; set SSLFAST_BENCH_COMPILE=1 to time it")

        mask = _mask(B, T, device)
        x, emb, r = _inputs(B, T, D, device, backward)
        fill = STD if noise else emb
        fn = torch.compile(lambda x: ref.apply_mask(x, mask, fill, False, 1), dynamic=False)
        return _step(fn, x, emb, r, backward, noise)

    return factory


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    if quick:
        shapes = [("emb", 2, 50, 16), ("noise", 2, 50, 16)]
    else:
        shapes = [("emb", B, 781, 768) for B in (4, 16)] + [("noise", B, 781, 320) for B in (4, 16)] + \
            [("noise", B, 3124, 80) for B in (4, 16)]
    out = []
    for kind, B, T, D in shapes:
        noise = kind == "noise"
        for backward in (False, True):
            providers = {"sslfast": _backend(None, B, T, D, device, backward, noise)}
            providers.update({name: _backend(name, B, T, D, device, backward, noise)
                              for name in ("cpu", "cuda", "triton", "reference")})
            providers["eager" if noise else "hf"] = _eager(B, T, D, device, backward, noise)
            providers["compile"] = _compile(B, T, D, device, backward, noise)
            mode = "fwd+bwd" if backward else "fwd"
            # fewest bytes: read x and write out (fp32), plus grad in and grad_x out backward
            out.append(Case("apply_mask", f"{kind} B={B} T={T} D={D}", mode, providers,
                            bytes_moved=B * T * D * 4 * (4 if backward else 2),
                            params=dict(B=B, T=T, D=D, fill=kind, std=STD if noise else None),
                            default=backward and (kind, B, T, D) == shapes[0]))
    return out
