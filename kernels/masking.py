"""Triton kernels of compute_mask_indices, bit-identical to sslfast/reference/masking.py.

* ``_mask_rows_kernel``: program ``b`` runs steps 1-5 of the reference for row ``b``: span
  count and lengths (vectors over BLOCK_N spans), the start keys of the row's R candidate
  starts (scratch), their ranks by counting (BLOCK_S x BLOCK_S tiles), each chosen start's
  span end, then coverage as a running maximum of span ends (``tl.associative_scan``).
  With ``NO_OVERLAP`` steps 3-5 are fairseq's interval placement instead (``_no_overlap``):
  sequential over the spans, the interval list in scratch. When the row's result does not
  depend on other rows (no require_same_masks, or B == 1) it also applies mask_dropout.
* ``_equalize_kernel`` (fairseq style, require_same_masks with B > 1): program ``b`` takes
  the minimum count over rows, keeps the row's masked frames of smallest key, then applies
  mask_dropout.

Launches per call: one, except fairseq style with require_same_masks and B > 1: two. The
equalisation needs every row's masked count (a grid-wide minimum) before any row can be
cut; Triton has no grid-wide barrier, and spinning on an atomic counter deadlocks when the
B programs are not all resident (and in the interpreter, which runs them one after the
other). Recomputing all rows in every program would cost B times the row work.
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
_BLOCK_R = tl.constexpr(32)  # keys compared at a time by _rank


# Integer arguments compiled kernels must not specialise on: Triton turns an int argument
# equal to 1 into a compile-time constant (mask_length=1 then had no ``.to``). Every size
# here is used for arithmetic only, so its value or divisibility buys nothing. The seed is
# not an argument: both kernels load the key from ``seed_ptr`` (a 0-d int64 tensor,
# ``sslfast.random.seed_tensor``) when they run, so one compiled kernel serves every seed
# and a captured CUDA graph replays with the tensor's current value. The fp64 annotations make
# mask_prob and mask_dropout reach compiled kernels in fp64, as the interpreter keeps them
# (a Python float is otherwise passed as fp32: 0.1 * 25 would round to 3, not 2).
_SIZES = ("T", "B", "L", "vmin", "n_thr", "min_masks", "n_cap", "r_cap", "min_space", "ivl_cap")


@triton.jit
def _word_at(seed, row, c, stream):
    """Word c % 4 of philox(c // 4, row, stream), elementwise over the tensor c (int64)."""
    zeros = c * 0
    w0, w1, w2, w3 = kp.philox4x32(seed, c >> 2, zeros + row, zeros + stream, zeros)
    k = c & 3
    w = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))
    return w.to(tl.int64) & 0xFFFFFFFF


@triton.jit
def _rank(krow, key, n, BLOCK_R: tl.constexpr):
    """How many of the keys krow[0, n) are smaller than each of ``key`` (ranking by counting:
    the k smallest keys are those of rank < k). The comparisons run in (len(key), BLOCK_R)
    tiles: a square BLOCK_S x BLOCK_S tile of int64 keys does not fit in registers."""
    offs = tl.arange(0, BLOCK_R).to(tl.int64)
    rank = (key * 0).to(tl.int32)
    for j0 in range(0, n, BLOCK_R):
        other = tl.load(krow + j0 + offs, mask=j0 + offs < n, other=_FAR)
        rank += tl.sum((other[None, :] < key[:, None]).to(tl.int32), 1)
    return rank.to(tl.int64)


@triton.jit
def _key(seed, row, pos, stream):
    return (_word_at(seed, row, pos, stream) << 31) | pos


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit(do_not_specialize=_SIZES)
def _mask_rows_kernel(lengths_ptr, pad_ptr, thr_ptr, lens_ptr, keys_ptr, ends_ptr, ivl_ptr, counts_ptr, out_ptr,
                      T, mask_prob: tl.float64, L, vmin, n_thr, min_masks, seed_ptr, n_cap, r_cap, min_space,
                      ivl_cap, dropout: tl.float64,
                      HF: tl.constexpr, HAS_PAD: tl.constexpr, NO_OVERLAP: tl.constexpr, DROPOUT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    seed = kp.load_seed(seed_ptr)
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
    # the other live spans have length 0, so the shortest is min(fix, 0) when there are several
    min_len = tl.where(all_zero, tl.where(n > 1, tl.minimum(fix, 0), fix), min_len)

    offs_s = tl.arange(0, BLOCK_S).to(tl.int64)
    krow = keys_ptr + b * r_cap
    erow = ends_ptr + b * T
    if NO_OVERLAP:
        tl.debug_barrier()
        _no_overlap(lens_row, ivl_ptr + b * ivl_cap, erow, seed, b, sz, n, n_cap, min_len, min_space, T,
                    BLOCK_N, BLOCK_S, BLOCK_P)
    else:
        # 3. start range
        if HF:
            R = sz - L + 1
        else:
            min_len = tl.where(sz - min_len <= n, sz - n - 1, min_len)
            R = sz - min_len
        R = tl.where(n > 0, R, 0)

        # 4. keys of the candidate starts
        for s0 in range(0, r_cap, BLOCK_S):
            s = s0 + offs_s
            tl.store(krow + s, tl.where(s < R, _key(seed, b, s, _START), _FAR), mask=s < r_cap)
        tl.debug_barrier()

        # 5. rank by counting; chosen starts (rank < n) record their clipped span end. Starts
        #    at or past T cover nothing (ends are clipped to sz <= T), so only s < T is visited.
        for s0 in range(0, T, BLOCK_S):
            s = s0 + offs_s
            key = tl.load(krow + s, mask=s < R, other=_FAR)
            rank = _rank(krow, key, R, _BLOCK_R)
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
    if DROPOUT:  # 7. (step 6 is _equalize_kernel's, or a no-op here)
        tl.debug_barrier()
        _keep_smallest(out_ptr + b * T, krow, seed, b, T, count - _rint(count.to(tl.float64) * dropout), _DROPOUT,
                       BLOCK_S)


@triton.jit
def _no_overlap(lens_row, ivl, erow, seed, b, sz, n, n_cap, min_len, min_space, T,
                BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """fairseq's interval placement for row ``b`` (steps 3-5 with no_overlap; csrc/masking.h
    ``no_overlap_row``); writes each start's span end to ``erow`` for the coverage pass.

    ``ivl`` (9 n_cap + 2 int64 of scratch) holds the lengths sorted longest first, each
    span's start and end, the row's 2 n words of MASK_START, and the interval list (``S``,
    ``E``: 2 n_cap + 1 slots each). The list is kept by creation slot: an interval never
    moves, the chosen one is emptied (width 0: no room, never chosen again) and its left and
    right parts take the next two slots. Slot order is fairseq's list order (pop, append
    left, append right), so the running sum of rooms and the choice are the same. Each span
    walks the slots used so far in BLOCK_P chunks twice (the total room, then the slot where
    the running sum passes the drawn offset): registers stay bounded whatever the span count
    (the list used to live in registers, BLOCK_P >= 2 n + 1 slots, and spilled kilobytes
    at mask_length 1).
    """
    srt = ivl
    starts = ivl + n_cap
    ends = ivl + 2 * n_cap
    words = ivl + 3 * n_cap
    S_row = ivl + 5 * n_cap
    E_row = S_row + 2 * n_cap + 1
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_r = tl.arange(0, _BLOCK_R).to(tl.int64)

    # lengths, longest first: position = #longer + #equal before (a stable descending sort)
    for i0 in range(0, n, BLOCK_N):
        i = i0 + offs_n
        li = tl.load(lens_row + i, mask=i < n, other=0)
        pos = (i * 0).to(tl.int32)
        for j0 in range(0, n, _BLOCK_R):
            j = j0 + offs_r
            lj = tl.load(lens_row + j, mask=j < n, other=-1)
            before = (lj[None, :] > li[:, None]) | ((lj[None, :] == li[:, None]) & (j[None, :] < i[:, None]))
            pos += tl.sum((before & (j[None, :] < n)).to(tl.int32), 1)
        tl.store(srt + pos, li, mask=i < n)
    for c0 in range(0, 2 * n, BLOCK_N):  # span i draws word 2i (the interval) and 2i + 1 (the start)
        c = c0 + offs_n
        tl.store(words + c, _word_at(seed, b, c, _START), mask=c < 2 * n)
    tl.store(S_row, sz * 0)  # one interval, [0, sz)
    tl.store(E_row, sz)
    tl.debug_barrier()

    slot = tl.arange(0, BLOCK_P).to(tl.int64)
    created = sz * 0 + 1  # slots used
    going = n > 0
    for i in range(0, n):
        length = tl.load(srt + i)
        need = length + min_space
        total = sz * 0
        for p0 in range(0, created, BLOCK_P):
            p = p0 + slot
            w = tl.load(E_row + p, mask=p < created, other=0) - tl.load(S_row + p, mask=p < created, other=0)
            total += tl.sum(tl.where(w >= need, w, 0), 0)
        going = going & (total > 0)
        x = (tl.load(words + 2 * i) * tl.maximum(total, 1)) >> 32
        # the slot where the running sum of rooms passes x
        run0 = sz * 0
        s = sz * 0
        e = sz * 0
        at = sz * 0 - 1
        for p0 in range(0, created, BLOCK_P):
            p = p0 + slot
            S = tl.load(S_row + p, mask=p < created, other=0)
            E = tl.load(E_row + p, mask=p < created, other=0)
            room = tl.where(E - S >= need, E - S, 0)
            run = run0 + tl.cumsum(room, 0)
            hit = (room > 0) & (run > x) & (run - room <= x)
            s += tl.sum(tl.where(hit, S, 0), 0)
            e += tl.sum(tl.where(hit, E, 0), 0)
            at = tl.maximum(at, tl.max(tl.where(hit, p, -1), 0))
            run0 += tl.sum(room, 0)
        free = e - length - s
        start = s + tl.where(free > 0, (tl.load(words + 2 * i + 1) * tl.maximum(free, 1)) >> 32, 0)
        left = going & (start - s - min_space >= min_len)
        right = going & (e - start - length - min_space > min_len)
        tl.store(starts + i, tl.where(going, start, -1))  # -1: not placed, matches no frame
        tl.store(ends + i, tl.minimum(start + length, sz))
        tl.debug_barrier()  # every thread has read the list before it changes
        tl.store(E_row + at, s, mask=going)  # pop: width 0
        tl.store(S_row + created, s, mask=left)
        tl.store(E_row + created, start - min_space + 1, mask=left)
        at_r = created + left.to(tl.int64)
        tl.store(S_row + at_r, start + length + min_space, mask=right)
        tl.store(E_row + at_r, e, mask=right)
        created += left.to(tl.int64) + right.to(tl.int64)
        tl.debug_barrier()
    tl.debug_barrier()

    # span ends by start position (two spans can share a start when min_space = 0)
    offs_s = tl.arange(0, BLOCK_S).to(tl.int64)
    for t0 in range(0, T, BLOCK_S):
        t = t0 + offs_s
        reach = t * 0
        for j0 in range(0, n, _BLOCK_R):
            j = j0 + offs_r
            sj = tl.load(starts + j, mask=j < n, other=-1)
            ej = tl.load(ends + j, mask=j < n, other=0)
            reach = tl.maximum(reach, tl.max(tl.where(sj[None, :] == t[:, None], ej[None, :], 0), 1))
        tl.store(erow + t, reach, mask=t < T)


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
        rank = _rank(krow, key, T, _BLOCK_R)
        drop = (key != _FAR) & (rank >= keep)
        tl.store(out_row + t, tl.zeros([BLOCK_S], dtype=tl.int1), mask=(t < T) & drop)
    tl.debug_barrier()


@triton.jit(do_not_specialize=_SIZES)
def _equalize_kernel(counts_ptr, keys_ptr, out_ptr, B, T, r_cap, dropout: tl.float64, seed_ptr,
                     DROPOUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    seed = kp.load_seed(seed_ptr)
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    counts = tl.load(counts_ptr + rows, mask=rows < B, other=2**62)
    c = tl.load(counts_ptr + b)
    out_row = out_ptr + b * T
    krow = keys_ptr + b * r_cap
    least = tl.min(counts, 0)
    _keep_smallest(out_row, krow, seed, b, T, least, _EQUALIZE, BLOCK_S)
    c = tl.minimum(c, least)
    if DROPOUT:
        holes = _rint(c.to(tl.float64) * dropout)
        _keep_smallest(out_row, krow, seed, b, T, c - holes, _DROPOUT, BLOCK_S)


@triton.jit
def _rint(x):
    """Round half to even (numpy's rint) for x >= 0, without libdevice (the interpreter has none).

    The kernels are launched with ``enable_fp_fusion=False``: fused, ``x - f`` for x = count *
    dropout became fma(count, dropout, -f), the fraction of the unrounded product (25 * 0.1:
    0.5000000000000001, rounded up to 3 where every other backend gives 2)."""
    f = x.to(tl.int64)
    frac = x - f.to(tl.float64)
    up = (frac > 0.5) | ((frac == 0.5) & ((f & 1) == 1))
    return f + up.to(tl.int64)


def launches(B, T, hf, require_same_masks):
    """Kernel launches of one call (see the module docstring): 2 when rows are equalised
    across the batch, else 1; 0 for an empty batch."""
    if B == 0 or T == 0:
        return 0
    return 2 if equalizes(B, hf, require_same_masks) else 1


def equalizes(B, hf, require_same_masks):
    return not hf and bool(require_same_masks) and B > 1


def compute_mask_indices(lengths, padding_mask, B, T, mask_prob, mask_length, vmin, thr, n_thr, min_masks,
                         require_same_masks, mask_dropout, hf, seed, n_cap, r_cap, out, no_overlap=False,
                         min_space=0):
    """Fill ``out`` (B, T) bool; ``thr`` holds the n_thr length thresholds on the device and
    ``seed`` the key, a 0-d int64 tensor there (``sslfast.random.seed_tensor``). Every size
    comes from the host arguments: nothing is read back from the device."""
    if B == 0 or T == 0:
        return out
    dev = lengths.device
    lens = torch.empty(B * n_cap, dtype=torch.int64, device=dev)
    keys = torch.empty(B * r_cap, dtype=torch.int64, device=dev)
    ends = torch.empty(B * T, dtype=torch.int64, device=dev)
    counts = torch.empty(B, dtype=torch.int64, device=dev)
    # no_overlap: sorted lengths, starts, ends (n_cap each), 2 n_cap words, the interval list
    # (2 n_cap + 1 slots of S and of E)
    ivl_cap = 9 * n_cap + 2
    ivl = torch.empty(B * ivl_cap, dtype=torch.int64, device=dev) if no_overlap else lens
    block_s = min(128, triton.next_power_of_2(max(T, 16)))
    block_n = min(128, triton.next_power_of_2(max(n_cap, 16)))
    equalize = equalizes(B, hf, require_same_masks)
    _mask_rows_kernel[(B,)](lengths, padding_mask if padding_mask is not None else out, thr, lens, keys, ends, ivl,
                            counts, out, T, float(mask_prob), mask_length, vmin, n_thr, min_masks, seed, n_cap,
                            r_cap, min_space, ivl_cap, float(mask_dropout),
                            HF=bool(hf), HAS_PAD=padding_mask is not None, NO_OVERLAP=bool(no_overlap),
                            DROPOUT=not equalize and mask_dropout > 0, BLOCK_N=block_n, BLOCK_S=block_s,
                            BLOCK_P=min(128, triton.next_power_of_2(2 * n_cap + 1)) if no_overlap else 1,
                            enable_fp_fusion=False)
    if equalize:
        _equalize_kernel[(B,)](counts, keys, out, B, T, r_cap, float(mask_dropout), seed,
                               DROPOUT=mask_dropout > 0, BLOCK_B=triton.next_power_of_2(B), BLOCK_S=block_s,
                               enable_fp_fusion=False)
    return out
