"""Triton kernels of apply_mask (semantics and noise layout: sslfast/reference/apply_mask.py).

* ``_forward_kernel``: one launch, one pass over x. Program ``pid`` owns FRAMES consecutive
  frames (flattened b * T + t) and walks each frame's channels in BLOCK_D chunks. A masked
  frame gets the embedding, or its noise: BLOCK_D / 4 Philox blocks (one per 4 channels,
  no block drawn twice), Box-Muller, the four channel vectors interleaved with ``tl.join``.
  The branch is per frame, so noise is drawn only for masked frames. An unmasked frame is
  copied from x to out, or left alone in place (out is x). No host sync.
* ``_backward_kernel``: program (``pid``, ``pid_d``) owns FRAMES frames x BLOCK_D channels:
  grad_x = grad where unmasked, 0 where masked (one pass), and the fp32 sum of grad over
  its masked frames into ``partial[pid]``; the caller sums the partials in a fixed order
  (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from .. import random as sr
from . import philox as kp

_STREAM_MASK_NOISE = tl.constexpr(24)  # sslfast.random.Stream.MASK_NOISE
_TWO_PI = tl.constexpr(6.2831854820251465)  # fp32(2 pi), as the reference multiplies
_OPEN_LO = tl.constexpr(2.3283064365386963e-10)  # 2^-32
# Integer arguments that are not specialised (an int equal to 1 becomes a compile-time
# constant, a multiple of 16 another specialisation): the frame count and T (only divides).
# D and the strides stay specialised: a unit channel stride and 16-aligned rows give vector
# loads. The seed is a pointer (``seed_ptr``: the key is loaded on the device).
_COUNTS = ("n_frames", "T")


@triton.jit
def _box_muller(w_radius, w_angle):
    u = kp.uint_to_open_uniform(w_radius, _OPEN_LO)
    a = kp.uint_to_uniform(w_angle) * _TWO_PI
    r = tl.sqrt(-2.0 * tl.log(u))
    return r * tl.cos(a), r * tl.sin(a)


@triton.jit(do_not_specialize=_COUNTS)
def _forward_kernel(x_ptr, out_ptr, mask_ptr, fill_ptr, n_frames, T, D, sxb, sxt, sxd, sob, sot, sod, std, seed_ptr,
                    NOISE: tl.constexpr, INPLACE: tl.constexpr, FRAMES: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if NOISE:
        seed = kp.load_seed(seed_ptr)
    BLOCK_Q: tl.constexpr = BLOCK_D // 4
    offs_d = tl.arange(0, BLOCK_D)
    offs_q = tl.arange(0, BLOCK_Q)
    qb = (D + 3) // 4
    for i in range(FRAMES):
        f = pid.to(tl.int64) * FRAMES + i
        if f < n_frames:
            b = f // T
            t = f % T
            x_row = x_ptr + b * sxb + t * sxt
            o_row = out_ptr + b * sob + t * sot
            masked = tl.load(mask_ptr + f)
            if masked != 0:
                for d0 in range(0, D, BLOCK_D):
                    in_row = d0 + offs_d < D
                    if NOISE:
                        c0 = t * qb + d0 // 4 + offs_q
                        zero = offs_q * 0
                        w0, w1, w2, w3 = kp.philox4x32(seed, c0, zero + b, zero + _STREAM_MASK_NOISE, zero)
                        z0, z1 = _box_muller(w0, w1)
                        z2, z3 = _box_muller(w2, w3)
                        # join stacks on a new last axis: element [q, i, j] is z_{2i+j}, flat index 4q + 2i + j
                        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK_D])
                        v = z * std
                    else:
                        v = tl.load(fill_ptr + d0 + offs_d, mask=in_row, other=0.0)
                    tl.store(o_row + (d0 + offs_d) * sod, v.to(out_ptr.dtype.element_ty), mask=in_row)
            else:
                if not INPLACE:
                    for d0 in range(0, D, BLOCK_D):
                        in_row = d0 + offs_d < D
                        v = tl.load(x_row + (d0 + offs_d) * sxd, mask=in_row, other=0.0)
                        tl.store(o_row + (d0 + offs_d) * sod, v, mask=in_row)


@triton.jit(do_not_specialize=_COUNTS)
def _backward_kernel(g_ptr, gx_ptr, partial_ptr, mask_ptr, n_frames, T, D, sgb, sgt, sgd,
                     NEED_X: tl.constexpr, NEED_FILL: tl.constexpr, FRAMES: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(FRAMES):
        f = pid.to(tl.int64) * FRAMES + i
        if f < n_frames:
            b = f // T
            t = f % T
            g_row = g_ptr + b * sgb + t * sgt
            masked = tl.load(mask_ptr + f)
            if masked != 0:
                if NEED_FILL:
                    acc += tl.load(g_row + offs_d * sgd, mask=in_row, other=0.0).to(tl.float32)
                if NEED_X:
                    tl.store(gx_ptr + f * D + offs_d, tl.zeros([BLOCK_D], dtype=gx_ptr.dtype.element_ty), mask=in_row)
            else:
                if NEED_X:
                    tl.store(gx_ptr + f * D + offs_d, tl.load(g_row + offs_d * sgd, mask=in_row), mask=in_row)
    if NEED_FILL:
        tl.store(partial_ptr + pid.to(tl.int64) * D + offs_d, acc, mask=in_row)


def _frames_per_program(n_frames: int) -> int:
    # Enough programs to fill a GPU at production sizes (B * T ~ 12k frames), few enough that
    # each streams several rows.
    return 4 if n_frames >= 4096 else 1


def forward(x, mask, fill, std, seed, out):
    """Write x with its masked frames filled into ``out`` (``out is x``: in place).
    ``fill``: (D,) contiguous in x's dtype, or None for noise of ``std``; ``seed``: an int or a
    0-d int64 tensor on x's device (the kernel loads the key: ``sslfast.random.seed_tensor``)."""
    B, T, D = x.shape
    n = B * T
    if n == 0 or D == 0:
        return out
    frames = _frames_per_program(n)
    block_d = max(4, min(1024, triton.next_power_of_2(D)))
    _forward_kernel[(triton.cdiv(n, frames),)](
        x, out, mask, fill if fill is not None else x, n, T, D, *x.stride(), *out.stride(), float(std),
        sr.seed_tensor(seed, x.device) if fill is None else mask,  # an embedding fill loads no key
        NOISE=fill is None, INPLACE=out.data_ptr() == x.data_ptr(), FRAMES=frames, BLOCK_D=block_d)
    return out


def backward(grad, mask, need_x, need_fill):
    """(grad_x or None, grad_fill fp32 (D,) or None)."""
    B, T, D = grad.shape
    n = B * T
    dev = grad.device
    gx = torch.empty(B, T, D, dtype=grad.dtype, device=dev) if need_x else None
    if n == 0 or D == 0:
        return gx, (torch.zeros(D, dtype=torch.float32, device=dev) if need_fill else None)
    frames = 16 if n >= 4096 else 4
    block_d = min(512, triton.next_power_of_2(D))
    n_prog = triton.cdiv(n, frames)
    partial = torch.empty(n_prog, D, dtype=torch.float32, device=dev) if need_fill else None
    _backward_kernel[(n_prog, triton.cdiv(D, block_d))](
        grad, gx if need_x else grad, partial if need_fill else grad, mask, n, T, D, *grad.stride(),
        NEED_X=need_x, NEED_FILL=need_fill, FRAMES=frames, BLOCK_D=block_d)
    return gx, (partial.sum(0) if need_fill else None)
