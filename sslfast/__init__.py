"""sslfast: fused Triton and CUDA kernels for self-supervised learning ops.

Public ops (each takes ``backend=None | "reference" | "cpu" | "triton" | "cuda"``; None picks
the fastest backend available for the tensors' device, ``SSLFAST_BACKEND`` overrides):
see ``sslfast.ops``. ``python -m sslfast env`` reports what is built and usable.
"""
__version__ = "0.1.0"

from . import random  # noqa: F401
from ._dispatch import BACKENDS, BackendUnavailableError  # noqa: F401
from .env import env_info, env_report  # noqa: F401
from .random import derive_seed  # noqa: F401
from .ops.gumbel_quantize import GumbelQuantizeOutput, gumbel_vector_quantize  # noqa: F401,E402
