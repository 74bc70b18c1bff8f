"""Hostile-input catalogue as property-based tests (issue 12.7, op-contract.md "Edge and
hostile inputs"): for every op and backend, shapes of 0, 1, primes, K above the number of
candidates, zero and duplicate rows, +-255 and fp16-overflow values, all-padded rows,
non-contiguous and expanded inputs, indices at the edge of the range. Each backend must give
the reference's result or raise the same clear error (ValueError / TypeError); never a
crash, an out-of-range index or a NaN the reference does not have.

Derandomised (the ``sslfast`` hypothesis profile in conftest.py), so every run draws the
same examples; ``max_examples`` is small per test to keep the suite's time bounded.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import sslfast  # noqa: E402
from _tolerance import assert_error_rule  # noqa: E402
from sslfast import _dispatch  # noqa: E402

CPU = pytest.param("cpu", marks=pytest.mark.cpu)
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)
SIZES = st.sampled_from([0, 1, 2, 3, 7, 13])  # 0, 1, primes


def hostile(max_examples):
    """A property test over st.data(), once per backend (cpu, and triton under the interpreter)."""
    def deco(fn):
        fn = settings(max_examples=max_examples)(given(data=st.data())(fn))
        return pytest.mark.parametrize("backend", [CPU, TRITON])(fn)
    return deco


FEW, FEWER = 15, 6  # examples per backend; the Triton interpreter runs one program per Python call


def _available(op, backend):
    if backend not in _dispatch.implemented_backends(op):
        pytest.skip(f"{op} has no {backend} backend")
    reason = _dispatch.backend_unavailable_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)


def _outcome(fn, backend):
    try:
        return "ok", fn(backend)
    except (ValueError, TypeError) as exc:  # the clear errors of the op contract
        return "error", type(exc)


def _same_outcome(fn, backend):
    """Runs fn on the reference and on backend; both raise the same clear error, or both
    return. Returns (reference result, backend result) or None when both raised."""
    want = _outcome(fn, "reference")
    got = _outcome(fn, backend)
    assert got[0] == want[0], f"reference: {want}, {backend}: {got}"
    if want[0] == "error":
        assert got[1] is want[1]
        return None
    return want[1], got[1]


def _frame_mask(data, B, T, kind):
    if kind == "none":
        return torch.zeros(B, T, dtype=torch.bool)
    if kind == "all":
        return torch.ones(B, T, dtype=torch.bool)
    seed = data.draw(st.integers(0, 2**16))
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.5


def _padding(data, B, T):
    lengths = [data.draw(st.integers(0, T)) for _ in range(B)]  # 0: an all-padded row
    return torch.arange(T)[None, :] >= torch.tensor(lengths, dtype=torch.int64).reshape(B, 1)


def _layout_variant(t, how):
    """The same values as a non-contiguous view (transposed storage) or an expanded one."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "expanded" and t.dim() >= 1 and t.shape[0] == 1:
        return t[:1].expand(*t.shape)
    return t


# ----------------------------------------------------------------------------- samplers


@hostile(FEW)
def test_sample_negatives_hostile(backend, data):
    _available("sample_negatives", backend)
    B, T = data.draw(SIZES), data.draw(SIZES)
    mask = _frame_mask(data, B, T, data.draw(st.sampled_from(["none", "all", "random"])))
    pad = _padding(data, B, T) if data.draw(st.booleans()) else None
    if pad is not None:
        mask &= ~pad
    K = data.draw(st.sampled_from([0, 1, 5, 40]))  # 40 > every row's candidates here
    Kc = data.draw(st.sampled_from([0, 3]))
    layout = data.draw(st.sampled_from(["packed", "hf"]))
    fmo = data.draw(st.booleans())
    mask_in = _layout_variant(mask, "transposed")
    res = _same_outcome(lambda b: sslfast.sample_negatives(mask_in, K, cross_sample_negatives=Kc, padding_mask=pad,
                                                           from_masked_only=fmo, layout=layout, seed=7, backend=b),
                        backend)
    if res is None:
        return
    want, got = res
    assert torch.equal(got.cpu(), want)
    cand = (mask if fmo else (~pad if pad is not None else torch.ones_like(mask)))
    n_cand = int(cand.sum())
    if layout == "packed":
        assert got.shape == (int(mask.sum()), K + Kc)
        assert got.numel() == 0 or (0 <= int(got.min()) and int(got.max()) < max(n_cand, 1))
    else:
        assert got.shape == (B, T, K + Kc)
        masked = got[mask]
        assert masked.numel() == 0 or (0 <= int(masked.min()) and int(masked.max()) < B * T)
        assert (got[~mask] == -1).all()


@hostile(FEW)
def test_compute_mask_indices_hostile(backend, data):
    _available("compute_mask_indices", backend)
    B, T = data.draw(SIZES), data.draw(st.sampled_from([0, 1, 2, 7, 13, 31]))
    pad = _padding(data, B, T) if data.draw(st.booleans()) else None
    style = data.draw(st.sampled_from(["fairseq", "hf"]))
    kw = dict(mask_prob=data.draw(st.sampled_from([0.0, 0.3, 0.65, 1.0])),
              mask_length=data.draw(st.sampled_from([1, 2, 10, 40])),  # 40 > every T: spans longer than rows
              min_masks=data.draw(st.sampled_from([0, 2, 50])), style=style, seed=3)
    if style == "fairseq":
        kw.update(no_overlap=data.draw(st.booleans()), require_same_masks=data.draw(st.booleans()))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-padded warning is tested in test_reliability.py
        res = _same_outcome(lambda b: sslfast.compute_mask_indices((B, T), pad, backend=b, **kw), backend)
    if res is None:
        return
    want, got = res
    assert got.shape == (B, T) and got.dtype == torch.bool
    assert torch.equal(got.cpu(), want)
    if pad is not None:
        assert not (got.cpu() & pad).any()  # padding is never masked


# ----------------------------------------------------------------------------- apply_mask


@hostile(FEWER)
def test_apply_mask_hostile(backend, data):
    _available("apply_mask", backend)
    B, T, D = data.draw(SIZES), data.draw(SIZES), data.draw(st.sampled_from([1, 3, 7]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    big = data.draw(st.sampled_from([1.0, 255.0, 6.0e4]))  # 6e4: at fp16's edge
    x = (torch.randn(B, T, D, generator=torch.Generator().manual_seed(B * 100 + T)) * big).to(dtype)
    x = _layout_variant(x, data.draw(st.sampled_from(["contiguous", "transposed", "expanded"])))
    mask = _frame_mask(data, B, T, data.draw(st.sampled_from(["none", "all", "random"])))
    fill = data.draw(st.sampled_from(["emb", "noise"]))
    emb = torch.full((D,), big, dtype=dtype)
    res = _same_outcome(lambda b: sslfast.apply_mask(x, mask, emb if fill == "emb" else 0.1, seed=5, backend=b),
                        backend)
    if res is None:
        return
    want, got = res
    got = got.cpu()
    assert torch.equal(got[~mask], want[~mask])  # unmasked frames: x's bits
    if fill == "emb":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-10, atol=1e-6)  # test_apply_mask NOISE_TOL


# ----------------------------------------------------------------------------- losses


def _rows(data, n, d, kind, scale):
    g = torch.Generator().manual_seed(n * 31 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    if kind == "zero" and n:
        x[0] = 0.0
    if kind == "duplicate" and n > 1:
        x[1:] = x[0]
    return x


@hostile(FEWER)
def test_contrastive_loss_hostile(backend, data):
    _available("contrastive_loss", backend)
    N, M, D = data.draw(SIZES), data.draw(st.sampled_from([1, 2, 7, 13])), data.draw(st.sampled_from([1, 3, 17]))
    M = max(M, N)
    K = data.draw(st.sampled_from([0, 1, 7, 20]))  # 20 > M: duplicates
    kind = data.draw(st.sampled_from(["random", "zero", "duplicate"]))
    scale = data.draw(st.sampled_from([1.0, 255.0, 1.0e-20]))
    x64, y64 = _rows(data, N, D, kind, scale), _rows(data, M, D, kind, scale)
    edge = data.draw(st.sampled_from(["random", "edges"]))
    g = torch.Generator().manual_seed(N + 7 * K)
    neg = torch.randint(0, M, (N, K), generator=g)
    if edge == "edges" and neg.numel():
        neg[:, 0], neg[:, -1] = 0, M - 1  # both ends of the valid range
    neg = _layout_variant(neg, "transposed")
    x, y = x64.float(), y64.float()
    kw = dict(reduction="none", neg_is_pos=data.draw(st.sampled_from(["vector", "index", "none"])))
    res = _same_outcome(lambda b: sslfast.contrastive_loss(x, y, neg, backend=b, **kw), backend)
    if res is None:
        return
    want, got = res
    truth = sslfast.contrastive_loss(x.double(), y.double(), neg, backend="reference", **kw)
    assert torch.equal(torch.isfinite(got.cpu()), torch.isfinite(want))  # no NaN the reference lacks
    fin = torch.isfinite(want)
    assert_error_rule(got.cpu()[fin], want[fin], truth[fin], f"{backend} contrastive rows", out_dtype=torch.float32)
    if N and K:
        with pytest.raises(ValueError, match="negatives must index"):
            sslfast.contrastive_loss(x, y, neg + M, backend=backend)  # one past the end


@hostile(FEWER)
def test_info_nce_hostile(backend, data):
    _available("info_nce", backend)
    N, D = data.draw(SIZES), data.draw(st.sampled_from([1, 3, 17]))
    kind = data.draw(st.sampled_from(["random", "zero", "duplicate"]))
    scale = data.draw(st.sampled_from([1.0, 255.0, 1.0e-20]))
    q64, k64 = _rows(data, N, D, kind, scale), _rows(data, N, D, kind, scale * 0.5)
    q, k = _layout_variant(q64.float(), "transposed"), k64.float()
    sym = data.draw(st.booleans())
    res = _same_outcome(lambda b: sslfast.info_nce(q, k, symmetric=sym, reduction="none", backend=b), backend)
    if res is None:
        return
    want, got = res
    truth = sslfast.info_nce(q.double(), k.double(), symmetric=sym, reduction="none", backend="reference")
    assert torch.equal(torch.isfinite(got.cpu()), torch.isfinite(want))
    fin = torch.isfinite(want)
    assert_error_rule(got.cpu()[fin], want[fin], truth[fin], f"{backend} info_nce rows", out_dtype=torch.float32)


# ----------------------------------------------------------------------------- quantizers


@hostile(FEWER)
def test_gumbel_vector_quantize_hostile(backend, data):
    _available("gumbel_vector_quantize", backend)
    N, G, V, d = data.draw(SIZES), data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2, 7])), 3
    big = data.draw(st.sampled_from([1.0, 255.0, 6.0e4]))
    dtype = torch.float16 if big == 6.0e4 else torch.float32  # fp16-overflow logits in fp16 storage
    g = torch.Generator().manual_seed(N * 13 + V)
    logits = (torch.randn(N, G * V, generator=g) * big).clamp(-6.5e4, 6.5e4).to(dtype)
    if data.draw(st.booleans()) and N > 1:
        logits[1] = logits[0]  # duplicate rows
    cb = torch.randn(G * V, d, generator=g)
    training = data.draw(st.booleans())
    res = _same_outcome(lambda b: sslfast.gumbel_vector_quantize(logits, cb, groups=G, tau=2.0, seed=11,
                                                                 training=training, backend=b), backend)
    if res is None:
        return
    want, got = res
    assert torch.equal(got.codes.cpu(), want.codes)  # one seed: the same codes everywhere
    assert ((0 <= got.codes) & (got.codes < V)).all()
    assert torch.equal(got.quantized.cpu(), want.quantized)  # hard: exact codewords
    for name in ("prob_perplexity", "code_perplexity"):
        a, b = getattr(got, name).detach().cpu(), getattr(want, name).detach()
        assert torch.isfinite(a) and torch.isfinite(b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * G)  # fp32 sums of N*G*V terms


@hostile(FEWER)
def test_nearest_codeword_hostile(backend, data):
    _available("nearest_codeword", backend)
    # small integers: every score is exact in fp32, so the labels (ties to the lowest index)
    # must equal the reference's exactly
    N, V, D = data.draw(SIZES), data.draw(st.sampled_from([1, 2, 7])), data.draw(st.sampled_from([1, 3, 17]))
    g = torch.Generator().manual_seed(N + 5 * V + D)
    x = torch.randint(-3, 4, (N, D), generator=g).float()
    c = torch.randint(-3, 4, (V, D), generator=g).float()
    if data.draw(st.booleans()) and V > 1:
        c[1] = c[0]  # duplicate centroids: a tie
    x = _layout_variant(x, data.draw(st.sampled_from(["contiguous", "transposed"])))
    res = _same_outcome(lambda b: sslfast.nearest_codeword(x, c, metric="l2", backend=b), backend)
    if res is None:
        return
    want, got = res
    assert torch.equal(got.cpu(), want)
    assert got.numel() == 0 or (0 <= int(got.min()) and int(got.max()) < V)
