"""Share of each CUDA file's device code that some CPU test executes (issue 9, item 6).

How lines are counted:
* device code of a .cu file: the body lines of its ``__global__`` and ``__device__`` functions
  plus the body lines of every SSLFAST_HD / SSLFAST_DEVICE function of the headers it
  includes that this code reaches (calls, transitively, by name);
* a body line is a line inside the function's braces that holds code: blank lines, comment
  lines and lines of only braces are not counted;
* executed: a header line that gcov saw run in the instrumented CPU module while the tests
  ran (count > 0), or, for lines gcov lists no count for (declarations, ``else``), any line
  of a function that gcov saw entered. Lines of the .cu files themselves never run on a CPU.

Usage (the CPU module built with gcov, the tests run, then this script):
    SSLFAST_COVERAGE=1 SSLFAST_CUDA=0 pip install --no-build-isolation --no-deps -e .
    python -m pytest tests -m cpu -q -p no:cacheprovider [-k ...]
    python tools/cuda_coverage.py [--markdown]
    SSLFAST_CUDA=0 pip install --no-build-isolation --no-deps -e .   # the optimised module again
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
_IDENT = re.compile(r"[A-Za-z_]\w*")


def _strip_comments(lines: list[str]) -> list[str]:
    """The lines with // and /* */ comments blanked (string literals are rare in kernels and
    hold no comment markers here)."""
    out, in_block = [], False
    for line in lines:
        s, i, buf = line, 0, []
        while i < len(s):
            if in_block:
                j = s.find("*/", i)
                if j < 0:
                    i = len(s)
                else:
                    in_block, i = False, j + 2
            elif s.startswith("//", i):
                break
            elif s.startswith("/*", i):
                in_block, i = True, i + 2
            else:
                buf.append(s[i])
                i += 1
        out.append("".join(buf))
    return out


def functions(path: str, markers: tuple[str, ...]) -> list[dict]:
    """Functions whose declaration (from the marker to the opening brace) holds one of
    `markers`: name, first and last body line (1-based), the counted body lines, and the
    identifiers of the body."""
    raw = open(path).read().splitlines()
    code = _strip_comments(raw)
    found, n = [], len(code)
    i = 0
    while i < n:
        if any(m in code[i] for m in markers) and not code[i].lstrip().startswith("#"):
            # the declaration runs to the first '{' or ';' at paren depth 0
            decl, j, depth = "", i, 0
            while j < n:
                k_end = None
                for k, ch in enumerate(code[j]):
                    if ch == "(":
                        depth += 1
                    elif ch == ")":
                        depth -= 1
                    elif depth == 0 and ch in "{;":
                        k_end = k
                        break
                decl += " " + (code[j] if k_end is None else code[j][:k_end])
                if k_end is not None:
                    break
                j += 1
            if j >= n or code[j][k_end] == ";":
                i = j + 1
                continue
            m = re.search(r"([A-Za-z_]\w*)\s*\(", decl.split("(")[0] + "(")
            name = m.group(1) if m else "?"
            # body: from the '{' to its match
            depth, start, end = 0, j, None
            for line_no in range(j, n):
                seg = code[line_no][k_end:] if line_no == j else code[line_no]
                for ch in seg:
                    if ch == "{":
                        depth += 1
                    elif ch == "}":
                        depth -= 1
                        if depth == 0:
                            end = line_no
                            break
                if end is not None:
                    break
            body = []
            for line_no in range(start, end + 1):
                text = code[line_no]
                if line_no == start:
                    text = text[k_end + 1:]
                if line_no == end:
                    text = text[:text.rfind("}")]
                if text.strip().strip("{}").strip():
                    body.append(line_no + 1)
            idents = set(_IDENT.findall(" ".join(code[start:end + 1])))
            found.append({"name": name, "file": path, "first": start + 1, "last": end + 1, "lines": body,
                          "calls": idents})
            i = end + 1
        else:
            i += 1
    return found


def includes(path: str, seen: set[str] | None = None) -> set[str]:
    """Headers under csrc that `path` includes, transitively."""
    seen = set() if seen is None else seen
    here = os.path.dirname(path)
    for m in re.finditer(r'#include\s+"([^"]+)"', open(path).read()):
        for base in (here, CSRC):
            cand = os.path.normpath(os.path.join(base, m.group(1)))
            if os.path.exists(cand) and cand not in seen:
                seen.add(cand)
                includes(cand, seen)
                break
    return seen


def gcov_lines(obj_dir: str) -> dict[str, dict[int, int]]:
    """{header path: {line: count}} from the .gcda files under obj_dir (max over objects)."""
    gcdas = glob.glob(os.path.join(obj_dir, "**", "*.gcda"), recursive=True)
    if not gcdas:
        raise SystemExit(f"no .gcda files under {obj_dir}: build with SSLFAST_COVERAGE=1 and run the tests first")
    counts: dict[str, dict[int, int]] = {}
    for gcda in gcdas:
        out = subprocess.run(["gcov", "--json-format", "--stdout", "-o", os.path.dirname(gcda), gcda],
                             capture_output=True, text=True, cwd=ROOT)
        for line in out.stdout.splitlines():
            if not line.startswith("{"):
                continue
            for f in json.loads(line).get("files", []):
                path = os.path.normpath(os.path.join(ROOT, f["file"]))
                d = counts.setdefault(path, {})
                for ln in f.get("lines", []):
                    d[ln["line_number"]] = max(d.get(ln["line_number"], 0), ln["count"])
    return counts


def report(obj_dir: str) -> list[dict]:
    counts = gcov_lines(obj_dir)
    rows = []
    for cu in sorted(glob.glob(os.path.join(CSRC, "*_cuda.cu"))):
        headers = sorted(h for h in includes(cu) if h.endswith(".h"))
        hd = [f for h in headers for f in functions(h, ("SSLFAST_HD", "SSLFAST_DEVICE"))]
        by_name: dict[str, list[dict]] = {}
        for f in hd:
            by_name.setdefault(f["name"], []).append(f)
        dev = functions(cu, ("__global__", "__device__"))
        reached, todo = {}, list(dev)
        while todo:
            f = todo.pop()
            for name in f["calls"] & by_name.keys():
                for g in by_name[name]:
                    key = (g["file"], g["first"])
                    if key not in reached:
                        reached[key] = g
                        todo.append(g)
        cu_lines = sum(len(f["lines"]) for f in dev)
        h_lines = h_run = 0
        missed = []
        for g in reached.values():
            c = counts.get(g["file"], {})
            entered = any(c.get(ln, 0) > 0 for ln in range(g["first"], g["last"] + 1))
            run = sum(1 for ln in g["lines"] if c.get(ln, 0) > 0 or (ln not in c and entered))
            h_lines += len(g["lines"])
            h_run += run
            if run < len(g["lines"]):
                missed.append(f"{os.path.basename(g['file'])}:{g['name']} {run}/{len(g['lines'])}")
        total = cu_lines + h_lines
        if total == 0:  # bind_cuda.cu: host code only
            continue
        rows.append({"file": os.path.basename(cu), "cu_lines": cu_lines, "header_lines": h_lines,
                     "executed": h_run, "total": total, "share": h_run / total if total else 1.0,
                     "missed": sorted(missed)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-coverage"
    ap.add_argument("--obj-dir", default=os.path.join(os.environ.get("SSLFAST_BUILD_DIR") or
                                                      os.path.join(ROOT, "build"), f"temp.{tag}"),
                    help="objects of the SSLFAST_COVERAGE=1 build (default: %(default)s)")
    ap.add_argument("--missed", action="store_true", help="list the header functions with lines no test ran")
    args = ap.parse_args(argv)
    rows = report(args.obj_dir)
    print("| .cu file | device lines in the .cu | header lines it reaches | executed by CPU tests | share |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['file']} | {r['cu_lines']} | {r['header_lines']} | {r['executed']} | {100 * r['share']:.0f}% |")
    tot = sum(r["total"] for r in rows)
    run = sum(r["executed"] for r in rows)
    print(f"| all | {sum(r['cu_lines'] for r in rows)} | {sum(r['header_lines'] for r in rows)} | {run} | "
          f"{100 * run / tot:.0f}% |")
    if args.missed:
        for r in rows:
            if r["missed"]:
                print(f"{r['file']}: " + ", ".join(r["missed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
