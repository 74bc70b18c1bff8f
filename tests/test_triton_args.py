"""How arguments reach Triton kernels, checked without a GPU.

A compiled kernel receives a Python float as fp32 unless its parameter is annotated
``tl.float64``, while the interpreter keeps it in fp64; ``tests/conftest.py`` makes the
interpreter tier round like the compiler (``compiled_float_args``). These tests check that
rounding, and that no kernel of ours gets a plain float where the value must be exact.
"""
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from conftest import compiled_float_args  # noqa: E402

pytestmark = pytest.mark.interpreter


@triton.jit
def _scale_kernel(x_ptr, out_ptr, p, q: tl.float64, R: tl.constexpr):
    x = tl.load(x_ptr)
    tl.store(out_ptr, x * p)
    tl.store(out_ptr + 1, x * q)
    tl.store(out_ptr + 2, x * R)


def test_float_arguments_reach_the_interpreter_as_a_compiled_kernel_gets_them():
    x = torch.ones(1, dtype=torch.float64)
    out = torch.empty(3, dtype=torch.float64)
    _scale_kernel[(1,)](x, out, 0.1, 0.1, R=0.1)
    p32 = float(torch.tensor(0.1, dtype=torch.float32))
    assert p32 != 0.1
    assert out.tolist() == [p32, 0.1, 0.1]  # plain float: fp32; fp64-annotated and constexpr: exact


def test_compiled_float_args_binds_keywords_and_leaves_the_rest():
    def fn(a, b, c: tl.float64, D: tl.constexpr):
        pass

    args, kwargs = compiled_float_args(fn, (0.1, 3), dict(c=0.1, D=0.1, num_warps=4))
    assert args[0] == float(torch.tensor(0.1, dtype=torch.float32)) and args[1] == 3
    assert kwargs == dict(c=0.1, D=0.1, num_warps=4)


def test_masking_kernels_take_their_probabilities_in_fp64():
    from sslfast.kernels import masking as km

    for kernel, names in ((km._mask_rows_kernel, ("mask_prob", "dropout")), (km._equalize_kernel, ("dropout",))):
        params = inspect.signature(kernel.fn).parameters
        for name in names:
            assert str(params[name].annotation) in ("fp64", "tl.float64", str(tl.float64)), (kernel, name)
