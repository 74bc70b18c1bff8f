"""Benchmark cases of the masked-prediction loss, forward + backward.

* HuBERT base: N = 3000 masked frames, the tied ``final_proj`` output D = 256, cosine head
  against V = 504 label embeddings (one label set), temperature 0.1.
* BEST-RQ / NEST: linear heads D -> V = 8192. GPU: N = 16384, D = 1024, H = 16 (bf16). CPU
  (fp32, a size this machine runs in seconds): N = 4096, D = 256, H = 4.

Providers: every sslfast kernel backend usable on the device, the eager formula (``eager``:
full (N, H, V) logits, ``F.cross_entropy``, what the trainers write), ``torch.compile`` of it,
and the reference (chunked and checkpointed). Speed-ups are against ``eager``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch
from ..ops.masked_prediction import masked_prediction_loss
from ..reference import masked_prediction as ref
from .harness import Case, Unavailable


def _inputs(n, h, v, d, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(h, v, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, v, (n, h), generator=g).to(device)
    return x, w, t


def eager_loss(x, w, t, head):
    """The loss as HuBERT / NeMo write it: the (N, H, V) logits, then cross-entropy."""
    if head == "cosine":
        logits = torch.einsum("nd,hvd->nhv", F.normalize(x.float(), dim=-1), F.normalize(w.float(), dim=-1)) / 0.1
    else:
        logits = torch.einsum("nd,hvd->nhv", x, w).float()
    return F.cross_entropy(logits.permute(0, 2, 1), t)


def _step(loss_fn, x, w, t):
    def run():
        x.grad = w.grad = None
        loss_fn(x, w, t).backward()

    return run


def _providers(n, h, v, d, device, dtype, head):
    def backend(name):
        def factory():
            reason = _dispatch.backend_unavailable_reason(name, device)
            if reason:
                raise Unavailable(reason)
            if name == "triton" and device.type == "cpu":
                raise Unavailable("Triton runs on CPU tensors only in the interpreter: far too slow for these shapes")
            return _step(lambda a, b, c: masked_prediction_loss(a, b, c, head=head, backend=name),
                         *_inputs(n, h, v, d, device, dtype))

        return factory

    def eager():
        return _step(lambda a, b, c: eager_loss(a, b, c, head), *_inputs(n, h, v, d, device, dtype))

    def compiled():
        fn = torch.compile(lambda a, b, c: eager_loss(a, b, c, head))
        return _step(fn, *_inputs(n, h, v, d, device, dtype))

    def reference():
        return _step(lambda a, b, c: ref.masked_prediction_loss(a, b, c, head=head),
                     *_inputs(n, h, v, d, device, dtype))

    def default():  # the public op with backend=None
        return _step(lambda a, b, c: masked_prediction_loss(a, b, c, head=head), *_inputs(n, h, v, d, device, dtype))

    out = {"sslfast": default}
    out.update({name: backend(name) for name in ("cuda", "triton", "cpu")})
    out.update(eager=eager, compile=compiled, reference=reference)
    return out


def cases(device, quick):
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if quick:
        shapes = [("hubert", 256, 1, 504, 64, "cosine"), ("best-rq", 256, 2, 1024, 64, "linear")]
    else:
        shapes = [("hubert", 3000, 1, 504, 256, "cosine"),
                  ("best-rq", 16384, 16, 8192, 1024, "linear") if gpu else ("best-rq", 4096, 4, 8192, 256, "linear")]
    out = []
    for label, n, h, v, d, head in shapes:
        out.append(Case(
            op="masked_prediction_loss", shape=f"{label} N={n} H={h} V={v} D={d} {str(dtype).replace('torch.', '')}",
            mode="fwd+bwd", providers=_providers(n, h, v, d, device, dtype, head), baseline="eager",
            # the three products of a fused linear cross-entropy (forward, dX, dW)
            flops=3 * 2 * n * h * v * d,
            bytes_moved=(n * d + 2 * h * v * d) * dtype.itemsize,
            params=dict(n=n, h=h, v=v, d=d, head=head),
            # HuBERT's head runs in seconds on a 2-core CPU; BEST-RQ's takes minutes there
            default=label == ("best-rq" if gpu else "hubert"),
            reps=3 if not gpu else None, warmup=1 if not gpu else None))
    return out
