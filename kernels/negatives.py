"""Triton kernels of sample_negatives, bit-identical to sslfast/reference/negatives.py.

No host sync (given the packed output's row count, see ops/negatives.py). Launches per call:

* ``layout="packed"`` (any K, Kc, padding, from_masked_only): **one**, ``_one_pass_kernel``.
* ``layout="hf"`` without cross-sample negatives (Kc = 0; Hugging Face's case) and
  T <= HF_ONE_PASS_MAX_T (4096): **one**, ``_one_pass_kernel``.
* ``layout="hf"`` with Kc > 0, or with T > 4096: **two**, ``_scan_kernel`` then ``_draw_kernel``.

``_one_pass_kernel``: program (``b``, ``pid_t``) owns frames ``[pid_t * BLOCK_T, ...)`` of row
``b`` and derives everything its draws need from the (B, T) masks itself, instead of reading
counts another launch wrote:

* packed: one pass over the flattened frames ``[0, (b + 1) * T)`` (``[0, B * T)`` when
  Kc > 0) in BLOCK_SCAN chunks counts the masked frames before its first frame (its output
  row offset), the candidates of the rows before ``b`` (the row's packed candidate offset),
  of row ``b`` before its first frame (the frames' ranks) and in all of row ``b`` (the row's
  count), and (Kc > 0) of the rows after ``b`` (the cross-sample range). The in-chunk cumsums finish the ranks. A draw is
  then ``row_start + shifted(w, n_row, own)`` or ``shifted(w, total, row_start + own)``: no
  candidate table, no workspace. Cost: every program re-reads up to B * T mask bytes (twice
  that with a padding mask and from_masked_only=False): at B = 64, T = 781 that is 50 KB
  per program for 64 * 7 programs (BLOCK_T = 128), about 22 MB of L2 reads in all, a few
  microseconds on an H100-class L2 against a second launch and its dependency (an estimate,
  not a measurement).
* hf, Kc = 0: a within-row draw is a candidate rank of the program's own row that has to
  become a frame index, so the program scans its row once and writes the row's
  rank -> frame table to a private scratch slice (one per program: no two programs write the
  same word), then ``tl.debug_barrier()`` (bar.sync: the program's stores are visible to all
  its threads) and gathers from it. Reads T mask bytes and writes 4 T bytes per program;
  the scratch is B * cdiv(T, BLOCK_T) * T int32 (1.4 MB at B = 64, T = 781), quadratic in
  T, hence the limit on T (longer rows take the two-launch path, whose table is B * T).

Why hf with Kc > 0 stays two launches: a cross-sample draw is a global candidate rank that
maps to a frame through *another* row's candidate table, so a single-launch program would
have to rebuild the tables of the whole batch (B * T int32 writes per program, O(B^2 T)
in all) or wait for other programs; Triton has no grid-wide barrier (spinning on an atomic
counter deadlocks when the programs are not all resident, and in the interpreter). So
``_scan_kernel`` (program ``b`` scans row ``b``: ranks, masked ranks, candidate table,
counts) runs first and ``_draw_kernel`` (program (``b``, ``pid_t``), like the above) draws.
"""
import torch
import triton
import triton.language as tl

from . import philox as kp

_STREAM_NEGATIVES = tl.constexpr(16)  # sslfast.random.Stream.NEGATIVES
_STREAM_CROSS = tl.constexpr(17)  # Stream.CROSS_NEGATIVES
# Integer arguments compiled kernels do not specialise on: an int equal to 1 would become a
# compile-time constant and a multiple of 16 another specialisation, one compile per class of
# B, T, K, Kc and row count for no gain (the masks are bytes, the draws scattered). The seed is
# a pointer (a 0-d int64 tensor, loaded by the kernel): one compile serves every seed, and a
# captured CUDA graph replays with the tensor's current value.
_COUNTS = ("B", "T", "K", "Kc", "n_rows")


@triton.jit
def _candidate(m, pad_ptr, offs, in_range, FROM_MASKED: tl.constexpr, HAS_PAD: tl.constexpr):
    """1 where the frame at flat offset ``offs`` is a candidate (m: its int32 mask bit)."""
    if FROM_MASKED:
        c = m
    elif HAS_PAD:
        p = tl.load(pad_ptr + offs, mask=in_range, other=1).to(tl.int32)
        c = tl.where(in_range, m | (1 - p), 0)
    else:
        c = in_range.to(tl.int32)
    return c


@triton.jit(do_not_specialize=_COUNTS)
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
        c = _candidate(m, pad_ptr, base + offs_t, in_row, FROM_MASKED, HAS_PAD)
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
def _within(out_ptr, out_row, writes, masked, b, offs_t, own, n_row, row_start, row_base, table_ptr, seed, K,
            HF: tl.constexpr):
    """The K within-row negatives of frames ``offs_t`` of row ``b`` (own: their row ranks).

    packed: ``row_start + rank``; hf: ``row_base + table_ptr[rank]`` (table_ptr: the row's
    rank -> frame table)."""
    zeros = offs_t * 0
    kb = (K + 3) // 4
    for q in range(0, kb):
        w0, w1, w2, w3 = kp.philox4x32(seed, offs_t.to(tl.int64) * kb + q, zeros + b, zeros + _STREAM_NEGATIVES, zeros)
        for k in tl.static_range(4):
            j = 4 * q + k
            local = _shifted(_pick(w0, w1, w2, w3, k), n_row, own)
            if HF:
                v = row_base + tl.load(table_ptr + local, mask=masked, other=0)
            else:
                v = row_start + local
            tl.store(out_ptr + out_row + j, tl.where(masked, v, -1), mask=writes & (zeros + j < K))


@triton.jit
def _cross(out_ptr, out_row, writes, masked, b, offs_t, own, row_start, total, seed, K, Kc, B, T, pos_ptr,
           counts_ptr, HF: tl.constexpr):
    """The Kc cross-sample negatives of frames ``offs_t`` of row ``b``.

    packed: the global candidate rank; hf: its frame, through the row counts and the
    candidate tables ``pos_ptr`` of ``_scan_kernel`` (two launches)."""
    zeros = offs_t * 0
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
                prev = total * 0
                for r in range(0, B):
                    end = prev + tl.load(counts_ptr + r)
                    inside = (g >= prev) & (g < end)
                    b2 = tl.where(inside, r, b2)
                    start2 = tl.where(inside, prev, start2)
                    prev = end
                v = b2 * T + tl.load(pos_ptr + b2 * T + (g - start2), mask=masked, other=0)
            else:
                v = g
            tl.store(out_ptr + out_row + K + j, tl.where(masked, v, -1), mask=writes & (zeros + j < Kc))


@triton.jit(do_not_specialize=_COUNTS)
def _one_pass_kernel(mask_ptr, pad_ptr, table_ptr, out_ptr, B, T, K, Kc, n_rows, seed_ptr,
                     FROM_MASKED: tl.constexpr, HAS_PAD: tl.constexpr, HF: tl.constexpr, CROSS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_SCAN: tl.constexpr):
    b = tl.program_id(0)
    pid_t = tl.program_id(1)
    t0 = pid_t * BLOCK_T
    row_base = b.to(tl.int64) * T
    first = row_base + t0  # flat offset of the program's first frame
    offs_s = tl.arange(0, BLOCK_SCAN)
    if HF:
        # Row b only: its rank -> frame table into this program's scratch slice, the
        # candidates before the program's first frame, the row's count.
        table = table_ptr + (row_base * 0 + b * tl.num_programs(1) + pid_t) * T
        n_cand = tl.sum(tl.zeros([BLOCK_SCAN], dtype=tl.int32), 0)
        before = tl.zeros([BLOCK_SCAN], dtype=tl.int32)
        for s in range(0, T, BLOCK_SCAN):
            offs = s + offs_s
            in_row = offs < T
            m = tl.load(mask_ptr + row_base + offs, mask=in_row, other=0).to(tl.int32)
            c = _candidate(m, pad_ptr, row_base + offs, in_row, FROM_MASKED, HAS_PAD)
            tl.store(table + n_cand + tl.cumsum(c, 0) - 1, offs, mask=in_row & (c > 0))
            before += tl.where(offs < t0, c, 0)
            n_cand += tl.sum(c, 0)
        tl.debug_barrier()  # the table is read back by other threads of this program
        own0 = tl.sum(before, 0).to(tl.int64)  # candidates of row b before frame t0
        n_row = n_cand.to(tl.int64)
        row_start = own0 * 0
        total = own0 * 0
        masked_before = own0 * 0
    else:
        # Three spans of the flattened masks: rows before b (counted whole), row b (split at
        # the program's first frame) and, for the cross-sample total only, the rows after b.
        m_before = tl.zeros([BLOCK_SCAN], dtype=tl.int32)  # masked frames of rows < b
        c_before = tl.zeros([BLOCK_SCAN], dtype=tl.int32)  # candidates of rows < b
        for s in range(0, row_base, BLOCK_SCAN):
            offs = s + offs_s
            span = offs < row_base
            m = tl.load(mask_ptr + offs, mask=span, other=0).to(tl.int32)
            m_before += m
            c_before += _candidate(m, pad_ptr, offs, span, FROM_MASKED, HAS_PAD)
        m_first = tl.zeros([BLOCK_SCAN], dtype=tl.int32)  # masked frames of row b before t0
        c_first = tl.zeros([BLOCK_SCAN], dtype=tl.int32)  # candidates of row b before t0
        c_b = tl.zeros([BLOCK_SCAN], dtype=tl.int32)  # candidates of row b
        for s in range(0, T, BLOCK_SCAN):
            offs = s + offs_s
            span = offs < T
            m = tl.load(mask_ptr + row_base + offs, mask=span, other=0).to(tl.int32)
            c = _candidate(m, pad_ptr, row_base + offs, span, FROM_MASKED, HAS_PAD)
            m_first += tl.where(offs < t0, m, 0)
            c_first += tl.where(offs < t0, c, 0)
            c_b += c
        c_after = tl.zeros([BLOCK_SCAN], dtype=tl.int32)  # candidates of rows > b
        if CROSS:
            end = (row_base * 0 + B) * T
            for s in range(row_base + T, end, BLOCK_SCAN):
                offs = s + offs_s
                span = offs < end
                m = tl.load(mask_ptr + offs, mask=span, other=0).to(tl.int32)
                c_after += _candidate(m, pad_ptr, offs, span, FROM_MASKED, HAS_PAD)
        row_start = tl.sum(c_before, 0).to(tl.int64)
        masked_before = tl.sum(m_before, 0).to(tl.int64) + tl.sum(m_first, 0)
        own0 = tl.sum(c_first, 0).to(tl.int64)
        n_row = tl.sum(c_b, 0).to(tl.int64)
        total = row_start + n_row + tl.sum(c_after, 0)
        table = table_ptr

    seed = kp.load_seed(seed_ptr)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    in_row = offs_t < T
    frame = row_base + offs_t
    m = tl.load(mask_ptr + frame, mask=in_row, other=0).to(tl.int32)
    c = _candidate(m, pad_ptr, frame, in_row, FROM_MASKED, HAS_PAD)
    own = own0 + tl.cumsum(c, 0) - 1
    masked = m > 0
    width = K + Kc
    if HF:
        out_row = frame * width
        writes = in_row
    else:
        row = masked_before + tl.cumsum(m, 0) - 1
        out_row = row * width
        writes = masked & (row < n_rows)
    _within(out_ptr, out_row, writes, masked, b, offs_t, own, n_row, row_start, row_base, table, seed, K, HF)
    if CROSS:  # packed only: hf with Kc > 0 takes the two-launch path
        _cross(out_ptr, out_row, writes, masked, b, offs_t, own, row_start, total, seed, K, Kc, B, T, table_ptr,
               table_ptr, False)


@triton.jit(do_not_specialize=_COUNTS)
def _draw_kernel(rank_ptr, mrank_ptr, pos_ptr, counts_ptr, out_ptr, B, T, K, Kc, n_rows, seed_ptr,
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

    row_base = b.to(tl.int64) * T
    frame = row_base + offs_t
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
    seed = kp.load_seed(seed_ptr)
    _within(out_ptr, out_row, writes, masked, b, offs_t, own, n_row, row_start, row_base, pos_ptr + row_base, seed, K,
            HF)
    _cross(out_ptr, out_row, writes, masked, b, offs_t, own, row_start, total, seed, K, Kc, B, T, pos_ptr,
           counts_ptr, HF)


# Longest row the hf layout (Kc = 0) takes in one launch: the per-program tables cost
# cdiv(T, BLOCK_T) * T int32 per row (512 KB at T = 4096), quadratic in T.
HF_ONE_PASS_MAX_T = 4096


def launches(hf_layout: bool, Kc: int, T: int) -> int:
    """Kernel launches of one call with work to do (see the module docstring)."""
    return 2 if hf_layout and (Kc > 0 or T > HF_ONE_PASS_MAX_T) else 1


def sample_negatives(mask, padding_mask, K, Kc, from_masked_only, hf_layout, seed, n_rows, out):
    """Fill ``out`` (allocated by the caller) with the negatives of ``mask`` on its device.

    ``seed``: the key as a 0-d int64 tensor on mask's device (``sslfast.random.seed_tensor``),
    read by the kernels when they run."""
    B, T = mask.shape
    if B == 0 or T == 0 or K + Kc == 0:
        return out
    dev = mask.device
    pad = padding_mask if padding_mask is not None else mask
    flags = dict(FROM_MASKED=bool(from_masked_only), HAS_PAD=padding_mask is not None)
    block_t = min(128, triton.next_power_of_2(T))
    grid = (B, triton.cdiv(T, block_t))
    if launches(hf_layout, Kc, T) == 1:
        # hf: the per-program rank -> frame tables; packed: nothing (a dummy pointer)
        table = torch.empty(B * grid[1] * T if hf_layout else 1, dtype=torch.int32, device=dev)
        _one_pass_kernel[grid](mask, pad, table, out, B, T, K, Kc, n_rows, seed, HF=bool(hf_layout), CROSS=Kc > 0,
                               BLOCK_T=block_t, BLOCK_SCAN=min(2048, triton.next_power_of_2(T if hf_layout else B * T)),
                               **flags)
        return out
    rank = torch.empty(B, T, dtype=torch.int32, device=dev)
    mrank = torch.empty(B, T, dtype=torch.int32, device=dev)
    pos = torch.empty(B, T, dtype=torch.int32, device=dev)
    counts = torch.empty(2 * B, dtype=torch.int64, device=dev)
    _scan_kernel[(B,)](mask, pad, rank, mrank, pos, counts, B, T, BLOCK_T=min(1024, triton.next_power_of_2(T)), **flags)
    _draw_kernel[grid](rank, mrank, pos, counts, out, B, T, K, Kc, n_rows, seed,
                       HF=bool(hf_layout), BLOCK_T=block_t, BLOCK_B=triton.next_power_of_2(B))
    return out
