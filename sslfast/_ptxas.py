"""ptxas's resource report of the CUDA kernels: written by the build, read by the compile tier.

The build (setup.py) compiles every ``csrc/*_cuda.cu`` with ``--resource-usage`` and keeps
what ptxas says about each kernel and architecture (registers, stack frame, spill stores and
loads, static shared memory) in ``_C_cuda.ptxas.json`` beside the built module, with a digest
of the sources it came from. ``tests/test_compile_cuda.py`` reads it; where the build made
none for the current sources or for an architecture the test needs, ``report`` compiles the
device code alone (``nvcc -cubin``, no host pass) and caches the result under
``build/ptxas/`` keyed by the digest, so a tier run after a source change pays once.

No torch import here: setup.py loads this file by path, before sslfast is installed.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sysconfig

REPORT_NAME = "_C_cuda.ptxas.json"
FORMAT = 2  # of the JSON; a report of another format is made again
_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")


def sources_digest(csrc: str) -> str:
    """sha256 over the CUDA sources and every header under ``csrc`` (names and contents)."""
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(csrc, "*.cu")) + glob.glob(os.path.join(csrc, "**", "*.h"), recursive=True))
    for f in files:
        h.update(os.path.relpath(f, csrc).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def demangle(names: list[str]) -> list[str]:
    """C++ names of mangled symbols (c++filt; the mangled names themselves without it)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else list(names)


def kernel_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<true>(int, ...)`` -> ``k<true>``: the unqualified
    name with its template arguments."""
    depth, cut = 0, len(demangled)
    for i, ch in enumerate(demangled):  # the parameter list starts at the first '(' outside <>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not demangled.startswith("(anonymous namespace)", i):
            cut = i
            break
    head = demangled[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(head):  # last '::' or ' ' outside template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0 and (head.startswith("::", i) or ch == " "):
            start = i + (2 if head.startswith("::", i) else 1)
    return head[start:]


def parse(text: str, source: str) -> list[dict]:
    """One dict per (function, arch) of ptxas ``--resource-usage`` output of ``source`` (a
    file name): file, mangled, kernel (see kernel_name), arch, entry (True for a kernel,
    False for a device function ptxas kept as a call), registers (kernels), stack,
    spill_stores, spill_loads, smem (static shared memory, bytes), cumulative_stack."""
    rows, cur, props, arch = [], None, None, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            cur = _row(source, m.group(1), arch, True)
            rows.append(cur)
            continue
        m = re.search(r"ptxas info\s*: (?:Compiling|Function properties for) (\S+)", line)
        if m and "Compiling" not in line:
            props = m.group(1)
            continue
        m = re.search(r"ptxas info\s*: Compiling for '(sm_\w+)'|for '(sm_\w+)'", line)
        if m:
            arch = m.group(1) or m.group(2)
        m = _PROPS.search(line)
        if m:
            target = cur if cur is not None and props == cur["mangled"] else None
            if target is None and props is not None:  # a called function's own frame
                target = _row(source, props, arch, False)
                rows.append(target)
            if target is not None:
                target["stack"], target["spill_stores"], target["spill_loads"] = map(int, m.groups())
            props = None
            continue
        m = _USED.search(line)
        if m and cur is not None:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", m.group(2))
            cur["smem"] = int(s.group(1)) if s else 0
            c = re.search(r"(\d+) bytes cumulative stack size", m.group(2))
            cur["cumulative_stack"] = int(c.group(1)) if c else 0
            cur = None
    nxt = None  # a function listed before any kernel belongs to the arch of the next one
    for row in reversed(rows):
        row["arch"] = row["arch"] or nxt
        nxt = row["arch"]
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = kernel_name(name)
    return rows


def _row(source, mangled, arch, entry):
    return {"file": source, "mangled": mangled, "arch": arch, "entry": entry, "registers": None, "stack": 0,
            "spill_stores": 0, "spill_loads": 0, "smem": 0, "cumulative_stack": 0}


def include_dirs(csrc: str, cuda_include: str | None = None) -> list[str]:
    import pybind11

    dirs = [csrc, pybind11.get_include(), sysconfig.get_paths()["include"]]
    return dirs + ([cuda_include] if cuda_include else [])


def compile_report(nvcc: str, csrc: str, arch: str, jobs: int = 1) -> list[dict]:
    """ptxas's report of every .cu of ``csrc`` for ``sm_<arch>``, compiling device code only."""
    import concurrent.futures
    import tempfile

    srcs = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--resource-usage", f"-arch=sm_{arch}"]
    flags += [f"-I{d}" for d in include_dirs(csrc)]
    with tempfile.TemporaryDirectory() as tmp:
        def one(src):
            out = os.path.join(tmp, os.path.basename(src) + ".cubin")
            proc = subprocess.run([nvcc, "-cubin", src, "-o", out, *flags], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc -cubin {src} failed:\n{proc.stdout}{proc.stderr}")
            rows = parse(proc.stdout + proc.stderr, os.path.basename(src))
            for r in rows:
                r["arch"] = r["arch"] or f"sm_{arch}"
            return rows

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return [row for rows in pool.map(one, srcs) for row in rows]


def write(path: str, digest: str, archs: list[str], rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "sources_sha256": digest, "archs": sorted(archs), "kernels": rows}, f, indent=1)


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def report(csrc: str, arch: str, built: str | None, cache_dir: str, nvcc: str | None, jobs: int = 1) -> list[dict]:
    """The rows of ``sm_<arch>`` for the current sources: from the build's report ``built``
    when it matches them, else from the cache, else compiled now (and cached). Raises
    RuntimeError when none of these can give it (no nvcc)."""
    digest = sources_digest(csrc)
    sm = f"sm_{arch}"
    for path in ([built] if built else []) + [os.path.join(cache_dir, f"{digest[:16]}-{sm}.json")]:
        data = load(path)
        if (data and data.get("format") == FORMAT and data.get("sources_sha256") == digest
                and sm in {r["arch"] for r in data["kernels"]}):
            return [r for r in data["kernels"] if r["arch"] == sm]
    if not nvcc:
        raise RuntimeError(f"no ptxas report for {sm} of the current sources and no nvcc to make one")
    rows = compile_report(nvcc, csrc, arch, jobs)
    os.makedirs(cache_dir, exist_ok=True)
    write(os.path.join(cache_dir, f"{digest[:16]}-{sm}.json"), digest, [sm], rows)
    return rows
