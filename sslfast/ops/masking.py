"""Public ``compute_mask_indices``: validation, backends, custom ops."""
from __future__ import annotations

import functools
import warnings

import torch

from .. import _dispatch, _ext, _validation as V
from .. import random as sr
from ..reference import masking as ref

__all__ = ["compute_mask_indices"]

_OP = "compute_mask_indices"
_MASK_TYPES = ("static", "uniform", "normal", "poisson")


@functools.lru_cache(maxsize=64)
def _table(mask_type: str, mask_length: int, mask_other: float) -> tuple[int, tuple[int, ...]]:
    vmin, thr = ref.length_table(mask_type, mask_length, mask_other)
    return vmin, tuple(thr)


_max_spans = ref.max_spans  # an upper bound of any row's span count, known on the host


@_dispatch.register(_OP, "reference")
def _reference(lengths, padding_mask, B, T, mask_prob, mask_length, mask_type, mask_other, min_masks,
               require_same_masks, mask_dropout, style, seed, no_overlap=False, min_space=0):
    return ref.compute_mask_indices(B, T, lengths, mask_prob, mask_length, mask_type, mask_other, min_masks,
                                    require_same_masks, mask_dropout, style, seed, padding_mask, no_overlap, min_space)


@_dispatch.register(_OP, "cpu")
def _cpu(lengths, padding_mask, B, T, mask_prob, mask_length, mask_type, mask_other, min_masks,
         require_same_masks, mask_dropout, style, seed, no_overlap=False, min_space=0):
    out = torch.empty(B, T, dtype=torch.bool)
    vmin, thr = _table(mask_type, mask_length, mask_other)
    thr_t = torch.tensor(thr, dtype=torch.int64) if thr else None
    _ext.cpu_module().compute_mask_indices(
        _ext.ptr(lengths), _ext.ptr(padding_mask), B, T, float(mask_prob), mask_length, vmin, _ext.ptr(thr_t),
        len(thr), min_masks, int(require_same_masks), float(mask_dropout), int(style == "hf"), sr.seed_value(seed),
        int(no_overlap), min_space, _ext.ptr(out),
    )
    return out


_DEVICE_TABLES: dict = {}


def _device_table(mask_type, mask_length, mask_other, device):
    """The thresholds on ``device``, copied once per (table, device): later calls never
    touch the host (the copy would synchronise, and break CUDA-graph capture)."""
    key = (mask_type, mask_length, mask_other, str(device))
    if key not in _DEVICE_TABLES:
        vmin, thr = _table(mask_type, mask_length, mask_other)
        _DEVICE_TABLES[key] = (vmin, len(thr), torch.tensor(list(thr) or [0], dtype=torch.int64, device=device))
    return _DEVICE_TABLES[key]


def _workspace(lengths, B, T, mask_prob, mask_length, min_masks):
    n_cap = max(_max_spans(T, mask_prob, mask_length, min_masks), 1)
    r_cap = max(T, 2 * (n_cap + 1))  # start keys, or no_overlap's two interval arrays
    dev = lengths.device
    return (n_cap, r_cap, torch.empty(B * n_cap, dtype=torch.int64, device=dev),
            torch.empty(B * r_cap, dtype=torch.int64, device=dev), torch.empty(B, dtype=torch.int64, device=dev))


@_dispatch.register(_OP, "cuda")
def _cuda(lengths, padding_mask, B, T, mask_prob, mask_length, mask_type, mask_other, min_masks,
          require_same_masks, mask_dropout, style, seed, no_overlap=False, min_space=0):
    out = torch.empty(B, T, dtype=torch.bool, device=lengths.device)
    vmin, n_thr, thr = _device_table(mask_type, mask_length, mask_other, lengths.device)
    n_cap, r_cap, lens_ws, keys_ws, counts = _workspace(lengths, B, T, mask_prob, mask_length, min_masks)
    _ext.cuda_module().compute_mask_indices(
        _ext.ptr(lengths), _ext.ptr(padding_mask), B, T, float(mask_prob), mask_length, vmin, _ext.ptr(thr), n_thr,
        min_masks, int(require_same_masks), float(mask_dropout), int(style == "hf"), *sr.seed_args(seed),
        int(no_overlap), min_space, n_cap, r_cap,
        _ext.ptr(lens_ws), _ext.ptr(keys_ws), _ext.ptr(counts), _ext.ptr(out), _ext.stream(lengths.device),
    )
    return out


@_dispatch.register(_OP, "triton")
def _triton(lengths, padding_mask, B, T, mask_prob, mask_length, mask_type, mask_other, min_masks,
            require_same_masks, mask_dropout, style, seed, no_overlap=False, min_space=0):
    from ..kernels import masking as km

    out = torch.empty(B, T, dtype=torch.bool, device=lengths.device)
    vmin, n_thr, thr = _device_table(mask_type, mask_length, mask_other, lengths.device)
    n_cap = max(_max_spans(T, mask_prob, mask_length, min_masks), 1)
    r_cap = max(T, n_cap + 1)
    seed_t = sr.seed_tensor(seed, lengths.device)  # the kernels load the key from it
    return km.compute_mask_indices(lengths, padding_mask, B, T, mask_prob, mask_length, vmin, thr, n_thr, min_masks,
                                   require_same_masks, mask_dropout, style == "hf", seed_t, n_cap, r_cap, out,
                                   no_overlap, min_space)


@torch.library.custom_op("sslfast::compute_mask_indices", mutates_args=())
def _mask_op(
    lengths: torch.Tensor,
    padding_mask: torch.Tensor | None,
    B: int,
    T: int,
    mask_prob: float,
    mask_length: int,
    mask_type: str,
    mask_other: float,
    min_masks: int,
    require_same_masks: bool,
    mask_dropout: float,
    style: str,
    seed: int,
    seed_t: torch.Tensor | None,
    no_overlap: bool,
    min_space: int,
    backend: str,
) -> torch.Tensor:
    # seed / seed_t: sslfast.random.split_seed (an int, or a seed tensor read when the kernel runs)
    return _dispatch.get(_OP, backend)(lengths, padding_mask, B, T, mask_prob, mask_length, mask_type, mask_other,
                                       min_masks, require_same_masks, mask_dropout, style,
                                       sr.join_seed(seed, seed_t), no_overlap, min_space)


@_mask_op.register_fake
def _(lengths, padding_mask, B, T, *args):
    return lengths.new_empty(B, T, dtype=torch.bool)


def _warn_all_padded(lengths: torch.Tensor) -> None:
    """fairseq's require_same_masks cuts every row to the smallest masked count, so one
    all-padded utterance unmasks the whole batch (a loss of 0). Warn where the check is free
    (CPU lengths; on a device it would cost a host sync)."""
    if lengths.numel() < 2 or not V.host_values_checkable(lengths):
        return
    empty = lengths == 0
    if bool(empty.any()) and not bool(empty.all()):
        rows = empty.nonzero().reshape(-1)[:8].tolist()
        warnings.warn(
            f"compute_mask_indices: utterance(s) {rows} of the batch are all padding, and require_same_masks=True "
            "(fairseq's default) cuts every row to the smallest masked count, so no frame of the batch is masked. "
            "Drop empty utterances, or pass require_same_masks=False.", UserWarning, stacklevel=3)


def compute_mask_indices(
    shape,
    padding_mask: torch.Tensor | None = None,
    mask_prob: float = 0.65,
    mask_length: int = 10,
    *,
    mask_type: str = "static",
    mask_other: float = 0.0,
    min_masks: int = 0,
    no_overlap: bool = False,
    min_space: int = 0,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    style: str = "fairseq",
    seed: int | torch.Tensor | None = None,
    device=None,
    backend: str | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A (B, T) bool mask of random time spans, drawn on ``device`` in one pass per row.

    ``style="fairseq"`` follows fairseq's ``compute_mask_indices``: per-row span count
    ``floor(mask_prob * sz / mask_length + u)`` (u uniform, per row), at least ``min_masks``
    (wav2vec 2.0 passes 2); span lengths by ``mask_type`` (static, uniform over
    [mask_other, 2L], normal max(1, round(N(L, mask_other))), poisson); starts in
    [0, sz - min_len) so static spans never cover a row's last frame; overlapping spans merge;
    ``require_same_masks`` cuts every row to the smallest masked count by random choice;
    ``mask_dropout`` unmasks ``rint(count * mask_dropout)`` random masked frames per row.
    Expected masked fraction at p=0.65, L=10, T=781: about 0.49 before equalisation.
    ``style="hf"`` follows Hugging Face's ``_compute_mask_indices``: one rounding noise per
    batch, spans of ``mask_length`` starting in [0, len - L] (a span may end on the last
    valid frame), counts capped at ``T // L`` and ``len - L + 1``; static spans only, no
    equalisation (``require_same_masks`` is ignored), no dropout.

    Args:
        shape: (B, T).
        padding_mask: (B, T) bool, True at padding (fairseq's convention); any other dtype
            raises TypeError (an integer mask is most likely Hugging Face's attention_mask,
            whose meaning is the opposite). Or pass ``attention_mask`` (B, T) bool or 0/1
            integers, 1 at valid frames (Hugging Face's), not both; other integer values raise
            ValueError. Rows are assumed right-padded (as both do); padded frames are never
            masked.
        mask_prob: in [0, 1]. mask_length: int >= 1. min_masks: int >= 0.
        mask_other: std of the normal lengths, low end of the uniform ones.
        no_overlap, min_space: fairseq's non-overlapping placement (spans longest first into
            free intervals, at least min_space frames apart, the corrected keep condition);
            sequential over a row's spans (one program per row on cuda and triton).
        seed: the Philox key: an int in [0, 2^63 - 1]; or a 0-d (or one-element) int64 tensor on
            ``device``, read by the kernels when they run, never on the host (no sync, no graph
            break under torch.compile; a captured CUDA graph replays with the tensor's value at
            replay), giving the same mask as the int of the same 64 bits (a negative value is
            its two's-complement pattern); or None (default): a key drawn by ``torch.randint``
            from torch's default generator of ``device`` as a device tensor (no sync, repeatable
            under ``torch.manual_seed``, fresh at each CUDA-graph replay). DDP: ranks given one
            int seed draw identical masks; pass ``sslfast.derive_seed(base, rank=rank,
            step=step)`` (rank and step may be device tensors: a step tensor advanced inside a
            captured graph gives each replay its own stream). Raises TypeError for a non-int64
            tensor or a non-int seed, ValueError for an int out of range, a tensor of several
            elements or on another device.
        device: where the mask is made (default: padding_mask's device, else CPU).
        backend: None, "reference", "cpu", "triton" or "cuda".

    Differences on purpose: the random streams are Philox keyed by (seed, row, position), not
    numpy's, so the masks match fairseq and HF in distribution, not bit for bit (the
    algorithm and its integer decisions are theirs; see sslfast/reference/masking.py for
    how each random choice is drawn). Every backend returns the same bits for one seed.
    Hugging Face raises when mask_length > T; here such rows simply get no span. Hugging
    Face masks frame T - 1 of a row that gets no span (its dummy index), even when that frame
    is padding; we never mask padding.
    Edge cases: a row shorter than a span is masked only within its valid frames (fairseq)
    or not at all (hf); an all-padded row is never masked (and, with require_same_masks,
    takes every row's count to 0, as in fairseq, with a UserWarning when the lengths are on
    the CPU); mask_prob 0 masks nothing unless
    min_masks > 0; B = 0 or T = 0 gives an empty mask.
    """
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be a (B, T) tuple, got {shape!r}")
    B = V.check_int("shape[0]", shape[0], min_value=0)
    T = V.check_int("shape[1]", shape[1], min_value=0)
    padding_mask = V.padding_from_masks(padding_mask, attention_mask, (B, T))
    if device is None:
        device = padding_mask.device if padding_mask is not None else torch.device("cpu")
    device = torch.device(device)
    if padding_mask is not None and padding_mask.device != device:
        raise ValueError(f"padding_mask is on {padding_mask.device} but device={device}")
    mask_prob = V.check_prob("mask_prob", mask_prob)
    L = V.check_int("mask_length", mask_length, min_value=1)
    min_masks = V.check_int("min_masks", min_masks, min_value=0)
    V.check_choice("mask_type", mask_type, _MASK_TYPES)
    V.check_choice("style", style, ("fairseq", "hf"))
    mask_dropout = V.check_prob("mask_dropout", mask_dropout)
    min_space = V.check_int("min_space", min_space, min_value=0)
    mask_other = float(mask_other)
    if not mask_other >= 0.0 or mask_other == float("inf"):
        raise ValueError(f"mask_other must be a finite number >= 0, got {mask_other}")
    if mask_type == "uniform" and (mask_other != int(mask_other) or mask_other > 2 * L):
        raise ValueError(f"mask_other must be an integer in [0, 2 * mask_length] for mask_type='uniform', got {mask_other}")
    for flag, value in (("no_overlap", no_overlap), ("require_same_masks", require_same_masks)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    if style == "hf":
        if mask_type != "static":
            raise ValueError(f"style='hf' supports mask_type='static' only, got mask_type={mask_type!r}")
        if mask_dropout:
            raise ValueError(f"style='hf' has no mask_dropout, got mask_dropout={mask_dropout}")
        if no_overlap:
            raise ValueError("style='hf' has no no_overlap placement; use style='fairseq'")
    if T >= 2**31 or _max_spans(T, mask_prob, L, min_masks) >= 2**31:
        raise ValueError(f"shape[1] and the span count must be < 2**31, got T={T}, min_masks={min_masks}")
    seed = sr.resolve_seed(seed, device=device)
    if padding_mask is not None:
        lengths = (T - padding_mask.sum(1)).contiguous()
        if require_same_masks and style == "fairseq" and (mask_prob > 0 or min_masks > 0):
            _warn_all_padded(lengths)
    else:
        lengths = torch.full((B,), T, dtype=torch.int64, device=device)
    args = (lengths, padding_mask, B, T, mask_prob, L, mask_type, mask_other, min_masks, require_same_masks,
            mask_dropout, style, seed, no_overlap, min_space)
    name, _ = _dispatch.resolve(_OP, backend, device)
    if name == "reference":
        return _reference(*args)
    if torch.compiler.is_compiling():
        return torch.ops.sslfast.compute_mask_indices(*args[:12], *sr.split_seed(seed), *args[13:], name)
    # Eager calls skip the custom-op dispatch: on a CPU it costs about as much as the kernel
    # (~0.1 ms) and this op has no autograd to route; traced calls go through the op above.
    return _dispatch.get(_OP, name)(*args)
