"""Triton kernels of compute_mask_indices, bit-identical to sslfast/reference/masking.py.

* ``_mask_rows_kernel``: program ``b`` runs steps 1-5 of the reference for row ``b``: span
  count and lengths (vectors over BLOCK_N spans), the start keys of the row's R candidate
  starts (scratch), their ranks by counting (BLOCK_S x BLOCK_S tiles), each chosen start's
  span end, then coverage as a running maximum of span ends (``tl.associative_scan``).
* ``_equalize_kernel`` (fairseq style with require_same_masks or mask_dropout): program ``b``
  takes the minimum count over rows and keeps the row's masked frames of smallest key.
Scratch written and re-read by one program is fenced with ``tl.debug_barrier``.
"""
import torch
import triton
import triton.language as tl

from . import philox as kp

_COUNT = tl.constexpr(1)  # sslfast.random.Stream tags
_LENGTH = tl.constexpr(2)
_START = tl.constexpr(3)
_EQUALIZE = tl.constexpr(4)
_DROPOUT = tl.constexpr(5)
_FAR = tl.constexpr(2**63 - 1)


@triton.jit
def _word_at(seed, row, c, stream):
    """Word c % 4 of philox(c // 4, row, stream), elementwise over the tensor c (int64)."""
    zeros = c * 0
    w0, w1, w2, w3 = kp.philox4x32(seed, c >> 2, zeros + row, zeros + stream, zeros)
    k = c & 3
    w = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))
    return w.to(tl.int64) & 0xFFFFFFFF


@triton.jit
def _key(seed, row, pos, stream):
    return (_word_at(seed, row, pos, stream) << 31) | pos


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _mask_rows_kernel(lengths_ptr, pad_ptr, thr_ptr, lens_ptr, keys_ptr, ends_ptr, counts_ptr, out_ptr,
                      T, mask_prob, L, vmin, n_thr, min_masks, seed, n_cap, r_cap,
                      HF: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    sz = tl.load(lengths_ptr + b).to(tl.int64)

    # 1. span count: probabilistic rounding in fp64
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    count_row = b * 0 if HF else b
    u = tl.max(_word_at(seed, count_row, offs_n * 0, _COUNT), 0).to(tl.float64) * (1.0 / 4294967296.0)
    n = (mask_prob * sz.to(tl.float64) / L.to(tl.float64) + u).to(tl.int64)
    n = tl.maximum(n, min_masks)
    if HF:
        n = tl.where(n * L > T, T // L, n)
        n = tl.minimum(n, tl.maximum(sz - (L - 1), 0))

    # 2. span lengths (BLOCK_N spans at a time), kept in scratch for step 5
    lens_row = lens_ptr + b * n_cap
    min_len = sz * 0 + _FAR
    nonzero = sz * 0
    for i0 in range(0, n_cap, BLOCK_N):
        span = i0 + offs_n
        live = span < n
        w = _word_at(seed, b, span, _LENGTH)
        length = span * 0 + vmin
        for k in range(0, n_thr):
            length += (tl.load(thr_ptr + k) <= w).to(tl.int64)
        tl.store(lens_row + span, length, mask=span < n_cap)
        nonzero += tl.sum(tl.where(live & (length != 0), 1, 0), 0)
        min_len = tl.minimum(min_len, tl.min(tl.where(live, length, _FAR), 0))
    all_zero = (n > 0) & (nonzero == 0)
    fix = tl.minimum(L, sz - 1)  # fairseq: when every span is empty, span 0 gets min(L, sz - 1)
    tl.store(lens_row + offs_n, offs_n * 0 + fix, mask=(offs_n == 0) & (offs_n * 0 + all_zero.to(tl.int64) > 0))
    min_len = tl.where(all_zero, fix, min_len)

    # 3. start range
    if HF:
        R = sz - L + 1
    else:
        min_len = tl.where(sz - min_len <= n, sz - n - 1, min_len)
        R = sz - min_len
    R = tl.where(n > 0, R, 0)

    # 4. keys of the candidate starts
    offs_s = tl.arange(0, BLOCK_S).to(tl.int64)
    krow = keys_ptr + b * r_cap
    for s0 in range(0, r_cap, BLOCK_S):
        s = s0 + offs_s
        tl.store(krow + s, tl.where(s < R, _key(seed, b, s, _START), _FAR), mask=s < r_cap)
    tl.debug_barrier()

    # 5. rank by counting; chosen starts (rank < n) record their clipped span end. Starts at
    #    or past T cover nothing (ends are clipped to sz <= T), so only s < T is visited.
    erow = ends_ptr + b * T
    for s0 in range(0, T, BLOCK_S):
        s = s0 + offs_s
        key = tl.load(krow + s, mask=s < R, other=_FAR)
        rank = s * 0
        for j0 in range(0, R, BLOCK_S):
            other = tl.load(krow + j0 + offs_s, mask=j0 + offs_s < R, other=_FAR)
            rank += tl.sum((other[None, :] < key[:, None]).to(tl.int64), 1)
        chosen = (s < R) & (rank < n)
        length = tl.load(lens_row + rank, mask=chosen, other=0)
        tl.store(erow + s, tl.where(chosen, tl.minimum(s + length, sz), 0), mask=s < T)
    tl.debug_barrier()

    # coverage: frame t is masked when some chosen start <= t ends after t
    reach = sz * 0
    count = sz * 0
    for t0 in range(0, T, BLOCK_S):
        t = t0 + offs_s
        end = tl.load(erow + t, mask=t < T, other=0)
        run = tl.maximum(tl.associative_scan(end, 0, _max_combine), reach)
        m = run > t
        if HAS_PAD:
            m = m & (tl.load(pad_ptr + b * T + t, mask=t < T, other=1) == 0)
        m = m & (t < T)
        tl.store(out_ptr + b * T + t, m, mask=t < T)
        count += tl.sum(m.to(tl.int64), 0)
        reach = tl.maximum(reach, tl.max(end, 0))
    tl.store(counts_ptr + b, count)


@triton.jit
def _keep_smallest(out_row, krow, seed, b, T, keep, stream, BLOCK_S: tl.constexpr):
    """Keep the ``keep`` masked frames of the row with the smallest keys of ``stream``."""
    offs = tl.arange(0, BLOCK_S).to(tl.int64)
    for t0 in range(0, T, BLOCK_S):
        t = t0 + offs
        m = tl.load(out_row + t, mask=t < T, other=0) != 0
        tl.store(krow + t, tl.where(m, _key(seed, b, t, stream), _FAR), mask=t < T)
    tl.debug_barrier()
    for t0 in range(0, T, BLOCK_S):
        t = t0 + offs
        key = tl.load(krow + t, mask=t < T, other=_FAR)
        rank = t * 0
        for j0 in range(0, T, BLOCK_S):
            other = tl.load(krow + j0 + offs, mask=j0 + offs < T, other=_FAR)
            rank += tl.sum((other[None, :] < key[:, None]).to(tl.int64), 1)
        drop = (key != _FAR) & (rank >= keep)
        tl.store(out_row + t, tl.zeros([BLOCK_S], dtype=tl.int1), mask=(t < T) & drop)
    tl.debug_barrier()


@triton.jit
def _equalize_kernel(counts_ptr, keys_ptr, out_ptr, B, T, r_cap, dropout, seed,
                     REQUIRE_SAME: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    counts = tl.load(counts_ptr + rows, mask=rows < B, other=2**62)
    c = tl.load(counts_ptr + b)
    out_row = out_ptr + b * T
    krow = keys_ptr + b * r_cap
    if REQUIRE_SAME:
        least = tl.min(counts, 0)
        _keep_smallest(out_row, krow, seed, b, T, least, _EQUALIZE, BLOCK_S)
        c = tl.minimum(c, least)
    if DROPOUT:
        holes = _rint(c.to(tl.float64) * dropout)
        _keep_smallest(out_row, krow, seed, b, T, c - holes, _DROPOUT, BLOCK_S)


@triton.jit
def _rint(x):
    """Round half to even (numpy's rint) for x >= 0, without libdevice (the interpreter has none)."""
    f = x.to(tl.int64)
    frac = x - f.to(tl.float64)
    up = (frac > 0.5) | ((frac == 0.5) & ((f & 1) == 1))
    return f + up.to(tl.int64)


def compute_mask_indices(lengths, padding_mask, B, T, mask_prob, mask_length, vmin, thr, n_thr, min_masks,
                         require_same_masks, mask_dropout, hf, seed, n_cap, r_cap, out):
    """Fill ``out`` (B, T) bool; ``thr`` holds the n_thr length thresholds on the device."""
    if B == 0 or T == 0:
        return out
    dev = lengths.device
    lens = torch.empty(B * n_cap, dtype=torch.int64, device=dev)
    keys = torch.empty(B * r_cap, dtype=torch.int64, device=dev)
    ends = torch.empty(B * T, dtype=torch.int64, device=dev)
    counts = torch.empty(B, dtype=torch.int64, device=dev)
    block_s = min(128, triton.next_power_of_2(max(T, 16)))
    block_n = min(128, triton.next_power_of_2(max(n_cap, 16)))
    _mask_rows_kernel[(B,)](lengths, padding_mask if padding_mask is not None else out, thr, lens, keys, ends,
                            counts, out, T, float(mask_prob), mask_length, vmin, n_thr, min_masks, seed, n_cap,
                            r_cap, HF=bool(hf), HAS_PAD=padding_mask is not None, BLOCK_N=block_n, BLOCK_S=block_s)
    if hf or (not require_same_masks and mask_dropout <= 0):
        return out
    _equalize_kernel[(B,)](counts, keys, out, B, T, r_cap, float(mask_dropout), seed,
                           REQUIRE_SAME=bool(require_same_masks), DROPOUT=mask_dropout > 0,
                           BLOCK_B=triton.next_power_of_2(B), BLOCK_S=block_s)
    return out
