"""wav2vec 2.0 contrastive loss: the reference against Hugging Face and an independent
fairseq-order implementation, every backend against the reference (error rule of
op-contract.md against fp64), gradients (gradcheck in fp64, kernel grads vs fp64 autograd),
edge and hostile inputs, validation, torch.compile."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sslfast
from sslfast import _dispatch, _ext
from sslfast import random as sr
from sslfast.reference import contrastive as ref
from sslfast.reference import negatives as ref_negatives
from _tolerance import assert_error_rule
from _compile import aot_eager_no_host_reads

try:
    from transformers.models.wav2vec2 import modeling_wav2vec2 as hf_w2v
except ImportError:  # pragma: no cover - transformers is a test dependency
    hf_w2v = None

needs_hf = pytest.mark.skipif(hf_w2v is None, reason="transformers is not installed")



def make_problem(n, m, d, k, dtype=torch.float32, seed=0, positives="random", dup=True, itype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(m, d, generator=g)
    neg = torch.randint(0, m, (n, k), generator=g)
    pos = torch.randint(0, m, (n,), generator=g) if positives == "random" else None
    if dup and n > 3 and k > 2 and m > 3:
        # a negative stored-equal to the positive under another index, and one by index
        p1 = int(pos[1]) if pos is not None else 1
        other = (p1 + 1) % m
        y[other] = y[p1]
        neg[1, 0] = other
        neg[2, 1] = int(pos[2]) if pos is not None else 2
    x, y = x.to(dtype), y.to(dtype)
    return x, y, neg.to(itype), None if pos is None else pos.to(itype)


def loss_and_grads(x, y, neg, pos, **kw):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    out = sslfast.contrastive_loss(x, y, neg, pos, return_stats=True, **kw)
    loss = out.loss
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape) \
        if loss.dim() else 1.0
    gx, gy = torch.autograd.grad((loss * w).sum(), [x, y])
    return loss.detach().double(), gx.double(), gy.double(), out.correct


def check_losses_and_grads(got, ref, truth, dtype, what):
    """The error rule (tests/_tolerance.py) on (loss, grad x, grad y): the loss is fp32, the
    gradients are in the inputs' dtype."""
    for i, (name, out_dtype) in enumerate((("loss", torch.float32), ("grad x", dtype), ("grad y", dtype))):
        assert_error_rule(got[i], ref[i], truth[i], f"{what} {name}", out_dtype=out_dtype)


def truth_hf(x, y, mask, sampled):
    """fp64 loss and gradients of the hf convention on the stored values (the reference in fp64)."""
    xd, yd = x.double().requires_grad_(), y.double().requires_grad_()
    loss = sslfast.wav2vec2_contrastive_loss(xd, yd, mask, sampled.shape[-1], convention="hf", negatives=sampled,
                                             backend="reference")
    return (loss.detach(), *torch.autograd.grad(loss, [xd, yd]))


def kernel_backends(device):
    names = []
    for b in ("cpu", "triton", "cuda"):
        if sslfast._dispatch.backend_unavailable_reason(b, device) is None:
            names.append(b)
    return names


# ----------------------------------------------------------------------------- peers


def hf_contrastive_loss(x, y, mask, sampled, temperature):
    """Steps 3-6 of Hugging Face's Wav2Vec2ForPreTraining.forward, with its own
    compute_contrastive_logits, on (B, T, D) features and (B, T, K) flat indices."""
    b, t, d = y.shape
    negs = y.reshape(-1, d)[sampled.long().view(-1)].view(b, t, -1, d).permute(2, 0, 1, 3)
    logits = hf_w2v.Wav2Vec2ForPreTraining.compute_contrastive_logits(y[None, :], negs, x, temperature)
    neg_is_pos = (y == negs).all(-1)
    if neg_is_pos.any():
        logits[1:][neg_is_pos] = float("-inf")
    logits = logits.transpose(0, 2).reshape(-1, logits.size(0))
    target = ((1 - mask.long()) * -100).transpose(0, 1).flatten()
    return F.cross_entropy(logits.float(), target, reduction="sum")


def fairseq_order_loss(x, y, neg, pos, temperature):
    """fairseq's order (semantics.md section 3), written independently with torch's own
    cosine_similarity: fp32 cosine, fp32 division, one cast to the input dtype, fp32 CE."""
    idx = torch.cat([pos[:, None], neg], 1).long()
    targets = y[idx].permute(1, 0, 2)  # (K+1, N, D) like fairseq
    logits = torch.cosine_similarity(x.float()[None], targets.float(), dim=-1) / temperature
    logits = logits.type_as(x)
    neg_is_pos = (targets[:1] == targets[1:]).all(-1)
    logits[1:][neg_is_pos] = float("-inf")
    logits = logits.transpose(0, 1).float()
    loss = F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long), reduction="sum")
    mx, mn = logits.argmax(-1) == 0, logits.argmin(-1) == 0
    return loss, int(mx.sum() - (mx & mn).sum())


def hf_inputs(b=3, t=23, d=16, k=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g).to(dtype)
    y = torch.randn(b, t, d, generator=g).to(dtype)
    mask = torch.rand(b, t, generator=g) < 0.5
    mask[:, :2] = True  # Hugging Face's sampler needs two masked frames per row
    np.random.seed(seed)
    sampled = torch.from_numpy(hf_w2v._sample_negative_indices((b, t), k, mask.numpy()))
    return x, y, mask, sampled


def packed_rows(x, y, mask, sampled):
    d = x.shape[-1]
    flat = mask.reshape(-1).nonzero().squeeze(1)
    return x.reshape(-1, d)[flat], y.reshape(-1, d), sampled.reshape(-1, sampled.shape[-1])[flat], flat


@pytest.mark.cpu
@needs_hf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matches_hugging_face_hf_precision(dtype, backend):
    x, y, mask, sampled = hf_inputs(dtype=dtype)
    # make a masked frame's negative equal to its positive in value, the case HF masks
    y[0, 5] = y[0, 0]
    sampled[0, 0, 0] = 5
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = hf_contrastive_loss(xr, yr, mask, sampled, 0.1)
    gx_want, gy_want = torch.autograd.grad(want, [xr, yr])
    xm, yf, negm, flat = packed_rows(x, y, mask, sampled)
    xm = xm.clone().requires_grad_()
    yf = yf.clone().requires_grad_()
    got = sslfast.contrastive_loss(xm, yf, negm, flat, precision="hf", backend=backend)
    gxm, gy = torch.autograd.grad(got, [xm, yf])
    gx = torch.zeros_like(x.reshape(-1, x.shape[-1])).index_copy(0, flat, gxm)
    # Hugging Face in the same dtype is the reference of the error rule
    check_losses_and_grads((got, gx.reshape(x.shape), gy.reshape(y.shape)), (want, gx_want, gy_want),
                           truth_hf(x, y, mask, sampled), dtype, f"{backend} vs Hugging Face")


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matches_fairseq_order(dtype, backend):
    x, y, neg, pos = make_problem(29, 31, 24, 9, dtype=dtype, seed=3)
    want, want_correct = fairseq_order_loss(x, y, neg, pos, 0.1)
    got = sslfast.contrastive_loss(x, y, neg, pos, precision="fairseq", return_stats=True, backend=backend)
    truth = sslfast.contrastive_loss(x.double(), y.double(), neg, pos, backend="reference")
    assert_error_rule(got.loss, want, truth, f"{backend} vs fairseq's order", out_dtype=torch.float32)
    assert int(got.correct) == want_correct and got.count == 29


@pytest.mark.cpu
def test_precision_orders_differ_in_fp16_only():
    x, y, neg, pos = make_problem(64, 64, 32, 16, seed=4, dup=False)
    for dtype in (torch.float32, torch.float16):
        a = ref.contrastive_logits(x.to(dtype), y.to(dtype), neg, pos, precision="fairseq")
        b = ref.contrastive_logits(x.to(dtype), y.to(dtype), neg, pos, precision="hf")
        same = torch.equal(a, b)
        assert same == (dtype == torch.float32)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.cpu
@pytest.mark.parametrize("neg_is_pos", ["vector", "index", "none"])
def test_reference_gradcheck_fp64(neg_is_pos):
    # finite differences would break a stored-equal pair, so "vector" runs without one
    x, y, neg, pos = make_problem(7, 9, 5, 4, dtype=torch.float64, seed=5, dup=neg_is_pos != "vector")
    x.requires_grad_()
    y.requires_grad_()

    def f(a, b):
        return ref.contrastive_loss(a, b, neg, pos, temperature=0.3, neg_is_pos=neg_is_pos, reduction="none")

    assert torch.autograd.gradcheck(f, (x, y))


# ----------------------------------------------------------------------------- kernel parity

PARITY_SHAPES = [(1, 1, 1, 1), (13, 17, 19, 11), (37, 41, 67, 29)]


@pytest.mark.cpu
@pytest.mark.parametrize("shape", PARITY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", ["fairseq", "hf"])
def test_cpu_matches_reference(shape, dtype, precision):
    _check_backend("cpu", shape, dtype, precision, "vector", "none", torch.int64, "random", False)


@pytest.mark.cpu
@pytest.mark.parametrize("neg_is_pos", ["index", "none"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_cpu_options(neg_is_pos, reduction):
    _check_backend("cpu", (23, 29, 31, 7), torch.float32, "fairseq", neg_is_pos, reduction, torch.int32, None, False)


def _check_backend(backend, shape, dtype, precision, neg_is_pos, reduction, itype, positives, deterministic,
                   device="cpu"):
    n, m, d, k = shape
    x, y, neg, pos = make_problem(n, m, d, k, dtype=dtype, seed=n + d, positives=positives, itype=itype)
    kw = dict(precision=precision, neg_is_pos=neg_is_pos, reduction=reduction, temperature=0.1)
    dev = torch.device(device)
    x, y, neg = x.to(dev), y.to(dev), neg.to(dev)
    pos = None if pos is None else pos.to(dev)
    truth = tuple(t.cpu() for t in loss_and_grads(x.double(), y.double(), neg, pos, backend="reference", **kw))
    low = tuple(t.cpu() for t in loss_and_grads(x, y, neg, pos, backend="reference", **kw))
    got = tuple(t.cpu() for t in loss_and_grads(x, y, neg, pos, backend=backend, deterministic=deterministic, **kw))
    # truth: fp64 math on the same stored inputs; low: the reference in the op's dtype
    check_losses_and_grads(got, low, truth, dtype, backend)
    assert int(got[3]) == int(low[3]), "correct count differs from the reference in the same dtype"


def check_large_logits(backend, temperature, device="cpu"):
    """Gradients at logits up to 1 / temperature (about 33 and 100) within twice the fp32
    reference's error: the backward must rebuild each probability from lse's two parts (max,
    log s); from their fp32 sum it carried ulp(lse) / 2 (CPU kernel at temperature 0.03: 3.3x
    (grad x) and 5x (grad y) the reference's error on this very case before the fix)."""
    torch.manual_seed(0)
    n, d, k = 300, 64, 50
    x = torch.randn(n, d)
    y = x + torch.randn(n, d)
    neg = torch.randint(0, n, (n, k))
    dev = torch.device(device)
    x, y, neg = x.to(dev), y.to(dev), neg.to(dev)
    kw = dict(temperature=temperature, reduction="sum")
    truth = tuple(t.cpu() for t in loss_and_grads(x.double(), y.double(), neg, None, backend="reference", **kw))
    low = tuple(t.cpu() for t in loss_and_grads(x, y, neg, None, backend="reference", **kw))
    got = tuple(t.cpu() for t in loss_and_grads(x, y, neg, None, backend=backend, **kw))
    check_losses_and_grads(got, low, truth, torch.float32, f"{backend} temperature {temperature}")


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=pytest.mark.cpu),
                                     pytest.param("triton", marks=pytest.mark.interpreter),
                                     pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gradients_at_large_logits_within_twice_the_reference(backend):
    # temperature 0.03: logits up to 33. (At 0.01 the Triton interpreter's grad x misses the
    # bound by 1.5x on 5 of 19200 elements, before and after the fix alike: not this fault.)
    check_large_logits(backend, 0.03, "cuda" if backend == "cuda" or (
        backend == "triton" and torch.cuda.is_available()) else "cpu")


# ----------------------------------------------------------------------------- statistics


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_correct_count_definition(backend):
    d = 4
    y = torch.eye(d)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0],  # positive wins: correct
                      [0.0, 1.0, 0.0, 0.0],  # a negative wins: wrong
                      [0.0, 0.0, 0.0, 0.0],  # all logits equal: argmax 0 and argmin 0, wrong
                      [1.0, 1.0, 0.0, 0.0]])  # tie between positive and a negative: argmax 0, correct
    pos = torch.tensor([0, 0, 0, 0])
    neg = torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]])
    out = sslfast.contrastive_loss(x, y, neg, pos, return_stats=True, backend=backend)
    assert int(out.correct) == 2 and out.count == 4


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_all_negatives_equal_positive_gives_zero_loss(backend):
    x, y, _, _ = make_problem(5, 6, 8, 3, dup=False)
    y[3] = y[0]
    pos = torch.zeros(5, dtype=torch.long)
    neg = torch.tensor([[3, 0, 3]] * 5)
    loss, gx, gy, correct = loss_and_grads(x, y, neg, pos, backend=backend, reduction="none")
    assert torch.equal(loss, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gy, torch.zeros_like(gy))
    assert int(correct) == 5


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_vectors_are_finite(backend):
    x, y, neg, pos = make_problem(6, 7, 5, 4, dup=False)
    x[0] = 0
    y[2] = 0
    neg[1, :] = 2
    loss, gx, gy, _ = loss_and_grads(x, y, neg, pos, backend=backend, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    want = loss_and_grads(x.double(), y.double(), neg, pos, backend="reference", reduction="none")
    for a, b in zip((loss, gx, gy), want[:3]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 6.0e4), (torch.float32, 1e15), (torch.float32, 1e-20)])
def test_huge_and_tiny_norms(backend, dtype, scale):
    x, y, neg, pos = make_problem(9, 11, 16, 5, dup=False)
    x, y = (x / x.abs().max() * scale).to(dtype), (y / y.abs().max() * scale).to(dtype)
    loss, gx, gy, _ = loss_and_grads(x, y, neg, pos, backend=backend, reduction="none")
    want = loss_and_grads(x.double(), y.double(), neg, pos, backend="reference", reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert torch.allclose(loss, want[0], rtol=1e-3, atol=1e-3)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_identical_negatives_and_k_larger_than_m(backend):
    x, y, _, _ = make_problem(4, 3, 6, 1, dup=False)
    g = torch.Generator().manual_seed(1)
    neg = torch.randint(0, 3, (4, 50), generator=g)
    neg[0] = 1  # all 50 negatives the same row
    pos = torch.tensor([0, 1, 2, 0])
    kw = dict(neg_is_pos="index")
    loss, gx, gy, _ = loss_and_grads(x, y, neg, pos, backend=backend, **kw)
    want = loss_and_grads(x.double(), y.double(), neg, pos, backend="reference", **kw)
    assert torch.allclose(loss, want[0], rtol=1e-5)
    assert torch.allclose(gx, want[1], atol=1e-5) and torch.allclose(gy, want[2], atol=1e-5)
    # closed form for row 0: 50 copies of one negative -> loss = log(e^l0 + 50 e^l1) - l0
    c = F.cosine_similarity(x[0:1].double(), y[[0, 1]].double()) / 0.1
    row0 = sslfast.contrastive_loss(x[:1], y, neg[:1], pos[:1], reduction="none", backend=backend, **kw)
    assert math.isclose(row0.item(), math.log(math.exp(c[0]) + 50 * math.exp(c[1])) - c[0].item(), rel_tol=1e-5,
                        abs_tol=1e-5)


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_batch_and_no_negatives(backend):
    x = torch.zeros(0, 8, requires_grad=True)
    y = torch.randn(5, 8, requires_grad=True)
    neg = torch.zeros(0, 4, dtype=torch.long)
    for reduction in ("sum", "mean"):
        loss = sslfast.contrastive_loss(x, y, neg, backend=backend, reduction=reduction)
        assert loss.item() == 0.0
        gx, gy = torch.autograd.grad(loss, [x, y], allow_unused=True)
        assert gy is None or torch.equal(gy, torch.zeros_like(y))
    assert sslfast.contrastive_loss(x, y, neg, backend=backend, reduction="none").shape == (0,)
    # K = 0: the positive is the only class, loss 0, never "correct" (argmin is 0 too)
    x2 = torch.randn(3, 8)
    out = sslfast.contrastive_loss(x2, y, torch.zeros(3, 0, dtype=torch.long), backend=backend, return_stats=True)
    assert out.loss.item() == 0.0 and int(out.correct) == 0


@pytest.mark.cpu
def test_non_contiguous_inputs():
    x, y, neg, pos = make_problem(11, 13, 10, 5)
    xt = torch.randn(10, 11).t()  # non-contiguous (11, 10)
    yt = y.repeat(1, 2)[:, ::2]
    negt = neg.t().contiguous().t()
    a = sslfast.contrastive_loss(xt, yt, negt, pos, backend="cpu")
    b = sslfast.contrastive_loss(xt.contiguous(), yt.contiguous(), negt.contiguous(), pos, backend="reference")
    assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.cpu
def test_cpu_backward_is_deterministic():
    x, y, neg, pos = make_problem(41, 43, 33, 17, seed=9)
    a = loss_and_grads(x, y, neg, pos, backend="cpu")
    b = loss_and_grads(x, y, neg, pos, backend="cpu")
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))


@pytest.mark.cpu
def test_storage_roundings_match_torch():
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-8, 6.1e-5, 5.96e-8, 2.98e-8, 65504.0, 65520.0, 1e6, -1e6,
                         3.4e38, float("inf"), float("-inf"), 0.1, 1 / 3, 1.00048828125, 1.0009765625])
    vals = torch.cat([vals, torch.randn(4000) * torch.logspace(-9, 6, 4000)])
    for code, dtype in ((1, torch.float16), (2, torch.bfloat16)):
        out = torch.empty_like(vals)
        _ext.cpu_module().contrastive_round_to_dtype(vals.data_ptr(), out.data_ptr(), vals.numel(), code)
        assert torch.equal(out, vals.to(dtype).float()), dtype
    nan = torch.tensor([float("nan")])
    for code in (1, 2):
        out = torch.empty_like(nan)
        _ext.cpu_module().contrastive_round_to_dtype(nan.data_ptr(), out.data_ptr(), 1, code)
        assert torch.isnan(out).all()


# ----------------------------------------------------------------------------- validation


@pytest.mark.cpu
def test_validation_errors():
    x, y, neg, pos = make_problem(5, 6, 4, 3)
    f = sslfast.contrastive_loss
    with pytest.raises(TypeError, match="x must"):
        f(x.long(), y, neg)
    with pytest.raises(TypeError, match="y must have dtype"):
        f(x, y.long(), neg)
    # mixed float dtypes promote as torch promotes (the dtype policy, sslfast/_validation.py)
    assert torch.equal(f(x, y.half(), neg), f(x, y.half().float(), neg))
    with pytest.raises(ValueError, match="y must have shape"):
        f(x, y[:, :3], neg)
    with pytest.raises(ValueError, match="negatives must have shape"):
        f(x, y, neg[:4])
    with pytest.raises(TypeError, match="negatives must have dtype"):
        f(x, y, neg.float())
    with pytest.raises(ValueError, match=r"negatives must index rows of y in \[0, 6\)"):
        f(x, y, neg + 6)
    with pytest.raises(ValueError, match="negatives must index"):
        f(x, y, neg - 7)
    with pytest.raises(ValueError, match="positives must index"):
        f(x, y, neg, pos + 10)
    with pytest.raises(ValueError, match="positives must have shape"):
        f(x, y, neg, pos[:2])
    with pytest.raises(ValueError, match="at least N=5 rows"):
        f(x, y[:3], neg.clamp(max=2))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            f(x, y, neg, temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        f(x, y, neg, temperature="0.1")
    with pytest.raises(ValueError, match="reduction"):
        f(x, y, neg, reduction="avg")
    with pytest.raises(ValueError, match="neg_is_pos"):
        f(x, y, neg, neg_is_pos=True)
    with pytest.raises(ValueError, match="precision"):
        f(x, y, neg, precision="fp16")
    with pytest.raises(TypeError, match="deterministic"):
        f(x, y, neg, deterministic=1)
    with pytest.raises(TypeError, match="runs on backend='reference'"):
        f(x.double(), y.double(), neg, backend="cpu")
    with pytest.raises(sslfast.BackendUnavailableError):
        f(x, y, neg, backend="cuda")


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.cpu
@pytest.mark.slow
def test_torch_compile_fullgraph():
    x, y, neg, pos = make_problem(9, 10, 8, 4)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, b):
        return sslfast.contrastive_loss(a, b, neg, pos, backend="cpu", reduction="mean")

    loss = step(xs, ys)
    loss.backward()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = sslfast.contrastive_loss(xr, yr, neg, pos, backend="reference", reduction="mean")
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-5)
    assert torch.allclose(xs.grad, xr.grad, atol=1e-6) and torch.allclose(ys.grad, yr.grad, atol=1e-6)


# ----------------------------------------------------------------------------- triton (interpreter)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,precision,deterministic", [
    (torch.float32, "fairseq", False),
    (torch.float16, "hf", True),
    (torch.float16, "fairseq", False),
])
def test_triton_matches_reference(triton_device, dtype, precision, deterministic):
    _check_backend("triton", (13, 17, 19, 11), dtype, precision, "vector", "sum", torch.int64, "random",
                   deterministic, device=triton_device)


@pytest.mark.interpreter
def test_triton_options_and_determinism(triton_device):
    _check_backend("triton", (7, 11, 5, 37), torch.float32, "hf", "index", "none", torch.int32, None, True,
                   device=triton_device)
    x, y, neg, pos = make_problem(5, 7, 6, 3, seed=2)
    a = loss_and_grads(x.to(triton_device), y.to(triton_device), neg.to(triton_device), None, backend="triton",
                       deterministic=True)
    b = loss_and_grads(x.to(triton_device), y.to(triton_device), neg.to(triton_device), None, backend="triton",
                       deterministic=True)
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))


@pytest.mark.interpreter
def test_triton_edge_rows(triton_device):
    # zero vectors, a row whose negatives are all the positive, K larger than M
    x, y, _, _ = make_problem(4, 3, 6, 1, dup=False)
    x[1] = 0
    y[2] = 0
    neg = torch.tensor([[0] * 9, [2] * 9, [1, 2, 0, 1, 2, 0, 1, 2, 0], [1] * 9])
    pos = torch.tensor([0, 1, 2, 0])
    dev = torch.device(triton_device)
    got = loss_and_grads(x.to(dev), y.to(dev), neg.to(dev), pos.to(dev), backend="triton", reduction="none")
    want = loss_and_grads(x.double(), y.double(), neg, pos, backend="reference", reduction="none")
    assert got[0][0].item() == 0.0
    for a, b in zip(got[:3], want[:3]):
        assert torch.isfinite(a).all() and torch.allclose(a.cpu(), b, rtol=1e-5, atol=1e-5)
    # K = 0 and N = 0
    no_neg = torch.zeros(4, 0, dtype=torch.long, device=dev)
    out = loss_and_grads(x.to(dev), y.to(dev), no_neg, pos.to(dev), backend="triton", deterministic=True)
    assert out[0].item() == 0.0 and int(out[3]) == 0 and not out[1].any() and not out[2].any()
    empty = sslfast.contrastive_loss(x[:0].to(dev), y.to(dev), no_neg[:0], backend="triton")
    assert empty.item() == 0.0


# ----------------------------------------------------------------------------- gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", ["fairseq", "hf"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_matches_reference(backend, dtype, precision, deterministic):
    for shape in [(1, 1, 1, 1), (257, 263, 251, 101), (1009, 1013, 768, 100)]:
        _check_backend(backend, shape, dtype, precision, "vector", "sum", torch.int64, "random", deterministic,
                       device="cuda")
    _check_backend(backend, (211, 199, 129, 300), dtype, precision, "index", "none", torch.int32, None,
                   deterministic, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_is_bitwise_repeatable_and_matches_atomic(backend):
    x, y, neg, pos = make_problem(2003, 2011, 256, 100, seed=11)
    args = (x.cuda(), y.cuda(), neg.cuda(), pos.cuda())
    a = loss_and_grads(*args, backend=backend, deterministic=True)
    b = loss_and_grads(*args, backend=backend, deterministic=True)
    c = loss_and_grads(*args, backend=backend, deterministic=False)
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
    assert torch.allclose(a[2], c[2], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_edge_rows(backend):
    x, y, _, _ = make_problem(4, 3, 300, 1, dup=False)
    x[1] = 0
    y[2] = 0
    neg = torch.tensor([[0] * 9, [2] * 9, [1, 2, 0, 1, 2, 0, 1, 2, 0], [1] * 9])
    pos = torch.tensor([0, 1, 2, 0])
    got = loss_and_grads(x.cuda(), y.cuda(), neg.cuda(), pos.cuda(), backend=backend, reduction="none")
    want = loss_and_grads(x.double(), y.double(), neg, pos, backend="reference", reduction="none")
    assert got[0][0].item() == 0.0
    for a, b in zip(got[:3], want[:3]):
        assert torch.isfinite(a).all() and torch.allclose(a.cpu(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_memory_is_far_below_materialising():
    n, m, d, k = 2000, 4400, 256, 100
    x, y, neg, pos = make_problem(n, m, d, k, seed=12)
    x, y, neg, pos = x.cuda().requires_grad_(), y.cuda().requires_grad_(), neg.cuda(), pos.cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sslfast.contrastive_loss(x, y, neg, pos, backend="cuda").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    materialised = n * (k + 1) * d * 4
    assert peak < materialised / 10, (peak, materialised)


# ----------------------------------------------------------------------------- wav2vec2_contrastive_loss


@pytest.mark.cpu
@needs_hf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_wav2vec2_loss_reproduces_hugging_face(dtype, backend):
    x, y, mask, sampled = hf_inputs(b=3, t=41, d=24, k=9, dtype=dtype, seed=7)
    y[1, 3] = y[1, 0]  # a stored-equal negative, which HF masks
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = hf_contrastive_loss(xr, yr, mask, sampled, 0.1)
    gx_want, gy_want = torch.autograd.grad(want, [xr, yr])
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = sslfast.wav2vec2_contrastive_loss(xs, ys, mask, sampled.shape[-1], convention="hf", negatives=sampled,
                                            backend=backend)
    gx, gy = torch.autograd.grad(got, [xs, ys])
    check_losses_and_grads((got, gx, gy), (want, gx_want, gy_want), truth_hf(x, y, mask, sampled), dtype,
                           f"{backend} vs Hugging Face")


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wav2vec2_loss_fairseq_convention(dtype):
    g = torch.Generator().manual_seed(8)
    b, t, d, k, kc = 3, 37, 16, 10, 3
    x = torch.randn(b, t, d, generator=g).to(dtype)
    y = torch.randn(b, t, d, generator=g).to(dtype)
    mask = torch.rand(b, t, generator=g) < 0.4
    neg = sslfast.sample_negatives(mask, k, cross_sample_negatives=kc, layout="packed", seed=123)
    # fairseq's computation on its own inputs: packed masked frames and packed indices
    want, want_correct = fairseq_order_loss(x[mask], y[mask], neg, torch.arange(int(mask.sum())), 0.1)
    got = sslfast.wav2vec2_contrastive_loss(x, y, mask, k, cross_sample_negatives=kc, seed=123, backend="cpu",
                                            return_stats=True)
    truth = sslfast.wav2vec2_contrastive_loss(x.double(), y.double(), mask, k, cross_sample_negatives=kc, seed=123,
                                              backend="reference")
    assert_error_rule(got.loss, want, truth, "cpu vs fairseq's order", out_dtype=torch.float32)
    assert int(got.correct) == want_correct and got.count == int(mask.sum())
    # the seed fixes the negatives: same seed, same loss, on every backend
    again = sslfast.wav2vec2_contrastive_loss(x, y, mask, k, cross_sample_negatives=kc, seed=123,
                                              backend="reference")
    assert torch.allclose(again, got.loss, rtol=1e-5)
    other = sslfast.wav2vec2_contrastive_loss(x, y, mask, k, cross_sample_negatives=kc, seed=124, backend="cpu")
    assert not torch.equal(other, got.loss)


@pytest.mark.cpu
def test_wav2vec2_loss_gradients_and_num_masked():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 29, 12, generator=g, requires_grad=True)
    y = torch.randn(2, 29, 12, generator=g, requires_grad=True)
    mask = torch.rand(2, 29, generator=g) < 0.5
    a = sslfast.wav2vec2_contrastive_loss(x, y, mask, 7, seed=5, backend="cpu", num_masked=int(mask.sum()))
    ga = torch.autograd.grad(a, [x, y])
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    b = sslfast.wav2vec2_contrastive_loss(x64, y64, mask, 7, seed=5, backend="reference")
    gb = torch.autograd.grad(b, [x64, y64])
    assert torch.allclose(a.double(), b, rtol=1e-5)
    for u, v in zip(ga, gb):
        assert torch.allclose(u.double(), v, atol=1e-5)
    # unmasked frames of x get no gradient
    assert torch.equal(ga[0][~mask], torch.zeros_like(ga[0][~mask]))


@pytest.mark.cpu
def test_wav2vec2_loss_validation_and_empty_mask():
    x = torch.randn(2, 9, 4)
    y = torch.randn(2, 9, 4)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    assert sslfast.wav2vec2_contrastive_loss(x, y, mask, 5, seed=1, backend="cpu").item() == 0.0
    with pytest.raises(ValueError, match="y must have the shape"):
        sslfast.wav2vec2_contrastive_loss(x, y[:, :8], mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        sslfast.wav2vec2_contrastive_loss(x, y, mask[:, :8])
    with pytest.raises(ValueError, match="convention"):
        sslfast.wav2vec2_contrastive_loss(x, y, mask, convention="speechbrain")
    with pytest.raises(TypeError, match="mask must have dtype"):
        sslfast.wav2vec2_contrastive_loss(x, y, mask.float())
    mask[0, :3] = True
    with pytest.raises(ValueError, match="negatives must have shape"):
        sslfast.wav2vec2_contrastive_loss(x, y, mask, 5, negatives=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="negatives must index"):
        sslfast.wav2vec2_contrastive_loss(x, y, mask, 5, negatives=torch.full((3, 5), 3))


# ------------------------------------------------ seeds as device tensors (issue 12, item 3)


def _w2v_problem():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 31, 12, generator=g)
    y = torch.randn(3, 31, 12, generator=g)
    mask = torch.rand(3, 31, generator=g) < 0.45
    return x, y, mask


def _w2v_backend(backend):
    if backend not in _dispatch.implemented_backends("sample_negatives"):
        pytest.skip(f"sample_negatives has no {backend} backend in this build")


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("convention", ["fairseq", "hf"])
def test_wav2vec2_loss_seed_forms_key_the_specified_negatives(backend, convention):
    # Each seed form draws the negatives the specification (the reference sampler with the
    # key as a Python int) gives for its key, and the loss equals the loss on those negatives.
    _w2v_backend(backend)
    x, y, mask = _w2v_problem()
    K, Kc = 6, 2
    layout = "packed" if convention == "fairseq" else "hf"
    kw = dict(cross_sample_negatives=Kc, convention=convention, backend=backend)

    def given(key):
        neg = ref_negatives.sample_negatives(mask, K, Kc, None, True, layout, key)
        return sslfast.wav2vec2_contrastive_loss(x, y, mask, K, negatives=neg, **kw)

    s = 2**40 + 3
    want = given(s)
    assert torch.equal(sslfast.wav2vec2_contrastive_loss(x, y, mask, K, seed=s, **kw), want)
    assert torch.equal(sslfast.wav2vec2_contrastive_loss(x, y, mask, K, seed=torch.tensor(s), **kw), want)
    assert torch.equal(sslfast.wav2vec2_contrastive_loss(x, y, mask, K, seed=torch.tensor(-9), **kw),
                       given(2**64 - 9))
    torch.manual_seed(5)
    none = sslfast.wav2vec2_contrastive_loss(x, y, mask, K, **kw)
    torch.manual_seed(5)
    assert torch.equal(none, given(int(torch.randint(0, 2**63 - 1, ()))))
    step = sslfast.wav2vec2_contrastive_loss(x, y, mask, K, seed=sr.derive_seed(s, rank=1, step=torch.tensor(4)), **kw)
    assert torch.equal(step, given(sr.derive_seed(s, rank=1, step=4)))
    with pytest.raises(TypeError, match="int64"):
        sslfast.wav2vec2_contrastive_loss(x, y, mask, K, seed=torch.tensor(1.5), **kw)
    with pytest.raises(ValueError, match="one value"):
        sslfast.wav2vec2_contrastive_loss(x, y, mask, K, seed=torch.tensor([1, 2]), **kw)


@pytest.mark.cpu
@pytest.mark.parametrize("backend,convention", [("cpu", "fairseq"), ("cpu", "hf"),
                                                pytest.param("reference", "fairseq", marks=pytest.mark.slow),
                                                pytest.param("reference", "hf", marks=pytest.mark.slow)])
def test_wav2vec2_loss_compile_fullgraph_seed_none_and_seed_tensor(backend, convention):
    # fullgraph=True fails on any graph break: the loss with seed=None (torch.randint in the
    # graph) and with a seed tensor compiles to one graph that matches eager, one compile for
    # every seed tensor. (The reference's packed sampler has a data-dependent row count under
    # compile: the loss checks it with a deferred torch._check instead of a guard.)
    from torch._dynamo.testing import CompileCounterWithBackend

    _w2v_backend(backend)
    x, y, mask = _w2v_problem()
    n = int(mask.sum())

    def f(x, y, seed=None):
        return sslfast.wav2vec2_contrastive_loss(x, y, mask, 6, cross_sample_negatives=2, seed=seed, num_masked=n,
                                                 convention=convention, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(aot_eager_no_host_reads)
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for s in (3, 4):
        torch.manual_seed(s)
        got = compiled(x, y)
        torch.manual_seed(s)
        assert torch.equal(got, f(x, y)), s
    for v in (2**40 + 1, -3):
        seed = torch.tensor(v)
        assert torch.equal(compiled(x, y, seed), f(x, y, seed)), v
    assert counter.frame_count == 2


@pytest.mark.gpu
@needs_hf
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_wav2vec2_loss_reproduces_hugging_face(backend, dtype):
    x, y, mask, sampled = hf_inputs(b=4, t=781, d=256, k=100, dtype=dtype, seed=13)
    x, y, mask, sampled = x.cuda(), y.cuda(), mask.cuda(), sampled.cuda()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = hf_contrastive_loss(xr, yr, mask, sampled, 0.1)
    gx_want, gy_want = torch.autograd.grad(want, [xr, yr])
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = sslfast.wav2vec2_contrastive_loss(xs, ys, mask, sampled.shape[-1], convention="hf", negatives=sampled,
                                            backend=backend)
    gx, gy = torch.autograd.grad(got, [xs, ys])
    check_losses_and_grads((got, gx, gy), (want, gx_want, gy_want), truth_hf(x.cpu(), y.cpu(), mask.cpu(),
                                                                              sampled.cpu()), dtype,
                           f"{backend} vs Hugging Face")
