"""Triton kernels of the masked-prediction loss (the core described in
sslfast/ops/masked_prediction.py).

Per head h: rows x (N, Hx, D) (Hx = 1: every head reads the same row; Hx = H: one row per
head), class vectors W (H, V, D), bias (H, V); logits ``z = scale * <x, W_v> + b_v``; target
-1 marks an ignored row. Loss ``lse - (1 - eps) z_y - eps/V sum z``.

* ``_forward_kernel``: program (``pid_n``, ``h``) owns BLOCK_N rows of head h and walks V in
  BLOCK_V tiles with an online log-sum-exp; writes loss, the row statistics (max, log l: lse's
  two parts, kept apart as in csrc/masked_prediction.h) and the top flag (nothing N x V).
* ``_dx_kernel``: program (``pid_n``, ``pid_d``, ``hx``) owns BLOCK_N rows and BLOCK_DV
  feature columns of dX; it walks the V tiles of its head(s) (all H when x is shared),
  recomputing the logits from the saved statistics (the Cut Cross-Entropy backward) and
  accumulating ``dS @ W``.
* ``_dw_kernel``: program (``pid_v``, ``pid_d``, ``h``) owns BLOCK_V classes and BLOCK_DV
  columns of dW[h] (and, for pid_d == 0, db[h]); it walks the rows, accumulating
  ``dS^T @ X``. No atomics: deterministic.

Logits accumulate in fp32 (``tl.dot``; fp32 operands in IEEE fp32, not TF32). dS is rounded to
the operand dtype for the gradient products, with the per-row gradient weights first divided
by their max |g| so that dS stays in [-1, 1] (a mean over thousands of rows would otherwise
underflow fp16). Runs under ``TRITON_INTERPRET=1`` (fp32/fp16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compensated import add_compensated, log_denominator


@triton.jit
def _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """z (BLOCK_N, BLOCK_V) fp32 for rows offs_n of head h against classes offs_v."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    x_rows = (offs_n.to(tl.int64) * Hx + hx) * D
    w_rows = (h.to(tl.int64) * V + offs_v.to(tl.int64)) * D
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_rows[:, None] + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    z = acc * scale
    if HAS_BIAS:
        z += tl.load(b_ptr + h.to(tl.int64) * V + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _target_tile(q_ptr, pair, t, offs_v, n_ok, v_ok, V, SOFT: tl.constexpr):
    """The target probabilities of a tile (BLOCK_N, BLOCK_V): soft q, or the one-hot of t."""
    if SOFT:
        q = tl.load(q_ptr + pair[:, None] * V + offs_v[None, :], mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        return q.to(tl.float32)
    else:
        return tl.where(offs_v[None, :] == t[:, None], 1.0, 0.0)


@triton.jit
def _row_grad_state(t_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, pair, n_ok, SOFT: tl.constexpr):
    """(target, max, log l, target mass, gradient weight) of rows ``pair``; g = 0 on ignored
    rows."""
    t = tl.load(t_ptr + pair, mask=n_ok, other=-1)
    row_max = tl.load(max_ptr + pair, mask=n_ok, other=0.0)
    log_l = tl.load(log_l_ptr + pair, mask=n_ok, other=0.0)
    mass = tl.load(mass_ptr + pair, mask=n_ok, other=0.0)
    g = tl.load(g_ptr + pair, mask=n_ok, other=0.0)
    if not SOFT:
        g = tl.where(t >= 0, g, 0.0)
    return t, row_max, log_l, mass, g


@triton.jit
def _dlogits(z, row_max, log_l, g, q, mass, v_ok, n_ok, eps, eps_over_v):
    """g * dloss/dz for a tile (mass * softmax - (1 - eps) q - eps / V), 0 outside the valid
    rows and classes; softmax = exp((z - max) - log l)."""
    ok = n_ok[:, None] & v_ok[None, :]
    # padding classes never overflow
    p = tl.exp((tl.where(ok, z, float("-inf")) - row_max[:, None]) - log_l[:, None])
    ds = g[:, None] * (mass[:, None] * p - (1.0 - eps) * q - eps_over_v)
    return tl.where(ok, ds, 0.0)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, t_ptr, q_ptr, loss_ptr, max_ptr, log_l_ptr, mass_ptr, top_ptr, N, H, Hx,
                    V, D, scale, eps, HAS_BIAS: tl.constexpr, SOFT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    hx = h % Hx
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    pair = offs_n.to(tl.int64) * H + h
    t = tl.load(t_ptr + pair, mask=n_ok, other=-1)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # l_i's compensation
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_v q_v z_v
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    qsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    qbest = tl.full((BLOCK_N,), -1.0, dtype=tl.float32)
    zbest = tl.zeros((BLOCK_N,), dtype=tl.float32)  # logit of the (first) most probable class
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                    BLOCK_V, BLOCK_K, PRECISION)
        q = _target_tile(q_ptr, pair, t, offs_v, n_ok, v_ok, V, SOFT)
        zv = tl.where(v_ok[None, :], z, 0.0)
        zy += tl.sum(q * zv, axis=1)
        qsum += tl.sum(q, axis=1)
        q_tile = tl.max(tl.where(v_ok[None, :], q, -1.0), axis=1)
        at = tl.argmax(tl.where(v_ok[None, :], q, -1.0), axis=1)
        better = q_tile > qbest
        zbest = tl.where(better, tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == at[:, None], zv, 0.0), axis=1),
                         zbest)
        qbest = tl.where(better, q_tile, qbest)
        zsum += tl.sum(zv, axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile has a class
        alpha = tl.exp(m_i - m_new)
        l_i, c_i = add_compensated(l_i * alpha, c_i * alpha, tl.sum(tl.exp(z - m_new[:, None]), axis=1))
        m_i = m_new
    log_l = log_denominator(l_i, c_i)
    # lse expanded as in csrc/masked_prediction.h row_loss: exact for a hard label at the maximum
    loss = (1.0 - eps) * ((qsum * m_i - zy) + qsum * log_l) + eps * log_l + eps * (m_i - zsum / V)
    if SOFT:
        valid = n_ok
    else:
        valid = t >= 0
    tl.store(loss_ptr + pair, tl.where(valid, loss, 0.0), mask=n_ok)
    tl.store(max_ptr + pair, m_i, mask=n_ok)
    tl.store(log_l_ptr + pair, log_l, mask=n_ok)
    tl.store(mass_ptr + pair, (1.0 - eps) * qsum + eps, mask=n_ok)
    tl.store(top_ptr + pair, (valid & (zbest >= m_i)).to(tl.int8), mask=n_ok)


@triton.jit
def _dx_kernel(x_ptr, w_ptr, b_ptr, t_ptr, q_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, gmax_ptr, dx_ptr, dq_ptr, N,
               H, Hx, V, D, scale, eps, HAS_BIAS: tl.constexpr, SOFT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Also writes dq (soft targets) from the pid_d == 0 programs: g * (1 - eps) * (lse - z),
    lse - z summed as (max - z) + log l."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    hx = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D
    eps_over_v = eps / V
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # x shared by every head (Hx = 1): this program sums all H heads; else just head hx
    # (not software-pipelined: each step is a whole sweep over V; with V and D specialised to 1
    # the inner loops vanish and prefetching whole heads of tiles spilled)
    for i in tl.range(0, H // Hx, num_stages=1):
        h = hx + i
        pair = offs_n.to(tl.int64) * H + h
        t, row_max, log_l, mass, g = _row_grad_state(t_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, pair, n_ok, SOFT)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_ok = offs_v < V
            z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                        BLOCK_V, BLOCK_K, PRECISION)
            if SOFT:  # dq first: z is dead once ds is formed (fewer tiles live at once)
                if pid_d == 0:
                    dq = (g * tl.load(gmax_ptr))[:, None] * (1.0 - eps) * ((row_max[:, None] - z) + log_l[:, None])
                    tl.store(dq_ptr + pair[:, None] * V + offs_v[None, :], dq, mask=n_ok[:, None] & v_ok[None, :])
            q = _target_tile(q_ptr, pair, t, offs_v, n_ok, v_ok, V, SOFT)
            ds = _dlogits(z, row_max, log_l, g, q, mass, v_ok, n_ok, eps, eps_over_v)
            w = tl.load(w_ptr + (h.to(tl.int64) * V + offs_v.to(tl.int64))[:, None] * D + offs_dv[None, :],
                        mask=v_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = tl.dot(ds.to(w.dtype), w, acc, input_precision=PRECISION)
    out = dx_ptr + (offs_n.to(tl.int64) * Hx + hx)[:, None] * D + offs_dv[None, :]
    tl.store(out, acc * (scale * tl.load(gmax_ptr)), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _dw_kernel(x_ptr, w_ptr, b_ptr, t_ptr, q_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, gmax_ptr, dw_ptr, db_ptr, N,
               H, Hx, V, D, scale, eps, HAS_BIAS: tl.constexpr, SOFT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    h = tl.program_id(2)
    hx = h % Hx
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D
    eps_over_v = eps / V
    acc = tl.zeros((BLOCK_V, BLOCK_DV), dtype=tl.float32)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        pair = offs_n.to(tl.int64) * H + h
        t, row_max, log_l, mass, g = _row_grad_state(t_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, pair, n_ok, SOFT)
        z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                    BLOCK_V, BLOCK_K, PRECISION)
        q = _target_tile(q_ptr, pair, t, offs_v, n_ok, v_ok, V, SOFT)
        ds = _dlogits(z, row_max, log_l, g, q, mass, v_ok, n_ok, eps, eps_over_v)
        x = tl.load(x_ptr + (offs_n.to(tl.int64) * Hx + hx)[:, None] * D + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(ds.to(x.dtype)), x, acc, input_precision=PRECISION)
        if HAS_BIAS:
            db += tl.sum(ds, axis=0)
    gmax = tl.load(gmax_ptr)
    out = dw_ptr + (h.to(tl.int64) * V + offs_v.to(tl.int64))[:, None] * D + offs_dv[None, :]
    tl.store(out, acc * (scale * gmax), mask=v_ok[:, None] & dv_ok[None, :])
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + h.to(tl.int64) * V + offs_v, db * gmax, mask=v_ok)


def config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options per operand dtype: the GPU's, also used under the
    interpreter (tests run them at small shapes). Every kernel compiles with no spills on sm_80
    and sm_90 (tests/test_compile_triton.py).

    fp16 / bf16: 64 x 64 logit tiles on the tensor cores, D walked in chunks of 64, 8 warps, 3
    cp.async stages; dX / dW programs own 128 columns. fp32 ('ieee', the cosine head always):
    the dots run on the FMA units, where each thread holds its rows and columns of both
    operands for a whole K chunk; 32 x 32 tiles with K chunks of 8 and 4 warps, 2 stages, and
    64 dX / dW columns per program keep every operand of both products (K = 8 for the logits,
    K = 32 for dS @ W and dS^T @ X) in registers; 64 x 64 tiles or K = 16 spilled 8-4000 B."""
    if dtype == torch.float32:
        return dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=8, BLOCK_DV=min(64, max(16, triton.next_power_of_2(d))),
                    num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=64, BLOCK_DV=min(128, max(16, triton.next_power_of_2(d))),
                num_warps=8, num_stages=3)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def core(x, w, bias, targets, grad, scale, eps, want_rows=True):
    """The backend contract of sslfast/ops/masked_prediction.py (see there); targets (N, H)
    int64 labels (-1 ignored) or (N, H, V) soft targets."""
    n, hx, d = x.shape
    h, v, _ = w.shape
    soft = targets.is_floating_point()
    f32 = dict(dtype=torch.float32, device=x.device)
    loss = torch.empty(n, h, **f32)
    stats = torch.empty(2, n, h, **f32)  # max, log l
    mass = torch.empty(n, h, **f32)
    top = torch.empty(n, h, dtype=torch.bool, device=x.device)
    dx = dw = db = dq = None
    if grad is not None:
        dx = torch.zeros(n, hx, d, **f32)
        dw = torch.zeros(h, v, d, **f32)
        db = torch.zeros(h, v, **f32) if bias is not None else None
        dq = torch.zeros(n, h, v, **f32) if soft else None
    if n == 0:
        return loss, stats, top, dx, dw, db, dq
    cfg = config(d, x.dtype)
    common = dict(HAS_BIAS=bias is not None, SOFT=soft, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                  BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(x), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    b = bias if bias is not None else w  # a valid pointer, never read without HAS_BIAS
    tgt, q = (loss, targets) if soft else (targets, loss)  # likewise for the unused one
    _forward_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), h)](
        x, w, b, tgt, q, loss, stats[0], stats[1], mass, top.view(torch.int8), n, h, hx, v, d, float(scale), float(eps),
        **common)
    if grad is None:
        return loss, stats, top, dx, dw, db, dq
    gmax = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    g = (grad / gmax).contiguous()
    n_dblk = triton.cdiv(d, cfg["BLOCK_DV"])
    _dx_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), n_dblk, hx)](
        x, w, b, tgt, q, stats[0], stats[1], mass, g, gmax, dx, dq if dq is not None else dx, n, h, hx, v, d,
        float(scale), float(eps), BLOCK_DV=cfg["BLOCK_DV"], **common)
    _dw_kernel[(triton.cdiv(v, cfg["BLOCK_V"]), n_dblk, h)](
        x, w, b, tgt, q, stats[0], stats[1], mass, g, gmax, dw, db if db is not None else dw, n, h, hx, v, d,
        float(scale), float(eps), BLOCK_DV=cfg["BLOCK_DV"], **common)
    return loss, stats, top, dx, dw, db, dq
