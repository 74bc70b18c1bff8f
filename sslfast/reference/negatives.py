"""Reference negative sampling for contrastive losses (wav2vec 2.0, HuBERT-style pipelines).

The specification every backend of ``sslfast.sample_negatives`` reproduces bit for bit.

Semantics
---------
Positives are the masked frames ``mask[b, t]`` in row-major order. The *candidates* of row
``b`` are its masked frames (``from_masked_only=True``, fairseq and Hugging Face) or all of
its frames that are not padding (``from_masked_only=False``; a masked frame is always a
candidate, even where ``padding_mask`` marks it as padding, so the positive can always be
excluded by rank). Candidates are numbered in row-major order: ``rank`` inside the row and
``global rank`` = row offset + rank across the batch.

* Within-utterance negatives (``K = num_negatives``): uniform over the row's other ``n - 1``
  candidates with replacement: ``d = uint_below(word, n - 1)``, then ``d + 1`` where
  ``d >= own rank`` (fairseq's and HF's shift), so never the positive itself.
* Cross-sample negatives (``Kc``): uniform over all candidates of the batch except the
  positive itself (the same shift on the global rank). fairseq applies the shift with the
  row-local index, which fails to exclude the positive for rows ``b > 0``; we do not.
* A row with a single candidate (or a batch with a single candidate, for cross-sample
  negatives) has no other frame to draw: those negatives are the positive's own index.
  Hugging Face's numpy sampler raises there and fairseq's ``randint(0, 0)`` fails;
  wav2vec 2.0's loss masks negatives equal to the positive (``neg_is_pos``), so returning
  the positive keeps such batches finite and in range.

Layouts
-------
* ``"packed"``: ``(N, K + Kc)`` int64, ``N = mask.sum()``, row ``i`` for the ``i``-th masked
  frame in row-major order; values index the packed candidate frames ``y[cand]`` (row-major),
  which is ``y[mask]`` when ``from_masked_only=True``.
* ``"hf"``: ``(B, T, K + Kc)`` int64 indexing the flattened ``(B*T)`` frames, the format of
  Hugging Face's ``sampled_negative_indices``; ``-1`` at unmasked positions (HF leaves a
  dummy 0 there; -1 makes a misuse fail loudly instead of reading frame 0).

Randomness
----------
Philox4x32-10 (``sslfast.random``). Frame ``t`` of row ``b`` owns ``ceil(K / 4)`` counter
blocks: negative ``j`` is word ``j % 4`` of ``philox(c0 = t * ceil(K/4) + j // 4, c1 = b,
c2 = Stream.NEGATIVES, c3 = 0)`` keyed by the seed (an int, or the 64 bits of a 0-d int64
seed tensor); cross-sample negatives likewise with ``Stream.CROSS_NEGATIVES`` and
``ceil(Kc / 4)``. Integers in ``[0, n)`` are the high word of
``word * n`` (bias below ``n / 2^32``).
"""
from __future__ import annotations

import torch

from .. import random as sr

__all__ = ["sample_negatives", "candidates"]


def candidates(mask: torch.Tensor, padding_mask: torch.Tensor | None, from_masked_only: bool) -> torch.Tensor:
    """The (B, T) bool candidate frames (see the module docstring)."""
    if from_masked_only:
        return mask
    if padding_mask is None:
        return torch.ones_like(mask)
    return mask | ~padding_mask


def _draw(ts: torch.Tensor, bs: torch.Tensor, count: int, stream: int, seed: int | torch.Tensor) -> torch.Tensor:
    """(P, count) words: frame ts[i] of row bs[i] owns blocks t * ceil(count/4) + q, four words each."""
    kb = (count + 3) // 4
    c0 = ts.unsqueeze(-1) * kb + torch.arange(kb, device=ts.device)
    words = torch.stack(sr.philox4x32(c0, bs.unsqueeze(-1), int(stream), 0, seed), dim=-1)
    return words.reshape(ts.numel(), 4 * kb)[:, :count]


def _shifted(words: torch.Tensor, n: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Uniform over [0, n) minus ``own``; ``own`` itself when n <= 1 (nothing else to draw)."""
    n, own = n.unsqueeze(-1), own.unsqueeze(-1)
    d = sr.uint_below(words, (n - 1).clamp_min(1))
    d = d + (d >= own).to(d.dtype)
    return torch.where(n > 1, d, own)


def sample_negatives(
    mask: torch.Tensor,
    num_negatives: int,
    cross_sample_negatives: int,
    padding_mask: torch.Tensor | None,
    from_masked_only: bool,
    layout: str,
    seed: int | torch.Tensor,
) -> torch.Tensor:
    """Negative indices for every masked frame; see the module docstring for the semantics.

    ``seed``: the Philox key, an int or a 0-d int64 tensor whose 64 bits are the key (read on
    its device by ``sslfast.random.philox4x32``, never on the host)."""
    B, T = mask.shape
    K, Kc = num_negatives, cross_sample_negatives
    device = mask.device
    cand = candidates(mask, padding_mask, from_masked_only)
    counts = cand.sum(1)  # (B,)
    rank = cand.to(torch.int64).cumsum(1) - 1  # rank of each candidate inside its row
    row_end = counts.cumsum(0)
    row_start = row_end - counts
    total = row_end[-1:] if B > 0 else counts.new_zeros(1)

    bs, ts = mask.nonzero(as_tuple=True)  # positives, row-major
    own = rank[bs, ts]
    parts = []
    if K > 0:
        w = _draw(ts, bs, K, sr.Stream.NEGATIVES, seed)
        local = _shifted(w, counts[bs], own)  # rank inside the row
        if layout == "packed":
            parts.append(row_start[bs].unsqueeze(-1) + local)
        else:
            pos = _positions(cand, rank)
            parts.append(bs.unsqueeze(-1) * T + pos[bs.unsqueeze(-1), local])
    if Kc > 0:
        w = _draw(ts, bs, Kc, sr.Stream.CROSS_NEGATIVES, seed)
        g = _shifted(w, total.expand_as(own), row_start[bs] + own)  # global rank
        if layout == "packed":
            parts.append(g)
        else:
            pos = _positions(cand, rank)
            b2 = torch.searchsorted(row_end, g, right=True)
            parts.append(b2 * T + pos[b2, g - row_start[b2]])
    n_out = K + Kc
    if parts:
        idx = torch.cat(parts, dim=-1)
    else:
        idx = torch.empty(bs.numel(), 0, dtype=torch.int64, device=device)
    if layout == "packed":
        return idx
    out = torch.full((B, T, n_out), -1, dtype=torch.int64, device=device)
    out[bs, ts] = idx
    return out


def _positions(cand: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(B, T) table: entry [b, r] is the frame of the r-th candidate of row b (0 past the end)."""
    B, T = cand.shape
    pos = torch.zeros(B, T, dtype=torch.int64, device=cand.device)
    b, t = cand.nonzero(as_tuple=True)
    pos[b, rank[b, t]] = t
    return pos
