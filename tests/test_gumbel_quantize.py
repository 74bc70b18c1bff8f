"""Gumbel-softmax vector quantizer: every backend against an independent fp64 formulation
(the one-hot product fairseq and HF compute), Hugging Face's module with the same weights,
fairseq's documented facts (semantics.md section 4), the sampler's distribution, extreme
and hostile inputs, and torch.compile."""
import math

import pytest
import torch

import sslfast
from _compile import aot_eager_no_host_reads
from sslfast import random as sr
from sslfast.nn import GumbelVectorQuantizer, Wav2Vec2GumbelVectorQuantizer
from sslfast.ops.gumbel_quantize import gumbel_vector_quantize as gvq
from sslfast.reference import gumbel_quantize as ref

HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- independent spec


def noise_fp64(n, width, seed):
    """Gumbel noise from the documented stream: word pos % 4 of philox(pos // 4, row, GUMBEL, 0),
    uniform clamped to [2^-24, 1 - 2^-24], logs in fp64, rounded once to fp32."""
    pos = torch.arange(width, dtype=torch.int64)
    w = torch.stack(sr.philox4x32(pos[None, :] // 4, torch.arange(n)[:, None], int(sr.Stream.GUMBEL), 0, seed))
    word = torch.gather(w.permute(1, 2, 0), 2, (pos % 4).expand(n, width)[..., None]).squeeze(-1)
    u = sr.uint_to_uniform(word).clamp(2.0**-24, 1 - 2.0**-24).double()
    return (-torch.log(-torch.log(u))).float()


def quantize_fp64(logits, codebook, groups, tau, training, seed, mask=None, eps=1e-7, noise=None, hard=True):
    """fairseq's eager formulation (one-hot or soft weights x codebook product) in fp64."""
    n, gv = logits.shape
    v = gv // groups
    d = codebook.shape[-1]
    x = logits.double().reshape(n * groups, v)
    cb = codebook.double().reshape(1, gv, d)
    if training:
        g = noise_fp64(n, gv, seed) if noise is None else noise
        z = x + g.double().reshape(n * groups, v)
        soft = torch.softmax(z / tau, dim=-1)
        hard_w = torch.nn.functional.one_hot(z.argmax(-1), v).double()
        w = hard_w - soft.detach() + soft if hard else soft
    else:
        hard_w = torch.nn.functional.one_hot(x.argmax(-1), v).double()
        w = hard_w  # eval: the argmax codeword whatever hard says (fairseq, HF)
    q = (w.reshape(n, gv, 1) * cb).reshape(n, groups, v, d).sum(2).reshape(n, groups * d)
    sel = torch.ones(n, dtype=torch.bool) if mask is None else mask.reshape(n)
    cnt = max(int(sel.sum()), 1)
    avg = torch.softmax(x.reshape(n, groups, v), -1)[sel].sum(0) / cnt
    hx = torch.nn.functional.one_hot(x.argmax(-1), v).double().reshape(n, groups, v)[sel].sum(0) / cnt

    def ppl(p):
        ent = torch.xlogy(p, p) if eps == 0 else p * torch.log(p + eps)
        return torch.exp(-ent.sum(-1)).sum()

    return q, hard_w.reshape(n, groups, v).argmax(-1), ppl(avg), ppl(hx.detach())


def run(backend, logits, codebook, *, groups, tau=2.0, training=True, seed=7, mask=None, eps=1e-7, gseed=3,
        hard=True):
    """Forward, then grads of sum(quantized * R) + 2.5 * prob_perplexity."""
    l = logits.detach().clone().requires_grad_()
    cb = codebook.detach().clone().requires_grad_()
    out = gvq(l, cb, groups=groups, tau=tau, hard=hard, training=training, seed=seed, mask=mask, perplexity_eps=eps,
              backend=backend)
    r = torch.randn(out.quantized.shape, generator=torch.Generator().manual_seed(gseed)).to(out.quantized.device)
    loss = (out.quantized.double() * r.double()).sum() + 2.5 * out.prob_perplexity.double()
    gl, gc = torch.autograd.grad(loss, [l, cb])
    return out, gl, gc


def run_fp64(logits, codebook, *, groups, tau=2.0, training=True, seed=7, mask=None, eps=1e-7, gseed=3, hard=True):
    l = logits.detach().cpu().double().requires_grad_()
    cb = codebook.detach().cpu().double().requires_grad_()
    q, codes, pp, cp = quantize_fp64(l, cb, groups, tau, training, seed, None if mask is None else mask.cpu(), eps,
                                     hard=hard)
    r = torch.randn(q.shape, generator=torch.Generator().manual_seed(gseed)).double()
    loss = (q * r).sum() + 2.5 * pp
    gl, gc = torch.autograd.grad(loss, [l, cb])
    return q, codes, pp, cp, gl, gc


def inputs(n, groups, v, d, dtype=torch.float32, device="cpu", scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, groups * v, generator=g) * scale).to(dtype).to(device)
    codebook = torch.randn(groups * v, d, generator=g).to(dtype).to(device)
    mask = (torch.rand(n, generator=g) < 0.6).to(device)
    return logits, codebook, mask


SHAPES = [(37, 2, 13, 7), (5, 3, 5, 1), (1, 1, 17, 3)]  # primes, d = 1, a single frame
# fp32: absolute tolerance of kernel outputs and grads against the fp64 formulation
FP32_TOL = {"ppl": 1e-5, "grad": 2e-5, "soft_q": 1e-5}


def check_against_fp64(out, gl, gc, truth, dtype, ref_err=None, soft=False):
    """soft: the output is a weighted sum (hard=False in training), checked to a tolerance
    (fp32) or twice the reference's error (fp16/bf16); otherwise it is an exact gather."""
    q64, codes64, pp64, cp64, gl64, gc64 = truth
    assert torch.equal(out.codes.cpu(), codes64)
    q_err = (out.quantized.cpu().double() - q64.detach()).abs().max().item() if q64.numel() else 0.0
    if not soft:
        assert torch.equal(out.quantized.cpu().double(), q64.detach().to(out.quantized.dtype).double()) or \
            torch.allclose(out.quantized.cpu().double(), q64.detach(), atol=1e-6)
    elif ref_err is None:
        assert q_err < FP32_TOL["soft_q"] * max(1.0, q64.abs().max().item()), q_err
    errs = {
        "q": q_err,
        "pp": abs(out.prob_perplexity.item() - pp64.item()) / pp64.item(),
        "cp": abs(out.code_perplexity.item() - cp64.item()) / cp64.item(),
        "gl": (gl.cpu().double() - gl64).abs().max().item(),
        "gc": (gc.cpu().double() - gc64).abs().max().item(),
    }
    if ref_err is None:
        assert errs["pp"] < FP32_TOL["ppl"] and errs["cp"] < FP32_TOL["ppl"]
        scale = max(1.0, gl64.abs().max().item())
        assert errs["gl"] < FP32_TOL["grad"] * scale, errs
        assert errs["gc"] < FP32_TOL["grad"] * max(1.0, gc64.abs().max().item()), errs
    else:  # half precision: at most twice the reference's own error in that dtype
        for k, e in errs.items():
            assert e <= 2 * ref_err[k] + 1e-6, (k, e, ref_err[k])
    return errs


# ----------------------------------------------------------------------------- reference


@pytest.mark.cpu
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_fp64_formulation(shape, training):
    n, g, v, d = shape
    logits, cb, mask = inputs(n, g, v, d)
    for m in (None, mask):
        out, gl, gc = run("reference", logits, cb, groups=g, training=training, mask=m, tau=1.7)
        check_against_fp64(out, gl, gc, run_fp64(logits, cb, groups=g, training=training, mask=m, tau=1.7),
                           torch.float32)


@pytest.mark.cpu
def test_reference_noise_is_the_documented_stream():
    got = ref.gumbel_noise(6, 23, 1234)
    assert torch.equal(got, noise_fp64(6, 23, 1234))
    assert torch.isfinite(got).all()


@pytest.mark.cpu
def test_reference_gradcheck_fp64():
    torch.manual_seed(0)
    n, g, v, d = 4, 2, 3, 2
    l = torch.randn(n, g * v, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(g * v, d, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    # soft quantization and the prob perplexity are true derivatives of the logits
    f_soft = lambda a, b: ref.gumbel_vector_quantize(a, b, groups=g, tau=1.3, hard=False, seed=3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f_soft, (l, cb))
    for eps in (1e-7, 0.0):
        f_pp = lambda a: ref.perplexity(ref.gumbel_vector_quantize(a, cb, groups=g, seed=3, mask=mask)[2], eps)  # noqa: E731
        assert torch.autograd.gradcheck(f_pp, (l,))
    # the hard output is linear in the codebook (a gather)
    f_cb = lambda b: ref.gumbel_vector_quantize(l.detach(), b, groups=g, seed=3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f_cb, (cb,))


# ----------------------------------------------------------------------------- cpu backend


def _parity(backend, device, dtypes, shapes=SHAPES, hard=True, tau=1.7):
    for dtype in dtypes:
        for shape in shapes:
            n, g, v, d = shape
            for training in (True, False):
                logits, cb, mask = inputs(n, g, v, d, dtype=dtype)
                soft = training and not hard
                for m in (None, mask):
                    kw = dict(groups=g, training=training, mask=m, tau=tau, hard=hard)
                    truth = run_fp64(logits, cb, **kw)
                    out, gl, gc = run(backend, logits.to(device), cb.to(device),
                                      **{**kw, "mask": None if m is None else m.to(device)})
                    assert out.quantized.dtype == dtype and out.codes.dtype == torch.int64
                    if dtype == torch.float32:
                        check_against_fp64(out, gl, gc, truth, dtype, soft=soft)
                    else:
                        ref_err = check_against_fp64(*run("reference", logits, cb, **kw), truth, dtype, soft=soft,
                                                     ref_err={k: math.inf for k in ("q", "pp", "cp", "gl", "gc")})
                        check_against_fp64(out, gl, gc, truth, dtype, ref_err=ref_err, soft=soft)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_parity(dtype):
    _parity("cpu", "cpu", [dtype])


@pytest.mark.cpu
def test_cpu_codes_bit_identical_to_reference_at_scale():
    logits, cb, mask = inputs(400, 2, 320, 4, scale=1.0, seed=5)
    for seed in (0, 2**40 + 17):
        a = gvq(logits, cb, groups=2, seed=seed, mask=mask, backend="reference")
        b = gvq(logits, cb, groups=2, seed=seed, mask=mask, backend="cpu")
        assert torch.equal(a.codes, b.codes) and torch.equal(a.quantized, b.quantized)
        assert torch.allclose(a.prob_perplexity, b.prob_perplexity, rtol=1e-5)
        assert torch.equal(a.code_perplexity, b.code_perplexity)
    c = gvq(logits, cb, groups=2, seed=1, backend="cpu")
    assert not torch.equal(c.codes, b.codes)  # another seed, another draw


@pytest.mark.cpu
def test_cpu_deterministic_and_non_contiguous():
    logits, cb, mask = inputs(70, 2, 11, 6)
    a = run("cpu", logits, cb, groups=2, mask=mask)
    b = run("cpu", logits, cb, groups=2, mask=mask)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert torch.equal(a[0].prob_perplexity, b[0].prob_perplexity)
    # a transposed logits view and a strided codebook give the same result
    lt = logits.t().contiguous().t()
    cbs = torch.stack([cb, cb], dim=2)[..., 0]
    assert not lt.is_contiguous() or not cbs.is_contiguous()
    c = run("cpu", lt, cbs, groups=2, mask=mask)
    assert torch.equal(a[0].codes, c[0].codes) and torch.equal(a[1], c[1]) and torch.equal(a[2], c[2])


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_batch_and_empty_mask(backend):
    logits, cb, _ = inputs(0, 2, 5, 3)
    out, gl, gc = run(backend, logits, cb, groups=2)
    assert out.quantized.shape == (0, 6) and out.codes.shape == (0, 2)
    assert out.prob_perplexity.item() == 2.0 and out.code_perplexity.item() == 2.0  # G, not NaN
    assert gl.shape == (0, 10) and torch.equal(gc, torch.zeros_like(gc))
    logits, cb, _ = inputs(9, 2, 5, 3)
    out, gl, gc = run(backend, logits, cb, groups=2, mask=torch.zeros(9, dtype=torch.bool))
    assert out.prob_perplexity.item() == 2.0 and torch.isfinite(gl).all()


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits_never_nan(backend, dtype):
    big = 65504.0 if dtype == torch.float16 else 3.0e38
    n, g, v = 64, 2, 7
    vals = torch.tensor([255.0, -255.0, big, -big, 0.0])
    logits = vals[torch.randint(0, 5, (n, g * v), generator=torch.Generator().manual_seed(0))].to(dtype)
    logits[0] = -255.0
    logits[0, 3] = 255.0  # one dominant logit: that code, in training too
    cb = torch.randn(g * v, 4).to(dtype)
    for training in (True, False):
        out, gl, gc = run(backend, logits, cb, groups=g, training=training, tau=0.1)
        assert torch.isfinite(out.quantized).all() and torch.isfinite(gl).all() and torch.isfinite(gc).all()
        assert torch.isfinite(out.prob_perplexity) and torch.isfinite(out.code_perplexity)
        assert out.codes[0, 0].item() == 3
        top = logits.float().reshape(n, g, v).max(-1).values
        chosen = logits.float().reshape(n, g, v).gather(2, out.codes[..., None]).squeeze(-1)
        gap = 0.0 if not training else 16.7 + 2.9  # noise lies in [-2.82, 16.64]
        assert (chosen >= top - gap - 1e-3 * top.abs()).all()


@pytest.mark.cpu
def test_validation_errors():
    logits, cb, mask = inputs(8, 2, 5, 3)
    with pytest.raises(TypeError, match="logits"):
        gvq(logits.long(), cb, groups=2)
    with pytest.raises(ValueError, match="groups=3"):
        gvq(logits, cb, groups=3)
    with pytest.raises(ValueError, match="codebook"):
        gvq(logits, cb[:-1], groups=2)
    with pytest.raises(ValueError, match="codebook"):
        gvq(logits, cb[None].expand(2, -1, -1), groups=2)
    with pytest.raises(ValueError, match="tau"):
        gvq(logits, cb, groups=2, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        gvq(logits, cb, groups=2, tau=float("nan"))
    with pytest.raises(TypeError, match="tau"):
        gvq(logits, cb, groups=2, tau="2")
    with pytest.raises(ValueError, match="mask"):
        gvq(logits, cb, groups=2, mask=mask[:-1])
    with pytest.raises(TypeError, match="mask"):
        gvq(logits, cb, groups=2, mask=mask.float())
    with pytest.raises(TypeError, match="training"):
        gvq(logits, cb, groups=2, training=1)
    with pytest.raises(ValueError, match="seed"):
        gvq(logits, cb, groups=2, seed=-1)
    with pytest.raises(ValueError, match="groups"):
        gvq(logits, cb, groups=0)
    with pytest.raises(ValueError, match="perplexity_eps"):
        gvq(logits, cb, groups=2, perplexity_eps=-1.0)
    with pytest.raises(sslfast.BackendUnavailableError):
        gvq(logits, cb, groups=2, backend="cuda")
    with pytest.raises(TypeError, match="hard"):
        gvq(logits, cb, groups=2, hard=0)
    soft = gvq(logits, cb, groups=2, hard=False, seed=1)  # backend=None: the cpu kernel
    assert torch.allclose(soft.quantized, ref.gumbel_vector_quantize(logits, cb, groups=2, hard=False, seed=1)[0],
                          atol=1e-5)
    # (1, G*V, d) codebooks as the modules store them
    a = gvq(logits, cb[None], groups=2, seed=4, backend="cpu")
    assert torch.equal(a.quantized, gvq(logits, cb, groups=2, seed=4, backend="cpu").quantized)


# ----------------------------------------------------------------------------- soft quantization (hard=False)

# odd shapes: N prime (several frame chunks of the soft codebook gradient at N=131), V and d
# not multiples of any block, G in {1, 2}
SOFT_SHAPES = [(37, 2, 13, 7), (131, 1, 41, 19), (5, 2, 5, 1)]


@pytest.mark.cpu
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SOFT_SHAPES)
def test_reference_soft_matches_fp64_formulation(shape, training):
    n, g, v, d = shape
    logits, cb, mask = inputs(n, g, v, d)
    for m in (None, mask):
        kw = dict(groups=g, training=training, mask=m, tau=0.7, hard=False)
        out, gl, gc = run("reference", logits, cb, **kw)
        check_against_fp64(out, gl, gc, run_fp64(logits, cb, **kw), torch.float32, soft=training)


@pytest.mark.cpu
def test_reference_soft_grads_match_fp64_autograd_of_reference():
    """The kernels' soft gradients against the reference differentiated by autograd in fp64."""
    logits, cb, mask = inputs(53, 2, 29, 11, seed=4)
    for backend in ("reference", "cpu"):
        out, gl, gc = run(backend, logits, cb, groups=2, tau=0.9, hard=False, mask=mask, seed=5)
        l64, c64 = logits.double().requires_grad_(), cb.double().requires_grad_()
        q, _, pm, _ = ref.gumbel_vector_quantize(l64, c64, groups=2, tau=0.9, hard=False, seed=5, mask=mask)
        r = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).double()
        gl64, gc64 = torch.autograd.grad((q * r).sum() + 2.5 * ref.perplexity(pm, 1e-7), [l64, c64])
        assert torch.allclose(out.quantized.double(), q.detach(), atol=1e-5, rtol=0)
        assert torch.allclose(gl.double(), gl64, atol=2e-5 * max(1.0, gl64.abs().max().item()), rtol=0)
        assert torch.allclose(gc.double(), gc64, atol=2e-5 * max(1.0, gc64.abs().max().item()), rtol=0)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_soft_parity(dtype):
    _parity("cpu", "cpu", [dtype], shapes=SOFT_SHAPES, hard=False, tau=0.7)


def _soft_vs_hard(backend, device):
    """One seed, one noise: hard and soft give the same codes and perplexities; the soft output
    is the softmax of the same l + g (checked against the fp64 formulation), not the gather."""
    logits, cb, mask = inputs(67, 2, 23, 6, scale=1.0, seed=11)
    kw = dict(groups=2, tau=0.8, seed=2**33 + 5, mask=mask.to(device))
    h = gvq(logits.to(device), cb.to(device), hard=True, backend=backend, **kw)
    so = gvq(logits.to(device), cb.to(device), hard=False, backend=backend, **kw)
    assert torch.equal(h.codes, so.codes)
    assert torch.equal(h.prob_perplexity, so.prob_perplexity) and torch.equal(h.code_perplexity, so.code_perplexity)
    q64 = quantize_fp64(logits, cb, 2, 0.8, True, 2**33 + 5, hard=False)[0]
    assert (so.quantized.cpu().double() - q64).abs().max() < 1e-5
    assert not torch.allclose(so.quantized, h.quantized, atol=1e-3)


@pytest.mark.cpu
def test_cpu_soft_same_noise_as_hard():
    _soft_vs_hard("cpu", "cpu")


@pytest.mark.cpu
def test_cpu_soft_deterministic_and_production_width():
    """V = 320 (wav2vec 2.0), several frame chunks; two runs are bit-identical."""
    logits, cb, mask = inputs(211, 2, 320, 24, scale=1.0, seed=6)
    a = run("cpu", logits, cb, groups=2, hard=False, mask=mask, tau=0.5)
    b = run("cpu", logits, cb, groups=2, hard=False, mask=mask, tau=0.5)
    assert torch.equal(a[0].quantized, b[0].quantized) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    check_against_fp64(*a, run_fp64(logits, cb, groups=2, hard=False, mask=mask, tau=0.5), torch.float32, soft=True)


@pytest.mark.cpu
def test_cpu_isa_paths_bit_identical():
    """The tile products run per ISA (baseline, AVX2 without FMA): the same bits, hard and soft."""
    from sslfast import _ext

    mod = _ext.cpu_module()
    best, before = mod.cpu_isa_supported(), mod.cpu_isa()
    if best == "scalar":
        pytest.skip("this CPU has no AVX2")
    logits, cb, mask = inputs(83, 2, 37, 29, seed=8)
    res = {}
    try:
        for isa in ("scalar", best):
            assert mod.set_cpu_isa(isa) == isa
            res[isa] = [run("cpu", logits, cb, groups=2, hard=hard, mask=mask, tau=0.6) for hard in (True, False)]
    finally:
        mod.set_cpu_isa(before)
    for a, b in zip(res["scalar"], res[best]):
        assert torch.equal(a[0].quantized, b[0].quantized) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_soft_extreme_logits_never_nan(backend, dtype):
    _extreme_soft(backend, "cpu", dtype)


def _extreme_soft(backend, device, dtype):
    big = 65504.0 if dtype == torch.float16 else 3.0e38
    n, g, v = 41, 2, 7
    vals = torch.tensor([255.0, -255.0, big, -big, 0.0])
    logits = vals[torch.randint(0, 5, (n, g * v), generator=torch.Generator().manual_seed(1))].to(dtype)
    logits[0] = -255.0
    logits[0, 3] = 255.0
    cb = torch.randn(g * v, 5).to(dtype)
    for tau in (0.05, 2.0):
        out, gl, gc = run(backend, logits.to(device), cb.to(device), groups=g, tau=tau, hard=False)
        assert torch.isfinite(out.quantized).all() and torch.isfinite(gl).all() and torch.isfinite(gc).all()
        assert torch.isfinite(out.prob_perplexity) and torch.isfinite(out.code_perplexity)
        assert out.codes[0, 0].item() == 3
        # a dominant logit makes the soft output that codeword
        assert torch.allclose(out.quantized[0, :5].float().cpu(), cb[3].float(), atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- sampler statistics


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gumbel_max_code_frequencies_chi_square(backend):
    """argmax(l + Gumbel) ~ Categorical(softmax(l)) for any tau: chi-square, fixed seed."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n, v = 40000, 8
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 255.0 - 255.0, -3.0])
    logits = row.expand(n, v).contiguous()
    cb = torch.eye(v)
    out = gvq(logits, cb, groups=1, tau=0.7, seed=20240601, backend=backend)
    counts = torch.bincount(out.codes[:, 0], minlength=v).double()
    expected = torch.softmax(row.double(), 0) * n
    stat, p = scipy_stats.chisquare(counts.numpy(), expected.numpy())
    assert p > 1e-3, (stat, p)


@pytest.mark.cpu
def test_gumbel_noise_distribution_ks():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = ref.gumbel_noise(200, 500, 99).double().flatten()
    assert torch.isfinite(g).all() and g.min() > -2.83 and g.max() < 16.65
    assert scipy_stats.kstest(g.numpy(), "gumbel_r").pvalue > 1e-3
    assert abs(g.mean().item() - 0.5772156649) < 5 * (math.pi**2 / 6 / g.numel()) ** 0.5


# ----------------------------------------------------------------------------- Hugging Face peer


def _hf_pair(groups=2, v=13, dim=10, conv=32, seed=0):
    from transformers import Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GumbelVectorQuantizer as HF

    cfg = Wav2Vec2Config(conv_dim=(conv,) * 7, num_codevector_groups=groups, num_codevectors_per_group=v,
                         codevector_dim=dim)
    torch.manual_seed(seed)
    hf = HF(cfg)
    torch.nn.init.uniform_(hf.codevectors)
    torch.nn.init.normal_(hf.weight_proj.weight)
    torch.nn.init.zeros_(hf.weight_proj.bias)
    ours = Wav2Vec2GumbelVectorQuantizer(cfg, backend="cpu")
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_hf_eval_identical(backend):
    hf, ours = _hf_pair()
    ours.backend = backend
    hf.eval()
    ours.eval()
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 17, generator=torch.Generator().manual_seed(2)) < 0.5
    for m in (None, mask):
        a, b = hf(x, m), ours(x, m)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_hf_training_same_noise_same_outputs_and_grads(backend, monkeypatch):
    """HF's training forward with torch's gumbel_softmax replaced by one drawing our stream:
    same codevectors (HF's straight-through is off by an ulp), perplexity and gradients."""
    hf, ours = _hf_pair()
    ours.backend = backend
    hf.train()
    ours.train()
    hf.temperature = ours.temperature = 1.3
    b, t, seed = 2, 11, 4242
    x = torch.randn(b, t, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(2)) < 0.5
    noise = noise_fp64(b * t, 2 * 13, seed).reshape(b * t * 2, 13)

    def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        y = torch.softmax((logits + noise) / tau, dim=-1)
        hard_y = torch.zeros_like(y).scatter_(-1, (logits + noise).argmax(-1, keepdim=True), 1.0)
        return hard_y - y.detach() + y

    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", gumbel_softmax)
    r = torch.randn(b, t, 10, generator=torch.Generator().manual_seed(3))
    res = []
    for mod, kw in ((hf, {}), (ours, {"seed": seed})):
        mod.zero_grad()
        q, ppl = mod(x, mask, **kw)
        ((q * r).sum() + 3.0 * ppl).backward()
        res.append((q.detach(), ppl.detach(), [p.grad.clone() for p in mod.parameters()]))
    (qa, pa, ga), (qb, pb, gb) = res
    assert torch.allclose(qa, qb, atol=1e-6, rtol=0)
    assert torch.allclose(pa, pb, rtol=1e-6)
    for u, w in zip(ga, gb):
        assert torch.allclose(u, w, rtol=1e-4, atol=1e-5)


@pytest.mark.cpu
def test_hf_training_perplexity_and_code_statistics():
    """Unpatched HF in training: its perplexity equals ours (noiseless softmax), and its code
    frequencies and ours agree by a two-sample chi-square test (fixed seeds)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    hf, ours = _hf_pair(groups=1, v=6, dim=4, conv=8)
    hf.train()
    ours.train()
    x = torch.randn(1, 1, 8).expand(1, 30000, 8) * 0.3
    torch.manual_seed(5)
    qa, pa = hf(x)
    qb, pb = ours(x, seed=77)
    assert torch.allclose(pa, pb, rtol=1e-5)
    cv = hf.codevectors[0]

    def codes(q):
        return (q.reshape(-1, 1, 4) - cv[None]).abs().sum(-1).argmin(-1)

    ca = torch.bincount(codes(qa.detach()), minlength=6)
    cb_ = torch.bincount(codes(qb.detach()), minlength=6)
    table = torch.stack([ca, cb_]).numpy()
    table = table[:, table.sum(0) > 0]
    assert scipy_stats.chi2_contingency(table).pvalue > 1e-3


# ----------------------------------------------------------------------------- fairseq module


@pytest.mark.cpu
def test_fairseq_module_facts():
    q = GumbelVectorQuantizer(dim=16, num_vars=11, temp=(2, 0.5, 0.999995), groups=2, combine_groups=False,
                              vq_dim=8, time_first=True, backend="cpu")
    sd = q.state_dict()
    assert list(sd) == ["vars", "weight_proj.weight", "weight_proj.bias"]
    assert sd["vars"].shape == (1, 22, 4) and sd["weight_proj.weight"].shape == (22, 16)
    assert bool((sd["vars"] >= 0).all() and (sd["vars"] < 1).all()) and torch.equal(sd["weight_proj.bias"], torch.zeros(22))
    assert q.curr_temp == 2
    for step in (0, 1000, 10**6):
        q.set_num_updates(step)
        assert q.curr_temp == max(2 * 0.999995**step, 0.5)
    q2 = GumbelVectorQuantizer(16, 11, "(2, 0.1, 0.999995)", 2, True, 8, False, weight_proj_depth=2,
                               weight_proj_factor=3)
    assert q2.vars.shape == (1, 11, 4)
    assert [k for k in q2.state_dict()] == ["vars", "weight_proj.0.0.weight", "weight_proj.0.0.bias",
                                            "weight_proj.1.weight", "weight_proj.1.bias"]
    assert q2.state_dict()["weight_proj.0.0.weight"].shape == (48, 16)


@pytest.mark.cpu
@pytest.mark.parametrize("combine_groups,time_first", [(False, True), (True, False)])
def test_fairseq_module_eval_matches_formula(combine_groups, time_first):
    torch.manual_seed(0)
    q = GumbelVectorQuantizer(16, 11, (2, 0.5, 0.999995), 2, combine_groups, 8, time_first, backend="cpu")
    q.eval()
    x = torch.randn(3, 9, 16) if time_first else torch.randn(3, 16, 9)
    res = q(x, produce_targets=True)
    assert set(res) == {"num_vars", "code_perplexity", "prob_perplexity", "temp", "targets", "x"}
    assert res["num_vars"] == 22 and res["temp"] == 2
    xt = x if time_first else x.transpose(1, 2)
    logits = q.weight_proj(xt.reshape(-1, 16)).detach()
    vars_ = q.vars.detach().repeat(1, 2, 1) if combine_groups else q.vars.detach()
    q64, codes, pp, cp = quantize_fp64(logits, vars_[0], 2, 2.0, False, 0)
    out = res["x"] if time_first else res["x"].transpose(1, 2)
    assert out.shape == (3, 9, 8)
    assert torch.equal(out.reshape(-1, 8).double(), q64)
    assert torch.equal(res["targets"], codes.reshape(3, 9, 2))
    assert abs(res["prob_perplexity"].item() - pp.item()) < 1e-5 * pp.item()
    assert abs(res["code_perplexity"].item() - cp.item()) < 1e-5 * cp.item()
    # training: gradients reach vars and weight_proj, the prob perplexity is differentiable
    q.train()
    r = q(x, seed=3)
    (r["x"].sum() - r["prob_perplexity"]).backward()
    assert q.vars.grad is not None and q.weight_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.cpu
@pytest.mark.slow
def test_torch_compile_fullgraph_cpu_backend():
    logits, cb, mask = inputs(12, 2, 5, 3)

    def f(l, c, m):
        out = gvq(l, c, groups=2, tau=1.5, seed=11, mask=m, backend="cpu")
        return (out.quantized * 1.5).sum() + out.prob_perplexity, out.codes

    compiled = torch.compile(f, fullgraph=True)
    l1, c1 = logits.clone().requires_grad_(), cb.clone().requires_grad_()
    l2, c2 = logits.clone().requires_grad_(), cb.clone().requires_grad_()
    a, ca = f(l1, c1, mask)
    b, cb_ = compiled(l2, c2, mask)
    assert torch.equal(ca, cb_) and torch.allclose(a, b)
    a.backward()
    b.backward()
    assert torch.allclose(l1.grad, l2.grad) and torch.allclose(c1.grad, c2.grad)


# ----------------------------------------------------------------------------- seeds as device tensors

# keys with a zero and a nonzero high word (3 and 2^32 + 3 share the low word) and the largest int
SEEDS = (3, 2**32 + 3, 2**63 - 1)
SEED_SHAPE = (11, 2, 13, 5)  # (N, G, V, d)
SEED_BACKENDS = [pytest.param("reference", marks=pytest.mark.cpu), pytest.param("cpu", marks=pytest.mark.cpu),
                 pytest.param("triton", marks=pytest.mark.interpreter)]


def _seed_device(backend, triton_device):
    return triton_device if backend == "triton" else torch.device("cpu")


def _assert_same_run(got, want):
    """Bit-identical outputs and gradients of two ``run`` results."""
    (o1, gl1, gc1), (o2, gl2, gc2) = got, want
    assert torch.equal(o1.codes, o2.codes) and torch.equal(o1.quantized, o2.quantized)
    assert torch.equal(o1.prob_perplexity, o2.prob_perplexity) and torch.equal(o1.code_perplexity, o2.code_perplexity)
    assert torch.equal(gl1, gl2) and torch.equal(gc1, gc2)


def _seed_run(backend, device, seed, hard=True, training=True):
    n, g, v, d = SEED_SHAPE
    logits, cb, mask = inputs(n, g, v, d, device=device)
    return run(backend, logits, cb, groups=g, seed=seed, mask=mask, hard=hard, training=training, tau=0.9)


def _check_seed_tensor_same_bits(backend, device):
    """seed=s, torch.tensor(s) and torch.tensor([s]): the same codes, outputs and gradients (the
    backward redraws the noise from the saved seed tensor), hard and soft."""
    for hard in (True, False):
        outs = {}
        for s in SEEDS:
            want = _seed_run(backend, device, s, hard)
            for seed in (torch.tensor(s, device=device), torch.tensor([s], device=device)):
                _assert_same_run(_seed_run(backend, device, seed, hard), want)
            outs[s] = want
        assert not torch.equal(outs[3][0].codes, outs[2**32 + 3][0].codes)  # the high word is part of the key
        assert not torch.equal(outs[3][1], outs[2**63 - 1][1])


def _check_negative_seed_tensor(backend, device):
    """A negative seed tensor is the key of its 64 bits: deterministic, and the fp64 formulation
    keyed by the unsigned int 2^64 - 5 (Philox on Python ints) agrees."""
    n, g, v, d = SEED_SHAPE
    neg = torch.tensor(-5, device=device)
    a = _seed_run(backend, device, neg)
    _assert_same_run(_seed_run(backend, device, neg.clone()), a)
    logits, cb, mask = inputs(n, g, v, d)
    check_against_fp64(*a, run_fp64(logits, cb, groups=g, seed=2**64 - 5, mask=mask, tau=0.9), torch.float32)
    assert not torch.equal(a[0].codes, _seed_run(backend, device, 5)[0].codes)


def _check_seed_none(backend, device):
    """seed=None draws the key with torch.randint on the device: repeatable under
    torch.manual_seed, equal to passing that draw, and fresh at the next call."""
    torch.manual_seed(123)
    a = _seed_run(backend, device, None)
    fresh = _seed_run(backend, device, None)
    torch.manual_seed(123)
    b = _seed_run(backend, device, None)
    torch.manual_seed(123)
    c = _seed_run(backend, device, torch.randint(0, 2**63 - 1, (), device=device))
    _assert_same_run(b, a)
    _assert_same_run(c, a)
    assert not torch.equal(fresh[1], a[1])


def _check_derived_seed_tensors(backend, device):
    """derive_seed with a step (and rank, base) tensor gives the key derive_seed gives the ints."""
    base = 2**40 + 9

    def t(v):
        return torch.tensor(v, device=device)

    for rank, step in ((0, 0), (3, 7), (1, 2**33 + 5)):
        want = _seed_run(backend, device, sr.derive_seed(base, rank=rank, step=step))
        for seed in (sr.derive_seed(base, rank=rank, step=t(step)), sr.derive_seed(t(base), rank=t(rank), step=step)):
            assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.device == device
            _assert_same_run(_seed_run(backend, device, seed), want)


SEED_CHECKS = [_check_seed_tensor_same_bits, _check_negative_seed_tensor, _check_seed_none, _check_derived_seed_tensors]


@pytest.mark.parametrize("check", SEED_CHECKS, ids=lambda f: f.__name__[len("_check_"):])
@pytest.mark.parametrize("backend", SEED_BACKENDS)
def test_seed_tensors_and_none(backend, check, triton_device):
    check(backend, _seed_device(backend, triton_device))


@pytest.mark.cpu
def test_reference_noise_of_a_negative_seed_tensor():
    # the tensor key's 64 bits (arithmetic shift, then mask) against Philox on the Python int
    for s in (-5, -(2**63), -1):
        assert torch.equal(ref.gumbel_noise(7, 10, torch.tensor(s)), noise_fp64(7, 10, s + 2**64))


@pytest.mark.parametrize("backend", SEED_BACKENDS[1:])  # the kernel backends: their backward redraws the noise
def test_backward_keeps_the_seed_tensor(backend, triton_device):
    # the custom op saves the seed tensor itself (no host copy of its value): changing it in place
    # between forward and backward raises instead of redrawing other noise
    dev = _seed_device(backend, triton_device)
    logits, cb, _ = inputs(8, 2, 5, 3, device=dev)
    s = torch.tensor(5, device=dev)
    out = gvq(logits.clone().requires_grad_(), cb, groups=2, hard=False, seed=s, backend=backend)
    s.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.quantized.sum().backward()


@pytest.mark.cpu
def test_bad_seed_tensors_raise():
    logits, cb, _ = inputs(8, 2, 5, 3)
    with pytest.raises(TypeError, match="int64"):
        gvq(logits, cb, groups=2, seed=torch.tensor(1.0))
    with pytest.raises(TypeError, match="int64"):
        gvq(logits, cb, groups=2, seed=torch.tensor(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="one value"):
        gvq(logits, cb, groups=2, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="seed tensor is on meta"):
        gvq(logits, cb, groups=2, seed=torch.tensor(1, device="meta"))
    with pytest.raises(TypeError, match="seed"):
        gvq(logits, cb, groups=2, seed=2.0)


@pytest.mark.cpu
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph_seed_tensor_and_none(backend, hard):
    """A seed tensor or seed=None compiles with fullgraph=True (no graph break) into a graph
    that reads no tensor on the host (tests/_compile.py); forward and backward match eager
    (the int seed, resp. the same manual_seed) bit for bit."""
    logits, cb, mask = inputs(12, 2, 5, 3)
    r = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))

    def f(l, c, seed=None):
        out = gvq(l, c, groups=2, tau=1.5, hard=hard, seed=seed, mask=mask, backend=backend)
        return (out.quantized * r).sum() + out.prob_perplexity, out.codes

    def both(fn, *seed):
        l, c = logits.clone().requires_grad_(), cb.clone().requires_grad_()
        loss, codes = fn(l, c, *seed)
        loss.backward()
        return loss.detach(), codes, l.grad, c.grad

    def same(a, b):
        return all(torch.equal(u, w) for u, w in zip(a, b))

    compiled = torch.compile(f, fullgraph=True, backend=aot_eager_no_host_reads)
    for s in (11, 2**40 + 7):
        assert same(both(compiled, torch.tensor(s)), both(f, s)), s
    assert not same(both(compiled, torch.tensor(11)), both(compiled, torch.tensor(12)))
    torch.manual_seed(5)
    got = both(compiled)
    fresh = both(compiled)
    torch.manual_seed(5)
    assert same(got, both(f))
    assert not same(fresh, got)


# ----------------------------------------------------------------------------- Triton (interpreter)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_parity(dtype, triton_device):
    _parity("triton", triton_device, [dtype], shapes=[(37, 2, 13, 7), (5, 3, 5, 1)])


@pytest.mark.interpreter
def test_triton_codes_identical_to_cpu_and_extremes(triton_device):
    logits, cb, mask = inputs(48, 2, 40, 5, scale=1.0, seed=9)
    logits[:5] = 255.0 * torch.sign(logits[:5])
    a = gvq(logits, cb, groups=2, seed=2**62 + 3, mask=mask, backend="cpu")
    b = gvq(logits.to(triton_device), cb.to(triton_device), groups=2, seed=2**62 + 3, mask=mask.to(triton_device),
            backend="triton")
    assert torch.equal(a.codes, b.codes.cpu()) and torch.equal(a.quantized, b.quantized.cpu())
    assert torch.allclose(a.prob_perplexity, b.prob_perplexity.cpu(), rtol=1e-5)
    assert torch.isfinite(b.prob_perplexity) and torch.equal(a.code_perplexity, b.code_perplexity.cpu())


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_soft_parity(dtype, triton_device):
    _parity("triton", triton_device, [dtype], shapes=SOFT_SHAPES, hard=False, tau=0.7)


@pytest.mark.interpreter
def test_triton_soft_same_noise_as_hard_and_extremes(triton_device):
    _soft_vs_hard("triton", triton_device)
    for dtype in (torch.float32, torch.float16):
        _extreme_soft("triton", triton_device, dtype)


@pytest.mark.interpreter
def test_triton_empty_batch(triton_device):
    logits, cb, _ = inputs(0, 2, 5, 3, device=triton_device)
    out, gl, gc = run("triton", logits, cb, groups=2)
    assert out.codes.shape == (0, 2) and out.prob_perplexity.item() == 2.0 and torch.equal(gc, torch.zeros_like(gc))


# Triton's V tiles (kernels/gumbel_quantize.py, ``plan``; the same on a GPU and here): rows of
# V codewords spanning several BLOCK_V tiles, the last one partial (150 = 64 + 64 + 22, 129 =
# 64 + 64 + 1), N spanning frame blocks (the last partial), d spanning several BLOCK_D slices.
MULTI_TILE_SHAPES = [(19, 2, 150, 9), (17, 1, 129, 70)]


def _assert_multi_tile(shapes, partial=True):
    """The premise of a multi-tile test: V spans more than two tiles, N more than one frame
    block, the last of each partial (unless partial=False)."""
    from sslfast.kernels import gumbel_quantize as kgq

    for n, g, v, d in shapes:
        t = kgq.plan(v, d)
        assert v > 2 * t["BLOCK_V"] and n > t["BLOCK_N"], (n, v, t)
        assert not partial or (v % t["BLOCK_V"] and n % t["BLOCK_N"]), (n, v, t)


@pytest.mark.interpreter
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_multi_tile_parity(dtype, hard, triton_device):
    """Forward and backward, hard and soft, training and eval, with and without a mask, where
    the softmaxes and argmaxes run online over several V tiles: against the fp64 formulation
    (fp32 tolerances; fp16 within twice the reference's own error)."""
    _assert_multi_tile(MULTI_TILE_SHAPES)
    _parity("triton", triton_device, [dtype], shapes=MULTI_TILE_SHAPES, hard=hard, tau=0.7)


@pytest.mark.interpreter
def test_triton_multi_tile_codes_identical_to_cpu(triton_device):
    """V = 320 (wav2vec 2.0; five tiles of 64): the same codes and hard outputs as the C++
    backend for one seed, hard and soft, and the soft output within fp32 rounding."""
    _assert_multi_tile([(35, 2, 320, 6)], partial=False)
    logits, cb, mask = inputs(35, 2, 320, 6, scale=1.0, seed=12)
    for hard in (True, False):
        kw = dict(groups=2, seed=2**45 + 9, mask=mask, hard=hard, tau=0.6)
        a = gvq(logits, cb, backend="cpu", **kw)
        b = gvq(logits.to(triton_device), cb.to(triton_device), backend="triton",
                **{**kw, "mask": mask.to(triton_device)})
        assert torch.equal(a.codes, b.codes.cpu())
        assert torch.equal(a.code_perplexity, b.code_perplexity.cpu())
        assert torch.allclose(a.prob_perplexity, b.prob_perplexity.cpu(), rtol=1e-5)
        if hard:
            assert torch.equal(a.quantized, b.quantized.cpu())
        else:
            assert torch.allclose(a.quantized, b.quantized.cpu(), atol=1e-5, rtol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("training", [True, False])
def test_triton_argmax_ties_across_tiles_take_lowest_index(training, triton_device):
    """Equal maxima of l + g (training) or l (eval) in different V tiles, inside one tile and
    at a tile boundary: the code is the lowest index, as torch.argmax and the reference."""
    n, v, seed = 6, 200, 31  # tiles of 64: [0, 64), [64, 128), [128, 192), [192, 200)
    ties = [(10, 70), (70, 130, 199), (63, 64), (5, 6), (199,), (130, 71, 150)]
    noise = noise_fp64(n, v, seed) if training else torch.zeros(n, v)
    logits = torch.full((n, v), -100.0)
    for r, pos in enumerate(ties):
        for p in pos:
            logits[r, p] = -noise[r, p]  # l + g == 0 exactly in fp32; elsewhere l + g < -80
    assert all(((logits + noise)[r, list(pos)] == 0).all() for r, pos in enumerate(ties))
    expected = torch.tensor([min(pos) for pos in ties])
    cb = torch.randn(v, 3, generator=torch.Generator().manual_seed(0))
    for backend, dev in (("reference", "cpu"), ("triton", triton_device)):
        out = gvq(logits.to(dev), cb.to(dev), groups=1, seed=seed, training=training, backend=backend)
        assert torch.equal(out.codes[:, 0].cpu(), expected), backend


@pytest.mark.interpreter
def test_triton_rejects_rows_past_int32_positions(triton_device):
    """Positions g*V + v are int32 in the kernels: a G*V past that is refused on the host,
    with V named (stride-0 views: nothing of that size is allocated)."""
    from sslfast.kernels import gumbel_quantize as kgq

    gv = kgq.MAX_COLUMNS + 2
    logits = torch.zeros(1, 1, dtype=torch.float16, device=triton_device).expand(1, gv)
    cb = torch.zeros(1, 1, dtype=torch.float16, device=triton_device).expand(gv, 1)
    with pytest.raises(ValueError, match=f"V={gv // 2}"):
        gvq(logits, cb, groups=2, backend="triton")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_parity(backend, dtype):
    _parity(backend, "cuda", [dtype], shapes=SHAPES + [(301, 2, 320, 128), (64, 1, 1000, 33)])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_codes_bit_identical_deterministic_and_large(backend):
    # Expected values from the fp64 formulation, never from the C++ backend (it shares
    # csrc/gumbel_quantize.h with the CUDA kernels): codes and the gather exact, the rest to
    # FP32_TOL.
    logits, cb, mask = inputs(3124, 2, 320, 128, scale=1.0, seed=3)
    truth = run_fp64(logits, cb, groups=2, seed=99, mask=mask)
    outs = [run(backend, logits.cuda(), cb.cuda(), groups=2, seed=99, mask=mask.cuda()) for _ in range(2)]
    check_against_fp64(*outs[0], truth, torch.float32)
    # deterministic: no atomics anywhere
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    assert torch.equal(outs[0][0].prob_perplexity, outs[1][0].prob_perplexity)
    # extremes in fp16
    big = torch.tensor([255.0, -255.0, 65504.0, -65504.0])
    hostile = big[torch.randint(0, 4, (512, 640), generator=torch.Generator().manual_seed(0))].half().cuda()
    o, gl, gc = run(backend, hostile, cb.half().cuda(), groups=2, tau=0.1)
    assert torch.isfinite(gl).all() and torch.isfinite(o.prob_perplexity) and torch.isfinite(gc).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_chi_square_and_hf_eval(backend):
    scipy_stats = pytest.importorskip("scipy.stats")
    n, v = 100000, 8
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    out = gvq(row.expand(n, v).contiguous().cuda(), torch.eye(v).cuda(), groups=1, tau=0.5, seed=7, backend=backend)
    counts = torch.bincount(out.codes[:, 0].cpu(), minlength=v).double()
    assert scipy_stats.chisquare(counts.numpy(), (torch.softmax(row.double(), 0) * n).numpy()).pvalue > 1e-3
    hf, ours = _hf_pair()
    hf, ours = hf.cuda().eval(), ours.cuda().eval()
    ours.backend = backend
    x = torch.randn(4, 50, 32, device="cuda")
    mask = torch.rand(4, 50, device="cuda") < 0.5
    a, b = hf(x, mask), ours(x, mask)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_soft_parity(backend, dtype):
    _parity(backend, "cuda", [dtype], shapes=SOFT_SHAPES + [(301, 2, 320, 128), (64, 1, 1000, 33)], hard=False,
            tau=0.7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_soft_same_noise_deterministic_and_large(backend):
    _soft_vs_hard(backend, "cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        _extreme_soft(backend, "cuda", dtype)
    logits, cb, mask = inputs(3124, 2, 320, 128, scale=1.0, seed=3)
    truth = run_fp64(logits, cb, groups=2, seed=99, mask=mask, hard=False, tau=0.5)  # not the C++ backend
    outs = [run(backend, logits.cuda(), cb.cuda(), groups=2, seed=99, mask=mask.cuda(), hard=False, tau=0.5)
            for _ in range(2)]
    check_against_fp64(*outs[0], truth, torch.float32, soft=True)
    # deterministic: chunk partials added in a fixed order, no atomics
    assert torch.equal(outs[0][0].quantized, outs[1][0].quantized)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])


def _assert_graph_replays(fn, base, noisy):
    """fn(seed) -> tuple of tensors, captured twice in a CUDA graph, with (a) seed=None and (b)
    seed=derive_seed(base, step=step) after step.add_(1) inside the capture, each replayed 3
    times: output ``noisy`` differs between the replays of each, and replay k of (b) equals an
    eager fn(derive_seed(base, step=k)) in every output."""
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def captured(name):
        if name == "none":
            return fn(None)
        step.add_(1)
        return fn(sr.derive_seed(base, step=step))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (Triton compiles here)
        captured("none")
        captured("step")
    torch.cuda.current_stream().wait_stream(side)
    step.zero_()
    replays = {}
    for name in ("none", "step"):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = captured(name)
        replays[name] = []
        for _ in range(3):
            graph.replay()
            replays[name].append([t.clone() for t in static])
    torch.cuda.synchronize()
    assert int(step) == 3
    for name, outs in replays.items():
        for i in range(3):
            for j in range(i):
                assert not torch.equal(outs[i][noisy], outs[j][noisy]), (name, i, j)
    for k, got in enumerate(replays["step"], start=1):
        want = fn(sr.derive_seed(base, step=k))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), k


@pytest.mark.gpu
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_replays_draw_fresh_noise(backend, hard):
    """Forward captured in a CUDA graph: every replay draws new noise, with seed=None (torch's
    graph-safe generator) and with a derived seed whose step tensor advances inside the graph;
    replay k of the latter equals an eager call with seed=derive_seed(base, step=k)."""
    logits, cb, mask = inputs(301, 2, 320, 128, scale=1.0, seed=3)
    logits, cb, mask = logits.cuda(), cb.cuda(), mask.cuda()

    def fn(seed):
        out = gvq(logits, cb, groups=2, tau=0.7, hard=hard, seed=seed, mask=mask, backend=backend)
        return out.quantized, out.codes, out.prob_perplexity

    _assert_graph_replays(fn, 2**40 + 13, noisy=1)


@pytest.mark.gpu
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_forward_and_backward(backend, hard):
    """Forward and backward in one captured graph: the backward redraws the noise from the seed
    tensor the forward used (seed=None: the replay's draw), so replay k of the derived seed
    equals an eager forward and backward with seed=derive_seed(base, step=k)."""
    logits, cb, mask = inputs(301, 2, 320, 128, scale=1.0, seed=3)
    logits, cb, mask = logits.cuda().requires_grad_(), cb.cuda().requires_grad_(), mask.cuda()
    r = torch.randn(301, 256, generator=torch.Generator().manual_seed(4)).cuda()

    def fn(seed):
        out = gvq(logits, cb, groups=2, tau=0.7, hard=hard, seed=seed, mask=mask, backend=backend)
        gl, gc = torch.autograd.grad((out.quantized * r).sum() + 2.5 * out.prob_perplexity, (logits, cb))
        return out.codes, out.quantized.detach(), gl, gc

    _assert_graph_replays(fn, 2**40 + 17, noisy=2)
