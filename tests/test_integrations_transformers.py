"""sslfast.integrations.transformers: patched Hugging Face models against stock ones.

Parity: the same tiny random-init model (dropouts 0, so train mode is deterministic) run
stock and patched on the same input with the same mask, negatives and Gumbel noise: stock's
``gumbel_softmax`` is swapped, for the stock call only, for one that draws sslfast's Philox
noise (``sslfast.reference.gumbel_quantize.gumbel_noise``) and otherwise does what torch's
does (``softmax((l + g) / tau)``, straight-through one-hot). The reference is transformers'
own code, so the expected values are not produced by the code under test.

Tolerances. fp32: every output field and every parameter's gradient within
``max|a - b| <= 1e-5 * max|b| + 1e-7 * G`` (G the largest gradient of the model): the two
paths compute the same fp32 formulas in different orders (the fused kernels sum cosines,
log-sum-exp and the grad-y scatter in their own order; HF materialises the logits), i.e.
rounding differences of a few ulps (1 ulp = 1.2e-7) that the backward through two
transformer layers amplifies by at most some tens: measured <= 1.1e-6, so 1e-5 leaves a
margin of ~10 without admitting a wrong term (a wrong term is O(1) relative). The absolute
term covers gradients that are exactly 0 in exact arithmetic (attention key biases, whose
gradient is rounding noise of order 1e-9 in both). bf16 autocast: the 2x-reference-error rule
(flash-attention's): with stock run in fp64 (the reference, same noise), the patched bf16
error must be at most twice stock's bf16 error (plus a 1e-6 relative floor for fields the
patch leaves bit-identical).
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sslfast  # noqa: E402
from sslfast.integrations import transformers as st  # noqa: E402
from sslfast.reference.gumbel_quantize import gumbel_noise  # noqa: E402

from transformers import (  # noqa: E402
    Wav2Vec2Config,
    Wav2Vec2ConformerConfig,
    Wav2Vec2ConformerForPreTraining,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForPreTraining,
)
from transformers.models.wav2vec2 import modeling_wav2vec2 as mw  # noqa: E402

pytestmark = pytest.mark.cpu

FIELDS = ("loss", "contrastive_loss", "diversity_loss", "codevector_perplexity", "projected_states",
          "projected_quantized_states")
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  feat_quantizer_dropout=0.0, layerdrop=0.0, final_dropout=0.0)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 4), conv_kernel=(10, 8), conv_bias=True, num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, num_codevector_groups=2, num_codevectors_per_group=8,
            codevector_dim=16, proj_codevector_dim=16, num_negatives=5, mask_time_prob=0.5, mask_time_length=2,
            do_stable_layer_norm=True, feat_extract_norm="layer", **NO_DROPOUT)


def tiny_config(kind: str):
    if kind == "wav2vec2":
        return Wav2Vec2Config(**TINY)
    return Wav2Vec2ConformerConfig(**TINY, conv_depthwise_kernel_size=3, position_embeddings_type="relative",
                                   conformer_conv_dropout=0.0)


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = Wav2Vec2ForPreTraining if kind == "wav2vec2" else Wav2Vec2ConformerForPreTraining
    return cls(tiny_config(kind))


@contextlib.contextmanager
def philox_gumbel(seed: int, n_frames: int):
    """Within the block, torch's gumbel_softmax (which stock's quantizer calls on (N*G, V)
    logits) draws sslfast's Philox noise for (N, G*V) rows: the noise the patched quantizer
    draws with ``seed``. Otherwise it computes what torch's does."""
    original = torch.nn.functional.gumbel_softmax

    def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        g = gumbel_noise(n_frames, logits.numel() // n_frames, seed).view_as(logits).to(logits.dtype)
        soft = ((logits + g) / tau).softmax(dim)
        if not hard:
            return soft
        one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
        return one_hot - soft.detach() + soft

    torch.nn.functional.gumbel_softmax = gumbel_softmax
    try:
        yield
    finally:
        torch.nn.functional.gumbel_softmax = original


def batch_for(model, batch_size=3, samples=1600, seed=7, padded=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, samples, generator=gen)
    t = int(model._get_feat_extract_output_lengths(samples))
    attention = None
    sub = None
    if padded:
        attention = torch.ones(batch_size, samples, dtype=torch.long)
        attention[-1, samples * 2 // 3:] = 0
        x[-1, samples * 2 // 3:] = 0
        sub = model._get_feature_vector_attention_mask(t, attention)
    mask = sslfast.compute_mask_indices((batch_size, t), attention_mask=sub, mask_prob=0.5, mask_length=2,
                                        style="hf", seed=seed + 1)
    negatives = st._hf_dummy_negatives(sslfast.sample_negatives(mask, model.config.num_negatives, layout="hf",
                                                                seed=seed + 2))
    return dict(input_values=x, attention_mask=attention, mask_time_indices=mask.long(),
                sampled_negative_indices=negatives)


STEP_SEED = 1234


def run_stock(model, batch):
    n_frames = batch["mask_time_indices"].numel()
    with philox_gumbel(sslfast.derive_seed(STEP_SEED, step=st.STREAM_GUMBEL), n_frames):
        return model(**batch)


def run_patched(model, batch):
    return model(**batch, sslfast_seed=STEP_SEED)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def forward_backward(run, model, batch, autocast=None):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = run(model, batch)
    out.loss.backward()
    fields = {k: out[k].detach().double() for k in FIELDS}
    return fields, grads(model)


def assert_close_fp32(got, want, name, scale_abs=0.0):
    err = float((got.double() - want.double()).abs().max())
    bound = 1e-5 * float(want.double().abs().max()) + scale_abs
    assert err <= bound, f"{name}: max|diff| {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("kind", ["wav2vec2", "conformer"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("sync_free", [False, True])
def test_parity_fp32(kind, mode, sync_free):
    stock = tiny_model(kind)
    for m in (stock,):
        m.set_gumbel_temperature(0.7)  # set_gumbel_temperature must reach the patched quantizer too
    patched = copy.deepcopy(stock)
    st.apply_sslfast_to_wav2vec2(patched, sync_free=sync_free)
    assert patched.quantizer.temperature == 0.7
    getattr(stock, mode)()
    getattr(patched, mode)()
    batch = batch_for(stock, padded=True)
    f_stock, g_stock = forward_backward(run_stock, stock, batch)
    f_patched, g_patched = forward_backward(run_patched, patched, batch)
    for k in FIELDS:
        assert_close_fp32(f_patched[k], f_stock[k], k)
    g_scale = max(float(g.abs().max()) for g in g_stock.values() if g is not None)
    for name, gs in g_stock.items():
        gp = g_patched[name]
        if gs is None:
            if mode == "eval" and name.startswith("quantizer.weight_proj"):
                # stock's eval argmax one-hot has no graph to weight_proj; the fused op's is zeros
                assert gp is None or not gp.any(), name
            else:  # unused parameters (the conformer's pos_conv_embed with relative positions)
                assert gp is None, name
            continue
        assert_close_fp32(gp, gs, name, scale_abs=1e-7 * g_scale)


def eval_perplexity_fp64(model, batch):
    """HF's eval perplexity (argmax histogram over masked frames) in fp64, from the codes of
    the model's bf16-autocast logits (captured from its quantizer's weight_proj)."""
    captured = []
    hook = model.quantizer.weight_proj.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        run_patched(model, batch)
    hook.remove()
    g, v = model.config.num_codevector_groups, model.config.num_codevectors_per_group
    codes = captured[0].reshape(-1, g, v).float().argmax(-1)
    mask = batch["mask_time_indices"].bool().reshape(-1)
    one_hot = torch.nn.functional.one_hot(codes[mask], v).double()
    marginal = one_hot.mean(0)
    return torch.exp(-torch.xlogy(marginal, marginal).sum(-1)).sum()


def rel_err(a, ref):
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["wav2vec2", "conformer"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_parity_bf16_autocast(kind, mode):
    stock = tiny_model(kind)
    patched = copy.deepcopy(stock)
    st.apply_sslfast_to_wav2vec2(patched)
    reference = copy.deepcopy(stock).double()
    for m in (stock, patched, reference):
        getattr(m, mode)()
    batch = batch_for(stock)
    f_stock, g_stock = forward_backward(run_stock, stock, batch, autocast=torch.bfloat16)
    f_patched, g_patched = forward_backward(run_patched, patched, batch, autocast=torch.bfloat16)
    ref_batch = dict(batch, input_values=batch["input_values"].double())
    f_ref, g_ref = forward_backward(run_stock, reference, ref_batch)
    if mode == "eval":
        # eval perplexity is a histogram of argmax codes: where bf16 rounding flips a code
        # relative to fp64 both bf16 runs flip it alike (identical bf16 logits), so the fp64
        # reference for the histogram fields takes the bf16 run's codes (exact fp64 math on them)
        perplexity = eval_perplexity_fp64(patched, batch)
        n_vars = stock.config.num_codevectors_per_group * stock.config.num_codevector_groups
        f_ref["codevector_perplexity"] = perplexity
        f_ref["diversity_loss"] = (n_vars - perplexity) / n_vars * batch["mask_time_indices"].sum()
    for k in FIELDS:
        e_p, e_s = rel_err(f_patched[k], f_ref[k]), rel_err(f_stock[k], f_ref[k])
        assert e_p <= 2 * e_s + 1e-6, f"{k}: patched bf16 error {e_p:.2e} > 2 x stock's {e_s:.2e}"
    for name, gr in g_ref.items():
        if gr is None:
            continue
        if float(gr.abs().max()) < 1e-6 * max(float(g.abs().max()) for g in g_ref.values() if g is not None):
            continue  # exactly 0 in exact arithmetic (attention key biases): no relative error exists
        e_p, e_s = rel_err(g_patched[name], gr), rel_err(g_stock[name], gr)
        assert e_p <= 2 * e_s + 1e-6, f"grad {name}: patched bf16 error {e_p:.2e} > 2 x stock's {e_s:.2e}"
