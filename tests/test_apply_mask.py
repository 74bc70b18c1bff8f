"""apply_mask: every backend against the reference (embedding exact, noise within fp32
rounding of log/cos/sin), the reference's noise against an independent fp64 Box-Muller on
the Philox words, noise statistics, per-frame independence of the noise, untouched unmasked
frames, in-place semantics, gradients against fp64 autograd, determinism of the embedding
gradient, edge cases, validation, torch.compile, and the gpu tier (bf16, CUDA graphs)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import sslfast
from _compile import aot_eager_no_host_reads
from _tolerance import assert_error_rule
from sslfast import random as sr
from sslfast.reference import apply_mask as ref

am = sslfast.apply_mask
HAS_CUDA = torch.cuda.is_available()

# Kernel noise against the reference: fp32 differs by the last bits of log/cos/sin (|z| < 7,
# so a few ulp of 7 relative to std); narrower dtypes may round the other way: one ulp.
NOISE_TOL = {  # dtype -> (rtol, atol as a multiple of std)
    torch.float32: (1e-5, 4e-6),
    torch.float16: (2.0**-10, 1e-6),
    torch.bfloat16: (2.0**-7, 1e-6),
}
SHAPES = [(3, 7, 7), (2, 13, 33), (1, 5, 4), (2, 3, 1), (2, 5, 130)]  # D odd, prime, < 4, > BLOCK_D/8


def _backends(tier):
    if tier == "cpu":
        return [pytest.param("cpu", marks=pytest.mark.cpu)]
    return [pytest.param("triton", marks=pytest.mark.interpreter)]


KERNELS = _backends("cpu") + _backends("interpreter")


def _device(backend):
    return torch.device("cuda" if (HAS_CUDA and backend == "triton") else "cpu")


def _inputs(shape, dtype, p=0.4, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    B, T, D = shape
    x = torch.randn(B, T, D, generator=g).to(dtype)
    mask = torch.rand(B, T, generator=g) < p
    emb = torch.randn(D, generator=g).to(dtype)
    return x.to(device), mask.to(device), emb.to(device)


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_noise_close(out, want, std, dtype):
    rtol, atol = NOISE_TOL[dtype]
    torch.testing.assert_close(out.float(), want.float(), rtol=rtol, atol=atol * max(std, 1e-30))


# ---------------------------------------------------------------- the reference (cpu tier)

@pytest.mark.cpu
def test_reference_noise_layout_against_fp64_box_muller():
    """Frame (b, t), block q = channels 4q..4q+3 of philox(t*ceil(D/4)+q, b, MASK_NOISE)."""
    B, T, D, std, seed = 2, 5, 10, 0.5, 99
    qb = (D + 3) // 4
    noise = ref.frame_noise(B, T, D, std, seed, "cpu").double().numpy()
    for b in range(B):
        for t in range(T):
            c0 = torch.arange(qb) + t * qb
            w = [v.numpy().astype(np.float64) for v in sr.philox4x32(c0, b, int(sr.Stream.MASK_NOISE), 0, seed)]

            def unif(word):  # tl.rand: int32 view, complement negatives, * 2^-31
                i = np.where(word >= 2**31, word - 2**32, word)
                return np.where(i < 0, -i - 1, i) * 4.6566127342e-10

            want = np.empty(qb * 4)
            for k, (wr, wa) in enumerate(((w[0], w[1]), (w[2], w[3]))):
                r = np.sqrt(-2 * np.log(np.clip(unif(wr), 2.0**-32, 1.0)))
                a = unif(wa) * 2 * math.pi
                want[2 * k::4] = r * np.cos(a)
                want[2 * k + 1::4] = r * np.sin(a)
            np.testing.assert_allclose(noise[b, t], std * want[:D], rtol=1e-5, atol=1e-5 * std)


@pytest.mark.cpu
def test_reference_chunked_noise_equals_unchunked(monkeypatch):
    B, T, D = 3, 23, 9
    whole = ref.frame_noise(B, T, D, 1.0, 5, "cpu")
    monkeypatch.setattr(ref, "_CHUNK_BLOCKS", 7)  # chunks of 2 frames along T
    chunked = ref.frame_noise(B, T, D, 1.0, 5, "cpu")
    assert torch.equal(whole, chunked)
    bs, ts = torch.tensor([0, 2, 1]), torch.tensor([22, 0, 7])
    assert torch.equal(ref.gaussian_noise(bs, ts, D, 1.0, 5), whole[bs, ts])


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_mask_embedding(dtype):
    x, mask, emb = _inputs((3, 11, 7), dtype)
    out = am(x, mask, emb)
    assert out.dtype == dtype
    assert torch.equal(out[mask], emb.expand(int(mask.sum()), 7))
    assert torch.equal(out[~mask], x[~mask])
    y = x.clone()
    assert am(y, mask, emb, inplace=True) is y and torch.equal(y, out)


@pytest.mark.cpu
def test_apply_mask_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, generator=g) < 0.5
    assert torch.autograd.gradcheck(lambda a, e: am(a, mask, e), (x, emb))
    assert torch.autograd.gradcheck(lambda a: am(a, mask, 0.3, seed=1), (x,))
    out = am(x, mask, emb)
    out.sum().backward()
    assert torch.equal(emb.grad, torch.full((3,), float(mask.sum()), dtype=torch.float64))
    assert torch.equal(x.grad, (~mask).double().unsqueeze(-1).expand(2, 5, 3))


# ---------------------------------------------------------------- kernels against the reference

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_embedding_fill_exact(backend, dtype, shape):
    x, mask, emb = _inputs(shape, dtype, device=_device(backend))
    want = am(x, mask, emb.float(), backend="reference")  # fill cast to x's dtype
    out = am(x, mask, emb.float(), backend=backend)
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(want))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_noise_fill_matches_reference(backend, dtype, shape):
    x, mask, _ = _inputs(shape, dtype, device=_device(backend))
    for std, seed in ((0.1, 3), (2.5, 2**40 + 7)):
        want = am(x, mask, std, seed=seed, backend="reference")
        out = am(x, mask, std, seed=seed, backend=backend)
        assert torch.equal(_bits(out[~mask]), _bits(x[~mask]))
        _assert_noise_close(out, want, std, dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_noise_depends_only_on_seed_frame_and_channel(backend):
    dev = _device(backend)
    x = torch.zeros(3, 16, 13, device=dev)
    mask = torch.zeros(3, 16, dtype=torch.bool, device=dev)
    mask[:, ::3] = True
    out = am(x, mask, 0.1, seed=17, backend=backend)
    mask2 = mask.clone()
    mask2[:, 1::2] = True  # more frames masked, and other B: the old frames keep their values
    out2 = am(x, mask2, 0.1, seed=17, backend=backend)
    assert torch.equal(out2[mask], out[mask])
    out3 = am(x[1:], mask[1:], 0.1, seed=17, backend=backend)
    assert not torch.equal(out3[mask[1:]], out[1:][mask[1:]])  # row b is the Philox row, not its index here
    assert torch.equal(am(x, mask, 0.1, seed=17, backend=backend), out)
    assert not torch.equal(am(x, mask, 0.1, seed=18, backend=backend), out)
    assert bool((out[~mask] == 0).all())


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNELS)
def test_noise_statistics(backend):
    """Moments and KS against N(0, std^2) per channel phase (4q + k), and no correlation
    between a cos channel and its sin partner, with a fixed seed."""
    dev = _device(backend)
    B, T, D = (4, 600, 64) if backend != "triton" or HAS_CUDA else (1, 96, 64)  # interpreter: 3072 values
    x = torch.full((B, T, D), 7.0, device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    mask[:, 1::2] = True
    std = 0.1
    out = am(x, mask, std, seed=1234, backend=backend)
    z = (out[mask].double() / std).cpu()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2.0 / n)
    for k in range(4):
        zk = z[:, k::4].flatten().numpy()
        assert stats.kstest(zk, "norm").pvalue > 1e-3, k
    r = np.corrcoef(z[:, 0::4].flatten().numpy(), z[:, 1::4].flatten().numpy())[0, 1]
    assert abs(r) < 5 / math.sqrt(n / 4)
    assert bool((out[~mask] == 7.0).all())


@pytest.mark.parametrize("backend", KERNELS)
def test_unmasked_frames_untouched_bit_for_bit(backend):
    dev = _device(backend)
    x, mask, emb = _inputs((2, 9, 6), torch.float32, device=dev)
    x[0, :, 0] = float("nan")
    x[1, :, 1] = float("inf")
    x[0, :, 2] = -0.0
    for fill in (emb, 0.2):
        out = am(x, mask, fill, seed=4, backend=backend)
        assert torch.equal(_bits(out[~mask]), _bits(x[~mask]))
        assert bool(torch.isfinite(out[mask]).all())  # masked NaN/inf frames are overwritten


@pytest.mark.parametrize("backend", KERNELS)
def test_all_and_none_masked_and_empty(backend):
    dev = _device(backend)
    x, _, emb = _inputs((2, 5, 6), torch.float32, device=dev)
    none = torch.zeros(2, 5, dtype=torch.bool, device=dev)
    full = torch.ones(2, 5, dtype=torch.bool, device=dev)
    assert torch.equal(am(x, none, emb, backend=backend), x)
    assert torch.equal(am(x, none, 0.1, seed=1, backend=backend), x)
    assert torch.equal(am(x, full, emb, backend=backend), emb.expand(2, 5, 6))
    _assert_noise_close(am(x, full, 0.1, seed=1, backend=backend), am(x, full, 0.1, seed=1, backend="reference"),
                        0.1, torch.float32)
    assert torch.equal(am(x, full, 0.0, seed=1, backend=backend), torch.zeros_like(x))
    for shape in ((0, 5, 6), (2, 0, 6), (2, 5, 0)):
        e = torch.zeros(shape, device=dev, requires_grad=True)
        m = torch.ones(shape[:2], dtype=torch.bool, device=dev)
        emb0 = torch.zeros(shape[2], device=dev, requires_grad=True)
        out = am(e, m, emb0, backend=backend)
        assert out.shape == shape
        out.sum().backward()
        assert e.grad.shape == shape and torch.equal(emb0.grad, torch.zeros(shape[2], device=dev))
        assert am(e.detach(), m, 0.1, seed=1, backend=backend).shape == shape


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_x_and_integer_masks(backend):
    dev = _device(backend)
    base = torch.randn(2, 7, 12, device=dev)
    x = base.transpose(1, 2)[:, 1:11:2, :]  # (2, 5, 7): strides (84, 2, 12)
    assert not x.is_contiguous()
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.int32, device=dev)
    emb = torch.randn(7, device=dev)
    want = am(x.contiguous(), mask.bool(), emb, backend="reference")
    assert torch.equal(am(x, mask, emb, backend=backend), want)
    assert torch.equal(am(x, mask.to(torch.uint8), emb, backend=backend), want)
    _assert_noise_close(am(x, mask, 0.3, seed=2, backend=backend), am(x, mask, 0.3, seed=2, backend="reference"),
                        0.3, torch.float32)
    # in place through the view: only the view's masked elements change
    b2 = base.clone()
    view = b2.transpose(1, 2)[:, 1:11:2, :]
    assert am(view, mask, emb, inplace=True, backend=backend) is view
    assert torch.equal(view, want)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched.transpose(1, 2)[:, 1:11:2, :][mask.bool()] = False
    assert torch.equal(b2[untouched], base[untouched])


# ---------------------------------------------------------------- in place

@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNELS)
def test_inplace_semantics(backend):
    dev = _device(backend)
    x, mask, emb = _inputs((2, 9, 5), torch.float32, device=dev)
    for fill in (emb, 0.4):
        want = am(x, mask, fill, seed=6, backend=backend)
        y = x.clone()
        assert am(y, mask, fill, inplace=True, seed=6, backend=backend) is y
        assert torch.equal(y, want)
    # a leaf that requires grad cannot be written in place: a clear error, x unchanged
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inplace=True"):
        am(leaf, mask, emb, inplace=True, backend=backend)
    assert torch.equal(leaf.detach(), x)
    with torch.no_grad():
        assert am(leaf, mask, emb, inplace=True, backend=backend) is leaf


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu)] + KERNELS)
def test_inplace_autograd_on_activation(backend):
    """fairseq / HF write the embedding into an activation in place; gradients flow."""
    dev = _device(backend)
    x0, mask, emb0 = _inputs((2, 7, 5), torch.float32, device=dev)
    grad = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(3)).to(dev)

    def run(inplace):
        x = x0.clone().requires_grad_()
        emb = emb0.clone().requires_grad_()
        h = x * 2.0
        out = am(h, mask, emb, inplace=inplace, backend=backend)
        assert (out is h) == inplace
        (out * grad).sum().backward()
        return out.detach(), x.grad, emb.grad

    got, want = run(True), run(False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- gradients

def _fp64_grads(x, mask, emb, grad):
    xd = x.double().requires_grad_()
    ed = emb.double().requires_grad_()
    (ref.apply_mask(xd, mask, ed, False, 0) * grad.double()).sum().backward()
    return xd.grad, ed.grad


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 11, 7), (2, 23, 33)])
def test_gradients_against_fp64_reference(backend, dtype, shape):
    dev = _device(backend)
    x, mask, emb = _inputs(shape, dtype, p=0.6, device=dev)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype).to(dev)
    xr, er = x.clone().requires_grad_(), emb.clone().requires_grad_()
    out = am(xr, mask, er, backend=backend)
    (out * grad).sum().backward()
    gx64, ge64 = _fp64_grads(x, mask, emb, grad)
    assert xr.grad.dtype == dtype and er.grad.dtype == dtype
    assert torch.equal(xr.grad.double(), gx64)  # a selection: exact
    # the embedding's gradient, a sum over masked frames: the error rule against the
    # reference's own gradient in this dtype
    e_ref = emb.clone().requires_grad_()
    (am(x, mask, e_ref, backend="reference") * grad).sum().backward()
    assert_error_rule(er.grad, e_ref.grad, ge64, f"{backend} {dtype} grad of the fill")
    # noise: grad_x only
    xn = x.clone().requires_grad_()
    (am(xn, mask, 0.1, seed=1, backend=backend) * grad).sum().backward()
    assert torch.equal(xn.grad.double(), gx64)
    # the embedding alone (x needs no gradient): grad_x is never written
    e2 = emb.clone().requires_grad_()
    (am(x, mask, e2, backend=backend) * grad).sum().backward()
    assert torch.equal(e2.grad, er.grad)


@pytest.mark.parametrize("backend", KERNELS)
def test_fill_dtype_differs_from_x(backend):
    dev = _device(backend)
    x, mask, emb = _inputs((2, 9, 6), torch.float16, device=dev)
    e32 = emb.float().add(1e-4).requires_grad_()  # not representable in fp16: cast first
    out = am(x, mask, e32, backend=backend)
    assert out.dtype == torch.float16 and torch.equal(out[mask], e32.detach().half().expand(int(mask.sum()), 6))
    out.float().sum().backward()
    assert e32.grad.dtype == torch.float32 and torch.equal(e32.grad, torch.full((6,), float(mask.sum()), device=dev))


@pytest.mark.cpu
def test_cpu_embedding_gradient_is_deterministic_chunk_order():
    """grad_fill on the cpu backend: fp32 partials over fixed chunks of 64 frames, summed in
    chunk order, so the bits never depend on the thread count: reproduce them exactly."""
    B, T, D = 3, 301, 37  # 903 frames: 15 chunks, the last one partial
    x, mask, emb = _inputs((B, T, D), torch.float32, p=0.5)
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    e = emb.clone().requires_grad_()
    (am(x, mask, e, backend="cpu") * grad).sum().backward()
    g = torch.where(mask.unsqueeze(-1), grad, 0.0).reshape(B * T, D)
    chunk = sslfast._ext.cpu_module().apply_mask_grad_chunk
    n_chunks = -(-B * T // chunk)
    g = torch.cat([g, g.new_zeros(n_chunks * chunk - B * T, D)]).reshape(n_chunks, chunk, D)
    partial = torch.zeros(n_chunks, D)
    for i in range(chunk):
        partial += g[:, i]
    want = torch.zeros(D)
    for c in range(n_chunks):
        want += partial[c]
    assert torch.equal(e.grad, want)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        e1 = emb.clone().requires_grad_()
        (am(x, mask, e1, backend="cpu") * grad).sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(e1.grad, want)


# ---------------------------------------------------------------- validation, dispatch, compile

@pytest.mark.cpu
def test_apply_mask_validation():
    x = torch.zeros(2, 5, 4)
    m = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        am(x[0], m, 0.1)
    with pytest.raises(TypeError, match="x must have dtype"):
        am(x.int(), m, 0.1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        am(x.numpy(), m, 0.1)
    with pytest.raises(ValueError, match="mask must have shape"):
        am(x, m[:, :4], 0.1)
    with pytest.raises(TypeError, match="mask must have dtype"):
        am(x, m.float(), 0.1)
    with pytest.raises(ValueError, match="fill must have shape"):
        am(x, m, torch.zeros(5))
    with pytest.raises(TypeError, match="fill must have dtype"):
        am(x, m, torch.zeros(4, dtype=torch.int64))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fill"):
            am(x, m, bad)
    for bad in ("noise", True, None):
        with pytest.raises(TypeError, match="fill"):
            am(x, m, bad)
    with pytest.raises(TypeError, match="inplace"):
        am(x, m, 0.1, inplace=1)
    with pytest.raises(ValueError, match="seed"):
        am(x, m, 0.1, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        am(x, m, 0.1, seed=1.5)
    with pytest.raises(ValueError, match="backend"):
        am(x, m, 0.1, backend="numpy")
    with pytest.raises(TypeError, match="x is torch.float64, which the cpu backend does not take"):
        am(x.double(), m, 0.1, backend="cpu")
    assert am(x.double(), m, 0.1, seed=1).dtype == torch.float64  # fp64: the reference


@pytest.mark.cpu
def test_seed_none_draws_from_torch_generator():
    x = torch.zeros(1, 4, 8)
    m = torch.ones(1, 4, dtype=torch.bool)
    torch.manual_seed(0)
    a = am(x, m, 1.0)
    torch.manual_seed(0)
    assert torch.equal(am(x, m, 1.0), a)
    assert not torch.equal(am(x, m, 1.0), a)


@pytest.mark.cpu
def test_torch_compile_fullgraph():
    x, mask, emb = _inputs((2, 9, 6), torch.float32)

    def f(x, emb):
        return am(x * 1.0, mask, emb, backend="cpu"), am(x, mask, 0.2, seed=3, backend="cpu")

    xr, er = x.clone().requires_grad_(), emb.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(xr, er)
    want = f(x, emb)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    (got[0].sum() + got[1].sum()).backward()
    assert torch.equal(er.grad, torch.full((6,), float(mask.sum())))

    def g(x):
        y = x.clone()
        am(y, mask, 0.2, inplace=True, seed=3, backend="cpu")
        return y

    assert torch.equal(torch.compile(g, fullgraph=True, backend="aot_eager")(x), want[1])


# ---------------------------------------------------------------- seeds as device tensors

SEED_BACKENDS = [pytest.param("reference", marks=pytest.mark.cpu)] + KERNELS
# keys with a zero and a nonzero high word (>= 2^32), and the largest int seed
SEEDS = (0, 5, 2**32 + 3, 2**40 + 7, 2**63 - 1)


def _seeded_calls(x, mask, seed, backend):
    """Every path that hands the seed on: out of place without and with autograd (the custom
    op), in place without autograd and on an activation under autograd."""
    xr = x.clone().requires_grad_()
    y = x.clone()
    am(y, mask, 0.3, inplace=True, seed=seed, backend=backend)
    h = xr * 1.0
    am(h, mask, 0.3, inplace=True, seed=seed, backend=backend)
    return [am(x, mask, 0.3, seed=seed, backend=backend), am(xr, mask, 0.3, seed=seed, backend=backend).detach(), y,
            h.detach()]


@pytest.mark.parametrize("backend", SEED_BACKENDS)
def test_seed_tensor_draws_the_bits_of_the_same_int(backend):
    dev = _device(backend)
    x, mask, _ = _inputs((2, 9, 13), torch.float32, device=dev)
    outs = {}
    for s in SEEDS:
        want = am(x, mask, 0.3, seed=s, backend=backend)
        for seed in (s, torch.tensor(s, device=dev), torch.tensor([s], device=dev)):
            for got in _seeded_calls(x, mask, seed, backend):
                assert torch.equal(_bits(got), _bits(want)), (s, seed)
        outs[s] = want
    assert not torch.equal(outs[5], outs[2**32 + 3]) and not torch.equal(outs[0], outs[2**63 - 1])
    # a tensor fill draws nothing: its seed is not even read
    emb = torch.randn(13, device=dev)
    assert torch.equal(am(x, mask, emb, seed=torch.tensor(7, device=dev), backend=backend),
                       am(x, mask, emb, backend=backend))


@pytest.mark.parametrize("backend", SEED_BACKENDS)
def test_negative_seed_tensor_is_its_twos_complement_key(backend):
    dev = _device(backend)
    x, mask, _ = _inputs((2, 9, 13), torch.float32, device=dev)
    neg = torch.tensor(-5, device=dev)
    out = am(x, mask, 0.3, seed=neg, backend=backend)
    assert torch.equal(_bits(am(x, mask, 0.3, seed=neg.clone(), backend=backend)), _bits(out))  # deterministic
    # the reference noise keyed by the unsigned int 2^64 - 5 (Philox on Python ints, not on a tensor)
    B, T, D = x.shape
    want = torch.where(mask.cpu().unsqueeze(-1), ref.frame_noise(B, T, D, 0.3, 2**64 - 5, "cpu"), x.cpu())
    if backend == "reference":
        assert torch.equal(out.cpu(), want)
    else:
        _assert_noise_close(out.cpu(), want, 0.3, torch.float32)
    assert not torch.equal(out, am(x, mask, 0.3, seed=5, backend=backend))
    assert not torch.equal(out, am(x, mask, 0.3, seed=2**63 - 5, backend=backend))


@pytest.mark.parametrize("backend", SEED_BACKENDS)
def test_seed_none_is_a_device_draw_of_torchs_generator(backend):
    dev = _device(backend)
    x, mask, emb = _inputs((2, 9, 13), torch.float32, device=dev)
    torch.manual_seed(123)
    a = am(x, mask, 0.3, backend=backend)
    fresh = am(x, mask, 0.3, backend=backend)
    torch.manual_seed(123)
    b = am(x, mask, 0.3, backend=backend)
    torch.manual_seed(123)
    drawn = torch.randint(0, 2**63 - 1, (), device=dev)
    c = am(x, mask, 0.3, seed=drawn, backend=backend)
    assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(a), _bits(c))
    assert not torch.equal(fresh, a)  # the generator moved on
    torch.manual_seed(123)
    am(x, mask, emb, backend=backend)  # a tensor fill draws no seed
    assert torch.equal(torch.randint(0, 2**63 - 1, (), device=dev), drawn)


@pytest.mark.parametrize("backend", SEED_BACKENDS)
def test_derived_seed_tensors_match_derived_ints(backend):
    dev = _device(backend)
    x, mask, _ = _inputs((2, 9, 13), torch.float32, device=dev)
    base = 2**40 + 9

    def t(v):
        return torch.tensor(v, device=dev)

    outs = []
    for rank, step in ((0, 0), (3, 7), (1, 2**33 + 5)):
        want = am(x, mask, 0.3, seed=sr.derive_seed(base, rank=rank, step=step), backend=backend)
        for seed in (sr.derive_seed(base, rank=rank, step=t(step)), sr.derive_seed(t(base), rank=t(rank), step=step)):
            assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.device == dev
            assert torch.equal(_bits(am(x, mask, 0.3, seed=seed, backend=backend)), _bits(want)), (rank, step)
        outs.append(want)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


@pytest.mark.cpu
def test_bad_seed_tensors_raise():
    x = torch.zeros(2, 5, 4)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="int64"):
        am(x, m, 0.1, seed=torch.tensor(1.0))
    with pytest.raises(TypeError, match="int64"):
        am(x, m, 0.1, seed=torch.tensor(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="one value"):
        am(x, m, 0.1, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="seed tensor is on meta"):
        am(x, m, 0.1, seed=torch.tensor(1, device="meta"))
    with pytest.raises(TypeError, match="seed"):
        am(x, m, 0.1, seed=True)
    # An embedding fill draws nothing, but a bad seed is still an error (as for gumbel eval).
    emb = torch.ones(4)
    for bad, err in (("bad", TypeError), (-1, ValueError), (torch.tensor(5, dtype=torch.int32), TypeError)):
        with pytest.raises(err, match="seed"):
            am(x, m, emb, seed=bad)
    assert torch.equal(am(x, m, emb, seed=torch.tensor(5)), am(x, m, emb))


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph_seed_tensor_and_none(backend):
    """A seed tensor or seed=None compiles with fullgraph=True (no graph break) into a graph
    that reads no tensor on the host (tests/_compile.py); the compiled calls match eager bit
    for bit."""
    x, mask, _ = _inputs((2, 9, 6), torch.float32)

    def f(x, seed):
        y = x.clone()
        am(y, mask, 0.2, inplace=True, seed=seed, backend=backend)
        return am(x, mask, 0.2, seed=seed, backend=backend), y

    compiled = torch.compile(f, fullgraph=True, backend=aot_eager_no_host_reads)
    for s in (3, 2**40 + 7):
        got = compiled(x, torch.tensor(s))  # one graph: the seed is an input, not a constant
        want = am(x, mask, 0.2, seed=s, backend=backend)
        assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert not torch.equal(compiled(x, torch.tensor(3))[0], compiled(x, torch.tensor(4))[0])

    def g(x):
        return am(x, mask, 0.2, backend=backend) + 0.0

    compiled_g = torch.compile(g, fullgraph=True, backend=aot_eager_no_host_reads)
    torch.manual_seed(5)
    got = compiled_g(x)
    torch.manual_seed(5)
    assert torch.equal(got, g(x))
    assert not torch.equal(compiled_g(x), got)  # a fresh draw per call

    xr = x.clone().requires_grad_()  # autograd: the custom op's seed tensor argument
    grad = torch.randn(x.shape)
    out = torch.compile(lambda a, s: am(a, mask, 0.2, seed=s, backend=backend), fullgraph=True,
                        backend=aot_eager_no_host_reads)(xr, torch.tensor(3))
    (out * grad).sum().backward()
    assert torch.equal(out.detach(), am(x, mask, 0.2, seed=3, backend=backend))
    assert torch.equal(xr.grad, torch.where(mask.unsqueeze(-1), 0.0, grad))


# ---------------------------------------------------------------- gpu tier

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends(backend, dtype):
    shape = (16, 781, 320)
    x, mask, emb = _inputs(shape, dtype, p=0.5, device="cuda")
    assert torch.equal(am(x, mask, emb, backend=backend), am(x, mask, emb, backend="reference"))
    _assert_noise_close(am(x, mask, 0.1, seed=5, backend=backend), am(x, mask, 0.1, seed=5, backend="reference"),
                        0.1, dtype)
    grad = torch.randn(shape, device="cuda").to(dtype)
    xr, er = x.clone().requires_grad_(), emb.clone().requires_grad_()
    (am(xr, mask, er, backend=backend) * grad).sum().backward()
    gx64, ge64 = _fp64_grads(x, mask, emb, grad)
    assert torch.equal(xr.grad.double(), gx64)
    e_ref = emb.clone().requires_grad_()
    (am(x, mask, e_ref, backend="reference") * grad).sum().backward()
    assert_error_rule(er.grad, e_ref.grad, ge64.cpu(), f"{backend} {dtype} grad of the fill")
    e2 = emb.clone().requires_grad_()
    (am(x, mask, e2, backend=backend) * grad).sum().backward()
    assert torch.equal(e2.grad, er.grad)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    x, mask, emb = _inputs((4, 781, 768), torch.float32, device="cuda")
    out = am(x, mask, 0.1, seed=1, backend=backend)  # warm-up (Triton compiles here)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = am(x, mask, 0.1, seed=1, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_replays_draw_fresh_noise(backend):
    """Captured once, replayed 3 times: (a) seed=None draws a new key at every replay (torch's
    graph-safe generator); (b) seed=derive_seed(base, step=step) with step.add_(1) captured
    gives replay k the key derive_seed(base, step=k): equal to eager calls with that int."""
    x, mask, _ = _inputs((4, 781, 768), torch.float32, device="cuda")
    base = 2**40 + 11
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def draw_none():
        return am(x, mask, 0.1, backend=backend)

    def draw_step():
        step.add_(1)
        return am(x, mask, 0.1, seed=sr.derive_seed(base, step=step), backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (Triton compiles here)
        draw_none()
        draw_step()
    torch.cuda.current_stream().wait_stream(side)
    step.zero_()
    replays = {}
    for name, fn in (("none", draw_none), ("step", draw_step)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = fn()
        replays[name] = []
        for _ in range(3):
            graph.replay()
            replays[name].append(static.clone())
    torch.cuda.synchronize()
    assert int(step) == 3
    for name, outs in replays.items():
        for i in range(3):
            assert torch.equal(outs[i][~mask], x[~mask])
            for j in range(i):
                assert not torch.equal(outs[i][mask], outs[j][mask]), (name, i, j)
    for k, got in enumerate(replays["step"], start=1):
        assert torch.equal(got, am(x, mask, 0.1, seed=sr.derive_seed(base, step=k), backend=backend)), k
