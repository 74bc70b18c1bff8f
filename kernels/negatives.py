"""Triton kernels of sample_negatives, bit-identical to sslfast/reference/negatives.py.

Two launches, no host sync (given the packed output's row count, see ops/negatives.py):
* ``_scan_kernel``: program ``b`` scans row ``b`` in BLOCK_T chunks (running cumsum) and
  writes each frame's candidate rank and masked rank, the candidate-position table and the
  row's two counts.
* ``_draw_kernel``: program (``b``, ``pid_t``) owns BLOCK_T frames of row ``b``; it derives
  the row offsets from the counts (a BLOCK_B reduction: B is small) and, for each Philox
  block ``q`` of the frame, draws four negatives per frame.

Why not one launch: a frame's draws need counts from rows other than its own (its packed
output row is the number of masked frames before it in the batch; cross-sample negatives
index all candidates of the batch and, in the hf layout, map back through other rows'
candidate tables), so the scan of every row must finish before any draw. Triton has no
grid-wide barrier (spinning on an atomic counter deadlocks when the programs are not all
resident, and in the interpreter); one program per row doing both would draw with B
programs instead of B * cdiv(T, BLOCK_T) (B is about 8 per GPU at wav2vec 2.0 shapes), and
programs re-reading the whole batch would cost O(B^2 T) reads. Under a CUDA graph the
second launch costs little.
"""
import torch
import triton
import triton.language as tl

from . import philox as kp

_STREAM_NEGATIVES = tl.constexpr(16)  # sslfast.random.Stream.NEGATIVES
_STREAM_CROSS = tl.constexpr(17)  # Stream.CROSS_NEGATIVES


@triton.jit
def _scan_kernel(mask_ptr, pad_ptr, rank_ptr, mrank_ptr, pos_ptr, counts_ptr, B, T,
                 FROM_MASKED: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    n_cand = tl.sum(tl.zeros([BLOCK_T], dtype=tl.int32), 0)
    n_mask = tl.sum(tl.zeros([BLOCK_T], dtype=tl.int32), 0)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_row = offs_t < T
        m = tl.load(mask_ptr + base + offs_t, mask=in_row, other=0).to(tl.int32)
        if FROM_MASKED:
            c = m
        elif HAS_PAD:
            p = tl.load(pad_ptr + base + offs_t, mask=in_row, other=1).to(tl.int32)
            c = tl.where(in_row, m | (1 - p), 0)
        else:
            c = in_row.to(tl.int32)
        crank = n_cand + tl.cumsum(c, 0) - 1
        mrank = n_mask + tl.cumsum(m, 0) - 1
        tl.store(rank_ptr + base + offs_t, tl.where(c > 0, crank, -1), mask=in_row)
        tl.store(mrank_ptr + base + offs_t, tl.where(m > 0, mrank, -1), mask=in_row)
        tl.store(pos_ptr + base + crank, offs_t, mask=in_row & (c > 0))
        n_cand += tl.sum(c, 0)
        n_mask += tl.sum(m, 0)
    tl.store(counts_ptr + b, n_cand.to(tl.int64))
    tl.store(counts_ptr + B + b, n_mask.to(tl.int64))


@triton.jit
def _shifted(word, n, own):
    """Uniform over [0, n) without own (the fairseq / HF shift); own when n <= 1."""
    d = kp.uint_below(word, tl.maximum(n - 1, 1)).to(tl.int64)
    d = d + (d >= own).to(tl.int64)
    return tl.where(n > 1, d, own)


@triton.jit
def _pick(w0, w1, w2, w3, k: tl.constexpr):
    if k == 0:
        return w0
    elif k == 1:
        return w1
    elif k == 2:
        return w2
    else:
        return w3


@triton.jit
def _draw_kernel(rank_ptr, mrank_ptr, pos_ptr, counts_ptr, out_ptr, B, T, K, Kc, n_rows, seed,
                 HF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    b = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = offs_t < T
    rows = tl.arange(0, BLOCK_B)
    counts = tl.load(counts_ptr + rows, mask=rows < B, other=0)
    mcounts = tl.load(counts_ptr + B + rows, mask=rows < B, other=0)
    row_start = tl.sum(tl.where(rows < b, counts, 0), 0)
    mask_start = tl.sum(tl.where(rows < b, mcounts, 0), 0)
    n_row = tl.sum(tl.where(rows == b, counts, 0), 0)
    total = tl.sum(counts, 0)

    frame = b.to(tl.int64) * T + offs_t
    own = tl.load(rank_ptr + frame, mask=in_row, other=0).to(tl.int64)
    mrank = tl.load(mrank_ptr + frame, mask=in_row, other=-1).to(tl.int64)
    masked = mrank >= 0
    width = K + Kc
    if HF:
        out_row = frame * width
        writes = in_row
    else:
        out_row = (mask_start + mrank) * width
        writes = in_row & masked & (mask_start + mrank < n_rows)
    zeros = offs_t * 0
    row_base = b.to(tl.int64) * T

    kb = (K + 3) // 4
    for q in range(0, kb):
        w0, w1, w2, w3 = kp.philox4x32(seed, offs_t.to(tl.int64) * kb + q, zeros + b, zeros + _STREAM_NEGATIVES, zeros)
        for k in tl.static_range(4):
            j = 4 * q + k
            local = _shifted(_pick(w0, w1, w2, w3, k), n_row, own)
            if HF:
                v = row_base + tl.load(pos_ptr + row_base + local, mask=in_row & masked, other=0)
            else:
                v = row_start + local
            tl.store(out_ptr + out_row + j, tl.where(masked, v, -1), mask=writes & (zeros + j < K))

    kcb = (Kc + 3) // 4
    for q in range(0, kcb):
        w0, w1, w2, w3 = kp.philox4x32(seed, offs_t.to(tl.int64) * kcb + q, zeros + b, zeros + _STREAM_CROSS, zeros)
        for k in tl.static_range(4):
            j = 4 * q + k
            g = _shifted(_pick(w0, w1, w2, w3, k), total, row_start + own)
            if HF:
                # the row holding global rank g: a scan over the (few) row counts
                b2 = g * 0
                start2 = g * 0
                prev = tl.sum(tl.zeros([BLOCK_B], dtype=tl.int64), 0)
                for r in range(0, B):
                    end = prev + tl.load(counts_ptr + r)
                    inside = (g >= prev) & (g < end)
                    b2 = tl.where(inside, r, b2)
                    start2 = tl.where(inside, prev, start2)
                    prev = end
                v = b2 * T + tl.load(pos_ptr + b2 * T + (g - start2), mask=in_row & masked, other=0)
            else:
                v = g
            tl.store(out_ptr + out_row + K + j, tl.where(masked, v, -1), mask=writes & (zeros + j < Kc))


def sample_negatives(mask, padding_mask, K, Kc, from_masked_only, hf_layout, seed, n_rows, out):
    """Fill ``out`` (allocated by the caller) with the negatives of ``mask`` on its device."""
    B, T = mask.shape
    if B == 0 or T == 0 or K + Kc == 0:
        return out
    dev = mask.device
    rank = torch.empty(B, T, dtype=torch.int32, device=dev)
    mrank = torch.empty(B, T, dtype=torch.int32, device=dev)
    pos = torch.empty(B, T, dtype=torch.int32, device=dev)
    counts = torch.empty(2 * B, dtype=torch.int64, device=dev)
    block_t = min(1024, triton.next_power_of_2(T))
    _scan_kernel[(B,)](mask, padding_mask if padding_mask is not None else mask, rank, mrank, pos, counts, B, T,
                       FROM_MASKED=bool(from_masked_only), HAS_PAD=padding_mask is not None, BLOCK_T=block_t)
    block_t = min(128, triton.next_power_of_2(T))
    grid = (B, triton.cdiv(T, block_t))
    _draw_kernel[grid](rank, mrank, pos, counts, out, B, T, K, Kc, n_rows, seed,
                       HF=bool(hf_layout), BLOCK_T=block_t, BLOCK_B=triton.next_power_of_2(B))
    return out
