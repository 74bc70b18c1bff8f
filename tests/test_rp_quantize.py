"""random_projection_quantize / nearest_codeword / RandomProjectionQuantizer.

Expected labels come from fp64 formulas written here from semantics.md (section 5), in the
shape each peer writes them (SpeechBrain's (B, V, T, d) broadcast, NeMo's Linear + frame
concatenation + einsum, lucidrains' per-head einsum, HuBERT's k-means distance), never from
the code under test. Labels are compared through fp64 scores: a backend's label must be the
fp64 winner, or a near-tie (its fp64 score within a tolerance of the best one), because fp32
rounding may legitimately flip a near-tie.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sslfast
from sslfast import _ext
from sslfast.nn import RandomProjectionQuantizer
from sslfast.reference import rp_quantize as ref

rpq = sslfast.random_projection_quantize
ncw = sslfast.nearest_codeword

HAS_CPU = _ext.C_ERROR is None

# Largest fp64-score gap allowed between the best codeword and the one a backend picked, per
# input storage dtype, relative to the scale of the scores. fp64 scores are computed from the
# values as stored (fp16/bf16 inputs upcast exactly), so what remains is fp32 arithmetic
# error; the rule "at most twice the reference's own error" is applied on top in _check.
GAP_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


# ------------------------------------------------------------------ fp64 formulas


def stack_concat(x, k):
    """Frame-major stacking written as a concatenation of shifted frames (not a reshape)."""
    t = x.shape[1] // k
    return torch.cat([x[:, j: t * k: k] for j in range(k)], dim=-1)


def rpq_scores64(x, projection, codebooks, *, stack=1, input_norm=None, metric="cosine"):
    """fp64 scores (..., H, V), higher is better, NeMo-style: Linear, view heads, compare."""
    x = x.double()
    if x.dim() == 3:
        x = stack_concat(x, stack)
    if input_norm == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + 1e-5)
    H, V, d = codebooks.shape
    weight = projection.double().t()  # NeMo's Linear weight (H*d, F*k)
    y = (x @ weight.t()).view(*x.shape[:-1], H, d)
    cb = codebooks.double()
    if metric == "cosine":
        yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cn = cb / cb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("...hd,hvd->...hv", yn, cn)
    if y.numel() * V <= 2**24:
        # NeMo's older l2 path: materialise the differences, sum the squares
        return -((y.unsqueeze(-2) - cb) ** 2).sum(-1)
    # GPU-tier sizes: the expansion, exact enough in fp64, without the (..., H, V, d) tensor
    return -((y * y).sum(-1, keepdim=True) - 2 * torch.einsum("...hd,hvd->...hv", y, cb) + (cb * cb).sum(-1))


def speechbrain_labels64(x, P, CB):
    """SpeechBrain: argmin_v |CB_v - normalize(x @ P)| via its (B, V, T, d) broadcast."""
    xp = F.normalize(x.double() @ P.double(), dim=2)
    return torch.linalg.vector_norm(CB.double().unsqueeze(1) - xp.unsqueeze(1), dim=-1).argmin(dim=1)


def kmeans_scores64(x, C):
    """HuBERT ApplyKmeans: dist = |x|^2 - 2 x.C + |C|^2 (negated: higher is better)."""
    x, C = x.double(), C.double()
    return -((x * x).sum(-1, keepdim=True) - 2 * x @ C.t() + (C * C).sum(-1))


def tie_gap(labels, scores):
    """fp64 gap between the best score and the score of the chosen label (0 = exact winner)."""
    best = scores.max(-1).values
    chosen = scores.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return best - chosen


def _check(labels, scores, dtype, ref_labels=None, *, max_flip_frac=0.02):
    labels = labels.cpu()
    scale = scores.abs().amax().clamp_min(1.0).item()
    gap = tie_gap(labels, scores)
    tol = GAP_TOL[dtype] * scale
    if ref_labels is not None:
        tol = max(tol, 2.0 * tie_gap(ref_labels.cpu(), scores).max().item())
    assert gap.min() >= 0
    assert gap.max().item() <= tol, f"a label is off by {gap.max().item():.3g} in fp64 score (tol {tol:.3g})"
    exact = scores.argmax(-1)
    flips = (labels != exact).float().mean().item()
    assert flips <= max_flip_frac, f"{flips:.1%} of labels differ from the fp64 argmax"


def make_problem(B, T, Fdim, k, H, V, d, *, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, Fdim, generator=g).to(dtype)
    P = (torch.randn(Fdim * k, H * d, generator=g) / math.sqrt(Fdim * k)).to(dtype)
    CB = F.normalize(torch.randn(H, V, d, generator=g), dim=-1).to(dtype)
    return x.to(device), P.to(device), CB.to(device)


# ------------------------------------------------------------- reference vs peers


@pytest.mark.cpu
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("input_norm", [None, "layernorm"])
def test_reference_fp64_equals_nemo_formula(metric, input_norm):
    x, P, CB = make_problem(3, 29, 7, 3, 2, 53, 5, seed=1)
    if metric == "l2":
        CB = CB * torch.linspace(0.5, 2.0, 53).view(1, 53, 1)  # unnormalised: the raw distance matters
    got = ref.random_projection_quantize(x.double(), P.double(), CB.double(), stack=3, input_norm=input_norm,
                                         metric=metric)
    want = rpq_scores64(x, P, CB, stack=3, input_norm=input_norm, metric=metric).argmax(-1)
    assert got.dtype == torch.int64 and got.shape == (3, 29 // 3, 2)
    assert torch.equal(got, want)


@pytest.mark.cpu
def test_reference_fp64_equals_speechbrain_formula():
    x, P, CB = make_problem(2, 31, 24, 1, 1, 97, 11, seed=2)
    got = ref.random_projection_quantize(x.double(), P.double(), CB.double())
    assert torch.equal(got.squeeze(-1), speechbrain_labels64(x, P, CB[0]))


@pytest.mark.cpu
def test_reference_fp64_equals_lucidrains_formula():
    g = torch.Generator().manual_seed(3)
    B, N, dim, H, V, d = 2, 17, 12, 3, 41, 6
    x = torch.randn(B, N, dim, generator=g, dtype=torch.float64) * 3 + 1
    rand_projs = torch.randn(H, dim, d, generator=g, dtype=torch.float64)
    cb = torch.randn(H, V, d, generator=g, dtype=torch.float64)
    xn = F.layer_norm(x, (dim,))
    proj = torch.einsum("bnd,hde->bnhe", xn, rand_projs)
    sim = torch.einsum("bnhe,hve->bnhv", F.normalize(proj, dim=-1), F.normalize(cb, dim=-1))
    want = sim.argmax(-1)
    P = rand_projs.permute(1, 0, 2).reshape(dim, H * d)
    got = ref.random_projection_quantize(x, P, cb, input_norm="layernorm")
    assert torch.equal(got, want)


@pytest.mark.cpu
def test_reference_nearest_codeword_fp64_equals_kmeans_formula():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 19, 39, generator=g, dtype=torch.float64)
    C = torch.randn(101, 39, generator=g, dtype=torch.float64)
    assert torch.equal(ref.nearest_codeword(x, C), kmeans_scores64(x, C).argmax(-1))


# ------------------------------------------------------------------- cpu backend

SHAPES = [  # (B, T, F, k, H, V, d): primes and sizes off every block
    (2, 37, 13, 3, 5, 67, 7),
    (1, 50, 80, 4, 1, 331, 16),
    (3, 23, 11, 1, 2, 1, 3),
    (2, 41, 5, 2, 3, 97, 33),
]


def _backend_params(backend):
    marks = {"cpu": [pytest.mark.cpu, pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")]}
    return pytest.param(backend, marks=marks[backend])


@pytest.mark.cpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("input_norm", [None, "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_labels_match_fp64(shape, metric, input_norm, dtype):
    B, T, Fdim, k, H, V, d = shape
    x, P, CB = make_problem(B, T, Fdim, k, H, V, d, dtype=dtype, seed=sum(shape))
    got = rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, backend="cpu")
    assert got.shape == (B, T // k, H) and got.dtype == torch.int64
    scores = rpq_scores64(x, P, CB, stack=k, input_norm=input_norm, metric=metric)
    ref_labels = rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, backend="reference")
    _check(got, scores, dtype, ref_labels)


# ------------------------------------------------- cpu backend: every SIMD path
# The C++ kernel has a scalar, an AVX2 and an AVX-512 path (sslfast._C.set_cpu_isa picks one).
# Each computes every score as the same chain of correctly rounded fmas (the scalar path
# emulates the fma), so the paths must agree label for label, near-ties included.

ISAS = ["scalar", "avx2", "avx512"]


@pytest.fixture
def force_isa(force_cpu_isa):  # conftest.py: forces a SIMD level, restores the previous one
    return force_cpu_isa


ISA_SHAPES = [  # (B, T, F, k, H, V, d): V, d, F*k and the row count off every vector / block width
    (1, 7, 5, 3, 1, 1, 1),
    (2, 37, 13, 3, 3, 67, 7),
    (3, 29, 23, 1, 2, 517, 17),
    (1, 150, 80, 4, 1, 449, 16),  # d = 16 (the unrolled AVX-512 loop), 37 rows, V past a 448-codeword tile
    (2, 45, 9, 5, 2, 130, 33),
    (1, 40, 20, 2, 16, 65, 16),
]


def _labels_on(force, isa, fn):
    force(isa)
    return fn()


@pytest.mark.cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", ISA_SHAPES)
@pytest.mark.parametrize("metric,input_norm,dtype", [
    ("cosine", None, torch.float32), ("l2", "layernorm", torch.float32), ("cosine", "layernorm", torch.bfloat16),
])
def test_cpu_isa_paths_agree_and_match_fp64(force_isa, isa, shape, metric, input_norm, dtype):
    B, T, Fdim, k, H, V, d = shape
    x, P, CB = make_problem(B, T, Fdim, k, H, V, d, dtype=dtype, seed=sum(shape) + 3)
    run = lambda: rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, backend="cpu")  # noqa: E731
    want = _labels_on(force_isa, "scalar", run)
    got = _labels_on(force_isa, isa, run)
    assert torch.equal(got, want)
    scores = rpq_scores64(x, P, CB, stack=k, input_norm=input_norm, metric=metric)
    ref_labels = rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, backend="reference")
    _check(got, scores, dtype, ref_labels)


@pytest.mark.cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("D,V", [(1, 3), (129, 70), (5, 2000), (768, 37)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpu_isa_paths_nearest_codeword(force_isa, isa, D, V, metric):
    g = torch.Generator().manual_seed(D * V)
    x = torch.randn(45, D, generator=g) + 0.25
    C = torch.randn(V, D, generator=g)
    run = lambda: ncw(x, C, metric=metric, backend="cpu")  # noqa: E731
    want = _labels_on(force_isa, "scalar", run)
    got = _labels_on(force_isa, isa, run)
    assert torch.equal(got, want)
    if metric == "l2":
        scores = kmeans_scores64(x, C)
    else:
        scores = rpq_scores64(x, torch.eye(D, dtype=torch.float64), C.double().unsqueeze(0)).squeeze(-2)
    _check(got, scores, torch.float32, ncw(x, C, metric=metric, backend="reference"))


@pytest.mark.cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [16, 5])
def test_cpu_isa_paths_ties_and_zero_rows(force_isa, isa, d):
    force_isa(isa)
    g = torch.Generator().manual_seed(40 + d)
    V = 1100
    C = torch.randn(V, d, generator=g)
    u = torch.randn(d, generator=g)
    # exact copies of u in other lanes (8, 16), vectors, 64-codeword panels and 448-codeword tiles
    for i in (37, 45, 53, 101, 485, 549, 1037):
        C[i] = u
    C[600] = 2 * u  # the same cosine as u exactly (power-of-two scale), a worse l2 score
    C[9] = 4 * u
    rows = torch.randn(37, d, generator=g)
    rows[::2] = u  # rows of u at every position of the register blocks
    rows[5] = 0.0
    cb, eye = C.unsqueeze(0), torch.eye(d)
    cos = rpq(rows, eye, cb, backend="cpu").squeeze(-1)
    l2 = rpq(rows, eye, cb, metric="l2", backend="cpu").squeeze(-1)
    assert cos[::2].eq(9).all() and l2[::2].eq(37).all()
    assert cos[5] == 0  # an all-zero row scores 0 everywhere: label 0
    assert torch.equal(cos, rpq(rows, eye, cb, backend="reference").squeeze(-1))
    assert torch.equal(l2, rpq(rows, eye, cb, metric="l2", backend="reference").squeeze(-1))
    # every codeword identical: every score ties, label 0
    same = u.expand(1, V, d).contiguous()
    assert rpq(rows, eye, same, backend="cpu").eq(0).all()
    assert rpq(rows, eye, same, metric="l2", backend="cpu").eq(0).all()


@pytest.mark.cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpu_isa_paths_exact_ties_on_a_grid(force_isa, isa, metric):
    # Integer inputs and codewords in {-1, 0, 1}^3: l2 scores are exact integers and repeated
    # codewords give bit-equal cosines, so most rows have many exactly tied codewords; the
    # label must be the first maximum of the fp64 scores, on every path.
    force_isa(isa)
    g = torch.Generator().manual_seed(41)
    C = torch.randint(-1, 2, (1, 301, 3), generator=g).float()
    x = torch.randint(-3, 4, (2, 67, 3), generator=g).float()
    got = rpq(x, torch.eye(3), C, metric=metric, backend="cpu")
    want = rpq_scores64(x, torch.eye(3), C, metric=metric).argmax(-1)
    assert torch.equal(got, want)


def _round_to_f32(z):
    """The fp32 nearest to the rational z, ties to even."""
    import numpy as np
    from fractions import Fraction

    f = np.float32(float(z))
    cands = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
    cands = [c for c in cands if np.isfinite(c)]

    def key(c):
        even = int(np.array(c, dtype=np.float32).view(np.uint32)) & 1
        return (abs(Fraction(float(c)) - z), even)

    return min(cands, key=key)


@pytest.mark.cpu
def test_cpu_scalar_fma_is_correctly_rounded():
    # The scalar path's fma emulation (the hook checks its one-value form on even elements,
    # its 4-lane SSE2 form on odd ones) against exact rational arithmetic, on random values and
    # on products that land on (or within 2^-40 of) an fp32 rounding midpoint, where rounding
    # a*b + c in fp64 first and then to fp32 is wrong (62 of these 3000 cases).
    if not HAS_CPU:
        pytest.skip("CPU extension not built")
    from fractions import Fraction

    g = torch.Generator().manual_seed(42)
    n = 3000
    a = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g)
    c = torch.randn(n, generator=g) * 4
    hard = torch.arange(1000)
    k1 = torch.randint(1, 4096, (1000,), generator=g).double()
    k2 = torch.randint(1, 4096, (1000,), generator=g).double()
    a[hard] = (1 + k1 * 2.0**-12).float()
    b[hard] = (1 + k2 * 2.0**-12).float() * torch.where(hard % 2 == 0, 1.0, -1.0)
    tiny = 2.0 ** torch.randint(-75, -40, (1000,), generator=g).double()
    c[hard] = (tiny * torch.where(hard % 3 == 0, 1.0, -1.0)).float() * (hard % 5 != 0)
    out = torch.empty(n)
    _ext.cpu_module().rp_quantize_fma_exact(a.data_ptr(), b.data_ptr(), c.data_ptr(), out.data_ptr(), n)
    for i in range(n):
        z = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        assert out[i].item() == float(_round_to_f32(z)), (a[i].item(), b[i].item(), c[i].item())


@pytest.mark.cpu
def test_cpu_speechbrain_and_nemo_peers_at_bestrq_shape():
    # BEST-RQ's shape: 80-dim features stacked by 4, one 8192 x 16 codebook.
    x, P, CB = make_problem(2, 97, 80, 4, 1, 8192, 16, seed=6)
    got = rpq(x, P, CB, stack=4, backend="cpu")
    sb = speechbrain_labels64(stack_concat(x, 4), P, CB[0])
    scores = rpq_scores64(x, P, CB, stack=4)
    _check(got, scores, torch.float32)
    assert (got.squeeze(-1) == sb).float().mean() > 0.99


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", _backend_params("cpu")])
def test_ties_go_to_lowest_index(backend):
    # Codeword 1 is the input direction, 4 is the same codeword doubled (same cosine, exactly),
    # 6 an exact copy: cosine picks 1.
    d = 4
    cb = torch.randn(1, 8, d, generator=torch.Generator().manual_seed(7))
    u = torch.tensor([0.5, -1.0, 2.0, 0.25])
    cb[0, 1], cb[0, 4], cb[0, 6] = u, 2 * u, u
    P = torch.eye(d)
    x = (3 * u).view(1, 1, d)
    assert rpq(x, P, cb, backend=backend).item() == 1
    # identical codebook rows everywhere: every score ties, label 0
    same = u.expand(1, 8, d).contiguous()
    assert rpq(torch.randn(2, 5, d), P, same, backend=backend).eq(0).all()
    assert rpq(torch.randn(2, 5, d), P, same, metric="l2", backend=backend).eq(0).all()
    # nearest codeword: duplicated centroids tie in L2
    C = torch.randn(6, d, generator=torch.Generator().manual_seed(8))
    C[4] = C[2]
    assert ncw(C[2].view(1, d), C, backend=backend).item() == 2
    # copies placed in the same vector lane of later vectors, groups and codebook tiles
    # (lanes of 8 and 16, groups of 4 vectors, 128-codeword tiles at d = 128)
    d, V = 128, 300
    g = torch.Generator().manual_seed(9)
    C = torch.randn(V, d, generator=g)
    u = torch.randn(d, generator=g)
    first = 37
    for i in (first, first + 8, first + 16, first + 64, first + 128, first + 256):
        C[i] = u
    for metric in ("l2", "cosine"):
        assert ncw(u.view(1, d), C, metric=metric, backend=backend).item() == first
        cb = C.unsqueeze(0)
        assert rpq(u.view(1, 1, d), torch.eye(d), cb, metric=metric, backend=backend).item() == first


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", _backend_params("cpu")])
def test_zero_rows_give_label_zero(backend):
    x, P, CB = make_problem(2, 12, 6, 2, 3, 29, 5, seed=9)
    x[0, 2:4] = 0.0  # stacked frame 1 of sequence 0 is all zero
    x[1, 6:8] = 7.5  # a constant row: LayerNorm makes it zero
    assert rpq(x, P, CB, stack=2, backend=backend)[0, 1].eq(0).all()
    assert rpq(x, P, CB, stack=2, input_norm="layernorm", backend=backend)[1, 3].eq(0).all()
    assert rpq(x, P, CB, stack=2, input_norm="layernorm", backend=backend)[0, 1].eq(0).all()
    # a zero projection makes every row zero
    assert rpq(x, torch.zeros_like(P), CB, stack=2, backend=backend).eq(0).all()


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", _backend_params("cpu")])
def test_mask_computes_only_masked_positions(backend):
    x, P, CB = make_problem(3, 40, 9, 4, 2, 77, 6, seed=10)
    full = rpq(x, P, CB, stack=4, backend=backend)
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(11)) < 0.4
    got = rpq(x, P, CB, stack=4, mask=mask, backend=backend)
    assert torch.equal(got[mask], full[mask])
    assert got[~mask].eq(-1).all()
    assert rpq(x, P, CB, stack=4, mask=torch.zeros_like(mask), backend=backend).eq(-1).all()
    if backend != "reference":
        # the kernels never read unmasked rows: garbage there changes nothing
        x2 = x.clone()
        x2.view(3, 10, 36)[~mask] = float("nan")
        assert torch.equal(rpq(x2, P, CB, stack=4, mask=mask, backend=backend), got)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", _backend_params("cpu")])
def test_stacking_truncates_trailing_frames(backend):
    x, P, CB = make_problem(2, 23, 5, 4, 2, 31, 4, seed=12)
    got = rpq(x, P, CB, stack=4, backend=backend)
    assert got.shape == (2, 5, 2)
    assert torch.equal(got, rpq(x[:, :20].contiguous(), P, CB, stack=4, backend=backend))
    if backend != "reference":
        x2 = x.clone()
        x2[:, 20:] = float("nan")  # the 3 dropped frames are never read
        assert torch.equal(rpq(x2, P, CB, stack=4, backend=backend), got)
    # stacking is frame-major: equal to unstacked labels of the concatenated frames
    flat = stack_concat(x, 4)
    assert torch.equal(got, rpq(flat, P, CB, backend=backend))


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", _backend_params("cpu")])
def test_layouts_and_empty_inputs(backend):
    x, P, CB = make_problem(2, 18, 6, 3, 2, 19, 4, seed=13)
    want = rpq(x, P, CB, stack=3, backend=backend)
    # non-contiguous x and projection
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    Pt = P.t().contiguous().t()
    assert torch.equal(rpq(xt, Pt, CB, stack=3, backend=backend), want)
    # 2-D (N, F) rows, stack 1
    x2 = stack_concat(x, 3).reshape(-1, 18)
    assert torch.equal(rpq(x2, P, CB, backend=backend), want.reshape(-1, 2))
    # empty batch, T < stack, N = 0
    assert rpq(x[:0], P, CB, stack=3, backend=backend).shape == (0, 6, 2)
    assert rpq(x[:, :2], P, CB, stack=3, backend=backend).shape == (2, 0, 2)
    assert rpq(x2[:0], P, CB, backend=backend).shape == (0, 2)
    assert ncw(x2[:0], torch.randn(5, 18), backend=backend).shape == (0,)


@pytest.mark.cpu
@pytest.mark.parametrize("D,V", [(39, 101), (768, 500), (5, 2000)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_nearest_codeword_matches_fp64(D, V, metric, dtype):
    g = torch.Generator().manual_seed(D + V)
    x = (torch.randn(2, 23, D, generator=g) + 0.5).to(dtype)
    C = torch.randn(V, D, generator=g).to(dtype)
    got = ncw(x, C, metric=metric, backend="cpu")
    assert got.shape == (2, 23)
    if metric == "l2":
        scores = kmeans_scores64(x, C)
    else:
        scores = rpq_scores64(x, torch.eye(D, dtype=torch.float64), C.double().unsqueeze(0)).squeeze(-2)
    ref_labels = ncw(x, C, metric=metric, backend="reference")
    _check(got, scores, dtype, ref_labels)


@pytest.mark.cpu
def test_default_backend_on_cpu_is_the_extension():
    if not HAS_CPU:
        pytest.skip("CPU extension not built")
    from sslfast import _dispatch

    assert _dispatch.resolve("random_projection_quantize", None, torch.device("cpu"))[0] == "cpu"
    assert _dispatch.resolve("nearest_codeword", None, torch.device("cpu"))[0] == "cpu"


@pytest.mark.cpu
def test_hostile_arguments_raise_clear_errors():
    x, P, CB = make_problem(2, 12, 6, 2, 3, 29, 5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rpq(x.numpy(), P, CB, stack=2)
    with pytest.raises(TypeError, match="x must have dtype"):
        rpq(x.long(), P, CB, stack=2)
    with pytest.raises(ValueError, match="projection must have shape"):
        rpq(x, P[:-1], CB, stack=2)
    with pytest.raises(ValueError, match="projection must have shape"):
        rpq(x, P, CB, stack=1)
    with pytest.raises(ValueError, match="codebooks must have 3 dimensions"):
        rpq(x, P, CB[0], stack=2)
    with pytest.raises(ValueError, match="stack must be >= 1"):
        rpq(x, P, CB, stack=0)
    with pytest.raises(TypeError, match="stack must be an int"):
        rpq(x, P, CB, stack=2.0)
    with pytest.raises(ValueError, match="metric must be one of"):
        rpq(x, P, CB, stack=2, metric="dot")
    with pytest.raises(ValueError, match="input_norm must be one of"):
        rpq(x, P, CB, stack=2, input_norm="batchnorm")
    with pytest.raises(ValueError, match="mask must have the output's leading shape"):
        rpq(x, P, CB, stack=2, mask=torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype"):
        rpq(x, P, CB, stack=2, mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="stack must be 1 for a 2-D x"):
        rpq(x.reshape(-1, 6), P, CB, stack=2)
    with pytest.raises(ValueError, match="codebooks must have shape"):
        rpq(x, P[:, :0], CB[:, :, :0], stack=2)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        rpq(x, P, CB, stack=2, backend="gpu")
    with pytest.raises(ValueError, match="centroids must have shape"):
        ncw(x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="centroids must hold between 1 and"):
        ncw(x, torch.randn(0, 6))
    with pytest.raises(ValueError, match="metric must be one of"):
        ncw(x, torch.randn(4, 6), metric="cos")


@pytest.mark.cpu
@pytest.mark.slow
def test_torch_compile_fullgraph():
    if not HAS_CPU:
        pytest.skip("CPU extension not built")
    x, P, CB = make_problem(2, 20, 6, 2, 2, 37, 5, seed=14)
    mask = torch.rand(2, 10, generator=torch.Generator().manual_seed(15)) < 0.5

    def f(x, P, CB, mask, C):
        return rpq(x, P, CB, stack=2, input_norm="layernorm", mask=mask, backend="cpu"), ncw(x, C, backend="cpu")

    C = torch.randn(11, 6)
    got = torch.compile(f, fullgraph=True, backend="eager")(x, P, CB, mask, C)
    want = f(x, P, CB, mask, C)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------ modules


@pytest.mark.cpu
@pytest.mark.parametrize("dist_fn", ["cosine", "l2"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_module_nemo_options_and_state_dict(dist_fn, layer_norm):
    feat_in, code_dim, V, H, k = 10, 6, 53, 2, 3
    m = RandomProjectionQuantizer.nemo(feat_in, code_dim, V, H, dist_fn=dist_fn, combine_time_steps=k,
                                       layer_norm=layer_norm, seed=16)
    assert not list(m.parameters()) and {n for n, _ in m.named_buffers()} == {"projection", "codebooks"}
    # a NeMo checkpoint: Linear weight (H*d, F*k) and fp64 unit codebooks
    g = torch.Generator().manual_seed(17)
    W = torch.randn(H * code_dim, feat_in * k, generator=g, dtype=torch.float64)
    cb = F.normalize(torch.randn(H, V, code_dim, generator=g, dtype=torch.float64), dim=-1)
    m.load_state_dict({"proj.weight": W, "codebooks": cb})
    sig = torch.randn(2, feat_in, 31, generator=g)  # NeMo input: (B, F, T)
    got = m(sig)
    xs = sig.transpose(1, 2)
    scores = rpq_scores64(xs, W.t(), cb, stack=k, input_norm="layernorm" if layer_norm else None, metric=dist_fn)
    assert got.shape == (2, 31 // k, H)
    _check(got, scores, torch.float32)
    back = m.peer_state_dict()
    assert torch.allclose(back["proj.weight"].double(), W) and back["codebooks"].shape == cb.shape


@pytest.mark.cpu
def test_module_speechbrain_matches_its_formula():
    m = RandomProjectionQuantizer.speechbrain(24, 16, 211, seed=18)
    g = torch.Generator().manual_seed(19)
    P = torch.randn(24, 16, generator=g) * 0.3
    CB = F.normalize(torch.randn(211, 16, generator=g))
    m.load_state_dict({"P": P, "CB": CB})
    x = torch.randn(3, 29, 24, generator=g)
    got = m(x)
    assert got.shape == (3, 29)
    want = speechbrain_labels64(x, P, CB)
    scores = rpq_scores64(x, P, CB.unsqueeze(0)).squeeze(-2)
    _check(got, scores, torch.float32)
    assert (got == want).float().mean() > 0.98


@pytest.mark.cpu
def test_module_lucidrains_options():
    m = RandomProjectionQuantizer.lucidrains(12, 64, 8, num_codebooks=3, norm=True, seed=20)
    g = torch.Generator().manual_seed(21)
    rand_projs = torch.randn(3, 12, 8, generator=g)
    cb = torch.randn(3, 64, 8, generator=g)
    m.load_state_dict({"rand_projs": rand_projs, "codebooks": cb})
    x = torch.randn(2, 15, 12, generator=g) * 4 - 2
    xn = F.layer_norm(x.double(), (12,))
    sim = torch.einsum("bnhe,hve->bnhv", F.normalize(torch.einsum("bnd,hde->bnhe", xn, rand_projs.double()), dim=-1),
                       F.normalize(cb.double(), dim=-1))
    _check(m(x), sim, torch.float32)
    assert torch.equal(m.peer_state_dict()["rand_projs"], rand_projs)


@pytest.mark.cpu
def test_module_stacked_mask_and_masked_forward():
    fm = torch.zeros(2, 12, dtype=torch.bool)
    fm[0, 0:4] = True  # 4/4 masked
    fm[0, 4:7] = True  # 3/4 = 0.75, not above 0.8
    fm[1, 8:12] = True
    sm = RandomProjectionQuantizer.stacked_mask(fm, 4)
    assert sm.tolist() == [[True, False, False], [False, False, True]]
    assert RandomProjectionQuantizer.stacked_mask(fm, 4, threshold=0.0).tolist() == [[True, True, False],
                                                                                     [False, False, True]]
    m = RandomProjectionQuantizer(5, 4, 33, 2, stack=4, seed=22)
    x = torch.randn(2, 12, 5)
    got = m(x, sm)
    assert got[~sm].eq(-1).all() and torch.equal(got[sm], m(x)[sm])


@pytest.mark.cpu
def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="codebook_size"):
        RandomProjectionQuantizer(8, 4, 0)
    with pytest.raises(ValueError, match="metric"):
        RandomProjectionQuantizer(8, 4, 16, metric="dot")
    with pytest.raises(ValueError, match="freeze=False"):
        RandomProjectionQuantizer.nemo(8, 4, 16, 1, freeze=False)


# -------------------------------------------------------------------- bench module


@pytest.mark.cpu
def test_bench_formulations_agree_with_the_op():
    from sslfast.bench import rp_quantize as bench

    x, P, CB = make_problem(2, 33, 20, 4, 2, 301, 16, seed=23)
    scores = rpq_scores64(x, P, CB, stack=4)
    _check(bench.dot_product_labels(x, P, CB, 4), scores, torch.float32)
    _check(bench.speechbrain_style_labels(x, P, CB, 4), scores, torch.float32)
    C = torch.randn(57, 20)
    _check(bench.cdist_labels(x.reshape(-1, 20), C), kmeans_scores64(x.reshape(-1, 20), C), torch.float32)
    assert bench.cases(torch.device("cpu"), True)


# ------------------------------------------------------------- interpreter tier

# the last one has d = 72 > FUSED_MAX_D: projection to scratch, then the nearest-codeword pass per head
INTERP_SHAPES = [(2, 11, 5, 2, 3, 67, 5), (1, 17, 7, 1, 1, 19, 17), (2, 10, 6, 2, 2, 70, 72)]


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", INTERP_SHAPES)
@pytest.mark.parametrize("metric,input_norm", [("cosine", None), ("cosine", "layernorm"), ("l2", "layernorm")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_labels_match_fp64(triton_device, shape, metric, input_norm, dtype):
    B, T, Fdim, k, H, V, d = shape
    x, P, CB = make_problem(B, T, Fdim, k, H, V, d, dtype=dtype, seed=sum(shape), device=triton_device)
    mask = torch.rand(B, T // k, generator=torch.Generator().manual_seed(24)) < 0.7
    got = rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, mask=mask.to(triton_device),
              backend="triton").cpu()
    scores = rpq_scores64(x.cpu(), P.cpu(), CB.cpu(), stack=k, input_norm=input_norm, metric=metric)
    assert got[~mask].eq(-1).all()
    ref_labels = rpq(x.cpu(), P.cpu(), CB.cpu(), stack=k, input_norm=input_norm, metric=metric, backend="reference")
    _check(got[mask], scores[mask], dtype, ref_labels[mask])


@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_triton_nearest_codeword_matches_fp64(triton_device, metric):
    g = torch.Generator().manual_seed(25)
    x = torch.randn(21, 39, generator=g) + 0.3
    C = torch.randn(70, 39, generator=g)
    got = ncw(x.to(triton_device), C.to(triton_device), metric=metric, backend="triton").cpu()
    if metric == "l2":
        scores = kmeans_scores64(x, C)
    else:
        scores = rpq_scores64(x, torch.eye(39, dtype=torch.float64), C.double().unsqueeze(0)).squeeze(-2)
    _check(got, scores, torch.float32)


def _exact_ties(D, seed):
    """Codebook (300, D) holding copies of u at 37, 45, 101 and 229 (tiles 0, 0, 1 and 3 of 64
    codewords) and small integers elsewhere; u has 16 entries of +-1 (|u| = 4) and zeros.
    Every product and partial sum of u . c, |c|^2 and u / |u| is exact in fp32, so each
    backend's scores of the copies are equal whatever its summation order (a tie, not a
    near-tie), and the copies beat every other codeword under both metrics."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randint(-2, 3, (300, D), generator=g).float()
    u = torch.zeros(D)
    u[torch.randperm(D, generator=g)[:16]] = torch.randint(0, 2, (16,), generator=g).float() * 2 - 1
    for i in (37, 45, 101, 229):
        C[i] = u
    return u, C


@pytest.mark.interpreter
def test_triton_edge_cases(triton_device):
    dev = triton_device
    x, P, CB = make_problem(2, 9, 4, 2, 2, 21, 4, seed=26)
    x[0, 0:2] = 0.0  # zero stacked row
    x[1, 8] = float("nan")  # the truncated trailing frame is never read
    got = rpq(x.to(dev), P.to(dev), CB.to(dev), stack=2, backend="triton").cpu()
    assert got.shape == (2, 4, 2) and got[0, 0].eq(0).all()
    assert torch.equal(got, rpq(x[:, :8], P, CB, stack=2, backend="reference"))
    assert rpq(x[:0].to(dev), P.to(dev), CB.to(dev), stack=2, backend="triton").shape == (0, 4, 2)


@pytest.mark.interpreter
@pytest.mark.parametrize("D", [40, 80])  # 80: wider than FUSED_MAX_D, the projected head goes through scratch
def test_exact_ties_go_to_the_first_index(triton_device, D):
    """semantics.md / the reference: ties resolve to the lowest index (torch.argmax). With
    exactly representable data (_exact_ties) every backend must return the first copy, inside
    a codebook tile and across tiles, for nearest_codeword and for a projection (the identity)."""
    u, C = _exact_ties(D, seed=9)
    backends = [("reference", "cpu"), ("triton", triton_device)] + ([("cpu", "cpu")] if HAS_CPU else [])
    for metric in ("l2", "cosine"):
        c64, u64 = C.double(), u.double()
        assert (c64 @ u64 / c64.norm(dim=1)).argmax().item() == 37  # fp64: the copies win, first index
        assert (2 * c64 @ u64 - (c64 * c64).sum(1)).argmax().item() == 37
        for backend, dev in backends:
            assert ncw(u.view(1, D).to(dev), C.to(dev), metric=metric, backend=backend).item() == 37, backend
            got = rpq(u.view(1, 1, D).to(dev), torch.eye(D, device=dev), C.unsqueeze(0).to(dev), metric=metric,
                      backend=backend)
            assert got.item() == 37, (backend, metric)
    # a codebook of copies, per head, against +-1 rows projected by the identity: label 0 everywhere
    g = torch.Generator().manual_seed(26)
    xi = torch.randint(0, 2, (2, 9, 4), generator=g).float() * 2 - 1
    same = torch.randint(-2, 3, (2, 1, 4), generator=g).float().expand(2, 21, 4).contiguous()
    for metric in ("l2", "cosine"):
        for backend, dev in backends:
            got = rpq(xi.to(dev), torch.eye(8, device=dev), same.to(dev), stack=2, metric=metric, backend=backend)
            assert got.shape == (2, 4, 2) and got.eq(0).all(), (backend, metric)


@pytest.mark.interpreter
def test_triton_equals_cpu_backend(triton_device):
    if not HAS_CPU:
        pytest.skip("CPU extension not built")
    x, P, CB = make_problem(2, 24, 6, 3, 2, 130, 8, seed=27)
    a = rpq(x.to(triton_device), P.to(triton_device), CB.to(triton_device), stack=3, backend="triton").cpu()
    b = rpq(x, P, CB, stack=3, backend="cpu")
    scores = rpq_scores64(x, P, CB, stack=3)
    # both are fp32 with different summation orders: equal except at fp32 near-ties
    differ = (a != b).double()
    assert differ.mean() <= 0.02
    assert (tie_gap(a, scores) * differ).max() <= 1e-5 and (tie_gap(b, scores) * differ).max() <= 1e-5


# ------------------------------------------------------------------------ gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric,input_norm", [("cosine", None), ("cosine", "layernorm"), ("l2", None)])
def test_gpu_labels_match_fp64(backend, dtype, metric, input_norm):
    B, T, Fdim, k, H, V, d = 2, 781, 80, 4, 4, 8192, 16  # fp64 scores of all (row, head, V): 100 MB
    x, P, CB = make_problem(B, T, Fdim, k, H, V, d, dtype=dtype, seed=28, device="cuda")
    mask = torch.rand(B, T // k, generator=torch.Generator().manual_seed(29)) < 0.5
    got = rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, mask=mask.cuda(), backend=backend).cpu()
    assert got[~mask].eq(-1).all()
    scores = rpq_scores64(x.cpu(), P.cpu(), CB.cpu(), stack=k, input_norm=input_norm, metric=metric)
    ref_labels = rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, backend="reference").cpu()
    _check(got[mask], scores[mask], dtype, ref_labels[mask])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("D,V", [(39, 100), (768, 500), (1024, 2000)])
def test_gpu_nearest_codeword(backend, D, V):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(4, 301, D, generator=g)
    C = torch.randn(V, D, generator=g)
    got = ncw(x.cuda(), C.cuda(), backend=backend).cpu()
    _check(got, kmeans_scores64(x, C), torch.float32)


@pytest.mark.gpu
def test_gpu_backends_agree_and_edges():
    x, P, CB = make_problem(4, 781, 80, 4, 1, 8192, 16, seed=30, device="cuda")
    x[0, :4] = 0.0
    labels = {b: rpq(x, P, CB, stack=4, backend=b).cpu() for b in ("cuda", "triton")}
    labels["cpu"] = rpq(x.cpu(), P.cpu(), CB.cpu(), stack=4, backend="cpu")
    scores = rpq_scores64(x.cpu(), P.cpu(), CB.cpu(), stack=4)
    for name, lab in labels.items():
        assert lab[0, 0].eq(0).all(), name
        _check(lab, scores, torch.float32)
    assert (labels["cuda"] == labels["triton"]).float().mean() > 0.999
    # the cuda backend stages a row in shared memory: too wide a row is a clear error
    xw = torch.randn(1, 4, 13000, device="cuda")
    with pytest.raises(ValueError, match="use backend='triton'"):
        ncw(xw, torch.randn(3, 13000, device="cuda"), backend="cuda")
    assert ncw(xw, torch.randn(3, 13000, device="cuda"), backend="triton").shape == (1, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    x, P, CB = make_problem(2, 101, 80, 4, 2, 1024, 16, seed=31, device="cuda")
    mask = torch.rand(2, 25, device="cuda") < 0.5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / warm up outside the capture
        rpq(x, P, CB, stack=4, mask=mask, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rpq(x, P, CB, stack=4, mask=mask, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, rpq(x, P, CB, stack=4, mask=mask, backend=backend))
