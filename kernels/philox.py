"""Philox helpers for Triton kernels, bit-identical to csrc/sslfast/philox.h and sslfast/random.py.

Counter convention: c0 = position inside the row, c1 = row, c2 = stream tag, c3 = 0.
"""
import triton
import triton.language as tl


@triton.jit
def philox4x32(seed, c0, c1, c2, c3):
    """Four uint32 words of Philox4x32-10 for the counter (c0, c1, c2, c3) and a 64-bit seed."""
    return tl.philox(seed, c0.to(tl.uint32), c1.to(tl.uint32), c2.to(tl.uint32), c3.to(tl.uint32))


@triton.jit
def load_seed(seed_ptr):
    """The 64-bit key from a 0-d int64 seed tensor (``sslfast.random.seed_tensor``): read on the
    device when the kernel runs, so a captured CUDA graph replays with the tensor's value."""
    return tl.load(seed_ptr)


@triton.jit
def uint_to_uniform(x):
    """uint32 -> fp32 in [0, 1), as tl.rand does (can return 0)."""
    i = x.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, ~i, i)
    return i.to(tl.float32) * 4.6566127342e-10


@triton.jit
def uint_to_open_uniform(x, lo):
    """uint_to_uniform clamped to [lo, 1 - lo]."""
    u = uint_to_uniform(x)
    return tl.minimum(tl.maximum(u, lo), 1.0 - lo)


@triton.jit
def uint_below(x, n):
    """An integer in [0, n) from a uint32 word: the high word of x * n."""
    return tl.umulhi(x.to(tl.uint32), n.to(tl.uint32))
