"""Every ```python block of README.md runs as written on this machine (a CPU is enough).

Blocks run one by one, each in a fresh namespace, in README order. ```bash blocks are not
run here: they install packages and start the benchmark (``tests/test_bench_harness.py``
runs ``python -m sslfast bench --quick`` and checks its output instead).
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def test_readme_has_python_blocks():
    assert python_blocks(), "README.md has no ```python block to test"


@pytest.mark.cpu
@pytest.mark.parametrize("line,code", python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_python_block_runs(line, code):
    exec(compile(code, f"README.md, block at line {line}", "exec"), {"__name__": "__readme__"})
