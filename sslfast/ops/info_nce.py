"""In-batch contrastive losses: ``info_nce`` (CLIP, MoCo) and ``nt_xent`` (SimCLR).

Every kernel backend computes the same core: rows A (M, D) scored against columns B (C, D),
``s_ij = scale * <A_i, B_j>``, row i's positive at column ``(i + pos_shift) % pos_mod``,
optionally without the column ``j == i``; per-row loss ``lse_i - s_i,pos``. The kernels walk
the score matrix in tiles with an online log-sum-exp and keep only the per-row lse for the
backward (as its two parts, the row's max and log l: their fp32 sum would lose ulp(lse) in
every probability the backward recomputes), which recomputes the tiles: memory O((M + C) * D), never M x C, forward and
backward. The backward runs one pass over row blocks (dA) and one over column blocks (dB)
instead of atomics, so it is deterministic on every backend.

The public functions do what is cheap and shared in PyTorch (L2 normalisation with its
gradient, the cross-rank gather, the queue concatenation, the reduction) and call the
``sslfast::info_nce`` custom op for the rest.
"""
from __future__ import annotations

import math

import torch

from .. import _dispatch, _ext
from .. import _validation as V
from ..reference import info_nce as ref

__all__ = ["info_nce", "nt_xent"]

OP, OP_BWD, OP_NTX = "info_nce", "info_nce_backward", "nt_xent"


# ----------------------------------------------------------------------------- backends
# forward(a, b, scale, pos_shift, pos_mod, exclude_self) -> (loss (M,) fp32, stats (2, M) fp32)
#     stats: each row's max score and log l (lse = max + log l, kept apart: csrc/info_nce.h)
# backward(a, b, scale, stats, grad, pos_shift, pos_mod, exclude_self, n_grad_cols)
#     -> (dA (M, D) fp32, dB (C, D) fp32, rows of dB at or past n_grad_cols zero)
# a, b: contiguous, one float dtype; scale: 0-d fp32 tensor (1 / temperature) on the device.

@_dispatch.register(OP, "reference")
def _reference_info_nce(*args, **kwargs):
    return ref.info_nce(*args, **kwargs)


@_dispatch.register(OP_NTX, "reference")
def _reference_nt_xent(*args, **kwargs):
    return ref.nt_xent(*args, **kwargs)


def _cpu_operands(x: torch.Tensor, layouts: str = "rtf") -> list[torch.Tensor | None]:
    """x as the fp32 layouts csrc/info_nce_cpu.cpp streams tiles from, zero padded to rows a
    multiple of 64 and features a multiple of 16: "r" row-major (R, Dp), "t" panels
    (R / 16, Dp, 16), "f" panels (Dp / 16, R, 16); None for a layout not asked for. O(N * D),
    allocated here through torch so that memory profiles see them, filled by the extension."""
    m, d = x.shape
    r, dp = -(-m // 64) * 64, -(-d // 16) * 16
    out = [torch.empty(r * dp, dtype=torch.float32, device=x.device) if c in layouts else None for c in "rtf"]
    _ext.cpu_module().info_nce_pack(_ext.ptr(x), _ext.DTYPE_CODE[x.dtype], m, d, *map(_ext.ptr, out))
    return out


@_dispatch.register(OP, "cpu")
@_dispatch.register(OP_NTX, "cpu")
def _cpu_forward(a, b, scale, pos_shift, pos_mod, exclude_self):
    m, d = a.shape
    loss = torch.empty(m, dtype=torch.float32, device=a.device)
    stats = torch.empty(2, m, dtype=torch.float32, device=a.device)
    if b is a:
        ar, bt, _ = _cpu_operands(a, "rt")
    else:
        ar, bt = _cpu_operands(a, "r")[0], _cpu_operands(b, "t")[1]
    _ext.cpu_module().info_nce_forward(
        _ext.ptr(ar), _ext.ptr(bt), m, b.shape[0], d, _ext.ptr(scale), pos_shift, pos_mod, exclude_self,
        _ext.ptr(loss), _ext.ptr(stats[0]), _ext.ptr(stats[1]))
    return loss, stats


@_dispatch.register(OP_BWD, "cpu")
def _cpu_backward(a, b, scale, stats, grad, pos_shift, pos_mod, exclude_self, n_grad_cols):
    m, d = a.shape
    da = torch.empty(m, d, dtype=torch.float32, device=a.device)
    db = torch.zeros(b.shape[0], d, dtype=torch.float32, device=a.device)
    pa = _cpu_operands(a)
    pb = pa if b is a else _cpu_operands(b)
    _ext.cpu_module().info_nce_backward(
        *map(_ext.ptr, pa), *map(_ext.ptr, pb), m, b.shape[0], d, _ext.ptr(scale), pos_shift, pos_mod,
        exclude_self, _ext.ptr(stats[0]), _ext.ptr(stats[1]), _ext.ptr(grad), n_grad_cols, _ext.ptr(da), _ext.ptr(db))
    return da, db


@_dispatch.register(OP, "cuda")
@_dispatch.register(OP_NTX, "cuda")
def _cuda_forward(a, b, scale, pos_shift, pos_mod, exclude_self):
    m, d = a.shape
    loss = torch.empty(m, dtype=torch.float32, device=a.device)
    stats = torch.empty(2, m, dtype=torch.float32, device=a.device)
    _ext.cuda_module().info_nce_forward(
        _ext.ptr(a), _ext.ptr(b), _ext.DTYPE_CODE[a.dtype], m, b.shape[0], d, _ext.ptr(scale),
        pos_shift, pos_mod, exclude_self, _ext.ptr(loss), _ext.ptr(stats[0]), _ext.ptr(stats[1]),
        _ext.stream(a.device))
    return loss, stats


@_dispatch.register(OP_BWD, "cuda")
def _cuda_backward(a, b, scale, stats, grad, pos_shift, pos_mod, exclude_self, n_grad_cols):
    m, d = a.shape
    da = torch.empty(m, d, dtype=torch.float32, device=a.device)
    db = torch.zeros(b.shape[0], d, dtype=torch.float32, device=a.device)
    _ext.cuda_module().info_nce_backward(
        _ext.ptr(a), _ext.ptr(b), _ext.DTYPE_CODE[a.dtype], m, b.shape[0], d, _ext.ptr(scale),
        pos_shift, pos_mod, exclude_self, _ext.ptr(stats[0]), _ext.ptr(stats[1]), _ext.ptr(grad), n_grad_cols,
        _ext.ptr(da), _ext.ptr(db), _ext.stream(a.device))
    return da, db


@_dispatch.register(OP, "triton")
@_dispatch.register(OP_NTX, "triton")
def _triton_forward(a, b, scale, pos_shift, pos_mod, exclude_self):
    from ..kernels import info_nce as kern

    return kern.forward(a, b, scale, pos_shift, pos_mod, exclude_self)


@_dispatch.register(OP_BWD, "triton")
def _triton_backward(a, b, scale, stats, grad, pos_shift, pos_mod, exclude_self, n_grad_cols):
    from ..kernels import info_nce as kern

    return kern.backward(a, b, scale, stats, grad, pos_shift, pos_mod, exclude_self, n_grad_cols)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("sslfast::info_nce", mutates_args=())
def _info_nce_op(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, pos_shift: int, pos_mod: int,
                 exclude_self: bool, n_grad_cols: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (M,) and the row statistics (2, M) of the tiled core: max and log l."""
    return _dispatch.get(OP, backend)(a.contiguous(), b.contiguous(), scale.contiguous(), pos_shift, pos_mod,
                                      exclude_self)


@_info_nce_op.register_fake
def _(a, b, scale, pos_shift, pos_mod, exclude_self, n_grad_cols, backend):
    m = a.shape[0]
    return a.new_empty(m, dtype=torch.float32), a.new_empty(2, m, dtype=torch.float32)


@torch.library.custom_op("sslfast::info_nce_backward", mutates_args=())
def _info_nce_backward_op(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, stats: torch.Tensor,
                          grad: torch.Tensor, pos_shift: int, pos_mod: int, exclude_self: bool, n_grad_cols: int,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the per-row losses w.r.t. a, b and scale (fused, tile recomputation)."""
    a = a.contiguous()
    da, db = _dispatch.get(OP_BWD, backend)(a, b.contiguous(), scale.contiguous(), stats.contiguous(),
                                            grad.float().contiguous(), pos_shift, pos_mod, exclude_self,
                                            n_grad_cols)
    # dL/dscale = sum_ij dS_ij <a_i, b_j> = sum_i <a_i, dA_i> / scale, since dA_i = scale *
    # sum_j dS_ij b_j: O(M * D) here instead of a second reduction in every kernel.
    dscale = (a.float() * da).sum() / scale
    return da.to(a.dtype), db.to(b.dtype), dscale.reshape(scale.shape)


@_info_nce_backward_op.register_fake
def _(a, b, scale, stats, grad, pos_shift, pos_mod, exclude_self, n_grad_cols, backend):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    a, b, scale, pos_shift, pos_mod, exclude_self, n_grad_cols, backend = inputs
    ctx.save_for_backward(a, b, scale, output[1])
    ctx.args = (pos_shift, pos_mod, exclude_self, n_grad_cols, backend)


def _backward(ctx, grad_loss, grad_stats):
    # grad_stats is never used: the row statistics are an internal output for the backward only.
    a, b, scale, stats = ctx.saved_tensors
    da, db, dscale = torch.ops.sslfast.info_nce_backward(a, b, scale, stats, grad_loss, *ctx.args)
    return da, db, dscale, None, None, None, None, None


torch.library.register_autograd("sslfast::info_nce", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def _check_temperature(temperature, device):
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.is_floating_point():
            raise ValueError(
                f"temperature must be a float or a floating scalar tensor, got a {temperature.dtype} tensor of "
                f"shape {tuple(temperature.shape)}")
        if temperature.device != device and temperature.device.type != "cpu":
            raise ValueError(f"temperature is on {temperature.device}, the inputs on {device}")
        # Reading a device tensor's value would synchronise; check it where that is free.
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(temperature.detach().reshape(()))
            if not (value > 0.0 and math.isfinite(value)):
                raise ValueError(f"temperature must be a finite value > 0, got {value}")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a scalar tensor, got {type(temperature).__name__}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite value > 0, got {temperature}")
    return float(temperature)


def _scale(temperature, device) -> torch.Tensor:
    """1 / temperature as a 0-d fp32 tensor on ``device`` (differentiable for a tensor)."""
    if isinstance(temperature, torch.Tensor):
        return (1.0 / temperature.to(device=device, dtype=torch.float32)).reshape(())
    return torch.tensor(1.0 / temperature, dtype=torch.float32, device=device)


def _prepare(x: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    # Normalise in fp32 and store in the input dtype: the kernels then read (and on GPU
    # multiply on tensor cores in) the narrow format, accumulating in fp32.
    if normalize:
        return ref.l2_normalize(x.float()).to(dtype)
    return x.to(dtype)


def info_nce(query, key, *, temperature=0.07, normalize=True, symmetric=False, queue=None, reduction="mean",
             distributed=False, backend=None):
    """InfoNCE with in-batch negatives (SimCLR/CLIP style), MoCo queues and CLIP's symmetric form.

    ``query``, ``key``: (N, D) float tensors (fp32, fp16, bf16; fp64 on the reference backend,
    which backend=None picks for it; mixed dtypes promote as torch promotes); row i of ``key`` is the
    positive of row i of ``query``, every other key a negative. ``logits = <q_i, k_j> /
    temperature`` after L2 normalisation (``normalize=True``: ``F.normalize`` with the row
    first divided by its max |x|, so norms up to fp32's range work; gradient through it); loss of row i = ``logsumexp_j logits_ij - logits_ii``.

    * ``temperature``: a float > 0 or a scalar tensor; a tensor receives a gradient (CLIP's
      learnable scale: pass ``1 / logit_scale.exp()``).
    * ``symmetric=True``: CLIP's ``(CE(q -> k) + CE(k -> q)) / 2``; per row with
      ``reduction="none"``. The key -> query direction has no queue negatives.
    * ``queue``: (Q, D) extra negatives for every query (MoCo); detached, never receives a
      gradient; normalised like the keys when ``normalize=True``.
    * ``reduction``: ``"mean"`` (over the local rows), ``"sum"`` or ``"none"`` ((N,)).
    * ``distributed=True``: keys (and, for symmetric, queries) are gathered from every
      torch.distributed rank with gradient (CLIP's ``gather_with_grad``, ``local_loss``):
      each rank's loss is over its own N queries against all ``world_size * N`` keys, its
      positives at ``rank * N + i``. Every rank passes the same N. The gradients a rank gets
      are ``world_size`` times those of the single-process mean over the gathered batch;
      DDP's gradient averaging restores the single-process values.
    * ``backend``: None (fastest available), "reference", "cpu", "triton", "cuda". On CPU
      tensors None depends on the size: the reference (about 2x faster there, BLAS GEMMs on
      the full logits) while N x (world_size * N + Q) <= 2^26 logits (256 MB in fp32), the C++
      kernel above, whose memory is O((N + Q) * D) (``sslfast._dispatch``, size rules).

    Differs on purpose: fp32 math and an fp32 loss for any input dtype (as autocast does for
    cross-entropy); the mean of an empty batch is 0, not NaN; the kernels never build the
    N x (N + Q) logits (memory O((N + Q) * D)). fp32 inputs are multiplied in full fp32 on
    every backend (no TF32). Non-finite inputs propagate; with ``normalize=False`` the logits
    must stay finite in fp32.
    """
    V.check_tensor("query", query, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    V.check_tensor("key", key, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    if key.shape != query.shape:
        raise ValueError(f"key must have the shape of query {tuple(query.shape)}, got {tuple(key.shape)}")
    n, d = query.shape
    if d < 1:
        raise ValueError(f"query and key need at least one feature column, got shape {tuple(query.shape)}")
    if queue is not None:
        V.check_tensor("queue", queue, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES, shape=(None, d))
    device = V.check_same_device(query=query, key=key, queue=queue)
    temperature = _check_temperature(temperature, device)
    _check_flag("normalize", normalize)
    _check_flag("symmetric", symmetric)
    _check_flag("distributed", distributed)
    V.check_choice("reduction", reduction, ("mean", "sum", "none"))
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group "
                             "(torch.distributed.init_process_group)")
    V.check_inputs_finite(OP, query=query, key=key, queue=queue,
                          temperature=temperature if isinstance(temperature, torch.Tensor) else None)
    cols = n * (torch.distributed.get_world_size() if distributed else 1) + (0 if queue is None else queue.shape[0])
    name = V.resolve_backend(OP, backend, device, sizes=dict(rows=n, cols=cols), query=query, key=key, queue=queue)
    if name == "reference":
        return ref.info_nce(query, key, temperature=temperature, normalize=normalize, symmetric=symmetric,
                            queue=queue, reduction=reduction, distributed=distributed)

    dtype = torch.promote_types(query.dtype, key.dtype)
    if queue is not None:
        dtype = torch.promote_types(dtype, queue.dtype)
    scale = _scale(temperature, device)
    q = _prepare(query, normalize, dtype)
    k = _prepare(key, normalize, dtype)
    offset = 0
    k_all = k
    if distributed:
        import torch.distributed as dist

        offset = dist.get_rank() * n
        k_all = ref.gather_with_grad(k)
    cols = k_all if queue is None else torch.cat([k_all, _prepare(queue.detach(), normalize, dtype)], dim=0)
    pos_mod = max(cols.shape[0], 1)
    rows, _ = torch.ops.sslfast.info_nce(q, cols, scale, offset, pos_mod, False, k_all.shape[0], name)
    if symmetric:
        q_all = ref.gather_with_grad(q) if distributed else q
        rows_t, _ = torch.ops.sslfast.info_nce(k, q_all, scale, offset, max(q_all.shape[0], 1), False,
                                               q_all.shape[0], name)
        rows = 0.5 * (rows + rows_t)
    return ref.reduce_rows(rows, reduction)


def nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend=None):
    """SimCLR's NT-Xent loss over 2N views.

    ``z1``, ``z2``: (N, D), two views of N samples. ``z = cat(z1, z2)``, L2-normalised when
    ``normalize=True``; ``logits = <z_a, z_b> / temperature`` over the 2N - 1 other views
    (self-similarity excluded); the positive of view a is its other view ``(a + N) mod 2N``,
    the 2N - 2 others are negatives. ``reduction="mean"`` averages the 2N per-view losses
    (SimCLR, lightly's NTXentLoss without memory bank), ``"sum"`` sums them, ``"none"``
    returns them ((2N,), views of z1 first). ``temperature`` as in ``info_nce`` (float or a
    scalar tensor receiving a gradient). Tiled like ``info_nce``: memory O(N * D), never
    2N x 2N. fp32 loss; the mean of an empty batch is 0. ``backend=None`` on CPU tensors:
    the reference while (2N)^2 <= 2^26 logits, the C++ kernel above (as ``info_nce``).
    """
    V.check_tensor("z1", z1, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    V.check_tensor("z2", z2, ndim=2, dtypes=V.REFERENCE_FLOAT_DTYPES)
    if z2.shape != z1.shape:
        raise ValueError(f"z2 must have the shape of z1 {tuple(z1.shape)}, got {tuple(z2.shape)}")
    if z1.shape[1] < 1:
        raise ValueError(f"z1 and z2 need at least one feature column, got shape {tuple(z1.shape)}")
    device = V.check_same_device(z1=z1, z2=z2)
    temperature = _check_temperature(temperature, device)
    _check_flag("normalize", normalize)
    V.check_choice("reduction", reduction, ("mean", "sum", "none"))
    V.check_inputs_finite(OP_NTX, z1=z1, z2=z2,
                          temperature=temperature if isinstance(temperature, torch.Tensor) else None)
    rows = 2 * z1.shape[0]
    name = V.resolve_backend(OP_NTX, backend, device, sizes=dict(rows=rows, cols=rows), z1=z1, z2=z2)
    if name == "reference":
        return ref.nt_xent(z1, z2, temperature, normalize=normalize, reduction=reduction)

    dtype = torch.promote_types(z1.dtype, z2.dtype)
    n = z1.shape[0]
    z = torch.cat([_prepare(z1, normalize, dtype), _prepare(z2, normalize, dtype)], dim=0)
    rows, _ = torch.ops.sslfast.info_nce(z, z, _scale(temperature, device), n, max(2 * n, 1), True, 2 * n, name)
    return ref.reduce_rows(rows, reduction)
