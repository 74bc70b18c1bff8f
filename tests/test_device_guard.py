"""The device guard on real GPUs: tensors on cuda:1 while cuda:0 is current launch on cuda:1,
on cuda:1's current stream, for the cuda and triton backends (gpu tier, needs two devices)."""
import pytest
import torch
import torch.nn.functional as F

import sslfast
from sslfast import _dispatch

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]


def _need_two_devices(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    reason = _dispatch.backend_unavailable_reason(backend, torch.device("cuda", 1))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_on_the_second_device_while_the_first_is_current(backend):
    _need_two_devices(backend)
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    side = torch.cuda.Stream(device=dev)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 300, generator=g) < 0.4
    a = torch.randn(64, 32, generator=g, dtype=torch.float64)
    b = torch.randn(64, 32, generator=g, dtype=torch.float64)
    with torch.cuda.stream(side):  # cuda:1's current stream is `side`, cuda:0 stays current
        assert torch.cuda.current_device() == 0
        neg = sslfast.sample_negatives(mask.to(dev), 10, seed=3, backend=backend)
        loss = sslfast.info_nce(a.float().to(dev), b.float().to(dev), backend=backend)
        side.synchronize()
    assert torch.cuda.current_device() == 0
    assert neg.device == dev and loss.device == dev
    # random streams are bit-identical to the reference; the loss against its fp64 formula
    # (InfoNCE, temperature 0.07, L2-normalised rows, the diagonal as positives)
    assert torch.equal(neg.cpu(), sslfast.sample_negatives(mask, 10, seed=3, backend="reference"))
    a32, b32 = a.float().double(), b.float().double()
    logits = F.normalize(a32, dim=1) @ F.normalize(b32, dim=1).T / 0.07
    want = F.cross_entropy(logits, torch.arange(64))
    torch.testing.assert_close(loss.double().cpu(), want, rtol=2e-5, atol=2e-5)
