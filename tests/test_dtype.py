"""The fp16/bf16 conversions every C++/CUDA kernel shares (csrc/sslfast/dtype.h) equal
torch's, bit for bit: every fp16 and bf16 pattern to fp32, and fp32 rounding to both."""
import pytest
import torch

from sslfast import _ext

CODES = {torch.float16: 1, torch.bfloat16: 2}


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_widens_like_torch(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    src = bits.view(dtype)
    out = torch.empty(src.numel(), dtype=torch.float32)
    _ext.cpu_module().load_floats(src.data_ptr(), out.data_ptr(), src.numel(), CODES[dtype])
    want = src.float()
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))  # signed zeros too


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_rounds_to_nearest_even_like_torch(dtype):
    g = torch.Generator().manual_seed(0)
    # random bit patterns cover every exponent (subnormals, overflow, inf, nan); the halfway
    # cases are where round-to-nearest-even differs from round-half-up
    raw = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    shift = 13 if dtype == torch.float16 else 16
    halfway = (torch.arange(-5000, 5000, dtype=torch.int32) << shift) | (1 << (shift - 1))
    src = torch.cat([raw, halfway, halfway + (1 << shift)]).view(torch.float32)
    src = torch.cat([src, torch.tensor([0.0, -0.0, 65504.0, 65520.0, 1e-8, 6e-8, float("inf"), -float("inf")])])
    out = torch.empty(src.numel(), dtype=dtype)
    _ext.cpu_module().store_floats(src.data_ptr(), out.data_ptr(), src.numel(), CODES[dtype])
    want = src.to(dtype)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
