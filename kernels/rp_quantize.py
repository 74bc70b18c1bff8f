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

Wide heads (d > FUSED_MAX_D) take two launches: _project_kernel writes y = LayerNorm(x) @ P
(rows, H*d) fp32 to a scratch buffer, then the nearest-codeword pass of _rp_quantize_kernel
reads head h of each row (columns h*d .. h*d+d-1) in BLOCK_K-wide chunks, cosine scaling
after the dot. Holding a whole (BLOCK_N, d) tile of y as the operand of one FMA dot made
ptxas keep every k of it live at once: 112-600 B of stack per thread at d=64 and d=256.
Runs under TRITON_INTERPRET=1 (fp32/fp16 there; bf16 on GPU).
"""
import torch
import triton
import triton.language as tl

# Largest head width the compile tier checks (tests/compile_cases.py); wider heads go to the
# other backends (sslfast/ops/rp_quantize.py says so).
MAX_HEAD_DIM = 256
# Widest head (power of two) whose projected tile stays in registers for the fused pass;
# wider heads are projected to a scratch buffer first (see the module docstring).
FUSED_MAX_D = 64
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


@triton.jit
def _stacked_rows(pid_n, rows, rows_per_seq, T, F, stack, mask_ptr, HAS_MASK: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Rows pid_n*BLOCK_N ...: their int64 indices, which exist, which are active (exist and,
    with a mask, are flagged), and the element offset of each stacked row in the (B, T, F)
    input (row n of sequence b starts at b*T*F + t*stack*F)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < rows
    active = row_ok
    if HAS_MASK:
        flags = tl.load(mask_ptr + offs_n, mask=row_ok, other=0)
        active = row_ok & (flags != 0)
    offs_n64 = offs_n.to(tl.int64)
    seq = offs_n64 // rows_per_seq
    row_off = seq * T * F + (offs_n64 - seq * rows_per_seq) * stack * F
    return offs_n64, row_ok, active, row_off


@triton.jit
def _project(x_ptr, proj_ptr, row_off, active, in_dim, ld_proj, col0, width,
             LAYERNORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_D) fp32 tile of LayerNorm(x) @ P: columns col0 .. col0+width-1 of the
    row-major P (in_dim, ld_proj); columns past width and inactive rows are 0."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < width
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
        pk = tl.load(proj_ptr + kk[:, None].to(tl.int64) * ld_proj + col0 + offs_d[None, :],
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        y += tl.dot(xk, pk, input_precision="ieee")
    return y


@triton.jit(do_not_specialize=_COUNTS)
def _project_kernel(
    x_ptr, proj_ptr, mask_ptr, y_ptr,
    rows, rows_per_seq, T, F, stack, in_dim, n_cols,
    LAYERNORM: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y (rows, n_cols) fp32 = LayerNorm(stacked x) @ P for the active rows (the others are
    not written); grid (cdiv(rows, BLOCK_N), cdiv(n_cols, BLOCK_D))."""
    pid_n = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_D
    offs_n64, row_ok, active, row_off = _stacked_rows(pid_n, rows, rows_per_seq, T, F, stack, mask_ptr,
                                                      HAS_MASK, BLOCK_N)
    if tl.sum(active.to(tl.int32), axis=0) > 0:
        y = _project(x_ptr, proj_ptr, row_off, active, in_dim, n_cols, col0, n_cols - col0,
                     LAYERNORM, BLOCK_N, BLOCK_K, BLOCK_D)
        cols = col0 + tl.arange(0, BLOCK_D)
        tl.store(y_ptr + offs_n64[:, None] * n_cols + cols[None, :], y,
                 mask=active[:, None] & (cols < n_cols)[None, :])


@triton.jit(do_not_specialize=_COUNTS)
def _rp_quantize_kernel(
    x_ptr, proj_ptr, cb_ptr, mask_ptr, out_ptr,
    rows, rows_per_seq, T, F, stack, in_dim, H, V, d,
    HAS_PROJ: tl.constexpr, LAYERNORM: tl.constexpr, COSINE: tl.constexpr, HAS_MASK: tl.constexpr,
    MULTI_HEAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Labels (rows, H) of BLOCK_N rows for head h = program_id(1). HAS_PROJ: fused, y =
    LayerNorm(x) @ P[:, h*d : h*d+d] in registers (d <= BLOCK_D <= FUSED_MAX_D). Otherwise
    the rows themselves are y: head h of a row is its elements h*in_dim .. h*in_dim+in_dim-1
    (nearest_codeword: H = 1; wide heads: x is _project_kernel's output, in_dim = d;
    MULTI_HEAD: H > 1 there, so the head offsets are compiled in)."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    offs_n64, row_ok, active, row_off = _stacked_rows(pid_n, rows, rows_per_seq, T, F, stack, mask_ptr,
                                                      HAS_MASK, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)

    # Inactive rows start at +inf (no score beats it) with label -1, so the store needs no mask
    # test of its own (that kept the row base alive across the V loop: 8 B of stack on sm_90).
    best = tl.where(active, float("-inf"), float("inf"))
    best_idx = tl.where(active, 0, -1).to(tl.int64)
    if tl.sum(active.to(tl.int32), axis=0) > 0:
        if HAS_PROJ:
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < d
            y = _project(x_ptr, proj_ptr, row_off, active, in_dim, H * d, h * d, d,
                         LAYERNORM, BLOCK_N, BLOCK_K, BLOCK_D)
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
            x_head = x_ptr
            cb_head = cb_ptr
            if MULTI_HEAD:  # head h: columns h*in_dim .. of each row, codewords h*V ..
                x_head += h.to(tl.int64) * in_dim
                cb_head += h.to(tl.int64) * V * in_dim
            scale = tl.full([BLOCK_N], 1.0, tl.float32)
            if COSINE:
                ss = tl.zeros([BLOCK_N], tl.float32)
                for k0 in range(0, in_dim, BLOCK_K):
                    kk = k0 + offs_k
                    ok = active[:, None] & (kk < in_dim)[None, :]
                    xk = tl.load(x_head + row_off[:, None] + kk[None, :], mask=ok, other=0.0).to(tl.float32)
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
                    xk = tl.load(x_head + row_off[:, None] + kk[None, :], mask=active[:, None] & k_ok[None, :],
                                 other=0.0).to(tl.float32)
                    ck = tl.load(cb_head + vv.to(tl.int64)[:, None] * in_dim + kk[None, :],
                                 mask=v_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    dot += tl.dot(xk, tl.trans(ck), input_precision="ieee")
                    cc += tl.sum(ck * ck, axis=1)
                if COSINE:
                    dot = dot * scale[:, None]
                best, best_idx = _update_best(dot, cc, vv, V, best, best_idx, COSINE)
    tl.store(out_ptr + offs_n64 * H + h, best_idx, mask=row_ok)


def rp_quantize(x, proj, codebooks, *, stack, layernorm, cosine, mask, out):
    """Launch on contiguous tensors: x (B, T, F); proj fp32 (F*stack, H*d) or None (then
    H = 1, d = F*stack); codebooks (H, V, d); mask uint8 (rows,) or None; out int64 (rows, H).
    Heads wider than FUSED_MAX_D allocate a (rows, H*d) fp32 scratch tensor."""
    B, T, F = x.shape
    H, V, d = codebooks.shape
    rows_per_seq = T // stack
    rows = B * rows_per_seq
    if rows == 0:
        return out
    in_dim = F * stack
    BLOCK_V = 64
    num_warps = 4
    fused = proj is not None and d <= FUSED_MAX_D
    if fused:
        BLOCK_K = 32 if in_dim <= 32 else 64
        BLOCK_D = max(16, triton.next_power_of_2(d))
        if BLOCK_D <= 16:
            # 64 rows share each codebook tile: 128-186 registers, no stack.
            BLOCK_N = 64
        else:
            # d = 32 and 64: the FMA dot's operands span all BLOCK_D k; 64 rows x 64 codewords
            # on 4 warps (32 outputs a thread) spilled 112-1248 B (d=32) and 192-600 B (d=64)
            # on sm_80; 32 rows on 8 warps (8 outputs a thread) fit in 64-80 registers.
            BLOCK_N = 32
            num_warps = 8
    else:
        if proj is not None:
            # Wide heads: y = LayerNorm(x) @ P to scratch, as a tiled GEMM (64 rows x 64 of
            # the H*d columns, 16-wide k chunks), then the nearest-codeword pass below on it.
            scratch = torch.empty((rows, H * d), dtype=torch.float32, device=x.device)
            PN, PK, PD = 64, 16, 64
            _project_kernel[(triton.cdiv(rows, PN), triton.cdiv(H * d, PD))](
                x, proj, mask if mask is not None else out, scratch,
                rows, rows_per_seq, T, F, stack, in_dim, H * d,
                LAYERNORM=bool(layernorm), HAS_MASK=mask is not None,
                BLOCK_N=PN, BLOCK_K=PK, BLOCK_D=PD, num_warps=4,
            )
            x, F, T, stack, rows_per_seq, in_dim = scratch, H * d, rows, 1, rows, d
            proj = None
        # nearest_codeword: a (BLOCK_N, BLOCK_V) score tile accumulated over BLOCK_K-wide
        # chunks of x and of the codebook, products on FMA units (IEEE fp32). 64 rows with
        # 64-wide chunks spilled up to 872 B on sm_80 (255 registers); 32 x 16 fits in 128-200.
        BLOCK_K = 16
        BLOCK_D = 16
        BLOCK_N = 32
    grid = (triton.cdiv(rows, BLOCK_N), H)
    _rp_quantize_kernel[grid](
        x, proj if proj is not None else codebooks, codebooks, mask if mask is not None else out, out,
        rows, rows_per_seq, T, F, stack, in_dim, H, V, d,
        HAS_PROJ=proj is not None, LAYERNORM=bool(layernorm) and proj is not None, COSINE=bool(cosine),
        HAS_MASK=mask is not None, MULTI_HEAD=proj is None and H > 1,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return out
