"""Benchmarks shared by ``python -m sslfast bench`` and ``benchmarks/`` (pytest-benchmark).

``harness`` times and records; each other module of this package is one op family and
defines ``cases(device, quick) -> list[Case]`` at its production shapes.
"""
