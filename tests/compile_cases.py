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
    # Sizes are not specialised (kernels/masking.py _SIZES): the compiles are the
    # constexpr classes (style, padding, no_overlap, dropout fused or not) x the tiles
    # (BLOCK_S by T up to 128, BLOCK_N by the span cap up to 128, BLOCK_P).
    shapes = [(4, 781), (16, 781), (64, 1999), (1, 1), (3, 20), (2, 12288)]
    for (B, T), style, L in itertools.product(shapes, ("fairseq", "hf"), (1, 2, 10, 64)):
        yield f"B={B} T={T} style={style} L={L}", (lambda B=B, T=T, s=style, L=L: sslfast.compute_mask_indices(
            (B, T), None, 0.65, L, style=s, seed=1, **TRITON))
    pad = torch.arange(781)[None] >= torch.tensor([781, 700, 500, 3])[:, None]
    yield "hf padded", lambda: sslfast.compute_mask_indices((4, 781), pad, 0.65, 10, style="hf", seed=1, **TRITON)
    # the key is always a pointer (seed_ptr): an int, a seed tensor and None (drawn) take one kernel
    for label, seed in (("seed tensor", lambda: torch.tensor(-5)), ("seed None", lambda: None)):
        yield label, (lambda seed=seed: sslfast.compute_mask_indices((4, 781), pad, 0.65, 10, min_masks=2,
                                                                     mask_dropout=0.1, seed=seed(), **TRITON))
    flags = itertools.product(("static", "uniform", "normal", "poisson"), (False, True), (False, True), (0.0, 0.1))
    for mt, no_overlap, same, drop in flags:
        kw = dict(mask_type=mt, mask_other=2.0 if mt != "static" else 0.0, no_overlap=no_overlap,
                  require_same_masks=same, mask_dropout=drop, min_masks=2, seed=3)
        yield f"flags {kw}", (lambda kw=kw: sslfast.compute_mask_indices((4, 781), pad, 0.65, 10, **kw, **TRITON))
    # no_overlap with many spans (mask_length 1 and 2, long rows): the interval list used to
    # live in registers and grow with the span count; B = 1 fuses dropout into the row kernel
    for (B, T), L, ms, drop in itertools.product([(1, 781), (4, 1999), (2, 12288)], (1, 2, 64), (0, 2), (0.0, 0.2)):
        yield f"no_overlap B={B} T={T} L={L} min_space={ms} dropout={drop}", (
            lambda B=B, T=T, L=L, ms=ms, drop=drop: sslfast.compute_mask_indices(
                (B, T), None, 0.65, L, no_overlap=True, min_space=ms, mask_dropout=drop, min_masks=2, seed=5,
                **TRITON))


def negatives():
    shapes = [(4, 781), (16, 781), (2, 4096), (2, 4097), (1, 12288), (1, 1)]
    for (B, T), K, Kc, layout in itertools.product(shapes, (1, 100), (0, 10), ("packed", "hf")):
        m = _mask(B, T)
        yield f"B={B} T={T} K={K} Kc={Kc} {layout}", (lambda m=m, K=K, Kc=Kc, lay=layout: sslfast.sample_negatives(
            m, K, cross_sample_negatives=Kc, layout=lay, seed=1, **TRITON))
    pad = torch.arange(781)[None] >= torch.tensor([781, 700, 500, 3])[:, None]
    m = _mask(4, 781) & ~pad
    for Kc, layout, masked_only in itertools.product((0, 10), ("packed", "hf"), (True, False)):
        yield f"padded Kc={Kc} {layout} from_masked_only={masked_only}", (
            lambda Kc=Kc, lay=layout, mo=masked_only: sslfast.sample_negatives(
                m, 100, cross_sample_negatives=Kc, padding_mask=pad, from_masked_only=mo, layout=lay, seed=1,
                **TRITON))
    # the key by pointer (kernels/negatives.py): a seed tensor, and seed=None (drawn on the device)
    for Kc, layout in ((10, "packed"), (10, "hf"), (0, "hf")):
        for label, seed in (("seed tensor", torch.tensor(2**40 + 1)), ("seed=None", None)):
            yield f"{label} Kc={Kc} {layout}", (lambda Kc=Kc, lay=layout, seed=seed: sslfast.sample_negatives(
                m, 100, cross_sample_negatives=Kc, layout=lay, seed=seed, **TRITON))


def apply_mask():
    for (B, T, D), dtype, fill, inplace in itertools.product(
            [(4, 781, 768), (16, 781, 1024), (2, 5, 3), (3, 7, 1), (1, 1, 16)], FLOATS, ("emb", 0.1), (False, True)):
        def run(B=B, T=T, D=D, dtype=dtype, fill=fill, inplace=inplace):
            x = _rand(B, T, D, dtype=dtype, grad=not inplace)
            f = _rand(D, dtype=dtype, grad=True) if fill == "emb" else fill
            out = sslfast.apply_mask(x, _mask(B, T), f, inplace=inplace, seed=1, **TRITON)
            if not inplace:
                out.float().sum().backward()
        yield f"B={B} T={T} D={D} {dtype} fill={fill} inplace={inplace}", run
    for dtype in FLOATS:  # a strided input (channels-first storage) and an embedding that needs no grad
        def strided(dtype=dtype):
            x = _rand(4, 768, 781, dtype=dtype).transpose(1, 2).requires_grad_(True)
            sslfast.apply_mask(x, _mask(4, 781), _rand(768, dtype=dtype), seed=1, **TRITON).float().sum().backward()
        yield f"strided {dtype}", strided
    # the seed as a tensor (the kernel loads the key from it; the int seeds above reach the same kernel
    # through sslfast.random.seed_tensor) and seed=None (a key drawn as a tensor)
    for seed in ("tensor", None):
        yield f"B=4 T=781 D=768 noise seed={seed}", (lambda seed=seed: sslfast.apply_mask(
            _rand(4, 781, 768), _mask(4, 781), 0.1, seed=torch.tensor(-3) if seed else None, **TRITON))


def contrastive():
    for (N, M, D, K), dtype, det in itertools.product(
            [(1500, 1500, 256, 100), (2000, 2000, 768, 100), (7, 5, 3, 9), (64, 64, 1024, 100), (5, 5, 1, 1)],
            FLOATS, (False, True)):
        def run(N=N, M=M, D=D, K=K, dtype=dtype, det=det):
            x, y = _rand(N, D, dtype=dtype, grad=True), _rand(M, D, dtype=dtype, grad=True)
            neg = torch.randint(0, M, (N, K))
            pos = torch.arange(N) % M
            sslfast.contrastive_loss(x, y, neg, pos, deterministic=det, **TRITON).backward()
        yield f"N={N} D={D} K={K} {dtype} det={det}", run
    # every flag the kernels see (reduction is applied on the host: it cycles)
    reductions = itertools.cycle(("sum", "mean", "none"))
    for (dtype, nip, prec, has_pos, det), red in zip(itertools.product(
            FLOATS, ("vector", "index", "none"), ("fairseq", "hf"), (True, False), (False, True)), reductions):
        def flags(dtype=dtype, nip=nip, prec=prec, red=red, has_pos=has_pos, det=det):
            x, y = _rand(300, 256, dtype=dtype, grad=True), _rand(300, 256, dtype=dtype, grad=True)
            neg = torch.randint(0, 300, (300, 100))
            out = sslfast.contrastive_loss(x, y, neg, torch.arange(300) if has_pos else None, neg_is_pos=nip,
                                           precision=prec, reduction=red, deterministic=det, **TRITON)
            out.float().sum().backward()
        yield f"flags {dtype} neg_is_pos={nip} precision={prec} reduction={red} positives={has_pos} det={det}", flags


def info_nce():
    for (N, D), dtype, sym in itertools.product([(4096, 512), (256, 128), (5, 1024), (3, 1), (64, 16)], FLOATS,
                                                (False, True)):
        def run(N=N, D=D, dtype=dtype, sym=sym):
            q, k = _rand(N, D, dtype=dtype, grad=True), _rand(N, D, dtype=dtype, grad=True)
            sslfast.info_nce(q, k, symmetric=sym, **TRITON).backward()
            sslfast.nt_xent(q, k, **TRITON).backward()
        yield f"N={N} D={D} {dtype} symmetric={sym}", run
    reductions = itertools.cycle(("mean", "sum", "none"))  # applied on the host: cycles
    for (dtype, norm), red in zip(itertools.product(FLOATS, (True, False)), reductions):
        def queue(dtype=dtype, norm=norm, red=red):  # MoCo: a queue of extra negatives
            q, k = _rand(256, 128, dtype=dtype, grad=True), _rand(256, 128, dtype=dtype, grad=True)
            out = sslfast.info_nce(q, k, queue=_rand(4096, 128, dtype=dtype), normalize=norm, reduction=red,
                                   **TRITON)
            out.float().sum().backward()
        yield f"queue {dtype} normalize={norm} reduction={red}", queue


def gumbel_quantize():
    def case(N, G, V, d, dtype, hard, training=True, mask=False, diversity=True, seed=1):
        def run():
            logits = _rand(N, G * V, dtype=dtype, grad=True)
            cb = _rand(G * V, d, dtype=dtype, grad=True)
            m = _mask(1, N).reshape(N) if mask else None
            s = torch.tensor(2**40 + 7) if seed == "tensor" else seed
            out = sslfast.gumbel_vector_quantize(logits, cb, groups=G, hard=hard, training=training, mask=m, seed=s,
                                                 **TRITON)
            loss = out.quantized.float().sum()
            if diversity:  # the prob-perplexity term of the backward (wav2vec 2.0's diversity loss)
                loss = loss + out.prob_perplexity
            loss.backward()
        return (f"N={N} G={G} V={V} d={d} {dtype} hard={hard} training={training} mask={mask} div={diversity}"
                + ("" if seed == 1 else f" seed={seed}"), run)

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
    # the seed as a tensor and seed=None (the kernels load the key from a tensor either way)
    for hard, seed in itertools.product((True, False), ("tensor", None)):
        yield case(*production, torch.float32, hard, seed=seed)


def rp_quantize():
    # V from 2 to 8192, head width d up to MAX_HEAD_DIM (256), every input_norm and metric,
    # with and without a mask (the BEST-RQ shape: B=4, T=781, F=80 x 4, H heads, V=8192, d=16);
    # d = 2, 16, 32 and 64 are the fused tile classes, d = 256 projects to scratch first
    heads = [(1, 8192, 16), (16, 8192, 16), (1, 2, 2), (4, 1024, 32), (2, 320, 64), (1, 1024, 256),
             (1, 8192, 256)]
    for (H, V, d), dtype, norm, metric in itertools.product(heads, FLOATS, (None, "layernorm"), ("cosine", "l2")):
        def run(H=H, V=V, d=d, dtype=dtype, norm=norm, metric=metric):
            x = _rand(4, 781, 80, dtype=dtype)
            sslfast.random_projection_quantize(x, _rand(320, H * d), _rand(H, V, d), stack=4, input_norm=norm,
                                               metric=metric, **TRITON)
        yield f"B=4 T=781 F=80x4 H={H} V={V} d={d} {dtype} {norm} {metric}", run
    for stack, masked in itertools.product((1, 2), (False, True)):
        def small(stack=stack, masked=masked):
            x = _rand(2, 9, 3)
            m = (torch.arange(2 * (9 // stack)) % 3 != 0).reshape(2, 9 // stack) if masked else None
            sslfast.random_projection_quantize(x, _rand(3 * stack, 2), _rand(1, 2, 2), stack=stack, mask=m, **TRITON)
        yield f"B=2 T=9 F=3x{stack} mask={masked}", small
    for metric in ("cosine", "l2"):  # a wide head (projected to scratch) with a mask
        def wide(metric=metric):
            m = torch.arange(2 * 9) % 3 != 0
            sslfast.random_projection_quantize(_rand(2, 9, 3), _rand(3, 2 * 72), _rand(2, 5, 72), mask=m.reshape(2, 9),
                                               input_norm="layernorm", metric=metric, **TRITON)
        yield f"B=2 T=9 F=3 H=2 V=5 d=72 mask=True layernorm {metric}", wide
    for (N, V, D), dtype, metric in itertools.product([(3124, 500, 768), (5, 2, 3), (64, 8192, 1024), (64, 2, 1)],
                                                      FLOATS, ("l2", "cosine")):
        yield f"nearest N={N} V={V} D={D} {dtype} {metric}", (lambda N=N, V=V, D=D, dt=dtype, m=metric:
                                                              sslfast.nearest_codeword(_rand(N, D, dtype=dt),
                                                                                       _rand(V, D, dtype=dt),
                                                                                       metric=m, **TRITON))


def masked_prediction():
    # HuBERT base (cosine, V=504, D=256; untied heads) and BEST-RQ (linear, V=8192, several
    # heads, bias), hard and soft targets, each float dtype; D=1 and V=1 edge classes.
    shapes = [("cosine", 3000, 1, 504, 256, 1), ("cosine", 64, 2, 504, 256, 2), ("linear", 2048, 4, 8192, 256, 1),
              ("linear", 33, 2, 1, 1, 1), ("linear", 64, 1, 300, 1024, 1)]
    for (head, N, H, V, D, Hx), dtype, soft in itertools.product(shapes, FLOATS, (False, True)):
        def run(head=head, N=N, H=H, V=V, D=D, Hx=Hx, dtype=dtype, soft=soft):
            x = _rand(N, D, dtype=dtype, grad=True) if Hx == 1 else _rand(N, Hx, D, dtype=dtype, grad=True)
            w = _rand(H, V, D, dtype=dtype, grad=True)
            b = _rand(H, V, dtype=dtype, grad=True) if head == "linear" else None
            t = torch.softmax(torch.randn(N, H, V), -1).to(dtype) if soft else torch.randint(0, V, (N, H))
            sslfast.masked_prediction_loss(x, w, t, head=head, bias=b, **TRITON).backward()
        yield f"{head} N={N} H={H} V={V} D={D} x heads={Hx} {dtype} soft={soft}", run
    # BiRQ's on-the-fly Gumbel-softmax targets (TARGET = TSTATS, GUMBEL): the Triton core
    # called directly (its public op is registered by sslfast/ops/masked_prediction.py), with
    # the noise on and off, a bias or not, Hx and Hy each 1 or H, Dt = 16 (BEST-RQ), 1, and 40
    # (three dY / dC column blocks: more than the dX / dW blocks of D = 16); grad None: forward only
    from sslfast.kernels import masked_prediction as kmp

    gumbel = [(2048, 4, 8192, 256, 1, 1, 16), (64, 2, 504, 1024, 2, 2, 16), (33, 2, 1, 1, 1, 2, 1),
              (64, 2, 300, 16, 2, 1, 40)]
    flags = itertools.cycle([(True, True, True), (False, True, True), (True, False, True), (True, True, False)])
    for (N, H, V, D, Hx, Hy, Dt), dtype in itertools.product(gumbel, FLOATS):
        noise, bias, grad = next(flags)

        def birq(N=N, H=H, V=V, D=D, Hx=Hx, Hy=Hy, Dt=Dt, dtype=dtype, noise=noise, bias=bias, grad=grad):
            kmp.core_gumbel(_rand(N, Hx, D, dtype=dtype), _rand(H, V, D, dtype=dtype),
                            _rand(H, V, dtype=dtype) if bias else None, _rand(N, Hy, Dt), _rand(H, V, Dt),
                            torch.tensor([7]), 2.0, 1.0 if noise else 0.0, torch.rand(N, H) if grad else None, 1.0,
                            0.1)
        yield (f"gumbel N={N} H={H} V={V} D={D} x heads={Hx} y heads={Hy} Dt={Dt} {dtype} noise={noise} "
               f"bias={bias} grad={grad}"), birq


FAMILIES = {f.__name__: f for f in (masking, negatives, apply_mask, contrastive, info_nce, gumbel_quantize,
                                    rp_quantize, masked_prediction)}
