"""Triton kernels of the masked-prediction loss (the core described in
sslfast/ops/masked_prediction.py).

Per head h: rows x (N, Hx, D) (Hx = 1: every head reads the same row; Hx = H: one row per
head), class vectors W (H, V, D), bias (H, V); logits ``z = scale * <x, W_v> + b_v``; target
-1 marks an ignored row. Loss ``lse - (1 - eps) z_y - eps/V sum z``.

* ``_forward_kernel``: program (``pid_n``, ``h``) owns BLOCK_N rows of head h and walks V in
  BLOCK_V tiles with an online log-sum-exp; writes loss, lse and the top flag (nothing N x V).
* ``_dx_kernel``: program (``pid_n``, ``pid_d``, ``hx``) owns BLOCK_N rows and BLOCK_DV
  feature columns of dX; it walks the V tiles of its head(s) (all H when x is shared),
  recomputing the logits from the saved lse (the Cut Cross-Entropy backward) and
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
def _dlogits(z, lse, g, t, offs_v, v_ok, n_ok, eps, eps_over_v):
    """g * dloss/dz for a tile, 0 outside the valid rows and classes."""
    tgt = offs_v[None, :] == t[:, None]
    ok = n_ok[:, None] & v_ok[None, :]
    p = tl.exp(tl.where(ok, z, float("-inf")) - lse[:, None])  # padding classes never overflow
    ds = g[:, None] * (p - tl.where(tgt, 1.0 - eps, 0.0) - eps_over_v)
    return tl.where(ok, ds, 0.0)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, t_ptr, loss_ptr, lse_ptr, top_ptr, N, H, Hx, V, D, scale, eps,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    hx = h % Hx
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    pair = offs_n.to(tl.int64) * H + h
    t = tl.load(t_ptr + pair, mask=n_ok, other=-1)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                    BLOCK_V, BLOCK_K, PRECISION)
        zy += tl.sum(tl.where(offs_v[None, :] == t[:, None], z, 0.0), axis=1)
        zsum += tl.sum(tl.where(v_ok[None, :], z, 0.0), axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile has a class
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    loss = lse - (1.0 - eps) * zy - (eps / V) * zsum
    valid = t >= 0
    tl.store(loss_ptr + pair, tl.where(valid, loss, 0.0), mask=n_ok)
    tl.store(lse_ptr + pair, lse, mask=n_ok)
    tl.store(top_ptr + pair, (valid & (zy >= m_i)).to(tl.int8), mask=n_ok)


@triton.jit
def _dx_kernel(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, gmax_ptr, dx_ptr, N, H, Hx, V, D, scale, eps,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
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
    for i in range(0, H // Hx):
        h = hx + i
        pair = offs_n.to(tl.int64) * H + h
        t = tl.load(t_ptr + pair, mask=n_ok, other=-1)
        lse = tl.load(lse_ptr + pair, mask=n_ok, other=0.0)
        g = tl.where(t >= 0, tl.load(g_ptr + pair, mask=n_ok, other=0.0), 0.0)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_ok = offs_v < V
            z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                        BLOCK_V, BLOCK_K, PRECISION)
            ds = _dlogits(z, lse, g, t, offs_v, v_ok, n_ok, eps, eps_over_v)
            w = tl.load(w_ptr + (h.to(tl.int64) * V + offs_v.to(tl.int64))[:, None] * D + offs_dv[None, :],
                        mask=v_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = tl.dot(ds.to(w.dtype), w, acc, input_precision=PRECISION)
    out = dx_ptr + (offs_n.to(tl.int64) * Hx + hx)[:, None] * D + offs_dv[None, :]
    tl.store(out, acc * (scale * tl.load(gmax_ptr)), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _dw_kernel(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, gmax_ptr, dw_ptr, db_ptr, N, H, Hx, V, D, scale, eps,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
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
        t = tl.load(t_ptr + pair, mask=n_ok, other=-1)
        lse = tl.load(lse_ptr + pair, mask=n_ok, other=0.0)
        g = tl.where(t >= 0, tl.load(g_ptr + pair, mask=n_ok, other=0.0), 0.0)
        z = _logits(x_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, h, hx, Hx, V, D, scale, HAS_BIAS, BLOCK_N,
                    BLOCK_V, BLOCK_K, PRECISION)
        ds = _dlogits(z, lse, g, t, offs_v, v_ok, n_ok, eps, eps_over_v)
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


def config(d: int) -> dict:
    """Tile sizes: the GPU's, also used under the interpreter (tests run them at small shapes)."""
    return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=64, BLOCK_DV=min(128, max(16, triton.next_power_of_2(d))),
                num_warps=8)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def core(x, w, bias, targets, grad, scale, eps, want_rows=True):
    """The backend contract of sslfast/ops/masked_prediction.py (see there)."""
    n, hx, d = x.shape
    h, v, _ = w.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    loss = torch.empty(n, h, **f32)
    lse = torch.empty(n, h, **f32)
    top = torch.empty(n, h, dtype=torch.bool, device=x.device)
    dx = dw = db = None
    if grad is not None:
        dx = torch.zeros(n, hx, d, **f32)
        dw = torch.zeros(h, v, d, **f32)
        db = torch.zeros(h, v, **f32) if bias is not None else None
    if n == 0:
        return loss, lse, top, dx, dw, db
    cfg = config(d)
    common = dict(HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                  BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(x), num_warps=cfg["num_warps"])
    b = bias if bias is not None else w  # a valid pointer, never read without HAS_BIAS
    _forward_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), h)](
        x, w, b, targets, loss, lse, top.view(torch.int8), n, h, hx, v, d, float(scale), float(eps), **common)
    if grad is None:
        return loss, lse, top, dx, dw, db
    gmax = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    g = (grad / gmax).contiguous()
    n_dblk = triton.cdiv(d, cfg["BLOCK_DV"])
    _dx_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), n_dblk, hx)](
        x, w, b, targets, lse, g, gmax, dx, n, h, hx, v, d, float(scale), float(eps), BLOCK_DV=cfg["BLOCK_DV"],
        **common)
    _dw_kernel[(triton.cdiv(v, cfg["BLOCK_V"]), n_dblk, h)](
        x, w, b, targets, lse, g, gmax, dw, db if db is not None else dw, n, h, hx, v, d, float(scale), float(eps),
        BLOCK_DV=cfg["BLOCK_DV"], **common)
    return loss, lse, top, dx, dw, db
