"""The CUDA kernels' device code run on the CPU (cpu tier), against the references.

The masking and negatives kernels are built from SSLFAST_HD phases of csrc/masking.h and
csrc/negatives.h; ``sslfast._C._testing`` runs a kernel's blocks on the host, each phase for
every thread index the kernel uses (the launch configuration's, from ``sslfast._C.launch``)
before the next (what the barriers guarantee). The CUDA host path of ops/*.py runs unchanged
on CPU tensors: ``sslfast._ext.cuda_module()`` is replaced by a module that hands the same
arguments to the host emulation. Expected values come from sslfast/reference (bit-identical
random streams), never from the C++ CPU backend, which shares these headers.
"""
import types

import pytest
import torch

from sslfast import _ext
from sslfast.ops import masking as ops_masking
from sslfast.ops import negatives as ops_negatives
from sslfast.reference import masking as ref_masking
from sslfast.reference import negatives as ref_negatives

pytestmark = pytest.mark.cpu


@pytest.fixture
def C():
    if _ext._C is None or not hasattr(_ext._C, "_testing"):
        pytest.skip("the CPU extension (with _testing) is not built")
    return _ext._C


def _ptr(t):
    return 0 if t is None else t.data_ptr()


@pytest.fixture
def emulated_cuda(C, monkeypatch):
    """Replaces the CUDA module by the host emulation of its kernels; returns the record of
    which negatives path each call took and the row limit the module reports."""
    state = types.SimpleNamespace(paths=[], hf_limit=12288)

    def compute_mask_indices(lengths, pad, B, T, mask_prob, L, vmin, thr, n_thr, min_masks, require_same, dropout,
                             hf, seed, no_overlap, min_space, n_cap, r_cap, lens_ws, keys_ws, counts_ws, out,
                             cuda_stream):
        (rows, *_) = C.launch.compute_mask_indices(B, T, bool(hf), bool(require_same), dropout)
        C._testing.masking_kernels(lengths, pad, B, T, mask_prob, L, vmin, thr, n_thr, min_masks, require_same,
                                   dropout, hf, seed, no_overlap, min_space, n_cap, r_cap, rows["threads"], out)

    def sample_negatives(mask, pad, B, T, K, Kc, from_masked_only, hf, seed, ws32, ws64, n_rows, out, cuda_stream):
        # the CUDA host's choice, with a device whose opt-in room is state.hf_limit frames
        plan = C.launch.sample_negatives(B, T, K, Kc, bool(hf), 0, 4 * state.hf_limit)
        if not plan:
            return
        one_pass = plan[0]["kernel"].startswith("negatives_one_pass")
        state.paths.append(("one_pass" if one_pass else "two_pass", ws32 != 0 and ws64 != 0))
        fn = C._testing.negatives_one_pass if one_pass else C._testing.negatives_two_pass
        fn(mask, pad, from_masked_only, B, T, K, Kc, bool(hf), seed, n_rows, out)

    fake = types.SimpleNamespace(compute_mask_indices=compute_mask_indices, sample_negatives=sample_negatives,
                                 negatives_hf_one_pass_max_t=lambda: state.hf_limit)
    monkeypatch.setattr(_ext, "cuda_module", lambda: fake)
    monkeypatch.setattr(_ext, "stream", lambda device: 0)
    return state


MASKING_CASES = [
    # style, mask_type, mask_length, mask_other, no_overlap, min_space, require_same, dropout, min_masks
    ("fairseq", "static", 10, 0.0, False, 0, True, 0.0, 0),
    ("fairseq", "static", 1, 0.0, False, 0, True, 0.0, 2),
    ("fairseq", "static", 2, 0.0, False, 0, False, 0.1, 0),
    ("fairseq", "static", 64, 0.0, False, 0, True, 0.0, 1),
    ("fairseq", "uniform", 10, 3.0, False, 0, True, 0.3, 0),
    ("fairseq", "normal", 10, 4.0, False, 0, False, 0.0, 0),
    ("fairseq", "poisson", 10, 0.0, True, 0, True, 0.0, 0),
    ("fairseq", "static", 10, 0.0, True, 2, False, 0.1, 0),
    ("fairseq", "uniform", 5, 4.0, True, 1, True, 0.0, 2),
    ("hf", "static", 10, 0.0, False, 0, False, 0.0, 2),
    ("hf", "static", 1, 0.0, False, 0, False, 0.0, 0),
]


@pytest.mark.parametrize("case", MASKING_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("padded", [False, True])
def test_masking_kernels_on_the_host_match_the_reference(emulated_cuda, case, padded):
    style, mask_type, L, other, no_overlap, min_space, same, dropout, min_masks = case
    g = torch.Generator().manual_seed(7)
    B, T = 5, 301
    pad = None
    lengths = torch.full((B,), T, dtype=torch.int64)
    if padded:
        lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
        pad = torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)
    args = (lengths, pad, B, T, 0.65, L, mask_type, other, min_masks, same, dropout, style, 1234, no_overlap, min_space)
    got = ops_masking._cuda(*args)
    want = ref_masking.compute_mask_indices(B, T, lengths, 0.65, L, mask_type, other, min_masks, same, dropout, style,
                                            1234, pad, no_overlap, min_space)
    assert got.any()
    assert torch.equal(got, want)


def test_negatives_prefix_counts_every_thread_share(C):
    # count_prefix over the kernel's 256 threads (16-byte body and byte tail, aligned and not)
    # against plain counts.
    g = torch.Generator().manual_seed(3)
    B, T = 3, 517
    for offset in (0, 1):
        store = torch.zeros(B * T + 16, dtype=torch.uint8)
        mask = store[offset:offset + B * T]
        mask.copy_((torch.rand(B * T, generator=g) < 0.3).to(torch.uint8) * torch.randint(1, 256, (B * T,), generator=g,
                                                                                             dtype=torch.uint8))
        pstore = torch.zeros(B * T + 16, dtype=torch.uint8)
        pad = pstore[offset:offset + B * T]
        pad.copy_((torch.rand(B * T, generator=g) < 0.2).to(torch.uint8))
        for fmo in (0, 1):
            for b, t0 in ((0, 0), (1, 256), (2, 512)):
                end, first, row_base, row_end = B * T, b * T + t0, b * T, b * T + T
                got = C._testing.negatives_prefix(_ptr(mask), _ptr(pad), fmo, end, first, row_base, row_end, 256)
                m = mask != 0
                cand = m if fmo else (m | (pad == 0))
                want = (int(m[:first].sum()), int(cand[:first].sum()), int(cand[:row_base].sum()),
                        int(cand[:row_end].sum()), int(cand[:end].sum()))
                assert got == want, (offset, fmo, b)


NEG_CASES = [
    # B, T, K, Kc, from_masked_only, padded, layout
    (4, 300, 10, 0, True, False, "packed"),
    (4, 300, 7, 5, False, True, "packed"),
    (3, 600, 100, 0, True, True, "hf"),
    (3, 600, 9, 0, False, True, "hf"),
    (3, 257, 10, 3, True, False, "hf"),
    (2, 1, 4, 2, True, False, "packed"),
]


@pytest.mark.parametrize("case", NEG_CASES, ids=lambda c: "-".join(map(str, c)))
def test_negatives_kernels_on_the_host_match_the_reference(emulated_cuda, case):
    B, T, K, Kc, fmo, padded, layout = case
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(B, T, generator=g) < 0.45
    mask[0, 0] = True
    pad = (torch.rand(B, T, generator=g) < 0.2) & ~mask if padded else None
    got = ops_negatives._cuda(mask, pad, K, Kc, fmo, layout, 99)
    want = ref_negatives.sample_negatives(mask, K, Kc, pad, fmo, layout, 99)
    assert torch.equal(got, want)


def test_negatives_hf_rows_beyond_the_device_limit_take_the_two_launch_path(emulated_cuda):
    # The host side of the hf one-pass fix: ops/negatives.py asks the module for the device's
    # row limit, allocates the two-launch workspaces above it, and the plan of
    # csrc/sslfast/launch.h takes the two-launch path there; both give the reference's bits.
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 300, generator=g) < 0.4
    want = ref_negatives.sample_negatives(mask, 6, 0, None, True, "hf", 8)
    for limit, path in ((300, ("one_pass", False)), (299, ("two_pass", True))):
        emulated_cuda.hf_limit = limit
        emulated_cuda.paths.clear()
        assert torch.equal(ops_negatives._cuda(mask, None, 6, 0, True, "hf", 8), want)
        assert emulated_cuda.paths == [path]


def test_negatives_hf_one_pass_limit_follows_the_shared_memory_budget(C):
    # 4 bytes a frame beside the kernel's static shared memory, against the opt-in maximum:
    # with only the 48 KB default the row of 12288 frames (the old fixed limit) no longer fits.
    lim = C.launch.negatives_hf_one_pass_max_t
    assert lim(3104, 48 * 1024) == (48 * 1024 - 3104) // 4 < 12288
    assert lim(3104, 166912) == 40952 and lim(3104, 232448) == 57336
    assert C.launch.sample_negatives(2, 12288, 10, 0, True, 3104, 48 * 1024)[0]["kernel"] == "negatives_scan_kernel"
    (l,) = C.launch.sample_negatives(2, 12288, 10, 0, True, 3104, 166912)
    assert l["kernel"] == "negatives_one_pass_kernel<true>" and l["dyn_smem"] == 4 * 12288 and l["opt_in"]
    (l,) = C.launch.sample_negatives(2, 11000, 10, 0, True, 3104, 166912)
    assert not l["opt_in"]  # 44000 + 3104 bytes fit the default


def test_gumbel_tempered_weight_matches_fp64(C):
    # exp((y - ym) / tau) in fp32 against fp64, over logits spanning fp32's range and taus
    # down to 1e-3. Bound: the fp32 subtraction and division each round the argument x by at
    # most 2^-24 relative, which moves exp(x) by |x| 2^-23 relative; expf adds a few ulp.
    g = torch.Generator().manual_seed(2)
    y = torch.cat([torch.randn(4096, generator=g) * 10, torch.tensor([-3e38, 3e38, 0.0, -1e-30])]).float()
    ym = torch.full_like(y, 3e38)
    ym[:4096] = y[:4096].max()
    for tau in (2.0, 0.5, 0.1, 1e-3):
        out = torch.empty_like(y)
        C._testing.gumbel_tempered_weight(_ptr(y), _ptr(ym), y.numel(), tau, _ptr(out))
        x = (y.double() - ym.double()) / tau
        want = torch.exp(x)
        bound = want * (x.abs() * 2.0**-23 + 2.0**-21) + 1e-38  # + the fp32 subnormal range
        assert ((out.double() - want).abs() <= bound).all(), tau
        assert out[-3] == 1.0 and (want[:4096] > 0).any()
