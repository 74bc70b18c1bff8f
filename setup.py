"""Build of sslfast's two extension modules.

* ``sslfast._C``: C++17 CPU kernels (OpenMP where the compiler has it). Always built.
* ``sslfast._C_cuda``: CUDA kernels compiled by nvcc, built when nvcc is found.

Neither links libtorch: the bindings take raw pointers, sizes and a stream handle, so the
build needs only setuptools and pybind11 and the result works with any torch 2.x.

Environment variables:
  SSLFAST_CUDA=auto|0|1     build the CUDA module: when nvcc is found (auto), never, always
                            (1 fails the build when nvcc is missing)
  SSLFAST_CUDA_ARCHS="80;90" compute capabilities to compile for ("90a" style suffixes work)
  SSLFAST_BUILD_JOBS=N      parallel compiler processes, C++ and nvcc (default: number of CPUs)
  SSLFAST_OPENMP=auto|0|1   OpenMP for the CPU module
  CUDA_HOME / NVCC          where nvcc is
"""
import concurrent.futures
import glob
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


def _cuda_archs():
    archs = [a.strip() for a in os.environ.get("SSLFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise SystemExit("SSLFAST_CUDA_ARCHS is empty")
    return archs


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
        todo = [obj for obj in objects if force or _newer(obj, [build[obj][0]] + headers + [__file__])]

        def one(obj):
            src, ext = build[obj]
            compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with concurrent.futures.ThreadPoolExecutor(max_workers=_build_jobs()) as pool:
            list(pool.map(one, todo))
        return objects

    compiler.compile = compile


def _newer(target, deps):
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.getmtime(d) > t for d in deps)


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc (in parallel, skipping up-to-date objects) and the rest
    with the host compiler."""

    def build_extension(self, ext):
        if ext.name == "sslfast._C":
            cflags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
            lflags = []
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
        obj_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
        os.makedirs(obj_dir, exist_ok=True)
        define = f'-DSSLFAST_CUDA_ARCHS="{";".join(archs)}"'
        jobs = []
        objects = []
        for src in ext.sources:
            obj = os.path.join(obj_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            if self.force or _newer(obj, [src] + headers + [__file__]):
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                       "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", define, *gencode]
                cmd += [f"-I{d}" for d in include_dirs]
                jobs.append(cmd)
        n_jobs = _build_jobs()
        if jobs:
            print(f"sslfast: nvcc {len(jobs)} file(s) for sm {','.join(archs)} with {n_jobs} job(s)", flush=True)

        def run(cmd):
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            return cmd, proc

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            for cmd, proc in pool.map(run, jobs):
                if proc.stdout.strip():
                    print(proc.stdout, flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"sslfast: nvcc failed ({proc.returncode}): {' '.join(cmd)}")
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
    if nvcc:
        cu = Extension("sslfast._C_cuda", sources=sorted(glob.glob(os.path.join(CSRC, "*.cu"))))
        cu.nvcc = nvcc
        exts.append(cu)
    elif mode == "auto":
        print("sslfast: nvcc not found, building the CPU extension only", file=sys.stderr)
    return exts


setup(
    packages=["sslfast", "sslfast.reference", "sslfast.ops", "sslfast.nn", "sslfast.bench", "sslfast.integrations", "sslfast.kernels"],
    package_dir={"sslfast": "sslfast", "sslfast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
