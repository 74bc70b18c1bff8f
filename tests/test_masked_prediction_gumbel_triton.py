"""The Triton core of BiRQ's on-the-fly soft targets (``kernels.masked_prediction.core_gumbel``)
against the fp64 specification: ``q = softmax(gumbel_target_logits(y, c, tgt_scale, noise_scale,
seed))`` fed to ``reference.masked_prediction_loss`` as soft targets, with autograd for dx, dw,
db and, through q, dy and dc of ``sum(g * loss)``.

Error rule (tests/_tolerance.py): each output within twice the error of the same reference
formula run in fp32 on the same stored inputs, plus 2 ulp of fp32. fp16 x / w: the kernels
round dS (normalised to [-1, 1] by max |g|) to fp16 for the dX and dW products, so those two
get in addition the bound of that one rounding, ``2^-11 |dS| + 2^-25 max|g|`` per logit,
carried through ``|dS| @ |W|`` (resp. ``|dS|^T @ |X|``) in fp64.
"""
import math

import pytest
import torch

from _tolerance import assert_error_rule
from sslfast.reference import masked_prediction as ref

pytestmark = pytest.mark.interpreter
triton = pytest.importorskip("triton")

from sslfast.kernels import masked_prediction as km  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TAU = 0.7  # BiRQ's Gumbel temperature here: tgt_scale = 2 / tau, noise_scale = 1 / tau (or 0)


def _case(n, h, v, d, dt, hx, hy, bias, *, seed=0):
    """fp64 x (N, Hx, D), w (H, V, D), bias (H, V) | None, unit y (N, Hy, Dt), unit c (H, V, Dt)
    (rounded to fp32, what the op passes), g (N, H) fp32 with a few zero and negative rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hx, d, generator=gen, dtype=torch.float64)
    w = torch.randn(h, v, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(h, v, generator=gen, dtype=torch.float64) if bias else None
    y = ref.safe_normalize(torch.randn(n, hy, dt, generator=gen, dtype=torch.float64)).float().double()
    c = ref.safe_normalize(torch.randn(h, v, dt, generator=gen, dtype=torch.float64)).float().double()
    g = torch.rand(n, h, generator=gen, dtype=torch.float64) * 2 - 0.5
    g[::7] = 0.0
    return x, w, b, y, c, g.float().double()


def _formula(x, w, b, y, c, g, ts, ns, seed, eps, dtype):
    """loss (N, H), and the gradients (dx, dw, db, dy, dc) of sum(g * loss), and the logits'
    gradient dS = d sum(g * loss) / dz (N, H, V), in ``dtype`` math; from leaf copies of the
    stored inputs."""
    leaves = [None if a is None else a.detach().to(dtype).clone().requires_grad_() for a in (x, w, b, y, c)]
    xs, ws, bs, ys, cs = leaves
    q = torch.softmax(ref.gumbel_target_logits(ys, cs, ts, ns, seed), dim=-1)
    xin = xs[:, 0] if xs.shape[1] == 1 else xs
    loss = ref.masked_prediction_loss(xin, ws, q, bias=bs, reduction="none", label_smoothing=eps)
    (loss * g.to(dtype)).sum().backward()
    return loss.detach(), [None if a is None else a.grad for a in leaves]


def _dlogits64(x, w, b, q, g, eps):
    """dS (N, H, V) in fp64 for a fixed q (the soft-target gradient of the logits)."""
    xe = x.expand(-1, w.shape[0], -1) if x.shape[1] == 1 else x
    z = torch.einsum("nhd,hvd->nhv", xe, w) + (0 if b is None else b)
    p = torch.softmax(z, dim=-1)
    v = w.shape[1]
    mass = (1 - eps) * q.sum(-1, keepdim=True) + eps
    return g[..., None] * (mass * p - (1 - eps) * q - eps / v)


def _run(x, w, b, y, c, g, *, ts=2 / TAU, ns=1 / TAU, seed=11, eps=0.1, dtype=torch.float32, grad=True):
    cast = (lambda a: None if a is None else a.to(DEV, dtype).contiguous())
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEV)
    out = km.core_gumbel(cast(x), cast(w), cast(b), y.to(DEV).float().contiguous(), c.to(DEV).float().contiguous(),
                         seed_t, ts, ns, g.to(DEV).float() if grad else None, 1.0, eps)
    return [None if a is None else a.cpu() for a in out]


def _check(n, h, v, d, dt, hx, hy, bias, eps, noise, dtype, seed=0):
    x, w, b, y, c, g = _case(n, h, v, d, dt, hx, hy, bias, seed=seed)
    # the stored inputs: x, w, b rounded to the kernel's dtype
    x, w = x.to(dtype).double(), w.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    ts, ns, key = 2 / TAU, (1 / TAU if noise else 0.0), 1234 + seed
    loss, stats, top, dx, dw, db, dy, dc = _run(x, w, b, y, c, g, ts=ts, ns=ns, seed=key, eps=eps, dtype=dtype)
    truth_loss, truth_grads = _formula(x, w, b, y, c, g, ts, ns, key, eps, torch.float64)
    ref_loss, ref_grads = _formula(x, w, b, y, c, g, ts, ns, key, eps, torch.float32)
    what = f"n={n} h={h} v={v} d={d} dt={dt} hx={hx} hy={hy} bias={bias} eps={eps} noise={noise} {dtype}"
    assert loss.shape == (n, h) and dx.shape == (n, hx, d) and dy.shape == (n, hy, dt) and dc.shape == (h, v, dt)
    assert_error_rule(loss, ref_loss, truth_loss, f"loss {what}")
    extra = {}
    if dtype != torch.float32:  # dS rounded to fp16 once for the dX / dW products (module docstring)
        q = torch.softmax(ref.gumbel_target_logits(y, c, ts, ns, key), dim=-1)
        ds = _dlogits64(x, w, b, q, g, eps).abs()
        err_ds = 2.0 ** -11 * ds + 2.0 ** -25 * g.abs().max()
        ex = torch.einsum("nhv,hvd->nhd", err_ds, w.abs())
        extra["dx"] = ex.sum(1, keepdim=True) if hx == 1 else ex
        xe = x.abs().expand(-1, h, -1) if hx == 1 else x.abs()
        extra["dw"] = torch.einsum("nhv,nhd->hvd", err_ds, xe)
    for name, got, r, t in zip(("dx", "dw", "db", "dy", "dc"), (dx, dw, db, dy, dc), ref_grads, truth_grads):
        if t is None:
            assert got is None, name
            continue
        if name in extra:
            err = (got.double() - t).abs()
            bound = 2 * (r.double() - t).abs().max() + 2 * 2.0 ** -23 * t.abs() + extra[name]
            assert (err <= bound).all(), f"{name} {what}: {(err - bound).max().item():.3g} over the bound"
        else:
            assert_error_rule(got, r, t, f"{name} {what}")
    return x, w, b, y, c, g, (loss, stats, top), key


# Hx, Hy in {1, H}; bias or not; eps 0 and 0.1; noise on and off; V not a multiple of the fp32
# tile (32) nor of 4 (45, 70), N not a multiple of the row tile (37, 33); Dt = 20 > BLOCK_DT
# (two dY / dC column blocks, with D = 9: more of them than dX / dW blocks).
CASES = [
    # n, h, v, d, dt, hx, hy, bias, eps, noise
    (37, 2, 45, 9, 5, 1, 2, True, 0.1, True),
    (37, 2, 45, 9, 5, 2, 1, False, 0.0, True),
    (33, 2, 70, 20, 16, 2, 2, True, 0.0, False),
    (33, 3, 70, 20, 16, 1, 1, False, 0.1, False),
    (40, 2, 33, 9, 20, 2, 1, True, 0.1, True),
    (5, 1, 7, 3, 3, 1, 1, True, 0.1, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}h{}v{}d{}dt{}hx{}hy{}b{}e{}g{}".format(*c))
def test_core_gumbel_matches_fp64_reference_fp32(case):
    _check(*case, dtype=torch.float32)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=lambda c: "n{}h{}v{}dt{}hx{}hy{}".format(
    c[0], c[1], c[2], c[4], c[5], c[6]))
def test_core_gumbel_matches_fp64_reference_fp16(case):
    # fp16 tiles: 64 x 64 in the forward, 16 x 32 in the gradients: V = 45, 70, 33 fit neither
    _check(*case, dtype=torch.float16)


def test_one_class_loss_and_gradients_are_zero():
    # V = 1: q = 1, log-softmax of one logit is 0: loss 0, every gradient 0
    x, w, b, y, c, g, (loss, stats, top), _ = _check(9, 2, 1, 4, 3, 1, 2, True, 0.0, True, torch.float32)
    assert torch.equal(loss, torch.zeros(9, 2)) and top.all()
    # with label smoothing, dS = g (mass p - (1 - eps) q - eps / V) at p = q = 1 is the soft-target
    # core's (unchanged here): mass = (1 - eps) + eps and the two subtractions, each rounded to
    # fp32, leave at most 3 half-ulps of 1 per unit of g; dy, dc (dt = 0 exactly) and the loss are 0
    loss, stats, top, dx, dw, db, dy, dc = _run(x, w, b, y, c, g, eps=0.1)
    assert torch.equal(loss, torch.zeros(9, 2)) and top.all()
    assert torch.equal(dy, torch.zeros_like(dy)) and torch.equal(dc, torch.zeros_like(dc))
    unit = 1.5 * 2.0 ** -23 * g.abs()  # |dS| bound per row and head
    assert (dx.double().abs() <= torch.einsum("nh,hvd->nd", unit, w.abs())[:, None] + 1e-30).all()
    assert (dw.double().abs() <= torch.einsum("nh,nd->hd", unit, x[:, 0].abs())[:, None] + 1e-30).all()
    assert (db.double().abs() <= unit.sum(0)[:, None] + 1e-30).all()


def test_statistics_and_top_follow_the_logits_and_targets():
    # stats = (max z, log l) of the logits (the soft-target core's); top: the logit at the first
    # argmax of q attains the max. V = 5 classes so that top is True on some rows, False on others.
    n, h, v = 40, 2, 5
    x, w, b, y, c, g = _case(n, h, v, 6, 4, 1, 2, True, seed=3)
    loss, stats, top, *_ = _run(x, w, b, y, c, g, seed=77)
    z = torch.einsum("nd,hvd->nhv", x[:, 0], w) + b
    m = z.amax(-1)
    torch.testing.assert_close(stats[0].double(), m, rtol=0, atol=4 * 2.0 ** -23 * m.abs().max().item())
    torch.testing.assert_close(stats[1].double(), torch.logsumexp(z - m[..., None], -1), rtol=0, atol=1e-6)
    q = torch.softmax(ref.gumbel_target_logits(y, c, 2 / TAU, 1 / TAU, 77), dim=-1)
    qs = q.sort(-1, descending=True).values
    zs = z.sort(-1, descending=True).values
    clear = ((qs[..., 0] - qs[..., 1]) > 1e-5) & ((zs[..., 0] - zs[..., 1]) > 1e-5)  # no near-ties
    want = q.argmax(-1) == z.argmax(-1)
    assert clear.sum() > 0.9 * n * h
    assert torch.equal(top[clear], want[clear])
    assert want[clear].any() and not want[clear].all()


def test_no_grad_call_gives_the_same_rows():
    x, w, b, y, c, g = _case(37, 2, 45, 9, 5, 1, 2, True, seed=4)
    full = _run(x, w, b, y, c, g)
    rows = _run(x, w, b, y, c, g, grad=False)
    for a, r in zip(full[:3], rows[:3]):
        assert torch.equal(a, r)
    assert all(r is None for r in rows[3:])


def test_empty_batch():
    x, w, b, y, c, g = _case(0, 2, 45, 9, 5, 2, 1, True)
    loss, stats, top, dx, dw, db, dy, dc = _run(x, w, b, y, c, g)
    assert loss.shape == (0, 2) and stats.shape == (2, 0, 2) and top.shape == (0, 2)
    assert dx.shape == (0, 2, 9) and dy.shape == (0, 1, 5)
    for a, shape in ((dw, (2, 45, 9)), (db, (2, 45)), (dc, (2, 45, 5))):
        assert torch.equal(a, torch.zeros(shape))


def test_seeds():
    x, w, b, y, c, g = _case(37, 2, 45, 9, 5, 1, 2, True, seed=5)
    # deterministic: the same key gives the same bits (no atomics), a full 64-bit key reaches Philox
    key = -(2**62) + 12345
    a = _run(x, w, b, y, c, g, seed=key)
    assert all(torch.equal(p, r) for p, r in zip(a, _run(x, w, b, y, c, g, seed=key)))
    truth, _ = _formula(x, w, b, y, c, g, 2 / TAU, 1 / TAU, key, 0.1, torch.float64)
    ref32, _ = _formula(x, w, b, y, c, g, 2 / TAU, 1 / TAU, key, 0.1, torch.float32)
    assert_error_rule(a[0], ref32, truth, "loss, 64-bit key")
    # another key, other noise: other losses; keys differing only in the high word too
    for other in (key + 1, key ^ (1 << 40)):
        assert not torch.equal(a[0], _run(x, w, b, y, c, g, seed=other)[0]), other
    # no noise: the key is not read
    quiet = _run(x, w, b, y, c, g, ns=0.0, seed=1)
    assert all(torch.equal(p, r) for p, r in zip(quiet, _run(x, w, b, y, c, g, ns=0.0, seed=2)))
