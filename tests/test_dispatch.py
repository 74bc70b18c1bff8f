"""The dispatch mechanism, the extension loader and the env report."""
import subprocess
import sys

import pytest
import torch

from sslfast import _dispatch, _ext, _validation
from sslfast._dispatch import BackendUnavailableError

OP = "_test_dispatch_op"


@pytest.fixture(autouse=True)
def _registered():
    for b in ("reference", "cpu", "triton"):
        _dispatch.register(OP, b)(lambda b=b: b)
    yield
    _dispatch._REGISTRY.pop(OP, None)
    _dispatch._ORDER.pop((OP, "cpu"), None)


@pytest.mark.cpu
def test_auto_picks_cpu_backend_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("SSLFAST_BACKEND", raising=False)
    name, fn = _dispatch.resolve(OP, None, torch.device("cpu"))
    assert (name, fn()) == ("cpu", "cpu")


@pytest.mark.cpu
def test_env_override_and_explicit_backend(monkeypatch):
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    assert _dispatch.resolve(OP, None, torch.device("cpu"))[0] == "reference"
    # an explicit argument beats the environment
    assert _dispatch.resolve(OP, "cpu", torch.device("cpu"))[0] == "cpu"
    monkeypatch.setenv("SSLFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SSLFAST_BACKEND"):
        _dispatch.resolve(OP, None, torch.device("cpu"))


@pytest.mark.cpu
def test_missing_backend_errors_say_what_is_missing(monkeypatch):
    monkeypatch.delenv("SSLFAST_BACKEND", raising=False)
    with pytest.raises(BackendUnavailableError, match="has no cuda backend"):
        _dispatch.resolve(OP, "cuda", torch.device("cpu"))
    _dispatch.register(OP, "cuda")(lambda: "cuda")
    with pytest.raises(BackendUnavailableError, match="runs on CUDA tensors"):
        _dispatch.resolve(OP, "cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be"):
        _dispatch.resolve(OP, "gpu", torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="no implementation"):
        _dispatch.resolve("_no_such_op", None, torch.device("cpu"))


@pytest.mark.cpu
def test_triton_on_cpu_tensors_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _dispatch.backend_unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _dispatch._triton_error() is None:
        assert _dispatch.backend_unavailable_reason("triton", torch.device("cpu")) is None


@pytest.mark.cpu
def test_order_override():
    _dispatch.set_order(OP, "cpu", ("reference", "cpu"))
    assert _dispatch.resolve(OP, None, torch.device("cpu"))[0] == "reference"


@pytest.mark.cpu
def test_cuda_status_is_truthful():
    reason = _ext.cuda_unusable_reason()
    if torch.cuda.is_available() and _ext._C_cuda is not None:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason
    assert _ext.C_ERROR is None, "the CPU extension must always be built"


@pytest.mark.cpu
def test_env_report_runs_and_tells_the_truth():
    out = subprocess.run([sys.executable, "-m", "sslfast", "env"], capture_output=True, text=True, check=True).stdout
    assert "cpu_extension" in out and "built" in out
    if not torch.cuda.is_available():
        assert "cuda on cuda tensors" in out
        line = next(l for l in out.splitlines() if "cuda on cuda tensors" in l)
        assert "unavailable" in line


@pytest.mark.cpu
def test_validation_messages_name_the_argument():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _validation.check_tensor("x", [1, 2])
    with pytest.raises(ValueError, match=r"x must have 2 dimensions, got shape \(3,\)"):
        _validation.check_tensor("x", torch.zeros(3), ndim=2)
    with pytest.raises(TypeError, match="x must have dtype"):
        _validation.check_tensor("x", torch.zeros(3, dtype=torch.int32), dtypes=_validation.FLOAT_DTYPES)
    with pytest.raises(ValueError, match=r"y must have shape \(\*, 4\)"):
        _validation.check_tensor("y", torch.zeros(2, 3), shape=(None, 4))
    with pytest.raises(ValueError, match="mask_prob must be in"):
        _validation.check_prob("mask_prob", 1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _validation.check_positive("temperature", 0.0)
    with pytest.raises(ValueError, match="mask_length must be >= 1"):
        _validation.check_int("mask_length", 0, min_value=1)
    with pytest.raises(TypeError, match="mask_length must be an int"):
        _validation.check_int("mask_length", 2.0, min_value=1)
    with pytest.raises(ValueError, match="style must be one of"):
        _validation.check_choice("style", "x", ("fairseq", "hf"))
    a, b = torch.zeros(1), torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="one device"):
        _validation.check_same_device(a=a, b=b)


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (the device guard reads only ``.device``)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.fixture
def guard_log(monkeypatch):
    """Replaces torch.cuda.device and torch.cuda.current_stream by recorders: the list gets
    ("enter", device), ("stream", device) and ("exit", device) in call order."""
    import contextlib
    import types

    log = []

    @contextlib.contextmanager
    def device(d):
        log.append(("enter", torch.device(d)))
        try:
            yield
        finally:
            log.append(("exit", torch.device(d)))

    def current_stream(d=None):
        log.append(("stream", None if d is None else torch.device(d)))
        return types.SimpleNamespace(cuda_stream=4242)

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    return log


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_device_guard_enters_the_tensors_device_and_its_stream(guard_log, backend):
    # Tensors on cuda:1 (whatever device is current): the launch runs inside
    # torch.cuda.device(cuda:1) and the stream handle is cuda:1's current stream.
    def impl(x, y=None):  # an op's implementation: launches on the stream of its CUDA tensor
        guard_log.append(("launch", None))
        return _ext.stream((x if y is None else y).device)

    _dispatch.register(OP, backend)(impl)
    x = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(2))
    assert _dispatch.get(OP, backend)(torch.zeros(1), y=x) == 4242  # found among kwargs too
    cuda1 = torch.device("cuda", 1)
    assert guard_log == [("enter", cuda1), ("launch", None), ("stream", cuda1), ("exit", cuda1)]
    # CPU tensors (the Triton interpreter) launch with no guard
    guard_log.clear()
    _dispatch.get(OP, backend)(torch.zeros(1))
    assert guard_log == [("launch", None), ("stream", torch.device("cpu"))]


@pytest.mark.cpu
def test_every_gpu_implementation_is_guarded():
    # Every cuda and triton implementation the ops register goes through the one guard;
    # reference and cpu ones are left as they are.
    import sslfast  # noqa: F401  (registers every op)

    seen = 0
    for op in _dispatch.registered_ops():
        for backend, fn in _dispatch._REGISTRY[op].items():
            guarded = hasattr(fn, "unguarded")
            assert guarded == (backend in ("cuda", "triton")), (op, backend)
            seen += guarded
    assert seen >= 10
