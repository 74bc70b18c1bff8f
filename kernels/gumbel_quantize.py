"""Triton kernels of the Gumbel-softmax vector quantizer (sslfast.gumbel_vector_quantize).

Every program owns a tile of BLOCK_N frames of one group g: the V logits of each row fit one
BLOCK_V tile, so a row's softmax, argmax and Gumbel noise are computed in registers. The
noise is Philox word ``pos % 4`` of counter (pos // 4, n, Stream.GUMBEL, 0), pos = g*V + v,
as in the reference and the C++/CUDA kernels; the logs run in fp64 (one rounding to fp32) so
every backend gets the same noise bits.

* ``_forward_kernel``: codes, exact codebook gather, per-program partial sums of the soft
  and hard marginals (summed by the caller in program order: deterministic, no atomics).
* ``_backward_logits_kernel``: straight-through gradient through softmax((l + g) / tau)
  (``a = grad_q @ C_g^T`` by tl.dot over BLOCK_D chunks) plus the prob-perplexity term.
* ``_backward_codebook_kernel``: one program per (codeword, BLOCK_D slice) adds the output
  gradients of the frames that chose it, in frame order (deterministic, no atomics).

Soft quantization (``hard=False``, training): ``_forward_kernel`` with SOFT makes
``q = softmax((l + g) / tau) @ C_g`` by tl.dot over BLOCK_D chunks of the codebook (no
(N, G*V, d) product, no (N, G*V) probabilities in memory). The backward's logits kernel is the
hard one (the straight-through gradient is the soft gradient) and also writes each row's
softmax statistics (max of l + g, 1 / normaliser); ``_backward_codebook_soft_kernel`` (program
= chunk of frames, group, BLOCK_V codewords, BLOCK_D dims) recomputes its probabilities from
those and the noise and adds ``soft^T grad_q`` into the chunk's partial; the caller sums the
partials in chunk order (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

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
def _forward_kernel(logits_ptr, codebook_ptr, mask_ptr, quant_ptr, codes_ptr, psum_ptr, csum_ptr,
                    N, G, V, D, seed, tau,
                    HAS_MASK: tl.constexpr, TRAINING: tl.constexpr, SOFT: tl.constexpr, U_LO_C: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    col_ok = offs_v < V
    tile_ok = row_ok[:, None] & col_ok[None, :]
    pos = g * V + offs_v
    rows64 = offs_n.to(tl.int64)
    l = tl.load(logits_ptr + rows64[:, None] * (G * V) + pos[None, :], mask=tile_ok, other=float("-inf"))
    l = l.to(tl.float32)
    m = tl.where(row_ok, tl.max(l, axis=1), 0.0)  # padding rows: keep exp/div finite
    am = tl.argmax(l, axis=1)
    if TRAINING:
        z = tl.where(tile_ok, l + _gumbel_tile(seed, offs_n, pos, U_LO_C), float("-inf"))
        code = tl.argmax(z, axis=1)
    else:
        code = am
    tl.store(codes_ptr + rows64 * G + g, code.to(tl.int64), mask=row_ok)

    dst_row = (rows64 * G + g) * D
    if SOFT:
        # soft = softmax((l + g) / tau), max first (finite for tiny tau); q = soft @ C_g
        zm = tl.where(row_ok, tl.max(z, axis=1), 0.0)
        es = tl.where(tile_ok, tl.exp((z - zm[:, None]) / tau), 0.0)
        soft = es / tl.where(row_ok, tl.sum(es, axis=1), 1.0)[:, None]
        cb_rows = (g * V + offs_v).to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            c = tl.load(codebook_ptr + cb_rows[:, None] + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            q = tl.dot(soft, c, input_precision="ieee")
            tl.store(quant_ptr + dst_row[:, None] + offs_d[None, :], q.to(quant_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])
    else:
        src_row = (g * V + code).to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dm = row_ok[:, None] & (offs_d < D)[None, :]
            vals = tl.load(codebook_ptr + src_row[:, None] + offs_d[None, :], mask=dm)
            tl.store(quant_ptr + dst_row[:, None] + offs_d[None, :], vals, mask=dm)

    sel = row_ok
    if HAS_MASK:
        sel = sel & (tl.load(mask_ptr + offs_n, mask=row_ok, other=0) != 0)
    e = tl.where(tile_ok, tl.exp(l - m[:, None]), 0.0)
    p = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
    p = tl.where(sel[:, None] & tile_ok, p, 0.0)
    hit = (offs_v[None, :] == am[:, None]) & sel[:, None]
    out = (pid_n * G + g) * V + offs_v
    tl.store(psum_ptr + out, tl.sum(p, axis=0), mask=col_ok)
    tl.store(csum_ptr + out, tl.sum(hit.to(tl.float32), axis=0), mask=col_ok)


@triton.jit
def _backward_logits_kernel(grad_q_ptr, logits_ptr, cbt_ptr, mask_ptr, w_ptr, grad_ptr, stats_ptr,
                            N, G, V, D, seed, tau,
                            HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, TRAINING: tl.constexpr,
                            SOFT: tl.constexpr, U_LO_C: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    col_ok = offs_v < V
    tile_ok = row_ok[:, None] & col_ok[None, :]
    pos = g * V + offs_v
    rows64 = offs_n.to(tl.int64)
    lptrs = rows64[:, None] * (G * V) + pos[None, :]
    l = tl.load(logits_ptr + lptrs, mask=tile_ok, other=float("-inf")).to(tl.float32)
    grad = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if TRAINING:
        y = tl.where(tile_ok, l + _gumbel_tile(seed, offs_n, pos, U_LO_C), float("-inf"))
        ym = tl.where(row_ok, tl.max(y, axis=1), 0.0)
        # max first, then the division: finite for tiny tau
        e = tl.where(tile_ok, tl.exp((y - ym[:, None]) / tau), 0.0)
        inv_z = 1.0 / tl.where(row_ok, tl.sum(e, axis=1), 1.0)
        s = e * inv_z[:, None]
        if SOFT:  # the soft codebook-gradient kernel rebuilds s from these and the noise
            st = stats_ptr + (rows64 * G + g) * 2
            tl.store(st, ym, mask=row_ok)
            tl.store(st + 1, inv_z, mask=row_ok)
        # a[n, v] = <grad_q[n, g], codebook[g, v]>: d output / d soft (straight-through)
        a = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            gq = tl.load(grad_q_ptr + ((rows64 * G + g) * D)[:, None] + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            ct = tl.load(cbt_ptr + ((g * D + offs_d).to(tl.int64) * V)[:, None] + offs_v[None, :],
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            a += tl.dot(gq, ct, input_precision="ieee")
        sa = tl.sum(s * a, axis=1)
        grad += s * (a - sa[:, None]) / tau
    if HAS_W:
        sel = row_ok
        if HAS_MASK:
            sel = sel & (tl.load(mask_ptr + offs_n, mask=row_ok, other=0) != 0)
        m = tl.where(row_ok, tl.max(l, axis=1), 0.0)
        e = tl.where(tile_ok, tl.exp(l - m[:, None]), 0.0)
        p = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
        wv = tl.load(w_ptr + g * V + offs_v, mask=col_ok, other=0.0)
        pw = tl.sum(p * wv[None, :], axis=1)
        grad += tl.where(sel[:, None] & tile_ok, p * (wv[None, :] - pw[:, None]), 0.0)
    tl.store(grad_ptr + lptrs, grad.to(grad_ptr.dtype.element_ty), mask=tile_ok)


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
def _backward_codebook_soft_kernel(grad_q_ptr, logits_ptr, stats_ptr, partial_ptr, N, G, V, D, CHUNK_ROWS, seed, tau,
                                   U_LO_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    """partial[chunk, g*V + v, k] = sum over the chunk's frames n of soft[n, g, v] grad_q[n, g, k]."""
    chunk = tl.program_id(0)
    n_vt = tl.cdiv(V, BLOCK_V)
    g = tl.program_id(1) // n_vt
    offs_v = (tl.program_id(1) % n_vt) * BLOCK_V + tl.arange(0, BLOCK_V)
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


def soft_chunk_rows(n, align):
    rows = max(SOFT_MIN_CHUNK_ROWS, triton.cdiv(n, SOFT_MAX_CHUNKS))
    return triton.cdiv(rows, align) * align


def _blocks(V, D):
    block_v = max(16, triton.next_power_of_2(V))
    block_n = max(1, min(16, 4096 // block_v))
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    return block_n, block_v, block_d


def forward(logits, codebook, mask, groups, tau, hard, training, seed):
    """(quantized, codes, prob_sum (G, V), code_sum (G, V)); logits (N, G*V), codebook (G*V, d)
    contiguous, mask None or uint8 (N,)."""
    n, gv = logits.shape
    v = gv // groups
    d = codebook.shape[1]
    dev = logits.device
    soft = training and not hard
    block_n, block_v, block_d = _blocks(v, d)
    if soft:
        block_n = 16  # tl.dot needs 16 rows
    grid = (triton.cdiv(n, block_n), groups)
    quantized = torch.empty(n, groups * d, dtype=codebook.dtype, device=dev)
    codes = torch.empty(n, groups, dtype=torch.int64, device=dev)
    psum = torch.empty(grid[0], groups, v, device=dev)
    csum = torch.empty(grid[0], groups, v, device=dev)
    _forward_kernel[grid](logits, codebook, logits if mask is None else mask, quantized, codes, psum, csum,
                          n, groups, v, d, seed, float(tau), HAS_MASK=mask is not None, TRAINING=training,
                          SOFT=soft, U_LO_C=U_LO, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d)
    return quantized, codes, psum.sum(0), csum.sum(0)


def backward(grad_q, w, logits, codebook_t, codes, mask, groups, tau, hard, training, seed, codebook_dtype):
    """(grad_logits, grad_codebook); codebook_t is the (G, d, V) fp32 transposed codebook."""
    n, gv = logits.shape
    v = gv // groups
    d = codebook_t.shape[1]
    dev = logits.device
    block_v = max(16, triton.next_power_of_2(v))
    block_d = min(32, max(16, triton.next_power_of_2(d)))
    grad_logits = torch.empty_like(logits)
    grad_cb = torch.empty(gv, d, dtype=codebook_dtype, device=dev)
    block_n = 16  # tl.dot needs 16 rows
    soft = training and not hard
    stats = torch.empty(n if soft else 0, groups, 2, device=dev)
    _backward_logits_kernel[(triton.cdiv(n, block_n), groups)](
        grad_q, logits, codebook_t, logits if mask is None else mask, logits if w is None else w, grad_logits,
        stats if soft else logits, n, groups, v, d, seed, float(tau), HAS_MASK=mask is not None, HAS_W=w is not None,
        TRAINING=training, SOFT=soft, U_LO_C=U_LO, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d)
    if soft:
        chunk_rows = soft_chunk_rows(n, block_n)
        n_chunks = triton.cdiv(n, chunk_rows)
        sb_v = min(64, max(16, triton.next_power_of_2(v)))
        sb_d = min(64, max(16, triton.next_power_of_2(d)))
        partial = torch.empty(n_chunks, gv, d, device=dev)
        _backward_codebook_soft_kernel[(n_chunks, groups * triton.cdiv(v, sb_v), triton.cdiv(d, sb_d))](
            grad_q, logits, stats, partial, n, groups, v, d, chunk_rows, seed, float(tau), U_LO_C=U_LO,
            BLOCK_N=block_n, BLOCK_V=sb_v, BLOCK_D=sb_d)
        return grad_logits, partial.sum(0).to(codebook_dtype)  # a fixed-order reduction: deterministic
    cb_block_d = min(128, max(16, triton.next_power_of_2(d)))
    _backward_codebook_kernel[(gv, triton.cdiv(d, cb_block_d))](
        grad_q, codes, grad_cb, n, groups, v, d, BLOCK_N=64, BLOCK_D=cb_block_d)
    return grad_logits, grad_cb
