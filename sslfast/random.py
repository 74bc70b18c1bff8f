"""Counter-based randomness shared by every random op.

Every random draw in sslfast is Philox4x32-10 keyed by a 64-bit seed and counted by the
element's position, so a draw depends only on (seed, row, position, stream) and never on
launch order, block size or device. The same function is written three times with one bit
layout: here in PyTorch (used by the reference implementations), in C++/CUDA
(``csrc/sslfast/philox.h``) and in Triton (``kernels/philox.py``); the tests check that the
three agree bit for bit and that the Triton one equals ``tl.philox``.

Counter convention: ``c0`` = position inside the row, ``c1`` = row, ``c2`` = stream tag
(which draw of which op, see ``Stream``), ``c3`` = 0. Key = (seed & 0xffffffff, seed >> 32).
"""
from __future__ import annotations

import enum

import torch

__all__ = [
    "Stream",
    "philox4x32",
    "uint_to_uniform",
    "uint_below",
    "resolve_seed",
    "derive_seed",
]

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10
MAX_SEED = 2**63 - 1


class Stream(enum.IntEnum):
    """Stream tags (counter word c2). One per independent draw, so ops never share bits."""

    MASK_COUNT = 1  # span count rounding noise
    MASK_LENGTH = 2  # span lengths (uniform/normal/poisson)
    MASK_START = 3  # span starts
    MASK_EQUALIZE = 4  # require_same_masks selection
    MASK_DROPOUT = 5  # mask_dropout selection
    NEGATIVES = 16  # within-utterance negatives
    CROSS_NEGATIVES = 17  # cross-sample negatives
    MASK_NOISE = 24  # apply_mask Gaussian fill
    GUMBEL = 32  # Gumbel-softmax noise
    DERIVE = 0x5EED  # derive_seed


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b holds uint32 values in int64; a < 2^32 so a*b < 2^64 can overflow int64: split a.
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = a_lo * b  # < 2^48
    p_hi = a_hi * b  # < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = ((p_hi + (p_lo >> 16)) >> 16) & _MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor | int,
    c1: torch.Tensor | int,
    c2: torch.Tensor | int,
    c3: torch.Tensor | int,
    seed: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four output words.

    The counters broadcast against each other; the results are int64 tensors in [0, 2^32).
    ``seed`` is a Python int or a 0-d int64 tensor (its 64 bits are the key, read on the
    tensor's device: no host synchronisation).
    Under ``torch.compile`` the draw is one opaque op (``sslfast::philox4x32``, run eagerly by
    the compiled graph): inductor, fusing the ten rounds' int64 expressions, would otherwise
    grow them past any time and memory bound.
    """
    ref = next((c for c in (c0, c1, c2, c3, seed) if isinstance(c, torch.Tensor)), None)
    device = ref.device if ref is not None else None
    c = [_as_int64(v, device) for v in (c0, c1, c2, c3)]
    if torch.compiler.is_compiling():
        key = seed if isinstance(seed, torch.Tensor) else torch.tensor(int(seed), dtype=torch.int64)
        return tuple(torch.ops.sslfast.philox4x32(*c, key))
    return _philox_rounds(*c, seed if isinstance(seed, torch.Tensor) else int(seed))


def _as_int64(v, device) -> torch.Tensor:
    # A Python int becomes a fill kernel on the device, not a host-to-device copy: the copy
    # would be illegal inside a CUDA-graph capture, and a sync outside one.
    if isinstance(v, torch.Tensor):
        return v.to(torch.int64)
    return torch.full((), int(v), dtype=torch.int64, device=device)


def _philox_rounds(c0, c1, c2, c3, seed):
    # seed: an int, or an int64 tensor whose bits are the key (>> is arithmetic: mask after).
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(v & _MASK32 for v in (c0, c1, c2, c3)))
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


@torch.library.custom_op("sslfast::philox4x32", mutates_args=())
def _philox_op(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_philox_rounds(c0, c1, c2, c3, seed))  # fresh tensors, never aliases


@_philox_op.register_fake
def _(c0, c1, c2, c3, seed):
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape, seed.shape)
    return tuple(c0.new_empty(shape, dtype=torch.int64) for _ in range(4))


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """A uint32 word (held in int64) to fp32 in [0, 1), bit-identical to ``tl.rand``.

    Reinterpret as int32, complement negatives, scale by 4.6566127342e-10. Can return 0.
    """
    i = torch.where(x >= 2**31, x - 2**32, x)
    i = torch.where(i < 0, -i - 1, i)  # ~i for negative int32
    return i.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def uint_to_open_uniform(x: torch.Tensor, lo: float) -> torch.Tensor:
    """``uint_to_uniform`` clamped to [lo, 1 - lo] (fp32), for logs that must stay finite."""
    lo32 = torch.tensor(lo, dtype=torch.float32)
    return uint_to_uniform(x).clamp(lo32, 1.0 - lo32)


def uint_below(x: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """An integer in [0, n) from a uint32 word: the high word of x * n (n < 2^31)."""
    return (x * n) >> 32


def resolve_seed(seed: int | torch.Tensor | None, device: torch.device | str | None = None) -> int | torch.Tensor:
    """The seed an op uses: an int in [0, 2^63 - 1], or a 0-d int64 tensor on ``device``.

    - ``int``: the Philox key itself (the same bits on every backend and device).
    - ``torch.Tensor``: an int64 tensor with one element, on the op's device; its 64 bits are
      the key (a negative value is its two's-complement bit pattern). Kernels read it on the
      device when they run, never on the host: no synchronisation, no graph break under
      ``torch.compile``, and a captured CUDA graph replays with whatever the tensor holds at
      replay (``derive_seed`` with a step tensor advanced inside the graph gives a fresh stream
      per replay). ``op(seed=s)`` and ``op(seed=torch.tensor(s))`` draw the same bits.
    - ``None``: a key drawn with ``torch.randint`` from torch's default generator of ``device``
      (the CPU generator when ``device`` is None or the CPU), as a 0-d tensor on ``device``: no
      host synchronisation, traced by ``torch.compile`` without a graph break, and fresh at
      every replay of a captured CUDA graph (torch's graph-safe Philox offsets).
      ``torch.manual_seed`` makes it repeatable; on the CPU it draws the same value as
      ``torch.randint(0, 2**63 - 1, ())``. Called without ``device`` (host code such as a
      data collator), ``None`` gives that CPU draw as a Python int.

    Raises:
        TypeError: ``seed`` is not an int, an integer tensor or None, or a tensor's dtype is
            not int64.
        ValueError: an int outside [0, 2^63 - 1], a tensor with more than one element, or a
            tensor on another device than ``device``.
    """
    if seed is None:
        drawn = torch.randint(0, MAX_SEED, (), dtype=torch.int64, device=device)
        return drawn if device is not None else int(drawn)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"a seed tensor must be int64, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"a seed tensor must hold one value, got shape {tuple(seed.shape)}")
        if device is not None and seed.device != torch.device(device):
            want = torch.device(device)
            if not (want.type == seed.device.type and want.index is None):
                raise ValueError(f"the seed tensor is on {seed.device} but the op runs on {want}: "
                                 f"pass seed.to({str(want)!r})")
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, an int64 tensor or None, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return seed


def derive_seed(seed: int | torch.Tensor, *, rank: int | torch.Tensor = 0,
                step: int | torch.Tensor = 0) -> int | torch.Tensor:
    """A seed for (rank, step) derived from a base seed, so DDP ranks never share a stream.

    fairseq reseeds every rank identically each step, so every rank draws the same masks
    and negatives. Use ``derive_seed(base, rank=dist.get_rank(), step=num_updates)``:
    distinct (rank, step) pairs give unrelated Philox keys (the derivation is itself one
    Philox block keyed by ``seed``: counter (rank, step mod 2^32, DERIVE, step >> 32)).

    With ints it returns an int. If any argument is a tensor (``seed`` a 0-d int64 seed
    tensor, ``rank``/``step`` 0-d int64 tensors, all on one device) it returns a 0-d int64
    tensor on that device holding the same value, computed there without a host
    synchronisation: the device-side seed with an offset, as torch's own Philox keeps
    (seed, offset). Under CUDA graphs keep ``step`` a device tensor and advance it inside the
    captured region (``step.add_(1)``): each replay then draws a fresh stream.

    Distinct pairs with rank in [0, 2^32) and step in [0, 2^64) give distinct counters; a
    tensor's values are taken modulo those ranges (no host read to check them).

    Raises:
        TypeError: ``rank`` or ``step`` neither an int nor a tensor (bools and floats too), a
            tensor argument not int64; ``seed`` as for ``resolve_seed``.
        ValueError: an int ``rank`` outside [0, 2^32) or ``step`` outside [0, 2^64); a tensor
            argument with more than one element or on another device than the others.
    """
    for name, v, bits in (("rank", rank, 32), ("step", step, 64)):
        if isinstance(v, torch.Tensor):
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int or an int64 tensor, got {type(v).__name__}")
        if not 0 <= v < 2**bits:
            raise ValueError(f"{name} must be in [0, 2**{bits}), got {v}")
    tensors = [v for v in (seed, rank, step) if isinstance(v, torch.Tensor)]
    if not tensors:
        seed = resolve_seed(seed)
        w0, w1, _, _ = philox4x32(rank & _MASK32, step & _MASK32, int(Stream.DERIVE), (step >> 32) & _MASK32, seed)
        return ((int(w1) << 32) | int(w0)) & MAX_SEED
    device = tensors[0].device
    for v in tensors:
        if v.dtype != torch.int64:
            raise TypeError(f"derive_seed's tensor arguments must be int64, got {v.dtype}")
        if v.numel() != 1 or v.device != device:
            raise ValueError("derive_seed's tensor arguments must be one-element int64 tensors on one "
                             f"device, got {v.dtype} {tuple(v.shape)} on {v.device}")
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())
    else:
        seed = resolve_seed(seed)
    rank = _as_int64(rank, device).reshape(())
    step = _as_int64(step, device).reshape(())
    w0, w1, _, _ = philox4x32(rank & _MASK32, step & _MASK32, int(Stream.DERIVE), (step >> 32) & _MASK32, seed)
    return ((w1 << 32) | w0) & MAX_SEED


# ----------------------------------------------------------------------------- for the backends


def seed_value(seed: int | torch.Tensor) -> int:
    """The key as an unsigned 64-bit int, for host (C++ CPU) kernels.

    A seed tensor is read here, so this is for CPU tensors only (no device synchronisation);
    inside a custom op's CPU implementation it is not traced by ``torch.compile``.
    """
    if isinstance(seed, torch.Tensor):
        if seed.device.type != "cpu":
            raise ValueError(f"seed_value reads the seed on the host; got a tensor on {seed.device}")
        return int(seed.reshape(())) & 0xFFFFFFFFFFFFFFFF
    return int(seed)


def seed_args(seed: int | torch.Tensor) -> tuple[int, int]:
    """``(value, pointer)`` for the CUDA kernels: ``(seed, 0)`` for an int, ``(0, data_ptr)`` for
    a seed tensor, whose key the kernel then loads on the device (``load_seed`` in
    ``csrc/sslfast/philox.h``)."""
    if isinstance(seed, torch.Tensor):
        return 0, seed.data_ptr()
    return int(seed), 0


def seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The seed as a 0-d int64 tensor on ``device``, for Triton kernels (which always load the key
    from a pointer, so one compiled kernel serves ints and tensors). An int becomes one fill
    kernel (``torch.full``), never a host-to-device copy: capturable in a CUDA graph."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.full((), int(seed), dtype=torch.int64, device=device)


def split_seed(seed: int | torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """``(int, tensor)`` for a custom op's schema, which takes ``seed: int, seed_t: Tensor?``:
    ``(seed, None)`` for an int, ``(0, seed)`` for a seed tensor. ``join_seed`` undoes it."""
    if isinstance(seed, torch.Tensor):
        return 0, seed
    return int(seed), None


def join_seed(seed: int, seed_t: torch.Tensor | None) -> int | torch.Tensor:
    """The seed a custom op's implementation passes on: ``seed_t`` when given, else ``seed``."""
    return seed_t if seed_t is not None else seed
