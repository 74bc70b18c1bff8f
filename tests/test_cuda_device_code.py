"""The CUDA kernels' device code run on the CPU (cpu tier), against the references.

The kernels of masking, negatives, gumbel_quantize, rp_quantize, contrastive, apply_mask and
masked_prediction are built from SSLFAST_HD phases of their csrc/<family>.h; ``sslfast._C._testing``
runs a kernel's blocks on the host, each phase for every thread (or warp lane) index the
kernel uses (the launch configuration's, from ``sslfast._C.launch``) before the next (what
the barriers guarantee), warp shuffles as the same xor butterflies. The CUDA host path of
ops/*.py runs unchanged on CPU tensors: ``sslfast._ext.cuda_module()`` is replaced by a module
that hands the same arguments to the host emulation. Expected values come from
sslfast/reference or fp64 formulas (the ops' own test files' checks, called with
backend="cuda"), never from the C++ CPU backend, which shares these headers.
"""
import types

import pytest
import torch

import sslfast
from sslfast import _dispatch, _ext
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
    which negatives path each call took, the row limit the module reports and the seed
    pointers compute_mask_indices and sample_negatives were given."""
    state = types.SimpleNamespace(paths=[], hf_limit=12288, seed_ptrs=[])

    def compute_mask_indices(lengths, pad, B, T, mask_prob, L, vmin, thr, n_thr, min_masks, require_same, dropout,
                             hf, seed, seed_ptr, no_overlap, min_space, n_cap, r_cap, lens_ws, keys_ws, counts_ws,
                             out, cuda_stream):
        (rows, *_) = C.launch.compute_mask_indices(B, T, bool(hf), bool(require_same), dropout)
        state.seed_ptrs.append(seed_ptr)
        C._testing.masking_kernels(lengths, pad, B, T, mask_prob, L, vmin, thr, n_thr, min_masks, require_same,
                                   dropout, hf, seed, seed_ptr, no_overlap, min_space, n_cap, r_cap, rows["threads"],
                                   out)

    def sample_negatives(mask, pad, B, T, K, Kc, from_masked_only, hf, seed, seed_ptr, ws32, ws64, n_rows, out,
                         cuda_stream):
        # the CUDA host's choice, with a device whose opt-in room is state.hf_limit frames
        plan = C.launch.sample_negatives(B, T, K, Kc, bool(hf), 0, 4 * state.hf_limit)
        if not plan:
            return
        one_pass = plan[0]["kernel"].startswith("negatives_one_pass")
        state.paths.append(("one_pass" if one_pass else "two_pass", ws32 != 0 and ws64 != 0))
        fn = C._testing.negatives_one_pass if one_pass else C._testing.negatives_two_pass
        state.seed_ptrs.append(seed_ptr)
        fn(mask, pad, from_masked_only, B, T, K, Kc, bool(hf), seed, seed_ptr, n_rows, out)

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



@pytest.mark.parametrize("no_overlap", [False, True])
@pytest.mark.parametrize("seed", [1234, 2**32 + 7, -5])
def test_masking_kernels_load_a_seed_tensor(emulated_cuda, seed, no_overlap):
    # A seed tensor reaches both kernels as a pointer (value argument 0) and each loads the key
    # from it (load_seed); here the pointer is a CPU tensor's. Its 64 bits are the key: the
    # reference's mask for that tensor, not the mask of key 0.
    g = torch.Generator().manual_seed(11)
    B, T = 5, 301
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    pad = torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)
    key = torch.tensor(seed)
    args = (lengths, pad, B, T, 0.65, 10, "poisson", 0.0, 2, True, 0.2, "fairseq")  # both kernels draw

    def ref(s):
        return ref_masking.compute_mask_indices(B, T, lengths, 0.65, 10, "poisson", 0.0, 2, True, 0.2, "fairseq", s,
                                                pad, no_overlap, 1)

    got = ops_masking._cuda(*args, key, no_overlap, 1)
    assert emulated_cuda.seed_ptrs == [key.data_ptr()]
    want = ref(key)
    assert got.any() and torch.equal(got, want)
    assert not torch.equal(got, ref(0))
    if seed >= 0:
        assert torch.equal(ops_masking._cuda(*args, seed, no_overlap, 1), want)
        assert emulated_cuda.seed_ptrs[-1] == 0  # an int seed: the value argument

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


@pytest.mark.parametrize("case", NEG_CASES[1:5], ids=lambda c: "-".join(map(str, c)))
def test_negatives_kernels_load_a_seed_tensor_on_the_host(emulated_cuda, case):
    # The seed-pointer path (issue 12.3): the host code passes the seed tensor's address and
    # the kernels load the key from it (a CPU pointer works in the emulation); the bits are
    # the int seed's, and a negative value keys its two's-complement bits. The expected values
    # are the reference's with the key as a Python int.
    B, T, K, Kc, fmo, padded, layout = case
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(B, T, generator=g) < 0.45
    pad = (torch.rand(B, T, generator=g) < 0.2) & ~mask if padded else None
    for limit in (12288, 1):  # the one-pass kernels and (hf) the two-launch path
        emulated_cuda.hf_limit = limit
        for value in (2**32 + 5, 2**63 - 1, -12345):
            seed = torch.tensor(value)
            emulated_cuda.seed_ptrs.clear()
            got = ops_negatives._cuda(mask, pad, K, Kc, fmo, layout, seed)
            assert emulated_cuda.seed_ptrs == [seed.data_ptr()]  # the key travels by pointer
            want = ref_negatives.sample_negatives(mask, K, Kc, pad, fmo, layout, value % 2**64)
            assert torch.equal(got, want), value
            if value >= 0:
                emulated_cuda.seed_ptrs.clear()
                assert torch.equal(ops_negatives._cuda(mask, pad, K, Kc, fmo, layout, value), want)
                assert emulated_cuda.seed_ptrs == [0]  # an int travels by value


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


def _install_emulation(monkeypatch, **functions):
    """Makes ``backend="cuda"`` run on CPU tensors through the ops' unchanged CUDA host code:
    the CUDA module is replaced by `functions` (the host emulations, called with the module's
    arguments less the stream), and the dispatch takes an explicit "cuda" on CPU tensors."""
    monkeypatch.setattr(_ext, "cuda_module", lambda: types.SimpleNamespace(**functions))
    monkeypatch.setattr(_ext, "stream", lambda device: 0)
    unavailable = _dispatch.backend_unavailable_reason
    monkeypatch.setattr(_dispatch, "backend_unavailable_reason",
                        lambda backend, device: None if backend == "cuda" else unavailable(backend, device))


def _no_stream(fn):
    return lambda *args: fn(*args[:-1])


@pytest.fixture
def emulated_gumbel_cuda(C, monkeypatch):
    """ops/gumbel_quantize.py's cuda backend on CPU tensors, its kernels run by the host
    emulation (csrc/testing_cpu.cpp: every lane of every warp, the shuffle butterflies)."""
    t = C._testing
    _install_emulation(monkeypatch, gumbel_quantize_num_chunks=t.gumbel_num_chunks,
                       gumbel_quantize_soft_workspace=t.gumbel_soft_workspace,
                       gumbel_quantize_forward=_no_stream(t.gumbel_forward),
                       gumbel_quantize_backward=_no_stream(t.gumbel_backward))


# (N, G, V, d): V > 64 and d > 128 give lanes several columns, dims two soft_codebook tiles;
# N > 128 several forward chunks, soft-codebook chunks and backward_codebook scans.
GUMBEL_HOST_SHAPES = [(37, 2, 13, 7), (5, 3, 5, 1), (1, 1, 17, 3), (301, 2, 70, 130)]


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gumbel_kernels_on_the_host_match_fp64(emulated_gumbel_cuda, dtype, hard):
    # The whole cuda path of gumbel_vector_quantize (forward_kernel, soft_forward_kernel,
    # reduce_partials_kernel; backward_logits_kernel, backward_codebook_kernel or
    # soft_codebook_kernel + reduce_chunks_kernel), training and eval, with and without a mask:
    # codes and the hard gather exact, perplexities and gradients against the fp64 formulation
    # of tests/test_gumbel_quantize.py (fp32: its FP32_TOL; fp16/bf16: twice the reference's
    # own error), the checks the GPU tier applies to the real kernels.
    import test_gumbel_quantize as tg

    tg._parity("cuda", "cpu", [dtype], shapes=GUMBEL_HOST_SHAPES, hard=hard)


@pytest.mark.parametrize("case", ["_check_seed_tensor_same_bits", "_check_negative_seed_tensor", "_check_seed_none",
                                  "_check_derived_seed_tensors"])
def test_gumbel_kernels_on_the_host_seed_tensors(emulated_gumbel_cuda, case):
    # A seed tensor reaches the kernels as a pointer (sslfast.random.seed_args), here a CPU
    # tensor's, loaded by load_seed as each kernel loads it: the same bits as the int seed,
    # forward and backward (tests/test_gumbel_quantize.py's seed checks).
    import test_gumbel_quantize as tg

    getattr(tg, case)("cuda", torch.device("cpu"))


@pytest.fixture
def emulated_rp_cuda(C, monkeypatch):
    """ops/rp_quantize.py's cuda backend on CPU tensors, rp_quantize_kernel run by the host
    emulation (every lane of each row's warp, the shuffle reductions as butterflies)."""
    _install_emulation(monkeypatch, rp_quantize=_no_stream(C._testing.rp_quantize))


@pytest.mark.parametrize("metric,input_norm", [("cosine", None), ("cosine", "layernorm"), ("l2", None),
                                               ("l2", "layernorm")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rp_quantize_kernel_on_the_host_matches_fp64(emulated_rp_cuda, dtype, metric, input_norm):
    # rp_quantize_kernel's labels against the fp64 scores of tests/test_rp_quantize.py (NeMo's
    # formulation): the fp64 winner or a near-tie within its GAP_TOL, as the GPU tier checks.
    # Shapes: rows wider than a warp (F*k up to 320, H*d up to 99), V off multiples of 32, V = 1.
    import test_rp_quantize as tr

    for shape in tr.SHAPES:
        B, T, Fdim, k, H, V, d = shape
        x, P, CB = tr.make_problem(B, T, Fdim, k, H, V, d, dtype=dtype, seed=sum(shape))
        mask = torch.rand(B, T // k, generator=torch.Generator().manual_seed(1)) < 0.7
        got = sslfast.random_projection_quantize(x, P, CB, stack=k, input_norm=input_norm, metric=metric, mask=mask,
                                                 backend="cuda")
        assert got.shape == (B, T // k, H) and got[~mask].eq(-1).all()
        scores = tr.rpq_scores64(x, P, CB, stack=k, input_norm=input_norm, metric=metric)
        ref_labels = tr.rpq(x, P, CB, stack=k, input_norm=input_norm, metric=metric, backend="reference")
        tr._check(got[mask], scores[mask], dtype, ref_labels[mask])


@pytest.mark.parametrize("D,V", [(39, 100), (129, 70), (1, 3)])
def test_rp_nearest_codeword_kernel_on_the_host_matches_fp64(emulated_rp_cuda, D, V):
    import test_rp_quantize as tr

    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, 45, D, generator=g)
    C = torch.randn(V, D, generator=g)
    tr._check(sslfast.nearest_codeword(x, C, backend="cuda"), tr.kmeans_scores64(x, C), torch.float32)


@pytest.mark.parametrize("case", ["test_ties_go_to_lowest_index", "test_zero_rows_give_label_zero",
                                  "test_mask_computes_only_masked_positions",
                                  "test_stacking_truncates_trailing_frames"])
def test_rp_quantize_kernel_on_the_host_edge_cases(emulated_rp_cuda, case):
    # tests/test_rp_quantize.py's closed-form cases (ties to the lowest index across lanes,
    # zero rows label 0, masked rows -1 and never read, trailing frames never read) on the
    # emulated kernel.
    import test_rp_quantize as tr

    getattr(tr, case)("cuda")


@pytest.fixture
def emulated_contrastive_cuda(C, monkeypatch):
    """ops/contrastive.py's cuda backend on CPU tensors, its kernels run by the host emulation
    (every lane of each row's warp, the butterflies, __any_sync as an or over the lanes)."""
    t = C._testing
    _install_emulation(monkeypatch, contrastive_forward=_no_stream(t.contrastive_forward),
                       contrastive_backward_rows=_no_stream(t.contrastive_backward_rows),
                       contrastive_backward_segments=_no_stream(t.contrastive_backward_segments))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("precision", ["fairseq", "hf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contrastive_kernels_on_the_host_match_the_reference(emulated_contrastive_cuda, dtype, precision,
                                                            deterministic):
    # forward_kernel, backward_rows_kernel (atomic grad y) or + segments_kernel (deterministic)
    # under tests/test_contrastive.py's error rule against fp64 (loss, grad x, grad y) and the
    # reference's correct count. D = 67 and 129 give lanes three and five columns; the stored
    # duplicate of a positive exercises the vote of the "vector" mask, int32 indices "index".
    import test_contrastive as tc

    for shape in [(1, 1, 1, 1), (13, 17, 19, 11), (37, 41, 67, 29)]:
        tc._check_backend("cuda", shape, dtype, precision, "vector", "sum", torch.int64, "random", deterministic)
    tc._check_backend("cuda", (19, 21, 129, 40), dtype, precision, "index", "none", torch.int32, None,
                      deterministic)


@pytest.mark.parametrize("case", ["test_correct_count_definition", "test_all_negatives_equal_positive_gives_zero_loss",
                                  "test_zero_vectors_are_finite", "test_identical_negatives_and_k_larger_than_m",
                                  "test_empty_batch_and_no_negatives"])
def test_contrastive_kernels_on_the_host_edge_cases(emulated_contrastive_cuda, case):
    # tests/test_contrastive.py's closed-form and edge cases on the emulated kernels.
    import test_contrastive as tc

    getattr(tc, case)("cuda")


@pytest.mark.parametrize("temperature", [0.03, 0.01])
def test_contrastive_kernels_on_the_host_at_large_logits(emulated_contrastive_cuda, temperature):
    import test_contrastive as tc

    tc.check_large_logits("cuda", temperature)


@pytest.mark.parametrize("dtype,scale", [(torch.float16, 6.0e4), (torch.float32, 1e15), (torch.float32, 1e-20)])
def test_contrastive_kernels_on_the_host_extreme_norms(emulated_contrastive_cuda, dtype, scale):
    import test_contrastive as tc

    tc.test_huge_and_tiny_norms("cuda", dtype, scale)


@pytest.fixture
def emulated_apply_mask_cuda(C, monkeypatch):
    """ops/apply_mask.py's cuda backend on CPU tensors, its kernels run by the host emulation
    (every thread of the launch plan's grid)."""
    t = C._testing
    _install_emulation(monkeypatch, apply_mask_forward=_no_stream(t.apply_mask_forward),
                       apply_mask_backward=_no_stream(t.apply_mask_backward),
                       apply_mask_grad_chunk=t.apply_mask_grad_chunk)


@pytest.mark.parametrize("case", ["test_embedding_fill_exact", "test_noise_fill_matches_reference",
                                  "test_gradients_against_fp64_reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_mask_kernels_on_the_host_match_the_reference(emulated_apply_mask_cuda, case, dtype):
    # tests/test_apply_mask.py's checks against the reference (embedding copy and Philox
    # Box-Muller noise bit-exact or to its noise tolerance, gradients against fp64) on the
    # emulated apply_mask_forward_kernel, apply_mask_backward_kernel and
    # apply_mask_sum_partials_kernel, over its shapes (D off multiples of 4, < 4, > 256 threads)
    # and 150 frames (three 64-frame gradient chunks).
    import test_apply_mask as ta

    for shape in ta.SHAPES + [(3, 50, 9), (1, 2, 300)]:
        getattr(ta, case)("cuda", dtype, shape)


@pytest.mark.parametrize("case", ["test_unmasked_frames_untouched_bit_for_bit", "test_all_and_none_masked_and_empty",
                                  "test_non_contiguous_x_and_integer_masks", "test_inplace_semantics",
                                  "test_noise_depends_only_on_seed_frame_and_channel",
                                  # seed tensors: the kernel loads the key through seed_ptr (a CPU pointer here)
                                  "test_seed_tensor_draws_the_bits_of_the_same_int",
                                  "test_negative_seed_tensor_is_its_twos_complement_key",
                                  "test_seed_none_is_a_device_draw_of_torchs_generator",
                                  "test_derived_seed_tensors_match_derived_ints"])
def test_apply_mask_kernels_on_the_host_edge_cases(emulated_apply_mask_cuda, case):
    import test_apply_mask as ta

    getattr(ta, case)("cuda")


@pytest.fixture
def emulated_masked_prediction_cuda(C, monkeypatch):
    """ops/masked_prediction.py's cuda backend on CPU tensors: forward_kernel, dx_kernel and
    dw_kernel run by the host emulation (every thread of every block, phase by phase)."""
    import test_masked_prediction as tm

    _install_emulation(monkeypatch, masked_prediction_forward_backward=_no_stream(C._testing.masked_prediction))
    monkeypatch.setattr(tm, "_device", lambda backend: torch.device("cpu"))
    return tm


@pytest.mark.parametrize("n,h,v,d", [(1, 1, 1, 1), (5, 2, 7, 3), (97, 3, 50, 33), (40, 2, 70, 130)])
def test_masked_prediction_kernels_on_the_host_match_the_reference(emulated_masked_prediction_cuda, n, h, v, d):
    # tests/test_masked_prediction.py's kernel check (loss, count, correct, grads of x, W and b
    # against the reference) over its heads and options on the emulated kernels; N, V and D
    # off the 32-row, 32-class and 64-feature tiles, D = 130 over several 32-wide slices.
    tm = emulated_masked_prediction_cuda
    for hd in tm.HEADS:
        for opt in (tm.OPTIONS[0], tm.OPTIONS[3], tm.OPTIONS[5], tm.OPTIONS[7]):
            tm.test_kernel_matches_reference("cuda", n, h, v, d, hd, opt)


@pytest.mark.parametrize("case", ["test_kernel_no_grad_path_and_none_reduction_agree",
                                  "test_all_labels_ignored_gives_zero_and_zero_grads",
                                  "test_all_frames_unmasked_with_zero_nomask_weight", "test_one_class_loss_is_zero",
                                  "test_cosine_zero_vectors", "test_cosine_huge_and_tiny_norms", "test_empty_batch"])
def test_masked_prediction_kernels_on_the_host_edge_cases(emulated_masked_prediction_cuda, case):
    getattr(emulated_masked_prediction_cuda, case)("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_masked_prediction_kernels_on_the_host_low_precision(emulated_masked_prediction_cuda, dtype, head):
    # at most twice PyTorch's own error in the dtype (tests/test_masked_prediction.py's rule)
    emulated_masked_prediction_cuda.test_kernel_low_precision_error_at_most_twice_pytorch("cuda", dtype, head)


@pytest.mark.parametrize("n,h,v,d", [(1, 1, 1, 1), (37, 2, 50, 9), (40, 2, 70, 130)])
def test_masked_prediction_soft_targets_on_the_host_match_the_reference(emulated_masked_prediction_cuda, n, h, v, d):
    # the kSoft kernels (soft targets staged beside the logit tile, dq from the first feature
    # block of dx_kernel): loss, stats and the gradients of x, W, b and the targets
    for reduction in ("mean", "none"):
        for head in ("linear", "cosine"):
            emulated_masked_prediction_cuda.test_soft_kernel_matches_reference("cuda", n, h, v, d, reduction, head)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_masked_prediction_kernels_on_the_host_large_logits(emulated_masked_prediction_cuda, soft):
    # the gradient kernels recompute p from the saved (max, log l), not a rounded fp32 lse
    for base in (100.0, 1e3, -4e3):
        for reduction in ("mean", "none"):
            emulated_masked_prediction_cuda.test_kernel_gradients_at_large_logits_within_twice_the_reference(
                "cuda", base, reduction, soft)


@pytest.fixture
def emulated_birq_cuda(C, monkeypatch):
    """sslfast.masked_prediction_loss with GumbelRPQTargets on backend="cuda" over CPU tensors:
    the kGumbel instantiations of forward_kernel, dx_kernel and dw_kernel run by the host
    emulation through the op's unchanged CUDA host code."""
    import test_masked_prediction_birq as tb

    _install_emulation(monkeypatch, masked_prediction_gumbel_forward_backward=_no_stream(
        C._testing.masked_prediction_gumbel))
    monkeypatch.setattr(tb, "_device", lambda backend: torch.device("cpu"))
    return tb


def test_birq_targets_on_the_host_match_the_reference(emulated_birq_cuda):
    # tests/test_masked_prediction_birq.py's public-API checks (loss, stats, gradients of x, the
    # heads, the features and the codebooks under the 2x rule; seeds; empty batch, zero vectors)
    tb = emulated_birq_cuda
    for shape in [(1, 1, 1, 1, 1), (7, 2, 9, 5, 3), (70, 3, 67, 20, 16)]:
        for shared_y in (False, True):
            tb.test_kernel_matches_reference("cuda", *shape, shared_y)
    for opt in [dict(), dict(label_smoothing=0.1, reduction="sum"), dict(training=False, tau=0.1),
                dict(use_mask=True, tau=2.0), dict(tau=1e-3)]:
        for heads in ("shared", "perhead-nobias"):
            tb.test_kernel_options_match_reference("cuda", opt, heads)
    for dtype in (torch.float16, torch.bfloat16):
        tb.test_kernel_low_precision("cuda", dtype)
    tb.test_kernel_int_and_tensor_seeds_draw_the_same_targets("cuda")
    tb.test_empty_batch_and_zero_vectors("cuda")
