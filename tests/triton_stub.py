"""A Triton driver for a CUDA GPU that is not there: kernels compile for real (TTIR ->
TTGIR -> PTX -> cubin through ptxas) for a chosen sm_XX, and launches are recorded instead
of run. Used by the ``compile`` test tier (``tests/test_compile_triton.py`` through
``tests/compile_worker.py``), which needs no GPU.

What a launch on a real device would demand is read from the cubin: registers, stack
(spills live there), local memory and static shared memory, with ``cuobjdump -res-usage``
(the copy Triton ships, or the CUDA toolkit's); the dynamic shared memory and the grid come
from Triton's metadata and the launch itself.

Device index ``i`` of the stub stands for the i-th architecture of ``ARCHS``, so one process
can compile for several targets: Triton caches its binder (and the target) per device index.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile

from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

ARCHS = (80, 90)

# Per-block limits of each target (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): shared memory a block may opt in to, registers per SM (so a block of
# t threads may use at most 65536 / t registers per thread), 255 registers per thread, 1024
# threads per block, grid.y and grid.z at most 65535.
LIMITS = {
    80: dict(max_shared=166912, regs_per_sm=65536, max_regs_per_thread=255, max_threads=1024),
    90: dict(max_shared=232448, regs_per_sm=65536, max_regs_per_thread=255, max_threads=1024),
}
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass
class Function:
    """One compiled kernel as ``load_binary`` sees it, with its resources from the cubin."""

    name: str
    arch: int
    num_warps: int
    shared: int  # bytes: Triton's metadata (static + dynamic shared memory of the launch)
    regs: int
    stack: int  # bytes per thread (spills and local arrays)
    local: int  # bytes per thread
    static_shared: int


@dataclasses.dataclass
class Launch:
    label: str
    kernel: str
    arch: int
    grid: tuple
    num_warps: int
    shared: int
    regs: int
    stack: int
    local: int


def _cuobjdump() -> str:
    try:
        from triton.backends.nvidia import __file__ as nv

        cand = os.path.join(os.path.dirname(nv), "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:  # pragma: no cover
        pass
    found = shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in triton/backends/nvidia/bin nor on PATH)")
    return found


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, static shared and local bytes of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = _RES.search(out)
    if not m:
        raise RuntimeError(f"could not read the resource usage from cuobjdump:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, static_shared=shared, local=local)


class _Utils:
    """The subset of ``CudaUtils`` that compiling and launching use."""

    def __init__(self, owner: "StubCudaDriver"):
        self.owner = owner

    def get_device_properties(self, device):
        arch = self.owner.arch_of(device)
        lim = LIMITS[arch]
        return {"max_shared_mem": lim["max_shared"], "multiprocessor_count": 132 if arch == 90 else 108,
                "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1, "max_num_regs": lim["regs_per_sm"],
                "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        arch = self.owner.arch_of(device)
        res = resource_usage(kernel)
        fn = Function(name=name, arch=arch, num_warps=-1, shared=shared, **res)
        self.owner.functions.append(fn)
        n_spills = res["stack"] // 4
        values = (None, fn, res["regs"], n_spills, LIMITS[arch]["max_threads"])
        return values[: self.owner.load_binary_arity]

    def unload_module(self, module):
        pass

    def is_stream_capturing(self, stream):
        return False

    def get_device_capability(self, device):
        return divmod(self.owner.arch_of(device), 10)


class _Launcher:
    def __init__(self, src, metadata):
        self.metadata = metadata

    def __call__(self, gridX, gridY, gridZ, stream, function, *rest):
        drv = _active_stub()
        function.num_warps = self.metadata.num_warps
        drv.launches.append(Launch(label=drv.label, kernel=function.name, arch=function.arch,
                                   grid=(int(gridX), int(gridY), int(gridZ)), num_warps=self.metadata.num_warps,
                                   shared=function.shared, regs=function.regs, stack=function.stack,
                                   local=function.local))


@functools.lru_cache(maxsize=None)
def _load_binary_arity() -> int:
    """Triton 3.x before n_max_threads unpacks four values from ``load_binary``, later five."""
    import inspect

    from triton.compiler import compiler

    return 5 if "n_max_threads" in inspect.getsource(compiler.CompiledKernel._init_handles) else 4


class StubCudaDriver(DriverBase):
    def __init__(self, archs=ARCHS):
        self.archs = tuple(archs)
        self.device = 0
        self.label = ""
        self.launches: list[Launch] = []
        self.functions: list[Function] = []
        self.utils = _Utils(self)
        self.launcher_cls = _Launcher
        self.load_binary_arity = _load_binary_arity()

    # -- which target --------------------------------------------------------------------
    def arch_of(self, device) -> int:
        return self.archs[int(device)]

    def use(self, arch: int) -> None:
        self.device = self.archs.index(arch)

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        return GPUTarget("cuda", self.arch_of(self.device), 32)

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device = int(device)

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(self.arch_of(self.device if device is None else device), 10)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):  # pragma: no cover - benchmarking only
        raise RuntimeError("the stub driver cannot benchmark")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):  # pragma: no cover
        raise RuntimeError("the stub driver cannot benchmark")

    def get_empty_cache_for_benchmark(self):  # pragma: no cover
        raise RuntimeError("the stub driver cannot benchmark")


def _active_stub() -> StubCudaDriver:
    from triton.runtime.driver import driver

    drv = driver.active
    assert isinstance(drv, StubCudaDriver)
    return drv


def install(archs=ARCHS) -> StubCudaDriver:
    """Makes a stub the active Triton driver (TRITON_INTERPRET must be unset before the
    kernels are imported: the interpreter decides at decoration time)."""
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the stub driver compiles kernels: unset TRITON_INTERPRET before importing triton")
    stub = StubCudaDriver(archs)
    driver.set_active(stub)
    return stub
