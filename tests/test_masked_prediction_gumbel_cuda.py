"""BiRQ's on-the-fly soft targets, CUDA core (``cuda_core_gumbel``): the kGumbel instantiations of
forward_kernel, dx_kernel and dw_kernel (csrc/masked_prediction_cuda.cu), run on the host by their
emulation (csrc/testing_cpu.cpp: every thread of every block, phase by phase, through the same
header functions), called through the unchanged Python wrapper, against the fp64 reference.

Truth: ``q = softmax(gumbel_target_logits(y, c, tgt_scale, noise_scale, seed))`` and
``ref.masked_prediction_loss(x, w, q, bias, reduction="none", label_smoothing=eps)`` in fp64 on
the stored inputs, autograd giving dx, dw, db and (through q) dy, dc of ``sum g * loss``. The
yardstick of the 2x rule (tests/_tolerance.py) is that formula in fp32 on the same stored values
(the core's outputs are fp32 whatever x's dtype). The GPU tier would run the same checks on the
compiled kernels; no GPU was available when these were written.
"""
import math
import types

import pytest
import torch

from _tolerance import assert_error_rule
from sslfast import _ext
from sslfast.ops.masked_prediction import _cuda_gumbel as cuda_core_gumbel
from sslfast.reference import masked_prediction as ref


@pytest.fixture
def core(monkeypatch):
    """cuda_core_gumbel on CPU tensors: the CUDA module's entry point replaced by its host
    emulation (the same arguments less the stream)."""
    C = _ext._C
    if C is None or not hasattr(C._testing, "masked_prediction_gumbel"):
        pytest.skip("the CPU extension (with _testing.masked_prediction_gumbel) is not built")
    emulation = C._testing.masked_prediction_gumbel
    module = types.SimpleNamespace(masked_prediction_gumbel_forward_backward=lambda *args: emulation(*args[:-1]))
    monkeypatch.setattr(_ext, "cuda_module", lambda: module)
    monkeypatch.setattr(_ext, "stream", lambda device: 0)
    return cuda_core_gumbel


def inputs(n, h, hx, hy, v, d, dt, *, bias, dtype=torch.float32, seed=0, x_scale=1.0, b_scale=0.5):
    """Stored inputs: x, w, b in `dtype`; y, c (normalised) and the row weights g in fp32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hx, d, generator=gen, dtype=torch.float64) * x_scale
    w = torch.randn(h, v, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(h, v, generator=gen, dtype=torch.float64) * b_scale if bias else None
    y = torch.nn.functional.normalize(torch.randn(n, hy, dt, generator=gen, dtype=torch.float64), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(h, v, dt, generator=gen, dtype=torch.float64), dim=-1)
    g = torch.rand(n, h, generator=gen, dtype=torch.float64) * 2.0 - 0.5
    low = (x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    return (*low, y.float(), c.float(), g.float())


def formula(x, w, b, y, c, g, seed, tgt_scale, noise_scale, scale, eps, dtype):
    """(loss, max, log l, top, dx, dw, db, dy, dc) of the reference in `dtype` on the stored values."""
    xs, ws, ys, cs = (t.to(dtype, copy=True).requires_grad_() for t in (x, w, y, c))
    bs = None if b is None else b.to(dtype, copy=True).requires_grad_()
    q = torch.softmax(ref.gumbel_target_logits(ys, cs, tgt_scale, noise_scale, seed), dim=-1)
    loss = ref.masked_prediction_loss(scale * xs, ws, q, bias=bs, reduction="none", label_smoothing=eps)
    (loss * g.to(dtype)).sum().backward()
    with torch.no_grad():
        z = scale * torch.einsum("nhd,hvd->nhv", xs.expand(-1, w.shape[0], -1), ws)
        if bs is not None:
            z = z + bs
        m = z.amax(dim=-1)
        top = z.gather(-1, q.argmax(dim=-1, keepdim=True))[..., 0] >= m
        rows = (loss.detach(), m, torch.logsumexp(z, dim=-1) - m, top)
    return (*rows, xs.grad, ws.grad, None if bs is None else bs.grad, ys.grad, cs.grad)


NAMES = ("loss", "max", "log_l", "top", "dx", "dw", "db", "dy", "dc")


def _flat(out):
    loss, stats, top, *grads = out
    return (loss, stats[0], stats[1], top, *grads)


def check(core, case, dtype=torch.float32, *, data_seed=None, seed=None, **scales):
    n, h, hx, hy, v, d, dt, bias, eps, noise, scale, tau = case
    data_seed = n * 7 + v if data_seed is None else data_seed
    x, w, b, y, c, g = inputs(n, h, hx, hy, v, d, dt, bias=bias, dtype=dtype, seed=data_seed, **scales)
    seed = 1000 + n if seed is None else seed
    tgt, ns = 2.0 / tau, (1.0 / tau if noise else 0.0)
    got = _flat(core(x, w, b, y, c, torch.tensor([seed]), tgt, ns, g, scale, eps))
    truth = formula(x, w, b, y, c, g, seed, tgt, ns, scale, eps, torch.float64)
    yard = formula(x, w, b, y, c, g, seed, tgt, ns, scale, eps, torch.float32)
    for name, a, r, t in zip(NAMES, got, yard, truth):
        if t is None:
            assert a is None, name
        elif name == "top":
            assert a.dtype == torch.bool and torch.equal(a, t), name
        else:
            assert a.dtype == torch.float32, name
            assert_error_rule(a, r.reshape(a.shape), t.reshape(a.shape), f"{name} {case} {dtype}")


# (N, H, Hx, Hy, V, D, Dt, bias, eps, noise, scale, tau): N off the 32-row tile and over
# several; V off the 32-class tile and off 4 (Philox words), several V tiles; D over 64 (two
# feature blocks: only the first accumulates dy / dc) and over the 32-wide slice; Dt over the
# 32-wide slice (two target slices) and below it; Hx and Hy in {1, H} in every pairing (Hy = 1:
# dy summed over the heads); bias or not; eps 0 and 0.1; noise on and off; BiRQ's temperatures.
CASES = [
    (37, 2, 1, 1, 50, 9, 5, True, 0.1, True, 1.0, 1.0),
    (70, 3, 3, 3, 33, 70, 16, False, 0.0, True, 1.0, 0.5),
    (40, 3, 1, 3, 97, 20, 40, True, 0.0, False, 0.5, 0.5),
    (33, 2, 2, 1, 66, 33, 17, True, 0.1, True, 2.0, 0.1),
    (5, 1, 1, 1, 3, 1, 1, False, 0.1, True, 1.0, 1.0),
    # large logits (|z| to ~300) and sharp targets (tau 0.05, 0.1), where qsum m - sum q z would
    # cancel: the loss from the all-positive gap sum, dt from zbest + dbar (masked_prediction.h)
    (40, 2, 2, 2, 70, 16, 16, False, 0.0, True, 100.0, 0.05),
    (64, 1, 1, 1, 300, 8, 16, True, 0.0, True, 10.0, 0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}h{}x{}y{}v{}d{}t{}b{}e{}g{}s{}tau{}".format(*c))
def test_kernels_on_the_host_within_twice_the_fp32_reference(core, case):
    check(core, case)


@pytest.mark.parametrize("case,dtype", [
    ((37, 2, 1, 1, 50, 9, 5, True, 0.1, True, 1.0, 1.0), torch.float32),
    ((200, 1, 1, 1, 7, 16, 3, False, 0.1, False, 1.0, 2.0), torch.float32),
    ((131, 3, 1, 3, 97, 20, 16, True, 0.0, False, 0.5, 0.5), torch.bfloat16)])
def test_target_gradient_within_twice_the_fp32_reference(core, case, dtype):
    # dy / dc through dtarget_logit. With dt = g q ((1 - eps)(lse - z) - qbar), qbar = (1 - eps)
    # (qsum lse - sum q z) in fp32, these three failed (dy 2.3x, dc 2.8x, dy 2.2x the fp32
    # reference's error); with qbar from the gap sum the second still did (2.0x + 1.001 of the ulp
    # floor). Data as tests/test_masked_prediction_gumbel_cpu.py's.
    n, v = case[0], case[4]
    check(core, case, dtype, data_seed=n + v, seed=977 + n, x_scale=1.5, b_scale=1.0)


@pytest.mark.xfail(strict=True, reason="dx 3.2x the fp32 reference's error (1.2e-4 vs 3.7e-5, 5 of 640 elements) "
                   "at scale 30 with eps 0.1; the unchanged kSoft kernels given the same q in fp32 show the same "
                   "1.2e-4 (yardstick 2.7e-5): the shared logit / dlogit math, not the BiRQ targets")
def test_large_logit_spread_with_smoothing(core):
    check(core, (40, 2, 1, 2, 70, 16, 16, True, 0.1, True, 30.0, 0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_within_twice_the_fp32_reference(core, dtype):
    # x, w, b stored in fp16 / bf16 are loaded exactly (load_float); the outputs are fp32
    check(core, CASES[0], dtype)


def test_one_class(core):
    # V = 1: q = 1 whatever y, c and the noise: loss 0, log l 0, top set, dy = dc = 0 exactly,
    # eps or not; dx, dw, db against the reference with eps = 0 (with eps > 0 the shared dlogit's
    # fp32 1 - (1 - eps) - eps / V leaves ~2e-8 g |w| where the truth is 0, in every mode)
    case = (20, 2, 2, 2, 1, 8, 4, True, 0.0, True, 1.0, 1.0)
    check(core, case)
    x, w, b, y, c, g = inputs(*case[:7], bias=True, seed=3)
    loss, stats, top, dx, dw, db, dy, dc = core(x, w, b, y, c, torch.tensor([5]), 3.0, 1.5, g, 1.0, 0.1)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(stats[1], torch.zeros_like(stats[1]))
    assert top.all() and not dy.any() and not dc.any()


def test_empty_batch(core):
    x, w, b, y, c, g = inputs(0, 3, 3, 1, 10, 8, 4, bias=True)
    loss, stats, top, dx, dw, db, dy, dc = core(x, w, b, y, c, torch.tensor([5]), 2.0, 1.0, g, 1.0, 0.1)
    assert loss.shape == (0, 3) and stats.shape == (2, 0, 3) and top.shape == (0, 3) and dx.shape == (0, 3, 8)
    assert dy.shape == (0, 1, 4)
    for t, shape in ((dw, (3, 10, 8)), (db, (3, 10)), (dc, (3, 10, 4))):
        assert t.shape == shape and torch.equal(t, torch.zeros(shape))


def _run(core, seed, *, noise=1.5, grad=True, want_rows=True):
    x, w, b, y, c, g = inputs(45, 2, 1, 2, 40, 12, 16, bias=True, seed=11)
    return core(x, w, b, y, c, seed, 3.0, noise, g if grad else None, 1.0, 0.1, want_rows=want_rows)


def _same_bits(a, b):
    for s, t in zip(a, b):
        assert (s is None) == (t is None)
        if s is not None:
            assert torch.equal(s, t)


def test_seed_int_and_tensor_give_the_same_bits(core):
    _same_bits(_run(core, 123), _run(core, torch.tensor([123])))
    # the tensor holds the key's 64 bits: a negative int64 keys its two's complement
    _same_bits(_run(core, torch.tensor([-5])), _run(core, torch.tensor([-5])))


def test_seeds_change_the_targets_only_with_noise(core):
    a, b = _run(core, 1), _run(core, 2)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[6], b[6])
    _same_bits(_run(core, 1, noise=0.0), _run(core, 2, noise=0.0))


def test_no_grad_and_backward_only_calls(core):
    full = _run(core, 7)
    rows = _run(core, 7, grad=False)
    assert rows[3:] == (None,) * 5
    _same_bits(full[:3], rows[:3])
    # want_rows=False (the backward): the same gradients
    _same_bits(full[3:], _run(core, 7, want_rows=False)[3:])


def test_bad_seed_tensor_raises(core):
    x, w, b, y, c, g = inputs(4, 1, 1, 1, 5, 3, 2, bias=False)
    for seed in (torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32)):
        with pytest.raises(ValueError, match="seed_t"):
            core(x, w, b, y, c, seed, 2.0, 1.0, g, 1.0, 0.0)
