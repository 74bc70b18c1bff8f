"""Triton kernels of sslfast, importable as ``sslfast.kernels``.

One module per op family, the same names as ``sslfast/reference`` and ``csrc``. Kernels
stay runnable under ``TRITON_INTERPRET=1`` (CPU tensors, no bf16, no fp16 atomics) so the
interpreter test tier exercises them on machines without a GPU.
"""
