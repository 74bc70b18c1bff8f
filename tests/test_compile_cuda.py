"""Compile tier, CUDA half: ptxas's resource report of every kernel for sm_80 and sm_90, and
every launch configuration the host code can choose checked against it, without a GPU.

Where the numbers come from:
* per kernel and arch (registers, stack frame, spills, static shared memory): ptxas's
  ``--resource-usage`` report, kept by the build beside the module
  (``sslfast/_C_cuda.ptxas.json``) or, when the build made none for the current sources and
  arch, compiled here with ``nvcc -cubin`` and cached under ``build/ptxas/`` (sslfast/_ptxas.py);
* per launch (grid, threads, dynamic shared memory, the opt-in): ``sslfast._C.launch``, the
  functions of csrc/sslfast/launch.h that the CUDA host code itself launches with;
* per target: the CUDA occupancy tables (compute capability 8.0: A100; 9.0: H100/H200).

Skipped, with the reason, where nvcc is absent and no report of the current sources exists.
"""
import itertools
import os
import shutil

import pytest

import sslfast
from sslfast import _ext, _ptxas

pytestmark = pytest.mark.compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Per-block limits of each target (CUDA C Programming Guide, "Compute Capabilities" table):
# opt-in shared memory per block, 32-bit registers per block, threads per block, registers
# per thread, and the register allocation unit (per warp).
TARGETS = {
    "80": dict(smem_optin=166912, regs_per_block=65536, max_threads=1024, max_regs=255, reg_unit=256),
    "90": dict(smem_optin=232448, regs_per_block=65536, max_threads=1024, max_regs=255, reg_unit=256),
}
GRID_MAX = (2**31 - 1, 65535, 65535)

# The .cu file of each launch function of sslfast._C.launch (kernel names are per file).
FILE_OF = {
    "philox_fill": "random_cuda.cu",
    "sample_negatives": "negatives_cuda.cu",
    "compute_mask_indices": "masking_cuda.cu",
    "info_nce_forward": "info_nce_cuda.cu",
    "info_nce_backward": "info_nce_cuda.cu",
    "rp_quantize": "rp_quantize_cuda.cu",
    "contrastive_forward": "contrastive_cuda.cu",
    "contrastive_backward_rows": "contrastive_cuda.cu",
    "contrastive_backward_segments": "contrastive_cuda.cu",
    "gumbel_quantize_forward": "gumbel_quantize_cuda.cu",
    "gumbel_quantize_backward": "gumbel_quantize_cuda.cu",
    "apply_mask_forward": "apply_mask_cuda.cu",
    "apply_mask_backward": "apply_mask_cuda.cu",
    "masked_prediction": "masked_prediction_cuda.cu",
}


def _nvcc():
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def launch():
    if _ext._C is None:
        pytest.skip("the CPU extension is not built")
    return _ext.cpu_module().launch


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request):
    """(arch, limits, report rows of that arch)."""
    arch = request.param
    built = os.path.join(os.path.dirname(sslfast.__file__), _ptxas.REPORT_NAME)
    nvcc = _nvcc()
    try:
        rows = _ptxas.report(CSRC, arch, built, os.path.join(ROOT, "build", "ptxas"), nvcc,
                             jobs=int(os.environ.get("SSLFAST_BUILD_JOBS", "1")))
    except RuntimeError as exc:
        if nvcc:
            raise
        pytest.skip(f"nvcc not found and {exc}")
    return arch, TARGETS[arch], rows


def _rows_of(rows, file, kernel):
    """The report rows of `kernel` in `file`: an exact name, or every instantiation of a
    template named without arguments."""
    found = [r for r in rows if r["entry"] and r["file"] == file and (r["kernel"] == kernel or
                                                       ("<" not in kernel and r["kernel"].split("<")[0] == kernel))]
    assert found, f"{kernel} of {file} is not in ptxas's report"
    return found


def _block_regs(regs, threads, unit):
    warps = -(-threads // 32)
    return warps * (-(-regs * 32 // unit) * unit)


def check_fits(limits, rows, fn, plan):
    """Every launch of `plan` (from sslfast._C.launch.<fn>) fits the target."""
    for l in plan:
        for r in _rows_of(rows, FILE_OF[fn], l["kernel"]):
            where = f"{fn}: {l['kernel']} ({r['kernel']}, {r['arch']}) with {l}"
            assert 1 <= l["threads"] <= limits["max_threads"], where
            assert r["registers"] <= limits["max_regs"], where
            assert _block_regs(r["registers"], l["threads"], limits["reg_unit"]) <= limits["regs_per_block"], where
            smem = r["smem"] + l["dyn_smem"]
            if smem > 48 * 1024:
                assert l["opt_in"], f"{where}: {smem} bytes of shared memory without the opt-in"
            assert smem <= limits["smem_optin"], f"{where}: {smem} bytes of shared memory"
            for g, gmax in zip(l["grid"], GRID_MAX):
                assert 1 <= g <= gmax, where


def test_no_spills_and_no_local_memory(target):
    arch, _, rows = target
    assert rows, "empty report"
    # every kernel and every device function ptxas kept as a call: no stack frame (local
    # memory), no spills, no cumulative stack through calls
    bad = [(r["file"], r["kernel"], r["stack"], r["spill_stores"], r["spill_loads"], r["cumulative_stack"])
           for r in rows if r["stack"] or r["spill_stores"] or r["spill_loads"] or r["cumulative_stack"]]
    assert not bad, f"sm_{arch}: stack frames or spills (file, function, stack, stores, loads, cumulative): {bad}"
    assert all(r["registers"] for r in rows if r["entry"])


def test_every_kernel_has_a_launch_configuration(target, launch):
    # The report's kernels and the launch functions' kernels are the same set: no kernel is
    # launched with a configuration this tier does not check.
    _, _, rows = target
    named = set()
    plans = [("philox_fill", launch.philox_fill(10)),
             ("sample_negatives", launch.sample_negatives(2, 300, 5, 0, False, 0, 10**6)),
             ("sample_negatives", launch.sample_negatives(2, 300, 5, 0, True, 0, 10**6)),
             ("sample_negatives", launch.sample_negatives(2, 300, 5, 3, True, 0, 10**6)),
             ("compute_mask_indices", launch.compute_mask_indices(2, 300, False, True, 0.1)),
             ("info_nce_forward", launch.info_nce_forward(10)),
             ("info_nce_backward", launch.info_nce_backward(10, 10, 64)),
             ("rp_quantize", launch.rp_quantize(10, 100)),
             ("contrastive_forward", launch.contrastive_forward(10)),
             ("contrastive_backward_rows", launch.contrastive_backward_rows(10)),
             ("contrastive_backward_segments", launch.contrastive_backward_segments(10)),
             ("gumbel_quantize_forward", launch.gumbel_quantize_forward(10, 2, 320, True, False)),
             ("gumbel_quantize_backward", launch.gumbel_quantize_backward(10, 2, 320, 128, True, False, 0, 10**6)),
             ("gumbel_quantize_backward", launch.gumbel_quantize_backward(10, 2, 320, 128, True, True, 0, 10**6)),
             ("apply_mask_forward", launch.apply_mask_forward(2, 10, 64)),
             ("apply_mask_backward", launch.apply_mask_backward(2, 10, 64, True)),
             ("masked_prediction", launch.masked_prediction(10, 2, 2, 504, 256, True))]
    for fn, plan in plans:
        for l in plan:
            for r in _rows_of(rows, FILE_OF[fn], l["kernel"]):
                named.add((r["file"], r["kernel"]))
    reported = {(r["file"], r["kernel"]) for r in rows if r["entry"]}
    assert reported == named, f"kernels without a checked launch: {sorted(reported - named)}"


def test_masked_prediction_kernels_come_in_three_target_modes(target):
    # hard labels, soft targets given and BiRQ's targets made on the fly (mpl::kHard, kSoft,
    # kGumbel): each kernel in the report three times, so the no-spill, no-stack and launch
    # checks above cover the kGumbel instantiations too
    _, _, rows = target
    for kernel in ("forward_kernel", "dx_kernel", "dw_kernel"):
        names = {r["kernel"] for r in _rows_of(rows, "masked_prediction_cuda.cu", kernel)}
        assert names == {f"{kernel}<{mode}>" for mode in range(3)}, names


def _static_hf(rows):
    (r,) = _rows_of(rows, "negatives_cuda.cu", "negatives_one_pass_kernel<true>")
    return r["smem"]


def test_sample_negatives_launches_fit(target, launch):
    arch, limits, rows = target
    static = _static_hf(rows)
    limit = launch.negatives_hf_one_pass_max_t(static, limits["smem_optin"])
    Ts = [1, 31, 255, 256, 257, 781, 4096, 11512, 11513, 12288, 12289, 40000, limit - 1, limit, limit + 1, 2**20]
    for B, T, K, Kc, hf in itertools.product([1, 3, 64, 1024, 5000], Ts, [0, 1, 100], [0, 10], [False, True]):
        if B * T >= 2**31:
            continue
        plan = launch.sample_negatives(B, T, K, Kc, hf, static, limits["smem_optin"])
        check_fits(limits, rows, "sample_negatives", plan)
        if hf and Kc == 0 and K > 0:
            assert plan[0]["kernel"] == ("negatives_one_pass_kernel<true>" if T <= limit else "negatives_scan_kernel")


def test_sample_negatives_hf_one_pass_at_12288_takes_the_opt_in(target, launch):
    # The bug of issue 9: 4 T bytes of dynamic plus the kernel's static shared memory went
    # over 48 KB for 11513 <= T <= 12288 with no opt-in, and the launch failed. Now the plan
    # raises the limit (opt_in) and the total fits both targets.
    arch, limits, rows = target
    static = _static_hf(rows)
    (l,) = launch.sample_negatives(8, 12288, 100, 0, True, static, limits["smem_optin"])
    assert l["kernel"] == "negatives_one_pass_kernel<true>"
    assert static + l["dyn_smem"] > 48 * 1024 and l["opt_in"]
    check_fits(limits, rows, "sample_negatives", [l])


def test_other_launches_fit_at_every_size_the_host_accepts(target, launch):
    arch, limits, rows = target
    big = [1, 2, 31, 32, 33, 1000, 2**16 + 1, 2**22]
    for n in big:
        check_fits(limits, rows, "philox_fill", launch.philox_fill(n))
    for B, T, hf, same, drop in itertools.product([1, 64, 4096], [1, 781, 2**16], [False, True], [False, True],
                                                 [0.0, 0.1]):
        check_fits(limits, rows, "compute_mask_indices", launch.compute_mask_indices(B, T, hf, same, drop))
    for M, C, D in itertools.product(big, [0, 1, 4096, 2**20], [1, 64, 128, 129, 1024, 8192]):
        check_fits(limits, rows, "info_nce_forward", launch.info_nce_forward(M))
        check_fits(limits, rows, "info_nce_backward", launch.info_nce_backward(M, C, D))
    for n in big:
        check_fits(limits, rows, "contrastive_forward", launch.contrastive_forward(n))
        check_fits(limits, rows, "contrastive_backward_rows", launch.contrastive_backward_rows(n))
        check_fits(limits, rows, "contrastive_backward_segments", launch.contrastive_backward_segments(n))
    for B, T, D in itertools.product([1, 64], [1, 781, 2**14], [1, 3, 64, 768, 1024, 4096]):
        check_fits(limits, rows, "apply_mask_forward", launch.apply_mask_forward(B, T, D))
        for fill in (False, True):
            check_fits(limits, rows, "apply_mask_backward", launch.apply_mask_backward(B, T, D, fill))
    for N, H, V, D in itertools.product([1, 33, 16384, 2**22], [1, 16], [1, 504, 8192, 2**20], [1, 256, 1024]):
        for Hx, bw in itertools.product({1, H}, [False, True]):
            check_fits(limits, rows, "masked_prediction", launch.masked_prediction(N, H, Hx, V, D, bw))
    # rp_quantize: every staged size up to the host's limit, then the host's rejection
    for r, s in itertools.product([1, 7, 2**20], [1, 64, 3071, 3072, 3073, 6000, 12288]):
        check_fits(limits, rows, "rp_quantize", launch.rp_quantize(r, s))
    with pytest.raises(ValueError, match="12288"):
        launch.rp_quantize(10, 12289)


def test_gumbel_launches_fit_for_every_codebook_size(target, launch):
    # V from 2 to 8192 and D up to 1024 are accepted and fit (both modes, both passes; the
    # backward's rows above 48 KB take the opt-in); beyond the host's limits (V > 12288 for
    # the soft forward, 2 V + D beyond the opt-in room for the backward) the host raises
    # ValueError before any launch.
    arch, limits, rows = target
    (bl,) = _rows_of(rows, "gumbel_quantize_cuda.cu", "backward_logits_kernel")
    static, optin = bl["smem"], limits["smem_optin"]
    Vs = sorted({2, 3, 31, 32, 33, 256, 257, 320, 512, 513, 1024, 2048, 4096, 5000, 5633, 8191, 8192})
    for N, G, V, D, training, hard in itertools.product([1, 40, 3000], [1, 2, 8], Vs, [1, 64, 128, 256, 1024],
                                                      [False, True], [False, True]):
        check_fits(limits, rows, "gumbel_quantize_forward", launch.gumbel_quantize_forward(N, G, V, training, hard))
        check_fits(limits, rows, "gumbel_quantize_backward",
                   launch.gumbel_quantize_backward(N, G, V, D, training, hard, static, optin))
    for V in (8193, 12288):
        check_fits(limits, rows, "gumbel_quantize_forward", launch.gumbel_quantize_forward(10, 2, V, True, False))
    with pytest.raises(ValueError, match="12288"):
        launch.gumbel_quantize_forward(10, 2, 12289, True, False)
    top = launch.gumbel_quantize_backward_max_floats(static, optin)
    check_fits(limits, rows, "gumbel_quantize_backward",
               launch.gumbel_quantize_backward(10, 2, (top - 1) // 2, 1, True, False, static, optin))
    with pytest.raises(ValueError, match="2\\*num_vars"):
        launch.gumbel_quantize_backward(10, 2, top // 2, 2, True, True, static, optin)
