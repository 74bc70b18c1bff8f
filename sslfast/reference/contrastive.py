"""Reference (the specification) of the wav2vec 2.0 contrastive loss given indices.

For prediction row ``i`` (``x[i]``, shape (D,)) the candidates are the positive
``t_0 = y[positives[i]]`` (default ``y[i]``) and the K negatives ``t_k = y[negatives[i, k-1]]``:

    cos_k   = x . t_k / (max(|x|, 1e-8) * max(|t_k|, 1e-8))      (fp32 math, PyTorch's eps)
    logit_k = round(cos_k / temperature)                          precision="fairseq"
            = round(round(cos_k) / temperature)                   precision="hf"
    logit_k = -inf  for k >= 1 when the negative "is" the positive (neg_is_pos)
    loss_i  = logsumexp_k(logit_k) - logit_0                      (cross-entropy, class 0,
                                                                  as -log_softmax(logits)_0)

``round`` casts to the storage dtype of x and y (identity for fp32): fairseq divides by the
temperature in fp32 and then casts the logits to the input dtype once; Hugging Face casts the
cosine to the input dtype and divides in that dtype (two roundings in fp16/bf16). Both then
run the cross-entropy in fp32, so the loss is fp32 for fp32/fp16/bf16 inputs (fp64 for fp64
inputs, which the reference alone accepts, for gradcheck).

``neg_is_pos``: ``"vector"`` compares whole stored vectors (fairseq and Hugging Face:
``(y[pos] == y[neg]).all(-1)``, in the storage dtype), ``"index"`` compares the indices,
``"none"`` masks nothing. fairseq on XLA fills -2**30 instead of -inf; we always use -inf.
A row whose negatives are all masked has ``loss = 0`` (the positive is the only finite
logit), is counted correct (argmax 0, argmin a masked negative) and gets zero gradients.

Reductions: ``"sum"`` (fairseq and Hugging Face), ``"mean"`` over rows (0 for no rows, where
torch's cross_entropy would return NaN), ``"none"`` (per-row, shape (N,)).

Statistics (``return_stats=True``): fairseq's accuracy, a row is correct when
``argmax(logits) == 0`` and not ``argmin(logits) == 0`` (the second guards rows whose logits
are all equal), evaluated on the rounded logits the cross-entropy sees; ``count`` is N.

Differences on purpose: fairseq and Hugging Face build a (K+1, B, M, D) target tensor; this
reference builds (N, K+1, D) (it is the spec, readable first); the kernels build neither.
Hugging Face evaluates every frame and ignores unmasked ones with target -100; the caller
passes only the rows that count (``sslfast.wav2vec2_contrastive_loss`` does this for both
conventions), which gives the same sum and the same gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NORM_EPS = 1e-8
NEG_IS_POS = ("vector", "index", "none")
PRECISIONS = ("fairseq", "hf")
REDUCTIONS = ("sum", "mean", "none")

__all__ = ["ContrastiveStats", "contrastive_loss", "contrastive_logits", "reduce_rows"]


@dataclass
class ContrastiveStats:
    """What ``contrastive_loss(..., return_stats=True)`` returns.

    ``loss``: the reduced loss (fp32 tensor); ``correct``: int64 0-dim tensor, rows with
    argmax 0 and argmin not 0 (fairseq's definition), kept on the device (no host sync);
    ``count``: the number of rows N (a Python int, known without a sync).
    """

    loss: torch.Tensor
    correct: torch.Tensor
    count: int


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def contrastive_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    negatives: torch.Tensor,
    positives: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    neg_is_pos: str = "vector",
    precision: str = "fairseq",
) -> torch.Tensor:
    """The (N, K+1) logits of the module docstring, in the math dtype (fp32 or fp64)."""
    n = x.shape[0]
    if positives is None:
        positives = torch.arange(n, device=x.device)
    idx = torch.cat([positives.long().reshape(n, 1), negatives.long()], dim=1)  # (N, K+1)
    targets = y[idx]  # (N, K+1, D): the spec materialises what the kernels never do
    md = _math_dtype(x)
    xf, tf = x.to(md), targets.to(md)
    eps = torch.tensor(NORM_EPS, dtype=md, device=x.device)
    nx = torch.linalg.vector_norm(xf, dim=-1).clamp_min(eps)  # (N,)
    nt = torch.linalg.vector_norm(tf, dim=-1).clamp_min(eps)  # (N, K+1)
    cos = (xf[:, None, :] * tf).sum(-1) / (nx[:, None] * nt)
    if precision == "fairseq":
        logits = (cos / temperature).to(x.dtype).to(md)
    elif precision == "hf":
        logits = (cos.to(x.dtype) / temperature).to(md)
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if neg_is_pos == "vector":
        masked = (targets[:, 1:, :] == targets[:, :1, :]).all(-1)
    elif neg_is_pos == "index":
        masked = idx[:, 1:] == idx[:, :1]
    elif neg_is_pos == "none":
        masked = None
    else:
        raise ValueError(f"neg_is_pos must be one of {NEG_IS_POS}, got {neg_is_pos!r}")
    if masked is not None:
        full = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=x.device), masked], dim=1)
        logits = logits.masked_fill(full, float("-inf"))
    return logits


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """sum / mean (0 for no rows) / none over per-row losses; shared with the kernel path."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(rows.shape[0], 1)
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def correct_rows(logits: torch.Tensor) -> torch.Tensor:
    """fairseq's accuracy per row: argmax is 0 and argmin is not 0."""
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=logits.device)
    return (logits.argmax(-1) == 0) & (logits.argmin(-1) != 0)


def contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    negatives: torch.Tensor,
    positives: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    reduction: str = "sum",
    neg_is_pos: str = "vector",
    precision: str = "fairseq",
    return_stats: bool = False,
    deterministic: bool = False,
):
    """wav2vec 2.0 contrastive loss from indices (see the module docstring for the math).

    x (N, D) predictions, y (M, D) targets, negatives (N, K) and positives (N,) indices into
    y. Differentiable by autograd in x and y. ``deterministic`` is accepted for signature
    parity with the kernels (autograd's index backward is what it is).
    """
    logits = contrastive_logits(x, y, negatives, positives, temperature=temperature,
                                neg_is_pos=neg_is_pos, precision=precision)
    # -log_softmax (what F.cross_entropy computes, fairseq and Hugging Face): the max is
    # subtracted before log(sum) is added, so a confident row's loss far below ulp(logit_0)
    # keeps its digits (logsumexp - logit_0 rounds it to a multiple of ulp(logit_0))
    rows = -torch.log_softmax(logits, dim=-1)[:, 0]
    loss = reduce_rows(rows, reduction)
    if not return_stats:
        return loss
    with torch.no_grad():
        correct = correct_rows(logits).sum()
    return ContrastiveStats(loss=loss, correct=correct, count=int(x.shape[0]))
