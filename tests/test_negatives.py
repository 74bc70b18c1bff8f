"""sample_negatives: bit-identity across backends, the sampling distribution (chi-square),
Hugging Face's sampler as a peer by distribution, layouts, edge cases and validation."""
import numpy as np
import pytest
import torch
from scipy import stats

import sslfast
from sslfast import _dispatch
from sslfast import random as sr
from sslfast.reference import negatives as ref_negatives
from _compile import aot_eager_no_host_reads

HAS_CUDA = torch.cuda.is_available()


def _batch(B, T, p=0.5, pad_frac=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < p
    pad = None
    if pad_frac > 0:
        lengths = (T * (1 - pad_frac * torch.rand(B, generator=g))).long().clamp(1, T)
        pad = torch.arange(T)[None, :] >= lengths[:, None]
        mask &= ~pad
    return mask, pad


def _candidates(mask, pad, from_masked_only):
    if from_masked_only:
        return mask
    return mask | (~pad if pad is not None else torch.ones_like(mask))


def _check_valid(mask, pad, out, K, Kc, from_masked_only, layout):
    """Independent check of the contract: in range, right rows, never the positive."""
    B, T = mask.shape
    cand = _candidates(mask, pad, from_masked_only)
    flat_cand = cand.flatten().nonzero().squeeze(1)  # frame of each packed candidate
    row_of_cand = flat_cand // T
    bs, ts = mask.nonzero(as_tuple=True)
    if layout == "packed":
        assert out.shape == (bs.numel(), K + Kc) and out.dtype == torch.int64
        assert bool((out >= 0).all()) and bool((out < flat_cand.numel()).all())
        frames = flat_cand[out]  # flat (b*T+t) frame of each negative
    else:
        assert out.shape == (B, T, K + Kc) and out.dtype == torch.int64
        assert bool((out[~mask] == -1).all())
        frames = out[bs, ts]
        assert bool((frames >= 0).all()) and bool((frames < B * T).all())
        assert bool(cand.flatten()[frames].all()), "a negative is not a candidate frame"
    pos_flat = (bs * T + ts).unsqueeze(1)
    n_row = cand.sum(1)[bs].unsqueeze(1)
    if K:
        within = frames[:, :K]
        assert bool((within // T == bs.unsqueeze(1)).all()), "within-utterance negative from another row"
        ok = (within != pos_flat) | (n_row <= 1)
        assert bool(ok.all()), "a negative equals its positive"
    if Kc:
        cross = frames[:, K:]
        ok = (cross != pos_flat) | (flat_cand.numel() <= 1)
        assert bool(ok.all()), "a cross-sample negative equals its positive"
    del row_of_cand


CONFIGS = [
    # B, T, K, Kc, pad_frac, from_masked_only, layout
    (3, 17, 7, 0, 0.0, True, "packed"),
    (5, 41, 13, 5, 0.3, True, "packed"),
    (5, 41, 13, 5, 0.3, False, "packed"),
    (4, 23, 6, 3, 0.3, True, "hf"),
    (4, 23, 1, 9, 0.2, False, "hf"),
    (2, 31, 0, 4, 0.0, True, "hf"),
    (7, 13, 100, 0, 0.4, True, "packed"),  # more negatives than candidates
]


@pytest.mark.cpu
@pytest.mark.parametrize("B,T,K,Kc,pad_frac,fmo,layout", CONFIGS)
def test_cpu_bit_identical_to_reference(B, T, K, Kc, pad_frac, fmo, layout):
    mask, pad = _batch(B, T, pad_frac=pad_frac, seed=B * T)
    kw = dict(cross_sample_negatives=Kc, padding_mask=pad, from_masked_only=fmo, layout=layout, seed=987654321)
    ref = sslfast.sample_negatives(mask, K, backend="reference", **kw)
    out = sslfast.sample_negatives(mask, K, backend="cpu", **kw)
    assert torch.equal(ref, out)
    _check_valid(mask, pad, ref, K, Kc, fmo, layout)


@pytest.mark.cpu
def test_input_formats_and_strides():
    mask, pad = _batch(6, 29, pad_frac=0.3, seed=3)
    ref = sslfast.sample_negatives(mask, 5, padding_mask=pad, seed=11, backend="reference")
    wide = torch.zeros(29, 6, dtype=torch.int32)
    wide.copy_(mask.T)
    for m in (mask.to(torch.uint8), wide.T, mask.to(torch.int64)):
        for backend in ("reference", "cpu"):
            out = sslfast.sample_negatives(m, 5, attention_mask=(~pad).to(torch.uint8), seed=11, backend=backend)
            assert torch.equal(out, ref)


@pytest.mark.cpu
def test_reproducible_per_seed_and_seed_none():
    mask, _ = _batch(4, 50, seed=5)
    a = sslfast.sample_negatives(mask, 10, seed=1)
    assert torch.equal(a, sslfast.sample_negatives(mask, 10, seed=1))
    assert not torch.equal(a, sslfast.sample_negatives(mask, 10, seed=2))
    torch.manual_seed(0)
    c = sslfast.sample_negatives(mask, 10)
    torch.manual_seed(0)
    assert torch.equal(c, sslfast.sample_negatives(mask, 10))


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_within_uniform_chi_square(backend):
    # One row with n = 13 candidates; each positive's negatives must be uniform over the
    # other 12 (expected counts equal), pooled over positives by relative rank.
    n, K = 13, 1200
    mask = torch.zeros(1, 40, dtype=torch.bool)
    frames = torch.tensor([0, 2, 3, 7, 8, 9, 15, 20, 21, 22, 30, 38, 39])
    mask[0, frames] = True
    out = sslfast.sample_negatives(mask, K, seed=2024, backend=backend)  # packed ranks
    for i in range(n):
        counts = torch.bincount(out[i], minlength=n).numpy()
        assert counts[i] == 0
        others = np.delete(counts, i)
        assert stats.chisquare(others).pvalue > 1e-3


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cross_sample_uniform_and_excludes_positive(backend):
    # fairseq's cross-sample draw fails to exclude the positive for rows b > 0; ours must
    # exclude it everywhere and be uniform over all other candidates of the batch.
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, [0, 5, 7]] = True
    mask[2, [2, 3, 6]] = True
    N, Kc = 8, 2000
    out = sslfast.sample_negatives(mask, 0, cross_sample_negatives=Kc, seed=77, backend=backend)
    for i in range(N):
        counts = torch.bincount(out[i], minlength=N).numpy()
        assert counts[i] == 0
        assert stats.chisquare(np.delete(counts, i)).pvalue > 1e-3


@pytest.mark.cpu
def test_from_all_frames_uniform_over_unpadded():
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 3] = True
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[0, 9:] = True
    out = sslfast.sample_negatives(mask, 3000, padding_mask=pad, from_masked_only=False, layout="hf", seed=8)
    counts = torch.bincount(out[0, 3], minlength=12).numpy()
    assert counts[3] == 0 and counts[9:].sum() == 0
    assert stats.chisquare(np.delete(counts[:9], 3)).pvalue > 1e-3


@pytest.mark.cpu
def test_matches_hugging_face_by_distribution():
    """HF's _sample_negative_indices as a peer: same format, same distribution of the
    negative's rank offset from its positive among the row's masked frames."""
    hf = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")
    B, T, K = 4, 60, 50
    mask, _ = _batch(B, T, p=0.4, seed=12)
    np.random.seed(0)
    theirs = torch.from_numpy(hf._sample_negative_indices((B, T), K, mask.numpy())).long()
    ours = sslfast.sample_negatives(mask, K, layout="hf", seed=12)
    assert ours.shape == theirs.shape

    def offsets(neg):
        bs, ts = mask.nonzero(as_tuple=True)
        frames = neg[bs, ts]
        rank = mask.long().cumsum(1) - 1
        n = mask.sum(1)[bs].unsqueeze(1)
        own = rank[bs, ts].unsqueeze(1)
        r = rank.flatten()[frames]
        assert bool((frames // T == bs.unsqueeze(1)).all())
        return ((r - own) % n).flatten()  # 1..n-1, uniform for both

    a, b = offsets(theirs), offsets(ours)
    assert int(a.min()) >= 1 and int(b.min()) >= 1
    m = int(max(a.max(), b.max())) + 1
    table = np.stack([np.bincount(a.numpy(), minlength=m)[1:], np.bincount(b.numpy(), minlength=m)[1:]])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_edge_cases(backend):
    # one masked frame in a row: its negatives are the positive itself (documented)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 4] = True
    mask[1, [1, 2, 6]] = True
    out = sslfast.sample_negatives(mask, 5, seed=3, backend=backend)
    assert torch.equal(out[0], torch.zeros(5, dtype=torch.int64))
    hf_out = sslfast.sample_negatives(mask, 5, layout="hf", seed=3, backend=backend)
    assert torch.equal(hf_out[0, 4], torch.full((5,), 4))
    _check_valid(mask, None, out, 5, 0, True, "packed")
    # a single candidate in the whole batch, cross-sample
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[1, 2] = True
    assert torch.equal(sslfast.sample_negatives(one, 2, cross_sample_negatives=3, seed=1, backend=backend),
                       torch.zeros(1, 5, dtype=torch.int64))
    # no masked frame, B = 0, T = 0, K = Kc = 0
    none = torch.zeros(3, 7, dtype=torch.bool)
    assert sslfast.sample_negatives(none, 4, seed=1, backend=backend).shape == (0, 4)
    assert bool((sslfast.sample_negatives(none, 4, layout="hf", seed=1, backend=backend) == -1).all())
    for shape in ((0, 7), (3, 0)):
        e = torch.zeros(shape, dtype=torch.bool)
        assert sslfast.sample_negatives(e, 4, seed=1, backend=backend).shape == (0, 4)
        assert sslfast.sample_negatives(e, 4, layout="hf", seed=1, backend=backend).shape == (*shape, 4)
    full = torch.ones(2, 6, dtype=torch.bool)
    assert sslfast.sample_negatives(full, 0, seed=1, backend=backend).shape == (12, 0)


@pytest.mark.cpu
def test_validation_errors():
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask"):
        sslfast.sample_negatives(mask.float(), 3)
    with pytest.raises(ValueError, match="mask"):
        sslfast.sample_negatives(mask[0], 3)
    with pytest.raises(ValueError, match="padding_mask"):
        sslfast.sample_negatives(mask, 3, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_negatives"):
        sslfast.sample_negatives(mask, -1)
    with pytest.raises(TypeError, match="num_negatives"):
        sslfast.sample_negatives(mask, 2.0)
    with pytest.raises(ValueError, match="cross_sample_negatives"):
        sslfast.sample_negatives(mask, 3, cross_sample_negatives=-2)
    with pytest.raises(ValueError, match="layout"):
        sslfast.sample_negatives(mask, 3, layout="fairseq")
    with pytest.raises(TypeError, match="from_masked_only"):
        sslfast.sample_negatives(mask, 3, from_masked_only=1)
    with pytest.raises(ValueError, match="seed"):
        sslfast.sample_negatives(mask, 3, seed=-5)
    with pytest.raises(ValueError, match="num_masked"):
        sslfast.sample_negatives(mask, 3, num_masked=-1)
    with pytest.raises(ValueError, match="backend"):
        sslfast.sample_negatives(mask, 3, backend="numpy")


@pytest.mark.cpu
@pytest.mark.slow
def test_torch_compile_fullgraph():
    mask, _ = _batch(3, 19, seed=9)
    backend = "cpu" if "cpu" in _dispatch.implemented_backends("sample_negatives") else "reference"

    def f(m):
        return sslfast.sample_negatives(m, 6, layout="hf", seed=5, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(mask), f(mask))



# ------------------------------------------------ seeds as device tensors (issue 12, item 3)
#
# Expected values come from the reference called with the key as a Python int (any 64-bit
# pattern: sslfast.random.philox4x32's int path), never from the seed-tensor path under test.

SEED_VALUES = [0, 987654321, 2**32 + 5, 2**63 - 1]  # from 2**32 on the key's high word matters
NEGATIVE_SEEDS = [-1, -12345, -(2**63)]  # a tensor's 64 bits are the key: two's complement
SEED_CASES = [
    # B, T, K, Kc, pad_frac, from_masked_only, layout
    (4, 23, 6, 3, 0.3, True, "packed"),
    (4, 23, 5, 2, 0.3, False, "hf"),  # two launches on the GPU backends
    (3, 17, 7, 0, 0.0, True, "hf"),
]


def _seed_problem(case, device="cpu"):
    B, T, K, Kc, pad_frac, fmo, layout = case
    mask, pad = _batch(B, T, pad_frac=pad_frac, seed=B + T)
    kw = dict(cross_sample_negatives=Kc, padding_mask=pad, from_masked_only=fmo, layout=layout)
    return mask, K, kw


def _spec(mask, K, kw, key):
    """The specification's negatives for the 64-bit key ``key`` (a Python int in [0, 2**64))."""
    return ref_negatives.sample_negatives(mask, K, kw["cross_sample_negatives"], kw["padding_mask"],
                                          kw["from_masked_only"], kw["layout"], key)


def _draw(mask, K, kw, seed, backend, device="cpu"):
    dev = dict(kw, padding_mask=None if kw["padding_mask"] is None else kw["padding_mask"].to(device))
    return sslfast.sample_negatives(mask.to(device), K, seed=seed, backend=backend, **dev).cpu()


def _needs(backend):
    if backend not in _dispatch.implemented_backends("sample_negatives"):
        pytest.skip(f"sample_negatives has no {backend} backend in this build")


def _check_seed_tensors(backend, case, device, seeds=SEED_VALUES, negative_seeds=NEGATIVE_SEEDS):
    mask, K, kw = _seed_problem(case)
    for s in seeds:
        want = _spec(mask, K, kw, s)
        assert torch.equal(_draw(mask, K, kw, s, backend, device), want), s
        assert torch.equal(_draw(mask, K, kw, torch.tensor(s, device=device), backend, device), want), s
        one = torch.tensor([s], device=device)  # one element, not 0-d: accepted too
        assert torch.equal(_draw(mask, K, kw, one, backend, device), want), s
    for v in negative_seeds:
        want = _spec(mask, K, kw, v % 2**64)
        got = _draw(mask, K, kw, torch.tensor(v, device=device), backend, device)
        assert torch.equal(got, want), v
        assert torch.equal(_draw(mask, K, kw, torch.tensor(v, device=device), backend, device), got), v


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", SEED_CASES)
def test_seed_tensor_draws_the_int_seeds_bits(backend, case):
    # seed=s and seed=torch.tensor(s) give the same bits (s >= 2**32 too); a negative value
    # is the key of its two's-complement bits, deterministic.
    _needs(backend)
    _check_seed_tensors(backend, case, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", SEED_CASES)
def test_triton_seed_tensor_draws_the_int_seeds_bits(case, triton_device):
    _needs("triton")
    _check_seed_tensors("triton", case, triton_device, SEED_VALUES[2:], NEGATIVE_SEEDS[1:2])  # the interpreter is slow


def _check_seed_none(backend, device):
    mask, K, kw = _seed_problem(SEED_CASES[0])
    torch.manual_seed(1234)
    a = _draw(mask, K, kw, None, backend, device)
    torch.manual_seed(1234)
    assert torch.equal(_draw(mask, K, kw, None, backend, device), a)  # repeatable
    torch.manual_seed(1234)
    key = torch.randint(0, 2**63 - 1, (), device=device)  # what seed=None draws, on the device
    assert torch.equal(_draw(mask, K, kw, key, backend, device), a)
    assert torch.equal(a, _spec(mask, K, kw, int(key)))
    torch.manual_seed(1235)
    assert not torch.equal(_draw(mask, K, kw, None, backend, device), a)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_seed_none_is_a_randint_draw_of_the_devices_generator(backend):
    _needs(backend)
    _check_seed_none(backend, "cpu")


@pytest.mark.interpreter
def test_triton_seed_none_is_a_randint_draw_of_the_devices_generator(triton_device):
    _needs("triton")
    _check_seed_none("triton", triton_device)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_derive_seed_with_step_and_rank_tensors(backend):
    # The DDP rule with device-side counters: derive_seed's tensor form keys the same
    # negatives as its int form; distinct steps and ranks draw distinct negatives.
    _needs(backend)
    mask, K, kw = _seed_problem(SEED_CASES[1])
    seen = []
    for rank, step in ((0, 0), (0, 7), (3, 7), (1, 2**33 + 1)):
        want = _spec(mask, K, kw, sr.derive_seed(2024, rank=rank, step=step))
        assert torch.equal(_draw(mask, K, kw, sr.derive_seed(2024, rank=rank, step=torch.tensor(step)), backend), want)
        t = sr.derive_seed(torch.tensor(2024), rank=torch.tensor(rank), step=torch.tensor(step))
        assert torch.equal(_draw(mask, K, kw, t, backend), want)
        assert not any(torch.equal(want, o) for o in seen)
        seen.append(want)


@pytest.mark.cpu
def test_bad_seed_tensors_raise():
    mask = torch.ones(2, 5, dtype=torch.bool)
    for backend in ("reference", "cpu"):
        with pytest.raises(TypeError, match="int64"):
            sslfast.sample_negatives(mask, 3, seed=torch.tensor(1.0), backend=backend)
        with pytest.raises(TypeError, match="int64"):
            sslfast.sample_negatives(mask, 3, seed=torch.tensor(1, dtype=torch.int32), backend=backend)
        with pytest.raises(ValueError, match="one value"):
            sslfast.sample_negatives(mask, 3, seed=torch.tensor([1, 2]), backend=backend)
        with pytest.raises(ValueError, match="seed tensor is on meta"):
            sslfast.sample_negatives(mask, 3, seed=torch.tensor(1, device="meta"), backend=backend)
        with pytest.raises(TypeError, match="seed"):
            sslfast.sample_negatives(mask, 3, seed=1.0, backend=backend)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "cpu"])  # 22 s, 2 s
def test_torch_compile_fullgraph_seed_none_and_seed_tensor(backend):
    # fullgraph=True fails on any graph break: seed=None (a torch.randint in the graph) and a
    # seed tensor (read by the op, never on the host) compile to one graph, which matches
    # eager and is not recompiled for another seed value.
    from torch._dynamo.testing import CompileCounterWithBackend

    _needs(backend)
    mask, _ = _batch(3, 19, seed=9)
    kw = dict(cross_sample_negatives=2, layout="hf", backend=backend)

    def f(m, seed=None):
        return sslfast.sample_negatives(m, 6, seed=seed, **kw)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(aot_eager_no_host_reads)
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for s in (1, 2):
        torch.manual_seed(s)
        got = compiled(mask)
        torch.manual_seed(s)
        assert torch.equal(got, f(mask)), s
        torch.manual_seed(s)
        assert torch.equal(got, _spec(mask, 6, dict(kw, padding_mask=None, from_masked_only=True),
                                      int(torch.randint(0, 2**63 - 1, ()))))
    assert counter.frame_count == 1  # the drawn key is a graph value, not a constant
    for v in (11, 2**40 + 3, -7):
        seed = torch.tensor(v)
        got = compiled(mask, seed)
        assert torch.equal(got, f(mask, seed)), v
        assert torch.equal(got, _spec(mask, 6, dict(kw, padding_mask=None, from_masked_only=True), v % 2**64)), v
    assert counter.frame_count == 2  # one graph for every seed tensor


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout,Kc", [("packed", 10), ("hf", 0), ("hf", 10)])
def test_gpu_cuda_graph_replays_draw_fresh_seeds(backend, layout, Kc):
    # (a) seed=None: torch.randint on the device inside the capture draws a fresh key at each
    # replay (torch's graph-safe Philox offsets); (b) seed=derive_seed(base, step=step) with
    # step advanced inside the captured region: replay i draws the negatives of step k0 + i.
    _needs(backend)
    B, T, per_row, K = 8, 200, 90, 20
    mask = torch.zeros(B, T, dtype=torch.bool, device="cuda")  # fairseq's require_same_masks: B * per_row
    mask[:, :per_row] = True
    kw = dict(cross_sample_negatives=Kc, layout=layout, num_masked=B * per_row, backend=backend)
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def body_none():
        return sslfast.sample_negatives(mask, K, **kw)

    def body_step():
        out = sslfast.sample_negatives(mask, K, seed=sr.derive_seed(77, step=step), **kw)
        step.add_(1)
        return out

    for body, stepped in ((body_none, False), (body_step, True)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile / warm up outside the capture
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        step.fill_(5)
        outs = []
        for i in range(3):
            graph.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
        assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
        assert not torch.equal(outs[0], outs[2])
        cpu_kw = dict(cross_sample_negatives=Kc, layout=layout)
        for got in outs:
            _check_valid(mask.cpu(), None, got.cpu(), K, Kc, True, layout)
        if stepped:
            assert int(step) == 8
            for i, got in enumerate(outs):
                want = sslfast.sample_negatives(mask.cpu(), K, seed=sr.derive_seed(77, step=5 + i),
                                                backend="reference", **cpu_kw)
                assert torch.equal(got.cpu(), want), i
                eager = sslfast.sample_negatives(mask, K, seed=sr.derive_seed(77, step=torch.tensor(5 + i,
                                                 device="cuda")), **kw)
                assert torch.equal(eager, got), i


TRITON_CONFIGS = [
    # B, T, K, Kc, pad_frac, from_masked_only, layout
    (3, 17, 7, 5, 0.3, True, "packed"),
    (4, 11, 1, 9, 0.2, False, "hf"),  # two launches
    (3, 9, 6, 3, 0.0, True, "hf"),  # two launches
    (4, 13, 5, 2, 0.3, False, "packed"),  # candidates from the padding mask
    (3, 10, 6, 0, 0.0, False, "packed"),  # every frame a candidate, no padding mask
    (4, 12, 9, 0, 0.3, True, "hf"),  # Hugging Face's case, one launch
    (3, 15, 3, 0, 0.4, False, "hf"),
    # several programs per row (BLOCK_T = 128) and several scan chunks (BLOCK_SCAN = 1024)
    (5, 300, 6, 3, 0.3, False, "packed"),
    (3, 260, 5, 0, 0.2, True, "hf"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,T,K,Kc,pad_frac,fmo,layout", TRITON_CONFIGS)
def test_triton_bit_identical_to_reference(B, T, K, Kc, pad_frac, fmo, layout, triton_device):
    if "triton" not in _dispatch.implemented_backends("sample_negatives"):
        pytest.skip("sample_negatives has no triton backend in this build")
    mask, pad = _batch(B, T, pad_frac=pad_frac, seed=B * T)
    kw = dict(cross_sample_negatives=Kc, from_masked_only=fmo, layout=layout, seed=424242)
    ref = sslfast.sample_negatives(mask, K, padding_mask=pad, backend="reference", **kw)
    pad_d = None if pad is None else pad.to(triton_device)
    out = sslfast.sample_negatives(mask.to(triton_device), K, padding_mask=pad_d, backend="triton", **kw)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.interpreter
def test_triton_edge_cases_match_reference(triton_device):
    # single-candidate rows and batch, an empty row between full ones, a row of one frame
    cases = [torch.zeros(2, 9, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)]
    cases[0][0, 4] = True
    cases[0][1, [1, 2, 6]] = True
    cases[1][1, 2] = True
    cases[2][1] = False
    cases.append(torch.tensor([[True], [False], [True]]))
    for mask in cases:
        for layout, Kc in (("packed", 3), ("hf", 0)):
            kw = dict(cross_sample_negatives=Kc, layout=layout, seed=3)
            ref = sslfast.sample_negatives(mask, 5, backend="reference", **kw)
            out = sslfast.sample_negatives(mask.to(triton_device), 5, backend="triton", **kw)
            assert torch.equal(out.cpu(), ref), (mask, layout)


@pytest.mark.interpreter
def test_triton_num_masked_hint(triton_device):
    # A trusted row count: rows past mask.sum() stay -1; with fewer rows, the first ones are
    # written and nothing past the output.
    mask, pad = _batch(3, 20, pad_frac=0.2, seed=6)
    n = int(mask.sum())
    kw = dict(cross_sample_negatives=2, padding_mask=pad, from_masked_only=False, seed=5)
    ref = sslfast.sample_negatives(mask, 4, backend="reference", **kw)
    kw["padding_mask"] = pad.to(triton_device)
    more = sslfast.sample_negatives(mask.to(triton_device), 4, num_masked=n + 3, backend="triton", **kw).cpu()
    assert torch.equal(more[:n], ref) and bool((more[n:] == -1).all())
    fewer = sslfast.sample_negatives(mask.to(triton_device), 4, num_masked=n - 4, backend="triton", **kw).cpu()
    assert torch.equal(fewer, ref[: n - 4])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout,Kc", [("packed", 10), ("packed", 0), ("hf", 10), ("hf", 0)])
@pytest.mark.parametrize("fmo", [True, False])
@pytest.mark.parametrize("B,T", [(16, 781), (64, 781), (3, 13000)])
def test_gpu_bit_identical_to_reference(backend, layout, Kc, fmo, B, T):
    # (64, 781): wav2vec 2.0 base, many blocks re-reading the batch; (3, 13000): rows past
    # the cuda hf one-pass limit (two launches there).
    if backend not in _dispatch.implemented_backends("sample_negatives"):
        pytest.skip(f"sample_negatives has no {backend} backend in this build")
    mask, pad = _batch(B, T, p=0.49, pad_frac=0.3, seed=1)
    kw = dict(cross_sample_negatives=Kc, padding_mask=pad, from_masked_only=fmo, layout=layout, seed=31337)
    ref = sslfast.sample_negatives(mask, 100, backend="reference", **kw)  # not the C++ backend (shared header)
    kw["padding_mask"] = pad.cuda()
    out = sslfast.sample_negatives(mask.cuda(), 100, backend=backend, **kw)
    assert torch.equal(out.cpu(), ref)
    if layout == "packed":
        hint = sslfast.sample_negatives(mask.cuda(), 100, backend=backend, num_masked=int(mask.sum()), **kw)
        assert torch.equal(hint.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_unaligned_and_odd_masks(backend):
    # A mask view starting at an odd byte (the cuda kernel's 16-byte loads fall back to
    # bytes), one-frame rows, and uint8 masks holding values other than 0/1 (rejected).
    if backend not in _dispatch.implemented_backends("sample_negatives"):
        pytest.skip(f"sample_negatives has no {backend} backend in this build")
    big, pad = _batch(9, 301, pad_frac=0.3, seed=2)
    for mask, p in ((big[1:], pad[1:]), (big[:, 3:], pad[:, 3:]), (big[:, :1], None)):
        for layout, Kc in (("packed", 7), ("hf", 0), ("hf", 7)):
            kw = dict(cross_sample_negatives=Kc, from_masked_only=False, layout=layout, seed=9)
            ref = sslfast.sample_negatives(mask, 11, padding_mask=p, backend="reference", **kw)
            pd = None if p is None else p.cuda()
            out = sslfast.sample_negatives(mask.cuda(), 11, padding_mask=pd, backend=backend, **kw)
            assert torch.equal(out.cpu(), ref)
    wide = big.to(torch.uint8) * 7
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        sslfast.sample_negatives(wide.cuda(), 5, from_masked_only=False, seed=1, backend=backend)
    out = sslfast.sample_negatives(big.to(torch.uint8).cuda(), 5, attention_mask=(~pad).to(torch.uint8).cuda(),
                                   from_masked_only=False, seed=1, backend=backend)
    ref = sslfast.sample_negatives(big, 5, padding_mask=pad, from_masked_only=False, seed=1, backend="cpu")
    assert torch.equal(out.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout,Kc", [("packed", 10), ("hf", 0), ("hf", 10)])
def test_gpu_cuda_graph_capture(backend, layout, Kc):
    if backend not in _dispatch.implemented_backends("sample_negatives"):
        pytest.skip(f"sample_negatives has no {backend} backend in this build")
    B, T, per_row = 8, 200, 90
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(B, T, dtype=torch.bool, device="cuda")  # fairseq's require_same_masks: B * per_row
    mask[:, :per_row] = True
    kw = dict(cross_sample_negatives=Kc, layout=layout, seed=17, num_masked=B * per_row, backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / warm up outside the capture
        sslfast.sample_negatives(mask, 20, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sslfast.sample_negatives(mask, 20, **kw)
    new = torch.stack([torch.randperm(T, generator=g)[:per_row] for _ in range(B)])
    mask.zero_()
    mask.scatter_(1, new.cuda(), True)
    graph.replay()
    torch.cuda.synchronize()
    del kw["num_masked"], kw["backend"]
    assert torch.equal(out.cpu(), sslfast.sample_negatives(mask.cpu(), 20, backend="reference", **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("layout,Kc,expected", [("packed", 10, 1), ("packed", 0, 1), ("hf", 0, 1), ("hf", 10, 2)])
def test_gpu_cuda_kernel_launches(layout, Kc, expected):
    if "cuda" not in _dispatch.implemented_backends("sample_negatives"):
        pytest.skip("sample_negatives has no cuda backend in this build")
    from torch.profiler import ProfilerActivity, profile

    mask, pad = _batch(8, 300, pad_frac=0.3, seed=4)
    mask, pad = mask.cuda(), pad.cuda()
    kw = dict(cross_sample_negatives=Kc, padding_mask=pad, layout=layout, seed=1, num_masked=int(mask.sum()),
              backend="cuda")
    sslfast.sample_negatives(mask, 10, **kw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sslfast.sample_negatives(mask, 10, **kw)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA" and "negatives" in e.name]
    assert len(names) == expected, names


# ---------------------------------------------------------------- launches and host syncs

ONE = ["_one_pass_kernel"]
TWO = ["_scan_kernel", "_draw_kernel"]


@pytest.mark.interpreter
@pytest.mark.parametrize("K,Kc,layout,fmo,expected", [
    (5, 0, "packed", True, ONE), (0, 6, "packed", False, ONE), (3, 4, "packed", False, ONE),
    (4, 0, "hf", True, ONE), (4, 0, "hf", False, ONE),
    (3, 4, "hf", False, TWO), (0, 2, "hf", True, TWO)])
def test_triton_launches_per_call(K, Kc, layout, fmo, expected, triton_launches, triton_device):
    # One launch (kernels/negatives.py): each program derives the counts its draws need from
    # the masks itself. The hf layout with cross-sample negatives maps draws through other
    # rows' candidate tables: a scan launch first.
    _check_launches(3, 14, K, Kc, layout, fmo, expected, triton_launches, triton_device)


@pytest.mark.interpreter
def test_triton_hf_long_rows_two_launches(triton_launches, triton_device):
    # Past HF_ONE_PASS_MAX_T the per-program candidate tables would grow as T^2: two launches.
    from sslfast.kernels import negatives as kn

    T = kn.HF_ONE_PASS_MAX_T + 5
    _check_launches(1, T, 1, 0, "hf", True, TWO, triton_launches, triton_device)


def _check_launches(B, T, K, Kc, layout, fmo, expected, triton_launches, triton_device):
    mask, pad = _batch(B, T, pad_frac=0.3, seed=4)
    kw = dict(cross_sample_negatives=Kc, from_masked_only=fmo, layout=layout, seed=99)
    out = sslfast.sample_negatives(mask.to(triton_device), K, padding_mask=pad.to(triton_device), backend="triton",
                                   **kw)
    assert triton_launches.names == expected
    assert torch.equal(out.cpu(), sslfast.sample_negatives(mask, K, padding_mask=pad, backend="reference", **kw))
    triton_launches.clear()
    empty = torch.zeros(0, 14, dtype=torch.bool, device=triton_device)
    sslfast.sample_negatives(empty, K, backend="triton", **kw)
    sslfast.sample_negatives(mask.to(triton_device), 0, backend="triton", layout=layout, seed=99)
    assert triton_launches.names == []


@pytest.mark.interpreter
@pytest.mark.parametrize("layout,Kc,expected", [("packed", 0, ONE), ("packed", 3, ONE), ("hf", 0, ONE), ("hf", 3, TWO)])
def test_triton_no_host_sync_given_counts(layout, Kc, expected, triton_on_meta):
    # On meta tensors every host read of device data raises (.item(), int(), .tolist(), ...).
    # The packed layout's row count is data-dependent: with num_masked the call needs no host
    # read; without it, it makes exactly the one documented read (mask.sum()).
    mask = torch.zeros(4, 30, dtype=torch.bool, device="meta")
    pad = torch.zeros(4, 30, dtype=torch.bool, device="meta")
    kw = dict(cross_sample_negatives=Kc, padding_mask=pad, layout=layout, seed=5, backend="triton")
    out = sslfast.sample_negatives(mask, 7, num_masked=48, **kw)
    assert out.device.type == "meta" and out.shape == ((48, 7 + Kc) if layout == "packed" else (4, 30, 7 + Kc))
    assert triton_on_meta.names == expected
    # seed=None (a key drawn on the device) and a seed tensor: no host read either
    for seed in (None, torch.tensor(3, device="meta")):
        again = sslfast.sample_negatives(mask, 7, num_masked=48, **dict(kw, seed=seed))
        assert again.device.type == "meta" and again.shape == out.shape
    if layout == "packed":
        with pytest.raises((RuntimeError, NotImplementedError)):
            sslfast.sample_negatives(mask, 7, **kw)
    else:
        assert sslfast.sample_negatives(mask, 7, **kw).shape == (4, 30, 7 + Kc)
