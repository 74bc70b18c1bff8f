"""masked_prediction_loss: the reference against an fp64 eager formula (torch's
cross_entropy on the full logits), gradcheck of the reference, every kernel backend against
the reference (loss, stats, gradients), the low-precision 2x rule, hostile inputs, validation.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sslfast
from _tolerance import assert_error_rule
from sslfast.reference import masked_prediction as ref

KERNEL_BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.cpu),
    pytest.param("triton", marks=pytest.mark.interpreter),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def _device(backend):
    """Where a backend's tensors live: CUDA for cuda (and triton when there is a GPU), else CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_case(n, h, v, d, *, seed=0, shared_x=True, bias=False, ignore_frac=0.0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, d) if shared_x else (n, h, d), generator=g, dtype=torch.float64) * scale
    w = torch.randn(h, v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(h, v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n, h), generator=g)
    if ignore_frac > 0:
        t = torch.where(torch.rand(n, h, generator=g) < ignore_frac, torch.full_like(t, -100), t)
    mask = torch.rand(n, generator=g) < 0.6
    fw = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    cast = (lambda a: None if a is None else a.to(dtype))
    return cast(x), cast(w), cast(b), t, mask, cast(fw)


def formula(x, w, b, t, *, head="linear", logit_temp=0.1, mask=None, frame_weight=None, pred_masked_weight=1.0,
            pred_nomask_weight=0.0, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """The loss the textbook way in fp64: full (N, H, V) logits, F.cross_entropy per head."""
    x, w = x.double(), w.double()
    n, h = t.shape
    xs = x if x.dim() == 3 else x[:, None, :].expand(n, h, x.shape[-1])
    if head == "cosine":
        def unit(a):
            norm = a.norm(dim=-1, keepdim=True)
            return torch.where(norm > 0, a / norm.clamp_min(1e-300), torch.zeros_like(a))
        logits = torch.einsum("nhd,hvd->nhv", unit(xs), unit(w)) / logit_temp
    else:
        logits = torch.einsum("nhd,hvd->nhv", xs, w)
        if b is not None:
            logits = logits + b.double()
    per = torch.stack([F.cross_entropy(logits[:, i], t[:, i], ignore_index=ignore_index, reduction="none",
                                       label_smoothing=label_smoothing) for i in range(h)], dim=1)
    wf = torch.ones(n, dtype=torch.float64) if frame_weight is None else frame_weight.double()
    if mask is not None:
        wf = wf * torch.where(mask, pred_masked_weight, pred_nomask_weight).double()
    per = per * wf[:, None]
    valid = t != ignore_index
    count = (valid & (wf != 0)[:, None]).sum()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / max(int(count), 1)


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(use_mask=True),
    dict(use_mask=True, pred_nomask_weight=0.5, pred_masked_weight=2.0),
    dict(use_fw=True, reduction="sum"),
    dict(use_mask=True, use_fw=True, label_smoothing=0.2, reduction="none"),
]


def _kwargs(opt, mask, fw):
    kw = {k: v for k, v in opt.items() if k not in ("use_mask", "use_fw")}
    if opt.get("use_mask"):
        kw["mask"] = mask
    if opt.get("use_fw"):
        kw["frame_weight"] = fw
    return kw


HEADS = [
    dict(head="linear", shared_x=True, bias=False),
    dict(head="linear", shared_x=True, bias=True),
    dict(head="linear", shared_x=False, bias=True),
    dict(head="cosine", shared_x=True, bias=False),
    dict(head="cosine", shared_x=False, bias=False),
]


# ----------------------------------------------------------------------------- reference = spec

@pytest.mark.cpu
@pytest.mark.parametrize("hd", HEADS, ids=lambda c: f"{c['head']}-{'shared' if c['shared_x'] else 'perhead'}-b{int(c['bias'])}")
@pytest.mark.parametrize("opt", OPTIONS, ids=str)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
def test_reference_matches_formula_fp64(hd, opt, ignore_frac):
    x, w, b, t, mask, fw = make_case(37, 3, 11, 6, seed=1, shared_x=hd["shared_x"], bias=hd["bias"],
                                     ignore_frac=ignore_frac)
    kw = _kwargs(opt, mask, fw)
    got = ref.masked_prediction_loss(x, w, t, head=hd["head"], bias=b, chunk_size=8, **kw)
    want = formula(x, w, b, t, head=hd["head"], **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.cpu
def test_reference_stats_follow_fairseq_rule():
    # correct = target logit attains the max (fairseq: target in column 0, argmax == 0)
    x, w, b, t, mask, fw = make_case(50, 2, 5, 4, seed=2, ignore_frac=0.2)
    out = ref.masked_prediction_loss(x, w, t, mask=mask, return_stats=True)
    logits = torch.einsum("nd,hvd->nhv", x, w)
    counted = (t != -100) & mask[:, None]
    for i in range(2):
        rows = counted[:, i]
        # fairseq layout: [target, all V with the target's column at -inf]
        lt = logits[rows, i]
        ti = t[rows, i]
        pos = lt.gather(1, ti[:, None])
        negs = lt.scatter(1, ti[:, None], float("-inf"))
        fair = torch.cat([pos, negs], dim=1)
        corr = ((fair.argmax(-1) == 0) & ~(fair.argmin(-1) == 0)).sum()
        assert out.correct[i].item() == corr.item()
        assert out.count[i].item() == rows.sum().item()


@pytest.mark.cpu
@pytest.mark.parametrize("head,bias,shared", [("linear", True, True), ("linear", False, False), ("cosine", False, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_gradcheck_fp64(head, bias, shared, reduction):
    x, w, b, t, mask, fw = make_case(7, 2, 5, 3, seed=3, shared_x=shared, bias=bias, ignore_frac=0.2)
    inputs = [x.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if bias else [])

    def fn(*args):
        bb = args[2] if bias else None
        return ref.masked_prediction_loss(args[0], args[1], t, head=head, bias=bb, mask=mask, frame_weight=fw,
                                          pred_nomask_weight=0.3, label_smoothing=0.1, reduction=reduction,
                                          chunk_size=3)

    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- kernels vs reference

def _run(backend, x, w, b, t, **kw):
    """(stats, grad x, grad w, grad b) of one call, all on the CPU; the loss is backpropagated
    with a non-uniform output gradient."""
    dev = _device(backend)
    x = x.detach().to(dev).requires_grad_()
    w = w.detach().to(dev).requires_grad_()
    b = None if b is None else b.detach().to(dev).requires_grad_()
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = sslfast.masked_prediction_loss(x, w, t.to(dev), bias=b, return_stats=True, backend=backend, **kw)
    gout = torch.linspace(-1, 1, out.loss.numel()).reshape(out.loss.shape) if out.loss.dim() else torch.tensor(1.7)
    (out.loss * gout.to(dev, out.loss.dtype)).sum().backward()
    out = type(out)(*(v.cpu() for v in out))
    return out, x.grad.cpu(), w.grad.cpu(), None if b is None else b.grad.cpu()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n,h,v,d", [(1, 1, 1, 1), (5, 2, 7, 3), (97, 3, 50, 33), (200, 2, 97, 17), (193, 1, 130, 64)])
@pytest.mark.parametrize("hd", HEADS, ids=lambda c: f"{c['head']}-{'shared' if c['shared_x'] else 'perhead'}-b{int(c['bias'])}")
@pytest.mark.parametrize("opt", [OPTIONS[0], OPTIONS[3], OPTIONS[5], OPTIONS[7]], ids=str)
def test_kernel_matches_reference(backend, n, h, v, d, hd, opt):
    x, w, b, t, mask, fw = make_case(n, h, v, d, seed=n + v, shared_x=hd["shared_x"], bias=hd["bias"],
                                     ignore_frac=0.2, dtype=torch.float32)
    kw = dict(_kwargs(opt, mask, fw), head=hd["head"])
    want = _run("reference", x, w, b, t, **kw)
    got = _run(backend, x, w, b, t, **kw)
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[0].loss, want[0].loss, **tol)
    assert torch.equal(got[0].count, want[0].count)
    # a near-tie between the target and the max may flip in fp32: allow one frame per head
    assert (got[0].correct - want[0].correct).abs().max() <= 1
    for g, r in zip(got[1:], want[1:]):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_no_grad_path_and_none_reduction_agree(backend):
    # the fused path (mean with grad) and the rows path (no grad) give the same loss value
    x, w, b, t, mask, fw = make_case(64, 2, 40, 16, seed=5, bias=True, dtype=torch.float32)
    dev = _device(backend)
    x, w, b, t = x.to(dev), w.to(dev), b.to(dev), t.to(dev)
    with torch.no_grad():
        a = sslfast.masked_prediction_loss(x, w, t, bias=b, backend=backend)
    x.requires_grad_()
    c = sslfast.masked_prediction_loss(x, w, t, bias=b, backend=backend)
    torch.testing.assert_close(a, c.detach(), rtol=1e-6, atol=1e-6)


def _confident_case(base, soft, dtype):
    """48 rows, V = D = 40 classes (two class tiles of the cuda and fp32 triton kernels), W = I:
    every logit is base except the label's, base + a margin in 2..12 (multiples of 1/16, so
    every logit is exact in fp32 at |base| < 8192). Soft: 0.9 on the label, the rest spread."""
    rows, v = 48, 40
    labels = torch.arange(rows) % v
    margins = (torch.linspace(2.0, 12.0, rows, dtype=torch.float64) * 16).round() / 16
    x = torch.full((rows, v), base, dtype=torch.float64)
    x[torch.arange(rows), labels] += margins
    w = torch.eye(v, dtype=torch.float64)[None]
    t = labels[:, None]
    if soft:
        t = (0.9 * F.one_hot(t, v) + 0.1 / v).float().to(dtype)  # the fp64 truth on the fp32 values
    return x.to(dtype), w.to(dtype), t


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("base", [100.0, 1e3, -4e3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_kernel_gradients_at_large_logits_within_twice_the_reference(backend, base, reduction, soft):
    # The gradients recompute p = softmax(z) from each row's saved statistics. Saved as one fp32
    # lse = m + log l, its rounding (up to ulp(lse) / 2: 1.2e-4 at 4e3) entered every p, and the
    # x / W gradients were 7x (base 100), 55x (1e3) and 260x (-4e3) the reference's error against
    # fp64 on cpu and triton alike, where the logits themselves are exact. The kernels keep
    # (m, log l) apart and take exp((z - m) - log l) (csrc/masked_prediction.h); the soft
    # targets' gradient (1 - eps)(lse - z) is summed as (m - z) + log l.
    dev = _device(backend)
    results = []
    for be, dtype in ((backend, torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        x, w, t = _confident_case(base, soft, dtype)
        xs, ws = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
        ts = t.to(dev).requires_grad_() if soft else t.to(dev)
        out = sslfast.masked_prediction_loss(xs, ws, ts, label_smoothing=0.1, reduction=reduction, backend=be)
        gout = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape) if out.dim() else 1.0
        (out * (gout.to(dev, out.dtype) if out.dim() else gout)).sum().backward()
        results.append([g.detach().cpu() for g in (xs.grad, ws.grad) + ((ts.grad,) if soft else ())])
    got, ref32, truth = results
    for name, g, r, tr in zip(("x", "weight", "targets"), got, ref32, truth):
        assert_error_rule(g, r, tr, f"{backend} grad of {name} (base {base}, {reduction})")


# ----------------------------------------------------------------------------- low precision

def _lowp_peer(x, w, b, t, dtype, head):
    """Plain PyTorch with the products in ``dtype``: per-pair losses (N, H), the error budget's
    yardstick."""
    if head == "cosine":
        # inputs rounded to dtype (what the op receives), normalised vectors rounded again
        xn = F.normalize(x.to(dtype).double(), dim=-1).to(dtype)
        wn = F.normalize(w.to(dtype).double(), dim=-1).to(dtype)
        logits = torch.einsum("nd,hvd->nhv", xn, wn).float() / 0.1
    else:
        logits = torch.einsum("nd,hvd->nhv", x.to(dtype), w.to(dtype)).float()
        if b is not None:
            logits = logits + b.to(dtype).float()
    return F.cross_entropy(logits.permute(0, 2, 1), t, reduction="none")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_kernel_low_precision_error_at_most_twice_pytorch(backend, dtype, head):
    # Per-pair losses (a mean over pairs lets rounding errors cancel at random): the worst
    # pair's error against fp64 on the unrounded inputs, for the kernel, for plain PyTorch
    # with products in dtype, and for the reference (fp32 math) on the dtype inputs.
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16")
    x, w, b, t, mask, fw = make_case(300, 2, 64, 48, seed=7, bias=head == "linear", scale=2.0)
    exact = formula(x, w, b, t, head=head, reduction="none")
    dev = _device(backend)
    xl, wl = x.to(dev, dtype).requires_grad_(), w.to(dev, dtype).requires_grad_()
    bl = None if b is None else b.to(dev, dtype)
    rows = sslfast.masked_prediction_loss(xl, wl, t.to(dev), head=head, bias=bl, reduction="none", backend=backend)
    own = ref.masked_prediction_loss(xl.detach(), wl.detach(), t.to(dev), head=head, bias=bl, reduction="none")
    rows, own = rows.cpu(), own.cpu()
    err = (rows.double() - exact).abs().max().item()
    peer_err = (_lowp_peer(x, w, b, t, dtype, head).double() - exact).abs().max().item()
    own_err = (own.double() - exact).abs().max().item()
    assert err <= 2 * min(peer_err, own_err) + 1e-6, (err, peer_err, own_err)
    got = rows.mean()
    # gradients: against fp64 autograd of the formula, within the dtype's resolution
    got.backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    formula(xr, wr, b, t, head=head).backward()
    res = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for g, r in ((xl.grad, xr.grad), (wl.grad, wr.grad)):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= 4 * res * r.abs().max()


# ----------------------------------------------------------------------------- hostile inputs

@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
def test_all_labels_ignored_gives_zero_and_zero_grads(backend):
    x, w, b, t, mask, fw = make_case(20, 2, 9, 5, seed=8, bias=True, dtype=torch.float32)
    t = torch.full_like(t, -100)
    out, gx, gw, gb = _run(backend, x, w, b, t)
    assert out.loss.item() == 0.0 and out.count.tolist() == [0, 0] and out.correct.tolist() == [0, 0]
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
def test_all_frames_unmasked_with_zero_nomask_weight(backend):
    x, w, b, t, mask, fw = make_case(12, 1, 4, 3, seed=9, dtype=torch.float32)
    out, gx, gw, _ = _run(backend, x, w, b, t, mask=torch.zeros(12, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.count.tolist() == [0]
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
def test_one_class_loss_is_zero(backend):
    # V = 1: log-softmax of one logit is 0 whatever its value; the gradient is 0 too
    x, w, b, t, mask, fw = make_case(6, 2, 1, 4, seed=10, bias=True, scale=100.0, dtype=torch.float32)
    out, gx, gw, gb = _run(backend, x, w, b, t)
    assert out.loss.item() == 0.0 and out.correct.tolist() == [6, 6]
    assert gx.abs().max() == 0 and gw.abs().max() == 0 and gb.abs().max() == 0


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
@pytest.mark.parametrize("magnitude", [255.0, 1e4])
def test_large_logits_stay_finite_and_exact(backend, magnitude):
    # logits of +-magnitude: lse must not overflow; the exact loss is known in closed form
    n, v = 8, 6
    x = torch.ones(n, 1)
    w = torch.zeros(1, v, 1)
    w[0, :, 0] = torch.tensor([magnitude, -magnitude, 0.0, magnitude, -magnitude, 1.0])
    t = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])[:, None]
    out, gx, gw, _ = _run(backend, x, w, None, t, reduction="none")
    z = w[0, :, 0].double()
    want = torch.logsumexp(z, 0) - z[t[:, 0]]
    # lse - z_y of two fp32 numbers near the magnitude: a few ulps of it
    torch.testing.assert_close(out.loss[:, 0].double(), want, rtol=0, atol=4 * magnitude * 2.0 ** -24 + 1e-6)
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
def test_cosine_zero_vectors(backend):
    # a zero frame vector: every logit 0, loss log V, zero gradient to it; a zero label
    # embedding: its logit is 0 for every frame
    x, w, b, t, mask, fw = make_case(5, 1, 4, 3, seed=11, dtype=torch.float32)
    x[2] = 0
    w[0, 1] = 0
    out, gx, gw, _ = _run(backend, x, w, None, t, head="cosine", reduction="none")
    assert abs(out.loss[2, 0].item() - math.log(4)) < 1e-6
    assert torch.all(gx[2] == 0) and torch.all(gw[0, 1] == 0)
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    want = formula(x, w, None, t, head="cosine", reduction="none")
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
def test_cosine_huge_and_tiny_norms(backend):
    x, w, b, t, mask, fw = make_case(9, 1, 5, 4, seed=12, dtype=torch.float32)
    want = formula(x, w, None, t, head="cosine")
    for s in (1e30, 1e-30):
        dev = _device(backend)
        got = sslfast.masked_prediction_loss((x * s).to(dev), (w * s).to(dev), t.to(dev), head="cosine",
                                             backend=backend).cpu()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNEL_BACKENDS)
def test_empty_batch(backend):
    dev = _device(backend)
    x = torch.zeros(0, 4, device=dev, requires_grad=True)
    w = torch.randn(2, 5, 4, device=dev, requires_grad=True)
    t = torch.zeros(0, 2, dtype=torch.long, device=dev)
    loss = sslfast.masked_prediction_loss(x, w, t, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert w.grad is not None and torch.count_nonzero(w.grad) == 0


# ----------------------------------------------------------------------------- validation

@pytest.mark.cpu
def test_validation_errors_name_the_argument():
    x = torch.randn(4, 3)
    w = torch.randn(2, 5, 3)
    t = torch.zeros(4, 2, dtype=torch.long)
    f = sslfast.masked_prediction_loss
    with pytest.raises(TypeError, match="x"):
        f(x.long(), w, t)
    with pytest.raises(ValueError, match="weight's D"):
        f(torch.randn(4, 2), w, t)
    with pytest.raises(ValueError, match="targets"):
        f(x, w, t[:, :1])
    with pytest.raises(TypeError, match="targets"):
        f(x, w, t.bool())
    with pytest.raises(ValueError, match="targets must have 3 dimensions"):  # float targets are soft: (N, H, V)
        f(x, w, t.float())
    with pytest.raises(ValueError, match="targets must be in"):
        f(x, w, t + 5)
    with pytest.raises(ValueError, match="bias"):
        f(x, w, t, head="cosine", bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="bias"):
        f(x, w, t, bias=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logit_temp"):
        f(x, w, t, head="cosine", logit_temp=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        f(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        f(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="head"):
        f(x, w, t, head="dot")
    with pytest.raises(ValueError, match="mask"):
        f(x, w, t, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        f(x, w, t, mask=torch.ones(4))
    with pytest.raises(ValueError, match="H = 2"):
        f(torch.randn(4, 3, 3), w, t)
    with pytest.raises(TypeError, match="ignore_index"):
        f(x, w, t, ignore_index=1.5)
    with pytest.raises(TypeError, match="x is torch.float64.*runs on backend='reference'"):
        f(x.double(), w.double(), t, backend="cpu")
    # the dtype policy: fp64 anywhere (x, weight, either head) with backend=None runs the
    # reference (it raised the cpu backend's TypeError before: found by a newcomer's check)
    for head in ("linear", "cosine"):
        got = sslfast.masked_prediction_loss(x.double(), w.double(), t, head=head)
        want = sslfast.masked_prediction_loss(x.double(), w.double(), t, head=head, backend="reference")
        assert got.dtype == torch.float64 and torch.equal(got, want)
        got = sslfast.masked_prediction_loss(x, w.double(), t, head=head)  # one fp64 input is enough
        assert torch.equal(got, sslfast.masked_prediction_loss(x, w.double(), t, head=head, backend="reference"))
    # ignore_index outside [0, V) is accepted
    assert f(x, w, t - 7, ignore_index=-7).item() == 0.0


# ----------------------------------------------------------------------------- autograd plumbing

@pytest.mark.cpu
def test_unit_output_gradient_handover_accumulates_and_guards_retain_graph():
    # loss.backward() (output gradient 1) hands the fused pass's saved fp32 gradients over:
    # two fresh forward/backward pairs must accumulate to twice one, and a second backward
    # through a retained graph must raise rather than reuse gradients that were handed over.
    x, w, b, t, mask, fw = make_case(40, 2, 30, 8, seed=13, bias=True, dtype=torch.float32)
    xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
    ref.masked_prediction_loss(xr, wr, t, bias=br).backward()
    xs, ws, bs = (a.clone().requires_grad_() for a in (x, w, b))
    for _ in range(2):
        sslfast.masked_prediction_loss(xs, ws, t, bias=bs, backend="cpu").backward()
    for got, want in ((xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        torch.testing.assert_close(got, 2 * want, rtol=1e-5, atol=1e-6)
    loss = sslfast.masked_prediction_loss(xs, ws, t, bias=bs, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.cpu
@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    x, w, b, t, mask, fw = make_case(23, 2, 9, 5, seed=14, bias=True, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, c, bb):
        return sslfast.masked_prediction_loss(a, c, t, bias=bb, mask=mask, reduction=reduction, backend="cpu").sum()

    xs, ws, bs = (a.clone().requires_grad_() for a in (x, w, b))
    loss = step(xs, ws, bs)
    loss.backward()
    xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
    want = ref.masked_prediction_loss(xr, wr, t, bias=br, mask=mask, reduction=reduction).sum()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, r in ((xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- nn modules

def _fairseq_hubert_loss(proj, label_embs, targets, logit_temp):
    """fairseq HubertModel.compute_pred / compute_nce + HubertCriterion, written out: per label
    set, logits [cos(x, e_target), cos(x, e_v) for all v with the target's duplicate at -inf]
    / temp, cross-entropy with target column 0, summed over frames and label sets."""
    total = 0.0
    for i, emb in enumerate(label_embs):
        x = proj[i] if isinstance(proj, (list, tuple)) else proj
        y = emb[targets[:, i]]
        negs = emb[None, :, :].expand(x.shape[0], -1, -1)
        pos_logit = F.cosine_similarity(x, y, dim=-1)[:, None]
        neg_logits = F.cosine_similarity(x[:, None, :], negs, dim=-1)
        neg_logits = neg_logits.masked_fill(F.one_hot(targets[:, i], emb.shape[0]).bool(), float("-inf"))
        logits = torch.cat([pos_logit, neg_logits], dim=1) / logit_temp
        total = total + F.cross_entropy(logits, torch.zeros_like(targets[:, i]), reduction="sum")
    return total


@pytest.mark.cpu
@pytest.mark.parametrize("untie", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_hubert_head_matches_fairseq_formula(untie, backend):
    from sslfast.nn import HubertPredictionHead

    torch.manual_seed(15)
    head = HubertPredictionHead(48, 16, [20, 20], untie_final_proj=untie, backend=backend).double()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "final_proj.weight": (32 if untie else 16, 48), "final_proj.bias": (32 if untie else 16,),
        "label_embs_concat": (40, 16)}
    feats = torch.randn(30, 48, dtype=torch.float64)
    t = torch.randint(0, 20, (30, 2))
    proj = head.final_proj(feats)
    proj = list(proj.split(16, dim=-1)) if untie else proj
    embs = head.label_embs_concat.split(20, dim=0)
    want = _fairseq_hubert_loss(proj, embs, t, 0.1) / 30  # fairseq: / sample_size (frames)
    if backend == "cpu":
        head = head.float()
        feats = feats.float()
    got = head(feats, t)
    torch.testing.assert_close(2 * got.double(), want.detach(), rtol=2e-5 if backend == "cpu" else 1e-10, atol=1e-6)


@pytest.mark.cpu
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_multisoftmax_head_matches_nemo_formula(use_bias, backend):
    from sslfast.nn import MultiSoftmaxHead

    torch.manual_seed(16)
    b_, t_, d, v, h = 2, 13, 24, 50, 3
    head = MultiSoftmaxHead(d, v, num_decoders=h, use_bias=use_bias, backend=backend)
    if use_bias:
        nn_bias = head.decoder_layers[0].bias
        with torch.no_grad():
            nn_bias.normal_()
    keys = {k: tuple(p.shape) for k, p in head.state_dict().items()}
    assert keys == {"decoder_layers.0.weight": (v * h, d, 1), **({"decoder_layers.0.bias": (v * h,)} if use_bias else {})}
    enc = torch.randn(b_, d, t_)
    targets = torch.randint(0, v, (b_, t_, h))
    masks = torch.rand(b_, t_) < 0.5
    # NeMo: decoder (Conv1d, log_softmax, reshape (B, T, C, H)), then per head NLL over masked frames, / H
    logprobs = torch.log_softmax(head.decoder_layers(enc).transpose(1, 2).reshape(b_, t_, v, h), dim=2)
    want = sum(F.nll_loss(logprobs[..., i][masks], targets[..., i][masks]) for i in range(h)) / h
    frames = enc.transpose(1, 2)[masks]
    got = head(frames, targets[masks])
    torch.testing.assert_close(got, want.detach(), rtol=2e-5, atol=1e-6)
    got.backward()
    assert head.decoder_layers[0].weight.grad.shape == (v * h, d, 1)


# ----------------------------------------------------------------------------- soft targets

def _soft(n, h, v, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, h, v, generator=g, dtype=torch.float64) * 2, dim=-1).to(dtype)


def formula_soft(x, w, b, q, *, head="linear", logit_temp=0.1, frame_weight=None, label_smoothing=0.0,
                 reduction="mean"):
    """torch's cross_entropy with probability targets on the full fp64 logits."""
    n, h = q.shape[:2]
    xs = (x if x.dim() == 3 else x[:, None, :].expand(n, h, x.shape[-1])).double()
    if head == "cosine":
        logits = torch.einsum("nhd,hvd->nhv", F.normalize(xs, dim=-1), F.normalize(w.double(), dim=-1)) / logit_temp
    else:
        logits = torch.einsum("nhd,hvd->nhv", xs, w.double()) + (0 if b is None else b.double())
    per = torch.stack([F.cross_entropy(logits[:, i], q[:, i].double(), reduction="none",
                                       label_smoothing=label_smoothing) for i in range(h)], dim=1)
    wf = torch.ones(n, dtype=torch.float64) if frame_weight is None else frame_weight.double()
    per = per * wf[:, None]
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / max(int((wf != 0).sum()) * h, 1)


@pytest.mark.cpu
@pytest.mark.parametrize("head,bias,shared", [("linear", True, True), ("linear", False, False), ("cosine", False, True)])
@pytest.mark.parametrize("opt", [dict(), dict(label_smoothing=0.2, reduction="sum"), dict(use_fw=True, reduction="none")],
                         ids=str)
def test_soft_reference_matches_formula_fp64(head, bias, shared, opt):
    x, w, b, t, mask, fw = make_case(29, 2, 13, 5, seed=17, shared_x=shared, bias=bias)
    q = _soft(29, 2, 13, 18)
    kw = _kwargs(opt, mask, fw)
    got = ref.masked_prediction_loss(x, w, q, head=head, bias=b, chunk_size=8, **kw)
    torch.testing.assert_close(got, formula_soft(x, w, b, q, head=head, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.cpu
def test_soft_reference_gradcheck_fp64_reaches_targets():
    x, w, b, t, mask, fw = make_case(6, 2, 5, 3, seed=19, bias=True)
    q = _soft(6, 2, 5, 20)
    inputs = [a.requires_grad_() for a in (x, w, b, q)]

    def fn(xx, ww, bb, qq):
        return ref.masked_prediction_loss(xx, ww, qq, bias=bb, frame_weight=fw, label_smoothing=0.1, reduction="sum")

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n,h,v,d", [(1, 1, 1, 1), (37, 2, 50, 9), (131, 3, 97, 20)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_soft_kernel_matches_reference(backend, n, h, v, d, reduction, head):
    x, w, b, t, mask, fw = make_case(n, h, v, d, seed=n, bias=head == "linear", dtype=torch.float32)
    q = _soft(n, h, v, n + 1, dtype=torch.float32)
    res = []
    dev = _device(backend)
    for be in ("reference", backend):
        xs, ws, qs = (a.clone().to(dev).requires_grad_() for a in (x, w, q))
        bs = None if b is None else b.clone().to(dev).requires_grad_()
        out = sslfast.masked_prediction_loss(xs, ws, qs, head=head, bias=bs, frame_weight=fw.float().to(dev),
                                             label_smoothing=0.1, reduction=reduction, return_stats=True,
                                             backend=be)
        gout = torch.linspace(-1, 1, out.loss.numel()).reshape(out.loss.shape) if out.loss.dim() else 1.3
        (out.loss * (gout.to(dev) if isinstance(gout, torch.Tensor) else gout)).sum().backward()
        res.append(tuple(None if a is None else a.detach().cpu() for a in (
            out.loss, out.correct, out.count, xs.grad, ws.grad, None if bs is None else bs.grad, qs.grad)))
    want, got = res
    torch.testing.assert_close(got[0], want[0].detach(), rtol=2e-5, atol=2e-5)
    assert torch.equal(got[2], want[2]) and (got[1] - want[1]).abs().max() <= 1
    for g, r in zip(got[3:], want[3:]):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))
