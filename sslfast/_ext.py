"""Loading of the compiled extensions and the pointer-passing helpers around them.

The extensions take raw data pointers; everything that reaches them goes through
``ptr`` below, after the op has validated shapes, dtypes and devices.
"""
from __future__ import annotations

import importlib

import torch

_C = None
_C_cuda = None
C_ERROR: str | None = None
CUDA_ERROR: str | None = None

try:
    _C = importlib.import_module("sslfast._C")
except ImportError as exc:  # pragma: no cover - depends on the build
    C_ERROR = f"the CPU extension sslfast._C is not built ({exc}); reinstall with `pip install -e .`"

try:
    _C_cuda = importlib.import_module("sslfast._C_cuda")
except ImportError as exc:
    if "No module named" in str(exc):
        CUDA_ERROR = (
            "the CUDA extension sslfast._C_cuda is not built; reinstall with nvcc on the PATH "
            "(or CUDA_HOME set) and SSLFAST_CUDA=1 to build it"
        )
    else:  # pragma: no cover - a broken build
        CUDA_ERROR = f"the CUDA extension sslfast._C_cuda is built but failed to load ({exc})"

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ITYPE_CODE = {torch.int32: 0, torch.int64: 1}


def cpu_module():
    """sslfast._C, or RuntimeError saying why it is missing."""
    if _C is None:
        raise RuntimeError(C_ERROR)
    return _C


def cuda_module():
    """sslfast._C_cuda, or RuntimeError saying why it is missing."""
    if _C_cuda is None:
        raise RuntimeError(CUDA_ERROR)
    return _C_cuda


def cuda_unusable_reason() -> str | None:
    """None when the CUDA extension can run here, else why not."""
    if _C_cuda is None:
        return CUDA_ERROR
    if not torch.cuda.is_available():
        return "the CUDA extension is built but torch sees no CUDA device on this machine"
    if _C_cuda.device_count() == 0:
        return f"the CUDA extension is built but the CUDA runtime sees no device ({_C_cuda.runtime_error()})"
    return None


def ptr(t: torch.Tensor | None) -> int:
    """The data pointer of a tensor (0 for None)."""
    return 0 if t is None else t.data_ptr()


def stream(device: torch.device) -> int:
    """The current CUDA stream handle on ``device``, as an integer for the extension."""
    return torch.cuda.current_stream(device).cuda_stream
