"""Reference span masking (wav2vec 2.0 / HuBERT / BEST-RQ).

The specification every backend of ``sslfast.compute_mask_indices`` reproduces bit for bit.
Each row is independent except for the equalisation step, and every random choice is a
Philox draw keyed by (seed, row, position, stream), so a GPU program per row can run it.

Per row ``b`` (``sz`` = non-padded frames; like fairseq and HF we assume right padding, and
padded frames are never masked whatever the padding pattern):

1. Span count. ``u`` = word 0 of ``philox(0, b, MASK_COUNT)`` / 2^32 (``style="hf"`` draws one
   ``u`` for the batch: row 0's). ``n = floor(mask_prob * sz / L + u)`` in fp64 (the
   probabilistic rounding of both), then ``max(n, min_masks)``. ``style="hf"`` then caps:
   ``n = T // L`` when ``n * L > T``, and ``n <= max(sz - L + 1, 0)``.
2. Span lengths (fairseq ``mask_type``): static ``L``; uniform over ``[mask_other, 2L]``;
   normal ``max(1, round(N(L, mask_other)))``; poisson ``Poisson(L)``. Span ``i`` draws by
   inversion of the exact discrete CDF, tabulated once on the host as 32-bit thresholds
   (``length_table``): the word ``i % 4`` of ``philox(i // 4, b, MASK_LENGTH)`` is compared
   with integers, so every backend gets the same lengths without transcendental functions.
   The CDF is truncated where its tail is below 2^-33. If every length is 0 (poisson), span
   0 gets ``min(L, sz - 1)`` (fairseq).
3. Start range. fairseq: ``min_len = min(lengths)``; ``min_len = sz - n - 1`` when
   ``sz - min_len <= n``; starts lie in ``[0, sz - min_len)``, so static spans never cover
   the last frame (fairseq's behaviour). HF: ``[0, sz - L]``.
4. Starts without replacement: the ``n`` positions of the range with the smallest keys
   ``(word, position)``, word ``s % 4`` of ``philox(s // 4, b, MASK_START)``: an exactly
   uniform n-subset (ties, probability ~2^-32, broken by position). fairseq's
   ``rng.choice(..., replace=False)`` draws the same distribution from another stream. The
   span with the ``i``-th smallest key gets length ``i``; lengths are i.i.d., so this is
   fairseq's random pairing of lengths with starts.
5. Spans are painted and clipped to ``[0, sz)``; overlapping spans merge (fairseq's unique).

fairseq style only, across rows:

6. ``require_same_masks``: every row keeps the ``m = min_b count_b`` masked frames with the
   smallest keys of stream ``MASK_EQUALIZE`` (fairseq: ``rng.choice`` of ``m`` masked
   frames: the same distribution). The minimum includes padded rows, as in fairseq.
7. ``mask_dropout``: each row unmasks ``rint(count * mask_dropout)`` frames (half to even,
   numpy's rint) chosen as the largest keys of stream ``MASK_DROPOUT``.

``no_overlap=True`` (fairseq style) replaces steps 3-5 by fairseq's interval placement,
run for all rows at once with a loop over the span index (``_no_overlap``): spans longest
first; a free interval chosen with probability proportional to its length among those with
room for length + min_space (word 2i of MASK_START: ``uint_below(word, total room)`` located
in the rooms' running sum); a start uniform in [s, e - length) (word 2i + 1); the left part
kept if start - s - min_space >= min_len, the right part if e - start - length - min_space >
min_len (the corrected condition); stop at the first span that fits nowhere. The interval
list keeps fairseq's order (pop the chosen one, append left then right). Where an interval
fits the span exactly numpy's ``randint(s, s)`` raises; here the start is s.
"""
from __future__ import annotations

import math

import torch

from .. import random as sr

__all__ = ["compute_mask_indices", "length_table"]

_TAIL = 2.0**-33
_TWO32 = 2**32
_FAR = 2**63 - 1  # above every real key (word << 31 | position) < 2**63


def length_table(mask_type: str, mask_length: int, mask_other: float) -> tuple[int, list[int]]:
    """(vmin, thresholds): span length = vmin + #{k : thresholds[k] <= word} for a uint32 word.

    thresholds[k] = round(F(vmin + k) * 2^32), F the CDF of the span-length distribution.
    """
    L = mask_length
    if mask_type == "static":
        return L, []
    if mask_type == "uniform":
        lo, hi = int(mask_other), 2 * L  # fairseq: randint(mask_other, 2L + 1)
        m = hi - lo + 1
        return lo, [(k * _TWO32) // m for k in range(1, m)]
    if mask_type == "normal":
        sigma = float(mask_other)
        if sigma == 0.0:
            return max(1, int(round(L))), []
        cdf = lambda x: 0.5 * (1.0 + math.erf((x - L) / (sigma * math.sqrt(2.0))))  # noqa: E731
        values, k = [], 1
        while True:  # P(max(1, round(X)) <= k) = P(X < k + 1/2)
            F = cdf(k + 0.5)
            if 1.0 - F < _TAIL:
                break
            values.append(F)
            k += 1
        return 1, [min(_TWO32, round(F * _TWO32)) for F in values]
    if mask_type == "poisson":
        lam = float(L)
        p = math.exp(-lam)
        F, values, k = p, [], 0
        while 1.0 - F >= _TAIL and k < 10 * lam + 100:
            values.append(F)
            k += 1
            p *= lam / k
            F += p
        return 0, [min(_TWO32, round(F * _TWO32)) for F in values]
    raise ValueError(f"mask_type must be static, uniform, normal or poisson, got {mask_type!r}")


def max_spans(T: int, mask_prob: float, mask_length: int, min_masks: int) -> int:
    """An upper bound of any row's span count, known on the host (no device read)."""
    return max(min_masks, int(mask_prob * T / mask_length + 1.0))


def _words(c: torch.Tensor, row: torch.Tensor, stream: int, seed: int | torch.Tensor, c_bound: int) -> torch.Tensor:
    """Word c % 4 of philox(c // 4, row, stream) for every element of c (row broadcasts);
    ``c_bound`` > every c, known on the host (so torch.compile needs no device read)."""
    blocks = max(c_bound - 1, 0) // 4 + 1
    c0 = torch.arange(blocks, device=c.device)
    w = torch.stack(sr.philox4x32(c0, row, int(stream), 0, seed), dim=-1)  # (.., blocks, 4)
    w = w.reshape(*w.shape[:-2], blocks * 4)
    return torch.gather(w.expand(*c.shape[:-1], -1), -1, c)


def _ranks(keys: torch.Tensor) -> torch.Tensor:
    """Rank of each key in its row (0 = smallest); keys are distinct within a row."""
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return ranks


def _keep_smallest(mask: torch.Tensor, keep: torch.Tensor, stream: int, seed: int | torch.Tensor) -> torch.Tensor:
    """Per row, the ``keep[b]`` masked frames with the smallest (word, position) keys."""
    B, T = mask.shape
    pos = torch.arange(T, device=mask.device).expand(B, T)
    rows = torch.arange(B, device=mask.device).unsqueeze(1)
    keys = (_words(pos, rows, stream, seed, T) << 31) | pos
    keys = torch.where(mask, keys, torch.full_like(keys, _FAR))
    return mask & (_ranks(keys) < keep.unsqueeze(1))


def compute_mask_indices(
    B: int,
    T: int,
    lengths: torch.Tensor,
    mask_prob: float,
    mask_length: int,
    mask_type: str,
    mask_other: float,
    min_masks: int,
    require_same_masks: bool,
    mask_dropout: float,
    style: str,
    seed: int | torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    no_overlap: bool = False,
    min_space: int = 0,
) -> torch.Tensor:
    """(B, T) bool mask; ``lengths`` (B,) int64 holds each row's non-padded frame count.

    ``seed`` is the Philox key, an int or a 0-d int64 tensor on ``lengths``' device, handed to
    ``sr.philox4x32`` as is (never read on the host: traceable, no sync)."""
    device = lengths.device
    L = mask_length
    if B == 0 or T == 0:
        return torch.zeros(B, T, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    sz = lengths.to(torch.int64)

    # 1. span count, probabilistic rounding in fp64
    count_rows = torch.zeros_like(rows) if style == "hf" else rows
    u = sr.philox4x32(0, count_rows, int(sr.Stream.MASK_COUNT), 0, seed)[0].to(torch.float64) * 2.0**-32
    n = torch.floor(mask_prob * sz.to(torch.float64) / float(L) + u).to(torch.int64).clamp_min(min_masks)
    if style == "hf":
        n = torch.where(n * L > T, torch.full_like(n, T // L), n)
        n = torch.minimum(n, (sz - (L - 1)).clamp_min(0))
    # Host bounds instead of n.max() and R.max(): no device read (torch.compile traces this
    # with fullgraph=True), and the same bits (positions past a row's n or R are never chosen).
    n_max = max_spans(T, mask_prob, L, min_masks)
    if n_max == 0:
        return torch.zeros(B, T, dtype=torch.bool, device=device)

    # 2. span lengths by inversion of the tabulated CDF
    span = torch.arange(n_max, device=device).expand(B, n_max)
    vmin, thresholds = length_table(mask_type, L, mask_other)
    if thresholds:
        w = _words(span, rows.unsqueeze(1), sr.Stream.MASK_LENGTH, seed, n_max)
        thr = torch.tensor(thresholds, dtype=torch.int64, device=device)
        span_len = vmin + (w.unsqueeze(-1) >= thr).sum(-1)
    else:
        span_len = torch.full((B, n_max), vmin, dtype=torch.int64, device=device)
    live = span < n.unsqueeze(1)
    if mask_type != "static":
        all_zero = ((span_len == 0) | ~live).all(1) & (n > 0)
        first = torch.where(all_zero, torch.minimum(torch.full_like(sz, L), sz - 1), span_len[:, 0])
        span_len = torch.cat([first.unsqueeze(1), span_len[:, 1:]], dim=1)

    if no_overlap:
        mask = _no_overlap(span_len, live, n, sz, min_space, T, seed)
        if padding_mask is not None:
            mask &= ~padding_mask
        return _equalize(mask, require_same_masks, mask_dropout, seed)

    # 3. start range
    if style == "hf":
        R = sz - L + 1
    else:
        min_len = torch.where(live, span_len, torch.full_like(span_len, _FAR)).amin(1)
        min_len = torch.where(sz - min_len <= n, sz - n - 1, min_len)
        R = sz - min_len
    R = torch.where(n > 0, R, torch.zeros_like(R))
    R_max = max(T, n_max + 1)  # R <= sz <= T, or n + 1 where a row is shorter than its spans

    # 4. the n positions with the smallest keys
    pos = torch.arange(R_max, device=device).expand(B, R_max)
    keys = (_words(pos, rows.unsqueeze(1), sr.Stream.MASK_START, seed, R_max) << 31) | pos
    keys = torch.where(pos < R.unsqueeze(1), keys, torch.full_like(keys, _FAR))
    rank = _ranks(keys)
    chosen = rank < n.unsqueeze(1)

    # 5. paint [start, start + length) clipped to the row: +1 / -1 at span ends, cumsum
    length = torch.gather(span_len, 1, rank.clamp_max(n_max - 1))
    length = torch.where(chosen, length, torch.zeros_like(length)).clamp_min(0)  # min(L, sz - 1) < 0 if sz = 0
    end = (pos + length).clamp_max(T)
    diff = torch.zeros(B, T + 1, dtype=torch.int64, device=device)
    diff.scatter_add_(1, pos.clamp_max(T), chosen.to(torch.int64) * (length > 0))
    diff.scatter_add_(1, end, -(chosen.to(torch.int64) * (length > 0)))
    mask = diff[:, :T].cumsum(1) > 0
    mask &= torch.arange(T, device=device).unsqueeze(0) < sz.unsqueeze(1)
    if padding_mask is not None:
        mask &= ~padding_mask

    if style == "fairseq":
        mask = _equalize(mask, require_same_masks, mask_dropout, seed)
    return mask


def _equalize(mask, require_same_masks, mask_dropout, seed):
    B = mask.shape[0]
    # 6. equalise every row to the smallest count
    if require_same_masks:
        counts = mask.sum(1)
        mask = _keep_smallest(mask, counts.min().expand(B), sr.Stream.MASK_EQUALIZE, seed)
    # 7. mask dropout
    if mask_dropout > 0:
        counts = mask.sum(1)
        holes = torch.round(counts.to(torch.float64) * mask_dropout).to(torch.int64)
        mask = _keep_smallest(mask, counts - holes, sr.Stream.MASK_DROPOUT, seed)
    return mask


def _no_overlap(span_len, live, n, sz, min_space, T, seed):
    """fairseq's interval placement (see the module docstring), all rows at once."""
    B, n_max = span_len.shape
    device = span_len.device
    rows = torch.arange(B, device=device)
    min_len = torch.where(live, span_len, torch.full_like(span_len, _FAR)).amin(1)
    lens = torch.where(live, span_len, torch.full_like(span_len, -1)).sort(1, descending=True).values
    cap = n_max + 2
    slot = torch.arange(cap, device=device).expand(B, cap)
    S = torch.zeros(B, cap, dtype=torch.int64, device=device)
    E = torch.zeros(B, cap, dtype=torch.int64, device=device)
    E[:, 0] = sz
    parts = torch.ones(B, dtype=torch.int64, device=device)
    going = n > 0
    diff = torch.zeros(B, T + 2, dtype=torch.int64, device=device)
    two_i = torch.arange(2 * n_max, device=device).expand(B, -1)
    words = _words(two_i, rows.unsqueeze(1), sr.Stream.MASK_START, seed, 2 * n_max)
    for i in range(n_max):
        length = lens[:, i]
        width = E - S
        room = torch.where((slot < parts.unsqueeze(1)) & (width >= (length + min_space).unsqueeze(1)), width, 0)
        total = room.sum(1)
        going = going & (i < n) & (total > 0)
        x = sr.uint_below(words[:, 2 * i], total.clamp_min(1))
        c = (room.cumsum(1) <= x.unsqueeze(1)).sum(1).clamp_max(cap - 1)
        s = S.gather(1, c.unsqueeze(1)).squeeze(1)
        e = E.gather(1, c.unsqueeze(1)).squeeze(1)
        free = e - length - s
        start = s + torch.where(free > 0, sr.uint_below(words[:, 2 * i + 1], free.clamp_min(1)), 0)
        on = going.to(torch.int64)
        diff.scatter_add_(1, start.clamp(0, T).unsqueeze(1), on.unsqueeze(1))
        diff.scatter_add_(1, (start + length.clamp_min(0)).clamp(0, T).unsqueeze(1), -on.unsqueeze(1))
        # pop slot c, then append the kept parts
        src = (slot + (slot >= c.unsqueeze(1)).to(torch.int64)).clamp_max(cap - 1)
        S2, E2, p2 = S.gather(1, src), E.gather(1, src), parts - 1
        left = start - s - min_space >= min_len
        right = e - start - length - min_space > min_len
        at_l = p2.clamp_max(cap - 1)
        S2 = torch.where((slot == at_l.unsqueeze(1)) & left.unsqueeze(1), s.unsqueeze(1), S2)
        E2 = torch.where((slot == at_l.unsqueeze(1)) & left.unsqueeze(1), (start - min_space + 1).unsqueeze(1), E2)
        at_r = (p2 + left.to(torch.int64)).clamp_max(cap - 1)
        S2 = torch.where((slot == at_r.unsqueeze(1)) & right.unsqueeze(1), (start + length + min_space).unsqueeze(1), S2)
        E2 = torch.where((slot == at_r.unsqueeze(1)) & right.unsqueeze(1), e.unsqueeze(1), E2)
        p2 = p2 + left.to(torch.int64) + right.to(torch.int64)
        g = going.unsqueeze(1)
        S, E, parts = torch.where(g, S2, S), torch.where(g, E2, E), torch.where(going, p2, parts)
    mask = diff[:, :T].cumsum(1) > 0
    return mask & (torch.arange(T, device=device).unsqueeze(0) < sz.unsqueeze(1))
