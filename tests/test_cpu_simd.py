"""The SIMD paths of the C++ kernels (csrc/sslfast/cpu_isa.h): every level returns the
scalar path's bits, and the scalar path returns the reference's.

The ``cpu_isa`` fixture (conftest.py) runs a test once per level, forced with
``sslfast._C.set_cpu_isa``; levels this CPU lacks are reported as skipped.
"""
import numpy as np
import pytest
import torch

from sslfast import _ext, random as sr
from sslfast.reference import negatives as ref_negatives

pytestmark = [pytest.mark.cpu, pytest.mark.skipif(_ext._C is None, reason="C++ extension not built")]


def _scalar_words(n, c0, row, stream, seed):
    """philox4x32_10 one block at a time, from the torch implementation (sslfast.random)."""
    c0 = torch.as_tensor(np.asarray(c0, dtype=np.int64))
    words = sr.philox4x32(c0, row, stream, 0, seed)
    return torch.stack(words, dim=-1).reshape(-1).to(torch.int64) & 0xFFFFFFFF


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, 257])
def test_philox_bulk_matches_one_block_at_a_time(cpu_isa, n):
    mod = _ext.cpu_module()
    rng = np.random.default_rng(n)
    seed = int(rng.integers(0, 2**63))
    row, stream = int(rng.integers(0, 2**31)), 16
    counters = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    c0 = torch.from_numpy(counters.view(np.int32).copy())
    out = torch.empty(4 * n, dtype=torch.int32)
    mod.philox_bulk(out.data_ptr(), n, c0.data_ptr() if n else 0, 0, row, stream, seed)
    expected = _scalar_words(n, counters.astype(np.int64), row, stream, seed)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, expected)
    # consecutive counters, wrapping past 2**32 - 1
    first = 2**32 - 5
    mod.philox_bulk(out.data_ptr(), n, 0, first, row, stream, seed)
    expected = _scalar_words(n, (first + np.arange(n, dtype=np.int64)) % 2**32, row, stream, seed)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, expected)


def _check_selection(words: np.ndarray, live, k: int, smallest: bool):
    """_select_extreme against a sort of the keys (word << 31 | position) of the live positions."""
    mod = _ext.cpu_module()
    n = len(words)
    w = torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())
    lv = None if live is None else torch.from_numpy(live.astype(np.uint8))
    out = torch.full((max(k, 1),), -1, dtype=torch.int64)
    mod._select_extreme(w.data_ptr(), 0 if lv is None else lv.data_ptr(), n, k, smallest, out.data_ptr())
    keys = (words.astype(np.int64) << 31) | np.arange(n)
    if live is not None:
        keys = keys[live.astype(bool)]
    ordered = np.sort(keys)
    k_eff = min(k, len(keys))
    want = ordered[:k_eff] if smallest else ordered[len(keys) - k_eff:]
    assert sorted(out[:k_eff].tolist()) == sorted(want.tolist())


@pytest.mark.parametrize("smallest", [True, False])
@pytest.mark.parametrize("n,k", [(771, 50), (771, 0), (771, 771), (771, 1), (380, 370), (380, 38), (40, 20),
                                 (1000, 499), (1000, 501), (5, 2), (17, 3)])
@pytest.mark.parametrize("with_live", [False, True])
def test_select_extreme_uniform_words(cpu_isa, n, k, smallest, with_live):
    # words as the samplers draw them (uniform 32-bit); live: about half the positions, in spans
    rng = np.random.default_rng(1000 * n + k)
    words = rng.integers(0, 2**32, size=n, dtype=np.int64)
    live = (np.arange(n) // 7 % 2 == 0) if with_live else None
    _check_selection(words, live, k, smallest)


@pytest.mark.parametrize("smallest", [True, False])
def test_select_extreme_falls_back_when_the_threshold_misses(cpu_isa, smallest):
    # Words all near the top (for the smallest) or the bottom (for the largest) defeat the
    # threshold guess: the fallback must still select exactly.
    n = 600
    rng = np.random.default_rng(7)
    base = (2**32 - 2**20) if smallest else 0
    words = base + rng.integers(0, 2**20, size=n, dtype=np.int64)
    _check_selection(words, None, 30, smallest)
    _check_selection(words, np.arange(n) % 3 != 0, 30, smallest)


@pytest.mark.parametrize("layout", ["packed", "hf"])
@pytest.mark.parametrize("Kc", [0, 7])
def test_sample_negatives_same_bits_at_every_simd_level(cpu_isa, layout, Kc):
    import sslfast

    B, T, K = 5, 203, 37  # K not a multiple of 4 or 16
    mask = sslfast.compute_mask_indices((B, T), None, 0.5, 5, min_masks=1, seed=3, backend="reference")
    mask[2, :] = False
    mask[3, :3] = True
    got = sslfast.sample_negatives(mask, K, cross_sample_negatives=Kc, layout=layout, seed=11, backend="cpu")
    want = ref_negatives.sample_negatives(mask, K, Kc, None, True, layout, 11)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kw", [dict(), dict(style="hf"), dict(mask_dropout=0.2), dict(mask_type="uniform", mask_other=2),
                                dict(require_same_masks=False)])
def test_compute_mask_indices_same_bits_at_every_simd_level(cpu_isa, kw):
    import sslfast

    B, T = 6, 389
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 300:] = True
    pad[4, 17:] = True
    got = sslfast.compute_mask_indices((B, T), pad, 0.65, 10, min_masks=2, seed=5, backend="cpu", **kw)
    want = sslfast.compute_mask_indices((B, T), pad, 0.65, 10, min_masks=2, seed=5, backend="reference", **kw)
    assert torch.equal(got, want)
