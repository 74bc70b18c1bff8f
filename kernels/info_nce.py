"""Triton kernels of in-batch InfoNCE / NT-Xent (the core described in sslfast/ops/info_nce.py).

Rows A (M, D) against columns B (C, D), ``s_ij = scale * <A_i, B_j>``, row i's positive at
column ``(i + pos_shift) % pos_mod``, column ``j == i`` dropped when ``EXCLUDE_SELF``.

* ``_forward_kernel``: program ``pid_m`` owns BLOCK_M rows and walks every BLOCK_N-column
  tile with an online log-sum-exp; it writes the per-row loss and lse (nothing M x C).
* ``_backward_kernel``: program (``pid_x``, ``pid_d``) owns BLOCK_X rows of one side and
  BLOCK_DV feature columns of its gradient; it walks the other side tile by tile,
  recomputing the scores from the saved lse (flash-attention style) and accumulating
  ``dS @ Y``. Run once with the rows as X (dA) and once with the columns as X (dB): no
  atomics, deterministic.

Scores accumulate in fp32 (``tl.dot``); fp32 inputs are multiplied in IEEE fp32 (no TF32),
fp16/bf16 inputs on tensor cores, with dS rounded to the input dtype for the second
product as flash-attention does. Everything runs under ``TRITON_INTERPRET=1`` (fp32/fp16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compensated import add_compensated, log_denominator

# Integer arguments that are not specialised (an int equal to 1 becomes a compile-time
# constant, a multiple of 16 another specialisation): row counts and the positive's shift
# and modulus. D stays specialised: 16-aligned rows give vector loads.
_COUNTS = ("M", "C", "pos_shift", "pos_mod", "n_x", "n_y")


@triton.jit
def _scores(a_ptr, b_ptr, offs_a, offs_b, a_ok, b_ok, D, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """<a_i, b_j> for a tile of rows of A and of B, fp32, looping over D in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    a_rows = offs_a.to(tl.int64)[:, None] * D
    b_rows = offs_b.to(tl.int64)[:, None] * D
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(a_ptr + a_rows + offs_k[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=_COUNTS)
def _forward_kernel(a_ptr, b_ptr, scale_ptr, loss_ptr, max_ptr, log_l_ptr, M, C, D, pos_shift, pos_mod,
                    EXCLUDE_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    scale = tl.load(scale_ptr)
    pos_col = (offs_m + pos_shift) % pos_mod
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # l_i's compensation
    pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < C
        s = _scores(a_ptr, b_ptr, offs_m, offs_n, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale
        candidate = col_ok[None, :] & (offs_m[:, None] >= 0)
        if EXCLUDE_SELF:
            candidate = candidate & (offs_m[:, None] != offs_n[None, :])
        s = tl.where(candidate, s, float("-inf"))
        pos_i += tl.sum(tl.where(offs_n[None, :] == pos_col[:, None], s, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row whose candidates so far are all excluded keeps m = -inf; shift by 0 instead
        # so that exp(-inf - -inf) never makes a NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        l_i, c_i = add_compensated(l_i * alpha, c_i * alpha, tl.sum(tl.exp(s - m_safe[:, None]), axis=1))
        m_i = m_new
    log_l = log_denominator(l_i, c_i)
    # lse = m + log l saved in its two parts (csrc/info_nce.h: their fp32 sum loses ulp(lse))
    tl.store(max_ptr + offs_m, m_i, mask=row_ok)
    tl.store(log_l_ptr + offs_m, log_l, mask=row_ok)
    # (m - pos) + log(l), not lse - pos: exact when the positive is the maximum (csrc/info_nce.h)
    tl.store(loss_ptr + offs_m, (m_i - pos_i) + log_l, mask=row_ok)


@triton.jit(do_not_specialize=_COUNTS)
def _backward_kernel(x_ptr, y_ptr, scale_ptr, gmax_ptr, max_ptr, log_l_ptr, g_ptr, dx_ptr, n_x, n_y, D, pos_shift,
                     pos_mod,
                     COL_SIDE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, BLOCK_X: tl.constexpr,
                     BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                     PRECISION: tl.constexpr):
    """dX[x, dv-block] = scale * sum_y dS(row, col) Y[y, dv-block]; X is the row side (dA) or,
    with COL_SIDE, the column side (dB); the row statistics (max, log l) and g are always
    indexed by the row. g arrives
    divided by gmax = max |g|, so dS stays in [-1, 1] when it is rounded to fp16 (with a
    mean over N rows, g = 1/N and g * p would underflow fp16 at N in the thousands)."""
    pid_x = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = offs_x < n_x
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D
    scale = tl.load(scale_ptr)
    if not COL_SIDE:
        max_x = tl.load(max_ptr + offs_x, mask=x_ok, other=0.0)
        log_l_x = tl.load(log_l_ptr + offs_x, mask=x_ok, other=0.0)
        g_x = tl.load(g_ptr + offs_x, mask=x_ok, other=0.0)
    acc = tl.zeros((BLOCK_X, BLOCK_DV), dtype=tl.float32)
    for y0 in range(0, n_y, BLOCK_Y):
        offs_y = y0 + tl.arange(0, BLOCK_Y)
        y_ok = offs_y < n_y
        s = _scores(x_ptr, y_ptr, offs_x, offs_y, x_ok, y_ok, D, BLOCK_X, BLOCK_Y, BLOCK_K, PRECISION) * scale
        if COL_SIDE:
            rows = offs_y[None, :]
            cols = offs_x[:, None]
            row_max = tl.load(max_ptr + offs_y, mask=y_ok, other=0.0)[None, :]
            log_l = tl.load(log_l_ptr + offs_y, mask=y_ok, other=0.0)[None, :]
            g = tl.load(g_ptr + offs_y, mask=y_ok, other=0.0)[None, :]
        else:
            rows = offs_x[:, None]
            cols = offs_y[None, :]
            row_max = max_x[:, None]
            log_l = log_l_x[:, None]
            g = g_x[:, None]
        candidate = x_ok[:, None] & y_ok[None, :]
        if EXCLUDE_SELF:
            candidate = candidate & (rows != cols)
        onehot = tl.where(cols == (rows + pos_shift) % pos_mod, 1.0, 0.0)
        ds = tl.where(candidate, g * (tl.exp((s - row_max) - log_l) - onehot), 0.0)
        y = tl.load(y_ptr + offs_y.to(tl.int64)[:, None] * D + offs_dv[None, :],
                    mask=y_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(ds.to(y.dtype), y, acc, input_precision=PRECISION)
    out = dx_ptr + offs_x.to(tl.int64)[:, None] * D + offs_dv[None, :]
    tl.store(out, acc * (scale * tl.load(gmax_ptr)), mask=x_ok[:, None] & dv_ok[None, :])


def _config(a: torch.Tensor, d: int) -> dict:
    """Tiles by dtype and width only, never by device: the interpreter tier runs the tiles a
    GPU runs. BLOCK: the rows of a program and the forward's column tiles (the online
    log-sum-exp's grouping, so it sets the loss's rounding); BLOCK_Y: the backward's tiles of
    the other side; BLOCK_K: the chunk of D per score product; BLOCK_DV: gradient columns."""
    if a.dtype == torch.float32:
        # fp32 products run on FMA units (IEEE, no tensor cores): each thread holds its rows
        # and columns of both operands over the whole BLOCK_K chunk, and ptxas spilled at
        # BLOCK_K = 64 (sm_80: forward 152 B, backward 312-384 B of stack at 255 registers;
        # sm_90: backward 16 B) and the backward's 64 x 64 dS tile beside a 64 x 128 gradient
        # tile. BLOCK_K = 16 and BLOCK_Y = 32 fit without spills on sm_80 (forward 128, backward
        # 206-214 registers); on sm_90 the column-side backward parks 16 B at ptxas's
        # 128-register step, outside the D loop (budgeted in tests/test_compile_triton.py).
        # The FMA lowering accumulates k in order into one accumulator per output, so the D
        # chunk and the backward's y tile do not change a compiled kernel's result bits;
        # BLOCK (the forward's column tiles) stays 64. A 64 x 256 gradient tile spilled about
        # 600 B on sm_90: BLOCK_DV stays at most 128.
        return dict(BLOCK=64, BLOCK_Y=32, BLOCK_K=16, BLOCK_DV=min(128, max(16, triton.next_power_of_2(d))),
                    num_warps=8)
    return dict(BLOCK=64, BLOCK_Y=64, BLOCK_K=64, BLOCK_DV=min(256, max(16, triton.next_power_of_2(d))),
                num_warps=8)


def _precision(a: torch.Tensor) -> str:
    return "ieee" if a.dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def forward(a, b, scale, pos_shift, pos_mod, exclude_self):
    """Per-row (loss (M,), stats (2, M): the max and log l, lse = their sum), fp32; a (M, D),
    b (C, D) contiguous, one dtype; scale 0-d fp32."""
    m, d = a.shape
    loss = torch.empty(m, dtype=torch.float32, device=a.device)
    stats = torch.empty(2, m, dtype=torch.float32, device=a.device)
    if m == 0:
        return loss, stats
    cfg = _config(a, d)
    grid = (triton.cdiv(m, cfg["BLOCK"]),)
    _forward_kernel[grid](a, b, scale, loss, stats[0], stats[1], m, b.shape[0], d, pos_shift, pos_mod,
                          EXCLUDE_SELF=exclude_self, BLOCK_M=cfg["BLOCK"], BLOCK_N=cfg["BLOCK"],
                          BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(a), num_warps=cfg["num_warps"])
    return loss, stats


def backward(a, b, scale, stats, grad, pos_shift, pos_mod, exclude_self, n_grad_cols):
    """(dA, dB) in fp32; rows of dB at or past n_grad_cols are zero."""
    m, d = a.shape
    da = torch.empty(m, d, dtype=torch.float32, device=a.device)
    db = torch.zeros(b.shape[0], d, dtype=torch.float32, device=a.device)
    if m == 0:
        return da, db
    cfg = _config(a, d)
    gmax = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    grad = grad / gmax
    for col_side, x, y, n_x, n_y, dx in ((False, a, b, m, b.shape[0], da), (True, b, a, n_grad_cols, m, db)):
        if n_x == 0:
            continue
        grid = (triton.cdiv(n_x, cfg["BLOCK"]), triton.cdiv(d, cfg["BLOCK_DV"]))
        _backward_kernel[grid](x, y, scale, gmax, stats[0], stats[1], grad, dx, n_x, n_y, d, pos_shift, pos_mod,
                               COL_SIDE=col_side, EXCLUDE_SELF=exclude_self, BLOCK_X=cfg["BLOCK"],
                               BLOCK_Y=cfg["BLOCK_Y"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DV=cfg["BLOCK_DV"],
                               PRECISION=_precision(a), num_warps=cfg["num_warps"])
    return da, db
