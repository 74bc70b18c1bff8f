"""Masked-prediction loss (HuBERT, BEST-RQ, NEST): the specification of
``sslfast.masked_prediction_loss``.

Shapes: ``x`` (N, D) shared by every head, or (N, H, D) one vector per head; ``weight``
(H, V, D) (the linear heads, or the label embeddings of the cosine head); ``bias`` (H, V) or
None; ``targets`` (N, H) integer labels, or (N, H, V) target probabilities (soft targets,
differentiable: BiRQ's enhanced labels). Frame n, head h has the V logits

* ``head="linear"`` (BEST-RQ, NEST: NeMo ``MultiSoftmaxDecoder`` + ``MultiMLMLoss``,
  SpeechBrain's BEST-RQ head): ``z[n, h, v] = <x[n, h], weight[h, v]> + bias[h, v]``;
* ``head="cosine"`` (fairseq ``HubertModel.compute_pred``/``compute_nce``):
  ``z[n, h, v] = cos(x[n, h], weight[h, v]) / logit_temp`` (``logit_temp`` 0.1 as fairseq),

and the per-pair loss is torch's ``cross_entropy`` with ``label_smoothing`` = eps:
``l[n, h] = lse_v(z) - (1 - eps) * z[y] - eps / V * sum_v z[v]``; for soft targets q,
``-sum_v ((1 - eps) q[v] + eps / V) log_softmax(z)[v]`` (torch's probability targets; q is
not renormalised, ``ignore_index`` does not apply, and q receives the gradient
``(1 - eps) * (lse - z)``). The soft ``correct`` uses the first most probable class as y.

Weights and reductions. Frame weight ``w[n] = frame_weight[n]`` (1 when None), times
``pred_masked_weight`` on frames where ``mask`` is True and ``pred_nomask_weight`` where it is
False (only when a ``mask`` is given; fairseq HuBERT's defaults 1 and 0). A pair (n, h)
*counts* when ``targets[n, h] != ignore_index`` and ``w[n] != 0``.

* ``"none"``: (N, H) of ``w[n] * l[n, h]``, 0 where the target is ignored;
* ``"sum"``: the sum of those;
* ``"mean"``: that sum divided by the number of counted pairs (0 when none counts).

How the published trainers map onto this:

* fairseq ``HubertCriterion``: ``loss = sum_h (pred_masked_weight * sum_masked CE_h +
  pred_nomask_weight * sum_unmasked CE_h)`` divided by ``sample_size`` = the number of masked
  frames (plus unmasked frames when ``pred_nomask_weight > 0``), counted once, not per label
  set: that is ``H * reduction="mean"`` here (or ``"sum"`` divided by the frame count).
* NeMo ``MultiMLMLoss``: per head ``NLLLoss`` mean over masked frames (ignore_index -100),
  then the mean over heads: ``reduction="mean"`` here with ``mask`` and the default weights,
  equal whenever every head has the same number of non-ignored masked frames (the usual case;
  per-head counts are in the stats).
* SpeechBrain BEST-RQ: one head, ``F.cross_entropy`` over masked frames: ``"mean"``, H = 1.

Statistics (``return_stats=True``): fairseq's ``correct``/``count`` per head, as (H,) int64:
``count[h]`` counted pairs, ``correct[h]`` those whose target logit attains the maximum
(``z[y] >= z[v]`` for every v). fairseq puts the target in column 0 with its duplicate among
the negatives at -inf, so ``argmax == 0`` is exactly this rule (ties favour the target) and
its ``argmin == 0`` exclusion never fires.

Differs on purpose:

* math in fp32 for fp32/fp16/bf16 inputs (fp64 stays fp64) and an fp32 loss; fairseq computes
  the cosine in the input dtype under AMP;
* the cosine is ``<x/|x|, e/|e|>`` with each vector first divided by its max |entry| (so
  norms up to fp32's range work), a zero vector normalising to zero (logit 0) with a zero
  gradient; torch's ``cosine_similarity`` clamps the norm product to 1e-8 instead;
* fairseq marks the target's duplicate among the negatives by comparing embeddings, so two
  identical label embeddings both drop out; here only the target's own index is the target;
* per-pair weights and ``ignore_index`` in one op; every head has the same V (fairseq allows
  label sets of different sizes: call once per size);
* ``"mean"`` of nothing counted is 0, not NaN.

Memory: the logits are built ``chunk_size`` frames at a time, and with gradients enabled each
chunk is checkpointed (recomputed in the backward), so the reference holds
O(chunk_size * H * V) logits, never (N, H, V).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .gumbel_quantize import gumbel_noise

__all__ = ["masked_prediction_loss", "MaskedPredictionStats", "safe_normalize", "frame_weights", "gumbel_target_logits",
           "gumbel_rpq_soft_targets"]


class MaskedPredictionStats(NamedTuple):
    """``loss`` (fp32 scalar, or (N, H) for reduction "none"); ``correct`` and ``count``
    ((H,) int64): fairseq's accuracy counters per head (module docstring)."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


def safe_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit L2 rows along the last dim; a zero row stays zero and gets a zero gradient.

    Each row is first divided by its max |entry| (a constant to autograd: the normalisation
    is scale invariant), so squares neither overflow nor underflow in fp32.
    """
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    nonzero = peak > 0
    xs = x / torch.where(nonzero, peak, torch.ones_like(peak))
    norm = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
    # where(), not a division by a clamped norm: the zero row's gradient is then exactly 0
    return torch.where(nonzero, xs / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(xs))


def gumbel_target_logits(y: torch.Tensor, codebooks: torch.Tensor, tgt_scale: float, noise_scale: float,
                         seed) -> torch.Tensor:
    """(N, H, V) target logits ``tgt_scale * <y[n, h], c[h, v]> + noise_scale * G[n, h * V + v]``
    of already normalised ``y`` (N, H or 1, d) and ``codebooks`` (H, V, d), in their dtype; G the
    Gumbel noise of ``gumbel_vector_quantize`` for an (N, H * V) logits row (Stream.GUMBEL, counter
    (pos // 4, n)), not drawn when ``noise_scale`` is 0. The kernels' contract
    (csrc/masked_prediction.h, "BiRQ")."""
    n, (h, v, _) = y.shape[0], codebooks.shape
    if y.shape[1] == 1:  # one vector shared by every head
        t = tgt_scale * torch.einsum("nd,hvd->nhv", y[:, 0], codebooks)
    else:
        t = tgt_scale * torch.einsum("nhd,hvd->nhv", y, codebooks)
    if noise_scale != 0.0:
        g = gumbel_noise(n, h * v, seed, device=y.device).reshape(n, h, v).to(t.dtype)
        t = t + noise_scale * g
    return t


def gumbel_rpq_soft_targets(features: torch.Tensor, codebooks: torch.Tensor, *, tau: float, seed,
                            training: bool = True) -> torch.Tensor:
    """BiRQ's soft targets (N, H, V): ``softmax((-|f^ - c^_v|^2 + G) / tau)`` over v, f^ and c^ the
    L2-normalised features and codewords (``safe_normalize``), i.e. the Gumbel-softmax over the
    random-projection quantizer's (cosine metric) scores; ``-|f^ - c^|^2 = 2 <f^, c^> - 2`` and the
    constant drops out of the softmax. No noise when ``training`` is False. fp32 math (fp64 for
    fp64 inputs), differentiable w.r.t. both inputs."""
    dt = _work_dtype(features) if codebooks.dtype != torch.float64 else torch.float64
    y = safe_normalize(features.to(dt))
    y = y[:, None] if y.dim() == 2 else y
    c = safe_normalize(codebooks.to(dt))
    return torch.softmax(gumbel_target_logits(y, c, 2.0 / tau, 1.0 / tau if training else 0.0, seed), dim=-1)


def frame_weights(n: int, *, mask=None, frame_weight=None, pred_masked_weight=1.0, pred_nomask_weight=0.0,
                  dtype=torch.float32, device=None) -> torch.Tensor:
    """(N,) weight of each frame: ``frame_weight`` (or 1) times the masked / unmasked weight."""
    w = torch.ones(n, dtype=dtype, device=device) if frame_weight is None else frame_weight.detach().to(dtype)
    if mask is not None:
        w = w * torch.where(mask, torch.tensor(float(pred_masked_weight), dtype=dtype, device=w.device),
                            torch.tensor(float(pred_nomask_weight), dtype=dtype, device=w.device))
    return w


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_losses(x, weight, bias, targets, valid, scale, label_smoothing):
    """Per-pair losses (n, H) and whether the target attains the max, for one chunk of frames;
    targets (n, H) labels or (n, H, V) probabilities."""
    if x.dim() == 2:
        logits = torch.einsum("nd,hvd->nhv", x, weight)
    else:
        logits = torch.einsum("nhd,hvd->nhv", x, weight)
    if scale != 1.0:
        logits = logits * scale
    if bias is not None:
        logits = logits + bias
    if targets.is_floating_point():
        # torch's cross_entropy with probability targets: -sum_v q'_v log p_v, q' the smoothed q
        logp = torch.log_softmax(logits, dim=-1)
        loss = -(1.0 - label_smoothing) * (targets * logp).sum(-1) - label_smoothing * logp.mean(dim=-1)
        z_y = logits.gather(-1, targets.argmax(dim=-1, keepdim=True)).squeeze(-1)
    else:
        # torch's cross_entropy: from log_softmax (max subtracted before log(sum) is added), not
        # logsumexp - z_y, which rounds a confident row's loss to a multiple of ulp(z_y)
        logp = torch.log_softmax(logits, dim=-1)
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        z_y = logits.gather(-1, safe_t[..., None]).squeeze(-1)
        loss = -(1.0 - label_smoothing) * logp.gather(-1, safe_t[..., None]).squeeze(-1)
        if label_smoothing > 0.0:
            loss = loss - label_smoothing * logp.mean(dim=-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    top = (z_y >= logits.amax(dim=-1)).detach()
    return loss, top


def masked_prediction_loss(x, weight, targets, *, head="linear", bias=None, logit_temp=0.1, mask=None,
                           frame_weight=None, pred_masked_weight=1.0, pred_nomask_weight=0.0, ignore_index=-100,
                           label_smoothing=0.0, reduction="mean", return_stats=False, chunk_size=1024):
    """Masked-prediction cross-entropy over H heads (module docstring: conventions).

    Returns the fp32 loss (fp64 for fp64 inputs), or ``MaskedPredictionStats`` when
    ``return_stats``. No argument checking: ``sslfast.masked_prediction_loss`` validates.
    """
    dt = _work_dtype(x)
    n, h_count = targets.shape[:2]
    xw = x.to(dt)
    ww = weight.to(dt)
    bw = None if bias is None else bias.to(dt)
    scale = 1.0
    if head == "cosine":
        xw, ww, scale = safe_normalize(xw), safe_normalize(ww), 1.0 / logit_temp
    soft = targets.is_floating_point()
    targets = targets.to(dt) if soft else targets.long()
    w = frame_weights(n, mask=mask, frame_weight=frame_weight, pred_masked_weight=pred_masked_weight,
                      pred_nomask_weight=pred_nomask_weight, dtype=dt, device=x.device)
    valid = torch.ones(n, h_count, dtype=torch.bool, device=x.device) if soft else targets != ignore_index
    counted = valid & (w != 0)[:, None]

    losses, tops = [], []
    for s in range(0, n, chunk_size):
        args = (xw[s:s + chunk_size], ww, bw, targets[s:s + chunk_size], valid[s:s + chunk_size], scale,
                float(label_smoothing))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xw, ww, bw, targets)):
            loss_c, top_c = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            loss_c, top_c = _chunk_losses(*args)
        losses.append(loss_c)
        tops.append(top_c)
    if n == 0:
        rows = torch.zeros(0, h_count, dtype=dt, device=x.device) + 0.0 * ww.sum()
        top = torch.zeros(0, h_count, dtype=torch.bool, device=x.device)
    else:
        rows, top = torch.cat(losses), torch.cat(tops)
    rows = rows * w[:, None]

    count = counted.sum(dim=0)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / count.sum().clamp_min(1).to(dt)
    if not return_stats:
        return loss
    return MaskedPredictionStats(loss, (top & counted).sum(dim=0), count)
