"""Reference mask filling (wav2vec 2.0 / HuBERT mask embedding, BEST-RQ noise): the spec.

``apply_mask(x, mask, fill)`` returns x (B, T, D) with every masked frame ``(b, t)``
(``mask[b, t]`` True) replaced by

* ``fill`` (D,), a tensor: the learned mask embedding, cast to x's dtype (fairseq's and
  Hugging Face's ``x[mask] = emb.to(x.dtype)``); or
* ``fill`` a float ``std``: Gaussian noise ``std * z``, z from ``gaussian_noise`` below.

Unmasked frames are x's values bit for bit. Gradients: ``grad_x = grad * ~mask`` and, for a
tensor fill, ``grad_fill = sum of grad over the masked frames`` (autograd of the ops below).

Noise layout (every backend reproduces it): frame (b, t) of a row of D channels owns the
``ceil(D / 4)`` Philox blocks ``c0 = t * ceil(D / 4) + q`` of ``philox(c0, b, MASK_NOISE, 0)``.
Block q gives channels 4q .. 4q + 3 by Box-Muller in fp32: ``u = open_uniform(w0)`` (the
word as ``tl.rand`` maps it, clamped to [2^-32, 1]), ``a = uniform(w1) * fp32(2 pi)``,
``r = sqrt(-2 log u)``, channels ``r cos a, r sin a``; words (w2, w3) the same for channels
4q + 2, 4q + 3; channels past D are dropped. The value is ``fp32(z) * fp32(std)`` rounded once
to x's dtype. So a frame's noise depends on (seed, b, t, channel) only, never on which other
frames are masked. log, sqrt, cos and sin differ in the last bits between libraries (torch,
glibc, CUDA, Triton), so kernels match this within fp32 rounding of those functions, not bit
for bit.

This implementation never synchronises with the host (no ``nonzero``): it draws the noise of
every frame of a chunk of frames and selects with ``torch.where``, so its work is that of
filling all frames, and its memory is bounded by the chunk (``_CHUNK_BLOCKS`` Philox blocks,
under 0.1 GB of int64 temporaries) plus the output.
"""
from __future__ import annotations

import math

import torch

from .. import random as sr

__all__ = ["gaussian_noise", "frame_noise", "apply_mask"]

_CHUNK_BLOCKS = 1 << 20  # Philox blocks per chunk of frames in frame_noise


def gaussian_noise(bs: torch.Tensor, ts: torch.Tensor, D: int, std: float, seed: int | torch.Tensor) -> torch.Tensor:
    """(*bs.shape, D) fp32 N(0, std^2) noise for frames (bs, ts) (broadcast), module layout.

    Box-Muller on Philox words: words (w0, w1) of block q give channels 4q and 4q + 1
    (radius from w0, angle from w1, cos then sin), words (w2, w3) channels 4q + 2, 4q + 3.
    ``seed``: an int or a 0-d int64 tensor on the frames' device (its 64 bits are the key,
    never read on the host: ``sslfast.random.philox4x32``).
    """
    qb = (D + 3) // 4
    bs, ts = torch.broadcast_tensors(bs, ts)
    c0 = ts.unsqueeze(-1) * qb + torch.arange(qb, device=ts.device)
    w0, w1, w2, w3 = sr.philox4x32(c0, bs.unsqueeze(-1), int(sr.Stream.MASK_NOISE), 0, seed)
    u0, u2 = (sr.uint_to_open_uniform(w, 2.0**-32) for w in (w0, w2))
    a1, a3 = (sr.uint_to_uniform(w) * (2 * math.pi) for w in (w1, w3))
    r0, r2 = torch.sqrt(-2.0 * torch.log(u0)), torch.sqrt(-2.0 * torch.log(u2))
    z = torch.stack([r0 * torch.cos(a1), r0 * torch.sin(a1), r2 * torch.cos(a3), r2 * torch.sin(a3)], dim=-1)
    return z.reshape(*bs.shape, qb * 4)[..., :D] * std


def frame_noise(B: int, T: int, D: int, std: float, seed: int | torch.Tensor, device) -> torch.Tensor:
    """(B, T, D) fp32: the noise of every frame, drawn in chunks of frames along T so the
    int64 Philox temporaries stay below ``_CHUNK_BLOCKS`` blocks (no host sync, no loop over
    frames: a few chunks at production shapes)."""
    qb = (D + 3) // 4
    out = torch.empty(B, T, D, dtype=torch.float32, device=device)
    step = max(1, _CHUNK_BLOCKS // max(1, B * qb))
    bs = torch.arange(B, device=device).unsqueeze(1)
    for t0 in range(0, T, step):
        ts = torch.arange(t0, min(T, t0 + step), device=device).unsqueeze(0)
        out[:, t0:t0 + ts.shape[1]] = gaussian_noise(bs, ts, D, std, seed)
    return out


def apply_mask(x: torch.Tensor, mask: torch.Tensor, fill, inplace: bool, seed: int | torch.Tensor) -> torch.Tensor:
    """x (B, T, D) with masked frames replaced by ``fill`` (a (D,) embedding) or by
    N(0, fill^2) noise (module docstring). ``mask`` (B, T) bool. ``inplace`` writes into x
    and returns it (autograd records it as an in-place op, as it does ``x[mask] = emb``)."""
    B, T, D = x.shape
    m = mask.unsqueeze(-1)
    if isinstance(fill, torch.Tensor):
        value = fill.to(x.dtype)
    else:
        value = frame_noise(B, T, D, float(fill), seed, x.device).to(x.dtype)
    out = torch.where(m, value, x)
    if inplace:
        return x.copy_(out)
    return out
