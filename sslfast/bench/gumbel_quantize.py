"""Benchmark cases of the Gumbel-softmax quantizer (issue 5).

Every row times the whole quantizer module in training mode, weight_proj linear included,
on wav2vec 2.0 base shapes (input 512, G=2 groups of V=320 codewords of d=128 dims, HF's
codevector_dim 256): forward, and forward + backward of ``sum(q * r) + perplexity`` with
gradients to the input and every parameter. Providers: sslfast backends (our
``Wav2Vec2GumbelVectorQuantizer`` with ``backend=``), ``reference`` (same module on the
reference), ``hf`` (transformers' ``Wav2Vec2GumbelVectorQuantizer``, same weights) and
``compile`` (torch.compile of the reference module).

The ``hard=False`` row (soft quantization, fairseq's ``GumbelVectorQuantizer(hard=False)``:
output ``softmax((l + g) / tau) @ codebook``) times our fairseq-compatible module with
``hard=False`` at the first production shape, forward + backward. Hugging Face has no soft
path (its quantizer always calls ``gumbel_softmax(hard=True)``), so ``hf`` reports itself
unavailable there.
"""
from __future__ import annotations

import os

import torch

from .. import _dispatch
from .harness import Case, Unavailable

B_PROD = (4, 16)
T_PROD = 781
C_IN, G, V, CODE_DIM = 512, 2, 320, 256


def _config():
    try:
        from transformers import Wav2Vec2Config
    except ImportError as exc:  # pragma: no cover - transformers is a bench dependency
        raise Unavailable(f"transformers is not installed ({exc})")
    return Wav2Vec2Config(conv_dim=(C_IN,) * 7, num_codevector_groups=G, num_codevectors_per_group=V,
                          codevector_dim=CODE_DIM)


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _make(kind: str, device, b: int, t: int, backward: bool, backend: str | None = None, hard: bool = True):
    from ..nn.gumbel_quantize import GumbelVectorQuantizer, Wav2Vec2GumbelVectorQuantizer

    cfg = _config()
    n = b * t
    if kind == "hf" and not hard:
        raise Unavailable("transformers' Wav2Vec2GumbelVectorQuantizer has no soft path (it always calls "
                          "gumbel_softmax(hard=True))")
    if kind == "hf":
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GumbelVectorQuantizer as HF

        # HF multiplies a (N, G*V, 1) one-hot by the (1, G*V, d) codebook; measured peak: about
        # one such fp32 tensor (4.2 GB at B=16), with headroom for temporaries
        need = int(1.5 * n * G * V * (CODE_DIM // G) * 4)
        avail = _mem_available_bytes() if device.type == "cpu" else torch.cuda.mem_get_info(device)[0]
        if avail is not None and need > 0.6 * avail:
            raise Unavailable(f"HF's one-hot product needs about {need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available")
        mod = HF(cfg)
        torch.nn.init.normal_(mod.weight_proj.weight)
        torch.nn.init.zeros_(mod.weight_proj.bias)
        torch.nn.init.uniform_(mod.codevectors)
    else:
        if backend not in (None, "reference"):
            reason = _dispatch.backend_unavailable_reason(backend, device)
            if reason:
                raise Unavailable(reason)
        if hard:
            mod = Wav2Vec2GumbelVectorQuantizer(cfg, backend=backend)
        else:  # fairseq's module, the one with a hard=False option; same shapes and tau
            mod = GumbelVectorQuantizer(C_IN, V, (2, 0.5, 0.999995), G, False, CODE_DIM, True, hard=False,
                                        backend=backend)
    mod = mod.to(device).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, C_IN, generator=gen).to(device).requires_grad_(backward)
    mask = (torch.rand(b, t, generator=gen) < 0.49).to(device)
    r = torch.randn(b, t, CODE_DIM, generator=gen).to(device)
    fwd = mod
    if kind == "compile":
        if device.type == "cpu" and os.environ.get("SSLFAST_BENCH_COMPILE_GUMBEL", "0") != "1":
            # measured: Inductor had not finished compiling the reference (its Philox rounds
            # on int64 tensors) after 7 minutes at B=2 T=50 on a 2-core machine
            raise Unavailable("torch.compile of the reference takes over 7 minutes to compile on CPU; "
                              "set SSLFAST_BENCH_COMPILE_GUMBEL=1 to run it")
        fwd = torch.compile(mod)
    params = [x] + list(mod.parameters())

    # a fixed seed keeps torch.compile from breaking the graph at the seed draw (.item())
    kw = {} if kind == "hf" else {"seed": 1234}

    if not hard:
        fairseq_mod = fwd

        def fwd(x, mask, **kw):  # fairseq's result dict -> (x, prob_perplexity), as the HF rows
            res = fairseq_mod(x, mask=mask, **kw)
            return res["x"], res["prob_perplexity"]

    def step():
        q, ppl = fwd(x, mask, **kw)
        if backward:
            loss = (q * r).sum() + ppl
            torch.autograd.grad(loss, params)
        return q

    if not backward:
        def step_nograd():
            with torch.no_grad():
                return fwd(x, mask, **kw)
        return step_nograd
    return step


def cases(device, quick):
    device = torch.device(device)
    shapes = [(2, 50)] if quick else [(b, T_PROD) for b in B_PROD]
    backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    out = []
    for b, t in shapes:
        for backward in (False, True):
            providers = {"sslfast": lambda b=b, t=t, bw=backward: _make("ours", device, b, t, bw, None)}
            for name in backends:
                providers[name] = (lambda name=name, b=b, t=t, bw=backward: _make("ours", device, b, t, bw, name))
            providers["reference"] = lambda b=b, t=t, bw=backward: _make("ours", device, b, t, bw, "reference")
            providers["hf"] = lambda b=b, t=t, bw=backward: _make("hf", device, b, t, bw)
            providers["compile"] = lambda b=b, t=t, bw=backward: _make("compile", device, b, t, bw, "reference")
            out.append(Case(
                op="gumbel_vector_quantize", shape=f"B={b} T={t} C={C_IN} G={G} V={V} d={CODE_DIM // G}",
                mode="fwd+bwd" if backward else "fwd", providers=providers,
                bytes_moved=b * t * (C_IN + G * V * 2 + CODE_DIM) * 4,
                params={"B": b, "T": t, "C": C_IN, "G": G, "V": V, "d": CODE_DIM // G,
                        "note": "training mode, weight_proj linear included, mask over 49% of frames"},
                default=(b, backward) == (shapes[0][0], True)))
    # soft quantization (hard=False): fwd+bwd at the first shape
    b, t = shapes[0]
    providers = {"sslfast": lambda: _make("ours", device, b, t, True, None, hard=False)}
    for name in backends:
        providers[name] = (lambda name=name: _make("ours", device, b, t, True, name, hard=False))
    providers["reference"] = lambda: _make("ours", device, b, t, True, "reference", hard=False)
    providers["hf"] = lambda: _make("hf", device, b, t, True, hard=False)
    providers["compile"] = lambda: _make("compile", device, b, t, True, "reference", hard=False)
    out.append(Case(
        op="gumbel_vector_quantize", shape=f"B={b} T={t} C={C_IN} G={G} V={V} d={CODE_DIM // G} hard=False",
        mode="fwd+bwd", providers=providers,
        bytes_moved=b * t * (C_IN + G * V * 2 + CODE_DIM) * 4,
        params={"B": b, "T": t, "C": C_IN, "G": G, "V": V, "d": CODE_DIM // G, "hard": False,
                "note": "soft quantization (fairseq hard=False module), training mode, weight_proj linear "
                        "included, mask over 49% of frames"}))
    return out
