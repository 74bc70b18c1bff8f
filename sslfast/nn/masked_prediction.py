"""Masked-prediction heads as drop-in modules, with the parameter names and shapes of the
implementations they replace, so their state_dicts load as they are; the loss runs through
``sslfast.masked_prediction_loss`` (never the (N, H, V) logits).

* ``HubertPredictionHead``: fairseq ``HubertModel``'s ``final_proj`` (Linear(encoder_embed_dim,
  final_dim * H) with ``untie_final_proj``, else Linear(encoder_embed_dim, final_dim)) and
  ``label_embs_concat`` ((sum of the label sets' sizes, final_dim), uniform init); cosine
  logits over ``logit_temp``.
* ``MultiSoftmaxHead``: NeMo ``MultiSoftmaxDecoder`` (BEST-RQ / NEST): ``decoder_layers.0`` a
  Conv1d(feat_in, num_classes * num_decoders, kernel_size=1) whose output channel
  ``v * num_decoders + h`` is class v of head h (NeMo reshapes the channels to (C, H)); Xavier
  uniform init, bias 0. NeMo applies log_softmax in the decoder and NLL in ``MultiMLMLoss``;
  here the two are one fused loss.

Both take frame vectors (N, D) (gather the frames you train on first, e.g. ``x[mask]``, or
pass ``mask`` to weight masked / unmasked frames) and targets (N, H).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.masked_prediction import masked_prediction_loss

__all__ = ["HubertPredictionHead", "MultiSoftmaxHead"]


class HubertPredictionHead(nn.Module):
    """fairseq HuBERT's prediction head: ``final_proj`` then cosine similarity against
    ``label_embs_concat`` divided by ``logit_temp``.

    Args: encoder_embed_dim (E), final_dim (D), num_classes: one int per label set (all equal:
    the fused loss needs one V), untie_final_proj (one projection slice per label set),
    logit_temp (0.1), backend (passed to the op).

    ``forward(features (N, E), targets (N, H), **loss_kwargs)`` returns
    ``masked_prediction_loss(..., head="cosine")`` (kwargs: mask, pred_masked_weight,
    pred_nomask_weight, reduction, return_stats, ...). fairseq's criterion sums over label
    sets: multiply ``reduction="mean"`` by H to get its value.
    """

    def __init__(self, encoder_embed_dim: int, final_dim: int, num_classes, untie_final_proj: bool = False,
                 logit_temp: float = 0.1, backend=None):
        super().__init__()
        num_classes = [int(num_classes)] if isinstance(num_classes, int) else [int(c) for c in num_classes]
        if len(set(num_classes)) != 1:
            raise ValueError(f"num_classes must be equal across label sets for the fused loss, got {num_classes}")
        self.num_classes = num_classes
        self.final_dim = final_dim
        self.untie_final_proj = untie_final_proj
        self.logit_temp = logit_temp
        self.backend = backend
        heads = len(num_classes)
        self.final_proj = nn.Linear(encoder_embed_dim, final_dim * heads if untie_final_proj else final_dim)
        self.label_embs_concat = nn.Parameter(torch.empty(sum(num_classes), final_dim))
        nn.init.uniform_(self.label_embs_concat)

    def forward(self, features: torch.Tensor, targets: torch.Tensor, **loss_kwargs):
        heads = len(self.num_classes)
        proj = self.final_proj(features)
        if self.untie_final_proj:
            proj = proj.view(proj.shape[0], heads, self.final_dim)
        emb = self.label_embs_concat.view(heads, self.num_classes[0], self.final_dim)
        return masked_prediction_loss(proj, emb, targets, head="cosine", logit_temp=self.logit_temp,
                                      backend=loss_kwargs.pop("backend", self.backend), **loss_kwargs)


class MultiSoftmaxHead(nn.Module):
    """NeMo ``MultiSoftmaxDecoder`` + ``MultiMLMLoss`` in one: H linear heads D -> V.

    Args: feat_in (D), num_classes (V), num_decoders (H), use_bias (False, NeMo's current
    default), init_mode ("xavier_uniform" or "xavier_normal"), backend.

    ``forward(encoder_output (N, D), targets (N, H), **loss_kwargs)`` returns
    ``masked_prediction_loss(..., head="linear")``; with ``mask`` (and the default weights)
    ``reduction="mean"`` is NeMo's mean over masked frames averaged over heads.
    """

    def __init__(self, feat_in: int, num_classes: int, num_decoders: int = 1, use_bias: bool = False,
                 init_mode: str = "xavier_uniform", backend=None):
        super().__init__()
        self.feat_in, self.num_classes, self.num_decoders = feat_in, num_classes, num_decoders
        self.backend = backend
        self.decoder_layers = nn.Sequential(nn.Conv1d(feat_in, num_classes * num_decoders, kernel_size=1,
                                                      bias=use_bias))
        conv = self.decoder_layers[0]
        if init_mode == "xavier_uniform":
            nn.init.xavier_uniform_(conv.weight)
        elif init_mode == "xavier_normal":
            nn.init.xavier_normal_(conv.weight)
        else:
            raise ValueError(f"init_mode must be 'xavier_uniform' or 'xavier_normal', got {init_mode!r}")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)

    def head_weight(self) -> torch.Tensor:
        """(H, V, D) view of the Conv1d weight: channel v * H + h is class v of head h."""
        w = self.decoder_layers[0].weight[:, :, 0]
        return w.view(self.num_classes, self.num_decoders, self.feat_in).transpose(0, 1)

    def head_bias(self):
        b = self.decoder_layers[0].bias
        return None if b is None else b.view(self.num_classes, self.num_decoders).transpose(0, 1)

    def forward(self, encoder_output: torch.Tensor, targets: torch.Tensor, **loss_kwargs):
        return masked_prediction_loss(encoder_output, self.head_weight(), targets, head="linear",
                                      bias=self.head_bias(), backend=loss_kwargs.pop("backend", self.backend),
                                      **loss_kwargs)
