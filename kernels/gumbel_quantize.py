"""Triton kernels of the Gumbel-softmax vector quantizer (sslfast.gumbel_vector_quantize).

Every program owns BLOCK_N frames of one group g (program id = frame block * G + g) and walks
the V codewords of its rows in tiles of BLOCK_V (``plan``: the same tiles on a GPU and in
the interpreter), so any V fits: the softmaxes over V are online (running max and
normaliser, rescaled when the max grows), the argmaxes keep the first tile's index on a tie
across tiles (``tl.argmax`` takes the lowest index inside a tile: the reference's lowest-index
rule overall), and the passes that need the final statistics recompute the tile (logits,
noise, ``grad_q @ C_g^T``) instead of storing it. The noise is Philox word ``pos % 4`` of
counter (pos // 4, n, Stream.GUMBEL, 0), pos = g*V + v, as in the reference and the C++/CUDA
kernels; the logs run in fp64 (one rounding to fp32) so every backend gets the same noise
bits, whatever the tiling.

* ``_forward_kernel``: pass 1 over V: codes (argmax of l + g; of l in eval), the marginal
  softmax's statistics and (soft) those of softmax((l + g) / tau). Hard: exact codebook
  gather. Soft: ``q = softmax((l + g) / tau) @ C_g`` by tl.dot over (BLOCK_V, BLOCK_D) tiles of
  the codebook (noise recomputed per BLOCK_D slice; no (N, G*V, d) product, no (N, G*V)
  probabilities in memory). Last pass: per-program partial sums of the soft and hard
  marginals (summed by the caller in program order: deterministic, no atomics).
* ``_backward_logits_kernel``: straight-through gradient through softmax((l + g) / tau)
  (``a = grad_q @ C_g^T`` by tl.dot over BLOCK_D chunks) plus the prob-perplexity term; pass 1
  gathers the row sums (``sum_v s_v a_v``, ``sum_v p_v w_v``) online, pass 2 writes the
  gradient. The soft path also writes each row's softmax statistics (max of l + g, 1 /
  normaliser) for the codebook gradient.
* ``_backward_codebook_kernel``: one program per (codeword, BLOCK_D slice) adds the output
  gradients of the frames that chose it, in frame order (deterministic, no atomics).
* ``_backward_codebook_soft_kernel`` (program = BLOCK_V codewords of a group, chunk of frames,
  BLOCK_D dims): recomputes the probabilities from the statistics and the noise and adds
  ``soft^T grad_q`` into the chunk's partial; the caller sums the partials in chunk order.
"""
import torch
import triton
import triton.language as tl

from .. import random as sr

from . import philox as kp

STREAM_GUMBEL = tl.constexpr(32)  # sslfast.random.Stream.GUMBEL
U_LO = 2.0**-24


@triton.jit
def _gumbel_tile(seed, offs_n, pos, U_LO_C: tl.constexpr):
    """(BLOCK_N, BLOCK_V) Gumbel noise for frames offs_n at logits positions pos."""
    c0 = (pos[None, :] >> 2) + offs_n[:, None] * 0
    c1 = offs_n[:, None] + pos[None, :] * 0
    c2 = c1 * 0 + STREAM_GUMBEL
    w0, w1, w2, w3 = kp.philox4x32(seed, c0, c1, c2, c2 * 0)
    k = (pos[None, :] & 3) + offs_n[:, None] * 0
    w = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))
    u = kp.uint_to_open_uniform(w, U_LO_C).to(tl.float64)
    return (-tl.log(-tl.log(u))).to(tl.float32)


@triton.jit
def _logits_tile(lrow, offs_n, row_ok, g, V, v0, seed, NOISE: tl.constexpr, U_LO_C: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """Codewords v0 .. v0 + BLOCK_V of the rows: (offs_v, lanes in range, l, l + g or l); -inf
    outside the rows and V, so maxima and sums ignore those lanes."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    tile_ok = row_ok[:, None] & (offs_v < V)[None, :]
    l = tl.load(lrow[:, None] + offs_v[None, :], mask=tile_ok, other=float("-inf")).to(tl.float32)
    z = l
    if NOISE:
        z = tl.where(tile_ok, l + _gumbel_tile(seed, offs_n, g * V + offs_v, U_LO_C), float("-inf"))
    return offs_v, tile_ok, l, z


@triton.jit
def _online_max(best, x, row_ok):
    """The running row maximum after tile x (0 on padding rows: keeps exp and the rescale finite)."""
    return tl.where(row_ok, tl.maximum(best, tl.max(x, axis=1)), 0.0)


@triton.jit
def _argmax_update(best, idx, x, v0):
    """First index of the row maximum so far: a later tile must be strictly larger to win."""
    return tl.where(tl.max(x, axis=1) > best, v0 + tl.argmax(x, axis=1), idx)


@triton.jit
def _forward_kernel(logits_ptr, codebook_ptr, mask_ptr, quant_ptr, codes_ptr, psum_ptr, csum_ptr,
                    N, G, V, D, seed_ptr, tau,
                    HAS_MASK: tl.constexpr, TRAINING: tl.constexpr, SOFT: tl.constexpr, U_LO_C: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    seed = kp.load_seed(seed_ptr)
    pid_n = tl.program_id(0) // G
    g = tl.program_id(0) % G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows64 = offs_n.to(tl.int64)
    lrow = logits_ptr + rows64 * G * V + g * V

    # pass 1: m, s: max and normaliser of softmax(l); am: argmax l; zm, zs: max of z = l + g
    # and normaliser of softmax(z / tau); code: argmax z
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    am = tl.zeros([BLOCK_N], dtype=tl.int32)
    zm = tl.full([BLOCK_N], float("-inf"), tl.float32)
    zs = tl.zeros([BLOCK_N], dtype=tl.float32)
    code = tl.zeros([BLOCK_N], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs_v, tile_ok, l, z = _logits_tile(lrow, offs_n, row_ok, g, V, v0, seed, TRAINING, U_LO_C, BLOCK_V)
        am = _argmax_update(m, am, l, v0)
        m_new = _online_max(m, l, row_ok)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(l - m_new[:, None]), axis=1)
        m = m_new
        if TRAINING:
            code = _argmax_update(zm, code, z, v0)
            zm_new = _online_max(zm, z, row_ok)
            if SOFT:  # max first, then the division by tau: finite for tiny tau
                zs = zs * tl.exp((zm - zm_new) / tau) + tl.sum(tl.exp((z - zm_new[:, None]) / tau), axis=1)
            zm = zm_new
    if not TRAINING:
        code = am
    tl.store(codes_ptr + rows64 * G + g, code.to(tl.int64), mask=row_ok)

    dst_row = (rows64 * G + g) * D
    if SOFT:
        # q = softmax(z / tau) @ C_g: the unnormalised weights per tile, one division at the end
        inv_zs = 1.0 / tl.where(row_ok, zs, 1.0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for v0 in range(0, V, BLOCK_K):
                offs_v, tile_ok, l, z = _logits_tile(lrow, offs_n, row_ok, g, V, v0, seed, True, U_LO_C, BLOCK_K)
                e = tl.where(tile_ok, tl.exp((z - zm[:, None]) / tau), 0.0)
                cb_rows = (g * V + offs_v).to(tl.int64) * D
                c = tl.load(codebook_ptr + cb_rows[:, None] + offs_d[None, :],
                            mask=(offs_v < V)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(e, c, input_precision="ieee")
            q = acc * inv_zs[:, None]
            tl.store(quant_ptr + dst_row[:, None] + offs_d[None, :], q.to(quant_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])
    else:
        src_row = (g * V + code).to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dm = row_ok[:, None] & (offs_d < D)[None, :]
            vals = tl.load(codebook_ptr + src_row[:, None] + offs_d[None, :], mask=dm)
            tl.store(quant_ptr + dst_row[:, None] + offs_d[None, :], vals, mask=dm)

    # last pass: this program's share of the marginals (softmax(l) and the argmax histogram)
    sel = row_ok
    if HAS_MASK:
        sel = sel & (tl.load(mask_ptr + offs_n, mask=row_ok, other=0) != 0)
    s_safe = tl.where(row_ok, s, 1.0)
    out_row = (pid_n.to(tl.int64) * G + g) * V
    for v0 in range(0, V, BLOCK_V):
        offs_v, tile_ok, l, z = _logits_tile(lrow, offs_n, row_ok, g, V, v0, seed, False, U_LO_C, BLOCK_V)
        p = tl.where(sel[:, None] & tile_ok, tl.exp(l - m[:, None]) / s_safe[:, None], 0.0)
        hit = (offs_v[None, :] == am[:, None]) & sel[:, None]
        col_ok = offs_v < V
        tl.store(psum_ptr + out_row + offs_v, tl.sum(p, axis=0), mask=col_ok)
        tl.store(csum_ptr + out_row + offs_v, tl.sum(hit.to(tl.float32), axis=0), mask=col_ok)


@triton.jit
def _grad_q_times_codebook(gq_row, cbt_ptr, row_ok, g, V, D, offs_v, BLOCK_N: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """a[n, v] = <grad_q[n, g], codebook[g, v]> for the tile's codewords (d output / d soft)."""
    a = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    col_ok = offs_v < V
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        gq = tl.load(gq_row[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        ct = tl.load(cbt_ptr + ((g * D + offs_d).to(tl.int64) * V)[:, None] + offs_v[None, :],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        a += tl.dot(gq, ct, input_precision="ieee")
    return a


@triton.jit
def _backward_logits_kernel(grad_q_ptr, logits_ptr, cbt_ptr, mask_ptr, w_ptr, grad_ptr, stats_ptr,
                            N, G, V, D, seed_ptr, tau,
                            HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, TRAINING: tl.constexpr,
                            SOFT: tl.constexpr, U_LO_C: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    seed = kp.load_seed(seed_ptr)
    pid_n = tl.program_id(0) // G
    g = tl.program_id(0) % G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows64 = offs_n.to(tl.int64)
    lrow = logits_ptr + rows64 * G * V + g * V
    grow = grad_ptr + rows64 * G * V + g * V
    gq_row = grad_q_ptr + (rows64 * G + g) * D

    # pass 1, online over V: ym, ez: max and normaliser of softmax(y / tau), y = l + g, and
    # sa = sum_v e_v a_v; m, s: those of softmax(l), and pw = sum_v e_v w_v
    ym = tl.full([BLOCK_N], float("-inf"), tl.float32)
    ez = tl.zeros([BLOCK_N], dtype=tl.float32)
    sa = tl.zeros([BLOCK_N], dtype=tl.float32)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    pw = tl.zeros([BLOCK_N], dtype=tl.float32)
    if TRAINING or HAS_W:
        for v0 in range(0, V, BLOCK_V):
            offs_v, tile_ok, l, y = _logits_tile(lrow, offs_n, row_ok, g, V, v0, seed, TRAINING, U_LO_C, BLOCK_V)
            if TRAINING:
                ym_new = _online_max(ym, y, row_ok)
                alpha = tl.exp((ym - ym_new) / tau)  # max first, then the division: finite for tiny tau
                e = tl.exp((y - ym_new[:, None]) / tau)
                a = _grad_q_times_codebook(gq_row, cbt_ptr, row_ok, g, V, D, offs_v, BLOCK_N, BLOCK_V, BLOCK_D)
                ez = ez * alpha + tl.sum(e, axis=1)
                sa = sa * alpha + tl.sum(e * a, axis=1)
                ym = ym_new
            if HAS_W:
                m_new = _online_max(m, l, row_ok)
                beta = tl.exp(m - m_new)
                e = tl.exp(l - m_new[:, None])
                wv = tl.load(w_ptr + g * V + offs_v, mask=offs_v < V, other=0.0)
                s = s * beta + tl.sum(e, axis=1)
                pw = pw * beta + tl.sum(e * wv[None, :], axis=1)
                m = m_new
    # a row's normaliser is >= 1 (its max term is exp(0)); 0 only on padding rows and in eval
    inv_z = 1.0 / tl.where(ez > 0.0, ez, 1.0)
    sa = sa * inv_z  # sum_v soft_v a_v
    if SOFT:  # the soft codebook-gradient kernel rebuilds soft from these and the noise
        st = stats_ptr + (rows64 * G + g) * 2
        tl.store(st, ym, mask=row_ok)
        tl.store(st + 1, inv_z, mask=row_ok)
    s_safe = tl.where(s > 0.0, s, 1.0)
    pw = pw / s_safe  # sum_v p_v w_v
    sel = row_ok
    if HAS_MASK:
        sel = sel & (tl.load(mask_ptr + offs_n, mask=row_ok, other=0) != 0)

    # pass 2: the gradient, tile by tile
    for v0 in range(0, V, BLOCK_V):
        offs_v, tile_ok, l, y = _logits_tile(lrow, offs_n, row_ok, g, V, v0, seed, TRAINING, U_LO_C, BLOCK_V)
        grad = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        if TRAINING:
            sv = tl.exp((y - ym[:, None]) / tau) * inv_z[:, None]
            a = _grad_q_times_codebook(gq_row, cbt_ptr, row_ok, g, V, D, offs_v, BLOCK_N, BLOCK_V, BLOCK_D)
            grad += sv * (a - sa[:, None]) / tau
        if HAS_W:
            p = tl.exp(l - m[:, None]) / s_safe[:, None]
            wv = tl.load(w_ptr + g * V + offs_v, mask=offs_v < V, other=0.0)
            grad += tl.where(sel[:, None] & tile_ok, p * (wv[None, :] - pw[:, None]), 0.0)
        tl.store(grow[:, None] + offs_v[None, :], grad.to(grad_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _backward_codebook_kernel(grad_q_ptr, codes_ptr, grad_cb_ptr, N, G, V, D,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.program_id(0)  # codeword g*V + v
    pid_d = tl.program_id(1)
    g = j // V
    v = j % V
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c = tl.load(codes_ptr + offs_n.to(tl.int64) * G + g, mask=offs_n < N, other=-1)
        hit = c == v
        t = tl.load(grad_q_ptr + ((offs_n.to(tl.int64) * G + g) * D)[:, None] + offs_d[None, :],
                    mask=hit[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(t.to(tl.float32), axis=0)
    tl.store(grad_cb_ptr + j.to(tl.int64) * D + offs_d, acc.to(grad_cb_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _backward_codebook_soft_kernel(grad_q_ptr, logits_ptr, stats_ptr, partial_ptr, N, G, V, D, CHUNK_ROWS, seed_ptr,
                                   tau, U_LO_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    """partial[chunk, g*V + v, k] = sum over the chunk's frames n of soft[n, g, v] grad_q[n, g, k]."""
    seed = kp.load_seed(seed_ptr)
    n_vt = tl.cdiv(V, BLOCK_V)
    g = tl.program_id(0) // n_vt
    offs_v = (tl.program_id(0) % n_vt) * BLOCK_V + tl.arange(0, BLOCK_V)
    chunk = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = offs_v < V
    d_ok = offs_d < D
    pos = g * V + offs_v
    row_end = tl.minimum(N, (chunk + 1) * CHUNK_ROWS)
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    for r0 in range(chunk * CHUNK_ROWS, row_end, BLOCK_N):
        offs_n = r0 + tl.arange(0, BLOCK_N)
        row_ok = offs_n < row_end
        tile_ok = row_ok[:, None] & col_ok[None, :]
        rows64 = offs_n.to(tl.int64)
        l = tl.load(logits_ptr + rows64[:, None] * (G * V) + pos[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        st = stats_ptr + (rows64 * G + g) * 2
        ym = tl.load(st, mask=row_ok, other=0.0)
        inv_z = tl.load(st + 1, mask=row_ok, other=0.0)
        y = l + _gumbel_tile(seed, offs_n, pos, U_LO_C)
        # padding lanes: exp(-inf) = 0 rather than a discarded inf * 0
        s = tl.exp(tl.where(tile_ok, (y - ym[:, None]) / tau, float("-inf"))) * inv_z[:, None]
        gq = tl.load(grad_q_ptr + ((rows64 * G + g) * D)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(s), gq, input_precision="ieee")
    out = partial_ptr + (chunk.to(tl.int64) * (G * V) + pos)[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=col_ok[:, None] & d_ok[None, :])


# The soft codebook gradient's chunk plan (csrc/gumbel_quantize.h, gq::soft_chunk_rows): chunks
# fixed by N, at most SOFT_MAX_CHUNKS partials, each at least SOFT_MIN_CHUNK_ROWS frames.
SOFT_MIN_CHUNK_ROWS, SOFT_MAX_CHUNKS = 64, 32

# Tiles (the same on a GPU and in the interpreter; chosen with the compile tier,
# tests/test_compile_triton.py, so that no kernel spills on sm_90 or sm_80):
# * BLOCK_N = 16 frames: tl.dot's smallest M.
# * BLOCK_V = 64 codewords per tile of the online passes (16 for V <= 16, 32 for V <= 32): at
#   8 warps a (16, 64) tile is 4 values per thread, so the Philox words, the fp64 logs and the
#   running row statistics stay in registers whatever V is.
# * DOT_K = 16: the reduction length of every fp32 tl.dot (input_precision="ieee" runs on FMA
#   units, and Triton's FMA dot holds K operand values per output element in registers: K = 64
#   took the forward and backward to 255 registers and spills). The soft forward walks V again
#   in slices of 16 for ``softmax @ C``; the backward's ``grad_q @ C^T`` walks d in slices of 16.
# * FWD/SOFT_BLOCK_D = 64 dims of a codebook tile (fewer noise recomputations for d = 128 than
#   32, still no spill); CB_BLOCK_D = 128 in the hard codebook gradient (no tile over V, 4 warps).
# * 8 warps, 3 pipeline stages: 4 warps spilled in the backward logits kernel (255 registers);
#   shared memory stays under 21 KB per block, far below sm_80's 163 KB.
BLOCK_N = 16
MAX_BLOCK_V = 64
NUM_WARPS, NUM_STAGES = 8, 3
DOT_K = 16
# Positions g*V + v (and a tile's padding lanes past them) and frame indices are int32 in the
# kernels, as the Philox counter words they feed are 32-bit: the op refuses larger rows.
MAX_COLUMNS = 2**31 - 2**16
MAX_ROWS = 2**31 - 2**16


def plan(v, d):
    """Tile sizes of the kernels for V codewords of d dims: dict of BLOCK_N, BLOCK_V, the
    forward's and backward's BLOCK_D, and the soft codebook gradient's SOFT_BLOCK_V/D."""
    block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(v)))
    return dict(BLOCK_N=BLOCK_N, BLOCK_V=block_v, FWD_BLOCK_K=DOT_K,
                FWD_BLOCK_D=min(64, max(16, triton.next_power_of_2(d))), BWD_BLOCK_D=DOT_K,
                SOFT_BLOCK_V=block_v, SOFT_BLOCK_D=min(64, max(16, triton.next_power_of_2(d))),
                CB_BLOCK_D=min(128, max(16, triton.next_power_of_2(d))), num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def soft_chunk_rows(n, align):
    rows = max(SOFT_MIN_CHUNK_ROWS, triton.cdiv(n, SOFT_MAX_CHUNKS))
    return triton.cdiv(rows, align) * align


def forward(logits, codebook, mask, groups, tau, hard, training, seed):
    """(quantized, codes, prob_sum (G, V), code_sum (G, V)); logits (N, G*V), codebook (G*V, d)
    contiguous, mask None or uint8 (N,); seed an int or a 0-d int64 tensor on logits' device
    (the kernels load the key from a pointer: ``sslfast.random.seed_tensor``)."""
    n, gv = logits.shape
    v = gv // groups
    d = codebook.shape[1]
    dev = logits.device
    t = plan(v, d)
    n_blocks = triton.cdiv(n, t["BLOCK_N"])
    quantized = torch.empty(n, groups * d, dtype=codebook.dtype, device=dev)
    codes = torch.empty(n, groups, dtype=torch.int64, device=dev)
    psum = torch.empty(n_blocks, groups, v, device=dev)
    csum = torch.empty(n_blocks, groups, v, device=dev)
    _forward_kernel[(n_blocks * groups,)](
        logits, codebook, logits if mask is None else mask, quantized, codes, psum, csum, n, groups, v, d,
        sr.seed_tensor(seed, dev), float(tau), HAS_MASK=mask is not None, TRAINING=training,
        SOFT=training and not hard, U_LO_C=U_LO, BLOCK_N=t["BLOCK_N"], BLOCK_V=t["BLOCK_V"], BLOCK_K=t["FWD_BLOCK_K"],
        BLOCK_D=t["FWD_BLOCK_D"], num_warps=t["num_warps"], num_stages=t["num_stages"])
    return quantized, codes, psum.sum(0), csum.sum(0)


def backward(grad_q, w, logits, codebook_t, codes, mask, groups, tau, hard, training, seed, codebook_dtype):
    """(grad_logits, grad_codebook); codebook_t is the (G, d, V) fp32 transposed codebook."""
    n, gv = logits.shape
    v = gv // groups
    d = codebook_t.shape[1]
    dev = logits.device
    t = plan(v, d)
    grad_logits = torch.empty_like(logits)
    grad_cb = torch.empty(gv, d, dtype=codebook_dtype, device=dev)
    soft = training and not hard
    stats = torch.empty(n if soft else 0, groups, 2, device=dev)
    seed_t = sr.seed_tensor(seed, dev)
    _backward_logits_kernel[(triton.cdiv(n, t["BLOCK_N"]) * groups,)](
        grad_q, logits, codebook_t, logits if mask is None else mask, logits if w is None else w, grad_logits,
        stats if soft else logits, n, groups, v, d, seed_t, float(tau), HAS_MASK=mask is not None, HAS_W=w is not None,
        TRAINING=training, SOFT=soft, U_LO_C=U_LO, BLOCK_N=t["BLOCK_N"], BLOCK_V=t["BLOCK_V"],
        BLOCK_D=t["BWD_BLOCK_D"], num_warps=t["num_warps"], num_stages=t["num_stages"])
    if soft:
        chunk_rows = soft_chunk_rows(n, t["BLOCK_N"])
        n_chunks = triton.cdiv(n, chunk_rows)
        sb_v, sb_d = t["SOFT_BLOCK_V"], t["SOFT_BLOCK_D"]
        partial = torch.empty(n_chunks, gv, d, device=dev)
        _backward_codebook_soft_kernel[(groups * triton.cdiv(v, sb_v), n_chunks, triton.cdiv(d, sb_d))](
            grad_q, logits, stats, partial, n, groups, v, d, chunk_rows, seed_t, float(tau), U_LO_C=U_LO,
            BLOCK_N=t["BLOCK_N"], BLOCK_V=sb_v, BLOCK_D=sb_d, num_warps=t["num_warps"], num_stages=t["num_stages"])
        return grad_logits, partial.sum(0).to(codebook_dtype)  # a fixed-order reduction: deterministic
    cb_block_d = t["CB_BLOCK_D"]
    _backward_codebook_kernel[(gv, triton.cdiv(d, cb_block_d))](
        grad_q, codes, grad_cb, n, groups, v, d, BLOCK_N=64, BLOCK_D=cb_block_d)
    return grad_logits, grad_cb
