"""Triton kernels of random-projection quantization and nearest-codeword assignment.

One program computes the labels of BLOCK_N rows for one head (grid: (cdiv(rows, BLOCK_N), H)):
it reads the stacked rows straight from the (B, T, F) input (row n starts at element
b*T*F + t*k*F, so stacking is address arithmetic, not a copy), LayerNorms them, projects them
to the head's d coordinates with tl.dot, unit-normalises them (cosine), then streams the
head's codebook in tiles of BLOCK_V codewords: scores = dot(y, c) * a + b (the formula of
csrc/rp_quantize.h: cosine a = 1/|c|, b = 0; l2 a = 2, b = -|c|^2), tile max and first
arg-max, and a running best carried across tiles (strictly greater replaces, so ties keep
the lowest index). The (rows, V) score matrix is never written; a later soft path can
turn each score tile into softmax(scores / tau + Gumbel) statistics on the same tiles.

Without a projection (nearest_codeword) y is the row itself, of any width D: the dot
products are accumulated over BLOCK_K-wide chunks of D for every codeword tile.
Runs under TRITON_INTERPRET=1 (fp32/fp16 there; bf16 on GPU).
"""
import triton
import triton.language as tl

# The projected tile y (BLOCK_N, BLOCK_D) lives in registers: head widths beyond this go to
# the other backends (sslfast/ops/rp_quantize.py says so).
MAX_HEAD_DIM = 256
# Integer arguments that are not specialised (an int equal to 1 becomes a compile-time
# constant, a multiple of 16 another specialisation): counts whose divisibility adds
# nothing (row offsets are multiples of F, d or in_dim, which stay specialised).
_COUNTS = ("rows", "rows_per_seq", "T", "stack", "H", "V")


@triton.jit
def _update_best(dot, cc, vv, V, best, best_idx, COSINE: tl.constexpr):
    """Scores of one codebook tile (dot (BLOCK_N, BLOCK_V) = y . c, cc = |c|^2, vv = codeword
    indices) folded into the running best. Cosine: dot / |c| (y already normalised); l2:
    2 y.c - |c|^2. Ties go to the lowest index: within the tile by min index, across tiles
    because a later tile must be strictly better."""
    if COSINE:
        s = dot * (1.0 / tl.maximum(tl.sqrt(cc), 1e-12))[None, :]
    else:
        s = 2.0 * dot - cc[None, :]
    s = tl.where((vv < V)[None, :], s, float("-inf"))
    tile_max = tl.max(s, axis=1)
    tile_arg = tl.min(tl.where(s == tile_max[:, None], vv[None, :], V), axis=1)
    take = tile_max > best
    return tl.where(take, tile_max, best), tl.where(take, tile_arg.to(tl.int64), best_idx)


@triton.jit(do_not_specialize=_COUNTS)
def _rp_quantize_kernel(
    x_ptr, proj_ptr, cb_ptr, mask_ptr, out_ptr,
    rows, rows_per_seq, T, F, stack, in_dim, H, V, d,
    HAS_PROJ: tl.constexpr, LAYERNORM: tl.constexpr, COSINE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < rows
    active = row_ok
    if HAS_MASK:
        flags = tl.load(mask_ptr + offs_n, mask=row_ok, other=0)
        active = row_ok & (flags != 0)
    offs_n64 = offs_n.to(tl.int64)
    seq = offs_n64 // rows_per_seq
    row_off = seq * T * F + (offs_n64 - seq * rows_per_seq) * stack * F
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)

    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    if tl.sum(active.to(tl.int32), axis=0) > 0:
        if HAS_PROJ:
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < d
            mean = tl.zeros([BLOCK_N], tl.float32)
            rstd = tl.full([BLOCK_N], 1.0, tl.float32)
            if LAYERNORM:
                # Two passes (mean, then centred squares) so a large offset does not cancel.
                total = tl.zeros([BLOCK_N], tl.float32)
                for k0 in range(0, in_dim, BLOCK_K):
                    kk = k0 + offs_k
                    ok = active[:, None] & (kk < in_dim)[None, :]
                    xk = tl.load(x_ptr + row_off[:, None] + kk[None, :], mask=ok, other=0.0).to(tl.float32)
                    total += tl.sum(xk, axis=1)
                mean = total / in_dim
                m2 = tl.zeros([BLOCK_N], tl.float32)
                for k0 in range(0, in_dim, BLOCK_K):
                    kk = k0 + offs_k
                    ok = active[:, None] & (kk < in_dim)[None, :]
                    xk = tl.load(x_ptr + row_off[:, None] + kk[None, :], mask=ok, other=0.0).to(tl.float32)
                    xc = tl.where(ok, xk - mean[:, None], 0.0)
                    m2 += tl.sum(xc * xc, axis=1)
                rstd = 1.0 / tl.sqrt(m2 / in_dim + 1e-5)
            y = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for k0 in range(0, in_dim, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < in_dim
                ok = active[:, None] & k_ok[None, :]
                xk = tl.load(x_ptr + row_off[:, None] + kk[None, :], mask=ok, other=0.0).to(tl.float32)
                if LAYERNORM:
                    xk = tl.where(ok, (xk - mean[:, None]) * rstd[:, None], 0.0)
                pk = tl.load(proj_ptr + kk[:, None].to(tl.int64) * (H * d) + h * d + offs_d[None, :],
                             mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                y += tl.dot(xk, pk, input_precision="ieee")
            if COSINE:
                y = y * (1.0 / tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), 1e-12))[:, None]
            for v0 in range(0, V, BLOCK_V):
                vv = v0 + offs_v
                v_ok = vv < V
                c = tl.load(cb_ptr + (h.to(tl.int64) * V + vv)[:, None] * d + offs_d[None, :],
                            mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                cc = tl.sum(c * c, axis=1)
                dot = tl.dot(y, tl.trans(c), input_precision="ieee")
                best, best_idx = _update_best(dot, cc, vv, V, best, best_idx, COSINE)
        else:
            scale = tl.full([BLOCK_N], 1.0, tl.float32)
            if COSINE:
                ss = tl.zeros([BLOCK_N], tl.float32)
                for k0 in range(0, in_dim, BLOCK_K):
                    kk = k0 + offs_k
                    ok = active[:, None] & (kk < in_dim)[None, :]
                    xk = tl.load(x_ptr + row_off[:, None] + kk[None, :], mask=ok, other=0.0).to(tl.float32)
                    ss += tl.sum(xk * xk, axis=1)
                scale = 1.0 / tl.maximum(tl.sqrt(ss), 1e-12)
            for v0 in range(0, V, BLOCK_V):
                vv = v0 + offs_v
                v_ok = vv < V
                dot = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
                cc = tl.zeros([BLOCK_V], tl.float32)
                for k0 in range(0, in_dim, BLOCK_K):
                    kk = k0 + offs_k
                    k_ok = kk < in_dim
                    xk = tl.load(x_ptr + row_off[:, None] + kk[None, :], mask=active[:, None] & k_ok[None, :],
                                 other=0.0).to(tl.float32)
                    ck = tl.load(cb_ptr + vv.to(tl.int64)[:, None] * in_dim + kk[None, :],
                                 mask=v_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    dot += tl.dot(xk, tl.trans(ck), input_precision="ieee")
                    cc += tl.sum(ck * ck, axis=1)
                if COSINE:
                    dot = dot * scale[:, None]
                best, best_idx = _update_best(dot, cc, vv, V, best, best_idx, COSINE)
    tl.store(out_ptr + offs_n64 * H + h, tl.where(active, best_idx, -1), mask=row_ok)


def rp_quantize(x, proj, codebooks, *, stack, layernorm, cosine, mask, out):
    """Launch on contiguous tensors: x (B, T, F); proj fp32 (F*stack, H*d) or None (then
    H = 1, d = F*stack); codebooks (H, V, d); mask uint8 (rows,) or None; out int64 (rows, H)."""
    B, T, F = x.shape
    H, V, d = codebooks.shape
    rows_per_seq = T // stack
    rows = B * rows_per_seq
    if rows == 0:
        return out
    in_dim = F * stack
    if proj is not None:
        BLOCK_K = 32 if in_dim <= 32 else 64
        BLOCK_D = max(16, triton.next_power_of_2(d))
        # More rows per program share each codebook tile; fewer when the projected tile is
        # wide (it lives in registers).
        BLOCK_N = 64 if BLOCK_D <= 64 else 16
    else:
        # nearest_codeword: a (BLOCK_N, BLOCK_V) score tile accumulated over BLOCK_K-wide
        # chunks of x and of the codebook, products on FMA units (IEEE fp32). 64 rows with
        # 64-wide chunks spilled up to 872 B on sm_80 (255 registers); 32 x 16 fits in 128-200.
        BLOCK_K = 16
        BLOCK_D = 16
        BLOCK_N = 32
    BLOCK_V = 64
    num_warps = 4
    grid = (triton.cdiv(rows, BLOCK_N), H)
    _rp_quantize_kernel[grid](
        x, proj if proj is not None else codebooks, codebooks, mask if mask is not None else out, out,
        rows, rows_per_seq, T, F, stack, in_dim, H, V, d,
        HAS_PROJ=proj is not None, LAYERNORM=bool(layernorm), COSINE=bool(cosine), HAS_MASK=mask is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return out
