"""Benchmark cases of the wav2vec 2.0 contrastive loss (``python -m sslfast bench --ops contrastive``).

Shapes (semantics.md): wav2vec 2.0 base, B=4 x T=781 frames (15.6 s crops), D=256, K=100, the
issue's target shape; large, B=4 x T=999, D=768. Masks are Hugging Face's span masks (p=0.65,
L=10: about half the frames) and negatives Hugging Face's sampler, both with a fixed seed, so
every provider sees the same indices.

Providers, each timed on (B, T, D) features through the loss and its backward:
* sslfast backends and "reference": gather the masked frames' predictions, then the loss on
  those rows with the negatives as flat indices into y (what ``wav2vec2_contrastive_loss`` does).
* "hf": Hugging Face's path: gather the (K, B, T, D) negatives, ``compute_contrastive_logits``
  on every frame, neg_is_pos, cross-entropy with -100 on unmasked frames.
* "compile": ``torch.compile`` of the reference.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _dispatch
from .harness import Case, Unavailable

SHAPES = {
    "base": dict(B=4, T=781, D=256, K=100),
    "large": dict(B=4, T=999, D=768, K=100),
}
QUICK = {"small": dict(B=2, T=97, D=64, K=20)}


def _hf():
    try:
        from transformers.models.wav2vec2 import modeling_wav2vec2 as m
    except ImportError as exc:
        raise Unavailable(f"transformers is not installed ({exc})")
    return m


def _inputs(B, T, D, K, device, dtype=torch.float32, seed=0):
    hf = _hf()
    g = torch.Generator().manual_seed(seed)
    np.random.seed(seed)
    mask = hf._compute_mask_indices((B, T), mask_prob=0.65, mask_length=10, min_masks=2)
    sampled = hf._sample_negative_indices((B, T), K, mask)
    x = torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype)
    mask_t = torch.from_numpy(mask).to(device)
    sampled_t = torch.from_numpy(sampled).to(device)
    flat = mask_t.reshape(-1).nonzero().squeeze(1)
    neg = sampled_t.reshape(-1, K).long()[flat]
    return x, y, mask_t, sampled_t, flat, neg


def _hf_loss(hf, x, y, mask, sampled, temperature=0.1):
    b, t, d = y.shape
    negs = y.reshape(-1, d)[sampled.long().view(-1)].view(b, t, -1, d).permute(2, 0, 1, 3)
    logits = hf.Wav2Vec2ForPreTraining.compute_contrastive_logits(y[None, :], negs, x, temperature)
    neg_is_pos = (y == negs).all(-1)
    if neg_is_pos.any():
        logits[1:][neg_is_pos] = float("-inf")
    logits = logits.transpose(0, 2).reshape(-1, logits.size(0))
    target = ((1 - mask.long()) * -100).transpose(0, 1).flatten()
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")


def _provider(name, shape, device, backward):
    def factory():
        from ..ops.contrastive import contrastive_loss
        from ..reference.contrastive import contrastive_loss as reference

        x, y, mask, sampled, flat, neg = _inputs(**shape, device=device)
        x.requires_grad_(backward)
        y.requires_grad_(backward)
        d = x.shape[-1]
        if name == "hf":
            hf = _hf()

            def loss_fn():
                return _hf_loss(hf, x, y, mask, sampled)
        elif name == "compile":
            compiled = torch.compile(reference)

            def loss_fn():
                return compiled(x.reshape(-1, d)[flat], y.reshape(-1, d), neg, flat)
        else:
            why = name and _dispatch.backend_unavailable_reason(name, device)  # None: sslfast's choice
            if why:
                raise Unavailable(why)

            def loss_fn():
                return contrastive_loss(x.reshape(-1, d)[flat], y.reshape(-1, d), neg, flat, backend=name)

        if not backward:
            def run():
                with torch.no_grad():
                    return loss_fn()
            return run

        def run():
            x.grad = y.grad = None
            loss_fn().backward()
        return run

    return factory


def _loss_cases(device, quick):
    out = []
    shapes = QUICK if quick else SHAPES
    for label, shape in shapes.items():
        modes = ("fwd+bwd", "fwd") if label in ("base", "small") else ("fwd+bwd",)
        for mode in modes:
            backward = mode == "fwd+bwd"
            providers = {}
            for name in ("sslfast", "cuda", "triton", "cpu", "reference", "hf", "compile"):
                providers[name] = _provider(None if name == "sslfast" else name, shape, device, backward)
            b, t, d, k = shape["B"], shape["T"], shape["D"], shape["K"]
            out.append(Case(
                op="contrastive_loss", shape=f"{label} B={b} T={t} D={d} K={k}", mode=mode, providers=providers,
                baseline="reference", params=dict(shape), default=label == next(iter(shapes)) and backward,
                # fewest bytes: x and y once, plus the gathered candidate rows (fp32)
                bytes_moved=4 * (2 * b * t * d + b * t // 2 * (k + 1) * d) * (3 if backward else 1),
            ))
    return out


def _w2v_provider(name, shape, device):
    """The whole step of wav2vec2_contrastive_loss, sampling included, forward + backward.
    "hf": Hugging Face's numpy sampler, the copy of its indices to the device, then its loss."""

    def factory():
        from ..ops.contrastive import wav2vec2_contrastive_loss

        K = shape["K"]
        x, y, mask, _, _, _ = _inputs(**shape, device=device)
        x.requires_grad_(True)
        y.requires_grad_(True)
        if name == "hf":
            hf = _hf()
            mask_np = mask.cpu().numpy()

            def loss_fn():
                sampled = torch.from_numpy(hf._sample_negative_indices(tuple(mask.shape), K, mask_np)).to(device)
                return _hf_loss(hf, x, y, mask, sampled)
        else:
            if name not in (None, "reference"):  # None: sslfast's choice
                why = _dispatch.backend_unavailable_reason(name, device)
                if why:
                    raise Unavailable(why)

            def loss_fn():
                return wav2vec2_contrastive_loss(x, y, mask, K, seed=0, backend=name)

        def run():
            x.grad = y.grad = None
            loss_fn().backward()

        return run

    return factory


def cases(device, quick):
    device = torch.device(device)
    out = _loss_cases(device, quick)
    label, shape = next(iter((QUICK if quick else SHAPES).items()))
    providers = {name: _w2v_provider(None if name == "sslfast" else name, shape, device)
                 for name in ("sslfast", "cuda", "triton", "cpu", "reference", "hf")}
    b, t, d, k = shape["B"], shape["T"], shape["D"], shape["K"]
    out.append(Case(op="wav2vec2_contrastive_loss", shape=f"{label} B={b} T={t} D={d} K={k}", mode="fwd+bwd",
                    providers=providers, params=dict(shape), default=True))
    return out
