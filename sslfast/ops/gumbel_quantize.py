"""Public op ``sslfast.gumbel_vector_quantize``: the wav2vec 2.0 Gumbel-softmax vector
quantizer in one fused pass (noise, softmax, argmax, codebook gather, perplexities) with a
fused backward that never builds the (N, G*V, d) one-hot product.

Backends: ``cpu`` (C++/OpenMP), ``cuda``, ``triton`` (GPU, or CPU tensors under
TRITON_INTERPRET=1) and ``reference``. Codes come from one exact noise definition on every
backend (fp64 logs rounded once), so one seed gives the same codes and quantized outputs
everywhere (perplexities agree to float rounding). The cpu backend's backward uses a
vectorised float-log noise (within 1e-6 of the exact one) for the soft probabilities (the
backward, and the soft forward's output): they agree with the other backends to float
tolerance, not bit for bit. Forward memory is the outputs plus (G, V) marginals; the backward
keeps only the codes and redraws the noise from the seed. ``hard=False`` (soft, training)
computes ``softmax((l + g) / tau) @ codebook`` tile by tile (never the (N, G*V, d) product nor
the (N, G*V) probabilities); its codebook gradient ``soft^T grad_q`` is summed in fixed chunks
of frames whose partials are added in order (deterministic on every backend; at most 32
(G*V, d) fp32 partials). Limits: the cuda backward keeps 2V + d floats per row in shared
memory (2V + d <= 12288); Triton walks a row of V in tiles of at most 64 codewords (online
softmax and argmax), so any V fits its shared memory, up to int32 positions (G*V <= 2^31 - 2^16).

Layers: validation and the public function here; the spec in
``sslfast/reference/gumbel_quantize.py``; kernels in ``kernels/gumbel_quantize.py`` (Triton)
and ``csrc/gumbel_quantize*`` (C++ CPU and CUDA, sharing ``csrc/gumbel_quantize.h``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import _dispatch, _ext
from .. import random as sr
from .. import _validation as V
from .._validation import check_int, check_same_device, check_tensor
from ..reference import gumbel_quantize as ref

OP = "gumbel_vector_quantize"
OP_BWD = "gumbel_vector_quantize_backward"

__all__ = ["GumbelQuantizeOutput", "gumbel_vector_quantize"]


class GumbelQuantizeOutput(NamedTuple):
    quantized: torch.Tensor  # (N, G*d), codebook dtype
    codes: torch.Tensor  # (N, G) int64
    prob_perplexity: torch.Tensor  # () fp32, differentiable
    code_perplexity: torch.Tensor  # () fp32, no gradient


# ----------------------------------------------------------------------------- backends
# Every kernel backend implements forward(logits, codebook, mask_u8, groups, tau, hard, training,
# seed) -> (quantized, codes, prob_sum, code_sum) and backward(grad_q, w, logits, codebook, codes,
# mask_u8, groups, tau, hard, training, seed) -> (grad_logits, grad_codebook); the marginals are
# the sums divided by the number of selected frames, done once here. ``hard`` is True whenever
# training is False (eval quantizes by the argmax either way), so hard=False means the soft
# training path. ``seed`` is an int or a 0-d int64 tensor on the logits' device
# (sslfast.random.resolve_seed): the kernels read it (the C++ CPU ones on the host, from a
# CPU tensor; CUDA and Triton on the device).


def _count(mask: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    if mask is None:  # a fill, not a host-to-device copy: capturable in a CUDA graph
        return torch.full((), float(max(n, 1)), device=device)
    return mask.sum().to(torch.float32).clamp_min(1.0)


def _empty_forward(logits, codebook, groups):
    gv, d = codebook.shape
    dev = logits.device
    return (torch.empty(0, groups * d, dtype=codebook.dtype, device=dev),
            torch.empty(0, groups, dtype=torch.int64, device=dev),
            torch.zeros(groups, gv // groups, device=dev), torch.zeros(groups, gv // groups, device=dev))


@_dispatch.register(OP, "reference")
def _forward_reference(logits, codebook, mask, groups, tau, hard, training, seed):
    return ref.gumbel_vector_quantize(logits, codebook, groups=groups, tau=tau, hard=hard, training=training,
                                      seed=seed, mask=None if mask is None else mask.bool())


@_dispatch.register(OP, "cpu")
def _forward_cpu(logits, codebook, mask, groups, tau, hard, training, seed):
    n, gv = logits.shape
    d = codebook.shape[1]
    if n == 0:
        return _empty_forward(logits, codebook, groups)
    quantized = torch.empty(n, groups * d, dtype=codebook.dtype)
    codes = torch.empty(n, groups, dtype=torch.int64)
    prob_sum = torch.empty(groups, gv // groups)
    code_sum = torch.empty(groups, gv // groups)
    cbf = None if hard else codebook.float().contiguous()  # the soft product reads fp32 rows
    _ext.cpu_module().gumbel_quantize_forward(
        _ext.ptr(logits), _ext.DTYPE_CODE[logits.dtype], _ext.ptr(codebook), _ext.DTYPE_CODE[codebook.dtype],
        _ext.ptr(cbf), n, groups, gv // groups, d, training, hard, float(tau), sr.seed_value(seed), _ext.ptr(mask),
        _ext.ptr(quantized), _ext.ptr(codes), _ext.ptr(prob_sum), _ext.ptr(code_sum))
    count = _count(mask, n, logits.device)
    return quantized, codes, prob_sum / count, code_sum / count


def _codebook_t(codebook, groups):
    """(G, d, V) fp32: the backward's matvec runs over codewords with unit stride."""
    gv, d = codebook.shape
    return codebook.float().reshape(groups, gv // groups, d).transpose(1, 2).contiguous()


def _backward_native(module, seed_args, extra_args, grad_q, w, logits, codebook, codes, mask, groups, tau, hard,
                     training):
    """The C++ and CUDA backward take the same arguments (CUDA adds the seed tensor's pointer after
    the seed, ``seed_args``, and its workspace and stream, ``extra_args``)."""
    n, gv = logits.shape
    d = codebook.shape[1]
    grad_logits = torch.empty_like(logits)
    grad_cb = torch.empty_like(codebook)
    if n == 0:
        return grad_logits, grad_cb.zero_()
    cbt = _codebook_t(codebook, groups)
    module.gumbel_quantize_backward(
        _ext.ptr(grad_q), _ext.DTYPE_CODE[grad_q.dtype], _ext.ptr(logits), _ext.DTYPE_CODE[logits.dtype],
        _ext.ptr(cbt), _ext.ptr(codes), _ext.ptr(mask), _ext.ptr(w), n, groups, gv // groups, d, training, hard,
        float(tau), *seed_args, _ext.ptr(grad_logits), _ext.DTYPE_CODE[codebook.dtype], _ext.ptr(grad_cb),
        *extra_args)
    return grad_logits, grad_cb


@_dispatch.register(OP_BWD, "cpu")
def _backward_cpu(grad_q, w, logits, codebook, codes, mask, groups, tau, hard, training, seed):
    return _backward_native(_ext.cpu_module(), (sr.seed_value(seed),), (), grad_q, w, logits, codebook, codes, mask,
                            groups, tau, hard, training)


@_dispatch.register(OP, "triton")
def _forward_triton(logits, codebook, mask, groups, tau, hard, training, seed):
    from ..kernels import gumbel_quantize as kgq

    if logits.shape[0] == 0:
        return _empty_forward(logits, codebook, groups)
    quantized, codes, prob_sum, code_sum = kgq.forward(logits, codebook, mask, groups, tau, hard, training, seed)
    count = _count(mask, logits.shape[0], logits.device)
    return quantized, codes, prob_sum / count, code_sum / count


@_dispatch.register(OP_BWD, "triton")
def _backward_triton(grad_q, w, logits, codebook, codes, mask, groups, tau, hard, training, seed):
    from ..kernels import gumbel_quantize as kgq

    if logits.shape[0] == 0:
        return torch.empty_like(logits), torch.zeros_like(codebook)
    return kgq.backward(grad_q, w, logits, _codebook_t(codebook, groups), codes, mask, groups, tau, hard, training,
                        seed, codebook.dtype)


@_dispatch.register(OP, "cuda")
def _forward_cuda(logits, codebook, mask, groups, tau, hard, training, seed):
    n, gv = logits.shape
    d = codebook.shape[1]
    if n == 0:
        return _empty_forward(logits, codebook, groups)
    dev = logits.device
    quantized = torch.empty(n, groups * d, dtype=codebook.dtype, device=dev)
    codes = torch.empty(n, groups, dtype=torch.int64, device=dev)
    n_chunks = _ext.cuda_module().gumbel_quantize_num_chunks(n)
    partial = torch.empty(n_chunks, 2, gv, device=dev)
    sums = torch.empty(2, groups, gv // groups, device=dev)
    _ext.cuda_module().gumbel_quantize_forward(
        _ext.ptr(logits), _ext.DTYPE_CODE[logits.dtype], _ext.ptr(codebook), _ext.DTYPE_CODE[codebook.dtype],
        n, groups, gv // groups, d, training, hard, float(tau), *sr.seed_args(seed), _ext.ptr(mask),
        _ext.ptr(quantized), _ext.ptr(codes), _ext.ptr(partial), _ext.ptr(sums), _ext.stream(dev))
    count = _count(mask, n, dev)
    return quantized, codes, sums[0] / count, sums[1] / count


@_dispatch.register(OP_BWD, "cuda")
def _backward_cuda(grad_q, w, logits, codebook, codes, mask, groups, tau, hard, training, seed):
    module = _ext.cuda_module()
    n, gv = logits.shape
    # soft path: per-row softmax statistics and the per-chunk codebook-gradient partials
    ws = torch.empty(0 if hard else module.gumbel_quantize_soft_workspace(n, groups, gv // groups, codebook.shape[1]),
                     device=logits.device)
    extra = (_ext.ptr(ws) if ws.numel() else 0, _ext.stream(logits.device))
    return _backward_native(module, sr.seed_args(seed), extra, grad_q, w, logits, codebook, codes, mask, groups, tau,
                            hard, training)


# ----------------------------------------------------------------------------- custom ops
# The seed crosses the custom ops as (seed: int, seed_t: Tensor?): sr.split_seed / join_seed.


@torch.library.custom_op("sslfast::gumbel_vector_quantize", mutates_args=())
def _gvq_op(logits: torch.Tensor, codebook: torch.Tensor, mask: Optional[torch.Tensor], groups: int, tau: float,
            hard: bool, training: bool, seed: int, seed_t: Optional[torch.Tensor],
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_dispatch.get(OP, backend)(logits, codebook, mask, groups, tau, hard, training,
                                            sr.join_seed(seed, seed_t)))


@_gvq_op.register_fake
def _gvq_fake(logits, codebook, mask, groups, tau, hard, training, seed, seed_t, backend):
    n, gv = logits.shape
    d = codebook.shape[1]
    return (logits.new_empty(n, groups * d, dtype=codebook.dtype), logits.new_empty(n, groups, dtype=torch.int64),
            logits.new_empty(groups, gv // groups, dtype=torch.float32),
            logits.new_empty(groups, gv // groups, dtype=torch.float32))


@torch.library.custom_op("sslfast::gumbel_vector_quantize_backward", mutates_args=())
def _gvq_backward_op(grad_q: torch.Tensor, w: Optional[torch.Tensor], logits: torch.Tensor, codebook: torch.Tensor,
                     codes: torch.Tensor, mask: Optional[torch.Tensor], groups: int, tau: float, hard: bool,
                     training: bool, seed: int, seed_t: Optional[torch.Tensor],
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_dispatch.get(OP_BWD, backend)(grad_q, w, logits, codebook, codes, mask, groups, tau, hard,
                                                training, sr.join_seed(seed, seed_t)))


@_gvq_backward_op.register_fake
def _gvq_backward_fake(grad_q, w, logits, codebook, codes, mask, groups, tau, hard, training, seed, seed_t,
                       backend):
    return torch.empty_like(logits), torch.empty_like(codebook)


def _setup_context(ctx, inputs, output):
    logits, codebook, mask, groups, tau, hard, training, seed, seed_t, backend = inputs
    # p is recomputed in the backward from the logits and the seed (one Philox draw per
    # element), not saved: it would be N*G*V fp32 more per call (8 MB at wav2vec 2.0 base).
    # A seed tensor is saved as a tensor (never read on the host): the backward's kernels load
    # the same key, also in a captured CUDA graph; changing it in place before the backward
    # raises autograd's version-counter error instead of redrawing other noise.
    ctx.save_for_backward(logits, codebook, mask, output[1], seed_t)
    ctx.groups, ctx.tau, ctx.hard, ctx.training, ctx.seed, ctx.backend = groups, tau, hard, training, seed, backend


def _backward(ctx, grad_q, grad_codes, grad_prob_m, grad_code_m):
    logits, codebook, mask, codes, seed_t = ctx.saved_tensors
    if grad_q is None:
        grad_q = torch.zeros(logits.shape[0], ctx.groups * codebook.shape[1], dtype=codebook.dtype,
                             device=logits.device)
    w = None
    if grad_prob_m is not None:
        # d prob_marginal / d softmax row = 1 / count on selected frames
        w = (grad_prob_m.float() / _count(mask, logits.shape[0], logits.device)).contiguous()
    grad_logits, grad_cb = torch.ops.sslfast.gumbel_vector_quantize_backward(
        grad_q.contiguous(), w, logits, codebook, codes, mask, ctx.groups, ctx.tau, ctx.hard, ctx.training,
        ctx.seed, seed_t, ctx.backend)
    return grad_logits, grad_cb, None, None, None, None, None, None, None, None


_gvq_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def gumbel_vector_quantize(
    logits: torch.Tensor,
    codebook: torch.Tensor,
    *,
    groups: int,
    tau: float = 2.0,
    hard: bool = True,
    training: bool = True,
    seed: int | torch.Tensor | None = None,
    mask: Optional[torch.Tensor] = None,
    perplexity_eps: float = 1e-7,
    backend: Optional[str] = None,
) -> GumbelQuantizeOutput:
    """Gumbel-softmax vector quantization (wav2vec 2.0), fused.

    Args:
        logits: (N, G*V) float32/16/bf16, the output of the quantizer's ``weight_proj``; row
            (n, g) is ``logits[n, g*V:(g+1)*V]``. Math is fp32 (fp64 inputs run on the
            reference backend, which backend=None picks for them, in fp64).
        codebook: (G*V, d) or (1, G*V, d) (how fairseq's ``vars`` and HF's ``codevectors``
            are stored). fairseq's ``combine_groups`` is ``vars.repeat(1, G, 1)`` by the caller.
        groups: G. tau: Gumbel-softmax temperature (> 0; fairseq's ``curr_temp``, HF's
            ``temperature``). hard: straight-through (exact one-hot forward value);
            ``hard=False`` (fairseq's ``hard=False``) returns ``softmax((l + g) / tau) @ codebook``
            in training, fused on every backend, with the same noise (so the same codes) as
            ``hard=True`` for one seed. In eval ``hard`` has no effect: the argmax codeword,
            as fairseq and HF.
        training: True draws Gumbel noise; False takes the argmax of the logits (no noise).
        seed: Philox key of the noise: an int in [0, 2^63 - 1]; a 0-d (or one-element) int64
            tensor on the logits' device, whose 64 bits are the key, read by the kernels when
            they run (no host sync, no graph break under ``torch.compile``; a captured CUDA
            graph replays with the tensor's value at replay; the kernels' backward, which
            redraws the noise, keeps the tensor, so changing it in place before the backward
            raises autograd's in-place error: in a loop, pass ``derive_seed(base, step=step)``,
            a new tensor each call, and advance ``step``); or None: a key drawn with ``torch.randint`` from torch's
            default generator of the logits' device, as a device tensor (no sync;
            ``torch.manual_seed`` makes runs repeatable; fresh at every CUDA-graph replay).
            ``seed=s`` and ``seed=torch.tensor(s)`` draw the same noise, and one seed gives
            the same codes on every backend. DDP: ranks given one seed draw the same noise;
            pass ``sslfast.derive_seed(base, rank=rank, step=step)`` (rank and step may be
            device tensors, e.g. a step counter advanced with ``step.add_(1)`` inside a
            captured graph). See ``sslfast.random.resolve_seed``.
        mask: None (all frames) or a bool tensor with N elements (e.g. HF's
            ``mask_time_indices`` (B, T)): the frames the perplexities average over.
            ``quantized`` and ``codes`` cover every frame.
        perplexity_eps: ``exp(-sum p log(p + eps))``; fairseq 1e-7, HF 0 (``xlogy``).

    Returns ``GumbelQuantizeOutput(quantized (N, G*d) in the codebook's dtype, codes (N, G)
    int64, prob_perplexity, code_perplexity)``. ``prob_perplexity`` is fairseq's (softmax of
    the noiseless logits averaged over the selected frames, the diversity-loss term; HF's
    training-mode perplexity with ``perplexity_eps=0``), differentiable. ``code_perplexity``
    is the perplexity of the noiseless argmax histogram (fairseq's logged value; HF's
    eval-mode perplexity with ``perplexity_eps=0``), without gradient.

    Gradients: logits through the soft probabilities (straight-through for ``hard=True``, the
    true derivative for ``hard=False``; the same formula, divided by tau) plus the
    prob-perplexity term; codebook: the output gradient added into each chosen row
    (``hard=True``, and eval) or ``sum_n soft[n, g, v] grad_q[n, g]`` (``hard=False``). In eval
    no gradient reaches the logits through ``quantized`` (as in fairseq and HF).

    Differs on purpose: exact one-hot forward values; noise from a seeded counter-based
    stream with the uniform clamped to [2^-24, 1 - 2^-24] (finite for every finite logit);
    no frame selected gives perplexity G instead of HF's NaN. See
    ``sslfast.reference.gumbel_quantize`` for the full specification.

    Raises TypeError/ValueError for bad arguments (shapes, dtypes, tau, flags, mask, seed);
    ValueError where a backend's limit is passed: cuda needs 2*V + d <= 12288; triton takes
    any V but indexes in int32 (G*V and N at most 2^31 - 2^16).
    """
    check_tensor("logits", logits, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    check_tensor("codebook", codebook, ndim=(2, 3), dtypes=V.REFERENCE_FLOAT_DTYPES)
    groups = check_int("groups", groups, min_value=1)
    n, gv = logits.shape
    if gv == 0 or gv % groups:
        raise ValueError(f"logits must have G*V columns with V >= 1 for groups={groups}, got shape {tuple(logits.shape)}")
    if codebook.dim() == 3:
        if codebook.shape[0] != 1:
            raise ValueError(f"a 3-d codebook must have shape (1, G*V, d), got {tuple(codebook.shape)}")
        codebook = codebook[0]
    if codebook.shape[0] != gv or codebook.shape[1] == 0:
        raise ValueError(f"codebook must have shape (G*V, d) = ({gv}, d >= 1) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(codebook.shape)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__} ({tau!r})")
    tau = float(tau)
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite float > 0, got {tau}")
    _check_flag("hard", hard)
    _check_flag("training", training)
    if isinstance(perplexity_eps, bool) or not isinstance(perplexity_eps, (int, float)) or not (
            0.0 <= float(perplexity_eps) < 1.0):
        raise ValueError(f"perplexity_eps must be a float in [0, 1), got {perplexity_eps!r}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,))
        if mask.numel() != n:
            raise ValueError(f"mask must have N = {n} elements (one per logits row), got shape {tuple(mask.shape)}")
        mask = mask.reshape(n)
    device = check_same_device(logits=logits, codebook=codebook, mask=mask)
    seed = sr.resolve_seed(seed, device=device)  # None: a device tensor drawn without a sync

    V.check_inputs_finite(OP, logits=logits, codebook=codebook)
    name = V.resolve_backend(OP, backend, device, logits=logits, codebook=codebook)
    hard = hard or not training  # eval takes the argmax whatever hard says (fairseq, HF)

    if name == "cuda" and 2 * (gv // groups) + codebook.shape[1] > 12288:
        raise ValueError(f"the cuda backend needs 2*V + d <= 12288 (shared memory of its backward), got "
                         f"V={gv // groups}, d={codebook.shape[1]}; use backend='triton'")
    if name == "triton":
        from ..kernels import gumbel_quantize as kgq

        if gv > kgq.MAX_COLUMNS or n > kgq.MAX_ROWS:
            raise ValueError(f"the triton backend indexes positions g*V + v and frames in int32: it needs "
                             f"G*V <= {kgq.MAX_COLUMNS} and N <= {kgq.MAX_ROWS}, got V={gv // groups}, G={groups}, "
                             f"N={n}")
    if name == "reference":
        quantized, codes, prob_m, code_m = ref.gumbel_vector_quantize(
            logits, codebook, groups=groups, tau=tau, hard=hard, training=training, seed=seed, mask=mask)
    else:
        mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)
        quantized, codes, prob_m, code_m = torch.ops.sslfast.gumbel_vector_quantize(
            logits.contiguous(), codebook.contiguous(), mask_u8, groups, tau, hard, training, *sr.split_seed(seed),
            name)
    eps = float(perplexity_eps)
    return GumbelQuantizeOutput(quantized, codes, ref.perplexity(prob_m, eps), ref.perplexity(code_m.detach(), eps))
