"""Test tiers (op-contract.md): ``cpu`` (reference and C++), ``interpreter`` (Triton under
TRITON_INTERPRET=1 on CPU tensors), ``gpu`` (skipped without CUDA, never reported as passed).

Without a CUDA device, TRITON_INTERPRET=1 is set here, before any kernel module is
imported, so the Triton kernels run in the interpreter on CPU tensors.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    import triton  # noqa: F401,E402

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

import sslfast  # noqa: E402,F401  (after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="gpu tier: no CUDA device on this machine")
    skip_triton = pytest.mark.skip(reason="interpreter tier: triton is not installed")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture
def triton_device():
    """The device Triton kernels run on here: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
