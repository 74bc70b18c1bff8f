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
``(1 - eps) * (lse - z)``.

BiRQ's targets made on the fly (``targets=GumbelRPQTargets(...)``): the op normalises the
features and codebooks here (PyTorch, with gradient) and the backends' ``core_gumbel`` computes
the target logits ``t = tgt_scale <y, c_v> + noise_scale G`` and ``q = softmax(t)`` tile by tile
from each row's target statistics (csrc/masked_prediction.h, "BiRQ"), returning also the
gradients w.r.t. y and c: nothing (N, H, V) is stored, on any kernel backend.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from .. import _dispatch, _ext
from .. import _validation as V
from .. import random as sr
from ..reference import masked_prediction as ref
from ..reference.masked_prediction import MaskedPredictionStats

__all__ = ["masked_prediction_loss", "MaskedPredictionStats", "GumbelRPQTargets"]

OP, OP_BWD = "masked_prediction_loss", "masked_prediction_backward"

# ----------------------------------------------------------------------------- backends
# core(x (N, Hx, D), w (H, V, D), bias (H, V) | None, targets, grad (N, H) fp32 | None, scale, eps)
#   -> (loss (N, H) fp32, stats (2, N, H) fp32, top (N, H) bool, dx (N, Hx, D) fp32 | None,
#       dw (H, V, D) fp32 | None, db (H, V) fp32 | None, dq (N, H, V) fp32 | None)
# stats: each row's max logit and log l (lse = max + log l, kept apart: csrc/masked_prediction.h).
# targets: (N, H) int64 labels with -1 = ignored, or (N, H, V) float soft targets (op OP_SOFT).
# Gradients only when grad is given (then dx, dw and, with a bias, db; dq for soft targets).

OP_SOFT = "masked_prediction_loss_soft"
# core_gumbel(x, w, bias, y (N, Hy, Dt) fp32, c (H, V, Dt) fp32, seed_t (1,) int64, tgt_scale, noise_scale, grad,
#             scale, eps, want_rows=True) -> the seven outputs above (dq None) and dy (N, Hy, Dt), dc (H, V, Dt)
# fp32 | None: BiRQ's targets q = softmax(tgt_scale <y, c_v> + noise_scale G) made tile by tile
# (csrc/masked_prediction.h "BiRQ", reference.masked_prediction.gumbel_target_logits).
OP_GUMBEL, OP_GUMBEL_BWD = "masked_prediction_loss_gumbel", "masked_prediction_gumbel_backward"


@_dispatch.register(OP, "reference")
@_dispatch.register(OP_SOFT, "reference")
@_dispatch.register(OP_GUMBEL, "reference")
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


@_dispatch.register(OP_GUMBEL, "cpu")
@_dispatch.register(OP_GUMBEL_BWD, "cpu")
def _cpu_gumbel(x, w, bias, y, c, seed_t, tgt_scale, noise_scale, grad, scale, eps, want_rows=True):
    """The core_gumbel contract (top of this file) on the C++ CPU kernel; the Philox key is read
    on the host (a CPU tensor: no sync), an int is taken as is."""
    mod = _ext.cpu_module()
    n, hy, dt = y.shape
    need_grad = grad is not None
    slots, ws_floats = mod.masked_prediction_layout(w.shape[1], w.shape[2], need_grad, dt)
    ws = torch.empty(ws_floats, dtype=torch.float32, device=x.device)
    # hard-label-shaped placeholder targets: no (N, H, V) dq buffer
    loss, stats, top, dx, dw, db, _ = _outputs(x, w, bias, torch.empty(0, dtype=torch.int64), grad)
    dy = torch.zeros(n, hy, dt, dtype=torch.float32, device=x.device) if need_grad else None
    dc = (torch.empty if n > 0 else torch.zeros)(c.shape, dtype=torch.float32, device=x.device) if need_grad else None
    rows = (loss, stats[0], stats[1], top) if want_rows else (None, None, None, None)
    mod.masked_prediction_gumbel_forward_backward(
        *_ext_args(x, w, bias, grad, scale, eps), _ext.ptr(y), _ext.ptr(c), hy, dt, sr.seed_value(seed_t),
        float(tgt_scale), float(noise_scale), _ext.ptr(grad), *_sizes(x, w, scale, eps),
        *map(_ext.ptr, rows + (dx, dw, db, dy, dc)), _ext.ptr(ws), slots)
    return loss, stats, top, dx, dw, db, dy, dc


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


@_dispatch.register(OP_GUMBEL, "cuda")
@_dispatch.register(OP_GUMBEL_BWD, "cuda")
def _cuda_gumbel(x, w, bias, y, c, seed_t, tgt_scale, noise_scale, grad, scale, eps, want_rows=True):
    """The core_gumbel contract (top of this file) on the CUDA kernels (kGumbel instantiations).

    Args:
        x: (N, Hx, D) fp32, fp16 or bf16, contiguous, Hx in {1, H}.
        w: (H, V, D), x's dtype, contiguous. bias: (H, V) in x's dtype, or None.
        y: (N, Hy, Dt) fp32, contiguous, Hy in {1, H}; c: (H, V, Dt) fp32, contiguous; both
            already L2-normalised (the op does it).
        seed_t: the Philox key: an int64 tensor with one element on x's device, read by the
            kernels on the device (no host synchronisation; CUDA-graph safe), or an int (made
            into such a tensor with one fill kernel); both give the same bits. ValueError for
            another dtype, size or device.
        tgt_scale, noise_scale: floats (the op passes 2 / tau and 1 / tau, or 0: no noise drawn).
        grad: (N, H) fp32 per-row gradient weights g, or None (no gradients computed).
        scale: the logits' scale (z = scale * <x, w_v> + b_v); eps: label smoothing in [0, 1].
        want_rows: False for a backward-only call (loss, stats and top are computed anyway: the
            gradient kernels need the statistics).

    Returns ``(loss (N, H) fp32, stats (2, N, H) fp32 [max logit, log l: lse = their sum],
    top (N, H) bool, dx (N, Hx, D), dw (H, V, D), db (H, V), dy (N, Hy, Dt), dc (H, V, Dt))``,
    the gradients (fp32) of ``sum g * loss`` and None without ``grad`` (db also None without a
    bias). N = 0 gives empty rows and zero gradients. Deterministic (no atomics).

    Memory beyond the outputs: seven (N, H) fp32 row statistics and, with a gradient and Hy = 1,
    an (N, H, Dt) fp32 per-head dy summed here.
    """
    n, hy, dt = y.shape
    h = w.shape[0]
    need_grad = grad is not None
    if not isinstance(seed_t, torch.Tensor):
        seed_t = sr.seed_tensor(seed_t, x.device)
    if seed_t.dtype != torch.int64 or seed_t.numel() != 1 or seed_t.device != x.device:
        raise ValueError(f"seed_t must be one int64 on {x.device}, got {seed_t.dtype} {tuple(seed_t.shape)} on "
                         f"{seed_t.device}")
    f32 = dict(dtype=torch.float32, device=x.device)
    # hard-label-shaped placeholder targets: no (N, H, V) dq buffer
    loss, stats, top, dx, dw, db, _ = _outputs(x, w, bias, torch.empty(0, dtype=torch.int64), grad)
    # mass, m_t, l_t, zbest, dbar: written by the forward kernel, read by the gradient kernels
    saved = torch.empty(5, n, h, **f32)
    # the kernels accumulate dy (per head) and dc tile by tile: zero-filled
    dyh = torch.zeros(n, h, dt, **f32) if need_grad else None
    dc = torch.zeros(c.shape, **f32) if need_grad else None
    _ext.cuda_module().masked_prediction_gumbel_forward_backward(
        *_ext_args(x, w, bias, grad, scale, eps), _ext.ptr(y), _ext.ptr(c), hy, dt, _ext.ptr(seed_t),
        float(tgt_scale), float(noise_scale), _ext.ptr(grad), *_sizes(x, w, scale, eps),
        *map(_ext.ptr, (loss, stats[0], stats[1], *saved.unbind(0), top, dx, dw, db, dyh, dc)),
        _ext.stream(x.device))
    dy = None
    if need_grad:
        dy = dyh if hy == h else dyh.sum(dim=1, keepdim=True)
    return loss, stats, top, dx, dw, db, dy, dc


@_dispatch.register(OP, "triton")
@_dispatch.register(OP_SOFT, "triton")
@_dispatch.register(OP_BWD, "triton")
def _triton_core(x, w, bias, targets, grad, scale, eps, want_rows=True):
    from ..kernels import masked_prediction as kern

    return kern.core(x, w, bias, targets, grad, scale, eps, want_rows)


@_dispatch.register(OP_GUMBEL, "triton")
@_dispatch.register(OP_GUMBEL_BWD, "triton")
def _triton_gumbel(x, w, bias, y, c, seed_t, tgt_scale, noise_scale, grad, scale, eps, want_rows=True):
    from ..kernels import masked_prediction as kern

    return kern.core_gumbel(x, w, bias, y, c, seed_t, tgt_scale, noise_scale, grad, scale, eps, want_rows)


# ----------------------------------------------------------------------------- custom ops
# Every custom op takes the hard / soft targets (``targets``) or BiRQ's target inputs (``y``, ``c``,
# ``seed``/``seed_t``, ``tgt_scale``, ``noise_scale``; ``targets`` None), and returns the gradients
# of all of them that exist (empty tensors for the absent ones).

def _empty_f32(x):
    return x.new_empty(0, dtype=torch.float32)


def _or_empty(t, x):
    return _empty_f32(x) if t is None else t


def _core(x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale, grad, scale, eps, backend, backward):
    """The backend's core on contiguous operands: (loss, stats, top, dx, dw, db, dq, dy, dc)."""
    x, w = x.contiguous(), w.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad = None if grad is None else grad.float().contiguous()
    kw = dict(want_rows=False) if backward else {}
    if y is None:
        op = OP_BWD if backward else OP
        return (*_dispatch.get(op, backend)(x, w, bias, targets.contiguous(), grad, scale, eps, **kw), None, None)
    key = sr.seed_tensor(sr.join_seed(seed, seed_t), x.device).reshape(1)
    loss, stats, top, dx, dw, db, dy, dc = _dispatch.get(OP_GUMBEL_BWD if backward else OP_GUMBEL, backend)(
        x, w, bias, y.contiguous(), c.contiguous(), key, tgt_scale, noise_scale, grad, scale, eps, **kw)
    return loss, stats, top, dx, dw, db, None, dy, dc


def _fake_rows(x, w):
    n, h = x.shape[0], w.shape[0]
    return (x.new_empty(n, h, dtype=torch.float32), x.new_empty(2, n, h, dtype=torch.float32),
            x.new_empty(n, h, dtype=torch.bool))


@torch.library.custom_op("sslfast::masked_prediction", mutates_args=())
def _rows_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: Optional[torch.Tensor],
             y: Optional[torch.Tensor], c: Optional[torch.Tensor], seed: int, seed_t: Optional[torch.Tensor],
             tgt_scale: float, noise_scale: float, scale: float, eps: float,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses (N, H), their statistics (2, N, H) (max logit, log l: lse is their sum)
    and the top flags; no gradients computed."""
    loss, stats, top, *_ = _core(x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale, None, scale, eps,
                                 backend, False)
    return loss, stats, top


@_rows_op.register_fake
def _(x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale, scale, eps, backend):
    return _fake_rows(x, w)


def _cast_grads(x, w, bias, targets, y, c, dx, dw, db, dq, dy, dc):
    """The gradients in their inputs' dtypes, empty where absent."""
    return [_empty_f32(x) if t is None or d is None or not t.is_floating_point() else d.to(t.dtype)
            for t, d in ((x, dx), (w, dw), (bias, db), (targets, dq), (y, dy), (c, dc))]


def _fake_grads(x, w, bias, targets, y, c):
    return [(_empty_f32(x) if t is None or not t.is_floating_point() else torch.empty_like(t))
            for t in (x, w, bias, targets, y, c)]


@torch.library.custom_op("sslfast::masked_prediction_backward", mutates_args=())
def _backward_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: Optional[torch.Tensor],
                 y: Optional[torch.Tensor], c: Optional[torch.Tensor], seed: int, seed_t: Optional[torch.Tensor],
                 tgt_scale: float, noise_scale: float, grad: torch.Tensor, scale: float, eps: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    """Gradients of ``sum grad * loss`` w.r.t. x, w, bias, soft targets, y and c (empty where
    absent): the logits recomputed tile by tile."""
    *_, dx, dw, db, dq, dy, dc = _core(x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale, grad, scale,
                                       eps, backend, True)
    return tuple(_cast_grads(x, w, bias, targets, y, c, dx, dw, db, dq, dy, dc))


@_backward_op.register_fake
def _(x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale, grad, scale, eps, backend):
    return tuple(_fake_grads(x, w, bias, targets, y, c))


def _rows_setup(ctx, inputs, output):
    x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale, scale, eps, backend = inputs
    ctx.save_for_backward(x, w, bias, targets, y, c, seed_t)
    ctx.args = (seed, tgt_scale, noise_scale, scale, eps, backend)


def _rows_backward(ctx, grad_loss, grad_stats, grad_top):
    x, w, bias, targets, y, c, seed_t = ctx.saved_tensors
    seed, tgt_scale, noise_scale, scale, eps, backend = ctx.args
    grads = torch.ops.sslfast.masked_prediction_backward(x, w, bias, targets, y, c, seed, seed_t, tgt_scale,
                                                         noise_scale, grad_loss, scale, eps, backend)
    out = [g if t is not None and t.is_floating_point() else None
           for t, g in zip((x, w, bias, targets, y, c), grads)]
    return (*out, None, None, None, None, None, None, None)


torch.library.register_autograd("sslfast::masked_prediction", _rows_backward, setup_context=_rows_setup)


@torch.library.custom_op("sslfast::masked_prediction_fused", mutates_args=())
def _fused_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: Optional[torch.Tensor],
              y: Optional[torch.Tensor], c: Optional[torch.Tensor], seed: int, seed_t: Optional[torch.Tensor],
              tgt_scale: float, noise_scale: float, grad: torch.Tensor, scale: float, eps: float, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum grad * loss`` (0-d fp32), the per-row losses and top flags, and the gradients of
    the sum w.r.t. x, w, bias, soft targets, y and c (fp32; empty when absent), all from one pass."""
    loss, _stats, top, dx, dw, db, dq, dy, dc = _core(x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale,
                                                      grad, scale, eps, backend, False)
    total = (loss.double() * grad.double()).sum().float()
    return (total, loss, top, *(_or_empty(t, x) for t in (dx, dw, db, dq, dy, dc)))


@_fused_op.register_fake
def _(x, w, bias, targets, y, c, seed, seed_t, tgt_scale, noise_scale, grad, scale, eps, backend):
    loss, _stats, top = _fake_rows(x, w)
    grads = [g.float() for g in _fake_grads(x, w, bias, targets, y, c)]
    return (x.new_empty((), dtype=torch.float32), loss, top, *grads)


def _fused_setup(ctx, inputs, output):
    x, w, bias, targets, y, c = inputs[:6]
    ctx.save_for_backward(*output[3:])
    ctx.dtypes = tuple(None if t is None or not t.is_floating_point() else t.dtype
                       for t in (x, w, bias, targets, y, c))


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
    return (*out, None, None, None, None, None, None, None, None)


torch.library.register_autograd("sslfast::masked_prediction_fused", _fused_backward, setup_context=_fused_setup)


# ----------------------------------------------------------------------------- public API

class GumbelRPQTargets(NamedTuple):
    """BiRQ's enhanced labels, made inside ``masked_prediction_loss`` (pass it as ``targets``).

    Per frame n and head h the soft target is the Gumbel-softmax over the random-projection
    quantizer's scores of an intermediate representation (BiRQ, Jiang et al. 2025; the RPQ of
    BEST-RQ with the cosine metric, ``sslfast.random_projection_quantize``):
    ``q[n, h] = softmax_v((-|f^[n, h] - c^[h, v]|^2 + G[n, h, v]) / tau)``, f^ and c^ the
    L2-normalised features and codewords (a zero vector stays zero),
    ``-|f^ - c^|^2 = 2 <f^, c^> - 2`` (the constant drops out), G Gumbel(0, 1) noise from the
    Philox stream of ``gumbel_vector_quantize`` (the noise of an (N, H * V) logits row, counter
    ``(h * V + v) // 4``, row n), the same bits on every backend. The loss is the soft-target
    cross-entropy against q, and q is differentiable: gradients reach ``features`` and
    ``codebooks`` (BiRQ's gradient path into the encoder). The kernels never store q.

    Fields:
        features: (N, d) shared by every head, or (N, H, d): the projected intermediate
            representation (e.g. ``layer_output @ projection`` viewed per head); fp32, fp16,
            bf16 (fp64 on the reference); any device of ``x``.
        codebooks: (H, V, d) float: the quantizer's codewords (V = the loss head's V).
        tau: Gumbel-softmax temperature, a finite float > 0 (default 1.0).
        seed: int, 0-d int64 tensor on the device, or None (drawn): the noise key, as every
            sslfast random op (README "Seeds").
        training: False draws no noise (``q = softmax(-|f^ - c^|^2 / tau)``), as
            ``gumbel_vector_quantize`` in eval.
    """

    features: torch.Tensor
    codebooks: torch.Tensor
    tau: float = 1.0
    seed: Union[int, torch.Tensor, None] = None
    training: bool = True


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
            every backend (cpu, cuda, triton, reference); or ``GumbelRPQTargets`` (BiRQ): soft
            targets made from RPQ scores inside the op, never stored (its docstring).
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
    gumbel = isinstance(targets, GumbelRPQTargets)
    if gumbel:
        feats, codebooks, tau, seed, training = targets
        V.check_tensor("targets.features", feats, ndim=(2, 3), dtypes=V.FLOAT_DTYPES + (torch.float64,))
        V.check_tensor("targets.codebooks", codebooks, ndim=3, dtypes=V.FLOAT_DTYPES + (torch.float64,))
        if codebooks.shape[:2] != (h, v):
            raise ValueError(f"targets.codebooks must be (H, V, d) = ({h}, {v}, d) like weight, got "
                             f"{tuple(codebooks.shape)}")
        if feats.shape[0] != n or feats.shape[-1] != codebooks.shape[-1] or (feats.dim() == 3 and feats.shape[1] != h):
            raise ValueError(f"targets.features must be (N, d) or (N, H, d) with N = {n}, H = {h}, d = "
                             f"{codebooks.shape[-1]}, got {tuple(feats.shape)}")
        if codebooks.shape[-1] < 1:
            raise ValueError("targets.codebooks must have d >= 1")
        tau = _check_float("targets.tau", tau, positive=True)
        _check_flag("targets.training", training)
    soft = gumbel or (isinstance(targets, torch.Tensor) and targets.is_floating_point())
    if soft and not gumbel:
        V.check_tensor("targets", targets, ndim=3, dtypes=V.FLOAT_DTYPES + (torch.float64,), shape=(n, h, v))
    elif not gumbel:
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
    device = V.check_same_device(x=x, weight=weight, targets=None if gumbel else targets, bias=bias, mask=mask,
                                 frame_weight=frame_weight, **(dict(features=feats, codebooks=codebooks) if gumbel else {}))
    if gumbel:
        # eval draws no noise: a seed is still checked when given, none is drawn when not
        seed = sr.resolve_seed(seed, device=device) if training or seed is not None else 0
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
    name = V.resolve_backend(OP_GUMBEL if gumbel else OP_SOFT if soft else OP, backend, device, x=x, weight=weight,
                             bias=bias, frame_weight=frame_weight, targets=targets if soft and not gumbel else None,
                             **(dict(features=feats, codebooks=codebooks) if gumbel else {}))
    if name == "reference":
        if gumbel:
            targets = ref.gumbel_rpq_soft_targets(feats, codebooks, tau=tau, seed=seed, training=training)
        return ref.masked_prediction_loss(
            x, weight, targets, head=head, bias=bias, logit_temp=logit_temp, mask=mask, frame_weight=frame_weight,
            pred_masked_weight=pred_masked_weight, pred_nomask_weight=pred_nomask_weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
            return_stats=return_stats)

    x3 = x if x.dim() == 3 else x[:, None, :]
    scale = 1.0
    if head == "cosine":
        x3, weight, scale = ref.safe_normalize(x3.float()), ref.safe_normalize(weight.float()), 1.0 / logit_temp
    if gumbel:
        # the RPQ's cosine metric: normalised here (with gradient), the kernels take unit vectors
        y = ref.safe_normalize(feats.float())
        y = y[:, None] if y.dim() == 2 else y
        gargs = (y, ref.safe_normalize(codebooks.float()), *sr.split_seed(seed), 2.0 / tau,
                 1.0 / tau if training else 0.0)
        tgt = None
    else:
        gargs = (None, None, 0, None, 0.0, 0.0)
        tgt = targets if soft else torch.where(valid, targets.long(), torch.full_like(targets, -1, dtype=torch.long))
    w_frame = ref.frame_weights(n, mask=mask, frame_weight=frame_weight, pred_masked_weight=pred_masked_weight,
                                pred_nomask_weight=pred_nomask_weight, device=device)
    counted = valid & (w_frame != 0)[:, None]
    count = counted.sum(dim=0)
    pair_w = torch.where(valid, w_frame[:, None], torch.zeros((), device=device))

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x3, weight, bias, tgt, *gargs[:2]))
    if reduction != "none" and needs_grad:
        if reduction == "mean":
            pair_w = pair_w / count.sum().clamp_min(1).float()
        loss, _rows, top, *_ = torch.ops.sslfast.masked_prediction_fused(
            x3, weight, bias, tgt, *gargs, pair_w, scale, label_smoothing, name)
    else:
        rows, _stats, top = torch.ops.sslfast.masked_prediction(x3, weight, bias, tgt, *gargs, scale, label_smoothing,
                                                                name)
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
