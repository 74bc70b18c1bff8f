"""One dispatch mechanism for every op.

Each op family registers one implementation per backend with ``@register(op, backend)``.
A public op calls ``resolve(op, backend, device)``: an explicit ``backend`` must be
available or a ``BackendUnavailableError`` says what is missing and how to get it;
``backend=None`` takes ``SSLFAST_BACKEND`` if set, else the first available backend of the
device's preference order (CUDA tensors: cuda, triton, reference; CPU tensors: cpu,
reference; Triton runs on CPU tensors only when asked for, under ``TRITON_INTERPRET=1``).

Every cuda and triton implementation runs under a device guard (``get`` below): the CUDA
device of its first CUDA tensor argument is made current for the call, so the CUDA kernels
launch in that device's context on that device's current stream (``_ext.stream``) and Triton
compiles and launches for that device, whichever device the caller had current.

Where that order would pick a slower backend at the sizes ``python -m sslfast bench``
measures, a size rule overrides it for one op on one device type: ``resolve(op, None,
device, **size)`` passes the op's sizes to the rule set with ``set_rule``. Every rule is at
the end of this file, next to the measurement that justifies it.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_GPU_BACKENDS = ("triton", "cuda")  # launched under the tensors' device guard

_REGISTRY: dict[str, dict[str, Callable]] = {}
_ORDER: dict[tuple[str, str], tuple[str, ...]] = {}
_RULES: dict[tuple[str, str], Callable[..., tuple[str, ...] | None]] = {}
_RECORDERS: list[list[tuple[str, str]]] = []


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this op, build or device cannot provide."""


def register(op: str, backend: str):
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _device_guarded(fn) if backend in _GPU_BACKENDS else fn
        return fn

    return deco


def set_order(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Override the automatic preference order of ``op`` on one device type."""
    _ORDER[(op, device_type)] = tuple(order)


def set_rule(op: str, device_type: str, rule: Callable[..., tuple[str, ...] | None]) -> None:
    """A size-dependent preference order of ``op`` on one device type: ``rule(**size)``
    gets the sizes the op passes to ``resolve`` and returns the order to try (None: the
    usual order)."""
    _RULES[(op, device_type)] = rule


def preference_order(op: str, device_type: str, **size) -> tuple[str, ...]:
    """The order ``backend=None`` tries for ``op`` on ``device_type`` at these sizes."""
    order = _ORDER.get((op, device_type))  # set_order beats a size rule
    rule = _RULES.get((op, device_type))
    if order is None and rule is not None:
        order = rule(**size)
    if order is None:
        order = _DEFAULT_ORDER.get(device_type, ("reference",))
    return tuple(order)


class record_choices:
    """Context manager collecting the ``(op, backend)`` pairs that ``resolve`` returns while
    it is active (the benchmark reports which backend ``backend=None`` ran)."""

    def __enter__(self) -> list[tuple[str, str]]:
        self.choices: list[tuple[str, str]] = []
        _RECORDERS.append(self.choices)
        return self.choices

    def __exit__(self, *exc) -> None:
        _RECORDERS.remove(self.choices)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def implemented_backends(op: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _REGISTRY.get(op, {}))


def launch_device(args, kwargs=None) -> torch.device | None:
    """The CUDA device of the first CUDA tensor among ``args`` and ``kwargs`` values (looking
    one level into lists and tuples), None when there is none (CPU tensors, the interpreter)."""
    for a in (*args, *(kwargs or {}).values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                return t.device
    return None


def _device_guarded(fn: Callable) -> Callable:
    """``fn`` run with the device of its CUDA tensors current (``torch.cuda.device``): the
    one device guard of every cuda and triton launch."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        device = launch_device(args, kwargs)
        if device is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    guarded.unguarded = fn
    return guarded


@functools.lru_cache(maxsize=None)
def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton` (Linux)"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on tensors of ``device`` here, else a sentence why not."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device on this machine"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got tensors on {device}"
        return _ext.C_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got tensors on {device}"
        return _ext.cuda_unusable_reason()
    if backend == "triton":
        err = _triton_error()
        if err:
            return err
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "torch sees no CUDA device on this machine"
        if device.type == "cpu" and triton_interpret():
            return None
        return (
            f"the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"sslfast is imported (got tensors on {device})"
        )
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def resolve(op: str, backend: str | None, device: torch.device, **size) -> tuple[str, Callable]:
    """The backend name and implementation that run ``op`` on tensors of ``device``;
    ``size`` (keyword sizes, e.g. ``rows=, cols=``) feeds the op's size rule, if it has one."""
    name, fn = _resolve(op, backend, device, size)
    for rec in _RECORDERS:
        rec.append((op, name))
    return name, fn


def _resolve(op: str, backend: str | None, device: torch.device, size: dict) -> tuple[str, Callable]:
    impls = _REGISTRY.get(op)
    if not impls:
        raise BackendUnavailableError(f"sslfast: no implementation of {op!r} is registered")
    device = torch.device(device)
    if backend is None:
        backend = os.environ.get("SSLFAST_BACKEND") or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"SSLFAST_BACKEND={backend!r} is not one of {BACKENDS}")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        if backend not in impls:
            raise BackendUnavailableError(
                f"sslfast: {op} has no {backend} backend; it has {implemented_backends(op)}"
            )
        reason = backend_unavailable_reason(backend, device)
        if reason:
            raise BackendUnavailableError(f"sslfast: backend {backend!r} is unavailable for {op}: {reason}")
        return backend, impls[backend]
    for name in preference_order(op, device.type, **size):
        if name in impls and backend_unavailable_reason(name, device) is None:
            return name, impls[name]
    return "reference", impls["reference"]


def get(op: str, backend: str) -> Callable:
    """The registered implementation of ``op`` on ``backend`` (no availability check: the
    public function resolved it already; custom ops call this with the resolved name). For
    the cuda and triton backends it runs under the device guard of its tensors."""
    try:
        return _REGISTRY[op][backend]
    except KeyError:
        raise BackendUnavailableError(f"sslfast: {op} has no {backend} backend") from None


# ----------------------------------------------------------------------------- size rules
# Measured on the project's 2-core x86-64 CPU (benchmarks/results/cpu_2core_x86_64.csv), fp32,
# forward + backward: at N = 4096, D = 512 (info_nce, symmetric) the reference, whose GEMMs
# build the N x N logits, took 1082 ms and the tiled C++ kernel 2410 ms; nt_xent at
# B = 1024, D = 128: 59 ms against 126 ms. The kernel's advantage on CPU is memory only,
# O((rows + cols) * D) against several rows x cols fp32 matrices held for the backward, so
# the reference runs while one logits matrix stays within INFO_NCE_CPU_REFERENCE_MAX_LOGITS
# (2^26 entries, 256 MB in fp32: N <= 8192 for square logits) and the kernel above.
# No GPU rule: the CUDA and Triton kernels have not been timed against the reference yet.

INFO_NCE_CPU_REFERENCE_MAX_LOGITS = 1 << 26


def _in_batch_loss_on_cpu(rows: int | None = None, cols: int | None = None, **_) -> tuple[str, ...] | None:
    if rows is None or cols is None:
        return None
    if rows * cols <= INFO_NCE_CPU_REFERENCE_MAX_LOGITS:
        return ("reference", "cpu")
    return ("cpu", "reference")


set_rule("info_nce", "cpu", _in_batch_loss_on_cpu)
set_rule("nt_xent", "cpu", _in_batch_loss_on_cpu)
