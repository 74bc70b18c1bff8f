"""Random-projection quantization (BEST-RQ labels) and nearest-codeword (k-means) assignment.

``random_projection_quantize(x, projection, codebooks, *, stack=1, input_norm=None,
metric="cosine", mask=None, backend=None) -> LongTensor``

    x (B, T, F) or (N, F); projection (F*stack, H*d); codebooks (H, V, d). Output (B, T//stack, H)
    or (N, H): for each (stacked) frame and head, the index of the best codeword. One kernel
    pass: stack k frames frame-major (addressing, no copy; the last T % k frames of each
    sequence are dropped), optional LayerNorm without affine (``input_norm="layernorm"``, eps
    1e-5), project, then ``metric="cosine"``: argmax of normalize(y_h) . normalize(c_hv) (==
    argmin L2 between unit vectors: SpeechBrain, NeMo's default, lucidrains) or ``"l2"``: argmin
    |y_h - c_hv|^2 on the raw vectors (NeMo's ``dist_fn="l2"``). Ties go to the lowest index;
    under the cosine metric an all-zero row gets label 0. ``mask`` (bool, (B, T//stack) or
    (N,)): only True positions are computed, the others are -1. The (N, V) score matrix is
    never materialised (SpeechBrain's formulation materialises (B, V, T, d), NeMo's older l2
    path (B, T, H, d, V)). A 2-D x takes ``stack=1`` (rows of different utterances must not be
    stacked together).

``nearest_codeword(x, centroids, *, metric="l2", backend=None) -> LongTensor``

    x (..., D), centroids (V, D): argmin_v |x|^2 - 2 x.c_v + |c_v|^2 (HuBERT's k-means labels;
    the kernels drop the constant |x|^2, which only matters for rounding at near-ties), or
    ``metric="cosine"``. Output shape x.shape[:-1].

Storage fp32/fp16/bf16 (each tensor independently), math fp32 (fp64 inputs run on the
reference backend, in fp64); the projection is converted
to fp32 once per call (it is small), x and the codebooks are converted as they are read.
Labels are integers, so nothing here is differentiable. Non-finite inputs give unspecified
(but in-range) labels: a NaN score never wins in the kernels, while the reference's argmax
takes it.

Backends: reference (sslfast.reference.rp_quantize), cpu (C++ on std::threads; AVX-512,
AVX2+FMA or SSE2 picked at run time, every path returning the same labels), triton (projected
head width d <= 256), cuda (F*stack + H*d <= 12288 floats staged in shared memory per row).
"""
from __future__ import annotations

import torch

from .. import _dispatch, _ext
from .. import _validation as V
from ..reference import rp_quantize as ref

OP_RPQ = "random_projection_quantize"
OP_NC = "nearest_codeword"
METRICS = ("cosine", "l2")
INPUT_NORMS = (None, "layernorm")
_METRIC_CODE = {"cosine": 0, "l2": 1}

__all__ = ["random_projection_quantize", "nearest_codeword"]


# ----------------------------------------------------------------------------- validation


def _check_rpq(x, projection, codebooks, stack, input_norm, metric, mask):
    V.check_tensor("x", x, ndim=(2, 3), dtypes=V.REFERENCE_FLOAT_DTYPES)
    V.check_tensor("projection", projection, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    V.check_tensor("codebooks", codebooks, ndim=3, dtypes=V.REFERENCE_FLOAT_DTYPES)
    V.check_int("stack", stack, min_value=1)
    V.check_choice("input_norm", input_norm, INPUT_NORMS)
    V.check_choice("metric", metric, METRICS)
    V.check_same_device(x=x, projection=projection, codebooks=codebooks, mask=mask)
    if x.dim() == 2 and stack != 1:
        raise ValueError(
            f"stack must be 1 for a 2-D x (N, F) of already flattened rows, got stack={stack}; pass x as (B, T, F)"
        )
    H, Vn, d = codebooks.shape
    if H < 1 or Vn < 1 or d < 1:
        raise ValueError(f"codebooks must have shape (H, V, d) with H, V, d >= 1, got {tuple(codebooks.shape)}")
    if Vn >= 2**31:
        raise ValueError(f"codebooks must hold fewer than 2**31 codewords per head, got V={Vn}")
    in_dim = x.shape[-1] * stack
    if tuple(projection.shape) != (in_dim, H * d):
        raise ValueError(
            f"projection must have shape (F*stack, H*d) = ({in_dim}, {H * d}) for x of feature size {x.shape[-1]}, "
            f"stack={stack} and codebooks {tuple(codebooks.shape)}, got {tuple(projection.shape)}"
        )
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one feature, got shape {tuple(x.shape)}")
    out_lead = (x.shape[0], x.shape[1] // stack) if x.dim() == 3 else (x.shape[0],)
    if mask is not None:
        V.check_tensor("mask", mask, dtypes=(torch.bool,))
        if tuple(mask.shape) != out_lead:
            raise ValueError(
                f"mask must have the output's leading shape {out_lead} (one flag per stacked frame), got "
                f"{tuple(mask.shape)}; sslfast.nn.RandomProjectionQuantizer.stacked_mask turns frame masks into it"
            )
    return out_lead + (H,)


def _check_nc(x, centroids, metric):
    V.check_tensor("x", x, dtypes=V.REFERENCE_FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., D), got a scalar")
    V.check_tensor("centroids", centroids, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    V.check_choice("metric", metric, METRICS)
    V.check_same_device(x=x, centroids=centroids)
    if not 1 <= centroids.shape[0] < 2**31:
        raise ValueError(f"centroids must hold between 1 and 2**31 - 1 centroids, got shape {tuple(centroids.shape)}")
    if centroids.shape[1] != x.shape[-1]:
        raise ValueError(
            f"centroids must have shape (V, D) with D = x.shape[-1] = {x.shape[-1]}, got {tuple(centroids.shape)}"
        )
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one feature, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------- kernel backends
# Every kernel backend runs one pass over "stacked rows" of a contiguous (B, T, F) input;
# nearest_codeword is the same pass with no projection and one head (d = D).


def _prepare(x, projection, codebooks, mask):
    x3 = (x if x.dim() == 3 else x.unsqueeze(0)).contiguous()
    proj = None if projection is None else projection.to(torch.float32).contiguous()
    cb = codebooks.contiguous()
    m = None if mask is None else mask.reshape(-1).contiguous().view(torch.uint8)
    return x3, proj, cb, m


def _run_cpu(x3, proj, cb, stack, layernorm, metric, m, out):
    B, T, F = x3.shape
    H, Vn, d = cb.shape
    _ext.cpu_module().rp_quantize(
        _ext.ptr(x3), _ext.DTYPE_CODE[x3.dtype], B, T, F, stack, _ext.ptr(proj), _ext.ptr(cb),
        _ext.DTYPE_CODE[cb.dtype], H, Vn, d, bool(layernorm), metric, _ext.ptr(m), _ext.ptr(out),
    )


def _run_cuda(x3, proj, cb, stack, layernorm, metric, m, out):
    B, T, F = x3.shape
    H, Vn, d = cb.shape
    staged = F * stack + (H * d if proj is not None else 0)
    if staged > 12288:
        raise ValueError(
            f"the cuda backend stages F*stack (+ H*d) = {staged} floats per row in shared memory, at most 12288; "
            f"use backend='triton'"
        )
    # the dispatch's device guard (_dispatch.get) has made x3's device current
    _ext.cuda_module().rp_quantize(
        _ext.ptr(x3), _ext.DTYPE_CODE[x3.dtype], B, T, F, stack, _ext.ptr(proj), _ext.ptr(cb),
        _ext.DTYPE_CODE[cb.dtype], H, Vn, d, bool(layernorm), metric, _ext.ptr(m), _ext.ptr(out),
        _ext.stream(x3.device),
    )


def _run_triton(x3, proj, cb, stack, layernorm, metric, m, out):
    from ..kernels import rp_quantize as kern

    if proj is not None and cb.shape[2] > kern.MAX_HEAD_DIM:
        raise ValueError(
            f"the triton backend is compiled and checked for head widths d <= {kern.MAX_HEAD_DIM}, "
            f"got {cb.shape[2]}; use backend='cpu' or 'cuda'"
        )
    kern.rp_quantize(x3, proj, cb, stack=stack, layernorm=layernorm, cosine=metric == 0, mask=m, out=out)


_RUNNERS = {"cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}


def _rpq_kernel(backend):
    run = _RUNNERS[backend]

    def impl(x, projection, codebooks, stack, layernorm, metric, mask):
        x3, proj, cb, m = _prepare(x, projection, codebooks, mask)
        B, T, _ = x3.shape
        out = torch.empty((B * (T // stack), cb.shape[0]), dtype=torch.int64, device=x.device)
        run(x3, proj, cb, stack, layernorm, metric, m, out)
        lead = (B, T // stack) if x.dim() == 3 else (x.shape[0],)
        return out.view(lead + (cb.shape[0],))

    return impl


def _nc_kernel(backend):
    run = _RUNNERS[backend]

    def impl(x, centroids, metric):
        D = x.shape[-1]
        x3 = x.reshape(1, -1, D).contiguous()
        cb = centroids.unsqueeze(0).contiguous()
        out = torch.empty((x3.shape[1], 1), dtype=torch.int64, device=x.device)
        run(x3, None, cb, 1, False, metric, None, out)
        return out.view(x.shape[:-1])

    return impl


_dispatch.register(OP_RPQ, "reference")(ref.random_projection_quantize)
_dispatch.register(OP_NC, "reference")(ref.nearest_codeword)
for _backend in ("cpu", "triton", "cuda"):
    _dispatch.register(OP_RPQ, _backend)(_rpq_kernel(_backend))
    _dispatch.register(OP_NC, _backend)(_nc_kernel(_backend))


# ---------------------------------------------------------------------- custom ops


@torch.library.custom_op("sslfast::random_projection_quantize", mutates_args=())
def _rpq_op(
    x: torch.Tensor,
    projection: torch.Tensor,
    codebooks: torch.Tensor,
    stack: int,
    layernorm: bool,
    metric: int,
    mask: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return _dispatch.get(OP_RPQ, backend)(x, projection, codebooks, stack, layernorm, metric, mask)


@_rpq_op.register_fake
def _(x, projection, codebooks, stack, layernorm, metric, mask, backend):
    lead = (x.shape[0], x.shape[1] // stack) if x.dim() == 3 else (x.shape[0],)
    return x.new_empty(lead + (codebooks.shape[0],), dtype=torch.int64)


@torch.library.custom_op("sslfast::nearest_codeword", mutates_args=())
def _nc_op(x: torch.Tensor, centroids: torch.Tensor, metric: int, backend: str) -> torch.Tensor:
    return _dispatch.get(OP_NC, backend)(x, centroids, metric)


@_nc_op.register_fake
def _(x, centroids, metric, backend):
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


# ------------------------------------------------------------------- public functions


def random_projection_quantize(
    x: torch.Tensor,
    projection: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    stack: int = 1,
    input_norm: str | None = None,
    metric: str = "cosine",
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """BEST-RQ labels: the index of the best codeword per (stacked) frame and head.

    Args:
        x: (B, T, F) frames or (N, F) rows (then ``stack`` must be 1); fp32/fp16/bf16.
        projection: (F * stack, H * d); column h*d + j is coordinate j of head h (NeMo's
            ``proj.weight.T``, lucidrains' ``rand_projs`` permuted to (F, H, d)).
        codebooks: (H, V, d); need not be normalised (the cosine metric normalises them).
        stack: frames concatenated frame-major into one vector (NeMo's
            ``combine_time_steps``); the last T % stack frames of each sequence are dropped.
        input_norm: None or "layernorm" (LayerNorm without affine, eps 1e-5, on the stacked
            vector: newer NeMo, lucidrains ``norm=True``).
        metric: "cosine": argmax_v normalize(y_h) . normalize(c_hv) (equal to SpeechBrain's
            argmin |c - normalize(y)| for unit codebooks, NeMo's default, lucidrains); "l2":
            argmin_v |y_h - c_hv|^2 on the raw vectors (NeMo's ``dist_fn="l2"``).
        mask: optional bool (B, T // stack) or (N,): only True positions are computed, the
            others are -1 (a frame-level mask converts with
            ``RandomProjectionQuantizer.stacked_mask``, NeMo's > 0.8 rule).
        backend: None (fastest available), "reference", "cpu", "triton" or "cuda".

    Returns:
        int64 (B, T // stack, H) or (N, H). Ties go to the lowest index; an all-zero row
        under the cosine metric gets 0. No (N, V) tensor is materialised by the kernels.
    """
    _check_rpq(x, projection, codebooks, stack, input_norm, metric, mask)
    V.check_inputs_finite(OP_RPQ, x=x, projection=projection, codebooks=codebooks)
    name = V.resolve_backend(OP_RPQ, backend, x.device, x=x, projection=projection, codebooks=codebooks)
    if name == "reference":
        return ref.random_projection_quantize(
            x, projection, codebooks, stack=stack, input_norm=input_norm, metric=metric, mask=mask
        )
    args = (x, projection, codebooks, stack, input_norm == "layernorm", _METRIC_CODE[metric], mask)
    if torch.compiler.is_compiling():
        return torch.ops.sslfast.random_projection_quantize(*args, name)
    # Eager calls skip the custom-op dispatch (~0.15 ms on a CPU, 10% of the H=1 BEST-RQ
    # case; labels have no autograd to route); traced calls go through the op above.
    return _dispatch.get(OP_RPQ, name)(*args)


def nearest_codeword(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2", backend: str | None = None
) -> torch.Tensor:
    """k-means assignment (HuBERT labels): argmin_v |x|^2 - 2 x.c_v + |c_v|^2.

    Args:
        x: (..., D) features, fp32/fp16/bf16.
        centroids: (V, D).
        metric: "l2" (k-means; the kernels drop the constant |x|^2, which can only flip
            fp32 near-ties) or "cosine" (argmax of normalised dot products).
        backend: None (fastest available), "reference", "cpu", "triton" or "cuda".

    Returns:
        int64 labels of shape x.shape[:-1]; ties go to the lowest index. The (N, V) distance
        matrix is never materialised by the kernels.
    """
    _check_nc(x, centroids, metric)
    V.check_inputs_finite(OP_NC, x=x, centroids=centroids)
    name = V.resolve_backend(OP_NC, backend, x.device, x=x, centroids=centroids)
    if name == "reference":
        return ref.nearest_codeword(x, centroids, metric=metric)
    if torch.compiler.is_compiling():
        return torch.ops.sslfast.nearest_codeword(x, centroids, _METRIC_CODE[metric], name)
    return _dispatch.get(OP_NC, name)(x, centroids, _METRIC_CODE[metric])  # eager: as above
