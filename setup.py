"""Build of sslfast's two extension modules.

* ``sslfast._C``: C++17 CPU kernels (OpenMP where the compiler has it). Always built.
* ``sslfast._C_cuda``: CUDA kernels compiled by nvcc (see SSLFAST_CUDA for when).

Neither links libtorch: the bindings take raw pointers, sizes and a stream handle, so the
build needs only setuptools and pybind11 and the result works with any torch 2.x.

Objects are kept in a persistent build directory (build/ under the repository, not pip's
temporary one), so a second ``pip install -e .`` recompiles only the sources that changed
since, and those including a changed header. ``pip install -v`` shows each compile as
"[N/M] file". The CUDA build also keeps ptxas's resource report of every kernel and
architecture in ``sslfast/_C_cuda.ptxas.json`` beside the module (sslfast/_ptxas.py; the
compile test tier reads it).

Environment variables:
  SSLFAST_CUDA=auto|0|1     build the CUDA module. auto (default): when nvcc is found AND a
                            GPU is visible (``nvidia-smi -L`` lists one, or /dev/nvidia0
                            exists) or SSLFAST_CUDA_ARCHS names the architectures; 0: never;
                            1: always (fails the build when nvcc is missing)
  SSLFAST_CUDA_ARCHS="80;90" compute capabilities to compile for ("90a" style suffixes work);
                            default: those of the visible GPUs, else 80;90
  SSLFAST_BUILD_JOBS=N      parallel compiler processes, C++ and nvcc (default: number of CPUs)
  SSLFAST_BUILD_DIR=PATH    where objects are kept (default: build/ under the repository)
  SSLFAST_OPENMP=auto|0|1   OpenMP for the CPU module
  SSLFAST_COVERAGE=1        CPU module built with gcov instrumentation (-O0 --coverage, its
                            objects apart), for tools/cuda_coverage.py
  CUDA_HOME / NVCC          where nvcc is
"""
import concurrent.futures
import glob
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _env_flag(name, default="auto"):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _find_nvcc():
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_root(nvcc):
    real = os.path.realpath(nvcc)
    for cand in (os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(real)), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    raise SystemExit(f"nvcc found at {nvcc} but no include/cuda_runtime.h beside it; set CUDA_HOME")


def _visible_gpu_archs():
    """Compute capabilities of the GPUs nvidia-smi lists ("90", ...): [] when it lists none or
    is missing; None when a GPU device node exists but its capability cannot be read."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            caps = [line.strip().replace(".", "") for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and caps and all(c.isdigit() for c in caps):
                return sorted(set(caps), key=int)
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            if listed.returncode == 0 and "GPU" in listed.stdout:
                return None
        except (OSError, subprocess.SubprocessError):
            pass
    return None if os.path.exists("/dev/nvidia0") else []


def _named_archs():
    return [a.strip() for a in os.environ.get("SSLFAST_CUDA_ARCHS", "").replace(",", ";").split(";") if a.strip()]


def _cuda_archs():
    archs = _named_archs()
    if not archs:
        visible = _visible_gpu_archs()
        archs = visible if visible else ["80", "90"]
    return archs


def _ptxas():
    """sslfast/_ptxas.py, loaded by path (the package is not importable during the build)."""
    spec = importlib.util.spec_from_file_location("sslfast_ptxas", os.path.join(HERE, "sslfast", "_ptxas.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _progress(label, done, total, name):
    print(f"[{done}/{total}] {label} {os.path.relpath(name, HERE) if os.path.isabs(name) else name}", flush=True)


def _has_openmp(compiler):
    mode = _env_flag("SSLFAST_OPENMP")
    if mode == "0":
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            ok = True
        except Exception:
            ok = False
    if mode == "1" and not ok:
        raise SystemExit("SSLFAST_OPENMP=1 but the compiler does not accept -fopenmp")
    return ok


def _coverage():
    return os.environ.get("SSLFAST_COVERAGE", "0") not in ("", "0")


def _build_jobs():
    return max(1, int(os.environ.get("SSLFAST_BUILD_JOBS", os.cpu_count() or 1)))


def _headers():
    return glob.glob(os.path.join(HERE, CSRC, "**", "*.h"), recursive=True) + \
        glob.glob(os.path.join(HERE, CSRC, "**", "*.cuh"), recursive=True)


def _parallel_compile(compiler, headers, force):
    """Makes ``compiler.compile`` build its sources in parallel and skip objects newer than
    their source and every header (distutils compiles one file at a time, every time)."""

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = [obj for obj in objects if force or _newer(obj, [build[obj][0]] + _deps(obj, headers) + [__file__])]
        print(f"sslfast: {len(todo)} of {len(objects)} C++ source(s) to compile", flush=True)
        counter = itertools.count(1)

        def one(obj):
            src, ext = build[obj]
            _progress("c++", next(counter), len(todo), src)
            # -MMD: the headers this source includes, for the next build's up-to-date check
            compiler._compile(obj, src, ext, cc_args, extra_postargs + ["-MMD", "-MF", obj + ".d"], pp_opts)

        with concurrent.futures.ThreadPoolExecutor(max_workers=_build_jobs()) as pool:
            list(pool.map(one, todo))
        return objects

    compiler.compile = compile


def _deps(obj, headers):
    """The headers `obj` was compiled from (its -MMD file), or every header when unknown."""
    try:
        with open(obj + ".d") as f:
            text = f.read().replace("\\\n", " ")
    except OSError:
        return headers
    deps = text.split(":", 1)[1].split() if ":" in text else []
    return [d if os.path.isabs(d) else os.path.join(HERE, d) for d in deps] or headers


def _newer(target, deps):
    """True when target is missing, or a dependency is newer or gone. A gone dependency
    outside the repository is skipped: pip's isolated builds put pybind11's headers in a
    temporary directory that the -MMD files record and pip then deletes (that used to fail every
    later install); a different pybind11 or Python rebuilds everything through the toolchain
    stamp instead (BuildExt.run)."""
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    for d in deps:
        if not os.path.exists(d):
            if os.path.abspath(d).startswith(HERE + os.sep):
                return True
            continue
        if os.path.getmtime(d) > t:
            return True
    return False


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc (in parallel, skipping up-to-date objects) and the rest
    with the host compiler, keeping objects in a persistent build directory."""

    def finalize_options(self):
        super().finalize_options()
        # pip's editable and wheel builds hand setuptools a temporary build_temp: keep the
        # objects where the next build finds them instead.
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        if _coverage():
            tag += "-coverage"
        self.build_temp = os.path.join(os.environ.get("SSLFAST_BUILD_DIR") or os.path.join(HERE, "build"), f"temp.{tag}")

    def run(self):
        # What the objects were compiled against beyond the repository's own files (which the
        # -MMD files track): a change rebuilds everything.
        import pybind11

        stamp = json.dumps({"python": sys.version, "pybind11": pybind11.__version__, "coverage": _coverage()})
        path = os.path.join(self.build_temp, "toolchain.json")
        try:
            with open(path) as f:
                if f.read() != stamp:
                    self.force = True
        except OSError:
            self.force = True
        super().run()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(path, "w") as f:
            f.write(stamp)

    def build_extension(self, ext):
        if ext.name == "sslfast._C":
            cflags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
            lflags = []
            if _coverage():
                cflags = ["-O0", "--coverage", "-std=c++17", "-fvisibility=hidden"]
                lflags = ["--coverage"]
            if _has_openmp(self.compiler):
                cflags.append("-fopenmp")
                lflags.append("-fopenmp")
            ext.extra_compile_args = cflags
            ext.extra_link_args = lflags
            ext.depends = _headers()  # a header change rebuilds the module
            _parallel_compile(self.compiler, ext.depends, self.force)
            return super().build_extension(ext)
        return self._build_cuda(ext)

    def _build_cuda(self, ext):
        nvcc = ext.nvcc
        root = _cuda_root(nvcc)
        archs = _cuda_archs()
        gencode = []
        for arch in archs:
            num = arch.rstrip("a")
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        # PTX of the newest arch too, so newer GPUs can JIT it.
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        include_dirs = [os.path.join(HERE, CSRC), pybind11.get_include(), sysconfig.get_paths()["include"],
                        os.path.join(root, "include")]
        headers = _headers()
        # One object directory per architecture set: changing SSLFAST_CUDA_ARCHS never links
        # objects of another set.
        obj_dir = os.path.join(os.path.abspath(self.build_temp), "cuda-" + "_".join(archs))
        os.makedirs(obj_dir, exist_ok=True)
        define = f'-DSSLFAST_CUDA_ARCHS="{";".join(archs)}"'
        jobs = []
        objects = []
        for src in ext.sources:
            obj = os.path.join(obj_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            if self.force or _newer(obj, [src] + _deps(obj, headers) + [__file__]) or _newer(obj + ".ptxas.json", [obj]):
                cmd = [nvcc, "-c", src, "-o", obj, "-MD", "-MF", obj + ".d", "-O3", "-std=c++17",
                       "--expt-relaxed-constexpr", "--resource-usage",
                       "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", define, *gencode]
                cmd += [f"-I{d}" for d in include_dirs]
                jobs.append((src, obj, cmd))
        n_jobs = _build_jobs()
        print(f"sslfast: nvcc {len(jobs)} of {len(objects)} file(s) to compile for sm {','.join(archs)} "
              f"with {n_jobs} job(s)", flush=True)
        ptxas = _ptxas()
        counter = itertools.count(1)

        def run(job):
            src, obj, cmd = job
            _progress("nvcc", next(counter), len(jobs), src)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            return job, proc

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            for (src, obj, cmd), proc in pool.map(run, jobs):
                # ptxas's resource lines go to the report, everything else (warnings) to the log
                other = [l for l in proc.stdout.splitlines() if not l.startswith("ptxas info") and
                         not l.lstrip().startswith(("0 bytes stack", "Function properties")) and
                         "bytes stack frame" not in l]
                if other:
                    print("\n".join(other), flush=True)
                if proc.returncode != 0:
                    print(proc.stdout, flush=True)
                    raise SystemExit(f"sslfast: nvcc failed ({proc.returncode}): {' '.join(cmd)}")
                with open(obj + ".ptxas.json", "w") as f:
                    json.dump(ptxas.parse(proc.stdout, os.path.basename(src)), f)
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        lib_dirs = [os.path.join(root, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib") if os.path.isdir(os.path.join(root, d))]
        # cudart is linked statically: the module needs only the driver (libcuda) at run
        # time, and imports fine on machines with no driver at all.
        cxx = os.environ.get("CXX") or getattr(self.compiler, "compiler_cxx", ["g++"])[0]
        cmd = [cxx, "-shared", *objects, "-o", out, *[f"-L{d}" for d in lib_dirs],
               "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        print("sslfast: linking", os.path.basename(out), flush=True)
        subprocess.check_call(cmd)
        rows = []
        for obj in objects:
            with open(obj + ".ptxas.json") as f:
                rows += json.load(f)
        targets = {os.path.dirname(out)}
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(os.path.join(HERE, "sslfast"))  # beside the module setuptools copies in place
        for d in targets:
            ptxas.write(os.path.join(d, ptxas.REPORT_NAME), ptxas.sources_digest(os.path.join(HERE, CSRC)),
                        [f"sm_{a}" for a in archs], rows)


def extensions():
    exts = [
        Extension(
            "sslfast._C",
            sources=sorted(glob.glob(os.path.join(CSRC, "*_cpu.cpp"))),  # bind_cpu.cpp is the module
            include_dirs=[CSRC, pybind11.get_include()],
            language="c++",
        )
    ]
    mode = _env_flag("SSLFAST_CUDA")
    nvcc = _find_nvcc() if mode != "0" else None
    if mode == "1" and not nvcc:
        raise SystemExit("SSLFAST_CUDA=1 but nvcc was not found (set CUDA_HOME or NVCC)")
    if nvcc and mode == "auto" and not _named_archs() and _visible_gpu_archs() == []:
        print("sslfast: nvcc found but no GPU is visible and SSLFAST_CUDA_ARCHS is unset: building the CPU "
              "extension only (SSLFAST_CUDA_ARCHS=\"80;90\" or SSLFAST_CUDA=1 compiles the CUDA kernels)",
              file=sys.stderr)
        nvcc = None
    elif nvcc:
        cu = Extension("sslfast._C_cuda", sources=sorted(glob.glob(os.path.join(CSRC, "*.cu"))))
        cu.nvcc = nvcc
        exts.append(cu)
    elif mode == "auto" and not _find_nvcc():
        print("sslfast: nvcc not found, building the CPU extension only", file=sys.stderr)
    return exts


setup(
    packages=["sslfast", "sslfast.reference", "sslfast.ops", "sslfast.nn", "sslfast.bench", "sslfast.integrations", "sslfast.kernels"],
    package_dir={"sslfast": "sslfast", "sslfast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
