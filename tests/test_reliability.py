"""Misuse, dtype policy, non-finite inputs and host syncs, across ops (issue 12, items 4 and 5).

Each test here failed before its fix: integer padding masks were taken silently (and an HF
attention_mask passed as padding_mask inverted the mask), integer masks with values other
than 0/1 were taken as True, an all-padded utterance unmasked the whole batch without a word,
``negatives=`` with another K than ``num_negatives`` was used silently, fp64 was rejected by
info_nce / gumbel / rp_quantize and sent to an error by contrastive_loss's default backend,
NaN inputs had no check, and wav2vec2_contrastive_loss synchronised with the host even when
given every size.
"""
import warnings

import pytest
import torch

import sslfast
from sslfast import _dispatch

cpu_built = pytest.mark.skipif(
    "cpu" not in _dispatch.implemented_backends("sample_negatives") or _dispatch.backend_unavailable_reason(
        "cpu", torch.device("cpu")) is not None, reason="C++ extension not built")


def _masks(B=3, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.5
    lengths = torch.tensor([T, T - 7, T - 13][:B])
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    return mask & ~pad, pad


# ----------------------------------------------------------------------------- masks


@pytest.mark.cpu
def test_integer_padding_mask_names_attention_mask():
    mask, pad = _masks()
    hf_attention = (~pad).long()  # what Hugging Face calls attention_mask
    x = torch.randn(3, 40, 8)
    calls = [
        lambda: sslfast.compute_mask_indices((3, 40), hf_attention, 0.5, 4, seed=1),
        lambda: sslfast.sample_negatives(mask, 5, padding_mask=hf_attention, seed=1),
        lambda: sslfast.wav2vec2_contrastive_loss(x, x, mask, 5, padding_mask=hf_attention, seed=1),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="attention_mask="):
            call()


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=cpu_built)])
def test_attention_mask_equals_padding_mask(backend):
    mask, pad = _masks()
    att = (~pad).to(torch.int32)
    kw = dict(from_masked_only=False, seed=3, backend=backend)
    assert torch.equal(sslfast.sample_negatives(mask, 6, padding_mask=pad, **kw),
                       sslfast.sample_negatives(mask, 6, attention_mask=att, **kw))
    assert torch.equal(sslfast.compute_mask_indices((3, 40), pad, 0.5, 4, seed=2, backend=backend),
                       sslfast.compute_mask_indices((3, 40), attention_mask=att, mask_prob=0.5, mask_length=4, seed=2,
                                                    backend=backend))
    x = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(2))
    a = sslfast.wav2vec2_contrastive_loss(x, y, mask, 5, padding_mask=pad, seed=4, backend=backend)
    b = sslfast.wav2vec2_contrastive_loss(x, y, mask, 5, attention_mask=att, seed=4, backend=backend)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        sslfast.sample_negatives(mask, 6, padding_mask=pad, attention_mask=att)


@pytest.mark.cpu
def test_integer_masks_other_than_zero_one_rejected():
    mask, pad = _masks()
    twos = mask.to(torch.int64) * 2
    x = torch.randn(3, 40, 8)
    calls = {
        "mask": [lambda: sslfast.sample_negatives(twos, 5, seed=1),
                 lambda: sslfast.apply_mask(x, twos, torch.zeros(8)),
                 lambda: sslfast.wav2vec2_contrastive_loss(x, x, twos, 5, seed=1)],
        "attention_mask": [lambda: sslfast.compute_mask_indices((3, 40), attention_mask=(~pad).long() * 3, seed=1),
                           lambda: sslfast.sample_negatives(mask, 5, attention_mask=-(~pad).long(), seed=1)],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=f"{name} must hold only 0 and 1"):
                fn()
    # 0/1 integers are still taken, as bool
    assert torch.equal(sslfast.sample_negatives(mask.to(torch.uint8), 5, seed=1),
                       sslfast.sample_negatives(mask, 5, seed=1))


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=cpu_built)])
def test_all_padded_utterance_warns_under_require_same_masks(backend):
    pad = torch.zeros(3, 50, dtype=torch.bool)
    pad[1] = True  # one utterance is all padding
    with pytest.warns(UserWarning, match=r"utterance\(s\) \[1\].*require_same_masks"):
        mask = sslfast.compute_mask_indices((3, 50), pad, 0.65, 5, seed=1, backend=backend)
    assert not mask.any()  # fairseq's semantics are kept: the warning says why it is empty
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = sslfast.compute_mask_indices((3, 50), pad, 0.65, 5, require_same_masks=False, seed=1, backend=backend)
        assert kept[0].any() and not kept[1].any()
        sslfast.compute_mask_indices((3, 50), torch.zeros(3, 50, dtype=torch.bool), 0.65, 5, seed=1, backend=backend)
        sslfast.compute_mask_indices((3, 50), torch.ones(3, 50, dtype=torch.bool), 0.65, 5, seed=1, backend=backend)


@pytest.mark.cpu
@pytest.mark.parametrize("convention", ["fairseq", "hf"])
def test_negatives_width_must_match_num_negatives(convention):
    mask, _ = _masks()
    x = torch.randn(3, 40, 8)
    layout = "packed" if convention == "fairseq" else "hf"
    neg = sslfast.sample_negatives(mask, 7, layout=layout, seed=1)
    with pytest.raises(ValueError, match="num_negatives=7"):
        sslfast.wav2vec2_contrastive_loss(x, x, mask, negatives=neg, convention=convention)  # default K = 100
    sslfast.wav2vec2_contrastive_loss(x, x, mask, 7, negatives=neg, convention=convention)


# ----------------------------------------------------------------------------- dtype policy


def _op_calls(dtype, gen, nan=False):
    """Every floating op at a tiny shape: name -> callable(backend). ``nan``: the first
    floating argument of every op holds one NaN."""
    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    def first(*s):
        t = r(*s)
        if nan:
            t.view(-1)[t.numel() // 2] = float("nan")
        return t

    mask, _ = _masks()
    neg = torch.randint(0, 12, (10, 4), generator=gen)
    x2, y2 = first(10, 6), r(12, 6)
    x3, y3 = first(3, 40, 6), r(3, 40, 6)
    q, k = first(9, 5), r(9, 5)
    logits, cb = first(7, 8), r(8, 3)
    xr, proj, cbs = first(2, 9, 4), r(4, 6), r(2, 5, 3)
    return {
        "apply_mask": lambda b: sslfast.apply_mask(x3, mask, r(6), backend=b),
        "contrastive_loss": lambda b: sslfast.contrastive_loss(x2, y2, neg, backend=b),
        "wav2vec2_contrastive_loss": lambda b: sslfast.wav2vec2_contrastive_loss(x3, y3, mask, 4, seed=3, backend=b),
        "info_nce": lambda b: sslfast.info_nce(q, k, backend=b),
        "nt_xent": lambda b: sslfast.nt_xent(q, k, backend=b),
        "gumbel_vector_quantize": lambda b: sslfast.gumbel_vector_quantize(logits, cb, groups=2, seed=5,
                                                                            backend=b).quantized,
        "random_projection_quantize": lambda b: sslfast.random_projection_quantize(xr, proj, cbs, backend=b),
        "nearest_codeword": lambda b: sslfast.nearest_codeword(x2, y2, backend=b),
    }


@pytest.mark.cpu
@pytest.mark.parametrize("op", list(_op_calls(torch.float32, torch.Generator())))
def test_fp64_runs_on_reference_wherever_it_runs(op):
    calls = _op_calls(torch.float64, torch.Generator().manual_seed(0))
    want = calls[op]("reference")
    calls = _op_calls(torch.float64, torch.Generator().manual_seed(0))
    got = calls[op](None)  # backend=None picks the reference for fp64
    assert got.dtype == want.dtype
    if want.is_floating_point() and op not in ("info_nce", "nt_xent", "contrastive_loss",
                                               "wav2vec2_contrastive_loss"):
        assert want.dtype == torch.float64  # outputs that continue an input keep fp64
    assert torch.equal(got, want)
    if "cpu" in _dispatch.implemented_backends(op) and _dispatch.backend_unavailable_reason(
            "cpu", torch.device("cpu")) is None:
        calls = _op_calls(torch.float64, torch.Generator().manual_seed(0))
        with pytest.raises(TypeError, match="backend='reference'"):
            calls[op]("cpu")


@pytest.mark.cpu
def test_fp64_losses_are_fp64_on_the_reference():
    # the fp64 path is the one gradcheck uses: the losses must not round through fp32
    gen = torch.Generator().manual_seed(1)
    calls = _op_calls(torch.float64, gen)
    for op in ("contrastive_loss", "info_nce", "nt_xent"):
        assert calls[op](None).dtype == torch.float64, op


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=cpu_built)])
def test_mixed_dtypes_promote_as_torch(backend):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 6, generator=g), torch.randn(12, 6, generator=g).half()
    neg = torch.randint(0, 12, (10, 4), generator=g)
    got = sslfast.contrastive_loss(x, y, neg, backend=backend)
    want = sslfast.contrastive_loss(x, y.float(), neg, backend=backend)  # promote_types(fp32, fp16) = fp32
    assert torch.equal(got, want)
    q, k = torch.randn(9, 5, generator=g).bfloat16(), torch.randn(9, 5, generator=g)
    assert torch.equal(sslfast.info_nce(q, k, backend=backend), sslfast.info_nce(q.float(), k, backend=backend))


# ----------------------------------------------------------------------------- non-finite inputs


@pytest.mark.cpu
@pytest.mark.parametrize("op", list(_op_calls(torch.float32, torch.Generator())))
def test_check_finite_names_op_and_argument(op, monkeypatch):
    first_arg = {"apply_mask": "x", "contrastive_loss": "x", "wav2vec2_contrastive_loss": "x", "info_nce": "query",
                 "nt_xent": "z1", "gumbel_vector_quantize": "logits", "random_projection_quantize": "x",
                 "nearest_codeword": "x"}[op]
    calls = _op_calls(torch.float32, torch.Generator().manual_seed(0), nan=True)
    op_name = op
    with sslfast.check_finite():
        with pytest.raises(ValueError, match=rf"{op_name}: {first_arg} holds non-finite values \(NaN"):
            calls[op](None)
    calls[op](None)  # off by default: no error (the NaN propagates as before)
    monkeypatch.setenv("SSLFAST_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="non-finite"):
        calls[op](None)
    with sslfast.check_finite(False):
        calls[op](None)


# ----------------------------------------------------------------------------- host syncs


@pytest.mark.interpreter
@pytest.mark.parametrize("convention", ["fairseq", "hf"])
def test_wav2vec2_loss_no_host_sync_given_sizes(convention, triton_on_meta):
    # On meta tensors every host read raises: a call that completes makes no host sync.
    B, T, D, K = 2, 30, 16, 5
    x = torch.empty(B, T, D, device="meta", requires_grad=True)
    y = torch.empty(B, T, D, device="meta")
    mask = torch.zeros(B, T, dtype=torch.bool, device="meta")
    kw = dict(convention=convention, seed=1, num_masked=12, backend="triton")
    loss = sslfast.wav2vec2_contrastive_loss(x, y, mask, K, **kw)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()  # the backward is sync-free too
    layout = "packed" if convention == "fairseq" else "hf"
    neg = torch.zeros((12, K) if layout == "packed" else (B, T, K), dtype=torch.int64, device="meta")
    sslfast.wav2vec2_contrastive_loss(x, y, mask, K, negatives=neg, check_indices=False, **kw)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the index check reads the host
        sslfast.wav2vec2_contrastive_loss(x, y, mask, K, negatives=neg, **kw)
    with pytest.raises((RuntimeError, NotImplementedError)):  # without num_masked: nonzero syncs
        sslfast.wav2vec2_contrastive_loss(x, y, mask, K, convention=convention, seed=1, backend="triton")


@pytest.mark.interpreter
def test_contrastive_loss_check_indices_false_no_host_sync(triton_on_meta):
    x = torch.empty(10, 8, device="meta")
    neg = torch.zeros(10, 4, dtype=torch.int64, device="meta")
    loss = sslfast.contrastive_loss(x, x, neg, check_indices=False, backend="triton")
    assert loss.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        sslfast.contrastive_loss(x, x, neg, backend="triton")


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=cpu_built)])
def test_check_indices_false_same_loss(backend):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 6, generator=g), torch.randn(12, 6, generator=g)
    neg = torch.randint(0, 12, (10, 4), generator=g)
    assert torch.equal(sslfast.contrastive_loss(x, y, neg, backend=backend),
                       sslfast.contrastive_loss(x, y, neg, check_indices=False, backend=backend))
    with pytest.raises(ValueError, match="negatives must index rows of y"):
        sslfast.contrastive_loss(x, y, neg + 5, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("convention", ["fairseq", "hf"])
def test_wav2vec2_loss_no_sync_on_gpu(backend, convention):
    if backend not in _dispatch.implemented_backends("contrastive_loss"):
        pytest.skip(f"no {backend} backend")
    B, T, D, K = 4, 200, 64, 10
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g).cuda().requires_grad_()
    y = torch.randn(B, T, D, generator=g).cuda()
    mask = sslfast.compute_mask_indices((B, T), None, 0.5, 5, seed=1, device="cuda")
    n = int(mask.sum())  # known to the caller (fairseq: require_same_masks gives it)
    kw = dict(convention=convention, seed=2, num_masked=n, backend=backend)
    sslfast.wav2vec2_contrastive_loss(x, y, mask, K, **kw).backward()  # warm-up: tables, compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = sslfast.wav2vec2_contrastive_loss(x, y, mask, K, **kw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


# ----------------------------------------------------------------------------- CPU threads


def _pool_team():
    from sslfast import _ext

    return _ext.cpu_module()._last_parallel_threads()  # (used, asked for)


@pytest.mark.cpu
@cpu_built
def test_cpu_threads_follow_torch_set_num_threads_and_threshold():
    mask = sslfast.compute_mask_indices((16, 781), None, 0.65, 10, seed=0, backend="cpu")
    before = torch.get_num_threads()
    try:
        outs = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs[n] = sslfast.sample_negatives(mask, 100, layout="hf", seed=1, backend="cpu")
            used, asked = _pool_team()
            assert asked == n  # 16 rows, 640k draws: above the threshold, one thread per torch thread
            assert 1 <= used <= asked  # fewer only when the pool backs off under contention
        assert torch.equal(outs[1], outs[2]) and torch.equal(outs[1], outs[3])  # same bits on any team
        torch.set_num_threads(2)
        small = sslfast.compute_mask_indices((2, 50), None, 0.65, 10, seed=0, backend="cpu")
        sslfast.sample_negatives(small, 10, seed=1, backend="cpu")
        assert _pool_team() == (1, 1)  # below the work threshold: the calling thread alone
        big = sslfast.compute_mask_indices((64, 8192), None, 0.65, 10, seed=0, backend="cpu")
        assert _pool_team()[1] == 2
        torch.set_num_threads(1)
        assert torch.equal(sslfast.compute_mask_indices((64, 8192), None, 0.65, 10, seed=0, backend="cpu"), big)
        assert _pool_team() == (1, 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.cpu
@cpu_built
def test_cpu_pool_works_in_a_forked_child():
    # data-loader workers fork the process after the pool's threads exist
    import os

    mask = sslfast.compute_mask_indices((16, 781), None, 0.65, 10, seed=0, backend="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = sslfast.sample_negatives(mask, 100, layout="hf", seed=1, backend="cpu")  # starts the pool
        pid = os.fork()
        if pid == 0:  # child: same result, on a fresh pool, then exit without running pytest's teardown
            import faulthandler

            faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the test, never the suite
            got = sslfast.sample_negatives(mask, 100, layout="hf", seed=1, backend="cpu")
            # compared in numpy: torch's own OpenMP regions are not fork-safe once the parent
            # has run them (libgomp), which is why data-loader workers run torch on one thread
            os._exit(0 if (got.numpy() == want.numpy()).all() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(before)
