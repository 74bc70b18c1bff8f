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
    lines = [l for l in out.splitlines() if " on cuda tensors" in l]
    assert {l.split()[0] for l in lines} == set(_dispatch.BACKENDS)
    if not torch.cuda.is_available():
        # every backend, the reference included, is unusable on CUDA tensors without a CUDA device
        for line in lines:
            assert "unavailable" in line and "no CUDA device" in line, line
    line = next(l for l in out.splitlines() if "reference on cpu tensors" in l)
    assert line.split()[-1] == "usable"


@pytest.mark.cpu
def test_env_reference_on_cuda_follows_the_device(monkeypatch):
    from sslfast.env import env_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert env_info()["backends"]["reference on cuda tensors"].startswith("unavailable: torch sees no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a fake GPU")
    assert env_info()["backends"]["reference on cuda tensors"] == "usable"


@pytest.mark.cpu
def test_cpu_size_rule_of_the_in_batch_losses(monkeypatch):
    """backend=None on CPU: the reference (about 2x faster on CPU) while one logits matrix
    has at most 2^26 entries, the memory-lean C++ kernel above; set_order still wins."""
    monkeypatch.delenv("SSLFAST_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert _dispatch.INFO_NCE_CPU_REFERENCE_MAX_LOGITS == 1 << 26
    for op in ("info_nce", "nt_xent"):
        assert _dispatch.resolve(op, None, cpu, rows=4096, cols=4096)[0] == "reference"  # the bench's shape
        assert _dispatch.resolve(op, None, cpu, rows=8192, cols=8192)[0] == "reference"  # 2^26 exactly
        assert _dispatch.resolve(op, None, cpu, rows=8192, cols=8193)[0] == "cpu"
        assert _dispatch.resolve(op, None, cpu, rows=65536, cols=65536)[0] == "cpu"
        assert _dispatch.resolve(op, None, cpu)[0] == "cpu"  # no sizes: the usual order
        assert _dispatch.resolve(op, "cpu", cpu, rows=64, cols=64)[0] == "cpu"  # explicit wins
    monkeypatch.setitem(_dispatch._ORDER, ("info_nce", "cpu"), ("cpu", "reference"))
    assert _dispatch.resolve("info_nce", None, cpu, rows=64, cols=64)[0] == "cpu"


@pytest.mark.cpu
def test_public_in_batch_losses_pass_their_sizes(monkeypatch):
    import sslfast

    monkeypatch.delenv("SSLFAST_BACKEND", raising=False)
    q, k = torch.randn(64, 8), torch.randn(64, 8)
    with _dispatch.record_choices() as seen:
        sslfast.info_nce(q, k)
        sslfast.info_nce(q, k, queue=torch.randn(32, 8))
        sslfast.nt_xent(q, k)
    assert seen == [("info_nce", "reference"), ("info_nce", "reference"), ("nt_xent", "reference")]
    monkeypatch.setattr(_dispatch, "INFO_NCE_CPU_REFERENCE_MAX_LOGITS", 64 * 64)
    with _dispatch.record_choices() as seen:
        sslfast.info_nce(q, k)  # 64 x 64 logits: at the cap
        sslfast.info_nce(q, k, queue=torch.randn(1, 8))  # 64 x 65: over it
        sslfast.nt_xent(q, k)  # 128 x 128
    assert seen == [("info_nce", "reference"), ("info_nce", "cpu"), ("nt_xent", "cpu")]


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
