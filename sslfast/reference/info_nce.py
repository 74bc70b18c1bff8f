"""In-batch contrastive losses: InfoNCE (CLIP, MoCo) and NT-Xent (SimCLR), the specification.

This module builds the full logits matrix on purpose: it is the readable spec that the
tiled kernels (which never hold more than one tile of it) are tested against.

Conventions (see ../shared/docs/semantics.md, section 6):

* ``info_nce``: row i of ``query`` is scored against every row of ``key`` (and of ``queue``);
  its positive is ``key[i]``, every other key and every queue row is a negative.
  ``logits = <q_i, k_j> / temperature`` with ``q``, ``k`` (and the queue) L2-normalised
  first when ``normalize=True`` (``l2_normalize``: ``F.normalize`` made safe for huge and
  tiny norms, with gradient through the normalisation). Loss per row: ``logsumexp_j(logits_ij) - logits_ii`` (cross-entropy with
  target i). ``symmetric=True`` is CLIP's ``(CE(q->k) + CE(k->q)) / 2``; ``queue`` is MoCo's
  bank of extra negatives (detached: it never receives a gradient).
* ``distributed=True`` (CLIP's ``gather_with_grad`` + ``local_loss``): every rank gathers
  the (normalised) keys of all ranks, and for ``symmetric`` the queries, with gradient;
  each rank's loss is over its own rows only, the positive of local row i being global row
  ``rank * N + i``. Every rank must pass the same N. The gather's backward sums the
  gradients all ranks send to a tensor, so a rank's gradients equal ``world_size`` times
  the gradients of the single-process mean loss over the gathered batch: DDP's averaging
  of parameter gradients over ranks brings them back to the single-process values.
* ``nt_xent``: SimCLR. ``z = cat(z1, z2)`` (2N rows), logits ``<z_a, z_b> / temperature``
  with self-similarity excluded, the positive of row a is its other view ``(a + N) mod 2N``,
  the 2N - 2 others are negatives; mean over the 2N rows.

Differences on purpose: math is fp32 for fp16/bf16 inputs and the loss is fp32 for any
narrower input dtype (as autocast does for cross-entropy); ``reduction="mean"`` of an empty
batch is 0 (with a gradient graph), not NaN; ``temperature`` may be a scalar tensor and
then receives a gradient (pass ``1 / logit_scale.exp()`` for CLIP's learnable scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["info_nce", "nt_xent", "gather_with_grad", "l2_normalize", "reduce_rows"]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``cat`` of ``x`` from every torch.distributed rank, differentiable (rank order)."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    if dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm; a zero row stays zero.

    ``F.normalize`` squares the entries, so rows above about 1e19 (fp32) come back as zeros
    and rows below its eps are not unit. Dividing by the row's max |x| first (a constant to
    autograd: normalisation is scale-invariant, so the gradient is unchanged) makes every
    finite nonzero row come back unit.
    """
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.normalize(x / peak, dim=-1, eps=1e-12)


def _prepare(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    # fp32 math for fp32/fp16/bf16; fp64 stays fp64 (the tests' exact reference, gradcheck).
    x = x if x.dtype == torch.float64 else x.float()
    return l2_normalize(x) if normalize else x


def _row_losses(a: torch.Tensor, b: torch.Tensor, temperature, pos: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """Cross-entropy of each row of ``a @ b.T / temperature`` with target column ``pos``."""
    logits = (a @ b.T) / temperature
    if exclude_self:
        eye = torch.eye(a.shape[0], b.shape[0], dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(eye, float("-inf"))
    return _cross_entropy_rows(logits, pos)


def _cross_entropy_rows(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-row ``logsumexp(logits) - logits[pos]`` (cross-entropy with target ``pos``), as torch
    computes it: ``-log_softmax``, max subtracted before log(sum) is added, so a loss far below
    ulp(logits[pos]) keeps its digits."""
    return F.cross_entropy(logits, pos, reduction="none")


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum" or rows.numel() == 0:
        return rows.sum()  # the mean of no rows is 0, not NaN
    return rows.mean()


def info_nce(query, key, *, temperature=0.07, normalize=True, symmetric=False, queue=None, reduction="mean",
             distributed=False):
    """InfoNCE with positives on the diagonal (module docstring: conventions).

    query, key: (N, D); queue: (Q, D) extra negatives or None; temperature: float or scalar
    tensor; reduction: "mean" | "sum" | "none" (per-row (N,), the average of both
    directions when symmetric). Returns an fp32 loss.
    """
    q = _prepare(query, normalize)
    k = _prepare(key, normalize)
    n = q.shape[0]
    offset = 0
    if distributed:
        import torch.distributed as dist

        offset = dist.get_rank() * n
        k_all = gather_with_grad(k)
    else:
        k_all = k
    cols = k_all
    if queue is not None:
        cols = torch.cat([k_all, _prepare(queue.detach(), normalize)], dim=0)
    pos = torch.arange(n, device=q.device) + offset
    logits = (q @ cols.T) / temperature
    rows = _cross_entropy_rows(logits, pos)
    if symmetric:
        if distributed:
            rows_t = _row_losses(k, gather_with_grad(q), temperature, pos, exclude_self=False)
        else:  # key -> query logits: the query -> key block, transposed (its columns), positives on its diagonal
            block = logits[:, :n]
            rows_t = -torch.log_softmax(block, dim=0).diagonal()  # as cross_entropy: see _cross_entropy_rows
        rows = 0.5 * (rows + rows_t)
    return reduce_rows(rows, reduction)


def nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean"):
    """SimCLR's NT-Xent over the 2N views ``cat(z1, z2)`` (module docstring: conventions).

    reduction "none" gives the (2N,) per-view losses, rows of z1 first.
    """
    z = torch.cat([_prepare(z1, normalize), _prepare(z2, normalize)], dim=0)
    n = z1.shape[0]
    pos = (torch.arange(2 * n, device=z.device) + n) % max(2 * n, 1)
    return reduce_rows(_row_losses(z, z, temperature, pos, exclude_self=True), reduction)
