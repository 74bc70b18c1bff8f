"""The Philox stream: the PyTorch, C++ and Triton implementations agree bit for bit, and
match an independent plain-Python Philox4x32-10 written from the published algorithm."""
import pytest
import torch

from sslfast import random as sr
from sslfast import _ext

M32 = 0xFFFFFFFF

try:
    import triton
    import triton.language as tl
except ImportError:  # the interpreter tier is skipped without triton
    triton = None
else:
    from sslfast.kernels import philox as kp

if triton is not None:

    @triton.jit
    def _philox_fill_kernel(out_ptr, u_ptr, n, start, row, stream, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        w0, w1, w2, w3 = kp.philox4x32(seed, (start + offs).to(tl.uint32), row + offs * 0, stream + offs * 0, offs * 0)
        tl.store(out_ptr + 4 * offs + 0, w0.to(tl.int64), mask=valid)
        tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int64), mask=valid)
        tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int64), mask=valid)
        tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int64), mask=valid)
        tl.store(u_ptr + offs, kp.uint_to_uniform(w0), mask=valid)


    @triton.jit
    def _randint4x_kernel(out_ptr, seed, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        w0, w1, w2, w3 = tl.randint4x(seed, offs)
        tl.store(out_ptr + offs, w0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + BLOCK + offs, w3.to(tl.int64) & 0xFFFFFFFF)



def philox_plain(c, key):
    """Philox4x32-10 (Salmon et al. 2011), scalar Python ints."""
    c0, c1, c2, c3 = c
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def test_known_answer_vectors():
    # Known-answer vectors of Random123 (kat_vectors) for philox4x32 with 10 rounds.
    assert philox_plain((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox_plain((M32,) * 4, (M32, M32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    c = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert philox_plain(c, (0xA4093822, 0x299F31D0)) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 1, 0x299F31D0A4093822, 2**63 - 1])
def test_torch_philox_matches_plain(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    c = torch.randint(0, 2**32, (4, 64), generator=g, dtype=torch.int64)
    out = torch.stack(sr.philox4x32(c[0], c[1], c[2], c[3], seed))
    key = (seed & M32, seed >> 32)
    for j in range(64):
        assert tuple(int(v) for v in out[:, j]) == philox_plain(tuple(int(v) for v in c[:, j]), key)


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 12345, 0x299F31D0A4093822])
def test_cpu_extension_matches_torch(seed):
    n, start, row, stream = 257, 2**32 - 100, 7, int(sr.Stream.NEGATIVES)
    out = torch.empty(n, 4, dtype=torch.int64)
    _ext.cpu_module().philox_fill(out.data_ptr(), n, start, row, stream, seed)
    c0 = (torch.arange(n, dtype=torch.int64) + start) & M32
    ref = torch.stack(sr.philox4x32(c0, row, stream, 0, seed), dim=1)
    assert torch.equal(out, ref)
    u = torch.empty(n * 4, dtype=torch.float32)
    _ext.cpu_module().uniform_fill(out.data_ptr(), u.data_ptr(), n * 4)
    assert torch.equal(u, sr.uint_to_uniform(ref.reshape(-1)))


@pytest.mark.cpu
def test_uniform_range_and_edges():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = sr.uint_to_uniform(words)
    assert u.dtype == torch.float32
    assert u[0] == 0.0 and u[-1] == 0.0  # 0 and ~(-1) both map to 0: why logs need clamping
    assert bool((u >= 0).all()) and bool((u < 1).all())
    lo = 1e-6
    v = sr.uint_to_open_uniform(words, lo)
    assert bool((v >= lo).all()) and bool((v <= 1 - lo).all())


@pytest.mark.cpu
def test_uniform_moments():
    c0 = torch.arange(200_000, dtype=torch.int64)
    u = sr.uint_to_uniform(sr.philox4x32(c0, 0, 3, 0, seed=2024)[0]).double()
    # mean 1/2 and variance 1/12 within 5 standard errors
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12) ** 0.5 / len(u) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180) ** 0.5 / len(u) ** 0.5


@pytest.mark.cpu
def test_uint_below_range():
    x = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    for n in (1, 7, 781, 2**31 - 1):
        v = sr.uint_below(x, n)
        assert bool((v >= 0).all()) and bool((v < n).all())


@pytest.mark.cpu
def test_seed_resolution_and_derivation():
    torch.manual_seed(0)
    a = sr.resolve_seed(None)
    torch.manual_seed(0)
    assert sr.resolve_seed(None) == a
    assert sr.resolve_seed(5) == 5
    with pytest.raises(ValueError, match="seed"):
        sr.resolve_seed(-1)
    with pytest.raises(TypeError, match="seed"):
        sr.resolve_seed(1.5)
    seeds = {sr.derive_seed(42, rank=r, step=s) for r in range(8) for s in range(50)}
    assert len(seeds) == 400
    assert sr.derive_seed(42, rank=1, step=3) == sr.derive_seed(42, rank=1, step=3)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [0, 987654321, 0x299F31D0A4093822])
def test_triton_philox_matches_torch(seed, triton_device):
    n, start, row, stream = 300, 5, 11, int(sr.Stream.GUMBEL)
    out = torch.full((n, 4), -1, dtype=torch.int64, device=triton_device)
    u = torch.full((n,), -1.0, device=triton_device)
    _philox_fill_kernel[(triton.cdiv(n, 128),)](out, u, n, start, row, stream, seed, BLOCK=128)
    c0 = torch.arange(n, dtype=torch.int64) + start
    ref = torch.stack(sr.philox4x32(c0, row, stream, 0, seed), dim=1)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(u.cpu(), sr.uint_to_uniform(ref[:, 0]))


@pytest.mark.interpreter
def test_triton_philox_equals_tl_randint4x(triton_device):
    """Independent check: with c1 = c2 = c3 = 0 our stream is Triton's own tl.randint4x."""
    seed = 0x1234_5678_9ABC
    out = torch.empty(2 * 64, dtype=torch.int64, device=triton_device)
    _randint4x_kernel[(1,)](out, seed, BLOCK=64)
    c0 = torch.arange(64, dtype=torch.int64)
    w = sr.philox4x32(c0, 0, 0, 0, seed)
    assert torch.equal(out.cpu()[:64], w[0]) and torch.equal(out.cpu()[64:], w[3])


@pytest.mark.gpu
def test_cuda_philox_matches_torch():
    n, start, row, stream, seed = 4099, 17, 3, int(sr.Stream.NEGATIVES), 0xDEADBEEF12
    out = torch.empty(n, 4, dtype=torch.int64, device="cuda")
    _ext.cuda_module().philox_fill(out.data_ptr(), n, start, row, stream, seed, _ext.stream(out.device))
    c0 = torch.arange(n, dtype=torch.int64) + start
    ref = torch.stack(sr.philox4x32(c0, row, stream, 0, seed), dim=1)
    assert torch.equal(out.cpu(), ref)


# ----------------------------------------------------------------------------- seed tensors

def _key_words(seed: int) -> tuple[int, int]:
    seed &= 2**64 - 1
    return seed & M32, seed >> 32


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 5, 2**32 + 3, 0x299F31D0A4093822, sr.MAX_SEED, -5, -(2**63)])
def test_tensor_seed_is_the_same_key(seed):
    """A 0-d int64 seed tensor keys Philox with its 64 bits (negative: two's complement)."""
    c0 = torch.tensor([0, 1, 77, 2**32 - 1], dtype=torch.int64)
    got = torch.stack(sr.philox4x32(c0, 9, int(sr.Stream.GUMBEL), 0, torch.tensor(seed)), dim=1)
    want = torch.tensor([philox_plain((int(c), 9, int(sr.Stream.GUMBEL), 0), _key_words(seed)) for c in c0])
    assert torch.equal(got, want)
    if seed >= 0:
        assert torch.equal(torch.stack(sr.philox4x32(c0, 9, int(sr.Stream.GUMBEL), 0, seed), dim=1), want)


@pytest.mark.cpu
def test_derive_seed_with_tensors_equals_the_int_derivation():
    for base in (0, 42, 0x299F31D0A4093822):
        for rank, step in ((0, 0), (3, 7), (1, 2**32 + 5), (65535, 2**40)):
            want = sr.derive_seed(base, rank=rank, step=step)
            for kw in ({"rank": torch.tensor(rank)}, {"step": torch.tensor(step)},
                       {"rank": torch.tensor(rank), "step": torch.tensor(step)}):
                args = {"rank": rank, "step": step, **kw}
                got = sr.derive_seed(base, **args)
                assert isinstance(got, torch.Tensor) and got.dtype == torch.int64 and got.dim() == 0
                assert int(got) == want
            assert int(sr.derive_seed(torch.tensor(base), rank=rank, step=step)) == want
    with pytest.raises(ValueError, match="one-element int64"):
        sr.derive_seed(1, step=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="rank"):
        sr.derive_seed(torch.tensor(1), rank=-1)
    # Out-of-range counters would alias other (rank, step) pairs; wrong types are TypeErrors.
    for kw in ({"rank": 2**32}, {"step": 2**64}, {"rank": -1}, {"step": -1}):
        with pytest.raises(ValueError, match="must be in"):
            sr.derive_seed(5, **kw)
    assert sr.derive_seed(5, rank=2**32 - 1, step=2**64 - 1) != sr.derive_seed(5)
    for kw in ({"rank": True}, {"step": 3.0}, {"rank": "1"}):
        with pytest.raises(TypeError, match="int"):
            sr.derive_seed(5, **kw)
    with pytest.raises(TypeError, match="int64"):
        sr.derive_seed(torch.tensor(5, dtype=torch.int32))
    with pytest.raises(TypeError, match="int64"):
        sr.derive_seed(5, step=torch.tensor(1.0))


@pytest.mark.cpu
def test_resolve_seed_tensors_and_device_draws():
    t = torch.tensor([123], dtype=torch.int64)
    assert sr.resolve_seed(t, device="cpu").shape == () and int(sr.resolve_seed(t)) == 123
    with pytest.raises(TypeError, match="int64"):
        sr.resolve_seed(torch.tensor(1.0))
    with pytest.raises(TypeError, match="int64"):
        sr.resolve_seed(torch.tensor(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="one value"):
        sr.resolve_seed(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="meta"):
        sr.resolve_seed(torch.tensor(1), device="meta")
    # None with a device: a tensor drawn by torch.randint from that device's generator.
    torch.manual_seed(7)
    a = sr.resolve_seed(None, device="cpu")
    torch.manual_seed(7)
    b = torch.randint(0, sr.MAX_SEED, (), dtype=torch.int64)
    assert isinstance(a, torch.Tensor) and a.device.type == "cpu" and int(a) == int(b)
    # None without a device (host code): the same draw as a Python int.
    torch.manual_seed(7)
    assert sr.resolve_seed(None) == int(b)
    assert sr.seed_value(torch.tensor(-1)) == 2**64 - 1 and sr.seed_value(5) == 5
    assert sr.seed_args(5) == (5, 0) and sr.seed_args(t) == (0, t.data_ptr())
    assert sr.split_seed(5) == (5, None) and sr.join_seed(*sr.split_seed(t)) is t


@pytest.mark.cpu
def test_device_seed_compiles_without_graph_break():
    """seed=None and a step tensor inside torch.compile(fullgraph=True): no .item(), no break."""
    c0 = torch.arange(64, dtype=torch.int64)

    def draw(step):
        key = sr.derive_seed(sr.resolve_seed(None, device=step.device), rank=1, step=step)
        return sr.philox4x32(c0, 0, int(sr.Stream.MASK_START), 0, key)[0], key

    # Inductor draws torch.randint with its own RNG unless fallback_random is set (torch's rule
    # for every random op); with it the compiled key is the eager one.
    compiled = torch.compile(draw, fullgraph=True)
    step = torch.tensor(3)
    torch.manual_seed(11)
    with torch._inductor.config.patch(fallback_random=True):
        got, key = compiled(step)
    torch.manual_seed(11)
    want, want_key = draw(step)
    assert int(key) == int(want_key) and torch.equal(got, want)
    with torch._inductor.config.patch(fallback_random=True):
        got2, key2 = compiled(step + 1)
    assert int(key2) != int(key) and not torch.equal(got2, got)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [0, 0x299F31D0A4093822, -5])
def test_triton_load_seed_reads_the_key_on_the_device(seed, triton_device):
    n = 64
    out = torch.full((n, 4), -1, dtype=torch.int64, device=triton_device)
    key = torch.tensor(seed, device=triton_device)
    _seed_ptr_fill_kernel[(1,)](out, key, BLOCK=n)
    c0 = torch.arange(n, dtype=torch.int64)
    want = torch.tensor([philox_plain((int(c), 2, int(sr.Stream.NEGATIVES), 0), _key_words(seed)) for c in c0])
    assert torch.equal(out.cpu(), want)
    if seed >= 0:  # sr.seed_tensor turns an int into the same key
        out2 = torch.full_like(out, -1)
        _seed_ptr_fill_kernel[(1,)](out2, sr.seed_tensor(seed, out.device), BLOCK=n)
        assert torch.equal(out2, out)


if triton is not None:

    @triton.jit
    def _seed_ptr_fill_kernel(out_ptr, seed_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        seed = kp.load_seed(seed_ptr)
        w0, w1, w2, w3 = kp.philox4x32(seed, offs, offs * 0 + 2, offs * 0 + 16, offs * 0)
        tl.store(out_ptr + 4 * offs + 0, w0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int64) & 0xFFFFFFFF)
