"""What the ``compile`` tier compiles: each op called through its public function with
``backend="triton"`` on CPU tensors, while ``tests/triton_stub.py`` is the active Triton
driver. The op's own host code picks every launch configuration, so the tier compiles what
a GPU run would compile; nothing executes (outputs are left uninitialised, so the inputs of
each call are made here, never taken from another kernel's output).

Shape classes: each op's production shapes (the bench's: wav2vec 2.0 base / large, BEST-RQ,
HuBERT, SimCLR), in fp32, fp16 and bf16, and the edge classes where the kernel's logic
changes (mask_length 1, 2 and 64; V from 2 to 8192; D up to 1024; T up to the documented
maximum; every flag). A family is a generator of ``(label, thunk)``.
"""
from __future__ import annotations

import itertools

import torch

import sslfast

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TRITON = dict(backend="triton")


def _rand(*shape, dtype=torch.float32, grad=False):
    t = torch.randn(*shape).to(dtype)
    return t.requires_grad_(grad)


def _mask(B, T, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) < p
    m[:, 0] = True
    return m


def masking():
    shapes = [(4, 781), (16, 781), (64, 1999), (1, 1)]
    for (B, T), style, L in itertools.product(shapes, ("fairseq", "hf"), (1, 2, 10, 64)):
        yield f"B={B} T={T} style={style} L={L}", (lambda B=B, T=T, s=style, L=L: sslfast.compute_mask_indices(
            (B, T), None, 0.65, L, style=s, seed=1, **TRITON))
    pad = torch.arange(781)[None] >= torch.tensor([781, 700, 500, 3])[:, None]
    flags = itertools.product(("static", "uniform", "normal", "poisson"), (False, True), (False, True), (0.0, 0.1))
    for mt, no_overlap, same, drop in flags:
        kw = dict(mask_type=mt, mask_other=2.0 if mt != "static" else 0.0, no_overlap=no_overlap,
                  require_same_masks=same, mask_dropout=drop, min_masks=2, seed=3)
        yield f"flags {kw}", (lambda kw=kw: sslfast.compute_mask_indices((4, 781), pad, 0.65, 10, **kw, **TRITON))


def negatives():
    for (B, T), K, Kc, layout in itertools.product([(4, 781), (16, 781), (2, 4096), (1, 12288)], (1, 100), (0, 10),
                                                   ("packed", "hf")):
        m = _mask(B, T)
        yield f"B={B} T={T} K={K} Kc={Kc} {layout}", (lambda m=m, K=K, Kc=Kc, lay=layout: sslfast.sample_negatives(
            m, K, cross_sample_negatives=Kc, layout=lay, seed=1, **TRITON))


def apply_mask():
    for (B, T, D), dtype, fill in itertools.product([(4, 781, 768), (16, 781, 1024), (2, 5, 3)], FLOATS,
                                                    ("emb", 0.1)):
        def run(B=B, T=T, D=D, dtype=dtype, fill=fill):
            x = _rand(B, T, D, dtype=dtype, grad=True)
            f = _rand(D, dtype=dtype, grad=True) if fill == "emb" else fill
            out = sslfast.apply_mask(x, _mask(B, T), f, seed=1, **TRITON)
            out.float().sum().backward()
        yield f"B={B} T={T} D={D} {dtype} fill={fill}", run


def contrastive():
    for (N, M, D, K), dtype, det in itertools.product([(1500, 1500, 256, 100), (2000, 2000, 768, 100), (7, 5, 3, 9)],
                                                      FLOATS, (False, True)):
        def run(N=N, M=M, D=D, K=K, dtype=dtype, det=det):
            x, y = _rand(N, D, dtype=dtype, grad=True), _rand(M, D, dtype=dtype, grad=True)
            neg = torch.randint(0, M, (N, K))
            pos = torch.arange(N) % M
            sslfast.contrastive_loss(x, y, neg, pos, deterministic=det, **TRITON).backward()
        yield f"N={N} D={D} K={K} {dtype} det={det}", run


def info_nce():
    for (N, D), dtype, sym in itertools.product([(4096, 512), (256, 128), (5, 1024)], FLOATS, (False, True)):
        def run(N=N, D=D, dtype=dtype, sym=sym):
            q, k = _rand(N, D, dtype=dtype, grad=True), _rand(N, D, dtype=dtype, grad=True)
            sslfast.info_nce(q, k, symmetric=sym, **TRITON).backward()
            sslfast.nt_xent(q, k, **TRITON).backward()
        yield f"N={N} D={D} {dtype} symmetric={sym}", run


def gumbel_quantize():
    def case(N, G, V, d, dtype, hard, training=True, mask=False, diversity=True):
        def run():
            logits = _rand(N, G * V, dtype=dtype, grad=True)
            cb = _rand(G * V, d, dtype=dtype, grad=True)
            m = _mask(1, N).reshape(N) if mask else None
            out = sslfast.gumbel_vector_quantize(logits, cb, groups=G, hard=hard, training=training, mask=m, seed=1,
                                                 **TRITON)
            loss = out.quantized.float().sum()
            if diversity:  # the prob-perplexity term of the backward (wav2vec 2.0's diversity loss)
                loss = loss + out.prob_perplexity
            loss.backward()
        return f"N={N} G={G} V={V} d={d} {dtype} hard={hard} training={training} mask={mask} div={diversity}", run

    production = (3124, 2, 320, 128)  # wav2vec 2.0 base: 5 V tiles of 64
    for shape, dtype, hard in itertools.product(
            [production, (64, 1, 2, 16), (64, 2, 257, 64), (64, 1, 1024, 256), (64, 1, 8192, 16)], FLOATS,
            (True, False)):
        yield case(*shape, dtype, hard)
    # the other flags at the production shape: eval, a mask, no diversity term in the loss
    for dtype, (training, mask, diversity) in itertools.product(
            (torch.float32, torch.bfloat16), [(False, False, True), (True, True, True), (True, False, False)]):
        for hard in (True, False) if training else (True,):
            yield case(*production, dtype, hard, training=training, mask=mask, diversity=diversity)


def rp_quantize():
    for (B, T, F, stack, H, V, d), dtype in itertools.product(
            [(4, 781, 80, 4, 1, 8192, 16), (4, 781, 80, 4, 16, 8192, 16), (2, 9, 3, 1, 1, 2, 2)], FLOATS):
        def run(B=B, T=T, F=F, stack=stack, H=H, V=V, d=d, dtype=dtype):
            x = _rand(B, T, F, dtype=dtype)
            sslfast.random_projection_quantize(x, _rand(F * stack, H * d), _rand(H, V, d), stack=stack, **TRITON)
        yield f"B={B} T={T} F={F}x{stack} H={H} V={V} d={d} {dtype}", run
    for (N, V, D), dtype, metric in itertools.product([(3124, 500, 768), (5, 2, 3)], FLOATS, ("l2", "cosine")):
        yield f"nearest N={N} V={V} D={D} {dtype} {metric}", (lambda N=N, V=V, D=D, dt=dtype, m=metric:
                                                              sslfast.nearest_codeword(_rand(N, D, dtype=dt),
                                                                                       _rand(V, D, dtype=dt),
                                                                                       metric=m, **TRITON))


FAMILIES = {f.__name__: f for f in (masking, negatives, apply_mask, contrastive, info_nce, gumbel_quantize,
                                    rp_quantize)}
