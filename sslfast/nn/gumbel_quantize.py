"""Drop-in Gumbel-softmax quantizers: fairseq's ``GumbelVectorQuantizer`` and Hugging Face's
``Wav2Vec2GumbelVectorQuantizer``, same constructors, parameter names and state_dict keys,
running ``sslfast.gumbel_vector_quantize`` (no (N, G*V, d) one-hot product).
"""
from __future__ import annotations

import ast
from typing import Optional

import torch
from torch import nn

from ..ops.gumbel_quantize import gumbel_vector_quantize

__all__ = ["GumbelVectorQuantizer", "Wav2Vec2GumbelVectorQuantizer", "hf_quantizer_forward"]


class GumbelVectorQuantizer(nn.Module):
    """fairseq's ``GumbelVectorQuantizer`` (wav2vec 2.0), fused.

    Constructor, parameters (``vars`` (1, G*V or V with ``combine_groups``, vq_dim/G),
    ``weight_proj`` Linear(dim, G*V) with N(0, 1) weight and zero bias, or an MLP of
    ``weight_proj_depth`` layers), temperature schedule (``set_num_updates``: ``curr_temp =
    max(max_temp * decay**num_updates, min_temp)``) and result dict (``num_vars``,
    ``code_perplexity``, ``prob_perplexity``, ``temp``, ``x``, and ``targets`` (B, T, G)
    with ``produce_targets=True``) are fairseq's, so a fairseq checkpoint loads with
    ``load_state_dict``. ``x`` is (B, T, vq_dim) with ``time_first=True``, else (B, vq_dim, T)
    for an input (B, dim, T).

    Differs on purpose: the forward value in training is exactly the chosen codewords; the
    noise comes from sslfast's Philox stream, seeded per call from torch's generator of the
    input's device, without a host sync (``seed=`` in ``forward`` fixes it: an int or a 0-d
    int64 device tensor, e.g. ``sslfast.derive_seed(base, rank=rank, step=step)`` so DDP ranks
    draw different noise; see ``sslfast.gumbel_vector_quantize``); ``backend=`` picks the kernel.
    """

    def __init__(self, dim, num_vars, temp, groups, combine_groups, vq_dim, time_first, activation=None,
                 weight_proj_depth=1, weight_proj_factor=1, hard=True, std=0, *, backend: Optional[str] = None):
        super().__init__()
        self.groups = groups
        self.combine_groups = combine_groups
        self.input_dim = dim
        self.num_vars = num_vars
        self.time_first = time_first
        self.hard = hard
        self.backend = backend
        if vq_dim % groups != 0:
            raise ValueError(f"vq_dim {vq_dim} must be divisible by groups {groups} for concatenation")
        var_dim = vq_dim // groups
        num_groups = groups if not combine_groups else 1
        self.vars = nn.Parameter(torch.FloatTensor(1, num_groups * num_vars, var_dim))
        if std == 0:
            nn.init.uniform_(self.vars)
        else:
            nn.init.normal_(self.vars, mean=0, std=std)
        if weight_proj_depth > 1:
            act = activation if activation is not None else nn.GELU()
            inner_dim = self.input_dim * weight_proj_factor
            layers = []
            for i in range(weight_proj_depth - 1):
                layers.append(nn.Sequential(nn.Linear(self.input_dim if i == 0 else inner_dim, inner_dim), act))
            self.weight_proj = nn.Sequential(*layers, nn.Linear(inner_dim, groups * num_vars))
        else:
            self.weight_proj = nn.Linear(self.input_dim, groups * num_vars)
            nn.init.normal_(self.weight_proj.weight, mean=0, std=1)
            nn.init.zeros_(self.weight_proj.bias)
        if isinstance(temp, str):
            temp = ast.literal_eval(temp)
        if len(temp) != 3:
            raise ValueError(f"temp must be (max_temp, min_temp, decay), got {temp}")
        self.max_temp, self.min_temp, self.temp_decay = temp
        self.curr_temp = self.max_temp
        self.codebook_indices = None

    def set_num_updates(self, num_updates: int) -> None:
        self.curr_temp = max(self.max_temp * self.temp_decay ** num_updates, self.min_temp)

    def _codebook(self) -> torch.Tensor:
        v = self.vars
        if self.combine_groups:
            v = v.repeat(1, self.groups, 1)
        return v[0]

    def forward_idx(self, x):
        res = self.forward(x, produce_targets=True)
        return res["x"], res["targets"]

    def forward(self, x, produce_targets: bool = False, *, seed: int | torch.Tensor | None = None,
                mask: Optional[torch.Tensor] = None):
        result = {"num_vars": self.num_vars * self.groups}
        if not self.time_first:
            x = x.transpose(1, 2)
        bsz, tsz, fsz = x.shape
        logits = self.weight_proj(x.reshape(-1, fsz))
        out = gumbel_vector_quantize(logits, self._codebook(), groups=self.groups, tau=float(self.curr_temp),
                                     hard=self.hard, training=self.training, seed=seed, mask=mask,
                                     perplexity_eps=1e-7, backend=self.backend)
        result["code_perplexity"] = out.code_perplexity
        result["prob_perplexity"] = out.prob_perplexity
        result["temp"] = self.curr_temp
        if produce_targets:
            result["targets"] = out.codes.view(bsz, tsz, self.groups)
        q = out.quantized.view(bsz, tsz, -1)
        if not self.time_first:
            q = q.transpose(1, 2)
        result["x"] = q
        return result


class Wav2Vec2GumbelVectorQuantizer(nn.Module):
    """Hugging Face's ``Wav2Vec2GumbelVectorQuantizer(config)``, fused.

    Parameters ``codevectors`` (1, G*V, codevector_dim/G) and ``weight_proj``
    Linear(conv_dim[-1], G*V), attribute ``temperature`` (2, set by the training script),
    ``forward(hidden_states (B, T, C), mask_time_indices=None) -> (codevectors (B, T,
    codevector_dim), perplexity)``. Perplexity as HF (``xlogy``, over the masked frames): in
    training of the noiseless softmax, in eval of the argmax histogram. An HF checkpoint loads
    with ``load_state_dict`` and gives identical eval outputs.

    Differs on purpose: exact codewords as forward values in training (HF's
    ``hard - soft.detach() + soft`` is off by an ulp); no selected frame gives perplexity G, not
    NaN; the noise is sslfast's Philox stream. HF's module leaves its parameters to the model's
    ``_init_weights`` (weight N(0, 1), zero bias, codevectors U[0, 1)); this one applies that
    initialisation itself (:meth:`reset_parameters`).
    """

    def __init__(self, config, *, backend: Optional[str] = None):
        super().__init__()
        self.num_groups = config.num_codevector_groups
        self.num_vars = config.num_codevectors_per_group
        if config.codevector_dim % self.num_groups != 0:
            raise ValueError(f"`config.codevector_dim {config.codevector_dim} must be divisible by "
                             f"`config.num_codevector_groups` {self.num_groups} for concatenation")
        self.codevectors = nn.Parameter(
            torch.empty(1, self.num_groups * self.num_vars, config.codevector_dim // self.num_groups))
        self.weight_proj = nn.Linear(config.conv_dim[-1], self.num_groups * self.num_vars)
        self.temperature = 2
        self.backend = backend
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        nn.init.uniform_(self.codevectors)

    def forward(self, hidden_states, mask_time_indices=None, *, seed: int | torch.Tensor | None = None):
        return hf_quantizer_forward(self, hidden_states, mask_time_indices, seed=seed, backend=self.backend)


def hf_quantizer_forward(module, hidden_states, mask_time_indices=None, *, seed: int | torch.Tensor | None = None,
                         backend: Optional[str] = None):
    """The forward of Hugging Face's Gumbel quantizer, fused, for any module with its attributes.

    ``module`` has ``weight_proj``, ``codevectors`` (1, G*V, d), ``num_groups``, ``temperature``
    and ``training``: this class, or transformers' own ``Wav2Vec2GumbelVectorQuantizer`` /
    ``Wav2Vec2ConformerGumbelVectorQuantizer`` instance (``sslfast.integrations.transformers``
    binds it as their forward). Returns ``(codevectors (B, T, G*d), perplexity)`` as HF does.
    """
    batch_size, sequence_length, _ = hidden_states.shape
    logits = module.weight_proj(hidden_states).reshape(batch_size * sequence_length, -1)
    mask = None if mask_time_indices is None else mask_time_indices.bool()
    out = gumbel_vector_quantize(logits, module.codevectors, groups=module.num_groups,
                                 tau=float(module.temperature), hard=True, training=module.training, seed=seed,
                                 mask=mask, perplexity_eps=0.0, backend=backend)
    perplexity = out.prob_perplexity if module.training else out.code_perplexity
    return out.quantized.view(batch_size, sequence_length, -1), perplexity
