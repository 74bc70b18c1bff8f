"""Public ``sample_negatives``: validation, backends, the ``sslfast::sample_negatives`` custom op."""
from __future__ import annotations

import torch

from .. import _dispatch, _ext, _validation as V
from .. import random as sr
from ..reference import negatives as ref

__all__ = ["sample_negatives"]

_OP = "sample_negatives"

def _num_masked(mask: torch.Tensor, num_masked: int) -> int:
    # The only host sync of the packed layout on a GPU: the output's row count. Callers that
    # know it (fairseq's require_same_masks gives B * masked-per-row) pass num_masked.
    return int(mask.sum()) if num_masked < 0 else num_masked


@_dispatch.register(_OP, "reference")
def _reference(mask, padding_mask, K, Kc, from_masked_only, layout, seed, num_masked=-1):
    return ref.sample_negatives(mask, K, Kc, padding_mask, from_masked_only, layout, seed)


@_dispatch.register(_OP, "cpu")
def _cpu(mask, padding_mask, K, Kc, from_masked_only, layout, seed, num_masked=-1):
    B, T = mask.shape
    width = K + Kc
    if layout == "hf":
        out = torch.empty(B, T, width, dtype=torch.int64)
    else:
        out = torch.empty(int(mask.sum()), width, dtype=torch.int64)  # num_masked: a GPU-only hint
    _ext.cpu_module().sample_negatives(
        _ext.ptr(mask), _ext.ptr(padding_mask), B, T, K, Kc, int(from_masked_only), int(layout == "hf"),
        sr.seed_value(seed), _ext.ptr(out),
    )
    return out


def _output(mask, K, Kc, layout, num_masked):
    """The output tensor on mask's device and its row bound for the kernels."""
    B, T = mask.shape
    if layout == "hf":
        return torch.empty(B, T, K + Kc, dtype=torch.int64, device=mask.device), B * T
    if num_masked < 0:
        n = int(mask.sum())
        return torch.empty(n, K + Kc, dtype=torch.int64, device=mask.device), n
    # A trusted count: rows it has beyond mask.sum() stay -1, rows it lacks are not written.
    return torch.full((num_masked, K + Kc), -1, dtype=torch.int64, device=mask.device), num_masked


@_dispatch.register(_OP, "cuda")
def _cuda(mask, padding_mask, K, Kc, from_masked_only, layout, seed, num_masked=-1):
    # One launch and no workspace for the packed layout, and for the hf layout without
    # cross-sample negatives up to the device's row limit (the row's table in shared memory);
    # two launches and workspaces for the rest of the hf layout (csrc/negatives_cuda.cu says
    # why). The device guard of _dispatch makes mask's device the one the limit is read on.
    B, T = mask.shape
    mod = _ext.cuda_module()
    out, n_rows = _output(mask, K, Kc, layout, num_masked)
    ws32 = ws64 = None
    if layout == "hf" and (Kc > 0 or T > mod.negatives_hf_one_pass_max_t()):
        ws32 = torch.empty(3 * B * T, dtype=torch.int32, device=mask.device)
        ws64 = torch.empty(4 * B + 1, dtype=torch.int64, device=mask.device)
    mod.sample_negatives(
        _ext.ptr(mask), _ext.ptr(padding_mask), B, T, K, Kc, int(from_masked_only), int(layout == "hf"),
        *sr.seed_args(seed), _ext.ptr(ws32), _ext.ptr(ws64), n_rows, _ext.ptr(out), _ext.stream(mask.device),
    )
    return out


@_dispatch.register(_OP, "triton")
def _triton(mask, padding_mask, K, Kc, from_masked_only, layout, seed, num_masked=-1):
    # One launch for the packed layout and for the hf layout without cross-sample negatives;
    # two for the hf layout with them (kernels/negatives.py says why).
    from ..kernels import negatives as kn

    out, n_rows = _output(mask, K, Kc, layout, num_masked)
    kn.sample_negatives(mask, padding_mask, K, Kc, from_masked_only, layout == "hf", sr.seed_tensor(seed, mask.device),
                        n_rows, out)
    return out


@torch.library.custom_op("sslfast::sample_negatives", mutates_args=())
def _sample_negatives_op(
    mask: torch.Tensor,
    padding_mask: torch.Tensor | None,
    num_negatives: int,
    cross_sample_negatives: int,
    from_masked_only: bool,
    layout: str,
    seed: int,
    seed_t: torch.Tensor | None,
    num_masked: int,
    backend: str,
) -> torch.Tensor:
    return _dispatch.get(_OP, backend)(
        mask, padding_mask, num_negatives, cross_sample_negatives, from_masked_only, layout,
        sr.join_seed(seed, seed_t), num_masked,
    )


@_sample_negatives_op.register_fake
def _(mask, padding_mask, num_negatives, cross_sample_negatives, from_masked_only, layout, seed, seed_t, num_masked,
      backend):
    width = num_negatives + cross_sample_negatives
    if layout == "hf":
        return mask.new_empty(mask.shape[0], mask.shape[1], width, dtype=torch.int64)
    n = num_masked if num_masked >= 0 else torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty(n, width, dtype=torch.int64)


def sample_negatives(
    mask: torch.Tensor,
    num_negatives: int = 100,
    *,
    cross_sample_negatives: int = 0,
    padding_mask: torch.Tensor | None = None,
    from_masked_only: bool = True,
    layout: str = "packed",
    seed: int | torch.Tensor | None = None,
    num_masked: int | None = None,
    backend: str | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of negative frames for every masked frame of ``mask`` (B, T), drawn on the device.

    Within-utterance negatives (``num_negatives`` = K) are uniform over the row's other
    candidate frames, with replacement, never the positive; cross-sample negatives
    (``cross_sample_negatives`` = Kc) are uniform over all candidates of the batch except the
    positive. Candidates are the masked frames (``from_masked_only=True``, as fairseq and Hugging
    Face do) or all frames that are not padding (``padding_mask`` (B, T), True at padding).

    Args:
        mask: (B, T) bool (or 0/1 integers; other values raise ValueError), True at masked
            frames (the positives).
        num_negatives, cross_sample_negatives: K and Kc, ints >= 0. K may exceed the number of
            candidates (duplicates, as in fairseq).
        layout: ``"packed"``: (N, K + Kc) int64 with N = mask.sum(), rows in row-major order of
            the mask, values indexing the packed candidate frames ``y[cand]`` (``y[mask]`` when
            from_masked_only). ``"hf"``: (B, T, K + Kc) int64 indexing the flattened (B*T)
            frames, Hugging Face's ``sampled_negative_indices`` format, -1 at unmasked frames.
        seed: the Philox key of the draws. An int in [0, 2**63 - 1]; or a 0-d (or one-element)
            int64 tensor on mask's device, read by the kernels when they run, never on the host
            (no sync, no graph break under ``torch.compile``; a captured CUDA graph replays with
            the value the tensor holds at replay; its 64 bits are the key, so negative values are
            allowed; ``seed=s`` and ``seed=torch.tensor(s)`` draw the same negatives); or None
            (default): a key drawn with ``torch.randint`` from torch's default generator of mask's
            device, on the device (no sync; ``torch.manual_seed`` makes it repeatable; fresh at
            every replay of a captured CUDA graph). DDP: ranks given one seed draw the same
            negatives (fairseq reseeds every rank alike); pass
            ``sslfast.derive_seed(base, rank=rank, step=step)`` (rank and step may be 0-d int64
            device tensors: advance ``step`` inside a captured graph for a fresh stream per
            replay). Raises TypeError for a seed that is not an int, an int64 tensor or None,
            ValueError for an int outside [0, 2**63 - 1], a tensor of more than one element or
            one on another device than mask.
        padding_mask: (B, T) bool, True at padding (fairseq); a non-bool one raises TypeError.
        attention_mask: (B, T) bool or 0/1 integers, 1 at valid frames (Hugging Face's),
            instead of padding_mask.
        num_masked: optional ``mask.sum()`` for the packed layout. On a GPU the output's row
            count must be known on the host: pass it to avoid the one host sync (and to
            capture the call in a CUDA graph); it is trusted, not checked.
        backend: None, "reference", "cpu", "triton" or "cuda".

    On a GPU (triton and cuda backends) the packed layout is one kernel launch, with no
    workspace: each program derives its output rows and candidate offsets from the masks
    itself. The hf layout is one launch without cross-sample negatives for rows of up to
    4096 frames (triton) or as long as the row's candidate table (4 bytes a frame) fits the
    device's shared memory (cuda: 40952 frames on A100, 57336 on H100),
    and two launches otherwise (a scan, then the draws: a cross-sample draw maps through
    another row's table). None of them syncs with the host once the output's size is known
    (``num_masked`` above).

    Differences on purpose: fairseq's cross-sample negatives do not exclude the positive for
    rows b > 0; ours always do. A row (or batch) with a single candidate returns the
    positive's own index for those negatives (HF raises; wav2vec 2.0's loss masks negatives
    equal to the positive). Unmasked positions of the hf layout hold -1, not a dummy 0.
    All backends return the same bits for one seed (see sslfast/reference/negatives.py).
    """
    V.check_tensor("mask", mask, ndim=2)
    mask = V.as_bool_mask("mask", mask)
    B, T = mask.shape
    padding_mask = V.padding_from_masks(padding_mask, attention_mask, (B, T))
    device = V.check_same_device(mask=mask, padding_mask=padding_mask)
    K = V.check_int("num_negatives", num_negatives, min_value=0)
    Kc = V.check_int("cross_sample_negatives", cross_sample_negatives, min_value=0)
    V.check_choice("layout", layout, ("packed", "hf"))
    if not isinstance(from_masked_only, bool):
        raise TypeError(f"from_masked_only must be a bool, got {type(from_masked_only).__name__}")
    if B * T >= 2**31:
        raise ValueError(f"mask must have fewer than 2**31 frames (ranks are 32-bit), got shape {(B, T)}")
    if T * ((max(K, Kc) + 3) // 4) >= 2**32:
        raise ValueError(
            f"T * ceil(max(num_negatives, cross_sample_negatives) / 4) must be < 2**32 (Philox counter), "
            f"got T={T}, num_negatives={K}, cross_sample_negatives={Kc}"
        )
    if num_masked is None or layout == "hf":
        n = -1
    else:
        n = V.check_int("num_masked", num_masked, min_value=0)
    seed = sr.resolve_seed(seed, device=device)
    name, _ = _dispatch.resolve(_OP, backend, device)
    if name == "reference":
        return _reference(mask, padding_mask, K, Kc, from_masked_only, layout, seed)
    if torch.compiler.is_compiling():
        return torch.ops.sslfast.sample_negatives(mask, padding_mask, K, Kc, from_masked_only, layout,
                                                  *sr.split_seed(seed), n, name)
    args = (mask, padding_mask, K, Kc, from_masked_only, layout, seed, n)
    # Eager calls skip the custom-op dispatch (~0.1 ms on a CPU, no autograd to route);
    # traced calls go through the op above.
    return _dispatch.get(_OP, name)(*args)
