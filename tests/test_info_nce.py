"""In-batch InfoNCE / NT-Xent: the reference against independent fp64 formulas and Hugging
Face's CLIP loss, every kernel backend against them (loss, input gradients, temperature
gradient), edge and hostile inputs, validation, memory O(N * D), distributed (gloo, 2 ranks)."""
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F

import sslfast
from _tolerance import assert_error_rule
from sslfast import _dispatch
from sslfast.reference import info_nce as ref

# ----------------------------------------------------------------------------- independent formulas


def formula_info_nce(q, k, temperature, *, queue=None, symmetric=False, normalize=True, reduction="mean"):
    """InfoNCE written from the definition with F.cross_entropy (not the reference's code)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(dt), k.to(dt)
    if normalize:
        q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    cols = k
    if queue is not None:
        qu = queue.to(dt).detach()
        cols = torch.cat([k, qu / qu.norm(dim=1, keepdim=True) if normalize else qu])
    target = torch.arange(q.shape[0])
    loss = F.cross_entropy(q @ cols.T / temperature, target, reduction="none")
    if symmetric:
        loss = (loss + F.cross_entropy(k @ q.T / temperature, target, reduction="none")) / 2
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def formula_nt_xent(z1, z2, temperature):
    """SimCLR's loss the textbook way: drop the diagonal, then the positive is column N - 1
    for the first views and column N for the second (after the removed self column)."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    sim = z @ z.T / temperature
    off = sim[~torch.eye(n2, dtype=torch.bool)].reshape(n2, n2 - 1)
    target = torch.cat([torch.arange(n, n2) - 1, torch.arange(0, n)])
    return F.cross_entropy(off, target)


def _lowp_ce(qn, kn, temperature):
    """Cross-entropy of logits whose products were taken in the inputs' dtype: the error of
    plain PyTorch in that dtype, which the kernels may exceed by at most 2x (op-contract)."""
    logits = (qn @ kn.T).float() / temperature
    return F.cross_entropy(logits, torch.arange(qn.shape[0], device=qn.device))


def make(n, d, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)


KERNEL_BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.cpu),
    pytest.param("triton", marks=pytest.mark.interpreter),
]

# ----------------------------------------------------------------------------- reference = spec


@pytest.mark.cpu
@pytest.mark.parametrize("n,d,nq", [(1, 1, 0), (2, 3, 0), (7, 5, 3), (31, 17, 0), (13, 29, 11)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_fp64_formula(n, d, nq, symmetric, reduction):
    q, k = make(n, d, 1), make(n, d, 2)
    queue = make(nq, d, 3) if nq else None
    got = ref.info_nce(q, k, temperature=0.2, queue=queue, symmetric=symmetric, reduction=reduction)
    want = formula_info_nce(q, k, 0.2, queue=queue, symmetric=symmetric, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.cpu
@pytest.mark.parametrize("n,d", [(1, 2), (5, 3), (23, 11)])
def test_reference_nt_xent_matches_textbook(n, d):
    z1, z2 = make(n, d, 4), make(n, d, 5)
    torch.testing.assert_close(ref.nt_xent(z1, z2, 0.5), formula_nt_xent(z1, z2, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.cpu
def test_reference_matches_hugging_face_clip_loss():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    text, image = make(19, 8, 6), make(19, 8, 7)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64).exp()
    tn, im = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
    hf = image_text_contrastive_loss(logit_scale * tn @ im.T)  # HF's logits_per_text
    ours = ref.info_nce(text, image, temperature=1 / logit_scale, symmetric=True)
    torch.testing.assert_close(ours, hf, rtol=1e-12, atol=1e-12)


@pytest.mark.cpu
def test_reference_gradcheck_fp64():
    q = make(5, 4, 8).requires_grad_()
    k = make(5, 4, 9).requires_grad_()
    queue = make(3, 4, 10)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for symmetric in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, tt: ref.info_nce(a, b, temperature=tt, queue=queue, symmetric=symmetric), (q, k, t))
    z1, z2 = make(4, 3, 11).requires_grad_(), make(4, 3, 12).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, tt: ref.nt_xent(a, b, tt), (z1, z2, t))


# ----------------------------------------------------------------------------- kernels vs fp64

# triton (130, 150): the GPU tiles (kernels/info_nce.py _config, the same on every device)
# over 3 row and column tiles of 64 (the fp32 backward: 5 tiles of 32 on the other side),
# 3 chunks of D of 64 (fp32: 10 of 16) and 2 gradient column tiles of 128 (fp32).
PARITY_SHAPES = {"cpu": [(1, 3), (67, 37), (130, 70)], "triton": [(5, 3), (37, 23), (130, 150)]}


def _check_rule(got, ref_run, want, what):
    """The error rule (tests/_tolerance.py) on (loss, input grads, temperature grad): ``got``
    and ``ref_run`` from _run (kernel and reference backend in the same dtype), ``want`` the
    fp64 formula's. The loss and the temperature's gradient are fp32; input grads keep the
    inputs' dtype."""
    assert_error_rule(got[0], ref_run[0], want[0], f"{what} loss", out_dtype=torch.float32)
    for i, (g, r, w) in enumerate(zip(got[1], ref_run[1], want[1])):
        assert g.dtype == r.dtype
        assert_error_rule(g, r, w, f"{what} grad {i}")
    assert_error_rule(got[2], ref_run[2], want[2], f"{what} temperature grad", out_dtype=torch.float32)


def _run(fn, backend, dtype, *tensors, temperature=0.1, **kw):
    xs = [t.to(dtype).requires_grad_() for t in tensors]
    tt = torch.tensor(temperature, requires_grad=True)
    loss = fn(*xs, temperature=tt, backend=backend, **kw)
    loss.backward()
    return loss.detach(), [x.grad for x in xs], tt.grad


def _fp64(fn, *tensors, temperature=0.1, **kw):
    xs = [t.clone().requires_grad_() for t in tensors]
    tt = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    loss = fn(*xs, temperature=tt, **kw)
    loss.backward()
    return loss.detach(), [x.grad for x in xs], tt.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_kernel_fp32_matches_fp64(backend, symmetric):
    # cpu, n=1 d=3 with an 11-row queue failed here while the kernels saved lse = max + log l as
    # one fp32: its rounding (up to ulp(lse) / 2) entered every probability the backward
    # recomputes (key gradient 2.45e-6 off against the reference's 3.3e-7, temperature gradient
    # 3.7e-5 against 5.3e-6). The two parts are saved apart now (csrc/info_nce.h).
    for n, d in PARITY_SHAPES[backend]:
        q, k = make(n, d, 20 + n), make(n, d, 30 + n)
        queue = make(11, d, 40, torch.float32).double() if not symmetric else None
        kw = dict(symmetric=symmetric, queue=None if queue is None else queue.float())
        got = _run(sslfast.info_nce, backend, torch.float32, q, k, **kw)
        low = _run(sslfast.info_nce, "reference", torch.float32, q, k, **kw)
        want = _fp64(lambda a, b, **kw: formula_info_nce(a, b, kw.pop("temperature"), **kw), q, k,
                     queue=queue, symmetric=symmetric)
        assert got[0].dtype == torch.float32
        _check_rule(got, low, want, f"{backend} n={n} d={d}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_nt_xent_matches_textbook(backend):
    n, d = (41, 19) if backend == "cpu" else (11, 7)  # 2N = 82 crosses the CPU's 64-row tile
    z1, z2 = make(n, d, 50), make(n, d, 51)
    got = _run(lambda a, b, **kw: sslfast.nt_xent(a, b, **kw), backend, torch.float32, z1, z2)
    low = _run(lambda a, b, **kw: sslfast.nt_xent(a, b, **kw), "reference", torch.float32, z1, z2)
    want = _fp64(lambda a, b, temperature: formula_nt_xent(a, b, temperature), z1, z2)
    _check_rule(got, low, want, f"{backend} nt_xent")


def _lowp_case(backend, dtype):
    n, d = (67, 37) if backend == "cpu" else (37, 23)
    q, k = make(n, d, 60), make(n, d, 61)
    exact = formula_info_nce(q, k, 0.1)
    got = sslfast.info_nce(q.to(dtype), k.to(dtype), temperature=0.1, backend=backend).double()
    # The reference's own error in this dtype: the same formula on inputs rounded to dtype
    # and normalised vectors rounded to dtype, products in dtype.
    peer = _lowp_ce(F.normalize(q.to(dtype).double(), dim=1).to(dtype),
                    F.normalize(k.to(dtype).double(), dim=1).to(dtype), 0.1).double()
    return got, peer, exact


@pytest.mark.parametrize("backend,dtype", [
    pytest.param("cpu", torch.float16, marks=pytest.mark.cpu),
    pytest.param("cpu", torch.bfloat16, marks=pytest.mark.cpu),
    pytest.param("triton", torch.float16, marks=pytest.mark.interpreter),
])
def test_kernel_low_precision_error_at_most_twice_pytorch(backend, dtype):
    got, peer, exact = _lowp_case(backend, dtype)
    assert_error_rule(got, peer, exact, f"{backend} {dtype} loss", out_dtype=torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_low_precision_gradients(backend):
    n, d = (67, 37) if backend == "cpu" else (21, 16)
    q, k = make(n, d, 62), make(n, d, 63)
    want = _fp64(lambda a, b, **kw: formula_info_nce(a, b, kw.pop("temperature")), q, k)
    got = _run(sslfast.info_nce, backend, torch.float16, q, k)
    low = _run(sslfast.info_nce, "reference", torch.float16, q, k)  # the reference's own fp16 error
    for i, (g, r, w) in enumerate(zip(got[1], low[1], want[1])):
        assert g.dtype == torch.float16
        assert_error_rule(g, r, w, f"{backend} fp16 grad {i}")


@pytest.mark.cpu
def test_cpu_kernel_matches_reference_with_queue_and_noncontiguous():
    q = make(70, 90, 70, torch.float32)[:, ::2]  # non-contiguous (70, 45)
    k = make(45, 70, 71, torch.float32).T  # non-contiguous (70, 45)
    queue = make(200, 45, 72, torch.float32)
    got = sslfast.info_nce(q, k, queue=queue, reduction="none", backend="cpu")
    low = sslfast.info_nce(q, k, queue=queue, reduction="none", backend="reference")
    want = formula_info_nce(q.double(), k.double(), 0.07, queue=queue.double(), reduction="none")
    assert_error_rule(got, low, want, "cpu per-row losses, non-contiguous with a queue")


@pytest.mark.cpu
def test_cpu_backward_is_deterministic():
    q, k = make(150, 33, 73, torch.float32), make(150, 33, 74, torch.float32)
    runs = [_run(sslfast.info_nce, "cpu", torch.float32, q, k, symmetric=True)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- edge and hostile inputs


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.cpu), *KERNEL_BACKENDS])
def test_edge_inputs(backend):
    # An empty batch: 0 (not NaN) with a gradient of zeros.
    q = torch.zeros(0, 8, requires_grad=True)
    loss = sslfast.info_nce(q, torch.zeros(0, 8), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and q.grad.shape == (0, 8)
    assert sslfast.info_nce(q, torch.zeros(0, 8), reduction="none", backend=backend).shape == (0,)
    # Zero vectors: normalised to zero, every logit 0, loss log(N) exactly.
    z = torch.zeros(5, 4)
    torch.testing.assert_close(sslfast.info_nce(z, z, backend=backend), torch.tensor(math.log(5)))
    # Identical rows everywhere: the same, log(N).
    same = torch.ones(6, 3)
    torch.testing.assert_close(sslfast.info_nce(same, same, backend=backend), torch.tensor(math.log(6)),
                               rtol=1e-5, atol=1e-5)
    # Huge and tiny norms normalise to unit rows (F.normalize would give zeros for 1e30).
    base = make(6, 5, 80, torch.float32)
    want = formula_info_nce(base.double(), base.double().flip(0), 0.1)
    for s in (1e30, 1e-30):
        got = sslfast.info_nce(base * s, base.flip(0) * s, temperature=0.1, backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # A very low temperature (logits up to +-1000) stays finite and exact.
    q, k = make(9, 4, 81, torch.float32), make(9, 4, 82, torch.float32)
    got = sslfast.info_nce(q, k, temperature=1e-3, backend=backend)
    torch.testing.assert_close(got.double(), formula_info_nce(q.double(), k.double(), 1e-3), rtol=1e-5, atol=1e-3)
    # fp16 inputs near fp16's max: normalisation happens in fp32.
    h = (make(4, 3, 83) * 3e4).clamp(-6e4, 6e4).half()
    got = sslfast.info_nce(h, h, backend=backend)
    assert torch.isfinite(got)
    # Unnormalised inputs: the dot products are taken as given.
    got = sslfast.info_nce(q, k, normalize=False, temperature=0.5, backend=backend)
    torch.testing.assert_close(got.double(), formula_info_nce(q.double(), k.double(), 0.5, normalize=False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
def test_one_row_nt_xent_and_single_pair():
    z1, z2 = make(1, 4, 84, torch.float32), make(1, 4, 85, torch.float32)
    for backend in ("reference", "cpu"):
        assert sslfast.nt_xent(z1, z2, backend=backend).item() == pytest.approx(0.0, abs=1e-6)  # one candidate
        assert sslfast.info_nce(z1, z2, backend=backend).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.cpu
def test_validation_errors():
    q = torch.randn(4, 3)
    with pytest.raises(TypeError, match="query"):
        sslfast.info_nce(q.long(), q)
    with pytest.raises(TypeError, match="query"):
        sslfast.info_nce(q.numpy(), q)
    with pytest.raises(ValueError, match="key must have the shape"):
        sslfast.info_nce(q, torch.randn(5, 3))
    with pytest.raises(ValueError, match="query must have 2"):
        sslfast.info_nce(q[0], q[0])
    with pytest.raises(ValueError, match="feature column"):
        sslfast.info_nce(torch.randn(4, 0), torch.randn(4, 0))
    with pytest.raises(ValueError, match="queue"):
        sslfast.info_nce(q, q, queue=torch.randn(7, 4))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sslfast.info_nce(q, q, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        sslfast.info_nce(q, q, temperature=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="temperature"):
        sslfast.info_nce(q, q, temperature=torch.ones(2))
    with pytest.raises(TypeError, match="temperature"):
        sslfast.info_nce(q, q, temperature="0.1")
    with pytest.raises(ValueError, match="reduction"):
        sslfast.info_nce(q, q, reduction="avg")
    with pytest.raises(TypeError, match="symmetric"):
        sslfast.info_nce(q, q, symmetric=1)
    with pytest.raises(ValueError, match="distributed"):
        sslfast.info_nce(q, q, distributed=True)
    with pytest.raises(ValueError, match="backend"):
        sslfast.info_nce(q, q, backend="tpu")
    with pytest.raises(_dispatch.BackendUnavailableError, match="cuda"):
        sslfast.info_nce(q, q, backend="cuda")
    with pytest.raises(ValueError, match="z2 must have the shape"):
        sslfast.nt_xent(q, torch.randn(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        sslfast.nt_xent(q, q, temperature=0)


# ----------------------------------------------------------------------------- memory O(N * D)


@pytest.mark.cpu
@pytest.mark.slow
def test_kernel_memory_is_linear_in_batch():
    from sslfast.bench.harness import peak_memory_mb

    n, d = 4096, 16
    q, k = make(n, d, 90, torch.float32), make(n, d, 91, torch.float32)

    def step(backend):
        def fn():
            a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
            sslfast.info_nce(a, b, symmetric=True, backend=backend).backward()
        return fn

    nn_mb = n * n * 4 / 1e6  # one fp32 N x N matrix: 67 MB
    kernel = peak_memory_mb(step("cpu"), torch.device("cpu"))
    reference = peak_memory_mb(step("reference"), torch.device("cpu"))
    assert reference > nn_mb  # the check can fail: the reference holds N x N logits
    assert kernel < 40 * n * d * 4 / 1e6  # a few (N, D) buffers, here under 11 MB
    assert kernel < nn_mb / 5


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.cpu
@pytest.mark.slow
def test_torch_compile_fullgraph():
    q, k = make(9, 5, 92, torch.float32), make(9, 5, 93, torch.float32)
    t = torch.tensor(0.2)

    def loss_fn(a, b, tt):
        return sslfast.info_nce(a, b, temperature=tt, symmetric=True, backend="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True)
    a, b, tt = (x.clone().requires_grad_() for x in (q, k, t))
    loss = compiled(a, b, tt)
    loss.backward()
    a2, b2, tt2 = (x.clone().requires_grad_() for x in (q, k, t))
    want = loss_fn(a2, b2, tt2)
    want.backward()
    torch.testing.assert_close(loss, want)
    for x, y in ((a, a2), (b, b2), (tt, tt2)):
        torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------- distributed (gloo)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, out_dir, q_all, k_all, t0):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = q_all.shape[0] // world
        results = {}
        for backend in ("reference", "cpu"):
            for symmetric in (False, True):
                q = q_all[rank * n:(rank + 1) * n].clone().requires_grad_()
                k = k_all[rank * n:(rank + 1) * n].clone().requires_grad_()
                t = t0.clone().requires_grad_()
                loss = sslfast.info_nce(q, k, temperature=t, symmetric=symmetric, distributed=True, backend=backend)
                loss.backward()
                results[(backend, symmetric)] = (loss.detach(), q.grad, k.grad, t.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.cpu
@pytest.mark.slow
def test_distributed_gloo_two_ranks_matches_single_process():
    world, n, d = 2, 5, 4
    q_all, k_all = make(world * n, d, 94, torch.float32), make(world * n, d, 95, torch.float32)
    t0 = torch.tensor(0.3)
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_dist_worker, args=(world, _free_port(), out, q_all, k_all, t0), nprocs=world)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    for symmetric in (False, True):
        q = q_all.double().requires_grad_()
        k = k_all.double().requires_grad_()
        t = t0.double().requires_grad_()
        single = formula_info_nce(q, k, t, symmetric=symmetric)
        single.backward()
        for backend in ("reference", "cpu"):
            res = [r[(backend, symmetric)] for r in ranks]
            # The mean of the ranks' local losses is the single-process mean.
            torch.testing.assert_close(sum(r[0] for r in res).double() / world, single.detach(), rtol=1e-5, atol=1e-6)
            # Each rank's gradients are world_size x the single-process ones (DDP averages).
            for r, (_, gq, gk, _) in enumerate(res):
                torch.testing.assert_close(gq.double(), world * q.grad[r * n:(r + 1) * n], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(gk.double(), world * k.grad[r * n:(r + 1) * n], rtol=1e-4, atol=1e-6)
            # The temperature is not gathered: the ranks' gradients sum to world x single.
            torch.testing.assert_close(sum(r[3] for r in res).double(), world * t.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- gpu tier


GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n,d,nq", [(1, 3, 0), (67, 37, 0), (257, 130, 61), (1031, 512, 0)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_fp32_matches_fp64(backend, n, d, nq, symmetric):
    q, k = make(n, d, 100).cuda(), make(n, d, 101).cuda()
    queue = make(nq, d, 102, torch.float32).cuda() if nq else None
    xs = [q.float().requires_grad_(), k.float().requires_grad_()]
    t = torch.tensor(0.1, device="cuda", requires_grad=True)
    loss = sslfast.info_nce(*xs, temperature=t, queue=queue, symmetric=symmetric, backend=backend)
    loss.backward()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    t2 = torch.tensor(0.1, dtype=torch.float64, device="cuda", requires_grad=True)
    want = formula_info_nce(q2.cpu(), k2.cpu(), t2.cpu(), queue=None if queue is None else queue.cpu(),
                            symmetric=symmetric)
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(xs[0].grad.double().cpu(), q2.grad.cpu(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(xs[1].grad.double().cpu(), k2.grad.cpu(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t.grad.double().cpu(), t2.grad.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision(backend, dtype):
    n, d = 1031, 256
    q, k = make(n, d, 103), make(n, d, 104)
    exact = formula_info_nce(q, k, 0.1)
    qn = F.normalize(q.to(dtype).double(), dim=1).to(dtype).cuda()
    kn = F.normalize(k.to(dtype).double(), dim=1).to(dtype).cuda()
    peer_err = (_lowp_ce(qn, kn, 0.1).double().cpu() - exact).abs().item()
    got = sslfast.info_nce(q.to(dtype).cuda(), k.to(dtype).cuda(), temperature=0.1, backend=backend)
    assert (got.double().cpu() - exact).abs().item() <= 2 * peer_err + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_gradients_at_large_batch(backend, dtype):
    # With a mean over 8k rows, g * softmax is ~1e-8: it must not underflow in fp16.
    n, d = 8191, 128
    q, k = make(n, d, 107).to(dtype), make(n, d, 108).to(dtype)
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_()
    formula_info_nce(q2, k2, 0.1).backward()
    a, b = q.cuda().requires_grad_(), k.cuda().requires_grad_()
    sslfast.info_nce(a, b, temperature=0.1, backend=backend).backward()
    for g, w in ((a.grad, q2.grad), (b.grad, k2.grad)):
        assert g.dtype == dtype
        assert (g.double().cpu() - w).abs().max() <= 2e-2 * w.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_nt_xent_and_memory(backend):
    z1, z2 = make(300, 64, 105), make(300, 64, 106)
    got = sslfast.nt_xent(z1.float().cuda(), z2.float().cuda(), backend=backend)
    torch.testing.assert_close(got.double().cpu(), formula_nt_xent(z1, z2, 0.5), rtol=2e-5, atol=2e-5)
    n, d = 16384, 512
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sslfast.info_nce(q, k, symmetric=True, backend=backend).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # One fp32 N x N is 1.07 GB (the reference holds several); the kernel path holds a few
    # (N, D) copies: inputs, normalised rows, fp32 gradients.
    assert peak < n * n * 4 / 2
