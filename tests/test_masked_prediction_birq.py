"""masked_prediction_loss with BiRQ's on-the-fly targets (``GumbelRPQTargets``): the reference
against an independent fp64 formula (distances to the codewords, the Gumbel noise of
gumbel_vector_quantize), its eval limit against the BEST-RQ labels of random_projection_quantize,
gradcheck through both target inputs, every kernel backend against the reference under the
project's 2x-reference error rule (loss, stats, and the gradients of x, the heads, the features
and the codebooks), seeds, hostile inputs and validation.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sslfast
from _compile import aot_eager_no_host_reads
from _tolerance import assert_error_rule
from sslfast.reference import masked_prediction as ref
from sslfast.reference.gumbel_quantize import gumbel_noise
from sslfast.reference.rp_quantize import random_projection_quantize as rpq_reference
from test_masked_prediction import KERNEL_BACKENDS, _device


def make_case(n, h, v, d, dt, *, seed=0, shared_y=False, bias=True, shared_x=True):
    """fp64 inputs: encoder output x, heads w (and bias), RPQ features f and codebooks c."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, d) if shared_x else (n, h, d), generator=g, dtype=torch.float64)
    w = torch.randn(h, v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(h, v, generator=g, dtype=torch.float64) if bias else None
    f = torch.randn((n, dt) if shared_y else (n, h, dt), generator=g, dtype=torch.float64)
    c = torch.randn(h, v, dt, generator=g, dtype=torch.float64)
    return x, w, b, f, c


def formula_targets(f, c, tau, seed, training=True):
    """BiRQ's soft targets the long way in fp64: softmax((-|f^ - c^|^2 + G) / tau), distances
    computed as distances (not through the 2 <f^, c^> identity the op uses)."""
    n, (h, v, _) = f.shape[0], c.shape
    fh = F.normalize(f.double(), dim=-1)
    fh = fh[:, None].expand(n, h, -1) if fh.dim() == 2 else fh
    ch = F.normalize(c.double(), dim=-1)
    dist = ((fh[:, :, None, :] - ch[None]) ** 2).sum(-1)  # (N, H, V)
    logits = -dist
    if training:
        logits = logits + gumbel_noise(n, h * v, seed).double().reshape(n, h, v)
    return torch.softmax(logits / tau, dim=-1)


# ----------------------------------------------------------------------------- reference = spec

@pytest.mark.cpu
@pytest.mark.parametrize("shared_y", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_reference_targets_match_distance_formula_fp64(shared_y, training):
    _, _, _, f, c = make_case(23, 3, 11, 4, 5, seed=1, shared_y=shared_y)
    got = ref.gumbel_rpq_soft_targets(f, c, tau=0.7, seed=123, training=training)
    torch.testing.assert_close(got, formula_targets(f, c, 0.7, 123, training), rtol=1e-12, atol=1e-13)


@pytest.mark.cpu
def test_eval_targets_peak_at_the_best_rq_label():
    # with no noise and a small temperature the target is the RPQ label of the same features
    # (random_projection_quantize, cosine metric, identity projection)
    n, h, v, dt = 64, 2, 40, 6
    _, _, _, f, c = make_case(n, h, v, 4, dt, seed=2)
    q = ref.gumbel_rpq_soft_targets(f, c, tau=1e-3, seed=0, training=False)
    labels = rpq_reference(f.reshape(n, h * dt), torch.eye(h * dt, dtype=torch.float64), c)
    assert torch.equal(q.argmax(-1), labels)


@pytest.mark.cpu
def test_gumbel_targets_sample_the_softmax_of_the_scores():
    # Gumbel-max: argmax over v of (-dist + G) is distributed as softmax(-dist) (tau does not
    # move the argmax). 4000 rows of one feature vector, chi-square against the closed form.
    n, v, dt = 4000, 5, 3
    g = torch.Generator().manual_seed(5)
    c = torch.randn(1, v, dt, generator=g, dtype=torch.float64)
    f = torch.randn(1, dt, generator=g, dtype=torch.float64).expand(n, dt)
    q = ref.gumbel_rpq_soft_targets(f, c, tau=0.5, seed=99)
    counts = torch.bincount(q[:, 0].argmax(-1), minlength=v).double()
    p = torch.softmax(-((F.normalize(f[:1], dim=-1)[:, None] - F.normalize(c[0], dim=-1)) ** 2).sum(-1), dim=-1)[0]
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum().item()
    assert chi2 < 18.47, chi2  # 99.9% quantile of chi-square with 4 degrees of freedom


@pytest.mark.cpu
@pytest.mark.parametrize("shared_y", [False, True])
def test_reference_gradcheck_reaches_features_and_codebooks(shared_y):
    x, w, b, f, c = make_case(5, 2, 4, 3, 3, seed=3, shared_y=shared_y)
    inputs = [a.requires_grad_() for a in (x, w, b, f, c)]

    def fn(xx, ww, bb, ff, cc):
        return sslfast.masked_prediction_loss(xx, ww, sslfast.GumbelRPQTargets(ff, cc, tau=0.6, seed=11), bias=bb,
                                              label_smoothing=0.1, reduction="sum", backend="reference")

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.cpu
def test_reference_loss_is_soft_target_cross_entropy():
    x, w, b, f, c = make_case(17, 2, 9, 5, 4, seed=4)
    q = formula_targets(f, c, 0.8, 7)
    logits = torch.einsum("nd,hvd->nhv", x, w) + b
    want = torch.stack([F.cross_entropy(logits[:, i], q[:, i], reduction="none", label_smoothing=0.2)
                        for i in range(2)], dim=1)
    got = sslfast.masked_prediction_loss(x, w, sslfast.GumbelRPQTargets(f, c, tau=0.8, seed=7), bias=b,
                                         label_smoothing=0.2, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- kernels

def _run(backend, x, w, b, f, c, *, dtype, dev, tau=0.7, seed=5, training=True, **kw):
    """Loss, stats and the gradients of sum(gout * loss) w.r.t. x, w, b, f, c."""
    xs, ws, fs, cs = (a.detach().to(dev, dtype).requires_grad_() for a in (x, w, f, c))
    bs = None if b is None else b.detach().to(dev, dtype).requires_grad_()
    out = sslfast.masked_prediction_loss(xs, ws, sslfast.GumbelRPQTargets(fs, cs, tau=tau, seed=seed, training=training),
                                         bias=bs, return_stats=True, backend=backend, **kw)
    gout = (torch.linspace(-1, 1, out.loss.numel(), dtype=out.loss.dtype).reshape(out.loss.shape).to(dev)
            if out.loss.dim() else 1.3)
    (out.loss * gout).sum().backward()
    return [out.loss, out.correct, out.count] + [None if a is None else a.grad for a in (xs, ws, bs, fs, cs)]


def _compare(backend, case, dtype=torch.float32, **kw):
    dev = _device(backend)
    truth = _run("reference", *case, dtype=torch.float64, dev="cpu", **kw)
    ref32 = _run("reference", *case, dtype=dtype if dtype == torch.float32 else torch.float32, dev="cpu", **kw)
    got = _run(backend, *case, dtype=dtype, dev=dev, **kw)
    assert torch.equal(got[2].cpu(), truth[2])
    # top-1 agreement may differ on a near tie: at most one pair per head
    assert (got[1].cpu() - truth[1]).abs().max() <= 1
    names = ["loss", None, None, "dx", "dw", "db", "dfeatures", "dcodebooks"]
    for name, g, r, t in zip(names, got, ref32, truth):
        if name is None or t is None:
            continue
        if dtype == torch.float32 or name == "loss":  # the loss is fp32 math on the stored inputs
            assert_error_rule(g.float(), r, t, f"{backend} {name}")
        else:
            # gradients in fp16 / bf16: within the dtype's resolution of the largest one, as
            # tests/test_masked_prediction.py's low-precision rule (the Triton kernels round dS
            # to the operand dtype for the tensor-core products, like PyTorch in that dtype)
            res = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
            assert g.dtype == dtype, f"{backend} {name}: {g.dtype}"
            err = (g.double().cpu() - t).abs().max().item()
            assert err <= 4 * res * t.abs().max().item(), f"{backend} {name}: error {err:.3g}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n,h,v,d,dt", [(1, 1, 1, 1, 1), (7, 2, 9, 5, 3), (70, 3, 67, 20, 16), (130, 2, 130, 33, 5)])
@pytest.mark.parametrize("shared_y", [False, True])
def test_kernel_matches_reference(backend, n, h, v, d, dt, shared_y):
    _compare(backend, make_case(n, h, v, d, dt, seed=n + v, shared_y=shared_y and h > 1), reduction="none")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("opt", [dict(), dict(label_smoothing=0.1, reduction="sum"), dict(training=False, tau=0.1),
                                 dict(use_mask=True, tau=2.0), dict(tau=1e-3)], ids=str)
@pytest.mark.parametrize("heads", ["shared", "perhead-nobias"])
def test_kernel_options_match_reference(backend, opt, heads):
    n, h, v, d, dt = 41, 2, 37, 12, 8
    case = make_case(n, h, v, d, dt, seed=9, shared_x=heads == "shared", bias=heads == "shared")
    kw = dict(opt)
    if kw.pop("use_mask", False):
        kw["mask"] = (torch.arange(n) % 3 != 0).to(_device(backend))
    _compare(backend, case, **kw)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_low_precision(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter has no bf16")
    n, h, v, d, dt = 50, 2, 45, 24, 8
    case = [None if a is None else a.to(dtype).double() for a in make_case(n, h, v, d, dt, seed=12)]
    _compare(backend, case, dtype=dtype, reduction="none")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_int_and_tensor_seeds_draw_the_same_targets(backend):
    dev = _device(backend)
    x, w, b, f, c = (a.float().to(dev) for a in make_case(20, 2, 30, 8, 4, seed=13))

    def loss(seed):
        return sslfast.masked_prediction_loss(x, w, sslfast.GumbelRPQTargets(f, c, tau=0.5, seed=seed), bias=b,
                                              reduction="none", backend=backend)

    a = loss(2**40 + 3)
    assert torch.equal(a, loss(torch.tensor(2**40 + 3, device=dev)))
    assert not torch.equal(a, loss(2**40 + 4))
    torch.manual_seed(0)
    drawn = loss(None)
    torch.manual_seed(0)
    assert torch.equal(drawn, loss(None))


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
def test_empty_batch_and_zero_vectors(backend):
    dev = _device(backend)
    x, w, b, f, c = (a.float().to(dev) for a in make_case(6, 2, 5, 4, 3, seed=14))
    empty = sslfast.masked_prediction_loss(x[:0].requires_grad_(), w, sslfast.GumbelRPQTargets(f[:0], c, seed=1),
                                           backend=backend)
    assert empty.item() == 0.0
    # zero features and a zero codeword: cosine 0, finite loss, zero gradient for the zero row
    f = f.clone()
    f[0] = 0
    c = c.clone()
    c[1, 2] = 0
    fs, cs = f.requires_grad_(), c.requires_grad_()
    loss = sslfast.masked_prediction_loss(x, w, sslfast.GumbelRPQTargets(fs, cs, seed=1), bias=b, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all() and torch.isfinite(cs.grad).all()
    assert torch.equal(fs.grad[0], torch.zeros_like(fs.grad[0])) and torch.equal(cs.grad[1, 2], torch.zeros_like(cs.grad[1, 2]))


@pytest.mark.cpu
@pytest.mark.slow
def test_torch_compile_fullgraph_with_seed_tensor():
    x, w, b, f, c = (a.float() for a in make_case(12, 2, 10, 6, 4, seed=15))

    def fn(xx, ff, seed):
        return sslfast.masked_prediction_loss(xx, w, sslfast.GumbelRPQTargets(ff, c, tau=0.5, seed=seed), bias=b)

    compiled = torch.compile(fn, fullgraph=True, backend=aot_eager_no_host_reads)
    for s in (3, 4):
        seed = torch.tensor(s)
        xs, fs = x.clone().requires_grad_(), f.clone().requires_grad_()
        got = compiled(xs, fs, seed)
        got.backward()
        xe, fe = x.clone().requires_grad_(), f.clone().requires_grad_()
        want = fn(xe, fe, seed)
        want.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(fs.grad, fe.grad, rtol=0, atol=0)


@pytest.mark.cpu
def test_validation_errors_name_the_argument():
    x, w, b, f, c = (a.float() for a in make_case(6, 2, 5, 4, 3, seed=16))
    T = sslfast.GumbelRPQTargets
    cases = [
        (T(f, c[:, :4]), ValueError, "codebooks"),
        (T(f[:5], c), ValueError, "features"),
        (T(f[..., :2], c), ValueError, "features"),
        (T(f, c, tau=0.0), ValueError, "tau"),
        (T(f, c, tau=float("nan")), ValueError, "tau"),
        (T(f, c, training=1), TypeError, "training"),
        (T(f, c, seed=1.5), TypeError, "seed"),
        (T(f.long(), c), TypeError, "features"),
        (T(f, c, seed=torch.tensor(1, dtype=torch.int32)), TypeError, "int64"),
    ]
    for t, exc, word in cases:
        with pytest.raises(exc, match=word):
            sslfast.masked_prediction_loss(x, w, t, bias=b)


@pytest.mark.cpu
def test_quantizer_module_gumbel_targets_follow_its_labels_and_reach_the_encoder():
    # nn.RandomProjectionQuantizer.gumbel_targets: in eval at a small temperature the target
    # peaks at the module's own BEST-RQ label; in training the gradient reaches the input
    q = sslfast.nn.RandomProjectionQuantizer(12, codebook_dim=4, codebook_size=20, num_codebooks=2, stack=2,
                                             input_norm="layernorm", seed=0)
    g = torch.Generator().manual_seed(21)
    feats = torch.randn(3, 10, 12, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.6
    labels = q(feats, mask)[mask]  # (M, 2)
    q.eval()
    t = q.gumbel_targets(feats, mask, tau=1e-3)
    assert not t.training and t.features.shape == (int(mask.sum()), 2, 4)
    soft = ref.gumbel_rpq_soft_targets(t.features, t.codebooks, tau=t.tau, seed=0, training=False)
    assert torch.equal(soft.argmax(-1), labels)
    q.train()
    x = feats.requires_grad_()
    m = int(mask.sum())
    enc = torch.randn(m, 8, generator=g, dtype=torch.float64)
    w = torch.randn(2, 20, 8, generator=g, dtype=torch.float64)
    loss = sslfast.masked_prediction_loss(enc, w, q.gumbel_targets(x, mask, seed=3))
    loss.backward()
    assert x.grad.abs().sum() > 0 and q.projection.grad is None
    with pytest.raises(ValueError, match="cosine"):
        sslfast.nn.RandomProjectionQuantizer(12, metric="l2").gumbel_targets(feats)
