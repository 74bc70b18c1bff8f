"""Benchmark cases of the masked-prediction loss, forward + backward.

* HuBERT base: N = 3000 masked frames, the tied ``final_proj`` output D = 256, cosine head
  against V = 504 label embeddings (one label set), temperature 0.1.
* BEST-RQ / NEST: linear heads D -> V = 8192. GPU: N = 16384, D = 1024, H = 16 (bf16). CPU
  (fp32, a size this machine runs in seconds): N = 4096, D = 256, H = 4.
* BiRQ: the BEST-RQ heads against soft targets made from RPQ scores of 16-dim features
  (``GumbelRPQTargets``, tau 1); eager: ``F.gumbel_softmax`` over the (N, H, V) scores, then
  cross-entropy with probability targets, gradients to the features too. Same N, H, V, D.

Providers: every sslfast kernel backend usable on the device, the eager formula (``eager``:
full (N, H, V) logits, ``F.cross_entropy``, what the trainers write), ``torch.compile`` of it,
and the reference (chunked and checkpointed). Speed-ups are against ``eager``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch
from ..ops.masked_prediction import OP_GUMBEL, GumbelRPQTargets, masked_prediction_loss
from .harness import Case, Unavailable


RPQ_DIM = 16  # BEST-RQ's codebook dimension


def _inputs(n, h, v, d, device, dtype, birq=False, seed=0):
    """x (N, D), w (H, V, D) and the targets: labels (N, H), or (features (N, H, 16) with
    gradient, codebooks (H, V, 16)) for BiRQ."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(h, v, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    if birq:
        f = torch.randn(n, h, RPQ_DIM, generator=g).to(device=device, dtype=dtype).requires_grad_()
        c = torch.randn(h, v, RPQ_DIM, generator=g).to(device=device, dtype=dtype)
        return x, w, (f, c)
    t = torch.randint(0, v, (n, h), generator=g).to(device)
    return x, w, t


def eager_loss(x, w, t, head):
    """The loss as HuBERT / NeMo write it: the (N, H, V) logits, then cross-entropy; for BiRQ
    targets (features, codebooks) the (N, H, V) Gumbel-softmax of the RPQ scores first."""
    if head == "cosine":
        logits = torch.einsum("nd,hvd->nhv", F.normalize(x.float(), dim=-1), F.normalize(w.float(), dim=-1)) / 0.1
    else:
        logits = torch.einsum("nd,hvd->nhv", x, w).float()
    if isinstance(t, tuple):
        f, c = t
        scores = 2.0 * torch.einsum("nhd,hvd->nhv", F.normalize(f.float(), dim=-1), F.normalize(c.float(), dim=-1))
        q = F.gumbel_softmax(scores, tau=1.0, dim=-1)
        return F.cross_entropy(logits.permute(0, 2, 1), q.permute(0, 2, 1))
    return F.cross_entropy(logits.permute(0, 2, 1), t)


def _sslfast_targets(t):
    return GumbelRPQTargets(*t, tau=1.0, seed=0) if isinstance(t, tuple) else t


def _step(loss_fn, x, w, t):
    def run():
        x.grad = w.grad = None
        if isinstance(t, tuple):
            t[0].grad = None
        loss_fn(x, w, t).backward()

    return run


def _providers(n, h, v, d, device, dtype, head, birq=False):
    def backend(name):
        def factory():
            reason = _dispatch.backend_unavailable_reason(name, device)
            if reason:
                raise Unavailable(reason)
            if birq and name not in _dispatch.implemented_backends(OP_GUMBEL):
                raise Unavailable(f"{name} has no kernel for BiRQ targets")
            if name == "triton" and device.type == "cpu":
                raise Unavailable("Triton runs on CPU tensors only in the interpreter: far too slow for these shapes")
            return _step(lambda a, b, c: masked_prediction_loss(a, b, _sslfast_targets(c), head=head, backend=name),
                         *_inputs(n, h, v, d, device, dtype, birq))

        return factory

    def eager():
        return _step(lambda a, b, c: eager_loss(a, b, c, head), *_inputs(n, h, v, d, device, dtype, birq))

    def compiled():
        fn = torch.compile(lambda a, b, c: eager_loss(a, b, c, head))
        return _step(fn, *_inputs(n, h, v, d, device, dtype, birq))

    def reference():
        return _step(lambda a, b, c: masked_prediction_loss(a, b, _sslfast_targets(c), head=head,
                                                            backend="reference"),
                     *_inputs(n, h, v, d, device, dtype, birq))

    def default():  # the public op with backend=None
        return _step(lambda a, b, c: masked_prediction_loss(a, b, _sslfast_targets(c), head=head),
                     *_inputs(n, h, v, d, device, dtype, birq))

    out = {"sslfast": default}
    out.update({name: backend(name) for name in ("cuda", "triton", "cpu")})
    out.update(eager=eager, compile=compiled, reference=reference)
    return out


def cases(device, quick):
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if quick:
        shapes = [("hubert", 256, 1, 504, 64, "cosine"), ("best-rq", 256, 2, 1024, 64, "linear"),
                  ("birq", 256, 2, 1024, 64, "linear")]
    else:
        best_rq = (16384, 16, 8192, 1024) if gpu else (4096, 4, 8192, 256)
        shapes = [("hubert", 3000, 1, 504, 256, "cosine"), ("best-rq", *best_rq, "linear"),
                  ("birq", *best_rq, "linear")]
    out = []
    for label, n, h, v, d, head in shapes:
        birq = label == "birq"
        out.append(Case(
            op="masked_prediction_loss", shape=f"{label} N={n} H={h} V={v} D={d} {str(dtype).replace('torch.', '')}",
            mode="fwd+bwd", providers=_providers(n, h, v, d, device, dtype, head, birq), baseline="eager",
            # the three products of a fused linear cross-entropy (forward, dX, dW); BiRQ adds
            # the target scores (forward) and their two gradient products at d = 16
            flops=3 * 2 * n * h * v * (d + (RPQ_DIM if birq else 0)),
            bytes_moved=(n * d + 2 * h * v * d) * dtype.itemsize,
            params=dict(n=n, h=h, v=v, d=d, head=head, targets="gumbel-rpq" if birq else "labels"),
            # HuBERT's head runs in seconds on a 2-core CPU; BEST-RQ's takes minutes there
            default=label == ("best-rq" if gpu else "hubert"),
            reps=3 if not gpu else None, warmup=1 if not gpu else None))
    return out
