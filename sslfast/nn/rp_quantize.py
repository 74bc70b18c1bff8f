"""``RandomProjectionQuantizer``: BEST-RQ's frozen random projection and codebooks, as one
module with the options of NeMo, SpeechBrain and lucidrains (shared/docs/semantics.md, 5).

The module holds two frozen buffers, ``projection`` (F*stack, H*d) and ``codebooks``
(H, V, d), and its forward is ``sslfast.random_projection_quantize`` (one fused pass; no
(B, V, T, d) or (N, V) tensor). The peers' layouts map onto them as follows, and
``load_state_dict`` accepts each peer's keys (a pre-hook converts them):

* NeMo ``RandomProjectionVectorQuantizer(feat_in, code_dim, num_classes, num_books,
  dist_fn, time_ahead, freeze, squeeze_single, combine_time_steps)`` -> ``nemo(...)``:
  ``proj.weight`` (H*d, F*k) is ``projection.T``; ``codebooks`` (H, V, d) unit rows (NeMo keeps
  them in fp64; here fp32, so labels can differ from an fp64 lookup only at fp32 near-ties).
  Input (B, F, T) channels-first unless ``time_ahead=True`` ((B, T, F)); frames stacked
  frame-major by ``combine_time_steps``; ``layer_norm=True`` is the newer LayerNorm variant,
  ``init`` picks Xavier normal (older) or uniform (newer). ``squeeze_single`` drops the head
  axis when H = 1. Only the labels are returned (NeMo's forward also returns the projected
  features). NeMo's loss masks a stacked frame when more than 0.8 of its frames are masked:
  ``stacked_mask`` computes that mask.
* SpeechBrain ``RandomProjectionQuantizer(input_dim, cb_dim, cb_vocab)`` -> ``speechbrain(...)``:
  buffers ``P`` (input_dim, cb_dim) = ``projection`` and ``CB`` (V, d) = ``codebooks[0]``;
  labels argmin_v |CB_v - normalize(x @ P)| (= cosine argmax), computed without its
  (B, V, T, d) broadcast. Its input is already stacked (stack=1).
* lucidrains ``RandomProjectionQuantizer(dim, codebook_size, codebook_dim, num_codebooks,
  norm)`` -> ``lucidrains(...)``: LayerNorm without affine when ``norm``, ``rand_projs``
  (H, dim, d) = ``projection`` viewed as (dim, H, d) and permuted; cosine argmax against
  unit-normalised codebooks.

Labels are computed with no gradient (integers); buffers move with ``.to()`` and are saved in
the state_dict; nothing here is a Parameter, so optimisers never see it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.masked_prediction import GumbelRPQTargets
from ..ops.rp_quantize import INPUT_NORMS, METRICS, random_projection_quantize
from ..reference.rp_quantize import projected_features

__all__ = ["RandomProjectionQuantizer"]

_INITS = ("xavier_normal", "xavier_uniform")


def _xavier(fan_in: int, fan_out: int, shape, init: str, generator) -> torch.Tensor:
    if init == "xavier_normal":
        std = math.sqrt(2.0 / (fan_in + fan_out))
        return torch.randn(shape, generator=generator) * std
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ label generator with frozen random projection and codebooks.

    Args:
        input_dim: features per frame F (before stacking).
        codebook_dim: d, the projected width of each head.
        codebook_size: V codewords per head.
        num_codebooks: H heads (independent projections and codebooks).
        stack: frames stacked frame-major into one vector (T % stack trailing frames dropped).
        input_norm: None or "layernorm" (no affine, eps 1e-5) on the stacked vector.
        metric: "cosine" (argmax normalised dot) or "l2" (argmin raw squared distance).
        init: "xavier_normal" or "xavier_uniform" for the projection (fan_in F*stack, fan_out H*d).
        channels_first: inputs are (B, F, T) instead of (B, T, F).
        squeeze_single: return (B, T') instead of (B, T', 1) when H = 1.
        seed: seed of the buffers' initialisation (None: torch's global generator).
        backend: sslfast backend for forward (None: the fastest available).

    forward(x, mask=None) -> LongTensor (B, T // stack, H): mask is per stacked frame (bool,
    (B, T // stack)); unmasked positions get -1 and cost nothing.
    """

    def __init__(
        self,
        input_dim: int,
        codebook_dim: int = 16,
        codebook_size: int = 8192,
        num_codebooks: int = 1,
        *,
        stack: int = 1,
        input_norm: str | None = None,
        metric: str = "cosine",
        init: str = "xavier_normal",
        channels_first: bool = False,
        squeeze_single: bool = False,
        seed: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("codebook_dim", codebook_dim),
                            ("codebook_size", codebook_size), ("num_codebooks", num_codebooks), ("stack", stack)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.input_dim, self.codebook_dim, self.codebook_size = input_dim, codebook_dim, codebook_size
        self.num_codebooks, self.stack = num_codebooks, stack
        self.input_norm, self.metric, self.init = input_norm, metric, init
        self.channels_first, self.squeeze_single, self.backend = channels_first, squeeze_single, backend
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
        fan_in, fan_out = input_dim * stack, num_codebooks * codebook_dim
        self.register_buffer("projection", _xavier(fan_in, fan_out, (fan_in, fan_out), init, gen))
        codebooks = torch.randn(num_codebooks, codebook_size, codebook_dim, generator=gen)
        self.register_buffer("codebooks", F.normalize(codebooks, dim=-1))
        self._peer = None
        self._register_load_state_dict_pre_hook(self._convert_peer_state)

    # ------------------------------------------------------------------ factories

    @classmethod
    def nemo(
        cls,
        feat_in: int,
        code_dim: int,
        num_classes: int,
        num_books: int,
        dist_fn: str = "cosine",
        time_ahead: bool = False,
        freeze: bool = True,
        squeeze_single: bool = False,
        combine_time_steps: int = 1,
        *,
        layer_norm: bool = False,
        init: str = "xavier_normal",
        seed: int | None = None,
        backend: str | None = None,
    ) -> "RandomProjectionQuantizer":
        """NeMo's RandomProjectionVectorQuantizer options; accepts its state_dict
        (``proj.weight``, ``codebooks``). ``freeze=False`` is refused: BEST-RQ's projection and
        codebooks are never trained, and these buffers have no gradient."""
        if not freeze:
            raise ValueError("freeze=False is not supported: the projection and codebooks are frozen buffers")
        m = cls(feat_in, code_dim, num_classes, num_books, stack=combine_time_steps,
                input_norm="layernorm" if layer_norm else None, metric=dist_fn, init=init,
                channels_first=not time_ahead, squeeze_single=squeeze_single, seed=seed, backend=backend)
        m._peer = "nemo"
        return m

    @classmethod
    def speechbrain(cls, input_dim: int, cb_dim: int, cb_vocab: int, *, seed: int | None = None,
                    backend: str | None = None) -> "RandomProjectionQuantizer":
        """SpeechBrain's RandomProjectionQuantizer (Xavier-uniform P, unit CB, cosine);
        accepts its state_dict (``P``, ``CB``); forward returns (B, T) like SpeechBrain's."""
        m = cls(input_dim, cb_dim, cb_vocab, 1, init="xavier_uniform", squeeze_single=True, seed=seed,
                backend=backend)
        m._peer = "speechbrain"
        return m

    @classmethod
    def lucidrains(cls, dim: int, codebook_size: int, codebook_dim: int, num_codebooks: int = 1, norm: bool = True,
                   *, seed: int | None = None, backend: str | None = None) -> "RandomProjectionQuantizer":
        """lucidrains' RandomProjectionQuantizer (LayerNorm when ``norm``, per-head Xavier-normal
        projections, cosine); accepts ``rand_projs`` (H, dim, d) and a (H, V, d) codebook under
        ``codebooks``."""
        m = cls(dim, codebook_dim, codebook_size, num_codebooks, input_norm="layernorm" if norm else None,
                seed=seed, backend=backend)
        m._peer = "lucidrains"
        return m

    # ------------------------------------------------------------- peer state dicts

    def _convert_peer_state(self, state_dict, prefix, *args, **kwargs):
        H, d = self.num_codebooks, self.codebook_dim
        if prefix + "proj.weight" in state_dict:  # NeMo: Linear weight (H*d, F*k)
            state_dict[prefix + "projection"] = state_dict.pop(prefix + "proj.weight").t()
        if prefix + "P" in state_dict:  # SpeechBrain: (F, d)
            state_dict[prefix + "projection"] = state_dict.pop(prefix + "P")
        if prefix + "CB" in state_dict:  # SpeechBrain: (V, d)
            state_dict[prefix + "codebooks"] = state_dict.pop(prefix + "CB").unsqueeze(0)
        if prefix + "rand_projs" in state_dict:  # lucidrains: (H, F, d)
            rp = state_dict.pop(prefix + "rand_projs")
            state_dict[prefix + "projection"] = rp.permute(1, 0, 2).reshape(rp.shape[1], H * d)

    def peer_state_dict(self) -> dict:
        """The buffers under the keys of the implementation this module was built for."""
        proj, cb = self.projection.detach(), self.codebooks.detach()
        if self._peer == "nemo":
            return {"proj.weight": proj.t().contiguous(), "codebooks": cb.clone()}
        if self._peer == "speechbrain":
            return {"P": proj.clone(), "CB": cb[0].clone()}
        if self._peer == "lucidrains":
            F_ = proj.shape[0]
            return {"rand_projs": proj.view(F_, self.num_codebooks, self.codebook_dim).permute(1, 0, 2).contiguous(),
                    "codebooks": cb.clone()}
        return {"projection": proj.clone(), "codebooks": cb.clone()}

    # ---------------------------------------------------------------------- forward

    @staticmethod
    def stacked_mask(frame_mask: torch.Tensor, stack: int, threshold: float = 0.8) -> torch.Tensor:
        """(B, T) frame mask -> (B, T // stack): a stacked frame counts as masked when more
        than ``threshold`` of its frames are (NeMo's rule; threshold 0 = any frame masked)."""
        if frame_mask.dim() != 2:
            raise ValueError(f"frame_mask must be (B, T), got shape {tuple(frame_mask.shape)}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        B, T = frame_mask.shape
        t = T // stack
        frac = frame_mask[:, : t * stack].reshape(B, t, stack).float().mean(-1)
        return frac > threshold

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_first:
            if x.dim() != 3:
                raise ValueError(f"x must be (B, F, T) (channels_first), got shape {tuple(x.shape)}")
            x = x.transpose(1, 2)
        labels = random_projection_quantize(
            x, self.projection, self.codebooks, stack=self.stack, input_norm=self.input_norm, metric=self.metric,
            mask=mask, backend=self.backend,
        )
        if self.squeeze_single and self.num_codebooks == 1:
            labels = labels.squeeze(-1)
        return labels

    def gumbel_targets(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, tau: float = 1.0,
                       seed: int | torch.Tensor | None = None, training: bool | None = None) -> GumbelRPQTargets:
        """BiRQ's enhanced labels from an intermediate representation, for
        ``masked_prediction_loss`` (``GumbelRPQTargets``: the Gumbel-softmax over this quantizer's
        cosine scores, made inside the loss and never stored).

        x: (B, T, F) (or (B, F, T) with ``channels_first``) or (N, F), any float dtype; gradients
        flow back to it through the projection (the buffers get none). mask: (B, T // stack) or
        (N,) bool, the frames to keep (e.g. the masked ones), or None for all. tau, seed: as in
        ``GumbelRPQTargets``; training: None follows ``self.training`` (eval: no noise).
        Returns ``GumbelRPQTargets`` with features (M, H, d), M the kept frames in row-major
        order (boolean indexing: a host sync on CUDA when a mask is given). Raises ValueError
        for the "l2" metric (BiRQ's scores are the cosine RPQ's).
        """
        if self.metric != "cosine":
            raise ValueError("gumbel_targets needs metric='cosine' (BiRQ's scores are the cosine RPQ's)")
        if self.channels_first:
            if x.dim() != 3:
                raise ValueError(f"x must be (B, F, T) (channels_first), got shape {tuple(x.shape)}")
            x = x.transpose(1, 2)
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_dim:
            raise ValueError(f"x must be (B, T, {self.input_dim}) or (N, {self.input_dim}), got {tuple(x.shape)}")
        y = projected_features(x, self.projection, self.num_codebooks, stack=self.stack, input_norm=self.input_norm)
        y = y.reshape(-1, self.num_codebooks, self.codebook_dim) if mask is None else y[mask]
        return GumbelRPQTargets(y, self.codebooks, tau=tau, seed=seed,
                                training=self.training if training is None else training)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, codebook_dim={self.codebook_dim}, codebook_size={self.codebook_size}, "
                f"num_codebooks={self.num_codebooks}, stack={self.stack}, input_norm={self.input_norm}, "
                f"metric={self.metric!r}" + (f", peer={self._peer!r}" if self._peer else ""))
