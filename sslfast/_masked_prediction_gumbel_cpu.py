"""The C++ CPU backend of BiRQ's on-the-fly soft targets in masked_prediction_loss (op
``masked_prediction_loss_gumbel``): ``cpu_core_gumbel``, to be registered by
sslfast/ops/masked_prediction.py (the lead moves it there).

The core is the soft-target core of sslfast/ops/masked_prediction.py with the targets
``q = softmax_v(t)``, ``t_v = tgt_scale * <y[n, h % Hy], c[h, v]> + noise_scale * G(n, h * V + v)``
made per row inside the kernel (csrc/masked_prediction_cpu.cpp, the math in
csrc/masked_prediction.h's "BiRQ" section) and never stored; G is gumbel_vector_quantize's
Philox noise for an (N, H * V) logits row (sslfast.reference.masked_prediction.gumbel_target_logits
is the specification; BiRQ's Gumbel-softmax over the random-projection quantizer's scores).
"""
from __future__ import annotations

import torch

from . import _ext
from . import random as sr
from .ops.masked_prediction import _ext_args, _outputs, _sizes

__all__ = ["cpu_core_gumbel"]


def cpu_core_gumbel(x, w, bias, y, c, seed_t, tgt_scale, noise_scale, grad, scale, eps, want_rows=True):
    """BiRQ's masked-prediction core on the CPU.

    Args:
        x: (N, Hx, D) fp32, fp16 or bf16, contiguous, Hx in {1, H}.
        w: (H, V, D), x's dtype, contiguous. bias: (H, V) in x's dtype, or None.
        y: (N, Hy, Dt) fp32, contiguous, Hy in {1, H}; c: (H, V, Dt) fp32, contiguous; both
            already L2-normalised (the op does it).
        seed_t: the Philox key: an int64 CPU tensor with one element (read here, on the host),
            or an int; both give the same bits.
        tgt_scale, noise_scale: floats (the op passes 2 / tau and 1 / tau, or 0: no noise drawn).
        grad: (N, H) fp32 per-row gradient weights g, or None (no gradients computed).
        scale: the logits' scale (z = scale * <x, w_v> + b_v); eps: label smoothing in [0, 1].
        want_rows: False for a backward-only call (loss, stats and top are then left unwritten).

    Returns ``(loss (N, H) fp32, stats (2, N, H) fp32 [max logit, log l: lse = their sum],
    top (N, H) bool, dx (N, Hx, D), dw (H, V, D), db (H, V), dy (N, Hy, Dt), dc (H, V, Dt))``,
    the gradients (fp32) of ``sum g * loss`` and None without ``grad`` (db also None without a
    bias). N = 0 gives empty rows and zero gradients.
    """
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
