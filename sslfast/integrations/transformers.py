"""Put a Hugging Face transformers wav2vec 2.0 pretraining loop on sslfast with one line.

    from sslfast.integrations.transformers import apply_sslfast_to_wav2vec2
    apply_sslfast_to_wav2vec2()          # before the model is built: patches the classes
    apply_sslfast_to_wav2vec2(model)     # or: patches this instance only

In the manner of Liger-Kernel's ``apply_liger_kernel_to_*``: ``model=None`` swaps methods
and module-level functions of the transformers classes (every model built afterwards, and
already built ones whose instances were not patched separately, run sslfast); ``model=``
binds the methods on that instance's submodules only. ``revert_sslfast_to_wav2vec2`` undoes
either. Parameters, buffers, state_dict keys, constructors and initialisation are never
touched: a checkpoint saved patched loads unpatched and the other way round.

What each switch patches (transformers 5.x; a family that the installed transformers lacks
is skipped):

* ``mask``: ``_mask_hidden_states`` of every model that masks (Wav2Vec2, Wav2Vec2Conformer,
  Hubert, Data2VecAudio, WavLM, UniSpeech, UniSpeechSat, SEW, SEW-D, Wav2Vec2Bert): the
  learned mask embedding is written by ``sslfast.apply_mask`` (no boolean indexing, no host
  sync), masks drawn inside the model come from ``sslfast.compute_mask_indices(style="hf")``
  on the hidden states' device. Class mode also replaces each family's module-level
  ``_compute_mask_indices`` (same signature, numpy bool output, Hugging Face's semantics).
* ``negatives``: class mode replaces ``modeling_wav2vec2._sample_negative_indices`` (same
  signature and numpy int32 output). With ``loss`` too, the pretraining forward draws
  negatives on the device (``sslfast.sample_negatives(layout="hf")``) when the batch has
  none, and masks likewise when it has no ``mask_time_indices`` (training mode).
* ``quantizer``: the forward of ``Wav2Vec2GumbelVectorQuantizer`` and
  ``Wav2Vec2ConformerGumbelVectorQuantizer`` runs ``sslfast.gumbel_vector_quantize`` (no
  (N, G*V, d) product); ``temperature`` / ``set_gumbel_temperature`` work as before.
* ``loss``: ``Wav2Vec2ForPreTraining.forward`` and ``Wav2Vec2ConformerForPreTraining.forward``
  compute the contrastive loss from the negative indices with sslfast's fused kernels (never
  the (K+1, B, T, D) negatives tensor nor the logits) and the diversity loss; they return the
  same ``*ForPreTrainingOutput`` fields with Hugging Face's conventions: loss summed over the
  masked frames, logits ``cast(cos, dtype) / temperature``, negatives equal to the positive
  masked, ``diversity = (G*V - perplexity) / (G*V) * n_masked``, ``loss = contrastive +
  diversity_loss_weight * diversity``.

Left alone: feature encoder, transformer, projections, dropout, the CTC / classification
heads, UniSpeech(Sat)'s own pretraining heads and quantizers, WavLM's quantizer.

Differences from stock, on purpose:

* Random draws (masks, negatives, Gumbel noise) come from sslfast's Philox streams, not
  numpy's / torch's generators: the same distributions, not the same bits. With
  ``sslfast_seed=<int or 0-d int64 device tensor>`` in the forward's keywords (the collator
  below adds an int) every draw of that step derives its seed from it; otherwise each draw
  takes a key drawn on the model's device from torch's generator (``torch.manual_seed`` makes
  runs repeatable; no host sync, no graph break, fresh at each CUDA-graph replay).
* The pretraining forward computes the loss whenever it has a mask and negatives, drawing
  them when the batch has none (stock returns ``loss=None`` without negatives).
* The quantizer's training output is exactly the chosen codewords (stock's
  ``hard - soft.detach() + soft`` is off by an ulp); perplexity over zero selected frames is
  G, not NaN. A mask longer than the sequence gives no span instead of raising inside the
  model (the replaced ``_compute_mask_indices`` still raises, as stock does).

DDP / accelerate rule: keep the base ``seed`` identical on every rank and give each rank and
step its own stream with ``sslfast.derive_seed(seed, rank=rank, step=step)``; the collator
``SslfastDataCollatorForWav2Vec2Pretraining`` does exactly that (rank from
``torch.distributed``, step counted per call and per DataLoader worker) and passes the step's
seed to the model as ``sslfast_seed``. Without it, the patched model seeds from torch's
generator of its device: seed it per rank (``accelerate.utils.set_seed(seed, device_specific=True)``), or
every rank draws the same masks, negatives and Gumbel noise (as fairseq does).
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Optional, Union

import numpy as np
import torch

from ..nn.gumbel_quantize import hf_quantizer_forward
from ..ops.apply_mask import apply_mask
from ..ops.contrastive import contrastive_loss, wav2vec2_contrastive_loss
from ..ops.masking import compute_mask_indices
from ..ops.negatives import sample_negatives
from ..random import derive_seed

__all__ = [
    "apply_sslfast_to_wav2vec2",
    "revert_sslfast_to_wav2vec2",
    "SslfastDataCollatorForWav2Vec2Pretraining",
    "compute_mask_indices_hf",
    "sample_negative_indices_hf",
    "wav2vec2_pretraining_loss",
]

# (modeling module, base model class) of every family whose base model masks hidden states
MASKING_FAMILIES = (
    ("transformers.models.wav2vec2.modeling_wav2vec2", "Wav2Vec2Model"),
    ("transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer", "Wav2Vec2ConformerModel"),
    ("transformers.models.hubert.modeling_hubert", "HubertModel"),
    ("transformers.models.data2vec.modeling_data2vec_audio", "Data2VecAudioModel"),
    ("transformers.models.wavlm.modeling_wavlm", "WavLMModel"),
    ("transformers.models.unispeech.modeling_unispeech", "UniSpeechModel"),
    ("transformers.models.unispeech_sat.modeling_unispeech_sat", "UniSpeechSatModel"),
    ("transformers.models.sew.modeling_sew", "SEWModel"),
    ("transformers.models.sew_d.modeling_sew_d", "SEWDModel"),
    ("transformers.models.wav2vec2_bert.modeling_wav2vec2_bert", "Wav2Vec2BertModel"),
)
# (modeling module, pretraining class, quantizer class, output class)
PRETRAINING_CLASSES = (
    ("transformers.models.wav2vec2.modeling_wav2vec2", "Wav2Vec2ForPreTraining", "Wav2Vec2GumbelVectorQuantizer",
     "Wav2Vec2ForPreTrainingOutput"),
    ("transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer", "Wav2Vec2ConformerForPreTraining",
     "Wav2Vec2ConformerGumbelVectorQuantizer", "Wav2Vec2ConformerForPreTrainingOutput"),
)
NEGATIVES_MODULE = "transformers.models.wav2vec2.modeling_wav2vec2"

# sub-streams of one step's seed (``sslfast_seed``): derive_seed(seed, step=STREAM_*)
STREAM_MASK, STREAM_NEGATIVES, STREAM_GUMBEL, STREAM_FEATURE_MASK = 0, 1, 2, 3

# class-mode patches: (owner, attribute) -> original value, for the revert
_ORIGINALS: dict = {}


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _stream(seed, stream: int):
    return None if seed is None else derive_seed(seed, step=stream)


def _mark(fn):
    fn._sslfast_patch = True
    return fn


def _is_patched(method) -> bool:
    return getattr(getattr(method, "__func__", method), "_sslfast_patch", False)


# ----------------------------------------------------------------------------- HF's functions


def compute_mask_indices_hf(shape, mask_prob: float, mask_length: int, attention_mask=None,
                            min_masks: int = 0) -> np.ndarray:
    """Drop-in for transformers' ``_compute_mask_indices``: a (B, T) numpy bool mask.

    Same signature, checks and semantics (``sslfast.compute_mask_indices(style="hf")``: one
    rounding noise per batch, static spans starting in [0, len - L], counts capped at T // L
    and len - L + 1, padded frames never masked); drawn by sslfast (on ``attention_mask``'s
    device, then copied to numpy, as callers of the original expect). Seeded from torch's
    default CPU generator. Raises ValueError for ``mask_length`` < 1 or > T, as the original.
    """
    batch_size, sequence_length = shape
    if mask_length < 1:
        raise ValueError("`mask_length` has to be bigger than 0.")
    if mask_length > sequence_length:
        raise ValueError(f"`mask_length` has to be smaller than `sequence_length`, but got `mask_length`: "
                         f"{mask_length} and `sequence_length`: {sequence_length}`")
    if attention_mask is not None and not torch.is_tensor(attention_mask):
        attention_mask = torch.as_tensor(np.asarray(attention_mask))
    device = attention_mask.device if attention_mask is not None else None
    mask = compute_mask_indices((batch_size, sequence_length), attention_mask=attention_mask, mask_prob=mask_prob,
                                mask_length=mask_length, min_masks=min_masks, style="hf", device=device)
    return mask.cpu().numpy()


def _hf_dummy_negatives(negatives: torch.Tensor) -> torch.Tensor:
    """sslfast's hf layout holds -1 at unmasked frames; Hugging Face holds b*T there."""
    b, t, _ = negatives.shape
    row_start = (torch.arange(b, device=negatives.device) * t).view(b, 1, 1)
    return torch.where(negatives >= 0, negatives, row_start)


def sample_negative_indices_hf(features_shape, num_negatives: int, mask_time_indices=None) -> np.ndarray:
    """Drop-in for transformers' ``_sample_negative_indices``: (B, T, K) numpy int32.

    Per masked frame, K indices into the flattened (B*T) frames, uniform over the row's other
    masked frames (never the positive); unmasked frames hold the row's first index b*T, as the
    original. Drawn by ``sslfast.sample_negatives(layout="hf")``, seeded from torch's default
    CPU generator. A row with one masked frame gets that frame's own index (the loss masks it)
    where the original raises.
    """
    batch_size, sequence_length = features_shape
    if mask_time_indices is None:
        mask = torch.ones(batch_size, sequence_length, dtype=torch.bool)
    elif torch.is_tensor(mask_time_indices):
        mask = mask_time_indices.bool()
    else:
        mask = torch.from_numpy(np.asarray(mask_time_indices).astype(bool))
    negatives = sample_negatives(mask, num_negatives, layout="hf")
    return _hf_dummy_negatives(negatives).to(torch.int32).cpu().numpy()


# ----------------------------------------------------------------------------- patched methods


@_mark
def _mask_hidden_states(self, hidden_states: torch.Tensor, mask_time_indices: Optional[torch.Tensor] = None,
                        attention_mask: Optional[torch.Tensor] = None, *, seed: Optional[int] = None):
    """SpecAugment masking of transformers' base models, without boolean indexing.

    As the stock method: a given ``mask_time_indices`` (B, T) is applied in any mode; else in
    training with ``mask_time_prob > 0`` a mask is drawn (``style="hf"``, the config's
    length and ``mask_time_min_masks``, ``attention_mask`` (B, T) at frame level); feature
    masking (``mask_feature_prob > 0``, training) zeroes (B, C) spans of channels. ``seed``
    (keyword, sslfast's): the Philox seed of the drawn masks, an int or a 0-d int64 tensor on
    the device (default: a key drawn on the device from torch's generator).
    Returns a new tensor (stock writes into ``hidden_states``).
    """
    config = self.config
    if not getattr(config, "apply_spec_augment", True):
        return hidden_states
    batch_size, sequence_length, hidden_size = hidden_states.shape
    if mask_time_indices is not None:
        hidden_states = apply_mask(hidden_states, mask_time_indices, self.masked_spec_embed)
    elif config.mask_time_prob > 0 and self.training:
        mask = compute_mask_indices((batch_size, sequence_length), attention_mask=attention_mask,
                                    mask_prob=config.mask_time_prob, mask_length=config.mask_time_length,
                                    min_masks=config.mask_time_min_masks, style="hf",
                                    seed=_stream(seed, STREAM_MASK), device=hidden_states.device)
        hidden_states = apply_mask(hidden_states, mask, self.masked_spec_embed)
    if config.mask_feature_prob > 0 and self.training:
        feature_mask = compute_mask_indices((batch_size, hidden_size), mask_prob=config.mask_feature_prob,
                                            mask_length=config.mask_feature_length,
                                            min_masks=config.mask_feature_min_masks, style="hf",
                                            seed=_stream(seed, STREAM_FEATURE_MASK), device=hidden_states.device)
        hidden_states = hidden_states.masked_fill(feature_mask[:, None, :], 0)
    return hidden_states


@_mark
def _quantizer_forward(self, hidden_states, mask_time_indices=None, *, seed: Optional[int] = None):
    return hf_quantizer_forward(self, hidden_states, mask_time_indices, seed=seed)


def wav2vec2_pretraining_loss(projected_states: torch.Tensor, projected_quantized_states: torch.Tensor,
                              mask_time_indices: torch.Tensor, sampled_negative_indices: torch.Tensor,
                              temperature: float = 0.1, *, sync_free: Optional[bool] = None) -> torch.Tensor:
    """Hugging Face's wav2vec 2.0 contrastive loss from negative indices, fused.

    Args:
        projected_states: (B, T, D) predictions (``project_hid`` output).
        projected_quantized_states: (B, T, D) targets (``project_q`` output); the predictions
            are cast to its dtype, as stock's ``type_as(target_features)``.
        mask_time_indices: (B, T) bool or 0/1, the frames the loss sums over.
        sampled_negative_indices: (B, T, K) int, Hugging Face's layout (flat indices into the
            B*T frames); values at unmasked frames are ignored (-1 or b*T both fine).
        temperature: the config's ``contrastive_logits_temperature``.
        sync_free: True evaluates every frame and zeroes the unmasked ones (their negatives
            are pointed at the frame itself, so the kernel masks them and they add 0): no
            data-dependent shape, no ``nonzero`` (a host sync on a GPU, a graph break under
            torch.compile) and no index-range check (``check_indices=False``: the kernels
            clamp an index out of range, never read out of bounds; HF's sampler and sslfast's
            give valid ones). False gathers the masked rows first (less work). None: True on
            a GPU or while compiling, False on the CPU.

    Returns the fp32 loss summed over masked frames, as stock's ``cross_entropy(...,
    reduction="sum")`` with target -100 at unmasked frames (``precision="hf"``: cosine in
    fp32, cast to the inputs' dtype, then divided by the temperature).
    """
    y = projected_quantized_states
    x = projected_states.to(y.dtype)
    mask = mask_time_indices.bool()
    b, t, d = x.shape
    if sync_free is None:
        sync_free = x.device.type != "cpu" or torch.compiler.is_compiling()
    if not sync_free:
        return wav2vec2_contrastive_loss(x, y, mask, sampled_negative_indices.shape[-1], convention="hf",
                                         negatives=sampled_negative_indices, temperature=temperature)
    flat_mask = mask.reshape(b * t, 1)
    own = torch.arange(b * t, device=x.device).view(b * t, 1)
    negatives = torch.where(flat_mask, sampled_negative_indices.reshape(b * t, -1).long(), own)
    rows = contrastive_loss(x.reshape(b * t, d), y.reshape(b * t, d), negatives, temperature=temperature,
                            reduction="none", neg_is_pos="vector", precision="hf", check_indices=False)
    return torch.where(flat_mask.view(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum()


def _make_pretraining_forward(output_class, *, draw_mask: bool, draw_negatives: bool,
                              sync_free: Optional[bool]):
    try:  # return_dict=False handling of transformers >= 4.50; older versions return the output object
        from transformers.utils.generic import can_return_tuple
    except ImportError:  # pragma: no cover
        def can_return_tuple(fn):
            return fn

    @can_return_tuple
    def forward(self, input_values, attention_mask=None, mask_time_indices=None, sampled_negative_indices=None,
                **kwargs):
        """``*ForPreTraining.forward`` on sslfast (see ``sslfast.integrations.transformers``).

        Same arguments and output as stock, plus the keyword ``sslfast_seed`` (an int or a 0-d
        int64 tensor on the model's device): the
        step's Philox seed, from which the masks, negatives and Gumbel noise drawn here derive
        theirs (``SslfastDataCollatorForWav2Vec2Pretraining`` passes it).
        """
        seed = kwargs.pop("sslfast_seed", None)
        config = self.config
        mask = None
        if mask_time_indices is not None:
            mask = mask_time_indices.to(torch.bool)
        elif (draw_mask and self.training and config.mask_time_prob > 0
              and getattr(config, "apply_spec_augment", True)):
            batch_size = input_values.shape[0]
            sequence_length = int(self._get_feat_extract_output_lengths(input_values.shape[-1]))
            sub_attention_mask = None
            if attention_mask is not None:
                sub_attention_mask = self._get_feature_vector_attention_mask(sequence_length, attention_mask)
            mask = compute_mask_indices((batch_size, sequence_length), attention_mask=sub_attention_mask,
                                        mask_prob=config.mask_time_prob, mask_length=config.mask_time_length,
                                        min_masks=config.mask_time_min_masks, style="hf",
                                        seed=_stream(seed, STREAM_MASK), device=input_values.device)
        if sampled_negative_indices is not None and mask is None:
            raise ValueError("sampled_negative_indices needs mask_time_indices (the frames the loss sums over)")

        outputs = getattr(self, self.base_model_prefix)(input_values, attention_mask=attention_mask,
                                                         mask_time_indices=mask, **kwargs)
        transformer_features = self.project_hid(outputs.last_hidden_state)
        extract_features = self.dropout_features(outputs.extract_features)
        if _is_patched(self.quantizer.forward):
            quantized_features, codevector_perplexity = self.quantizer(
                extract_features, mask_time_indices=mask, seed=_stream(seed, STREAM_GUMBEL))
        else:
            quantized_features, codevector_perplexity = self.quantizer(extract_features, mask_time_indices=mask)
        quantized_features = self.project_q(quantized_features.to(self.project_q.weight.dtype))

        negatives = sampled_negative_indices
        if negatives is None and draw_negatives and mask is not None:
            negatives = sample_negatives(mask, config.num_negatives, layout="hf",
                                         seed=_stream(seed, STREAM_NEGATIVES))
        loss = contrastive = diversity = None
        if negatives is not None:
            contrastive = wav2vec2_pretraining_loss(transformer_features, quantized_features, mask, negatives,
                                                    config.contrastive_logits_temperature, sync_free=sync_free)
            num_codevectors = config.num_codevectors_per_group * config.num_codevector_groups
            diversity = ((num_codevectors - codevector_perplexity) / num_codevectors) * mask.sum()
            loss = contrastive + config.diversity_loss_weight * diversity
        return output_class(loss=loss, projected_states=transformer_features,
                            projected_quantized_states=quantized_features,
                            codevector_perplexity=codevector_perplexity, hidden_states=outputs.hidden_states,
                            attentions=outputs.attentions, contrastive_loss=contrastive, diversity_loss=diversity)

    return _mark(forward)


# ----------------------------------------------------------------------------- apply / revert


def _set_class_attr(owner, name: str, value) -> None:
    key = (owner, name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)


def _unwrap(model):
    # DDP / accelerate / torch.compile wrappers keep the real model in .module / ._orig_mod
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


def apply_sslfast_to_wav2vec2(model: Optional[torch.nn.Module] = None, *, mask: bool = True, negatives: bool = True,
                              quantizer: bool = True, loss: bool = True, sync_free: Optional[bool] = None) -> None:
    """Run transformers' wav2vec 2.0 family on sslfast's fused ops (one line, Liger-style).

    Args:
        model: None patches the transformers classes and module functions (call it before the
            model is built, or at least before it runs); a model (or a DDP / accelerate /
            ``torch.compile`` wrapper of one) patches that instance's submodules only.
        mask: ``_mask_hidden_states`` of every masking family through ``sslfast.apply_mask``
            and on-device masks; class mode also replaces each family's ``_compute_mask_indices``.
        negatives: class mode replaces ``_sample_negative_indices``; with ``loss``, the
            pretraining forward draws negatives on the device when the batch has none (and,
            with ``mask``, a mask when the batch has none, in training).
        quantizer: the Gumbel quantizers of Wav2Vec2 and Wav2Vec2Conformer pretraining.
        loss: the ``*ForPreTraining.forward`` of both: fused contrastive + diversity loss.
        sync_free: passed to :func:`wav2vec2_pretraining_loss` (None: automatic).

    Idempotent; switches given False leave that piece stock (or revert it, for a piece an
    earlier call patched in the same mode). See the module docstring for what changes.
    Raises ImportError if transformers is not installed.
    """
    import transformers  # noqa: F401  (a clear ImportError when missing)

    revert_sslfast_to_wav2vec2(model)
    if model is None:
        _apply_classes(mask=mask, negatives=negatives, quantizer=quantizer, loss=loss, sync_free=sync_free)
    else:
        _apply_instance(_unwrap(model), mask=mask, negatives=negatives, quantizer=quantizer, loss=loss,
                        sync_free=sync_free)


def _apply_classes(*, mask, negatives, quantizer, loss, sync_free) -> None:
    for module_name, model_name in MASKING_FAMILIES:
        module = _import(module_name)
        if module is None or not mask:
            continue
        _set_class_attr(getattr(module, model_name), "_mask_hidden_states", _mask_hidden_states)
        if hasattr(module, "_compute_mask_indices"):
            _set_class_attr(module, "_compute_mask_indices", compute_mask_indices_hf)
    if negatives:
        module = _import(NEGATIVES_MODULE)
        if module is not None:
            _set_class_attr(module, "_sample_negative_indices", sample_negative_indices_hf)
    for module_name, pretraining_name, quantizer_name, output_name in PRETRAINING_CLASSES:
        module = _import(module_name)
        if module is None:
            continue
        if quantizer:
            _set_class_attr(getattr(module, quantizer_name), "forward", _quantizer_forward)
        if loss:
            forward = _make_pretraining_forward(getattr(module, output_name), draw_mask=mask,
                                                draw_negatives=negatives, sync_free=sync_free)
            _set_class_attr(getattr(module, pretraining_name), "forward", forward)


def _class_tables():
    masking, pretraining = [], []
    for module_name, model_name in MASKING_FAMILIES:
        module = _import(module_name)
        if module is not None:
            masking.append(getattr(module, model_name))
    for module_name, pretraining_name, quantizer_name, output_name in PRETRAINING_CLASSES:
        module = _import(module_name)
        if module is not None:
            pretraining.append((getattr(module, pretraining_name), getattr(module, quantizer_name),
                                getattr(module, output_name)))
    return tuple(masking), pretraining


def _apply_instance(model, *, mask, negatives, quantizer, loss, sync_free) -> None:
    masking, pretraining = _class_tables()
    for sub in model.modules():
        if mask and isinstance(sub, masking):
            sub._mask_hidden_states = types.MethodType(_mask_hidden_states, sub)
        for pretraining_cls, quantizer_cls, output_cls in pretraining:
            if quantizer and isinstance(sub, quantizer_cls):
                sub.forward = types.MethodType(_quantizer_forward, sub)
            if loss and isinstance(sub, pretraining_cls):
                forward = _make_pretraining_forward(output_cls, draw_mask=mask, draw_negatives=negatives,
                                                    sync_free=sync_free)
                sub.forward = types.MethodType(forward, sub)


def revert_sslfast_to_wav2vec2(model: Optional[torch.nn.Module] = None) -> None:
    """Undo :func:`apply_sslfast_to_wav2vec2`: the classes and module functions (``model=None``)
    or the methods bound on ``model``'s submodules. Stock behaviour is restored exactly (the
    original function objects); parameters are untouched. A no-op where nothing is patched."""
    if model is None:
        for (owner, name), original in list(_ORIGINALS.items()):
            setattr(owner, name, original)
        _ORIGINALS.clear()
        return
    for sub in _unwrap(model).modules():
        for name in ("forward", "_mask_hidden_states"):
            if _is_patched(sub.__dict__.get(name)):
                delattr(sub, name)


# ----------------------------------------------------------------------------- data collator


@dataclasses.dataclass
class SslfastDataCollatorForWav2Vec2Pretraining:
    """The pretraining example's ``DataCollatorForWav2Vec2Pretraining`` without numpy.

    Pads with ``feature_extractor.pad``, adds ``sub_attention_mask`` (frame level) when the
    batch has an ``attention_mask``, ``mask_time_indices`` (B, T) int64 from
    ``sslfast.compute_mask_indices(style="hf")`` and ``sampled_negative_indices`` (B, T, K)
    int64 from ``sslfast.sample_negatives(layout="hf")`` (b*T at unmasked frames, as Hugging
    Face), both drawn on ``device`` (default: the padded batch's, the CPU in a DataLoader
    worker; give ``"cuda"`` only with ``num_workers=0``). Output keys and dtypes are the
    example's, so a stock model takes the batch too; with ``emit_seed`` it also carries
    ``sslfast_seed``, which only a patched model accepts.

    Seeds: call c of DataLoader worker w (of W) on rank r uses ``derive_seed(seed, rank=r,
    step=c * W + w + start_step)``, so ranks, steps and workers never share a stream while
    ``seed`` is the same everywhere (the DDP / accelerate rule); the mask and negatives use
    sub-streams of it, and the patched model's Gumbel noise another (via ``sslfast_seed``).
    ``start_step`` resumes the sequence after a restart.

    Args:
        model: the ``*ForPreTraining`` model (for ``_get_feat_extract_output_lengths``,
            ``_get_feature_vector_attention_mask`` and the config).
        feature_extractor: a ``Wav2Vec2FeatureExtractor``.
        padding, pad_to_multiple_of: passed to ``feature_extractor.pad``.
        mask_time_prob, mask_time_length, num_negatives: default to the model's config.
        min_masks: as the example (0).
        seed: base seed (int, the same on every rank). rank: default ``torch.distributed``'s
            rank when initialised, else 0.
        emit_seed: add ``sslfast_seed`` to the batch (default: when the model's forward is
            patched).
    """

    model: Any
    feature_extractor: Any
    padding: Union[bool, str] = "longest"
    pad_to_multiple_of: Optional[int] = None
    mask_time_prob: Optional[float] = None
    mask_time_length: Optional[int] = None
    num_negatives: Optional[int] = None
    min_masks: int = 0
    seed: int = 0
    rank: Optional[int] = None
    device: Optional[Union[str, torch.device]] = None
    emit_seed: Optional[bool] = None
    start_step: int = 0
    calls: int = dataclasses.field(default=0, init=False)

    def step_seed(self) -> int:
        """The seed of the next batch (advances the call counter)."""
        rank = self.rank
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + self.calls * num_workers + worker
        self.calls += 1
        return derive_seed(self.seed, rank=rank, step=step)

    def __call__(self, features):
        batch = self.feature_extractor.pad(features, padding=self.padding, pad_to_multiple_of=self.pad_to_multiple_of,
                                           return_tensors="pt")
        model = _unwrap(self.model)
        config = model.config
        seed = self.step_seed()
        input_values = batch["input_values"]
        device = torch.device(self.device) if self.device is not None else input_values.device
        batch_size = input_values.shape[0]
        sequence_length = int(model._get_feat_extract_output_lengths(input_values.shape[-1]))
        sub_attention_mask = None
        if batch.get("attention_mask") is not None:
            sub_attention_mask = model._get_feature_vector_attention_mask(sequence_length, batch["attention_mask"])
            batch["sub_attention_mask"] = sub_attention_mask
            sub_attention_mask = sub_attention_mask.to(device)
        prob = config.mask_time_prob if self.mask_time_prob is None else self.mask_time_prob
        length = config.mask_time_length if self.mask_time_length is None else self.mask_time_length
        k = config.num_negatives if self.num_negatives is None else self.num_negatives
        mask = compute_mask_indices((batch_size, sequence_length), attention_mask=sub_attention_mask, mask_prob=prob,
                                    mask_length=length, min_masks=self.min_masks, style="hf",
                                    seed=derive_seed(seed, step=STREAM_MASK), device=device)
        negatives = sample_negatives(mask, k, layout="hf", seed=derive_seed(seed, step=STREAM_NEGATIVES))
        batch["mask_time_indices"] = mask.long()
        batch["sampled_negative_indices"] = _hf_dummy_negatives(negatives)
        emit = self.emit_seed if self.emit_seed is not None else _is_patched(model.forward)
        if emit:
            batch["sslfast_seed"] = seed
        return batch
