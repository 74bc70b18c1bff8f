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

Targets (constexpr TARGET): HARD labels, SOFT (N, H, V) probabilities given, or GUMBEL: BiRQ's
soft targets made on the fly and never stored (``core_gumbel``; csrc/masked_prediction.h,
"BiRQ"): the target logits ``t = tgt_scale * <y[n, h % Hy], c[h, v]> + noise_scale * G(n, h*V + v)``
(G: gumbel_vector_quantize's noise for an (N, H*V) row, ``_gumbel_tile``) are recomputed tile
by tile (``_target_logits``: an FMA loop over Dt, the same bits in every pass), and
``q = exp(t - m_t) / l_t`` from each row's target statistics, which a first ``_forward_kernel``
launch in mode TSTATS (target logits, no target) computes. The GUMBEL forward also saves
``zbar = sum q z / sum q`` per row (tile sums in fp32; the C++ and CUDA kernels keep it as
zbest + dbar, anchored at q's peak: csrc/masked_prediction.h dtarget_logit); the gradient kernels
form ``dt = g (1 - eps) q (zbar - z)`` next to dS and, in their first
``cdiv(Dt, BLOCK_DT)`` column programs, add ``dt @ c`` (dY, per head, summed over heads on the
host when y is shared) and ``dt^T @ y`` (dC); these products run in fp32 ('ieee').
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compensated import add_compensated, log_denominator
from .gumbel_quantize import U_LO, _gumbel_tile

# TARGET modes of the kernels: hard labels, given soft targets, BiRQ's Gumbel-softmax targets
# made on the fly, and the target-statistics pass of the latter (logits of (y, c) + noise).
HARD, SOFT, GUMBEL, TSTATS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
_U_LO = tl.constexpr(U_LO)


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
def _target_logits(y_ptr, c_ptr, seed, offs_n, offs_v, n_ok, v_ok, h, Hy, V, Dt, tgt_scale, noise_scale,
                   NOISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_KT: tl.constexpr):
    """BiRQ's target logits (BLOCK_N, BLOCK_V) fp32: tgt_scale <y[n, h % Hy], c[h, v]> plus
    noise_scale times the Gumbel noise at position h*V + v of row n (drawn only with NOISE).

    The dot products are an FMA loop over Dt, each element's terms added in the order of d, not a
    tl.dot: every kernel then gets the same bits for the same t_v whatever its tile shape, as
    q = exp(t - m_t) / l_t needs (t is recomputed against statistics from another pass, and at
    tau 1e-3 (t ~ 1e4) an ulp of t moves q by 1e-3: dx was 250x over the fp32 reference's error
    with tl.dot tiles of different shapes in the statistics and gradient passes)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    y_rows = (offs_n.to(tl.int64) * Hy + h % Hy) * Dt
    c_rows = (h.to(tl.int64) * V + offs_v.to(tl.int64)) * Dt
    for k in range(0, Dt):
        yk = tl.load(y_ptr + y_rows + k, mask=n_ok, other=0.0)
        ck = tl.load(c_ptr + c_rows + k, mask=v_ok, other=0.0)
        acc += yk[:, None] * ck[None, :]
    t = acc * tgt_scale
    if NOISE:
        t += noise_scale * _gumbel_tile(seed, offs_n, h * V + offs_v, _U_LO)
    return t


@triton.jit
def _target_tile(q_ptr, pair, t, offs_n, offs_v, n_ok, v_ok, h, V, y_ptr, c_ptr, seed, Hy, Dt, tgt_scale,
                 noise_scale, m_t, l_t, TARGET: tl.constexpr, NOISE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_KT: tl.constexpr):
    """The target probabilities of a tile (BLOCK_N, BLOCK_V): soft q, the one-hot of t, or (GUMBEL)
    softmax of the target logits from the row's target statistics (max m_t, denominator l_t), as
    exp(t - m_t) / l_t (csrc/masked_prediction.h target_prob): 0 outside the valid rows and
    classes."""
    if TARGET == SOFT:
        q = tl.load(q_ptr + pair[:, None] * V + offs_v[None, :], mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        return q.to(tl.float32)
    elif TARGET == GUMBEL:
        tt = _target_logits(y_ptr, c_ptr, seed, offs_n, offs_v, n_ok, v_ok, h, Hy, V, Dt, tgt_scale, noise_scale,
                            NOISE, BLOCK_N, BLOCK_V, BLOCK_KT)
        ok = n_ok[:, None] & v_ok[None, :]
        return tl.exp(tl.where(ok, tt, float("-inf")) - m_t[:, None]) / l_t[:, None]
    else:
        return tl.where(offs_v[None, :] == t[:, None], 1.0, 0.0)


@triton.jit
def _row_grad_state(t_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, tst_ptr, NH, pair, n_ok, TARGET: tl.constexpr):
    """(target, max, log l, target mass, gradient weight, and for GUMBEL the target statistics
    m_t, l_t and zbar; else zeros) of rows ``pair``; g = 0 on ignored rows."""
    t = tl.load(t_ptr + pair, mask=n_ok, other=-1)
    row_max = tl.load(max_ptr + pair, mask=n_ok, other=0.0)
    log_l = tl.load(log_l_ptr + pair, mask=n_ok, other=0.0)
    mass = tl.load(mass_ptr + pair, mask=n_ok, other=0.0)
    g = tl.load(g_ptr + pair, mask=n_ok, other=0.0)
    if TARGET == HARD:
        g = tl.where(t >= 0, g, 0.0)
    m_t = tl.zeros_like(g)
    l_t = tl.full(g.shape, 1.0, tl.float32)
    zbar = tl.zeros_like(g)
    if TARGET == GUMBEL:
        m_t = tl.load(tst_ptr + pair, mask=n_ok, other=0.0)
        l_t = tl.load(tst_ptr + NH + pair, mask=n_ok, other=1.0)
        zbar = tl.load(tst_ptr + NH + NH + pair, mask=n_ok, other=0.0)
    return t, row_max, log_l, mass, g, m_t, l_t, zbar


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
def _dtarget(z, zbar, g, q, eps):
    """g * dloss/dt for a tile through q = softmax(t) (csrc/masked_prediction.h dtarget_logit):
    g (1 - eps) q (zbar - z), lse cancelled; 0 where q is."""
    return (g * (1.0 - eps))[:, None] * q * (zbar[:, None] - z)


@triton.jit
def _key(seed_ptr, NOISE: tl.constexpr):
    """The Philox key of the Gumbel noise, read on the device; 0 (never used) without noise."""
    if NOISE:
        return tl.load(seed_ptr)
    else:
        return 0


@triton.jit
def _target_columns(pid_d, Dt, BLOCK_DT: tl.constexpr):
    """(columns, in range, any in range) of dY / dC that column program pid_d owns (GUMBEL)."""
    offs_dt = pid_d * BLOCK_DT + tl.arange(0, BLOCK_DT)
    return offs_dt, offs_dt < Dt, pid_d * BLOCK_DT < Dt


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, t_ptr, q_ptr, loss_ptr, max_ptr, log_l_ptr, mass_ptr, top_ptr, y_ptr, c_ptr,
                    seed_ptr, tst_ptr, N, H, Hx, V, D, Hy, Dt, NH, scale, eps, tgt_scale, noise_scale,
                    HAS_BIAS: tl.constexpr, TARGET: tl.constexpr, NOISE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KT: tl.constexpr, PRECISION: tl.constexpr):
    """TSTATS: x, w are BiRQ's y, c (Hx = Hy, D = Dt, scale = tgt_scale), the logits get the
    Gumbel noise, and only the row statistics (max, log l) are written. GUMBEL: reads the
    target statistics (m_t, l_t) from tst (3, N, H) and writes zbar into its third plane."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    hx = h % Hx
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    pair = offs_n.to(tl.int64) * H + h
    seed = _key(seed_ptr, NOISE)
    t = tl.load(t_ptr + pair, mask=n_ok, other=-1)
    m_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    l_t = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if TARGET == GUMBEL:
        m_t = tl.load(tst_ptr + pair, mask=n_ok, other=0.0)
        l_t = tl.load(tst_ptr + NH + pair, mask=n_ok, other=1.0)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # l_i's compensation
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_v q_v z_v
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    qsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    qbest = tl.full((BLOCK_N,), -1.0, dtype=tl.float32)
    zbest = tl.zeros((BLOCK_N,), dtype=tl.float32)  # logit of the (first) most probable class
    qd = tl.zeros((BLOCK_N,), dtype=tl.float32)  # GUMBEL: sum_v q_v (max - z_v), for the loss
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        if TARGET == TSTATS:
            z = _target_logits(x_ptr, w_ptr, seed, offs_n, offs_v, n_ok, v_ok, h, Hx, V, D, scale, noise_scale, NOISE,
                               BLOCK_N, BLOCK_V, BLOCK_K)
        else:
            z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                        BLOCK_V, BLOCK_K, PRECISION)
            q = _target_tile(q_ptr, pair, t, offs_n, offs_v, n_ok, v_ok, h, V, y_ptr, c_ptr, seed, Hy, Dt, tgt_scale,
                             noise_scale, m_t, l_t, TARGET, NOISE, BLOCK_N, BLOCK_V, BLOCK_KT)
            zv = tl.where(v_ok[None, :], z, 0.0)
            zy += tl.sum(q * zv, axis=1)
            q_sum_tile = tl.sum(q, axis=1)
            qsum += q_sum_tile
            q_tile = tl.max(tl.where(v_ok[None, :], q, -1.0), axis=1)
            at = tl.argmax(tl.where(v_ok[None, :], q, -1.0), axis=1)
            better = q_tile > qbest
            zbest = tl.where(better,
                             tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == at[:, None], zv, 0.0), axis=1), zbest)
            qbest = tl.where(better, q_tile, qbest)
            zsum += tl.sum(zv, axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile has a class
        if TARGET == GUMBEL:  # terms >= 0, the earlier ones moved to the new max
            qd += (qsum - q_sum_tile) * (m_new - tl.where(m_i > float("-inf"), m_i, m_new))
            qd += tl.sum(q * tl.where(v_ok[None, :], m_new[:, None] - zv, 0.0), axis=1)
        alpha = tl.exp(m_i - m_new)
        l_i, c_i = add_compensated(l_i * alpha, c_i * alpha, tl.sum(tl.exp(z - m_new[:, None]), axis=1))
        m_i = m_new
    log_l = log_denominator(l_i, c_i)
    if TARGET == TSTATS:  # the target statistics: max and denominator (row_denominator)
        tl.store(max_ptr + pair, m_i, mask=n_ok)
        tl.store(log_l_ptr + pair, l_i - c_i, mask=n_ok)
    else:
        if TARGET == GUMBEL:  # row_loss_xent, xent = sum_v q_v ((m - z_v) + log l) from terms >= 0
            loss = (1.0 - eps) * (qd + qsum * log_l) + eps * log_l + eps * (m_i - zsum / V)
        else:
            # lse expanded as in csrc/masked_prediction.h row_loss: exact for a hard label at the maximum
            loss = (1.0 - eps) * ((qsum * m_i - zy) + qsum * log_l) + eps * log_l + eps * (m_i - zsum / V)
        if TARGET == HARD:
            valid = t >= 0
        else:
            valid = n_ok
        tl.store(loss_ptr + pair, tl.where(valid, loss, 0.0), mask=n_ok)
        tl.store(max_ptr + pair, m_i, mask=n_ok)
        tl.store(log_l_ptr + pair, log_l, mask=n_ok)
        tl.store(mass_ptr + pair, (1.0 - eps) * qsum + eps, mask=n_ok)
        tl.store(top_ptr + pair, (valid & (zbest >= m_i)).to(tl.int8), mask=n_ok)
        if TARGET == GUMBEL:  # zbar = sum_v q_v z_v / sum_v q_v
            tl.store(tst_ptr + NH + NH + pair, zy / tl.where(qsum > 0.0, qsum, 1.0), mask=n_ok)


@triton.jit
def _dx_kernel(x_ptr, w_ptr, b_ptr, t_ptr, q_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, gmax_ptr, dx_ptr, dq_ptr, y_ptr,
               c_ptr, seed_ptr, tst_ptr, dy_ptr, N, H, Hx, V, D, Hy, Dt, NH, scale, eps, tgt_scale, noise_scale,
               HAS_BIAS: tl.constexpr, TARGET: tl.constexpr, NOISE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr):
    """Also writes dq (soft targets) from the pid_d == 0 programs: g * (1 - eps) * (lse - z),
    lse - z summed as (max - z) + log l; and (GUMBEL) from the programs pid_d < cdiv(Dt,
    BLOCK_DT) columns pid_d * BLOCK_DT + [0, BLOCK_DT) of dy per head, dy (N, H, Dt): dt @ c."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    hx = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D
    eps_over_v = eps / V
    seed = _key(seed_ptr, NOISE)
    if TARGET == GUMBEL:
        offs_dt, dt_ok, do_dt = _target_columns(pid_d, Dt, BLOCK_DT)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # x shared by every head (Hx = 1): this program sums all H heads; else just head hx
    # (not software-pipelined: each step is a whole sweep over V; with V and D specialised to 1
    # the inner loops vanish and prefetching whole heads of tiles spilled)
    for i in tl.range(0, H // Hx, num_stages=1):
        h = hx + i
        pair = offs_n.to(tl.int64) * H + h
        t, row_max, log_l, mass, g, m_t, l_t, zbar = _row_grad_state(t_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr,
                                                                          tst_ptr, NH, pair, n_ok, TARGET)
        if TARGET == GUMBEL:
            acc_t = tl.zeros((BLOCK_N, BLOCK_DT), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_ok = offs_v < V
            z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                        BLOCK_V, BLOCK_K, PRECISION)
            if TARGET == SOFT:  # dq first: z is dead once ds is formed (fewer tiles live at once)
                if pid_d == 0:
                    dq = (g * tl.load(gmax_ptr))[:, None] * (1.0 - eps) * ((row_max[:, None] - z) + log_l[:, None])
                    tl.store(dq_ptr + pair[:, None] * V + offs_v[None, :], dq, mask=n_ok[:, None] & v_ok[None, :])
            q = _target_tile(q_ptr, pair, t, offs_n, offs_v, n_ok, v_ok, h, V, y_ptr, c_ptr, seed, Hy, Dt, tgt_scale,
                             noise_scale, m_t, l_t, TARGET, NOISE, BLOCK_N, BLOCK_V, BLOCK_KT)
            if TARGET == GUMBEL:
                if do_dt:
                    dtl = _dtarget(z, zbar, g, q, eps)
                    cv = tl.load(c_ptr + (h.to(tl.int64) * V + offs_v.to(tl.int64))[:, None] * Dt + offs_dt[None, :],
                                 mask=v_ok[:, None] & dt_ok[None, :], other=0.0)
                    acc_t = tl.dot(dtl, cv, acc_t, input_precision="ieee")
            ds = _dlogits(z, row_max, log_l, g, q, mass, v_ok, n_ok, eps, eps_over_v)
            w = tl.load(w_ptr + (h.to(tl.int64) * V + offs_v.to(tl.int64))[:, None] * D + offs_dv[None, :],
                        mask=v_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = tl.dot(ds.to(w.dtype), w, acc, input_precision=PRECISION)
        if TARGET == GUMBEL:
            if do_dt:
                tl.store(dy_ptr + pair[:, None] * Dt + offs_dt[None, :], acc_t * (tgt_scale * tl.load(gmax_ptr)),
                         mask=n_ok[:, None] & dt_ok[None, :])
    out = dx_ptr + (offs_n.to(tl.int64) * Hx + hx)[:, None] * D + offs_dv[None, :]
    tl.store(out, acc * (scale * tl.load(gmax_ptr)), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _dw_kernel(x_ptr, w_ptr, b_ptr, t_ptr, q_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr, gmax_ptr, dw_ptr, db_ptr, y_ptr,
               c_ptr, seed_ptr, tst_ptr, dc_ptr, N, H, Hx, V, D, Hy, Dt, NH, scale, eps, tgt_scale, noise_scale,
               HAS_BIAS: tl.constexpr, TARGET: tl.constexpr, NOISE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr):
    """Also (GUMBEL) dc (H, V, Dt) = dt^T @ y, columns pid_d * BLOCK_DT + [0, BLOCK_DT)."""
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    h = tl.program_id(2)
    hx = h % Hx
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D
    eps_over_v = eps / V
    seed = _key(seed_ptr, NOISE)
    if TARGET == GUMBEL:
        offs_dt, dt_ok, do_dt = _target_columns(pid_d, Dt, BLOCK_DT)
        acc_t = tl.zeros((BLOCK_V, BLOCK_DT), dtype=tl.float32)
    acc = tl.zeros((BLOCK_V, BLOCK_DV), dtype=tl.float32)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        pair = offs_n.to(tl.int64) * H + h
        t, row_max, log_l, mass, g, m_t, l_t, zbar = _row_grad_state(t_ptr, max_ptr, log_l_ptr, mass_ptr, g_ptr,
                                                                          tst_ptr, NH, pair, n_ok, TARGET)
        z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                    BLOCK_V, BLOCK_K, PRECISION)
        q = _target_tile(q_ptr, pair, t, offs_n, offs_v, n_ok, v_ok, h, V, y_ptr, c_ptr, seed, Hy, Dt, tgt_scale,
                         noise_scale, m_t, l_t, TARGET, NOISE, BLOCK_N, BLOCK_V, BLOCK_KT)
        if TARGET == GUMBEL:
            if do_dt:
                dtl = _dtarget(z, zbar, g, q, eps)
                yv = tl.load(y_ptr + (offs_n.to(tl.int64) * Hy + h % Hy)[:, None] * Dt + offs_dt[None, :],
                             mask=n_ok[:, None] & dt_ok[None, :], other=0.0)
                acc_t = tl.dot(tl.trans(dtl), yv, acc_t, input_precision="ieee")
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
    if TARGET == GUMBEL:
        if do_dt:
            tl.store(dc_ptr + (h.to(tl.int64) * V + offs_v.to(tl.int64))[:, None] * Dt + offs_dt[None, :],
                     acc_t * (tgt_scale * gmax), mask=v_ok[:, None] & dt_ok[None, :])


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


def gumbel_grad_config(d: int, dtype: torch.dtype) -> dict:
    """Tiles of the dX / dW kernels in GUMBEL mode: besides the logit tile they hold the target
    logits' tile (an fp32 FMA dot), its Gumbel noise (Philox words, fp64 logs) and the dY / dC
    products (fp32 FMA dots over the tile's classes / rows). With the tiles of ``config``
    (64 x 64 at 8 warps for fp16 / bf16, 32 x 32 at 4 warps for fp32) they reached 255 registers
    and spilled 8-280 B (sm_80 / sm_90); 16 x 32 tiles at 4 warps (4 values per thread), 32
    gradient columns per program, one stage (64 columns, or two stages, with the target tile's
    FMA dot: 24 B of stack, bf16, D = 1024, sm_90)."""
    cfg = config(d, dtype)
    return dict(cfg, BLOCK_N=16, BLOCK_V=32, BLOCK_DV=min(32, cfg["BLOCK_DV"]), num_warps=4, num_stages=1)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


# BiRQ (GUMBEL): the target logits' K chunk (y and c are fp32: FMA-unit dots, as the fp32
# config's BLOCK_K) and the dY / dC columns per program.
BLOCK_KT, BLOCK_DT = 8, 16


def _launch(x, w, bias, tgt, q, grad, scale, eps, mode, outs, gum=None):
    """The forward and, given grad, the gradient kernels in target mode ``mode``; outs =
    (loss, stats, mass, top, dx, dw, db, dq); gum (GUMBEL) = dict(y, c, seed_t, tst, dy, dc,
    tgt_scale, noise_scale). Unused pointers are valid tensors never read."""
    n, hx, d = x.shape
    h, v, _ = w.shape
    loss, stats, mass, top, dx, dw, db, dq = outs
    cfg = config(d, x.dtype)
    b = bias if bias is not None else w  # a valid pointer, never read without HAS_BIAS
    if gum is None:
        noise, hy, dt, tgt_scale, noise_scale = False, 1, 1, 0.0, 0.0
        y = c = seed_t = tst = dy = dc = loss
    else:
        y, c, seed_t, tst, dy, dc = (gum[k] for k in ("y", "c", "seed_t", "tst", "dy", "dc"))
        hy, dt = y.shape[1], y.shape[2]
        tgt_scale, noise_scale = float(gum["tgt_scale"]), float(gum["noise_scale"])
        noise = noise_scale != 0.0
    nh = n * h
    if gum is not None:
        # the loss pass holds the target tile (an FMA dot over Dt, its noise) beside the logit
        # tile: 32 x 32 tiles at 4 warps for every dtype (fp16 / bf16's 64 x 64 at 8 warps: 80-168 B
        # of stack on sm_80 / sm_90)
        cfg = dict(cfg, BLOCK_N=32, BLOCK_V=32, num_warps=4, num_stages=2)
    common = dict(HAS_BIAS=bias is not None, TARGET=mode, NOISE=noise, BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], BLOCK_KT=BLOCK_KT, PRECISION=_precision(x),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    birq = (hy, dt, nh, float(scale), float(eps), tgt_scale, noise_scale)
    _forward_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), h)](
        x, w, b, tgt, q, loss, stats[0], stats[1], mass, top.view(torch.int8), y, c, seed_t, tst, n, h, hx, v, d,
        *birq, **common)
    if grad is None:
        return
    if gum is not None:
        cfg = gumbel_grad_config(d, x.dtype)
        common.update(BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
                      num_stages=cfg["num_stages"])
    gmax = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    g = (grad / gmax).contiguous()
    n_dblk = triton.cdiv(d, cfg["BLOCK_DV"])
    if gum is not None:  # the dY / dC columns ride in the first programs of each row / class block
        n_dblk = max(n_dblk, triton.cdiv(dt, BLOCK_DT))
    tiles = dict(BLOCK_DV=cfg["BLOCK_DV"], BLOCK_DT=BLOCK_DT)
    _dx_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), n_dblk, hx)](
        x, w, b, tgt, q, stats[0], stats[1], mass, g, gmax, dx, dq if dq is not None else dx, y, c, seed_t, tst, dy,
        n, h, hx, v, d, *birq, **tiles, **common)
    _dw_kernel[(triton.cdiv(v, cfg["BLOCK_V"]), n_dblk, h)](
        x, w, b, tgt, q, stats[0], stats[1], mass, g, gmax, dw, db if db is not None else dw, y, c, seed_t, tst, dc,
        n, h, hx, v, d, *birq, **tiles, **common)


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
    tgt, q = (loss, targets) if soft else (targets, loss)  # a valid pointer for the unused one
    _launch(x, w, bias, tgt, q, grad, scale, eps, SOFT if soft else HARD, (loss, stats, mass, top, dx, dw, db, dq))
    return loss, stats, top, dx, dw, db, dq


def core_gumbel(x, w, bias, y, c, seed_t, tgt_scale, noise_scale, grad, scale, eps, want_rows=True):
    """BiRQ's masked-prediction core: the soft-target core of ``core`` with the targets
    ``q = softmax_v(tgt_scale <y[n, h % Hy], c[h, v]> + noise_scale G(n, h*V + v))`` made tile by
    tile and never stored (the contract: csrc/masked_prediction.h "BiRQ",
    sslfast.reference.masked_prediction.gumbel_target_logits).

    x (N, Hx, D) fp32/fp16 (bf16 on a GPU), w (H, V, D) x's dtype, bias (H, V) or None; y (N, Hy,
    Dt) and c (H, V, Dt) fp32, already L2-normalised; Hx, Hy in {1, H}; all contiguous, on one
    device. seed_t: (1,) int64 tensor, the Philox key (read on the device); noise_scale == 0
    draws no noise. grad: (N, H) fp32 per-row weights or None. Returns (loss (N, H), stats (2, N,
    H) [max, log l of z], top (N, H) bool, dx (N, Hx, D), dw (H, V, D), db (H, V) | None, dy (N,
    Hy, Dt), dc (H, V, Dt)), all fp32, the gradients (of sum g * loss) None without grad.
    Scratch: O(N H) row statistics, plus (N, H, Dt) for dy when Hy = 1 < H (summed over heads
    here, in a fixed order). want_rows is accepted for the contract; the rows are always
    written (the gradient kernels read the statistics)."""
    n, hx, d = x.shape
    h, v, _ = w.shape
    hy, dt = y.shape[1], y.shape[2]
    f32 = dict(dtype=torch.float32, device=x.device)
    loss = torch.empty(n, h, **f32)
    stats = torch.empty(2, n, h, **f32)
    mass = torch.empty(n, h, **f32)
    top = torch.empty(n, h, dtype=torch.bool, device=x.device)
    dx = dw = db = dy = dc = dy_heads = None
    if grad is not None:
        dx = torch.zeros(n, hx, d, **f32)
        dw = torch.zeros(h, v, d, **f32)
        db = torch.zeros(h, v, **f32) if bias is not None else None
        dy = torch.zeros(n, hy, dt, **f32)
        dc = torch.zeros(h, v, dt, **f32)
        dy_heads = dy if hy == h else torch.zeros(n, h, dt, **f32)
    if n == 0:
        return loss, stats, top, dx, dw, db, dy, dc
    tst = torch.empty(3, n, h, **f32)  # the target logits' max and denominator, each row's zbar
    noise_scale, tgt_scale = float(noise_scale), float(tgt_scale)
    gum = dict(y=y, c=c, seed_t=seed_t, tst=tst, dy=dy_heads if dy_heads is not None else loss,
               dc=dc if dc is not None else loss, tgt_scale=tgt_scale, noise_scale=noise_scale)
    # pass 1: target statistics, the online log-sum-exp of the target logits (fp32 tiles)
    tc = config(dt, torch.float32)
    _forward_kernel[(triton.cdiv(n, tc["BLOCK_N"]), h)](
        y, c, c, loss, loss, loss, tst[0], tst[1], loss, loss, y, c, seed_t, tst, n, h, hy, v, dt, hy, dt, n * h,
        tgt_scale, 0.0, tgt_scale, noise_scale, HAS_BIAS=False, TARGET=TSTATS, NOISE=noise_scale != 0.0,
        BLOCK_N=tc["BLOCK_N"], BLOCK_V=tc["BLOCK_V"], BLOCK_K=BLOCK_KT, BLOCK_KT=BLOCK_KT, PRECISION="ieee",
        num_warps=tc["num_warps"], num_stages=tc["num_stages"])
    # pass 2 (loss, zbar) and the gradient passes
    _launch(x, w, bias, loss, loss, grad, scale, eps, GUMBEL, (loss, stats, mass, top, dx, dw, db, None), gum)
    if grad is not None and dy_heads is not dy:
        torch.sum(dy_heads, dim=1, keepdim=True, out=dy)  # y shared by the heads: a fixed-order sum
    return loss, stats, top, dx, dw, db, dy, dc
