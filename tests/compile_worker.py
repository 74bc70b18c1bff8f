"""Compiles one op family's Triton kernels for sm_80 and sm_90 with no GPU and writes what
each launch would demand as JSON (run by ``tests/test_compile_triton.py`` in a child process:
the test session runs Triton in the interpreter, and the interpreter is chosen when a kernel
is decorated, so compiling needs a process where TRITON_INTERPRET is unset).

    python tests/compile_worker.py FAMILY OUT.json [--archs 80,90]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import triton_stub  # noqa: E402


def _fma_counts(archs) -> dict:
    """{"sm_XX:kernel": the most fused multiply-adds (``fma.rn`` in the PTX) of any of the
    kernel's compiled specialisations}, for every kernel of sslfast.kernels compiled here."""
    from triton.runtime.jit import JITFunction

    counts = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("sslfast.kernels.") or mod is None:
            continue
        for fn in vars(mod).values():
            if not isinstance(fn, JITFunction):
                continue
            for device, cache in list(fn.device_caches.items()):
                for kernel in cache[0].values():
                    key = f"sm_{archs[int(device)]}:{fn.fn.__name__}"
                    n = kernel.asm.get("ptx", "").count("fma.rn")
                    counts[key] = max(counts.get(key, 0), n)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family")
    p.add_argument("out")
    p.add_argument("--archs", default=",".join(map(str, triton_stub.ARCHS)))
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(","))

    stub = triton_stub.install(archs)
    from sslfast import _dispatch

    original = _dispatch.backend_unavailable_reason

    def reason(backend, device):  # Triton on CPU tensors: compiled for the stub, never run
        if backend == "triton" and torch.device(device).type == "cpu":
            return _dispatch._triton_error()
        return original(backend, device)

    _dispatch.backend_unavailable_reason = reason
    import compile_cases

    cases, errors = [], []
    t0 = time.perf_counter()
    for label, thunk in compile_cases.FAMILIES[args.family]():
        for arch in archs:
            stub.use(arch)
            stub.label = label
            before = len(stub.launches)
            t = time.perf_counter()
            try:
                thunk()
            except Exception as exc:  # recorded: the test fails on it with the label
                errors.append(dict(label=label, arch=arch, error=f"{type(exc).__name__}: {exc}"[:4000],
                                   trace=traceback.format_exc()[-4000:]))
            cases.append(dict(label=label, arch=arch, launches=len(stub.launches) - before,
                              seconds=round(time.perf_counter() - t, 3)))
    import triton

    report = dict(fma=_fma_counts(archs), family=args.family, archs=archs, triton=triton.__version__, torch=torch.__version__,
                  seconds=round(time.perf_counter() - t0, 1), cases=cases, errors=errors,
                  launches=[dataclasses.asdict(x) for x in stub.launches])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
