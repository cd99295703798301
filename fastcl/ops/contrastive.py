"""The fused contrastive primitive as a ``torch.library`` custom op with autograd.

``fastcl::contrastive_fwd`` returns the per-row / per-column statistics defined in
:mod:`fastcl.reference.contrastive`; ``fastcl::contrastive_bwd`` turns the gradients of those
statistics into gradients of ``q``, ``k``, the logit scale and the bias, recomputing the logits
tile by tile. ``k=None`` means the keys are ``q`` itself (NT-Xent, SupCon, DCL, the multi-view
losses: a symmetric logit matrix, which the forward kernels of :data:`SELF_FWD_BACKENDS` and
the backward kernels of :data:`SELF_BWD_BACKENDS` exploit); there are no column statistics then,
``dq`` is the whole gradient of ``q`` (as queries and as keys) and ``dk`` an empty ``[0, D]``
tensor. ``fastcl::contrastive_fused``
serves losses that are linear in the row statistics with coefficients known before the forward
(InfoNCE in one direction, NT-Xent, SupCon, DCL with ``mean`` or ``sum``): it returns the loss
and its gradients from one sweep, and its backward only multiplies them by the upstream
scalar. Every op takes the name of the kernel backend
(``"triton"``, ``"cuda"``, ``"cpu"`` or the materializing ``"torch"``) as its last argument;
the functional layer picks it through :mod:`fastcl.dispatch`.

Every op has a fake (meta) kernel, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backends

__all__ = ["contrastive_fwd", "contrastive_bwd", "contrastive_fused", "contrastive_stats",
           "FUSED_BACKENDS", "SELF_FWD_BACKENDS", "SELF_BWD_BACKENDS", "SELF_FUSED_BACKENDS"]

#: Backends whose ``contrastive_fused`` saves work: their slabs hold whole rows, so one sweep
#: gives the statistics and then the gradients (three GEMMs, not the four of a forward and a
#: backward that recomputes the logits; two with ``k=None``, on the symmetric logits). The op
#: runs on the others too, as a forward and a backward. Static lists: they are consulted while
#: tracing, when nothing may be imported.
FUSED_BACKENDS = ("cpu", "cuda")
#: Backends whose forward kernel takes ``k=None`` (the keys are the queries) and computes the row
#: statistics from the blocks on and below the diagonal of the symmetric logits (half the
#: square): the CPU and CUDA C++ sweeps (each slab's columns up to its end; the part before the
#: slab, transposed in chunks on the CPU and read column by column on CUDA, for the earlier
#: rows; CUDA where the rows take more than one slab), Triton where the full square would take
#: more than one wave of programs. The others get ``k = q``.
SELF_FWD_BACKENDS = ("triton", "cpu", "cuda")
#: Backends whose backward kernel takes ``k=None`` (the keys are the queries) and builds
#: ``G + G.T`` for the whole gradient: the CPU and CUDA C++ sweeps on the blocks on and below the
#: diagonal only (half a GEMM to recompute them, one for the gradient, instead of three), Triton
#: from each recomputed tile in both orientations (one launch, two GEMMs' worth, instead of the
#: four of the dq and dk launches). The others get ``k = q`` and return ``dq + dk``.
SELF_BWD_BACKENDS = ("cpu", "cuda", "triton")
#: Backends where ``contrastive_fused`` with ``k=None`` saves work.
SELF_FUSED_BACKENDS = tuple(dict.fromkeys(FUSED_BACKENDS + SELF_BWD_BACKENDS))


def _stat_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastcl::contrastive_fwd", mutates_args=())
def contrastive_fwd(
    q: Tensor,
    k: Optional[Tensor],
    scale: Tensor,
    bias: Tensor,
    targets: Optional[Tensor],
    row_labels: Optional[Tensor],
    col_labels: Optional[Tensor],
    exclude_diag: bool,
    decoupled: bool,
    pos_lse: bool,
    col_stats: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics ``(lse, pos, npos, mean, col_lse, col_mean)`` of ``scale * q @ k.T + bias``
    (``k=None``: of ``scale * q @ q.T + bias``, without column statistics)."""
    if k is None and col_stats:
        raise ValueError("fastcl::contrastive_fwd: col_stats needs k; with k=None the logits "
                         "are symmetric and the column statistics are the row statistics")
    return _fwd_kernel(backend, q, k, scale, bias, targets, row_labels, col_labels,
                       exclude_diag, decoupled, pos_lse, col_stats)


def _fwd_kernel(backend, q, k, *rest):
    """The backend's forward kernel; ``k=None`` on a backend outside
    :data:`SELF_FWD_BACKENDS` runs as ``k = q``."""
    fwd = _backends.kernel(backend, "contrastive_fwd")
    return fwd(q, q if k is None and backend not in SELF_FWD_BACKENDS else k, *rest)


@contrastive_fwd.register_fake
def _(q, k, scale, bias, targets, row_labels, col_labels, exclude_diag, decoupled, pos_lse,
      col_stats, backend):
    dt = _stat_dtype(q)
    R, C = q.shape[0], (q if k is None else k).shape[0]
    rows = [q.new_empty(R, dtype=dt) for _ in range(4)]
    cols = [q.new_empty(C if col_stats else 0, dtype=dt) for _ in range(2)]
    return (*rows, *cols)


@torch.library.custom_op("fastcl::contrastive_bwd", mutates_args=())
def contrastive_bwd(
    g_lse: Optional[Tensor],
    g_pos: Optional[Tensor],
    g_mean: Optional[Tensor],
    g_col_lse: Optional[Tensor],
    g_col_mean: Optional[Tensor],
    q: Tensor,
    k: Optional[Tensor],
    scale: Tensor,
    bias: Tensor,
    targets: Optional[Tensor],
    row_labels: Optional[Tensor],
    col_labels: Optional[Tensor],
    lse: Tensor,
    pos: Tensor,
    npos: Tensor,
    col_lse: Tensor,
    exclude_diag: bool,
    decoupled: bool,
    pos_lse: bool,
    col_stats: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dscale, dbias)`` from the gradients of the statistics
    (``k=None``: ``dq`` is the whole gradient of ``q`` and ``dk`` is empty)."""
    return _bwd_kernel(backend, g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias,
                       targets, row_labels, col_labels, lse, pos, npos, col_lse,
                       exclude_diag, decoupled, pos_lse, col_stats)


def _bwd_kernel(backend, g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, *rest):
    """The backend's backward kernel; ``k=None`` on a backend outside
    :data:`SELF_BWD_BACKENDS` runs as ``k = q`` with ``dq + dk``."""
    bwd = _backends.kernel(backend, "contrastive_bwd")
    if k is None and backend not in SELF_BWD_BACKENDS:
        dq, dk, dscale, dbias = bwd(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, q, *rest)
        return dq + dk, _no_keys(q), dscale, dbias
    return bwd(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, *rest)


def _no_keys(q: Tensor) -> Tensor:
    """The ``dk`` of ``k=None``: an empty ``[0, D]`` tensor."""
    return q.new_empty((0, q.shape[1]))


@contrastive_bwd.register_fake
def _(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, *rest):
    return (torch.empty_like(q), _no_keys(q) if k is None else torch.empty_like(k),
            torch.empty_like(scale), torch.empty_like(bias))


_FLAGS = ("exclude_diag", "decoupled", "pos_lse", "col_stats", "backend")


def _setup_context(ctx, inputs, output):
    (q, k, scale, bias, targets, row_labels, col_labels, *flags) = inputs
    lse, pos, npos, _mean, col_lse, _col_mean = output
    ctx.save_for_backward(q, k, scale, bias, targets, row_labels, col_labels,
                          lse, pos, npos, col_lse)
    ctx.flags = tuple(flags)
    ctx.mark_non_differentiable(npos)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lse, g_pos, _g_npos, g_mean, g_col_lse, g_col_mean):
    (q, k, scale, bias, targets, row_labels, col_labels,
     lse, pos, npos, col_lse) = ctx.saved_tensors
    exclude_diag, decoupled, pos_lse, col_stats, backend = ctx.flags
    need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
    if not (need_q or need_k or need_scale or need_bias):
        return (None,) * 12
    dq, dk, dscale, dbias = contrastive_bwd(
        g_lse, g_pos, g_mean,
        g_col_lse if col_stats else None, g_col_mean if col_stats else None,
        q, k, scale, bias, targets, row_labels, col_labels, lse, pos, npos, col_lse,
        exclude_diag, decoupled, pos_lse, col_stats, backend,
    )
    return (dq if need_q else None, dk if need_k else None,
            dscale if need_scale else None, dbias if need_bias else None,
            None, None, None, None, None, None, None, None)


contrastive_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastcl::contrastive_fused", mutates_args=())
def contrastive_fused(
    g_lse: Optional[Tensor],
    g_pos: Optional[Tensor],
    g_mean: Optional[Tensor],
    q: Tensor,
    k: Optional[Tensor],
    scale: Tensor,
    bias: Tensor,
    targets: Optional[Tensor],
    row_labels: Optional[Tensor],
    col_labels: Optional[Tensor],
    exclude_diag: bool,
    decoupled: bool,
    pos_lse: bool,
    mean: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, npos, dq, dk, dscale, dbias)`` of a loss linear in the row statistics.

    ``loss = norm * sum_r [npos_r > 0] (g_lse_r lse_r + g_pos_r pos_r + g_mean_r mean_r)``
    (absent coefficients are zero) with ``norm = 1 / max(#{r: npos_r > 0}, 1)`` when ``mean``,
    else 1: rows without a positive count for nothing, as in every loss of the family. The
    statistics are those of :func:`contrastive_fwd` without column statistics.

    ``k=None`` means the keys are ``q`` itself (NT-Xent, SupCon, DCL: a symmetric logit matrix,
    which the CPU and CUDA sweeps and the Triton backward exploit, see
    :data:`SELF_FUSED_BACKENDS`):
    ``dq`` is then the whole gradient of ``q`` (as queries and as keys) and ``dk`` an empty
    ``[0, D]`` tensor.
    """
    if _backends.has_kernel(backend, "contrastive_fused"):
        fused = _backends.kernel(backend, "contrastive_fused")
        return fused(g_lse, g_pos, g_mean, q, k, scale, bias, targets, row_labels, col_labels,
                     exclude_diag, decoupled, pos_lse, mean)
    return _fused_by_parts(g_lse, g_pos, g_mean, q, k, scale, bias, targets, row_labels,
                           col_labels, exclude_diag, decoupled, pos_lse, mean, backend)


def _fused_by_parts(g_lse, g_pos, g_mean, q, k, scale, bias, targets, row_labels, col_labels,
                    exclude_diag, decoupled, pos_lse, mean, backend):
    """``contrastive_fused`` as the backend's forward then its backward (no work saved, but
    with ``k=None`` on :data:`SELF_BWD_BACKENDS`)."""
    keys = q if k is None else k
    lse, pos, npos, avg, _cl, _cm = _fwd_kernel(
        backend, q, k, scale, bias, targets, row_labels, col_labels, exclude_diag, decoupled,
        pos_lse, False)
    has_pos = npos > 0
    norm = 1.0 / has_pos.sum().clamp_min(1).to(lse.dtype) if mean else 1.0
    rows = torch.zeros_like(lse)
    gs = []
    for g, stat in ((g_lse, lse), (g_pos, pos), (g_mean, avg)):
        if g is not None:
            g = torch.where(has_pos, g.to(lse.dtype), torch.zeros_like(lse))
            rows = rows + torch.where(has_pos, g * stat, torch.zeros_like(lse))
            g = g * norm
        gs.append(g)
    loss = rows.sum() * norm
    if not any(g is not None for g in gs) or q.shape[0] == 0 or keys.shape[0] == 0:
        grads = (torch.zeros_like(q), _no_keys(q) if k is None else torch.zeros_like(k),
                 torch.zeros_like(scale), torch.zeros_like(bias))
    else:
        grads = _bwd_kernel(
            backend, *gs, None, None, q, k, scale, bias, targets, row_labels, col_labels, lse,
            pos, npos, torch.empty(0, dtype=lse.dtype, device=q.device), exclude_diag, decoupled,
            pos_lse, False)
    return (loss, npos, *grads)


@contrastive_fused.register_fake
def _(g_lse, g_pos, g_mean, q, k, scale, bias, *rest):
    dt = _stat_dtype(q)
    dk = _no_keys(q) if k is None else torch.empty_like(k)
    return (q.new_empty((), dtype=dt), q.new_empty(q.shape[0], dtype=dt), torch.empty_like(q),
            dk, torch.empty_like(scale), torch.empty_like(bias))


def _setup_fused(ctx, inputs, output):
    _loss, npos, dq, dk, dscale, dbias = output
    ctx.save_for_backward(dq, dk, dscale, dbias)
    ctx.mark_non_differentiable(npos, dq, dk, dscale, dbias)
    ctx.set_materialize_grads(False)


def _backward_fused(ctx, g_loss, *_unused):
    need = ctx.needs_input_grad[3:7]
    if g_loss is None or not any(need):
        return (None,) * 15
    g = g_loss.detach()
    # a 0-dim factor keeps each gradient's dtype; the product is rounded once
    grads = tuple((t * g).to(t.dtype) if n else None for t, n in zip(ctx.saved_tensors, need))
    return (None, None, None, *grads) + (None,) * 8


contrastive_fused.register_autograd(_backward_fused, setup_context=_setup_fused)


def contrastive_stats(
    q: Tensor,
    k: Optional[Tensor],
    scale: Tensor,
    bias: Tensor,
    targets: Optional[Tensor] = None,
    row_labels: Optional[Tensor] = None,
    col_labels: Optional[Tensor] = None,
    *,
    exclude_diag: bool = False,
    decoupled: bool = False,
    pos_lse: bool = False,
    col_stats: bool = False,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Keyword-friendly front of :func:`contrastive_fwd` (differentiable; ``k=None``: the keys
    are ``q``)."""
    return contrastive_fwd(q, k, scale, bias, targets, row_labels, col_labels,
                           exclude_diag, decoupled, pos_lse, col_stats, backend)
