"""Benchmark cases of in-batch InfoNCE: CLIP-style symmetric InfoNCE, forward + backward.

Shapes (issue 4): N in {4096, 16384, 65536} rows per device, D = 512; on the CPU N in
{4096, 16384}: there one fwd+bwd call of the C++ kernel at N = 16384 takes minutes (about
200 s on the shared 2-core machine), so run it with ``--warmup 0 --reps 1``; 65536 is left
out on CPU. quick: N = 512, D = 64. Inputs are
bf16 on GPU (CLIP's training dtype), fp32 on CPU. Providers: every sslfast kernel backend
usable on the device, the reference (builds the N x N logits), Hugging Face's
``image_text_contrastive_loss`` on the logits (CLIP), and ``torch.compile(reference)``;
nt_xent (no library peer) has "eager", the loss as SimCLR loops write it (``simclr_eager``).
"""
from __future__ import annotations

import torch

from .. import _dispatch
from ..ops.info_nce import info_nce, nt_xent
from ..reference import info_nce as ref
from .harness import Case, Unavailable

TEMPERATURE = 0.07


def _inputs(n, d, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    k = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return q, k


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _check_nn_memory(n, device):
    """The eager providers hold several fp32 N x N matrices (logits, softmax, their grads,
    one per direction): say so instead of running out of memory mid-benchmark."""
    need = 6 * n * n * 4
    free = _free_bytes(device)
    if need > free:
        raise Unavailable(f"needs about {need / 1e9:.0f} GB for its N x N logits, {free / 1e9:.0f} GB free")


def _step(loss_fn, q, k):
    def run():
        q.grad = k.grad = None
        loss_fn(q, k).backward()

    return run


def _backend(name, n, d, device, dtype, op=None):
    def factory():
        reason = name and _dispatch.backend_unavailable_reason(name, device)  # None: sslfast's choice
        if reason:
            raise Unavailable(reason)
        if name == "triton" and device.type == "cpu":
            raise Unavailable("Triton runs on CPU tensors only in the interpreter: far too slow for these shapes")
        q, k = _inputs(n, d, device, dtype)
        if op is not None:
            return _step(lambda a, b: op(a, b, backend=name), q, k)
        return _step(lambda a, b: info_nce(a, b, temperature=TEMPERATURE, symmetric=True, backend=name), q, k)

    return factory


def simclr_eager(z1, z2, temperature):
    """NT-Xent as SimCLR training loops write it: normalise, one (2N, 2N) similarity matrix,
    the diagonal masked out, cross-entropy against the other view."""
    n = z1.shape[0]
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return torch.nn.functional.cross_entropy(sim, target)


def _nt_xent_cases(device, quick, dtype):
    """SimCLR: B images, two views each (2B rows), D = 128 projection, temperature 0.5."""
    n, d = (256, 64) if quick else ((4096, 128) if device.type == "cuda" else (1024, 128))

    def reference_factory():
        _check_nn_memory(2 * n, device)
        q, k = _inputs(n, d, device, dtype)
        return _step(lambda a, b: ref.nt_xent(a, b, 0.5), q, k)

    def compile_factory():
        _check_nn_memory(2 * n, device)
        q, k = _inputs(n, d, device, dtype)
        return _step(torch.compile(lambda a, b: ref.nt_xent(a, b, 0.5)), q, k)

    def eager_factory():
        _check_nn_memory(2 * n, device)
        q, k = _inputs(n, d, device, dtype)
        return _step(lambda a, b: simclr_eager(a, b, 0.5), q, k)

    providers = {name: _backend(None if name == "sslfast" else name, n, d, device, dtype, op=nt_xent)
                 for name in ("sslfast", "cuda", "triton", "cpu")}
    providers.update(reference=reference_factory, eager=eager_factory, compile=compile_factory)
    return [Case(op="nt_xent", shape=f"B={n} views=2 D={d} {str(dtype).replace('torch.', '')}", mode="fwd+bwd",
                 providers=providers, params=dict(n=n, d=d), default=True,
                 reps=3 if device.type == "cpu" else None, warmup=1 if device.type == "cpu" else None)]


def _reference(n, d, device, dtype):
    def factory():
        _check_nn_memory(n, device)
        q, k = _inputs(n, d, device, dtype)
        return _step(lambda a, b: ref.info_nce(a, b, temperature=TEMPERATURE, symmetric=True), q, k)

    return factory


def _hf(n, d, device, dtype):
    def factory():
        _check_nn_memory(n, device)
        try:
            from transformers.models.clip.modeling_clip import image_text_contrastive_loss
        except ImportError as exc:
            raise Unavailable(f"transformers is not installed ({exc})")
        q, k = _inputs(n, d, device, dtype)

        def loss(a, b):
            # CLIPModel.forward: normalise, logits_per_text = scale * text @ image.T, then the loss.
            a = a / a.norm(p=2, dim=-1, keepdim=True)
            b = b / b.norm(p=2, dim=-1, keepdim=True)
            return image_text_contrastive_loss((a @ b.T) / TEMPERATURE)

        return _step(loss, q, k)

    return factory


def _compiled(n, d, device, dtype):
    def factory():
        _check_nn_memory(n, device)
        q, k = _inputs(n, d, device, dtype)
        fn = torch.compile(lambda a, b: ref.info_nce(a, b, temperature=TEMPERATURE, symmetric=True))
        return _step(fn, q, k)

    return factory


def cases(device, quick):
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        shapes = [(512, 64)]
    elif device.type == "cuda":
        shapes = [(4096, 512), (16384, 512), (65536, 512)]
    else:
        # 16k on this CPU takes minutes per call (about 200 s for the kernel): too long for the
        # default run; the O(N*D) memory claim is tested in tests/test_info_nce.py.
        shapes = [(4096, 512)]
    out = []
    for n, d in shapes:
        providers = {name: _backend(None if name == "sslfast" else name, n, d, device, dtype)
                     for name in ("sslfast", "cuda", "triton", "cpu")}
        providers.update(reference=_reference(n, d, device, dtype), hf=_hf(n, d, device, dtype),
                         compile=_compiled(n, d, device, dtype))
        out.append(Case(
            op="info_nce", shape=f"N={n} D={d} {str(dtype).replace('torch.', '')} sym", mode="fwd+bwd",
            providers=providers,
            # Each direction reads q and k, writes their gradients: the fewest bytes moved.
            bytes_moved=4 * n * d * dtype.itemsize,
            # Forward 1 product, backward 2 recomputed + 2 gradient products, per direction.
            flops=2 * 5 * 2 * n * n * d,
            params=dict(n=n, d=d, symmetric=True), default=(n, d) == shapes[0],
            reps=3 if device.type == "cpu" else None, warmup=1 if device.type == "cpu" else None,
        ))
    return out + _nt_xent_cases(device, quick, dtype)
