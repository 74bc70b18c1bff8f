"""Argument checks shared by every op. Each raises ValueError/TypeError naming the argument,
the value it got and what was expected, before anything is launched."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: tuple | None = None,
) -> torch.Tensor:
    """``t`` is a tensor of the given rank, dtype and shape (None entries of shape are free)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


def check_same_device(**tensors) -> torch.device:
    """All given tensors (None ignored) are on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


def check_prob(name: str, value: float, *, closed: bool = True) -> float:
    value = float(value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")
    return value


def check_int(name: str, value, *, min_value: int | None = None, max_value: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value}")
    return value


def check_positive(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        return value
    value = float(value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable) -> object:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- masks
# fairseq's padding_mask is bool, True at padding; Hugging Face's attention_mask is an
# integer tensor, 1 at valid frames. The two are each other's complement, so passing one
# where the other goes silently inverts the mask: a padding_mask must be bool, and the error
# for an integer one names attention_mask=.

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def host_values_checkable(t: torch.Tensor) -> bool:
    # Reading values is free on the CPU; on a device it is a host sync, and while tracing a
    # graph break. Value checks run only where they are free.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_zero_one(name: str, t: torch.Tensor) -> None:
    """An integer mask holds only 0 and 1. Bool masks need no check; an integer one costs a
    host sync on a GPU (skipped while torch.compile traces, and on meta tensors)."""
    if t.dtype == torch.bool or t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():
        return
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        value = int(t[bad].reshape(-1)[0])
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool), got the value {value}")


def as_bool_mask(name: str, t, shape: tuple | None = None) -> torch.Tensor:
    """A frame mask given as bool or 0/1 integers (``mask``, ``attention_mask``), as a
    contiguous bool tensor of ``shape``. Integer values other than 0 and 1 raise."""
    check_tensor(name, t, dtypes=(torch.bool,) + _INT_DTYPES)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    check_zero_one(name, t)
    return (t if t.dtype == torch.bool else t != 0).contiguous()


def padding_from_masks(padding_mask, attention_mask, shape: tuple) -> torch.Tensor | None:
    """The bool padding mask (True at padding) from either convention, or None.

    ``padding_mask`` must be bool (fairseq); ``attention_mask`` (Hugging Face, 1 at valid
    frames) may be bool or 0/1 integers; passing both raises."""
    if padding_mask is not None and attention_mask is not None:
        raise ValueError("pass padding_mask (bool, True at padding) or attention_mask (1 at valid frames), not both")
    if attention_mask is not None:
        return ~as_bool_mask("attention_mask", attention_mask, shape)
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, torch.Tensor):
        raise TypeError(f"padding_mask must be a bool torch.Tensor, got {type(padding_mask).__name__}")
    if padding_mask.dtype != torch.bool:
        raise TypeError(
            f"padding_mask must be a bool tensor, True at padding (fairseq's convention), got {padding_mask.dtype}. "
            "A Hugging Face attention_mask (1 at valid frames) goes in attention_mask=, not padding_mask "
            "(passing one for the other inverts the mask)")
    if tuple(padding_mask.shape) != tuple(shape):
        raise ValueError(f"padding_mask must have shape {tuple(shape)}, got {tuple(padding_mask.shape)}")
    return padding_mask.contiguous()


# ----------------------------------------------------------------------------- dtype policy
# One policy for every op (README "Reliability"):
# - floating inputs may be fp32, fp16, bf16 or fp64; math is fp32 in the kernels, and in the
#   input dtype promoted with fp32 in the references (so fp64 stays fp64);
# - fp64 runs on the reference backend only: backend=None picks it for fp64 inputs on any
#   device, and an explicit kernel backend with an fp64 input raises TypeError;
# - inputs combined arithmetically (contrastive x and y, info_nce query, key and queue) are
#   promoted as torch promotes (torch.promote_types); outputs that continue an input (apply
#   mask's x, the quantized codewords) keep that input's dtype.

REFERENCE_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)
KERNEL_FLOAT_DTYPES = FLOAT_DTYPES


def resolve_backend(op: str, backend: str | None, device, sizes: dict | None = None, **floats) -> str:
    """The backend name for ``op`` under the dtype policy above (``floats``: the op's floating
    input tensors by argument name, None ignored; ``sizes``: the keyword sizes of the op's
    size rule in ``_dispatch``, if it has one)."""
    from . import _dispatch

    wide = [n for n, t in floats.items() if t is not None and t.dtype not in KERNEL_FLOAT_DTYPES]
    if wide and backend is None:
        backend = "reference"
    name, _ = _dispatch.resolve(op, backend, device, **(sizes or {}))
    if wide and name != "reference":
        t = floats[wide[0]]
        raise TypeError(f"{op}: {wide[0]} is {t.dtype}, which the {name} backend does not take (it takes "
                        f"fp32, fp16 and bf16); {t.dtype} runs on backend='reference' (backend=None picks it)")
    return name


def promote_floats(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype torch's type promotion gives the floating tensors (None ignored)."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


# ----------------------------------------------------------------------------- finite check
# Opt in with SSLFAST_CHECK_FINITE=1, sslfast.set_check_finite(True), or the context
# manager sslfast.check_finite(). Each check reads one flag from the device (a host sync),
# which is why it is off by default; it is skipped while torch.compile traces.

_CHECK_FINITE: bool | None = None  # None: follow the environment variable


def check_finite_enabled() -> bool:
    if _CHECK_FINITE is not None:
        return _CHECK_FINITE
    import os

    return os.environ.get("SSLFAST_CHECK_FINITE", "0") not in ("", "0")


def set_check_finite(enabled: bool | None) -> None:
    """Turn the non-finite input check on or off for every op (None: follow
    ``SSLFAST_CHECK_FINITE``). When on, an op given a NaN or an infinity in a floating
    input raises ValueError naming the op and the argument (one host sync per input)."""
    global _CHECK_FINITE
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _CHECK_FINITE = enabled


class check_finite:
    """``with sslfast.check_finite(): ...``: the non-finite input check on inside the block
    (``check_finite(False)`` turns it off), the previous setting restored after."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        global _CHECK_FINITE
        self._before = _CHECK_FINITE
        set_check_finite(self.enabled)
        return self

    def __exit__(self, *exc):
        global _CHECK_FINITE
        _CHECK_FINITE = self._before
        return False


def check_inputs_finite(op: str, **tensors) -> None:
    """With the check on, raise ValueError if a floating tensor among ``tensors`` holds a NaN
    or an infinity (None and non-floating tensors ignored)."""
    if torch.compiler.is_compiling() or not check_finite_enabled():
        return
    for name, t in tensors.items():
        if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            kinds = [k for k, m in (("NaN", torch.isnan(t)), ("inf", torch.isinf(t))) if bool(m.any())]
            raise ValueError(f"{op}: {name} holds non-finite values ({' and '.join(kinds)}; first at index "
                             f"{first}, {int(bad.sum())} of {t.numel()} elements)")
