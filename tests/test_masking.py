"""compute_mask_indices: bit-identity across backends, fairseq's algorithm
(an independent numpy port written from semantics.md) and Hugging Face's sampler as peers
by distribution, closed-form span-length tables, edge cases and validation."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

import sslfast
from sslfast import _dispatch
from sslfast.reference import masking as ref_masking
from _compile import aot_eager_no_host_reads

cmi = sslfast.compute_mask_indices


def _fairseq_numpy(sizes, T, p, L, min_masks, rng):
    """fairseq's static, overlapping compute_mask_indices (per-row rounding), without
    equalisation: an independent implementation from the description in semantics.md."""
    out = np.zeros((len(sizes), T), dtype=bool)
    for i, sz in enumerate(sizes):
        n = max(min_masks, int(p * sz / L + rng.random()))
        min_len = L
        if sz - min_len <= n:
            min_len = sz - n - 1
        starts = rng.choice(sz - min_len, n, replace=False)
        idx = (starts[:, None] + np.arange(L)[None, :]).ravel()
        out[i, np.unique(idx[idx < sz])] = True
    return out


# ---------------------------------------------------------------- bit identity (cpu tier)

GRID = list(itertools.product(
    [("static", 0.0), ("uniform", 2.0), ("normal", 2.5), ("poisson", 0.0)],
    ["fairseq", "hf"], [True, False], [0.0, 0.3], [0, 2], [(0.65, 10), (1.0, 1), (0.3, 3)]))


@pytest.mark.cpu
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 53), (4, 131)])
def test_cpu_bit_identical_to_reference(B, T):
    g = torch.Generator().manual_seed(B * T)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    pad = torch.arange(T)[None] >= lengths[:, None]
    checked = 0
    for (mt, mo), style, rs, dr, mm, (p, L) in GRID:
        if style == "hf" and (mt != "static" or dr):
            continue
        for pm in (None, pad):
            kw = dict(mask_type=mt, mask_other=mo, style=style, require_same_masks=rs, mask_dropout=dr,
                      min_masks=mm, seed=B * 1000 + T + checked)
            a = cmi((B, T), pm, p, L, backend="reference", **kw)
            b = cmi((B, T), pm, p, L, backend="cpu", **kw)
            assert torch.equal(a, b), kw
            checked += 1
    assert checked > 80


@pytest.mark.cpu
def test_reproducible_per_seed_and_seed_none():
    a = cmi((4, 200), None, 0.65, 10, seed=5)
    assert torch.equal(a, cmi((4, 200), None, 0.65, 10, seed=5))
    assert not torch.equal(a, cmi((4, 200), None, 0.65, 10, seed=6))
    torch.manual_seed(1)
    b = cmi((4, 200), None, 0.65, 10)
    torch.manual_seed(1)
    assert torch.equal(b, cmi((4, 200), None, 0.65, 10))


# ---------------------------------------------------------------- distributions

@pytest.mark.cpu
def test_fairseq_masked_fraction_matches_numpy_port():
    # semantics.md: about 0.491 at p=0.65, L=10, T=781 before equalisation (min_masks=2).
    B, T = 96, 781
    ours = cmi((B, T), None, 0.65, 10, min_masks=2, require_same_masks=False, seed=2024).double().mean(1).numpy()
    theirs = _fairseq_numpy([T] * B, T, 0.65, 10, 2, np.random.default_rng(0)).mean(1)
    assert abs(ours.mean() - 0.491) < 0.01
    assert abs(theirs.mean() - 0.491) < 0.01
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


@pytest.mark.cpu
def test_fairseq_start_range_and_padding():
    # static spans start in [0, sz - L - 1]: the last valid frame is never masked; padding never.
    B, T = 64, 97
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(30, T + 1, (B,), generator=g)
    pad = torch.arange(T)[None] >= lengths[:, None]
    m = cmi((B, T), pad, 0.65, 10, min_masks=2, require_same_masks=False, seed=11)
    assert not bool((m & pad).any())
    assert not bool(m[torch.arange(B), lengths - 1].any())
    assert bool(m[:, 0].any())
    # the same through Hugging Face's attention_mask convention
    assert torch.equal(m, cmi((B, T), None, 0.65, 10, min_masks=2, require_same_masks=False, seed=11,
                              attention_mask=(~pad).long()))


@pytest.mark.cpu
def test_require_same_masks_and_dropout():
    B, T = 8, 781
    m = cmi((B, T), None, 0.65, 10, min_masks=2, seed=7)
    counts = m.sum(1)
    assert bool((counts == counts[0]).all())
    assert abs(m.double().mean().item() - 0.46) < 0.03  # semantics.md: about 0.46 with B=8
    before = cmi((B, T), None, 0.65, 10, min_masks=2, require_same_masks=False, seed=7)
    assert bool((m <= before).all()) and int(counts[0]) == int(before.sum(1).min())
    d = cmi((B, T), None, 0.65, 10, min_masks=2, mask_dropout=0.3, seed=7)
    keep = int(counts[0]) - round(int(counts[0]) * 0.3)
    assert bool((d.sum(1) == keep).all()) and bool((d <= m).all())


@pytest.mark.cpu
def test_hf_style_matches_hugging_face_by_distribution():
    hf = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")
    B, T, p, L = 400, 60, 0.65, 10
    np.random.seed(0)
    theirs = torch.from_numpy(np.concatenate(
        [hf._compute_mask_indices((8, T), p, L, min_masks=2) for _ in range(B // 8)]))
    ours = cmi((B, T), None, p, L, min_masks=2, style="hf", seed=99)
    # per-frame masking probability profile (spans may end on the last frame in both)
    prof_t, prof_o = theirs.double().mean(0), ours.double().mean(0)
    se = (0.25 / B) ** 0.5
    assert float((prof_t - prof_o).abs().max()) < 5 * se * 2**0.5
    assert prof_o[-1] > 0 and prof_t[-1] > 0
    # distribution of masked counts per row
    a, b = theirs.sum(1).numpy(), ours.sum(1).numpy()
    m = max(a.max(), b.max()) + 1
    table = np.stack([np.bincount(a, minlength=m), np.bincount(b, minlength=m)])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3


@pytest.mark.cpu
def test_hf_style_with_attention_mask_never_masks_padding():
    hf = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")
    B, T = 32, 50
    lengths = torch.tensor([50, 40, 9, 10, 11, 25, 0, 33] * 4)
    att = (torch.arange(T)[None] < lengths[:, None]).long()
    ours = cmi((B, T), None, 0.5, 10, style="hf", seed=4, attention_mask=att)
    np.random.seed(0)
    theirs = torch.from_numpy(hf._compute_mask_indices((B, T), 0.5, 10, attention_mask=att))
    assert not bool(ours[att == 0].any())
    assert not bool(ours[lengths < 10].any())  # rows shorter than a span get none
    # HF marks a span-less row's dummy index T - 1, a padded frame: a difference on purpose
    long_rows = lengths >= 10
    assert not bool(theirs[long_rows][att[long_rows] == 0].any())
    assert bool(theirs[lengths == 0][:, T - 1].all())


@pytest.mark.cpu
@pytest.mark.parametrize("mask_type,mask_other", [("uniform", 3.0), ("normal", 2.0), ("poisson", 0.0)])
def test_length_tables_match_closed_forms(mask_type, mask_other):
    L = 10
    vmin, thr = ref_masking.length_table(mask_type, L, mask_other)
    cdf = np.array(thr, dtype=np.float64) / 2**32
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    values = vmin + np.arange(len(probs))
    if mask_type == "uniform":
        expected = np.where((values >= 3) & (values <= 2 * L), 1.0 / (2 * L - 3 + 1), 0.0)
    elif mask_type == "normal":
        lo, hi = stats.norm.cdf(values - 0.5, L, mask_other), stats.norm.cdf(values + 0.5, L, mask_other)
        expected = np.where(values == 1, hi, hi - lo)
    else:
        expected = stats.poisson.pmf(values, L)
    expected[-1] += 1.0 - expected.sum()  # the truncated tail lands on the last value
    assert np.abs(probs - expected).max() < 1e-8


@pytest.mark.cpu
def test_span_lengths_poisson_end_to_end():
    # One span per row (p tiny, min_masks=1) on long rows: the masked count is the span's
    # length (clipped by the row only when it runs past the end, which the range prevents).
    B, T = 2000, 400
    m = cmi((B, T), None, 0.0, 10, mask_type="poisson", min_masks=1, require_same_masks=False, seed=5)
    n = m.sum(1).numpy()
    counts = np.bincount(n, minlength=40)[:40]
    expected = stats.poisson.pmf(np.arange(40), 10) * B
    expected[0] += 0  # a zero-length sole span becomes min(L, sz - 1) = 10 (fairseq)
    expected[10] += expected[0]
    expected[0] = 0.0
    sel = expected > 5
    obs = counts[sel]
    exp = expected[sel] * obs.sum() / expected[sel].sum()
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def _fairseq_no_overlap_numpy(sz, n, L, min_space, rng):
    """fairseq's no_overlap placement for static spans, from semantics.md (independent port;
    an interval that fits a span exactly starts at its left end)."""
    mask = np.zeros(sz, dtype=bool)
    parts = [(0, sz)]
    for _ in range(n):
        lens = np.array([e - s if e - s >= L + min_space else 0 for s, e in parts])
        if lens.sum() == 0:
            break
        s, e = parts.pop(rng.choice(len(parts), p=lens / lens.sum()))
        start = rng.integers(s, e - L) if e - L > s else s
        mask[start:start + L] = True
        if start - s - min_space >= L:
            parts.append((s, start - min_space + 1))
        if e - start - L - min_space > L:
            parts.append((start + L + min_space, e))
    return mask


@pytest.mark.cpu
def test_no_overlap_bit_identical_to_reference():
    g = torch.Generator().manual_seed(2)
    B, T = 5, 97
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    pad = torch.arange(T)[None] >= lengths[:, None]
    for (mt, mo), ms, rs, (p, L) in itertools.product(
            [("static", 0.0), ("uniform", 2.0), ("poisson", 0.0)], [0, 2], [True, False], [(0.65, 10), (1.0, 1)]):
        kw = dict(mask_type=mt, mask_other=mo, no_overlap=True, min_space=ms, require_same_masks=rs, min_masks=2,
                  seed=ms + 10 * L)
        assert torch.equal(cmi((B, T), pad, p, L, backend="reference", **kw), cmi((B, T), pad, p, L, backend="cpu", **kw))


@pytest.mark.cpu
def test_no_overlap_spans_and_min_space():
    B, T, L, ms = 64, 400, 10, 3
    m = cmi((B, T), None, 0.65, L, no_overlap=True, min_space=ms, min_masks=2, require_same_masks=False, seed=9)
    for row in m.numpy():
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        starts, ends = edges[::2], edges[1::2]
        assert np.all(ends - starts == L), "static spans must stay whole and apart"
        assert np.all(starts[1:] - ends[:-1] >= ms), "spans closer than min_space"
    rng = np.random.default_rng(0)
    theirs = np.array([_fairseq_no_overlap_numpy(T, int(0.65 * T / L + rng.random()), L, ms, rng).sum()
                       for _ in range(B)])
    assert stats.ks_2samp(m.sum(1).numpy(), theirs).pvalue > 1e-3


# ---------------------------------------------------------------- edges and validation

@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_edge_cases(backend):
    kw = dict(backend=backend, seed=3)
    assert not bool(cmi((4, 50), None, 0.0, 10, **kw).any())  # p = 0, min_masks 0
    full = cmi((4, 50), None, 1.0, 1, require_same_masks=False, **kw)  # p = 1, L = 1
    assert int(full.sum(1).min()) >= 30
    assert cmi((0, 50), None, **kw).shape == (0, 50)
    assert cmi((3, 0), None, **kw).shape == (3, 0)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[1] = True  # an all-padded row
    pad[2, 4:] = True  # a row shorter than a span
    m = cmi((3, 20), pad, 0.65, 10, min_masks=2, require_same_masks=False, **kw)
    assert not bool(m[1].any()) and not bool(m[2, 4:].any()) and bool(m[2, :4].any())
    eq = cmi((3, 20), pad, 0.65, 10, min_masks=2, **kw)  # the padded row takes every count to 0
    assert not bool(eq.any())
    # mask_length > T: fairseq masks within the row, HF-style gives no span (HF raises)
    assert bool(cmi((2, 5), None, 0.65, 10, min_masks=2, require_same_masks=False, **kw).any())
    assert not bool(cmi((2, 5), None, 0.65, 10, style="hf", **kw).any())


@pytest.mark.cpu
def test_validation_errors():
    with pytest.raises(ValueError, match="shape"):
        cmi((4,), None)
    with pytest.raises(ValueError, match="shape"):
        cmi((-1, 5), None)
    with pytest.raises(ValueError, match="mask_prob"):
        cmi((2, 5), None, 1.5)
    with pytest.raises(ValueError, match="mask_length"):
        cmi((2, 5), None, 0.5, 0)
    with pytest.raises(ValueError, match="min_masks"):
        cmi((2, 5), None, min_masks=-1)
    with pytest.raises(ValueError, match="mask_type"):
        cmi((2, 5), None, mask_type="gauss")
    with pytest.raises(ValueError, match="mask_other"):
        cmi((2, 5), None, mask_type="uniform", mask_other=25.0)
    with pytest.raises(ValueError, match="mask_dropout"):
        cmi((2, 5), None, mask_dropout=2.0)
    with pytest.raises(ValueError, match="style"):
        cmi((2, 5), None, style="torchaudio")
    with pytest.raises(ValueError, match="mask_type"):
        cmi((2, 5), None, style="hf", mask_type="poisson")
    with pytest.raises(ValueError, match="padding_mask"):
        cmi((2, 5), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        cmi((2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        cmi((2, 5), torch.zeros(2, 5, dtype=torch.bool), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="seed"):
        cmi((2, 5), None, seed=-3)
    with pytest.raises(ValueError, match="min_space"):
        cmi((2, 5), None, no_overlap=True, min_space=-1)
    with pytest.raises(ValueError, match="no_overlap"):
        cmi((2, 5), None, no_overlap=True, style="hf")


@pytest.mark.cpu
@pytest.mark.slow
def test_torch_compile_fullgraph():
    def f(pad):
        return cmi((3, 40), pad, 0.65, 10, min_masks=2, seed=8, backend="cpu")

    pad = torch.zeros(3, 40, dtype=torch.bool)
    pad[1, 30:] = True
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(pad), f(pad))



# ---------------------------------------------------------------- seeds as tensors

# Every stream of the algorithm is drawn: span counts, non-static lengths, starts (and
# no_overlap's interval choices), require_same_masks' cut and mask_dropout.
_SEED_CASES = [
    dict(mask_type="poisson", min_masks=2, mask_dropout=0.2),
    dict(mask_type="uniform", mask_other=2.0, no_overlap=True, min_space=1, mask_dropout=0.1),
    dict(style="hf", min_masks=1),
]
_SEEDS = [0, 5, 2**32 + 7, 0x299F31D0A4093822, 2**63 - 1]


def _seed_inputs(device="cpu"):
    B, T = 4, 97
    pad = torch.arange(T)[None] >= torch.tensor([97, 80, 41, 97])[:, None]
    return (B, T), pad.to(device)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kw", _SEED_CASES)
def test_seed_tensor_draws_what_the_int_draws(backend, kw):
    # the int path is pinned against the reference by the tests above; a tensor holding the
    # same 64 bits must give the same mask, on every backend
    shape, pad = _seed_inputs()
    for s in _SEEDS:
        want = cmi(shape, pad, 0.65, 4, seed=s, backend="reference", **kw)
        got = cmi(shape, pad, 0.65, 4, seed=torch.tensor(s), backend=backend, **kw)
        assert torch.equal(got, want), s
        assert torch.equal(cmi(shape, pad, 0.65, 4, seed=torch.tensor([s]), backend=backend, **kw), want)
    assert not torch.equal(cmi(shape, pad, 0.65, 4, seed=torch.tensor(5), backend=backend, **kw),
                           cmi(shape, pad, 0.65, 4, seed=torch.tensor(6), backend=backend, **kw))


@pytest.mark.cpu
@pytest.mark.parametrize("kw", _SEED_CASES)
def test_negative_seed_tensor_is_its_64_bit_pattern(kw):
    # A tensor's 64 bits are the key (an int seed stops at 2^63 - 1): -5 is 2^64 - 5, so it
    # draws what neither 5 nor 2^63 - 5 draws, the same on every backend, every time.
    shape, pad = _seed_inputs()
    ref = cmi(shape, pad, 0.65, 4, seed=torch.tensor(-5), backend="reference", **kw)
    assert torch.equal(ref, cmi(shape, pad, 0.65, 4, seed=torch.tensor(-5), backend="reference", **kw))
    for _ in range(2):
        assert torch.equal(cmi(shape, pad, 0.65, 4, seed=torch.tensor(-5), backend="cpu", **kw), ref)
    for other in (5, 2**63 - 5):
        assert not torch.equal(ref, cmi(shape, pad, 0.65, 4, seed=other, backend="reference", **kw)), other


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_seed_none_is_a_draw_of_torchs_generator(backend):
    shape, pad = _seed_inputs()
    kw = dict(mask_type="normal", mask_other=2.0, min_masks=2, mask_dropout=0.1)
    torch.manual_seed(123)
    a = cmi(shape, pad, 0.65, 4, backend=backend, **kw)
    b = cmi(shape, pad, 0.65, 4, backend=backend, **kw)  # the generator moved on: another key
    torch.manual_seed(123)
    assert torch.equal(cmi(shape, pad, 0.65, 4, backend=backend, **kw), a)
    torch.manual_seed(123)
    drawn = torch.randint(0, 2**63 - 1, ())
    assert torch.equal(cmi(shape, pad, 0.65, 4, seed=int(drawn), backend="reference", **kw), a)
    assert not torch.equal(a, b)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_derived_seed_tensors_give_the_int_derivations_masks(backend):
    shape, pad = _seed_inputs()
    kw = dict(mask_type="poisson", min_masks=2, mask_dropout=0.2, backend=backend)
    masks = []
    for k in (0, 1, 7, 2**40 + 3):
        want = cmi(shape, pad, 0.65, 4, seed=sslfast.derive_seed(99, rank=3, step=k), **kw)
        for seed in (sslfast.derive_seed(99, rank=3, step=torch.tensor(k)),
                     sslfast.derive_seed(99, rank=torch.tensor(3), step=torch.tensor(k)),
                     sslfast.derive_seed(torch.tensor(99), rank=3, step=k)):
            assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64
            assert torch.equal(cmi(shape, pad, 0.65, 4, seed=seed, **kw), want), k
        masks.append(want)
    assert all(not torch.equal(x, y) for x, y in itertools.combinations(masks, 2))


@pytest.mark.cpu
def test_bad_seed_tensors_raise():
    shape, pad = _seed_inputs()
    for bad in (torch.tensor(5.0), torch.tensor(5, dtype=torch.int32), torch.tensor(True)):
        with pytest.raises(TypeError, match="int64"):
            cmi(shape, pad, seed=bad)
    with pytest.raises(ValueError, match="one value"):
        cmi(shape, pad, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one value"):
        cmi(shape, pad, seed=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="runs on"):  # the mask is made on the CPU, the seed is not
        cmi(shape, pad, seed=torch.tensor(5, device="meta"))
    with pytest.raises(TypeError, match="seed"):
        cmi(shape, pad, seed=5.0)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "cpu"])  # reference: 10-30 s
def test_torch_compile_fullgraph_with_seed_tensors_and_none(backend):
    # fullgraph=True fails on any graph break: seed=None must be traced (a torch.randint in the
    # graph, no .item()) and a seed tensor must reach the kernels as a tensor, read when they run.
    shape, pad = _seed_inputs()
    kw = dict(mask_type="poisson", min_masks=2, mask_dropout=0.2)

    def with_tensor(pad, seed):
        return cmi(shape, pad, 0.65, 4, seed=seed, backend=backend, **kw)

    def with_none(pad):
        return cmi(shape, pad, 0.65, 4, backend=backend, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(with_tensor, fullgraph=True, backend=aot_eager_no_host_reads)
    outs = []
    for s in (7, 8, 2**40 + 1):  # one graph: the seed's value is never baked in
        got = compiled(pad, torch.tensor(s))
        assert torch.equal(got, cmi(shape, pad, 0.65, 4, seed=s, backend="reference", **kw)), s
        outs.append(got)
    assert not torch.equal(outs[0], outs[1])
    compiled_none = torch.compile(with_none, fullgraph=True, backend=aot_eager_no_host_reads)
    torch.manual_seed(5)
    a = compiled_none(pad)
    b = compiled_none(pad)
    torch.manual_seed(5)
    assert torch.equal(a, with_none(pad)) and torch.equal(b, with_none(pad))
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- kernels

def _kernel_cases():
    return [
        dict(shape=(3, 37), pad_lengths=[37, 20, 3], mask_prob=0.65, mask_length=10, min_masks=2),
        dict(shape=(4, 29), pad_lengths=None, mask_prob=0.5, mask_length=3, mask_type="poisson",
             require_same_masks=False, mask_dropout=0.25),
        dict(shape=(2, 23), pad_lengths=[23, 11], mask_prob=0.65, mask_length=4, style="hf"),
        dict(shape=(3, 20), pad_lengths=[20, 2, 5], mask_prob=1.0, mask_length=1, min_masks=2,
             mask_type="uniform", mask_dropout=0.5),
        dict(shape=(3, 40), pad_lengths=None, mask_prob=0.65, mask_length=5, min_masks=2, mask_type="normal",
             mask_other=2.0, require_same_masks=False),
        dict(shape=(2, 30), pad_lengths=[30, 12], mask_prob=0.65, mask_length=5, min_masks=1,
             mask_type="poisson", mask_dropout=0.2),
    ]


def _run(case, backend, device):
    case = dict(case)
    B, T = case.pop("shape")
    lengths = case.pop("pad_lengths")
    pad = None if lengths is None else (torch.arange(T)[None] >= torch.tensor(lengths)[:, None]).to(device)
    return cmi((B, T), pad, device=device, backend=backend, seed=123456789, **case)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", range(6))
def test_triton_bit_identical_to_reference(case, triton_device):
    if "triton" not in _dispatch.implemented_backends("compute_mask_indices"):
        pytest.skip("compute_mask_indices has no triton backend in this build")
    c = _kernel_cases()[case]
    assert torch.equal(_run(c, "triton", triton_device).cpu(), _run(c, "reference", torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bit_identical_to_reference(backend):
    # Against the PyTorch reference, not the C++ backend (which shares csrc/masking.h).
    if backend not in _dispatch.implemented_backends("compute_mask_indices"):
        pytest.skip(f"compute_mask_indices has no {backend} backend in this build")
    for c in _kernel_cases():
        assert torch.equal(_run(c, backend, torch.device("cuda")).cpu(), _run(c, "reference", torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(200, 782, (64,), generator=g)
    pad = torch.arange(781)[None] >= lengths[:, None]
    for kw in (dict(min_masks=2), dict(mask_type="normal", mask_other=2.0, mask_dropout=0.1), dict(style="hf"),
               dict(no_overlap=True, min_space=2, min_masks=2)):
        a = cmi((64, 781), pad.cuda(), 0.65, 10, seed=77, backend=backend, **kw)
        b = cmi((64, 781), pad, 0.65, 10, seed=77, backend="reference", **kw)
        assert torch.equal(a.cpu(), b)


def _no_overlap_cases():
    """Interpreter-sized no_overlap cases: every mask type, padding (a row shorter than a span,
    an all-padded row), min_space > 0, spans that fit nowhere, require_same_masks and
    mask_dropout, B = 1 (dropout fused into the row kernel)."""
    return [
        dict(shape=(3, 37), pad_lengths=[37, 20, 3], mask_prob=0.65, mask_length=4, min_masks=2),
        dict(shape=(4, 29), pad_lengths=None, mask_prob=0.5, mask_length=3, mask_type="uniform", mask_other=1.0,
             min_space=2, require_same_masks=False, mask_dropout=0.25),
        dict(shape=(3, 40), pad_lengths=[40, 31, 12], mask_prob=0.65, mask_length=5, mask_type="normal",
             mask_other=2.0, min_space=1, min_masks=2, mask_dropout=0.3),
        dict(shape=(3, 30), pad_lengths=[30, 17, 0], mask_prob=0.65, mask_length=3, mask_type="poisson",
             min_masks=3, require_same_masks=False),
        dict(shape=(2, 24), pad_lengths=None, mask_prob=1.0, mask_length=4, min_space=3, min_masks=2,
             require_same_masks=False),  # 6-7 spans asked, at most 3 fit
        dict(shape=(3, 12), pad_lengths=None, mask_prob=0.3, mask_length=1, mask_type="poisson", min_masks=3,
             require_same_masks=False),  # every length 0 in some rows: span 0 gets min(L, sz - 1)
        dict(shape=(1, 33), pad_lengths=None, mask_prob=0.65, mask_length=4, min_space=1, mask_dropout=0.5),
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("seed", [5, 2024])
def test_triton_no_overlap_bit_identical(case, seed, triton_device):
    c = dict(_no_overlap_cases()[case], no_overlap=True)
    B, T = c["shape"]
    lengths = c.pop("pad_lengths")
    mp, L = c.pop("mask_prob"), c.pop("mask_length")
    c.pop("shape")
    pad = None if lengths is None else torch.arange(T)[None] >= torch.tensor(lengths)[:, None]
    kw = dict(c, seed=seed)
    ref = cmi((B, T), pad, mp, L, backend="reference", **kw)
    assert torch.equal(cmi((B, T), pad, mp, L, backend="cpu", **kw), ref)
    pad_d = None if pad is None else pad.to(triton_device)
    out = cmi((B, T), pad_d, mp, L, device=triton_device, backend="triton", **kw)
    assert torch.equal(out.cpu(), ref)
    if case == 4:
        assert int(ref.sum(1).max()) <= 3 * L  # the spans that fit nowhere were dropped
    if lengths is not None:
        assert not bool(ref[pad].any())


@pytest.mark.interpreter
@pytest.mark.parametrize("no_overlap", [False, True])
def test_triton_all_zero_poisson_lengths(no_overlap, triton_device):
    # Poisson(1) lengths are often all 0 for a row: span 0 then gets min(L, sz - 1) and the
    # shortest span (which decides the start range, or the kept interval parts) is 0 when
    # there are other spans. Seed 42 caught a triton kernel that took min(L, sz - 1) instead.
    kw = dict(mask_type="poisson", min_masks=3, require_same_masks=False, no_overlap=no_overlap)
    for seed in (42, 7):
        ref = cmi((3, 12), None, 0.3, 1, backend="cpu", seed=seed, **kw)
        out = cmi((3, 12), None, 0.3, 1, device=triton_device, backend="triton", seed=seed, **kw)
        assert torch.equal(out.cpu(), ref), seed


# ---------------------------------------------------------------- launches and host syncs

_LAUNCH_CASES = [
    # kwargs, kernels launched: one program per row; the equalisation to the smallest count
    # (fairseq's require_same_masks with B > 1) needs every row's count first: a second launch
    (dict(shape=(3, 20), require_same_masks=False), ["_mask_rows_kernel"]),
    (dict(shape=(3, 20), require_same_masks=False, mask_dropout=0.2), ["_mask_rows_kernel"]),
    (dict(shape=(3, 20), style="hf"), ["_mask_rows_kernel"]),
    (dict(shape=(1, 20), mask_dropout=0.2), ["_mask_rows_kernel"]),
    (dict(shape=(3, 20), no_overlap=True, min_space=1, require_same_masks=False, mask_dropout=0.2),
     ["_mask_rows_kernel"]),
    (dict(shape=(3, 20)), ["_mask_rows_kernel", "_equalize_kernel"]),
    (dict(shape=(3, 20), mask_dropout=0.2, no_overlap=True), ["_mask_rows_kernel", "_equalize_kernel"]),
    (dict(shape=(0, 20)), []),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("i", range(len(_LAUNCH_CASES)))
def test_triton_launches_per_call(i, triton_launches, triton_device):
    from sslfast.kernels import masking as km

    kw, expected = _LAUNCH_CASES[i]
    kw = dict(kw)
    B, T = kw.pop("shape")
    pad = torch.zeros(B, T, dtype=torch.bool, device=triton_device)
    if B:
        pad[0, 15:] = True
    out = cmi((B, T), pad, 0.5, 3, min_masks=1, seed=11, backend="triton", **kw)
    assert triton_launches.names == expected
    assert len(expected) == km.launches(B, T, kw.get("style") == "hf", kw.get("require_same_masks", True))
    assert torch.equal(out.cpu(), cmi((B, T), pad.cpu(), 0.5, 3, min_masks=1, seed=11, backend="reference", **kw))


@pytest.mark.interpreter
@pytest.mark.parametrize("kw", [dict(), dict(mask_dropout=0.1, mask_type="poisson"), dict(style="hf"),
                                dict(no_overlap=True, min_space=2, mask_type="uniform", mask_other=1.0)])
def test_triton_no_host_sync(kw, triton_on_meta):
    # On meta tensors every host read of device data raises (.item(), int(), .tolist(),
    # nonzero, ...): the whole public call, validation included, must get by without one.
    B, T = 4, 50
    pad = torch.zeros(B, T, dtype=torch.bool, device="meta")
    out = cmi((B, T), pad, 0.65, 10, min_masks=2, seed=3, device="meta", backend="triton", **kw)
    assert out.shape == (B, T) and out.device.type == "meta" and out.dtype == torch.bool
    hf, same = kw.get("style") == "hf", kw.get("require_same_masks", True)
    from sslfast.kernels import masking as km
    assert len(triton_on_meta) == km.launches(B, T, hf, same) == 1 + (not hf and same)
    # the detector itself: a host read on the same inputs does raise
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(pad.sum())


@pytest.mark.interpreter
@pytest.mark.parametrize("B", [1, 3])  # B = 1: dropout in the row kernel; B = 3: in _equalize_kernel
def test_triton_dropout_count_in_fp64(B, triton_device):
    # 25 masked frames per row (every row, after equalisation), mask_dropout = 0.1: the
    # reference unmasks rint(25 * 0.1) = rint(2.5) = 2 frames in fp64; with mask_dropout as
    # fp32 (what a compiled kernel gets for a plain float argument) 25 * 0.1f rounds to 3.
    # conftest passes float arguments to the interpreter as a compiled kernel receives them.
    kw = dict(require_same_masks=B > 1, seed=1)
    before = cmi((B, 60), None, 0.5, 5, backend="reference", **kw)
    assert before.sum(1).tolist() == [25] * B
    ref = cmi((B, 60), None, 0.5, 5, mask_dropout=0.1, backend="reference", **kw)
    assert ref.sum(1).tolist() == [23] * B
    out = cmi((B, 60), None, 0.5, 5, mask_dropout=0.1, device=triton_device, backend="triton", **kw)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.interpreter
@pytest.mark.parametrize("kw", [dict(no_overlap=True, min_space=0), dict(no_overlap=True, min_space=1, mask_dropout=0.1),
                                dict(style="hf"), dict(mask_type="poisson", mask_dropout=0.3)])
def test_triton_gpu_tiles_bit_identical(kw, triton_device):
    # The tiles a GPU runs at production shapes: BLOCK_S = 128 (rows of 300 frames: three
    # blocks), BLOCK_N = 128 and, with no_overlap at mask_length 1, the interval list
    # (2 n + 1 > 128 slots) walked in several BLOCK_P = 128 chunks.
    B, T = 2, 300
    pad = torch.arange(T)[None] >= torch.tensor([300, 211])[:, None]
    kw = dict(kw, require_same_masks=False, min_masks=2, seed=17)
    ref = cmi((B, T), pad, 0.65, 1, backend="reference", **kw)
    out = cmi((B, T), pad.to(triton_device), 0.65, 1, device=triton_device, backend="triton", **kw)
    assert torch.equal(out.cpu(), ref)
    if kw.get("no_overlap"):
        assert int(ref.sum(1).max()) > 64  # enough spans placed that the list spans chunks



# ---------------------------------------------------------------- seeds on the device (kernels)

@pytest.mark.interpreter
@pytest.mark.parametrize("kw", [dict(mask_type="poisson", min_masks=2, mask_dropout=0.2),  # both kernels draw
                                dict(no_overlap=True, min_space=1, min_masks=2, require_same_masks=False,
                                     mask_dropout=0.1),
                                dict(style="hf")])
def test_triton_seed_tensor_draws_what_the_int_draws(kw, triton_device):
    shape, pad = _seed_inputs()
    for s in (2**32 + 7, -5):  # above 32 bits; a negative tensor is its 64-bit pattern
        want = cmi(shape, pad, 0.65, 4, seed=torch.tensor(s), backend="reference", **kw)
        got = cmi(shape, pad.to(triton_device), 0.65, 4, seed=torch.tensor(s, device=triton_device),
                  backend="triton", **kw)
        assert torch.equal(got.cpu(), want), s
    assert torch.equal(cmi(shape, pad.to(triton_device), 0.65, 4, seed=2**32 + 7, backend="triton", **kw).cpu(),
                       cmi(shape, pad, 0.65, 4, seed=2**32 + 7, backend="reference", **kw))


def _graph_case():
    B, T = 8, 301
    lengths = torch.tensor([301, 280, 150, 301, 77, 301, 200, 290])
    pad = torch.arange(T)[None] >= lengths[:, None]
    # two launches on both backends (require_same_masks, then dropout), every stream drawn
    return (B, T), pad, dict(mask_type="poisson", min_masks=2, mask_dropout=0.2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replays_draw_fresh_masks(backend):
    # Captured once, replayed three times: (a) seed=None draws a fresh key at every replay
    # (torch's graph-safe Philox offsets); (b) seed=derive_seed(base, step=step) with step
    # advanced inside the graph draws step k's mask at replay k, what eager calls with the int
    # derivations draw (and the CPU reference).
    if backend not in _dispatch.implemented_backends("compute_mask_indices"):
        pytest.skip(f"compute_mask_indices has no {backend} backend in this build")
    dev = torch.device("cuda")
    shape, pad, kw = _graph_case()
    pad_d = pad.to(dev)
    # eager, with a device seed tensor: the reference's bits
    for s in (9, 2**32 + 7, -5):
        assert torch.equal(cmi(shape, pad_d, 0.65, 4, seed=torch.tensor(s, device=dev), backend=backend, **kw).cpu(),
                           cmi(shape, pad, 0.65, 4, seed=torch.tensor(s), backend="reference", **kw)), s
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, tables reach the device
        for _ in range(2):
            cmi(shape, pad_d, 0.65, 4, seed=None, backend=backend, **kw)
            cmi(shape, pad_d, 0.65, 4, seed=sslfast.derive_seed(3, step=torch.zeros((), dtype=torch.int64,
                                                                                    device=dev)),
                backend=backend, **kw)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    # (a) seed=None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cmi(shape, pad_d, 0.65, 4, seed=None, backend=backend, **kw)
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append(out.cpu())
    for m in replays:
        counts = m.sum(1)
        assert bool((counts == counts[0]).all()) and int(counts[0]) > 0  # require_same_masks held
        assert not bool(m[pad].any())
    assert all(not torch.equal(x, y) for x, y in itertools.combinations(replays, 2))

    # (b) a step tensor advanced inside the graph
    base = 2024
    step = torch.zeros((), dtype=torch.int64, device=dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.add_(1)
        out = cmi(shape, pad_d, 0.65, 4, seed=sslfast.derive_seed(base, step=step), backend=backend, **kw)
    step.zero_()  # capture records the kernels without running them; set it anyway
    replays = []
    for k in (1, 2, 3):
        graph.replay()
        torch.cuda.synchronize()
        assert int(step) == k
        got = out.cpu()
        seed_k = sslfast.derive_seed(base, step=k)
        assert torch.equal(got, cmi(shape, pad_d, 0.65, 4, seed=seed_k, backend=backend, **kw).cpu()), k
        assert torch.equal(got, cmi(shape, pad, 0.65, 4, seed=seed_k, backend="reference", **kw)), k
        replays.append(got)
    assert all(not torch.equal(x, y) for x, y in itertools.combinations(replays, 2))
