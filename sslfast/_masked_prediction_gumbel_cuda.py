"""The CUDA backend of BiRQ's on-the-fly soft targets in masked_prediction_loss (op
``masked_prediction_loss_gumbel``): ``cuda_core_gumbel``, to be registered by
sslfast/ops/masked_prediction.py (the lead moves it there).

The core is the soft-target core of sslfast/ops/masked_prediction.py with the targets
``q = softmax_v(t)``, ``t_v = tgt_scale * <y[n, h % Hy], c[h, v]> + noise_scale * G(n, h * V + v)``
made tile by tile inside the kernels (csrc/masked_prediction_cuda.cu, the kGumbel instantiations;
the math in csrc/masked_prediction.h's "BiRQ" section) and never stored; G is
gumbel_vector_quantize's Philox noise for an (N, H * V) logits row
(sslfast.reference.masked_prediction.gumbel_target_logits is the specification: BiRQ's
Gumbel-softmax over the random-projection quantizer's scores).
"""
from __future__ import annotations

import torch

from . import _ext
from . import random as sr
from .ops.masked_prediction import _ext_args, _outputs, _sizes

__all__ = ["cuda_core_gumbel"]


def cuda_core_gumbel(x, w, bias, y, c, seed_t, tgt_scale, noise_scale, grad, scale, eps, want_rows=True):
    """BiRQ's masked-prediction core on a CUDA device.

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

    Memory beyond the outputs: six (N, H) fp32 row statistics and, with a gradient and Hy = 1,
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
    # mass, m_t, log l_t, qbar: written by the forward kernel, read by the gradient kernels
    saved = torch.empty(4, n, h, **f32)
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
