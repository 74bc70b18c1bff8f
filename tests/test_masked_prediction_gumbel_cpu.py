"""BiRQ's on-the-fly soft targets, C++ CPU core (``_cpu_gumbel`` in sslfast/ops/masked_prediction.py) against the fp64 reference.

Truth: q = softmax(gumbel_target_logits(y, c, tgt_scale, noise_scale, seed)) in fp64, then
``ref.masked_prediction_loss(x, w, q, bias, reduction="none", label_smoothing=eps)`` with
autograd for dx, dw, db and (through q) dy, dc of sum(g * loss), all on the stored inputs. The
yardstick of the 2x rule (tests/_tolerance.py) is the same formula in fp32 on the same stored
values: the core's outputs are fp32 whatever x's dtype (fp16 / bf16 inputs are loaded exactly).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_error_rule
from sslfast import _ext
from sslfast.ops.masked_prediction import _cpu_gumbel as cpu_core_gumbel
from sslfast.reference import masked_prediction as ref

pytestmark = pytest.mark.cpu


def make_case(n, h, hx, hy, v, d, dt, *, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hx, d, generator=gen, dtype=torch.float64) * 1.5
    w = torch.randn(h, v, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(h, v, generator=gen, dtype=torch.float64) if bias else None
    y = F.normalize(torch.randn(n, hy, dt, generator=gen, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(h, v, dt, generator=gen, dtype=torch.float64), dim=-1)
    g = torch.rand(n, h, generator=gen, dtype=torch.float64) * 2 - 0.5  # signed, some near 0
    cast = (lambda a, dt_: None if a is None else a.to(dt_).contiguous())
    return cast(x, dtype), cast(w, dtype), cast(b, dtype), cast(y, torch.float32), cast(c, torch.float32), \
        cast(g, torch.float32)


def reference(x, w, b, y, c, seed, tgt_scale, noise_scale, g, scale, eps, dtype):
    """(loss, stats, top, dx, dw, db, dy, dc) of the reference formula in ``dtype`` (fp64: the
    truth; fp32: the 2x rule's yardstick) on the stored inputs."""
    xs, ws, ys, cs = (a.to(dtype).requires_grad_() for a in (x, w, y, c))
    bs = None if b is None else b.to(dtype).requires_grad_()
    q = torch.softmax(ref.gumbel_target_logits(ys, cs, tgt_scale, noise_scale, seed), dim=-1)
    xin = xs * scale
    xin = xin[:, 0] if xin.shape[1] == 1 else xin
    loss = ref.masked_prediction_loss(xin, ws, q, bias=bs, reduction="none", label_smoothing=eps)
    (loss * g.to(dtype)).sum().backward()
    with torch.no_grad():
        z = torch.einsum("nhd,hvd->nhv", xin if xin.dim() == 3 else xin[:, None].expand(-1, w.shape[0], -1), ws)
        z = z + (0 if bs is None else bs)
        m = z.amax(-1)
        stats = torch.stack([m, torch.logsumexp(z, -1) - m])
        top = z.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1) >= m
    return (loss.detach(), stats, top, xs.grad, ws.grad, None if bs is None else bs.grad, ys.grad, cs.grad)


NAMES = ("loss", "stats", "top", "dx", "dw", "db", "dy", "dc")

# (n, h, hx, hy, v, d, dt, bias, eps, tau, noise, scale): N below, at and past the kernel's
# 96-row chunk, V off every tile (4, 16, 48) and past one 48-class block, Dt past one 16-wide
# panel, Hx and Hy in {1, H}, BiRQ's temperatures (tgt_scale 2 / tau, noise_scale 1 / tau).
CASES = [
    (37, 2, 1, 1, 50, 9, 5, True, 0.1, 1.0, True, 1.0),
    (131, 3, 3, 3, 97, 20, 16, False, 0.0, 0.5, True, 1.0),
    (131, 3, 1, 3, 97, 20, 16, True, 0.0, 0.5, False, 0.5),
    (96, 2, 2, 1, 130, 33, 17, True, 0.1, 0.1, True, 2.0),
    (200, 1, 1, 1, 7, 16, 3, False, 0.1, 2.0, False, 1.0),
    (20, 2, 2, 2, 1, 8, 4, True, 0.0, 1.0, True, 1.0),  # V = 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda cs: "n{}h{}x{}y{}v{}d{}t{}b{}e{}tau{}{}s{}".format(*cs))
def test_core_within_twice_the_fp32_reference(case, dtype):
    # With dt = g q ((1 - eps)(lse - z) - qbar), qbar = (1 - eps)(qsum lse - sum q z) in fp32, three
    # of these failed (dy 2.3x the fp32 reference's error in the first case, fp32; dy in the
    # second, bf16; dc in the fifth, fp32); dtarget_logit's (zbest - z) + dbar passes them.
    n, h, hx, hy, v, d, dt, bias, eps, tau, noise, scale = case
    x, w, b, y, c, g = make_case(n, h, hx, hy, v, d, dt, bias=bias, dtype=dtype, seed=n + v)
    seed = 977 + n
    tgt, ns = 2.0 / tau, (1.0 / tau if noise else 0.0)
    got = cpu_core_gumbel(x, w, b, y, c, torch.tensor([seed]), tgt, ns, g, scale, eps)
    truth = reference(x, w, b, y, c, seed, tgt, ns, g, scale, eps, torch.float64)
    ref32 = reference(x, w, b, y, c, seed, tgt, ns, g, scale, eps, torch.float32)
    for name, a, r, t in zip(NAMES, got, ref32, truth):
        if t is None:
            assert a is None, name
            continue
        assert a.dtype == (torch.bool if name == "top" else torch.float32), name
        if name == "top":
            assert torch.equal(a, t), name
        else:
            assert_error_rule(a, r.reshape(a.shape), t.reshape(a.shape), f"{name} ({dtype})")


def test_v1_targets_have_no_gradient_and_zero_loss():
    # One class: q = 1 whatever y, c and the noise, so the loss is 0 (eps or not) and dy = dc = 0.
    x, w, b, y, c, g = make_case(30, 2, 1, 2, 1, 8, 4, bias=True, dtype=torch.float32, seed=3)
    loss, stats, top, dx, dw, db, dy, dc = cpu_core_gumbel(x, w, b, y, c, torch.tensor([5]), 3.0, 1.5, g, 1.0, 0.1)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dy, torch.zeros_like(dy)) and torch.equal(dc, torch.zeros_like(dc))
    assert top.all() and torch.equal(stats[1], torch.zeros_like(stats[1]))


def test_n0_gives_empty_rows_and_zero_gradients():
    x, w, b, y, c, g = make_case(0, 3, 3, 1, 10, 8, 4, bias=True, dtype=torch.float32, seed=1)
    loss, stats, top, dx, dw, db, dy, dc = cpu_core_gumbel(x, w, b, y, c, torch.tensor([5]), 2.0, 1.0, g, 1.0, 0.1)
    assert loss.shape == (0, 3) and stats.shape == (2, 0, 3) and top.shape == (0, 3)
    assert dx.shape == (0, 3, 8) and dy.shape == (0, 1, 4)
    for t, shape in ((dw, (3, 10, 8)), (db, (3, 10)), (dc, (3, 10, 4))):
        assert t.shape == shape and torch.equal(t, torch.zeros(shape))


def _run(seed, noise=1.0, grad=True, want_rows=True, case_seed=11):
    x, w, b, y, c, g = make_case(150, 2, 1, 2, 60, 12, 16, bias=True, dtype=torch.float32, seed=case_seed)
    return cpu_core_gumbel(x, w, b, y, c, seed, 2.0, noise, g if grad else None, 1.0, 0.1, want_rows=want_rows)


def _same_bits(a, b):
    for name, s, t in zip(NAMES, a, b):
        assert (s is None) == (t is None), name
        if s is not None:
            assert torch.equal(s, t), name


def test_seed_int_and_tensor_give_identical_bits():
    _same_bits(_run(2**40 + 17), _run(torch.tensor([2**40 + 17])))
    # a negative tensor seed is the key's two's-complement bits
    _same_bits(_run(2**64 - 3), _run(torch.tensor([-3])))


def test_seeds_change_the_noise_and_only_the_noise():
    a, b = _run(torch.tensor([1])), _run(torch.tensor([2]))
    assert (a[0] - b[0]).abs().max() > 1e-3
    assert (a[6] - b[6]).abs().max() > 1e-3
    # no noise drawn: the seed is unused
    _same_bits(_run(torch.tensor([1]), noise=0.0), _run(torch.tensor([2]), noise=0.0))


def test_rows_without_gradients_and_gradients_without_rows_are_the_same_bits():
    full = _run(7)
    rows = _run(7, grad=False)
    _same_bits(full[:3], rows[:3])
    assert all(t is None for t in rows[3:])
    _same_bits(full[3:], _run(7, want_rows=False)[3:])


def test_bit_identical_for_any_thread_count():
    before = torch.get_num_threads()
    try:
        outs, slots = [], []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            slots.append(_ext.cpu_module().masked_prediction_layout(60, 12, True, 16)[0])
            outs.append(_run(9))
    finally:
        torch.set_num_threads(before)
    assert len(set(slots)) > 1, slots  # the thread count did reach the kernel
    for o in outs[1:]:
        _same_bits(outs[0], o)


# ----------------------------------------------------------------------------- the noise path
def _words_noise(words):
    """The CPU path's noise of uint32 words (held in int64), and how many lanes fell back."""
    w32 = torch.from_numpy(words.numpy().astype("uint32").view("int32").copy())
    out = torch.empty(words.numel(), dtype=torch.float32)
    slow = _ext.cpu_module()._masked_prediction_gumbel_words(w32.data_ptr(), words.numel(), out.data_ptr())
    return out, slow


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_noise_of_words_has_the_reference_bits(force_cpu_isa, isa):
    # The rows' noise takes its fp64 logs four lanes at a time (not libm's bits) and redoes with
    # libm the lanes whose rounding to fp32 that leaves in doubt: u near 1/e (G near 0) and any
    # close call. Words: around u = 1/e (both halves of the word range map there), random, extremes.
    from sslfast import random as sr
    from sslfast.reference.gumbel_quantize import GUMBEL_U_LO

    force_cpu_isa(isa)
    mid = round(math.exp(-1) / 4.6566127342e-10)
    near = torch.arange(mid - 3000, mid + 3001, dtype=torch.int64)
    rand = torch.randint(0, 2**32, (200_003,), generator=torch.Generator().manual_seed(0))
    words = torch.cat([near, 2**32 - 1 - near, rand, torch.tensor([0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])])
    got, slow = _words_noise(words)
    want = (-torch.log(-torch.log(sr.uint_to_open_uniform(words, GUMBEL_U_LO).double()))).float()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (slow > 0) if isa == "avx2" else (slow == 0), slow  # the fallback did run on the vector path


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_core_simd_paths_give_the_scalar_bits(force_cpu_isa, isa):
    force_cpu_isa("scalar")
    want = _run(torch.tensor([3]))
    force_cpu_isa(isa)
    _same_bits(want, _run(torch.tensor([3])))
