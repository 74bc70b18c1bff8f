"""Public op ``sslfast.masked_prediction_loss``: HuBERT's / BEST-RQ's masked-prediction
cross-entropy over H heads without ever holding the (N, H, V) logits.

Every kernel backend computes the same core per head h: logits ``z = scale * x_h W_h^T + b_h``
(V classes), the per-row loss ``lse(z) - (1 - eps) z_y - eps/V sum z`` (0 for an ignored row),
its log-sum-exp (saved as its two parts, the max and log l: their fp32 sum would put ulp(lse) / 2
of error into every probability the gradients recompute, csrc/masked_prediction.h) and whether
the target attains the maximum; and, given per-row gradient
weights g (N, H), the gradients of ``sum g * loss`` w.r.t. x, W and b. Logits are computed a
tile at a time and recomputed for the gradients (memory O(N D + H V D)).

Two custom ops use that core:

* ``sslfast::masked_prediction_fused`` (reductions "mean" and "sum" with gradients needed):
  the forward computes the loss and its gradients in one pass (g = the frame weights over the
  count, known before the loss is), the backward scales the saved gradients by the incoming
  scalar: one recomputation of the logits fewer than a separate backward.
* ``sslfast::masked_prediction`` (reduction "none", or no gradient needed): per-row losses;
  its backward ``sslfast::masked_prediction_backward`` recomputes the logits tile by tile with
  the incoming per-row gradients.

The cosine head L2-normalises x and the label embeddings here, in PyTorch (with gradient), and
runs the core with scale = 1 / logit_temp. Soft targets (N, H, V) (BiRQ) go through the same
ops on every kernel backend (op ``masked_prediction_loss_soft``) and receive the gradient
``(1 - eps) * (lse - z)``; producing them on the fly from RPQ scores with Gumbel noise (never
storing them) is not implemented.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _dispatch, _ext
from .. import _validation as V
from ..reference import masked_prediction as ref
from ..reference.masked_prediction import MaskedPredictionStats

__all__ = ["masked_prediction_loss", "MaskedPredictionStats"]

OP, OP_BWD = "masked_prediction_loss", "masked_prediction_backward"

# ----------------------------------------------------------------------------- backends
# core(x (N, Hx, D), w (H, V, D), bias (H, V) | None, targets, grad (N, H) fp32 | None, scale, eps)
#   -> (loss (N, H) fp32, stats (2, N, H) fp32, top (N, H) bool, dx (N, Hx, D) fp32 | None,
#       dw (H, V, D) fp32 | None, db (H, V) fp32 | None, dq (N, H, V) fp32 | None)
# stats: each row's max logit and log l (lse = max + log l, kept apart: csrc/masked_prediction.h).
# targets: (N, H) int64 labels with -1 = ignored, or (N, H, V) float soft targets (op OP_SOFT).
# Gradients only when grad is given (then dx, dw and, with a bias, db; dq for soft targets).

OP_SOFT = "masked_prediction_loss_soft"


@_dispatch.register(OP, "reference")
@_dispatch.register(OP_SOFT, "reference")
def _reference(*args, **kwargs):
    return ref.masked_prediction_loss(*args, **kwargs)


def _outputs(x, w, bias, targets, grad):
    """The output buffers; the kernels write every entry except for N = 0."""
    n, hx, d = x.shape
    h, v, _ = w.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    alloc = torch.empty if n > 0 else torch.zeros
    need_grad = grad is not None
    soft = targets.is_floating_point()
    return (torch.empty(n, h, **f32), torch.empty(2, n, h, **f32), torch.empty(n, h, dtype=torch.bool, device=x.device),
            torch.zeros(n, hx, d, **f32) if need_grad else None, alloc(h, v, d, **f32) if need_grad else None,
            alloc(h, v, **f32) if need_grad and bias is not None else None,
            torch.zeros(n, h, v, **f32) if need_grad and soft else None)


def _ext_args(x, w, bias, grad, scale, eps):
    n, hx, d = x.shape
    h, v, _ = w.shape
    return (_ext.ptr(x), _ext.DTYPE_CODE[x.dtype], _ext.ptr(w), _ext.DTYPE_CODE[w.dtype], _ext.ptr(bias),
            _ext.DTYPE_CODE[bias.dtype] if bias is not None else 0)


def _sizes(x, w, scale, eps):
    n, hx, d = x.shape
    h, v, _ = w.shape
    return n, h, hx, v, d, float(scale), float(eps)


@_dispatch.register(OP, "cpu")
@_dispatch.register(OP_SOFT, "cpu")
@_dispatch.register(OP_BWD, "cpu")
def _cpu_core(x, w, bias, targets, grad, scale, eps, want_rows=True):
    mod = _ext.cpu_module()
    slots, ws_floats = mod.masked_prediction_layout(w.shape[1], w.shape[2], grad is not None)
    ws = torch.empty(ws_floats, dtype=torch.float32, device=x.device)
    outs = _outputs(x, w, bias, targets, grad)
    loss, stats, top = outs[:3]
    # the backward writes no loss, statistics or top (it recomputes each row whole)
    rows = (loss, stats[0], stats[1], top) if want_rows else (None, None, None, None)
    mod.masked_prediction_forward_backward(
        *_ext_args(x, w, bias, grad, scale, eps), *_target_args(targets), _ext.ptr(grad), *_sizes(x, w, scale, eps),
        *map(_ext.ptr, rows + outs[3:]), _ext.ptr(ws), slots)
    return outs


def _target_args(targets):
    """(labels, soft targets, soft targets' dtype code) of the C++ and CUDA entry points."""
    if targets.is_floating_point():
        return 0, _ext.ptr(targets), _ext.DTYPE_CODE[targets.dtype]
    return _ext.ptr(targets), 0, 0


@_dispatch.register(OP, "cuda")
@_dispatch.register(OP_SOFT, "cuda")
@_dispatch.register(OP_BWD, "cuda")
def _cuda_core(x, w, bias, targets, grad, scale, eps, want_rows=True):
    # the statistics (and, for soft targets, each row's target mass) are always written: the
    # gradient kernels read them
    outs = _outputs(x, w, bias, targets, grad)
    loss, stats, top, dx, dw, db, dq = outs
    mass = torch.empty_like(loss) if targets.is_floating_point() else None
    _ext.cuda_module().masked_prediction_forward_backward(
        *_ext_args(x, w, bias, grad, scale, eps), *_target_args(targets), _ext.ptr(grad), *_sizes(x, w, scale, eps),
        *map(_ext.ptr, (loss, stats[0], stats[1], mass, top, dx, dw, db, dq)), _ext.stream(x.device))
    return outs


@_dispatch.register(OP, "triton")
@_dispatch.register(OP_SOFT, "triton")
@_dispatch.register(OP_BWD, "triton")
def _triton_core(x, w, bias, targets, grad, scale, eps, want_rows=True):
    from ..kernels import masked_prediction as kern

    return kern.core(x, w, bias, targets, grad, scale, eps, want_rows)


# ----------------------------------------------------------------------------- custom ops

def _empty_f32(x):
    return x.new_empty(0, dtype=torch.float32)


def _or_empty(t, x):
    return _empty_f32(x) if t is None else t


def _contig(x, w, bias, targets):
    return x.contiguous(), w.contiguous(), None if bias is None else bias.contiguous(), targets.contiguous()


@torch.library.custom_op("sslfast::masked_prediction", mutates_args=())
def _rows_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, scale: float,
             eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses (N, H), their statistics (2, N, H) (max logit, log l: lse is their sum)
    and the top flags; no gradients computed."""
    loss, stats, top, *_ = _dispatch.get(OP, backend)(*_contig(x, w, bias, targets), None, scale, eps)
    return loss, stats, top


@_rows_op.register_fake
def _(x, w, bias, targets, scale, eps, backend):
    n, h = targets.shape[:2]
    return (x.new_empty(n, h, dtype=torch.float32), x.new_empty(2, n, h, dtype=torch.float32),
            x.new_empty(n, h, dtype=torch.bool))


@torch.library.custom_op("sslfast::masked_prediction_backward", mutates_args=())
def _backward_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                 grad: torch.Tensor, scale: float, eps: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum grad * loss`` w.r.t. x, w, bias and soft targets (empty without a
    bias / for hard targets): the logits recomputed tile by tile."""
    *_, dx, dw, db, dq = _dispatch.get(OP_BWD, backend)(*_contig(x, w, bias, targets), grad.float().contiguous(),
                                                        scale, eps, want_rows=False)
    return (dx.to(x.dtype), dw.to(w.dtype), _or_empty(None if db is None else db.to(bias.dtype), x),
            _or_empty(None if dq is None else dq.to(targets.dtype), x))


@_backward_op.register_fake
def _(x, w, bias, targets, grad, scale, eps, backend):
    return (torch.empty_like(x), torch.empty_like(w), (_empty_f32(x) if bias is None else torch.empty_like(bias)),
            torch.empty_like(targets) if targets.is_floating_point() else _empty_f32(x))


def _rows_setup(ctx, inputs, output):
    x, w, bias, targets, scale, eps, backend = inputs
    ctx.save_for_backward(x, w, bias, targets)
    ctx.args = (scale, eps, backend)
    ctx.has_bias, ctx.soft = bias is not None, targets.is_floating_point()


def _rows_backward(ctx, grad_loss, grad_stats, grad_top):
    x, w, bias, targets = ctx.saved_tensors
    dx, dw, db, dq = torch.ops.sslfast.masked_prediction_backward(x, w, bias, targets, grad_loss, *ctx.args)
    return dx, dw, db if ctx.has_bias else None, dq if ctx.soft else None, None, None, None


torch.library.register_autograd("sslfast::masked_prediction", _rows_backward, setup_context=_rows_setup)


@torch.library.custom_op("sslfast::masked_prediction_fused", mutates_args=())
def _fused_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
              grad: torch.Tensor, scale: float, eps: float, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor]:
    """``sum grad * loss`` (0-d fp32), the per-row losses and top flags, and the gradients of
    the sum w.r.t. x, w, bias and soft targets (fp32; empty when absent), all from one pass."""
    loss, _stats, top, dx, dw, db, dq = _dispatch.get(OP, backend)(*_contig(x, w, bias, targets),
                                                                 grad.float().contiguous(), scale, eps)
    total = (loss.double() * grad.double()).sum().float()
    return total, loss, top, dx, dw, _or_empty(db, x), _or_empty(dq, x)


@_fused_op.register_fake
def _(x, w, bias, targets, grad, scale, eps, backend):
    n, h = targets.shape[:2]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((), **f32), x.new_empty(n, h, **f32), x.new_empty(n, h, dtype=torch.bool),
            x.new_empty(x.shape, **f32), w.new_empty(w.shape, **f32),
            _empty_f32(x) if bias is None else bias.new_empty(bias.shape, **f32),
            targets.new_empty(targets.shape, **f32) if targets.is_floating_point() else _empty_f32(x))


def _fused_setup(ctx, inputs, output):
    x, w, bias, targets, *_ = inputs
    *_, dx, dw, db, dq = output
    ctx.save_for_backward(dx, dw, db, dq)
    ctx.dtypes = (x.dtype, w.dtype, None if bias is None else bias.dtype,
                  targets.dtype if targets.is_floating_point() else None)


def _fused_backward(ctx, g_total, *_unused):
    grads = ctx.saved_tensors
    dtypes = ctx.dtypes
    g = g_total.float()
    if getattr(ctx, "handed_over", False):
        raise RuntimeError(
            "masked_prediction_loss: a second backward through the same graph (retain_graph=True) after the "
            "first handed its saved gradients over; compute the loss again for each backward")
    if (g.device.type == "cpu" and not torch.compiler.is_compiling() and float(g) == 1.0
            and all(dt in (None, torch.float32) for dt in dtypes)):
        # loss.backward(): hand the saved fp32 gradients over as they are (no second H*V*D
        # copy); they may then be accumulated into in place, so they are not reusable
        ctx.handed_over = True
        out = [None if dt is None else t for t, dt in zip(grads, dtypes)]
    else:
        out = [None if dt is None else (t * g).to(dt) for t, dt in zip(grads, dtypes)]
    return (*out, None, None, None, None)


torch.library.register_autograd("sslfast::masked_prediction_fused", _fused_backward, setup_context=_fused_setup)


# ----------------------------------------------------------------------------- public API

def _check_float(name, value, *, positive=False, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if lo is not None and not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def masked_prediction_loss(x, weight, targets, *, head="linear", bias=None, logit_temp=0.1, mask=None,
                           frame_weight=None, pred_masked_weight=1.0, pred_nomask_weight=0.0, ignore_index=-100,
                           label_smoothing=0.0, reduction="mean", return_stats=False, backend=None):
    """Masked-prediction cross-entropy of HuBERT (cosine head) and BEST-RQ / NEST (linear heads).

    Args:
        x: (N, D) frame vectors shared by every head (BEST-RQ, HuBERT's tied ``final_proj``) or
            (N, H, D) one vector per head (HuBERT's ``untie_final_proj``: ``final_proj(x)``
            viewed (N, H, final_dim)); fp32, fp16 or bf16 (fp64 on ``backend="reference"``).
        weight: (H, V, D), same float dtypes: the linear heads' weights (``z = x W^T + b``,
            ``nn.Linear`` layout per head) or, for ``head="cosine"``, the label embeddings
            (fairseq's ``label_embs_concat`` viewed (H, V, final_dim)).
        targets: (N, H) int32/int64 labels in [0, V), or ``ignore_index``; or (N, H, V) float
            target probabilities (soft targets, BiRQ): torch's cross-entropy with probability
            targets (not renormalised, ``ignore_index`` unused), differentiable w.r.t. them;
            every backend (cpu, cuda, triton, reference).
        head: ``"linear"`` (default) or ``"cosine"``: ``z = cos(x, weight_v) / logit_temp``.
        bias: (H, V) float or None; linear head only.
        logit_temp: the cosine head's temperature, a finite float > 0 (default 0.1, fairseq).
        mask: (N,) bool or None: which frames were masked. With a mask the frame weight is
            multiplied by ``pred_masked_weight`` (masked) or ``pred_nomask_weight`` (unmasked),
            fairseq HuBERT's options (defaults 1.0 and 0.0); without one they are unused.
        frame_weight: (N,) float or None (ones): per-frame weights (no gradient reaches them).
        ignore_index: int, default -100 (torch's): targets equal to it contribute nothing.
        label_smoothing: float in [0, 1], torch's ``cross_entropy`` definition.
        reduction: ``"mean"`` (default: the weighted sum over the count of non-ignored pairs
            with a non-zero frame weight; 0 when there are none), ``"sum"`` or ``"none"``
            ((N, H) weighted per-pair losses).
        return_stats: also return fairseq's accuracy counters: ``MaskedPredictionStats(loss,
            correct, count)``, ``correct`` and ``count`` (H,) int64 tensors.
        backend: None (fastest available), ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.

    Returns the fp32 loss (fp64 for fp64 inputs on the reference), or ``MaskedPredictionStats``.
    Gradients reach x, weight and bias. The conventions (fairseq ``HubertCriterion``, NeMo
    ``MultiMLMLoss``, SpeechBrain) and what differs on purpose are in
    ``sslfast.reference.masked_prediction``; in short, fairseq HuBERT's loss is ``H`` times
    ``reduction="mean"`` with ``mask`` given, NeMo's is ``"mean"``.

    Raises TypeError for a non-tensor or a wrong dtype, ValueError for inconsistent shapes,
    devices, a target outside [0, V) other than ``ignore_index`` (checked on CPU tensors),
    a bias with the cosine head, or a hyper-parameter out of range.

    The kernels never build the (N, H, V) logits: per head they compute a tile of rows'
    logits at a time, and recompute them for the gradients; with ``reduction`` "mean" or
    "sum" the gradients are computed in the forward pass and only scaled in the backward.
    Memory O(N D + H V D).
    """
    V.check_tensor("x", x, ndim=(2, 3), dtypes=V.FLOAT_DTYPES + (torch.float64,))
    V.check_tensor("weight", weight, ndim=3, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    h, v, d = weight.shape
    n = x.shape[0]
    if x.shape[-1] != d:
        raise ValueError(f"x's last dimension must be weight's D = {d}, got x of shape {tuple(x.shape)}")
    if x.dim() == 3 and x.shape[1] != h:
        raise ValueError(f"x of shape (N, H, D) must have H = {h} (weight's heads), got {tuple(x.shape)}")
    if h < 1 or v < 1 or d < 1:
        raise ValueError(f"weight must have H, V, D >= 1, got shape {tuple(weight.shape)}")
    soft = isinstance(targets, torch.Tensor) and targets.is_floating_point()
    if soft:
        V.check_tensor("targets", targets, ndim=3, dtypes=V.FLOAT_DTYPES + (torch.float64,), shape=(n, h, v))
    else:
        V.check_tensor("targets", targets, ndim=2, dtypes=V.INDEX_DTYPES, shape=(n, h))
    V.check_choice("head", head, ("linear", "cosine"))
    if bias is not None:
        if head == "cosine":
            raise ValueError("bias is only used by head='linear'; the cosine head (HuBERT) has none")
        V.check_tensor("bias", bias, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,), shape=(h, v))
    if mask is not None:
        V.check_tensor("mask", mask, ndim=1, dtypes=(torch.bool,), shape=(n,))
    if frame_weight is not None:
        V.check_tensor("frame_weight", frame_weight, ndim=1, dtypes=V.FLOAT_DTYPES + (torch.float64,), shape=(n,))
    device = V.check_same_device(x=x, weight=weight, targets=targets, bias=bias, mask=mask, frame_weight=frame_weight)
    logit_temp = _check_float("logit_temp", logit_temp, positive=True)
    pred_masked_weight = _check_float("pred_masked_weight", pred_masked_weight)
    pred_nomask_weight = _check_float("pred_nomask_weight", pred_nomask_weight)
    label_smoothing = _check_float("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    ignore_index = V.check_int("ignore_index", ignore_index)
    V.check_choice("reduction", reduction, ("mean", "sum", "none"))
    _check_flag("return_stats", return_stats)
    valid = torch.ones(n, h, dtype=torch.bool, device=device) if soft else targets != ignore_index
    if not soft and device.type == "cpu" and not torch.compiler.is_compiling() and n > 0:
        bad = valid & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(f"targets must be in [0, {v}) or ignore_index={ignore_index}, got {first}")
    if frame_weight is not None:
        frame_weight = frame_weight.detach()

    # the one dtype policy (sslfast/_validation.py): fp64 anywhere -> backend=None runs the
    # reference; an explicit kernel backend raises a TypeError naming the argument
    name = V.resolve_backend(OP_SOFT if soft else OP, backend, device, x=x, weight=weight, bias=bias,
                             frame_weight=frame_weight, targets=targets if soft else None)
    if name == "reference":
        return ref.masked_prediction_loss(
            x, weight, targets, head=head, bias=bias, logit_temp=logit_temp, mask=mask, frame_weight=frame_weight,
            pred_masked_weight=pred_masked_weight, pred_nomask_weight=pred_nomask_weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
            return_stats=return_stats)

    x3 = x if x.dim() == 3 else x[:, None, :]
    scale = 1.0
    if head == "cosine":
        x3, weight, scale = ref.safe_normalize(x3.float()), ref.safe_normalize(weight.float()), 1.0 / logit_temp
    tgt = targets if soft else torch.where(valid, targets.long(), torch.full_like(targets, -1, dtype=torch.long))
    w_frame = ref.frame_weights(n, mask=mask, frame_weight=frame_weight, pred_masked_weight=pred_masked_weight,
                                pred_nomask_weight=pred_nomask_weight, device=device)
    counted = valid & (w_frame != 0)[:, None]
    count = counted.sum(dim=0)
    pair_w = torch.where(valid, w_frame[:, None], torch.zeros((), device=device))

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x3, weight, bias, tgt))
    if reduction != "none" and needs_grad:
        if reduction == "mean":
            pair_w = pair_w / count.sum().clamp_min(1).float()
        loss, _rows, top, *_ = torch.ops.sslfast.masked_prediction_fused(
            x3, weight, bias, tgt, pair_w, scale, label_smoothing, name)
    else:
        rows, _stats, top = torch.ops.sslfast.masked_prediction(x3, weight, bias, tgt, scale, label_smoothing, name)
        rows = rows * pair_w
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / count.sum().clamp_min(1).float()
    if not return_stats:
        return loss
    return MaskedPredictionStats(loss, (top & counted).sum(dim=0), count)
