"""Reference Gumbel-softmax vector quantizer (wav2vec 2.0): the specification of
``sslfast.gumbel_vector_quantize``.

Shapes: ``logits`` (N, G*V), ``codebook`` (G*V, d), output ``quantized`` (N, G*d) and
``codes`` (N, G). Row (n, g) of the quantizer is ``logits[n, g*V:(g+1)*V]``.

Semantics (fairseq ``GumbelVectorQuantizer`` and Hugging Face
``Wav2Vec2GumbelVectorQuantizer``, see shared/docs/semantics.md section 4):

* training: Gumbel noise ``g = -log(-log(u))`` with ``u`` uniform from the Philox stream
  ``Stream.GUMBEL`` (counter c0 = position // 4 inside the logits row, word = position % 4,
  c1 = n), clamped to ``[2**-24, 1 - 2**-24]``, logs in fp64 rounded once to fp32, so ``g`` is finite (in [-2.82, 16.64]) for
  any finite logits, also +-255 and the fp16 range (math in fp32). ``soft =
  softmax((l + g) / tau)``; ``codes = argmax(l + g)`` in fp32 (lowest index on ties; the
  argmax of soft up to the rounding of the division).
  ``hard=True`` (straight-through): the forward value is exactly ``codebook[g*V + code]``
  and the gradient is that of ``soft @ codebook``. ``hard=False``: ``soft @ codebook``.
* eval (``training=False``): ``codes = argmax(l)``, no noise; ``quantized`` is the exact
  gather; no gradient flows from ``quantized`` to the logits (fairseq and HF both take the
  one-hot without a graph), the codebook still gets the scatter of the output gradient.
* ``prob_marginal`` (G, V): softmax(l) (no noise, no temperature, as fairseq and HF) averaged
  over the frames selected by ``mask`` (all frames when ``mask`` is None).
  ``code_marginal`` (G, V): histogram of ``argmax(l)`` (no noise, fairseq's
  ``code_perplexity``; in eval HF's perplexity) over the same frames, divided by their count.
* ``perplexity(marginal, eps)`` = ``sum_g exp(-sum_v p log(p + eps))``; fairseq uses
  ``eps=1e-7``, HF ``xlogy`` (``eps=0``). With no frame selected the marginals are zero and
  the perplexity is G (HF divides by zero there and returns NaN).

Differs on purpose: the forward value in training is exactly one-hot (``hard - soft.detach()
+ soft`` in fp32 is off by an ulp where soft is near 1); the noise comes from the seeded
Philox stream (same codes on every backend) rather than torch's generator; the uniform is
clamped (torch's ``exponential_().log()`` has produced inf/NaN, pytorch #22442, #41663).
"""
from __future__ import annotations

import torch

from .. import random as sr

# Uniform clamp: excludes exactly 0 and 1 (tl.rand's mapping can return 0), and 1 - 2**-24
# is the largest fp32 below 1, so the clamp is exact in every language.
GUMBEL_U_LO = 2.0**-24


def gumbel_noise(n_rows: int, width: int, seed: int | torch.Tensor, device=None) -> torch.Tensor:
    """(n_rows, width) fp32 Gumbel(0, 1) noise of the Philox stream the kernels draw; ``seed``
    an int or a 0-d int64 tensor on ``device`` (the key, never read on the host)."""
    n4 = (width + 3) // 4
    c0 = torch.arange(n4, dtype=torch.int64, device=device)[None, :]
    c1 = torch.arange(n_rows, dtype=torch.int64, device=device)[:, None]
    words = torch.stack(sr.philox4x32(c0, c1, int(sr.Stream.GUMBEL), 0, seed), dim=-1)
    words = words.reshape(n_rows, 4 * n4)[:, :width]
    # logs in fp64, rounded once: float logs differ by an ulp between libraries, and the
    # kernels must draw the same noise bits
    u = sr.uint_to_open_uniform(words, GUMBEL_U_LO).double()
    return (-torch.log(-torch.log(u))).float()


def perplexity(marginal: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``sum_g exp(-sum_v p log(p + eps))`` of a (G, V) marginal; ``eps=0`` uses xlogy (HF)."""
    if eps == 0.0:
        ent = torch.xlogy(marginal, marginal)
    else:
        ent = marginal * torch.log(marginal + eps)
    return torch.exp(-torch.sum(ent, dim=-1)).sum()


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 math for fp32/fp16/bf16 storage; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def marginals(logits: torch.Tensor, groups: int, mask: torch.Tensor | None):
    """(prob_marginal, code_marginal), each (G, V) fp32, over the frames selected by mask."""
    n = logits.shape[0]
    l3 = logits.to(_work_dtype(logits)).reshape(n, groups, logits.shape[1] // groups)
    p = torch.softmax(l3, dim=-1)
    hard = torch.zeros_like(p).scatter_(-1, l3.argmax(dim=-1, keepdim=True), 1.0)
    if mask is None:
        count = torch.tensor(float(n), dtype=p.dtype, device=logits.device)
    else:
        sel = mask.reshape(n, 1, 1)
        p = torch.where(sel, p, torch.zeros((), device=p.device))
        hard = torch.where(sel, hard, torch.zeros((), device=p.device))
        count = mask.sum().to(p.dtype)
    denom = count.clamp_min(1.0)
    return p.sum(dim=0) / denom, hard.sum(dim=0) / denom


def gumbel_vector_quantize(
    logits: torch.Tensor,
    codebook: torch.Tensor,
    *,
    groups: int,
    tau: float = 2.0,
    hard: bool = True,
    training: bool = True,
    seed: int | torch.Tensor = 0,
    mask: torch.Tensor | None = None,
):
    """Returns (quantized (N, G*d), codes (N, G) int64, prob_marginal (G, V), code_marginal (G, V)).

    Arguments are assumed validated (``sslfast.gumbel_vector_quantize`` does that); ``mask``
    is a bool (N,) tensor or None; ``codebook`` is (G*V, d).
    """
    n, gv = logits.shape
    v = gv // groups
    d = codebook.shape[-1]
    cb = codebook.reshape(groups, v, d)
    work = _work_dtype(logits)
    lw = logits.to(work)
    prob_m, code_m = marginals(logits, groups, mask)
    if training:
        z = (lw + gumbel_noise(n, gv, seed, logits.device).to(work)).reshape(n, groups, v)
        # the code is the argmax of l + g (before the division by tau, which could merge
        # near-equal values): the same rule in every kernel
        codes = z.argmax(dim=-1)
        # subtracting the max before dividing keeps (z - max) / tau finite for tiny tau and
        # logits near the fp32 limit (the kernels do the same)
        soft = torch.softmax((z - z.max(dim=-1, keepdim=True).values) / tau, dim=-1)
        if hard:
            gathered = cb.unsqueeze(0).expand(n, -1, -1, -1).gather(
                2, codes[:, :, None, None].expand(-1, -1, 1, d)).squeeze(2)
            # Straight-through: value exactly the gathered row (s - s.detach() is exactly 0),
            # gradient to the logits that of soft @ codebook, to the codebook the scatter.
            s = torch.einsum("ngv,gvd->ngd", soft, cb.detach().to(work))
            quantized = gathered + (s - s.detach()).to(gathered.dtype)
        else:
            quantized = torch.einsum("ngv,gvd->ngd", soft, cb.to(work)).to(codebook.dtype)
    else:
        codes = lw.reshape(n, groups, v).argmax(dim=-1)
        quantized = cb.unsqueeze(0).expand(n, -1, -1, -1).gather(
            2, codes[:, :, None, None].expand(-1, -1, 1, d)).squeeze(2)
    return quantized.reshape(n, groups * d), codes, prob_m, code_m
