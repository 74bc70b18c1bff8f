"""Compensated (Kahan) addition for Triton kernels, the same rule as ``add_compensated`` in
csrc/sslfast/common.h: the online log-sum-exp kernels add one tile's sum of exponentials to
the running sum per tile; compensated, a row of many tiles whose terms sit far below its
max term keeps about 1 ulp of error instead of up to half an ulp per tile."""
import triton
import triton.language as tl


@triton.jit
def add_compensated(total, comp, x):
    """Returns (total + x, new comp); the compensated sum is total - comp."""
    y = x - comp
    t = total + y
    return t, (t - total) - y


@triton.jit
def log_denominator(total, comp):
    """log(total - comp) for a compensated softmax denominator whose max term is 1, as
    log1p((total - 1) - comp) (csrc/sslfast/common.h). log1p from log by Goldberg's identity
    log1p(x) = log(u) * x / (u - 1), u = 1 + x: the interpreter has no libdevice.log1p."""
    x = (total - 1.0) - comp
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
