"""``python -m sslfast env``: what this machine has, which backends were built and which can run."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import _dispatch, _ext


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return getattr(mod, "__version__", "unknown")


def env_info() -> dict:
    """A dict of versions, build facts and backend availability (what ``env_report`` prints)."""
    from . import __version__

    info: dict = {
        "sslfast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "SSLFAST_BACKEND": os.environ.get("SSLFAST_BACKEND"),
    }
    if _ext._C:
        omp = " with OpenMP" if getattr(_ext._C, "openmp", False) else " without OpenMP"
        info["cpu_extension"] = f"built{omp}, SIMD {_ext._C.cpu_isa()} (CPU supports {_ext._C.cpu_isa_supported()})"
    else:
        info["cpu_extension"] = _ext.C_ERROR
    if _ext._C_cuda is not None:
        rt = _ext._C_cuda.cuda_runtime_version
        info["cuda_extension"] = f"built for sm {_ext._C_cuda.archs} with CUDA runtime {rt // 1000}.{rt % 1000 // 10}"
    else:
        info["cuda_extension"] = _ext.CUDA_ERROR
    backends = {}
    for device in ("cpu", "cuda"):
        for name in _dispatch.BACKENDS:
            reason = _dispatch.backend_unavailable_reason(name, torch.device(device))
            backends[f"{name} on {device} tensors"] = "usable" if reason is None else f"unavailable: {reason}"
    info["backends"] = backends
    info["ops"] = {op: list(_dispatch.implemented_backends(op)) for op in _dispatch.registered_ops()}
    return info


def env_report() -> str:
    """A human-readable report of ``env_info()``."""
    info = env_info()
    lines = ["sslfast environment", ""]
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for k, v in value.items():
                lines.append(f"  {k:<34} {v}")
        else:
            lines.append(f"{key:<36} {value}")
    return "\n".join(lines)
