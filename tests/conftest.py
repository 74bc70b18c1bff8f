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

try:  # property-based tests (tests/test_hostile.py): derandomised, so CI sees the same examples every run
    from hypothesis import HealthCheck, settings

    settings.register_profile("sslfast", derandomize=True, deadline=None, max_examples=20, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sslfast"))
except ImportError:  # hypothesis is a test dependency; without it those tests are skipped
    pass


def _fp32_like_compiled(value: float) -> float:
    """A Python float as a compiled Triton kernel receives it: rounded to fp32."""
    import struct

    return struct.unpack("f", struct.pack("f", value))[0]


def compiled_float_args(fn, args, kwargs):
    """``args``/``kwargs`` of a launch of the jitted ``fn`` with every Python float that a
    compiled kernel would receive as fp32 rounded to fp32: a float argument whose parameter
    is neither a constexpr nor annotated ``tl.float64``. The interpreter passes Python floats
    on unrounded (they combine with an fp64 tensor in fp64), so without this a kernel could
    agree bit for bit with the reference here and not on a GPU."""
    import inspect

    from triton.runtime.jit import _normalize_ty

    params = list(inspect.signature(fn).parameters.values())

    def convert(param, value):
        if not isinstance(value, float) or param is None:
            return value
        ty = "" if param.annotation is inspect.Parameter.empty else _normalize_ty(param.annotation)
        return value if ty == "fp64" or "constexpr" in ty else _fp32_like_compiled(value)

    by_name = {p.name: p for p in params}
    args = tuple(convert(params[i] if i < len(params) else None, a) for i, a in enumerate(args))
    kwargs = {k: convert(by_name.get(k), v) for k, v in kwargs.items()}
    return args, kwargs


@pytest.fixture(scope="session", autouse=True)
def _interpreter_floats_as_compiled():
    """Under TRITON_INTERPRET=1, every kernel launch gets its float arguments the way a
    compiled kernel does (``compiled_float_args``), for the whole session."""
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        args, kwargs = compiled_float_args(self.fn, args, kwargs)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


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


CPU_ISAS = ["scalar", "avx2", "avx512"]  # the SIMD levels of the C++ kernels, lowest first


@pytest.fixture
def force_cpu_isa():
    """force_cpu_isa(name): run the C++ kernels on that SIMD level from now on (forced with
    sslfast._C.set_cpu_isa; skips the test when this CPU lacks the level). The level in
    effect before the test is restored afterwards."""
    from sslfast import _ext

    if _ext._C is None:
        pytest.skip("C++ extension not built")
    mod = _ext.cpu_module()
    before = mod.cpu_isa()

    def force(name):
        if CPU_ISAS.index(name) > CPU_ISAS.index(mod.cpu_isa_supported()):
            pytest.skip(f"this CPU cannot run the {name} path (best: {mod.cpu_isa_supported()})")
        assert mod.set_cpu_isa(name) == name

    try:
        yield force
    finally:
        mod.set_cpu_isa(before)


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request, force_cpu_isa):
    """Runs the test once per SIMD level of the C++ kernels; a level this CPU lacks is
    skipped, not passed."""
    force_cpu_isa(request.param)
    return request.param


class TritonLaunches:
    """Every Triton kernel launch while active, by kernel name, in order.

    Counts calls of ``run`` on the launched kernel objects (``JITFunction`` on a GPU, the
    interpreter's ``InterpretedFunction`` under TRITON_INTERPRET=1): ``kernel[grid](...)``
    goes through it, a device function called from a kernel does not. A launch whose tensors
    are on the meta device is recorded but not run (``dry``: host-side checks only).
    """

    def __init__(self):
        self.names: list[str] = []

    def __len__(self):
        return len(self.names)

    def clear(self):
        self.names.clear()


@pytest.fixture
def triton_launches(monkeypatch):
    from triton.runtime import jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    record = TritonLaunches()
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if not kwargs.get("warmup", False):
                record.names.append(self.fn.__name__)
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                if any(t.device.type == "meta" for t in tensors):
                    return None
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return record


@pytest.fixture
def triton_on_meta(monkeypatch, triton_launches):
    """Lets ``backend="triton"`` resolve for meta tensors, with launches recorded, not run.

    Any host read of device data (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``,
    ``.cpu()``, ``nonzero``, boolean indexing) raises on a meta tensor, so a call that
    completes here makes no host synchronisation on a GPU either.
    """
    from sslfast import _dispatch

    original = _dispatch.backend_unavailable_reason

    def reason(backend, device):
        if backend == "triton" and torch.device(device).type == "meta":
            return _dispatch._triton_error()
        return original(backend, device)

    monkeypatch.setattr(_dispatch, "backend_unavailable_reason", reason)
    return triton_launches
