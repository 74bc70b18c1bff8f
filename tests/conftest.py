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


def _cpu_isa_levels():
    from sslfast import _ext

    mod = _ext.cpu_module() if _ext._C is not None else None
    if mod is None:
        return []
    order = ["scalar", "avx2", "avx512"]
    best = order.index(mod.cpu_isa_supported())
    return [pytest.param(isa, marks=() if i <= best else pytest.mark.skip(reason=f"this CPU has no {isa}"))
            for i, isa in enumerate(order)]


@pytest.fixture(params=_cpu_isa_levels())
def cpu_isa(request):
    """Runs the test once per SIMD level of the C++ kernels ('scalar', 'avx2', 'avx512'),
    forced with sslfast._C.set_cpu_isa; a level this CPU lacks is skipped, not passed."""
    from sslfast import _ext

    mod = _ext.cpu_module()
    before = mod.cpu_isa()
    assert mod.set_cpu_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        mod.set_cpu_isa("avx512")  # back to the uncapped default...
        mod.set_cpu_isa(before)  # ...then to whatever cap was in effect
