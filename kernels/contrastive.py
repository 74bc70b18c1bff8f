"""Triton kernels of the wav2vec 2.0 contrastive loss (spec: sslfast/reference/contrastive.py).

Three kernels, one program per row each; none builds the (N, K+1, D) candidates:

* ``_forward_kernel``: program ``row`` loads x[row] and its positive once, then streams the
  K negatives in tiles of BLOCK_K gathered rows of y (BLOCK_K x BLOCK_D), with an online
  log-sum-exp. Writes the row loss, its lse's two parts (max, log s: saved for backward, kept
  apart as csrc/contrastive.h RowStats explains) and fairseq's correct flag.
* ``_backward_rows_kernel``: program ``row`` recomputes the logits tile by tile, turns each
  into the coefficients (alpha, beta) of csrc/contrastive.h (grad t_k += alpha x + beta t_k),
  accumulates grad x[row] in registers, and either atomically adds into an fp32 grad y
  (ATOMIC, the default on GPU) or stores alpha and beta for the segmented pass.
* ``_segments_kernel``: program ``j`` sums alpha_e * x[row(e)] over the candidates that point
  at y[j] (a CSR built by the caller) plus (sum beta_e) * y[j]: deterministic grad y.

BLOCK_D covers D in one tile (next power of two), so a row is read once per candidate.
Divisions use ``div_rn`` (IEEE, as torch and the C++/CUDA kernels) so fp16/bf16 roundings of the
logits agree across backends. Runs under TRITON_INTERPRET=1 (fp32 atomics only there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compensated import add_compensated, log_denominator

NORM_EPS = 1e-8
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Integer arguments that are not specialised (an int equal to 1 becomes a compile-time
# constant, a multiple of 16 another specialisation): counts used in loop bounds and
# divisions only. D stays specialised: 16-aligned rows give vector loads.
_COUNTS = ("M", "K", "K1")


@triton.jit
def _round(v, ROUND: tl.constexpr):
    """v rounded to the storage dtype and back (identity for fp32)."""
    if ROUND == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _logit(cos, temperature, PRECISION: tl.constexpr, ROUND: tl.constexpr):
    """fairseq (0): round(cos / t); Hugging Face (1): round(round(cos) / t)."""
    if PRECISION == 0:
        return _round(tl.math.div_rn(cos, temperature), ROUND)
    return _round(tl.math.div_rn(_round(cos, ROUND), temperature), ROUND)


@triton.jit
def _clamped_norm(sq, eps):
    return tl.maximum(tl.sqrt_rn(sq), eps)


@triton.jit
def _negative_tile(y_ptr, neg_ptr, row, k0, x, p, jp, nx, M, D, K, temperature, eps,
                   NEG_MODE: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Negatives k0 .. k0+BLOCK_K of one row: their indices, rows, cosines, squared norms,
    logits (-inf where masked or past K) and the validity mask."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_valid = offs_k < K
    d_valid = offs_d < D
    j = tl.load(neg_ptr + row * K + offs_k, mask=k_valid, other=0).to(tl.int64)
    j = tl.minimum(tl.maximum(j, 0), M - 1)  # indices were checked in Python; never read outside y
    t = tl.load(y_ptr + j[:, None] * D + offs_d[None, :], mask=k_valid[:, None] & d_valid[None, :],
                other=0.0).to(tl.float32)
    dot = tl.sum(t * x[None, :], axis=1)
    tsq = tl.sum(t * t, axis=1)
    cos = tl.math.div_rn(dot, nx * _clamped_norm(tsq, eps))
    logit = _logit(cos, temperature, PRECISION, ROUND)
    if NEG_MODE == 1:  # whole stored vector equal to the positive's
        # "any element differs" as a max: an integer sum of the comparison is lowered by LLVM
        # to a bit mask built through an 8-byte stack array (sm_90, fp32, D = 768/1024: 8 B of
        # stack); a float count made ptxas park a predicate on the stack instead (sm_80, D = 3)
        differ = tl.max(tl.where(d_valid[None, :] & (t != p[None, :]), 1, 0), axis=1)
        logit = tl.where(differ == 0, float("-inf"), logit)
    elif NEG_MODE == 2:
        logit = tl.where(j == jp, float("-inf"), logit)
    logit = tl.where(k_valid, logit, float("-inf"))
    return j, t, cos, tsq, logit, k_valid


@triton.jit
def _row_setup(x_ptr, y_ptr, pos_ptr, row, M, D, HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    x = tl.load(x_ptr + row * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    if HAS_POS:
        jp = tl.load(pos_ptr + row).to(tl.int64)
    else:
        jp = row
    jp = tl.minimum(tl.maximum(jp, 0), M - 1)
    p = tl.load(y_ptr + jp * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    return x, p, jp


@triton.jit(do_not_specialize=_COUNTS)
def _forward_kernel(x_ptr, y_ptr, neg_ptr, pos_ptr, loss_ptr, stats_ptr, correct_ptr,
                    M, D, K, temperature, eps,
                    HAS_POS: tl.constexpr, NEG_MODE: tl.constexpr, PRECISION: tl.constexpr,
                    ROUND: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x, p, jp = _row_setup(x_ptr, y_ptr, pos_ptr, row, M, D, HAS_POS, BLOCK_D)
    nx = _clamped_norm(tl.sum(x * x, axis=0), eps)
    cos0 = tl.math.div_rn(tl.sum(x * p, axis=0), nx * _clamped_norm(tl.sum(p * p, axis=0), eps))
    logit0 = _logit(cos0, temperature, PRECISION, ROUND)
    m = logit0
    s = logit0 * 0.0 + 1.0
    c = logit0 * 0.0  # s's compensation
    max_neg = logit0 * 0.0 + float("-inf")
    min_neg = logit0 * 0.0 + float("inf")
    for k0 in range(0, K, BLOCK_K):
        j, t, cos, tsq, logit, k_valid = _negative_tile(y_ptr, neg_ptr, row, k0, x, p, jp, nx, M, D, K,
                                                        temperature, eps, NEG_MODE, PRECISION, ROUND,
                                                        BLOCK_K, BLOCK_D)
        max_neg = tl.maximum(max_neg, tl.max(logit, axis=0))
        min_neg = tl.minimum(min_neg, tl.min(tl.where(k_valid, logit, float("inf")), axis=0))
        m_new = tl.maximum(m, tl.max(logit, axis=0))  # finite: m starts at logit0
        alpha = tl.exp(m - m_new)
        s, c = add_compensated(s * alpha, c * alpha, tl.sum(tl.exp(logit - m_new), axis=0))
        m = m_new
    log_s = log_denominator(s, c)
    tl.store(loss_ptr + row, (m - logit0) + log_s)  # not lse - logit0: see csrc/contrastive.h row_loss
    # lse's two parts (csrc/contrastive.h RowStats): m at [row], log s at [N + row]; grid = (N,)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + tl.num_programs(0) + row, log_s)
    # fairseq's accuracy: argmax is 0 (first maximum) and argmin is not 0 (first minimum)
    tl.store(correct_ptr + row, ((logit0 >= max_neg) & (min_neg < logit0)).to(tl.int8))


@triton.jit(do_not_specialize=_COUNTS)
def _backward_rows_kernel(grad_rows_ptr, x_ptr, y_ptr, neg_ptr, pos_ptr, stats_ptr, gx_ptr, alpha_ptr, beta_ptr,
                          gy_acc_ptr, M, D, K, temperature, eps,
                          HAS_POS: tl.constexpr, NEG_MODE: tl.constexpr, PRECISION: tl.constexpr,
                          ROUND: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    x, p, jp = _row_setup(x_ptr, y_ptr, pos_ptr, row, M, D, HAS_POS, BLOCK_D)
    go = tl.load(grad_rows_ptr + row)
    row_max = tl.load(stats_ptr + row)
    log_s = tl.load(stats_ptr + tl.num_programs(0) + row)
    nx_sq = tl.sum(x * x, axis=0)
    nx = _clamped_norm(nx_sq, eps)
    # the positive (slot 0): d loss / d logit0 = p0 - 1
    psq = tl.sum(p * p, axis=0)
    np_ = _clamped_norm(psq, eps)
    cos0 = tl.math.div_rn(tl.sum(x * p, axis=0), nx * np_)
    logit0 = _logit(cos0, temperature, PRECISION, ROUND)
    g0 = go * (tl.exp((logit0 - row_max) - log_s) - 1.0) / temperature
    alpha0 = g0 / (nx * np_)
    beta0 = tl.where(tl.sqrt_rn(psq) >= eps, -g0 * cos0 / (np_ * np_), 0.0)
    gx = alpha0 * p
    sum_gc = g0 * cos0
    K1 = K + 1
    if ATOMIC:
        tl.atomic_add(gy_acc_ptr + jp * D + offs_d, alpha0 * x + beta0 * p, mask=d_valid)
    else:
        tl.store(alpha_ptr + row * K1, alpha0)
        tl.store(beta_ptr + row * K1, beta0)
    for k0 in range(0, K, BLOCK_K):
        j, t, cos, tsq, logit, k_valid = _negative_tile(y_ptr, neg_ptr, row, k0, x, p, jp, nx, M, D, K,
                                                        temperature, eps, NEG_MODE, PRECISION, ROUND,
                                                        BLOCK_K, BLOCK_D)
        g = go * tl.exp((logit - row_max) - log_s) / temperature  # 0 where masked (-inf)
        nt = _clamped_norm(tsq, eps)
        alpha = g / (nx * nt)
        beta = tl.where(tl.sqrt_rn(tsq) >= eps, -g * cos / (nt * nt), 0.0)
        gx += tl.sum(alpha[:, None] * t, axis=0)
        sum_gc += tl.sum(tl.where(k_valid, g * cos, 0.0), axis=0)
        if ATOMIC:
            tl.atomic_add(gy_acc_ptr + j[:, None] * D + offs_d[None, :],
                          alpha[:, None] * x[None, :] + beta[:, None] * t,
                          mask=k_valid[:, None] & d_valid[None, :])
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            tl.store(alpha_ptr + row * K1 + 1 + offs_k, alpha, mask=k_valid)
            tl.store(beta_ptr + row * K1 + 1 + offs_k, beta, mask=k_valid)
    cx = tl.where(tl.sqrt_rn(nx_sq) >= eps, -sum_gc / (nx * nx), 0.0)
    gx = gx + cx * x
    tl.store(gx_ptr + row * D + offs_d, gx.to(gx_ptr.dtype.element_ty), mask=d_valid)


@triton.jit(do_not_specialize=_COUNTS)
def _segments_kernel(x_ptr, y_ptr, alpha_ptr, beta_ptr, order_ptr, offsets_ptr, gy_ptr, D, K1,
                     BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    start = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_valid = offs_e < end
        ent = tl.load(order_ptr + offs_e, mask=e_valid, other=0)
        a = tl.load(alpha_ptr + ent, mask=e_valid, other=0.0)
        bacc += tl.load(beta_ptr + ent, mask=e_valid, other=0.0)
        i = ent // K1
        xr = tl.load(x_ptr + i[:, None] * D + offs_d[None, :], mask=e_valid[:, None] & d_valid[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * xr, axis=0)
    yj = tl.load(y_ptr + j * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    gy = acc + tl.sum(bacc, axis=0) * yj
    tl.store(gy_ptr + j * D + offs_d, gy.to(gy_ptr.dtype.element_ty), mask=d_valid)


def _backward_warps(block_k: int, block_d: int, dtype: torch.dtype) -> int:
    """The rows backward holds a negatives tile and, beside it, x, p and the x gradient (BLOCK_D
    each): at a full 8K-value tile on 4 warps fp32 kept 16-24 B of stack on sm_80 (the compile
    tier); 8 warps halve each thread's share. fp32 at 8 warps still sat at ptxas's 128-register
    step on sm_90 with 8-16 B parked on the stack (read from the SASS: stored before the
    negatives loop, one reload per tile); 16 warps (at most 128 registers each, the same 16
    warps per SM) hold it in 98-128 registers with no stack on sm_80 and sm_90. fp16/bf16 tiles
    fit at 8 warps (16 warps: 8 B of stack on sm_80)."""
    if block_k * block_d < 8192:
        return 4
    return 16 if dtype == torch.float32 else 8


def _segments_warps(block_e: int, block_d: int) -> int:
    """The segmented grad y holds a BLOCK_E x BLOCK_D fp32 tile of gathered x rows: at 8K
    values on 4 warps ptxas held 64 registers and parked 8 B on the stack (sm_90, fp16/bf16,
    D = 768/1024); 8 warps halve each thread's share (64 registers, no stack)."""
    return 8 if block_e * block_d >= 8192 else 4


def _blocks(d: int, k: int) -> tuple[int, int]:
    block_d = max(16, triton.next_power_of_2(max(d, 1)))
    # keep a BLOCK_K x BLOCK_D tile around 8K fp32 values (registers on GPU)
    block_k = max(1, min(triton.next_power_of_2(max(k, 1)), 8192 // block_d, 32))
    return block_k, block_d


def forward(x, y, negatives, positives, temperature, neg_mode, precision):
    """(loss (N,), stats (2, N): max and log s, correct (N,) bool), fp32; inputs contiguous on
    one device."""
    n, d = x.shape
    m, k = y.shape[0], negatives.shape[1]
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    stats = torch.empty(2, n, dtype=torch.float32, device=x.device)
    correct = torch.empty(n, dtype=torch.bool, device=x.device)
    if n == 0:
        return loss, stats, correct
    block_k, block_d = _blocks(d, k)
    _forward_kernel[(n,)](
        x, y, negatives, positives if positives is not None else negatives, loss, stats, correct.view(torch.int8),
        m, d, k, float(temperature), NORM_EPS,
        HAS_POS=positives is not None, NEG_MODE=neg_mode, PRECISION=precision, ROUND=_ROUND[x.dtype],
        BLOCK_K=block_k, BLOCK_D=block_d)
    return loss, stats, correct


def backward(grad_rows, x, y, negatives, positives, stats, temperature, neg_mode, precision, csr=None):
    """(grad x, grad y). ``csr=(order, offsets)`` selects the deterministic segmented grad y;
    None uses fp32 atomics."""
    n, d = x.shape
    m, k = y.shape[0], negatives.shape[1]
    dev = x.device
    grad_x = torch.empty_like(x)
    if n == 0:
        return grad_x, torch.zeros_like(y)
    block_k, block_d = _blocks(d, k)
    atomic = csr is None
    if atomic:
        gy_acc = torch.zeros(m, d, dtype=torch.float32, device=dev)
        alpha = beta = gy_acc  # unused
    else:
        gy_acc = torch.empty(0, dtype=torch.float32, device=dev)
        alpha = torch.empty(n, k + 1, dtype=torch.float32, device=dev)
        beta = torch.empty(n, k + 1, dtype=torch.float32, device=dev)
    _backward_rows_kernel[(n,)](
        grad_rows, x, y, negatives, positives if positives is not None else negatives, stats, grad_x, alpha, beta,
        gy_acc, m, d, k, float(temperature), NORM_EPS,
        HAS_POS=positives is not None, NEG_MODE=neg_mode, PRECISION=precision, ROUND=_ROUND[x.dtype],
        ATOMIC=atomic, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_backward_warps(block_k, block_d, x.dtype))
    if atomic:
        return grad_x, gy_acc.to(y.dtype)
    order, offsets = csr
    grad_y = torch.empty_like(y)
    block_e = max(1, min(32, 8192 // block_d))
    _segments_kernel[(m,)](x, y, alpha, beta, order, offsets, grad_y, d, k + 1,
                           BLOCK_E=block_e, BLOCK_D=block_d, num_warps=_segments_warps(block_e, block_d))
    return grad_x, grad_y
