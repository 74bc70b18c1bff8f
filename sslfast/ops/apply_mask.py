"""Public ``apply_mask``: fill masked frames with a mask embedding or Gaussian noise.

Backends: ``cpu`` (C++/OpenMP), ``cuda``, ``triton`` (GPU, or CPU tensors under
TRITON_INTERPRET=1) and ``reference``. Each kernel is one pass over x: masked frames get the
embedding or their noise (drawn only there, from the frame's own Philox blocks), unmasked
frames are copied, or not touched at all in place. No backend synchronises with the host,
so the op can be captured in a CUDA graph.

The backward is fused too: one pass over grad writes ``grad_x`` (grad at unmasked frames,
0 at masked ones) and sums grad over the masked frames for the embedding's gradient, as
fp32 partials per fixed chunk of frames summed in chunk order: deterministic on every
backend, no atomics. (``torch.where`` for grad_x would be one pass too, but the embedding's
reduction would then read grad a second time.)

Layers: validation, custom ops and the public function here; the spec in
``sslfast/reference/apply_mask.py``; kernels in ``kernels/apply_mask.py`` (Triton) and
``csrc/apply_mask*`` (C++ CPU and CUDA, sharing ``csrc/apply_mask.h``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch, _ext
from .. import _validation as V
from .. import random as sr
from ..reference import apply_mask as ref

__all__ = ["apply_mask"]

OP, OP_BWD = "apply_mask", "apply_mask_backward"


# ----------------------------------------------------------------------------- backends
# forward(x, mask, fill, std, seed, out): out = x with masked frames filled; out is x in
#     place, else a fresh contiguous tensor. mask (B, T) contiguous bool; fill (D,)
#     contiguous in x's dtype, or None for noise of std; seed an int or a 0-d int64 tensor on
#     x's device (sslfast.random.resolve_seed), read by the kernels, never on the host
#     (except by the C++ CPU kernels, whose tensor is on the CPU).
# backward(grad, mask, need_x, need_fill) -> (grad_x (B, T, D) contiguous or None,
#     grad_fill (D,) fp32 or None).

@_dispatch.register(OP, "reference")
def _forward_reference(x, mask, fill, std, seed, out):
    value = ref.apply_mask(x, mask, fill if fill is not None else std, False, seed)
    return out.copy_(value)


def _native_forward(module, seed_args, stream_args, x, mask, fill, std, out):
    B, T, D = x.shape
    module.apply_mask_forward(_ext.ptr(x), *x.stride(), _ext.ptr(out), *out.stride(), _ext.ptr(mask), _ext.ptr(fill),
                              _ext.DTYPE_CODE[x.dtype], B, T, D, float(std), *seed_args, *stream_args)
    return out


def _native_backward(module, stream_args, grad, mask, need_x, need_fill):
    B, T, D = grad.shape
    dev = grad.device
    gx = torch.empty(B, T, D, dtype=grad.dtype, device=dev) if need_x else None
    gfill = torch.zeros(D, dtype=torch.float32, device=dev) if need_fill else None
    if need_fill and B * T > 0:
        chunk = module.apply_mask_grad_chunk
        partial = torch.empty(-(-(B * T) // chunk), D, dtype=torch.float32, device=dev)
    else:
        partial = None
    module.apply_mask_backward(_ext.ptr(grad), *grad.stride(), _ext.ptr(gx), _ext.ptr(mask),
                               _ext.DTYPE_CODE[grad.dtype], B, T, D, _ext.ptr(partial), _ext.ptr(gfill),
                               *stream_args)
    return gx, gfill


@_dispatch.register(OP, "cpu")
def _forward_cpu(x, mask, fill, std, seed, out):
    return _native_forward(_ext.cpu_module(), (sr.seed_value(seed),), (), x, mask, fill, std, out)


@_dispatch.register(OP_BWD, "cpu")
def _backward_cpu(grad, mask, need_x, need_fill):
    return _native_backward(_ext.cpu_module(), (), grad, mask, need_x, need_fill)


@_dispatch.register(OP, "cuda")
def _forward_cuda(x, mask, fill, std, seed, out):
    return _native_forward(_ext.cuda_module(), sr.seed_args(seed), (_ext.stream(x.device),), x, mask, fill, std, out)


@_dispatch.register(OP_BWD, "cuda")
def _backward_cuda(grad, mask, need_x, need_fill):
    return _native_backward(_ext.cuda_module(), (_ext.stream(grad.device),), grad, mask, need_x, need_fill)


@_dispatch.register(OP, "triton")
def _forward_triton(x, mask, fill, std, seed, out):
    from ..kernels import apply_mask as kam

    return kam.forward(x, mask, fill, std, seed, out)


@_dispatch.register(OP_BWD, "triton")
def _backward_triton(grad, mask, need_x, need_fill):
    from ..kernels import apply_mask as kam

    return kam.backward(grad, mask, need_x, need_fill)


# ----------------------------------------------------------------------------- custom ops

def _fill_arg(x: torch.Tensor, fill: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if fill is None else fill.to(x.dtype).contiguous()


# The seed crosses the custom ops as (seed: int, seed_t: Tensor?): sr.split_seed / join_seed.

@torch.library.custom_op("sslfast::apply_mask", mutates_args=())
def _apply_mask_op(x: torch.Tensor, mask: torch.Tensor, fill: Optional[torch.Tensor], std: float, seed: int,
                   seed_t: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """x with its masked frames filled (a new contiguous tensor)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _dispatch.get(OP, backend)(x, mask, _fill_arg(x, fill), std, sr.join_seed(seed, seed_t), out)


@_apply_mask_op.register_fake
def _(x, mask, fill, std, seed, seed_t, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("sslfast::apply_mask_", mutates_args=("x",))
def _apply_mask_inplace_op(x: torch.Tensor, mask: torch.Tensor, fill: Optional[torch.Tensor], std: float, seed: int,
                           seed_t: Optional[torch.Tensor], backend: str) -> None:
    """Fill the masked frames of x in place (unmasked frames are not read or written)."""
    _dispatch.get(OP, backend)(x, mask, _fill_arg(x, fill), std, sr.join_seed(seed, seed_t), x)


@_apply_mask_inplace_op.register_fake
def _(x, mask, fill, std, seed, seed_t, backend):
    return None


@torch.library.custom_op("sslfast::apply_mask_backward", mutates_args=())
def _apply_mask_backward_op(grad: torch.Tensor, mask: torch.Tensor, need_x: bool, need_fill: bool,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_fill fp32); an output not asked for is an empty tensor."""
    gx, gfill = _dispatch.get(OP_BWD, backend)(grad, mask, need_x, need_fill)
    empty = grad.new_empty(0)
    return (gx if gx is not None else empty), (gfill if gfill is not None else empty.float())


@_apply_mask_backward_op.register_fake
def _(grad, mask, need_x, need_fill, backend):
    B, T, D = grad.shape
    gx = grad.new_empty(B, T, D) if need_x else grad.new_empty(0)
    return gx, grad.new_empty(D if need_fill else 0, dtype=torch.float32)


def _grads(grad, mask, fill, need_x, need_fill, backend):
    gx, gfill = torch.ops.sslfast.apply_mask_backward(grad, mask, need_x, need_fill, backend)
    return (gx if need_x else None), (gfill.to(fill.dtype) if need_fill else None)


def _setup_context(ctx, inputs, output):
    x, mask, fill, std, seed, seed_t, backend = inputs
    ctx.save_for_backward(mask, fill)
    ctx.backend = backend


def _backward(ctx, grad):
    mask, fill = ctx.saved_tensors
    need_x, need_fill = ctx.needs_input_grad[0], fill is not None and ctx.needs_input_grad[2]
    gx, gfill = _grads(grad, mask, fill, need_x, need_fill, ctx.backend)
    return gx, None, gfill, None, None, None, None


torch.library.register_autograd("sslfast::apply_mask", _backward, setup_context=_setup_context)


class _ApplyMaskInplace(torch.autograd.Function):
    """In place with autograd (``x[mask] = emb`` on an activation, as fairseq and Hugging
    Face do): the mutating op, marked dirty so autograd rebases x's history on it."""

    @staticmethod
    def forward(ctx, x, mask, fill, std, seed, backend):
        torch.ops.sslfast.apply_mask_(x, mask, fill, std, *sr.split_seed(seed), backend)
        ctx.mark_dirty(x)
        ctx.save_for_backward(mask, fill)
        ctx.backend = backend
        return x

    @staticmethod
    def backward(ctx, grad):
        mask, fill = ctx.saved_tensors
        need_x, need_fill = ctx.needs_input_grad[0], fill is not None and ctx.needs_input_grad[2]
        gx, gfill = _grads(grad, mask, fill, need_x, need_fill, ctx.backend)
        return gx, None, gfill, None, None, None


# ----------------------------------------------------------------------------- public API

def apply_mask(x: torch.Tensor, mask: torch.Tensor, fill, *, inplace: bool = False,
               seed: int | torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Fill the masked frames of ``x`` (B, T, D) and return the result.

    ``fill`` is either a (D,) tensor, the learned mask embedding of wav2vec 2.0 / HuBERT
    (fairseq's and Hugging Face's ``x[mask] = emb.to(x.dtype)``), or a float ``std`` >= 0:
    Gaussian noise N(0, std^2) per masked frame and channel, as BEST-RQ fills masked frames
    (std 0.1). Unmasked frames keep x's values bit for bit.

    Args:
        x: (B, T, D) fp32, fp16 or bf16 (fp64 runs on the reference backend only, which
            backend=None picks for it); any strides.
        mask: (B, T) bool (or 0/1 integers; other values raise ValueError), True at the
            frames to fill.
        fill: (D,) float tensor (cast to x's dtype; receives a gradient) or a float std.
        inplace: write into x and return it. Without autograd only masked frames are written.
            Under autograd it is recorded as an in-place op (as ``x[mask] = emb`` is), so x
            must not be a leaf that requires grad.
        seed: Philox key of the noise (ignored for a tensor fill): an int in [0, 2^63 - 1]; a
            0-d (or one-element) int64 tensor on x's device, whose 64 bits are the key, read by
            the kernel when it runs (no host sync, no graph break under ``torch.compile``; a
            captured CUDA graph replays with the tensor's value at replay); or None: a key
            drawn with ``torch.randint`` from torch's default generator of x's device, as a
            device tensor (no sync; ``torch.manual_seed`` makes it repeatable; fresh at every
            CUDA-graph replay). ``seed=s`` and ``seed=torch.tensor(s)`` give the same bits.
            DDP: ranks given one seed draw the same noise; pass
            ``sslfast.derive_seed(base, rank=rank, step=step)`` (rank and step may be device
            tensors, e.g. a step counter advanced with ``step.add_(1)`` inside a captured
            graph). See ``sslfast.random.resolve_seed``. Raises TypeError (not an int, int64
            tensor or None) or ValueError (out of range, several elements, another device).
        backend: None, "reference", "cpu", "triton" or "cuda".

    Noise: frame (b, t) draws its D values from its own Philox blocks keyed by (seed, b, t)
    (Box-Muller in fp32, layout in sslfast/reference/apply_mask.py), so the noise of a frame
    never depends on which other frames are masked, and no backend needs the masked count
    on the host. Backends agree within fp32 rounding of log/cos/sin (not bit for bit).
    Gradients: ``grad_x = grad`` at unmasked frames and 0 at masked ones; ``grad_fill`` = the
    sum of grad over the masked frames (fp32 accumulation, deterministic); no gradient for a
    float std. Output: a new contiguous tensor (or x itself in place).

    Differences on purpose: fairseq/HF index with ``x[mask]`` (a host sync on GPU, not
    capturable in a CUDA graph); here no backend syncs. BEST-RQ implementations draw noise
    from torch's global generator for the masked frames only; here the stream is explicit
    and per frame.
    """
    floats = V.REFERENCE_FLOAT_DTYPES
    V.check_tensor("x", x, ndim=3, dtypes=floats)
    B, T, D = x.shape
    mask = V.as_bool_mask("mask", mask, (B, T))
    if isinstance(fill, torch.Tensor):
        V.check_tensor("fill", fill, shape=(D,), dtypes=floats)
        V.check_same_device(x=x, mask=mask, fill=fill)
        std = 0.0
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
        std = float(fill)
        if not (0.0 <= std < float("inf")):
            raise ValueError(f"fill as a noise std must be finite and >= 0, got {fill}")
        V.check_same_device(x=x, mask=mask)
    else:
        raise TypeError(f"fill must be a (D,) float tensor or a float std, got {type(fill).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    fill_t = fill if isinstance(fill, torch.Tensor) else None
    # the key: drawn (on x's device) only for a noise fill; a tensor fill ignores it
    if fill_t is not None:
        if seed is not None:
            sr.resolve_seed(seed, device=x.device)  # checked like every seed, though unused
        seed = 0
    else:
        seed = sr.resolve_seed(seed, device=x.device)
    if B * T * ((D + 3) // 4) >= 2**32 or B >= 2**32:
        raise ValueError(f"x is too large for the noise's 32-bit Philox counters: T * ceil(D / 4) and B must be "
                         f"< 2**32, got shape {(B, T, D)}")

    grad_on = torch.is_grad_enabled() and (x.requires_grad or (fill_t is not None and fill_t.requires_grad))
    if inplace and grad_on and x.is_leaf and x.requires_grad:
        raise RuntimeError("apply_mask(inplace=True): x is a leaf tensor that requires grad, which autograd "
                           "cannot modify in place; pass inplace=False, or x.detach() if no gradient is wanted")

    V.check_inputs_finite(OP, x=x, fill=fill_t)
    # fill is cast to x's dtype (x[mask] = emb.to(x.dtype)), so only x's dtype picks the backend
    name = V.resolve_backend(OP, backend, x.device, x=x)
    if name == "reference":
        return ref.apply_mask(x, mask, fill_t if fill_t is not None else std, inplace, seed)

    if inplace:
        if grad_on:
            return _ApplyMaskInplace.apply(x, mask, fill_t, std, seed, name)
        if torch.compiler.is_compiling():
            torch.ops.sslfast.apply_mask_(x, mask, fill_t, std, *sr.split_seed(seed), name)
        else:
            _dispatch.get(OP, name)(x, mask, _fill_arg(x, fill_t), std, seed, x)
        return x
    if grad_on or torch.compiler.is_compiling():
        return torch.ops.sslfast.apply_mask(x, mask, fill_t, std, *sr.split_seed(seed), name)
    # Eager calls without autograd skip the custom-op dispatch (~0.1 ms on a CPU).
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _dispatch.get(OP, name)(x, mask, _fill_arg(x, fill_t), std, seed, out)
