"""wav2vec 2.0 contrastive loss from indices: fused forward and backward, never (N, K+1, D).

Public ops: ``contrastive_loss`` (given negatives) and ``wav2vec2_contrastive_loss`` (samples
negatives on the device with ``sslfast.sample_negatives`` and calls the fused loss).

Layers: the spec is ``sslfast.reference.contrastive``; the C++ (``csrc/contrastive_cpu.cpp``)
and CUDA (``csrc/contrastive_cuda.cu``) kernels share ``csrc/contrastive.h``; the Triton
kernels are ``sslfast.kernels.contrastive``. Kernel backends run behind two custom ops,
``sslfast::contrastive_loss`` (per-row loss, the row statistics (2, N): lse's two parts, the
max and log s, kept apart as csrc/contrastive.h RowStats explains, correct flag) and
``sslfast::contrastive_loss_backward`` (grad x, grad y), so ``torch.compile(fullgraph=True)``
traces the public function. The reduction runs in torch on the per-row losses.

grad y and determinism: every candidate (row i, slot k) adds ``alpha * x_i + beta * y_j`` to
row j of grad y. The CPU backend always accumulates these with a segmented sum over a CSR of
the candidates (race-free, deterministic). The CUDA and Triton backends use fp32 atomics by
default (fast; the summation order, and so the last bits, vary between runs) and the same
segmented sum with ``deterministic=True``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _dispatch, _ext
from .. import _validation as V
from .._validation import INDEX_DTYPES, check_choice, check_same_device, check_tensor
from ..reference import contrastive as ref
from ..reference.contrastive import ContrastiveStats

__all__ = ["contrastive_loss", "wav2vec2_contrastive_loss", "ContrastiveStats"]

OP = "contrastive_loss"
OP_BACKWARD = "contrastive_loss_backward"
NEG_MODE = {"none": 0, "vector": 1, "index": 2}
PRECISION = {"fairseq": 0, "hf": 1}


# --------------------------------------------------------------------------- shared helpers


def candidate_csr(negatives: torch.Tensor, positives: Optional[torch.Tensor], n: int, m: int):
    """For each target row j, the flat candidate slots e = i*(K+1)+k that gather y[j].

    Returns ``order`` (N*(K+1),) int64, slots sorted by target (stable, so the segmented
    sums add in a fixed order) and ``offsets`` (M+1,) int64. Indices are clamped like the
    kernels clamp them.
    """
    dev = negatives.device
    pos = positives.long() if positives is not None else torch.arange(n, device=dev)
    idx = torch.cat([pos.reshape(n, 1), negatives.long()], dim=1).reshape(-1).clamp_(0, max(m - 1, 0))
    order = torch.argsort(idx, stable=True)
    offsets = torch.zeros(m + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(idx, minlength=m), 0, out=offsets[1:])
    return order, offsets


def _itype(t: Optional[torch.Tensor]) -> int:
    return _ext.ITYPE_CODE[t.dtype] if t is not None else 0


# --------------------------------------------------------------------------- cpu backend


@_dispatch.register(OP, "cpu")
def _forward_cpu(x, y, negatives, positives, temperature, neg_mode, precision):
    n, d = x.shape
    m, k = y.shape[0], negatives.shape[1]
    loss = torch.empty(n, dtype=torch.float32)
    stats = torch.empty(2, n, dtype=torch.float32)
    correct = torch.empty(n, dtype=torch.bool)
    if n == 0:
        return loss, stats, correct
    ysq = torch.empty(m, dtype=torch.float32)
    _ext.cpu_module().contrastive_forward(
        _ext.ptr(x), _ext.ptr(y), _ext.ptr(negatives), _itype(negatives), _ext.ptr(positives), _itype(positives),
        _ext.ptr(ysq), _ext.ptr(loss), _ext.ptr(stats), _ext.ptr(correct), n, m, d, k, _ext.DTYPE_CODE[x.dtype],
        temperature, neg_mode, precision)
    return loss, stats, correct


@_dispatch.register(OP_BACKWARD, "cpu")
def _backward_cpu(grad_rows, x, y, negatives, positives, stats, temperature, neg_mode, precision, deterministic):
    n, d = x.shape
    m, k = y.shape[0], negatives.shape[1]
    grad_x = torch.empty_like(x)
    grad_y = torch.empty_like(y)
    if n == 0:
        return grad_x, grad_y.zero_()
    ysq = torch.empty(m, dtype=torch.float32)
    alpha = torch.empty(n, k + 1, dtype=torch.float32)
    beta = torch.empty(n, k + 1, dtype=torch.float32)
    C = _ext.cpu_module()
    dt = _ext.DTYPE_CODE[x.dtype]
    C.contrastive_backward_rows(
        _ext.ptr(grad_rows), _ext.ptr(x), _ext.ptr(y), _ext.ptr(negatives), _itype(negatives), _ext.ptr(positives),
        _itype(positives), _ext.ptr(stats), _ext.ptr(ysq), _ext.ptr(grad_x), _ext.ptr(alpha), _ext.ptr(beta), n, m, d,
        k, dt, temperature, neg_mode, precision)
    order = torch.empty(n * (k + 1), dtype=torch.int64)
    offsets = torch.empty(m + 1, dtype=torch.int64)
    C.contrastive_build_csr(_ext.ptr(negatives), _itype(negatives), _ext.ptr(positives), _itype(positives),
                            _ext.ptr(order), _ext.ptr(offsets), n, m, k)
    C.contrastive_backward_segments(_ext.ptr(x), _ext.ptr(y), _ext.ptr(alpha), _ext.ptr(beta), _ext.ptr(order),
                                    _ext.ptr(offsets), _ext.ptr(grad_y), m, d, k, dt)
    return grad_x, grad_y


# --------------------------------------------------------------------------- cuda backend


@_dispatch.register(OP, "cuda")
def _forward_cuda(x, y, negatives, positives, temperature, neg_mode, precision):
    n, d = x.shape
    m, k = y.shape[0], negatives.shape[1]
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    stats = torch.empty(2, n, dtype=torch.float32, device=x.device)
    correct = torch.empty(n, dtype=torch.bool, device=x.device)
    if n == 0:
        return loss, stats, correct
    _ext.cuda_module().contrastive_forward(
        _ext.ptr(x), _ext.ptr(y), _ext.ptr(negatives), _itype(negatives), _ext.ptr(positives), _itype(positives),
        _ext.ptr(loss), _ext.ptr(stats), _ext.ptr(correct), n, m, d, k, _ext.DTYPE_CODE[x.dtype], temperature,
        neg_mode, precision, _ext.stream(x.device))
    return loss, stats, correct


@_dispatch.register(OP_BACKWARD, "cuda")
def _backward_cuda(grad_rows, x, y, negatives, positives, stats, temperature, neg_mode, precision, deterministic):
    n, d = x.shape
    m, k = y.shape[0], negatives.shape[1]
    dev = x.device
    grad_x = torch.empty_like(x)
    if n == 0:
        return grad_x, torch.zeros_like(y)
    C = _ext.cuda_module()
    dt = _ext.DTYPE_CODE[x.dtype]
    stream = _ext.stream(dev)
    if deterministic:
        alpha = torch.empty(n, k + 1, dtype=torch.float32, device=dev)
        beta = torch.empty(n, k + 1, dtype=torch.float32, device=dev)
        gy_acc = None
    else:
        alpha = torch.empty(n, k + 1, dtype=torch.float32, device=dev)  # scratch of grad x's pass
        beta = None
        gy_acc = torch.zeros(m, d, dtype=torch.float32, device=dev)
    C.contrastive_backward_rows(
        _ext.ptr(grad_rows), _ext.ptr(x), _ext.ptr(y), _ext.ptr(negatives), _itype(negatives), _ext.ptr(positives),
        _itype(positives), _ext.ptr(stats), _ext.ptr(grad_x), _ext.ptr(alpha), _ext.ptr(beta), _ext.ptr(gy_acc), n, m,
        d, k, dt, temperature, neg_mode, precision, stream)
    if not deterministic:
        return grad_x, gy_acc.to(y.dtype)
    grad_y = torch.empty_like(y)
    order, offsets = candidate_csr(negatives, positives, n, m)
    C.contrastive_backward_segments(_ext.ptr(x), _ext.ptr(y), _ext.ptr(alpha), _ext.ptr(beta), _ext.ptr(order),
                                    _ext.ptr(offsets), _ext.ptr(grad_y), m, d, k, dt, stream)
    return grad_x, grad_y


# --------------------------------------------------------------------------- triton backend


@_dispatch.register(OP, "triton")
def _forward_triton(x, y, negatives, positives, temperature, neg_mode, precision):
    from ..kernels import contrastive as kc

    return kc.forward(x, y, negatives, positives, temperature, neg_mode, precision)


@_dispatch.register(OP_BACKWARD, "triton")
def _backward_triton(grad_rows, x, y, negatives, positives, stats, temperature, neg_mode, precision, deterministic):
    from ..kernels import contrastive as kc

    csr = candidate_csr(negatives, positives, x.shape[0], y.shape[0]) if deterministic else None
    return kc.backward(grad_rows, x, y, negatives, positives, stats, temperature, neg_mode, precision, csr)


_dispatch.register(OP, "reference")(ref.contrastive_loss)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("sslfast::contrastive_loss", mutates_args=())
def _loss_op(x: torch.Tensor, y: torch.Tensor, negatives: torch.Tensor, positives: Optional[torch.Tensor],
             temperature: float, neg_mode: int, precision: int, deterministic: bool,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dispatch.get(OP, backend)(x, y, negatives, positives, temperature, neg_mode, precision)


@_loss_op.register_fake
def _(x, y, negatives, positives, temperature, neg_mode, precision, deterministic, backend):
    n = x.shape[0]
    f = x.new_empty(n, dtype=torch.float32)
    return f, x.new_empty(2, n, dtype=torch.float32), x.new_empty(n, dtype=torch.bool)


@torch.library.custom_op("sslfast::contrastive_loss_backward", mutates_args=())
def _loss_backward_op(grad_rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, negatives: torch.Tensor,
                      positives: Optional[torch.Tensor], stats: torch.Tensor, temperature: float, neg_mode: int,
                      precision: int, deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _dispatch.get(OP_BACKWARD, backend)(grad_rows.contiguous(), x, y, negatives, positives, stats, temperature,
                                               neg_mode, precision, deterministic)


@_loss_backward_op.register_fake
def _(grad_rows, x, y, negatives, positives, stats, temperature, neg_mode, precision, deterministic, backend):
    return torch.empty_like(x), torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, y, negatives, positives, temperature, neg_mode, precision, deterministic, backend = inputs
    ctx.save_for_backward(x, y, negatives, positives, output[1])
    ctx.args = (temperature, neg_mode, precision, deterministic, backend)


def _backward(ctx, grad_rows, grad_lse, grad_correct):
    x, y, negatives, positives, stats = ctx.saved_tensors
    if grad_rows is None:
        grad_rows = torch.zeros_like(stats[0])
    grad_x, grad_y = torch.ops.sslfast.contrastive_loss_backward(grad_rows.float(), x, y, negatives, positives, stats,
                                                                *ctx.args)
    return grad_x, grad_y, None, None, None, None, None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public ops


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_index_range(name: str, idx: torch.Tensor, m: int) -> None:
    # One host sync (on CUDA): the price of never reading outside y. Skipped while tracing
    # (the kernels clamp indices, so a bad index there gives a wrong row, never a fault).
    if idx.numel() == 0 or _is_compiling():
        return
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= m:
        raise ValueError(f"{name} must index rows of y in [0, {m}), got values in [{lo}, {hi}]")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def _check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"temperature must be a finite float > 0, got {value}")
    return value


def contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    negatives: torch.Tensor,
    positives: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.1,
    reduction: str = "sum",
    neg_is_pos: str = "vector",
    precision: str = "fairseq",
    return_stats: bool = False,
    deterministic: bool = False,
    check_indices: bool = True,
    backend: Optional[str] = None,
):
    """wav2vec 2.0 contrastive loss of predictions ``x`` against targets gathered from ``y``.

    Args:
        x: (N, D) predictions (fp32, fp16 or bf16, math in fp32; fp64 on the reference
            backend, which backend=None picks for it).
        y: (M, D) targets; x and y are promoted to their common dtype as torch promotes.
        negatives: (N, K) int32/int64 indices into y (K may exceed M; duplicates allowed).
        positives: (N,) indices into y, default ``arange(N)`` (needs M >= N).
        temperature: logits are cosine / temperature (wav2vec 2.0: 0.1).
        reduction: ``"sum"`` (fairseq and Hugging Face), ``"mean"`` over rows (0 for N = 0),
            ``"none"`` (per-row losses, (N,)).
        neg_is_pos: negatives whose stored vector equals the positive's get logit -inf:
            ``"vector"`` compares whole vectors (fairseq, Hugging Face), ``"index"`` compares
            indices, ``"none"`` masks nothing. A row whose negatives are all masked has loss 0.
        precision: ``"fairseq"`` divides the fp32 cosine by the temperature and casts the
            logit to the input dtype once; ``"hf"`` casts the cosine to the input dtype first
            and divides in it (two roundings for fp16/bf16). Identical for fp32.
        return_stats: also return fairseq's accuracy: a ``ContrastiveStats`` with ``loss``,
            ``correct`` (rows with argmax 0 and argmin not 0, an int64 tensor on the device)
            and ``count`` (N).
        deterministic: on CUDA/Triton, accumulate grad y with a segmented sum instead of fp32
            atomics (bit-reproducible). The CPU backend is always deterministic.
        check_indices: check that negatives and positives lie in [0, M) (two host reads per
            index tensor: a host sync on a GPU). False skips it (no host sync): the kernels
            clamp an out-of-range index (a wrong row, never a fault); the reference backend
            raises an IndexError on the CPU and a device-side assert on a GPU.
        backend: None (fastest for the device), "reference", "cpu", "triton" or "cuda".

    Returns the fp32 loss (or ``ContrastiveStats``). Differentiable in x and y; the kernels
    save only the per-row log-sum-exp for backward and recompute the logits.

    Differences on purpose: -inf for masked negatives everywhere (fairseq on XLA uses -2**30);
    Hugging Face's all-frames-with-ignore-index evaluation is left to the caller (pass the
    masked rows; ``wav2vec2_contrastive_loss`` does). Fails on indices outside [0, M) with a
    ValueError (a host sync on CUDA; skipped with ``check_indices=False`` and under
    torch.compile, where kernels clamp).
    Finite for fp32 inputs whose squared norms fit in fp32 (elements below about 1e18).
    """
    check_tensor("x", x, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    check_tensor("y", y, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have shape (M, {x.shape[1]}) to match x (N, D), got {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    check_tensor("negatives", negatives, ndim=2, dtypes=INDEX_DTYPES)
    if negatives.shape[0] != n:
        raise ValueError(f"negatives must have shape ({n}, K) to match x, got {tuple(negatives.shape)}")
    if positives is not None:
        check_tensor("positives", positives, dtypes=INDEX_DTYPES, shape=(n,))
    elif m < n:
        raise ValueError(f"positives=None means positives[i] = i, so y needs at least N={n} rows, got M={m}")
    device = check_same_device(x=x, y=y, negatives=negatives, positives=positives)
    temperature = _check_temperature(temperature)
    check_choice("reduction", reduction, ref.REDUCTIONS)
    check_choice("neg_is_pos", neg_is_pos, ref.NEG_IS_POS)
    check_choice("precision", precision, ref.PRECISIONS)
    _check_flag("return_stats", return_stats)
    _check_flag("deterministic", deterministic)
    _check_flag("check_indices", check_indices)
    if n > 0 and m == 0:
        raise ValueError("y has no rows, so no positive or negative can be gathered (M = 0)")
    if check_indices:
        _check_index_range("negatives", negatives, m)
        if positives is not None:
            _check_index_range("positives", positives, m)
    V.check_inputs_finite(OP, x=x, y=y)
    dtype = V.promote_floats(x, y)
    x, y = x.to(dtype), y.to(dtype)

    name = V.resolve_backend(OP, backend, device, x=x)
    if name == "reference":
        return ref.contrastive_loss(x, y, negatives, positives, temperature=temperature, reduction=reduction,
                                    neg_is_pos=neg_is_pos, precision=precision, return_stats=return_stats)
    rows, _lse, correct = torch.ops.sslfast.contrastive_loss(
        x.contiguous(), y.contiguous(), negatives.contiguous(),
        None if positives is None else positives.contiguous(), temperature, NEG_MODE[neg_is_pos],
        PRECISION[precision], deterministic, name)
    loss = ref.reduce_rows(rows, reduction)
    if not return_stats:
        return loss
    return ContrastiveStats(loss=loss, correct=correct.sum(), count=n)


def wav2vec2_contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    num_negatives: int = 100,
    *,
    cross_sample_negatives: int = 0,
    temperature: float = 0.1,
    seed: int | torch.Tensor | None = None,
    convention: str = "fairseq",
    negatives: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    num_masked: Optional[int] = None,
    reduction: str = "sum",
    neg_is_pos: str = "vector",
    precision: Optional[str] = None,
    return_stats: bool = False,
    deterministic: bool = False,
    check_indices: bool = True,
    backend: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
):
    """The wav2vec 2.0 contrastive loss of a batch: sample negatives on the device, fused loss.

    Args:
        x: (B, T, D) predictions (the projected context network output).
        y: (B, T, D) targets (the projected quantized features), same dtype as x.
        mask: (B, T) bool (or 0/1 integers; other values raise ValueError), True at masked
            frames: the rows of the loss and their positives.
        num_negatives, cross_sample_negatives: K within-utterance and Kc cross-sample negatives
            per masked frame, drawn by ``sslfast.sample_negatives`` (uniform, never the positive).
        temperature: logit temperature (0.1 in wav2vec 2.0).
        seed: Philox key of the sampled negatives, as ``sslfast.sample_negatives`` takes it: an
            int in [0, 2**63 - 1]; a 0-d int64 tensor on x's device, read by the kernels when
            they run (no host sync, no graph break under ``torch.compile``, the current value at
            each replay of a captured CUDA graph; ``seed=s`` and ``seed=torch.tensor(s)`` give
            the same loss); or None (default): drawn with ``torch.randint`` from torch's default
            generator of x's device, on the device. DDP: pass
            ``sslfast.derive_seed(base, rank=rank, step=step)`` so ranks draw different negatives
            (rank and step may be 0-d int64 device tensors). Unused when ``negatives`` is given.
        convention: ``"fairseq"``: negatives in the packed layout (indices into ``y[mask]``),
            logits in fairseq's precision order; ``"hf"``: negatives in Hugging Face's layout
            ((B, T, K) flat indices into the B*T frames, its ``sampled_negative_indices``) and its
            precision order. Both give the loss summed over masked frames: Hugging Face evaluates
            every frame and ignores the unmasked ones (target -100), which has the same value and
            gradients as evaluating the masked frames alone, which is what this does.
        negatives: indices in the convention's layout to use instead of sampling (for example
            Hugging Face's ``_sample_negative_indices`` output, or fairseq's packed indices):
            then the loss equals that library's loss on the same negatives. Its last dimension
            must be ``num_negatives + cross_sample_negatives`` (ValueError otherwise).
        padding_mask: (B, T) bool, True at padding, passed to the sampler (a non-bool one
            raises TypeError). attention_mask: Hugging Face's (B, T), 1 at valid frames,
            instead of padding_mask.
        num_masked: ``mask.sum()`` if known on the host: skips the host sync (on GPU) that
            sizing the masked rows needs. Trusted, not checked.
        check_indices: range-check a given ``negatives`` (a host sync on GPU; sampled
            negatives are in range by construction and never checked). With ``num_masked``
            given and either sampled negatives or ``check_indices=False``, the call makes no
            host sync at all (tested on meta tensors and with CUDA's sync debug mode).
        reduction, neg_is_pos, return_stats, deterministic, backend: as ``contrastive_loss``
            (``backend`` is used for both the sampler and the loss).
        precision: ``"fairseq"`` or ``"hf"``; default: the convention's own.

    Returns the loss (fp32) or ``ContrastiveStats``. Gradients flow to x and y; the masked
    rows of x are gathered ((N, D), small), y is never gathered (the kernels index it).
    """
    from .negatives import sample_negatives

    check_tensor("x", x, ndim=3, dtypes=V.REFERENCE_FLOAT_DTYPES)
    check_tensor("y", y, ndim=3, dtypes=V.REFERENCE_FLOAT_DTYPES)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    b, t, d = x.shape
    mask = V.as_bool_mask("mask", mask, (b, t))
    padding_mask = V.padding_from_masks(padding_mask, attention_mask, (b, t))
    V.check_inputs_finite("wav2vec2_contrastive_loss", x=x, y=y)
    _check_flag("check_indices", check_indices)
    if negatives is not None:
        width = V.check_int("num_negatives", num_negatives, min_value=0) + V.check_int(
            "cross_sample_negatives", cross_sample_negatives, min_value=0)
        check_tensor("negatives", negatives, dtypes=INDEX_DTYPES)
        if negatives.dim() == 0 or negatives.shape[-1] != width:
            raise ValueError(
                f"negatives has {negatives.shape[-1] if negatives.dim() else 0} columns (K) but num_negatives + "
                f"cross_sample_negatives = {width}; pass num_negatives={negatives.shape[-1] if negatives.dim() else 0} "
                f"(and cross_sample_negatives=0) to use this tensor")
    check_choice("convention", convention, ("fairseq", "hf"))
    precision = convention if precision is None else precision
    check_same_device(x=x, y=y, mask=mask, padding_mask=padding_mask, negatives=negatives)
    layout = "packed" if convention == "fairseq" else "hf"
    flat_mask = mask.reshape(-1)
    if num_masked is not None:
        rows = torch.nonzero_static(flat_mask, size=num_masked).squeeze(1)  # no host sync
    else:
        rows = flat_mask.nonzero().squeeze(1)
    n = rows.shape[0]
    given = negatives is not None
    if not given:
        # the sampler may lack the loss's backend (e.g. triton): then it picks its own
        sampler_backend = backend if backend in _dispatch.implemented_backends("sample_negatives") else None
        negatives = sample_negatives(mask, num_negatives, cross_sample_negatives=cross_sample_negatives,
                                     padding_mask=padding_mask, layout=layout, seed=seed,
                                     num_masked=num_masked, backend=sampler_backend)
    if convention == "fairseq":
        check_tensor("negatives", negatives, ndim=2, dtypes=INDEX_DTYPES)
        if not given and torch.compiler.is_compiling():
            # the reference sampler's row count is data-dependent under torch.compile (nonzero):
            # a deferred runtime check instead of a guard that would break the graph
            torch._check(negatives.shape[0] == n, lambda: "num_masked does not match mask.sum()")
        elif negatives.shape[0] != n:
            raise ValueError(f"negatives must have shape ({n}, K) (packed, one row per masked frame), "
                             f"got {tuple(negatives.shape)}")
        if given and check_indices:
            _check_index_range("negatives", negatives, n)
        # packed index -> flat frame index, so y is indexed in place instead of copied
        neg_flat = rows[negatives.long()]
    else:
        check_tensor("negatives", negatives, shape=(b, t, None), dtypes=INDEX_DTYPES)
        neg_flat = negatives.reshape(b * t, -1)[rows]
        if given and check_indices:
            _check_index_range("negatives", neg_flat, b * t)
    # rows come from the mask and neg_flat from checked or sampled indices: the loss's own
    # range check would only add host syncs
    return contrastive_loss(x.reshape(b * t, d)[rows], y.reshape(b * t, d), neg_flat, rows,
                            temperature=temperature, reduction=reduction, neg_is_pos=neg_is_pos,
                            precision=precision, return_stats=return_stats, deterministic=deterministic,
                            check_indices=False, backend=backend)
