"""Reference random-projection quantization (BEST-RQ labels) and nearest-codeword (k-means)
assignment: pure PyTorch, vectorised, device-agnostic; the specification of
``sslfast.random_projection_quantize`` and ``sslfast.nearest_codeword``.

Semantics (shared/docs/semantics.md, section 5):

* Stacking: ``x`` (B, T, F) becomes (B, T // k, F * k) frame-major (frames t*k .. t*k+k-1
  concatenated, frame 0's F features first), as NeMo's ``combine_time_steps`` does. When T is
  not a multiple of k the last ``T % k`` frames of every sequence are dropped (NeMo's
  reshape would fail; we truncate and document it). A 2-D ``x`` (N, F) is a flat batch of rows
  and takes ``stack=1`` only, since stacking across flattened utterances would mix them.
* ``input_norm="layernorm"``: LayerNorm without affine over the stacked vector, eps 1e-5
  (newer NeMo, lucidrains' ``norm=True``).
* Projection: ``y = x_stacked @ projection`` with ``projection`` (F*k, H*d), column
  ``h*d + j`` is coordinate j of head h (NeMo's Linear weight transposed; lucidrains' (H, F, d)
  rand_projs permuted to (F, H, d)).
* ``metric="cosine"``: label = argmax_v normalize(y_h) . normalize(c_hv) (F.normalize, eps
  1e-12), which equals argmin |normalize(y_h) - normalize(c_hv)| (SpeechBrain's formula,
  NeMo's cosine path, lucidrains). Codebooks are normalised here, so unnormalised codebooks
  behave as their directions.
* ``metric="l2"``: label = argmin_v |y_h - c_hv|^2 on the raw projection and raw codebook
  (NeMo's ``dist_fn="l2"``; its codebooks are unit vectors already).
* Ties resolve to the lowest index (torch.argmax/argmin); an all-zero row under the cosine
  metric scores 0 everywhere and gets label 0.
* ``mask`` (B, T // k) or (N,), bool: labels of unmasked positions are -1. The reference
  computes every row and masks afterwards; the kernels skip unmasked rows.

Nearest codeword: ``dist_v = |x|^2 - 2 x . c_v + |c_v|^2``, label = argmin (HuBERT's k-means
``ApplyKmeans``), or the cosine rule above. This reference materialises the (N, V) scores; the
kernels never do.

Arithmetic is fp32 for fp32/fp16/bf16 inputs and fp64 for fp64 inputs (which the tests use
as the exact-arithmetic yardstick).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LAYERNORM_EPS = 1e-5
NORMALIZE_EPS = 1e-12


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def stack_frames(x: torch.Tensor, stack: int) -> torch.Tensor:
    """(B, T, F) -> (B, T // stack, F * stack), frame-major, trailing frames dropped."""
    B, T, Fdim = x.shape
    t_out = T // stack
    return x[:, : t_out * stack].reshape(B, t_out, Fdim * stack)


def _label_scores(y: torch.Tensor, codebooks: torch.Tensor, metric: str) -> torch.Tensor:
    """Scores (..., H, V) to maximise for y (..., H, d) against codebooks (H, V, d)."""
    if metric == "cosine":
        y = F.normalize(y, dim=-1, eps=NORMALIZE_EPS)
        c = F.normalize(codebooks, dim=-1, eps=NORMALIZE_EPS)
        return torch.einsum("...hd,hvd->...hv", y, c)
    # argmin |y - c|^2 == argmax 2 y.c - |c|^2 (|y|^2 is the same for every codeword)
    return 2.0 * torch.einsum("...hd,hvd->...hv", y, codebooks) - (codebooks * codebooks).sum(-1)


def projected_features(x: torch.Tensor, projection: torch.Tensor, heads: int, *, stack: int = 1,
                       input_norm: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The quantizer's projected vectors before the codeword search: stacking, optional
    LayerNorm, ``@ projection``, viewed (..., H, d); differentiable w.r.t. x (BiRQ's path)."""
    dtype = dtype or _compute_dtype(x, projection)
    xs = x.to(dtype)
    if xs.dim() == 3:
        xs = stack_frames(xs, stack)
    if input_norm == "layernorm":
        xs = F.layer_norm(xs, (xs.shape[-1],), eps=LAYERNORM_EPS)
    return (xs @ projection.to(dtype)).unflatten(-1, (heads, projection.shape[1] // heads))


def random_projection_quantize(
    x: torch.Tensor,
    projection: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    stack: int = 1,
    input_norm: str | None = None,
    metric: str = "cosine",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """BEST-RQ labels, (B, T // stack, H) or (N, H) int64; see the module docstring."""
    dtype = _compute_dtype(x, projection, codebooks)
    H, V, d = codebooks.shape
    y = projected_features(x, projection, H, stack=stack, input_norm=input_norm, dtype=dtype)
    labels = _label_scores(y, codebooks.to(dtype), metric).argmax(-1)
    if mask is not None:
        labels = torch.where(mask.unsqueeze(-1), labels, torch.full_like(labels, -1))
    return labels


def nearest_codeword(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2") -> torch.Tensor:
    """k-means assignment of every row of x (..., D) to centroids (V, D): int64 (...)."""
    dtype = _compute_dtype(x, centroids)
    xs, c = x.to(dtype), centroids.to(dtype)
    if metric == "cosine":
        return _label_scores(xs.unsqueeze(-2), c.unsqueeze(0), "cosine").squeeze(-2).argmax(-1)
    dist = (xs * xs).sum(-1, keepdim=True) - 2.0 * xs @ c.T + (c * c).sum(-1)
    return dist.argmin(-1)
