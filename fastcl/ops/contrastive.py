"""The fused contrastive primitive as a ``torch.library`` custom op with autograd.

``fastcl::contrastive_fwd`` returns the per-row / per-column statistics defined in
:mod:`fastcl.reference.contrastive`; ``fastcl::contrastive_bwd`` turns the gradients of those
statistics into gradients of ``q``, ``k``, the logit scale and the bias, recomputing the logits
tile by tile. ``k=None`` means the keys are ``q`` itself (NT-Xent, SupCon, DCL, the multi-view
losses: a symmetric logit matrix, which the forward kernels of :data:`SELF_FWD_BACKENDS` and
the backward kernels of :data:`SELF_BWD_BACKENDS` exploit); there are no column statistics then,
``dq`` is the whole gradient of ``q`` (as queries and as keys) and ``dk`` an empty ``[0, D]``
tensor. With ``lse2_mult > 0`` the forward also returns ``lse2``, the log-sum-exp of the
denominator set at ``lse2_mult`` times the logits (the hard-negative loss needs two), from the
same pass on the backends of :data:`LSE2_BACKENDS`. ``fastcl::contrastive_fused``
serves losses that are linear in the row statistics with coefficients known before the forward
(InfoNCE in one direction, NT-Xent, SupCon, DCL with ``mean`` or ``sum``): it returns the loss
and its gradients from one sweep, and its backward only multiplies them by the upstream
scalar. Every op takes the name of the kernel backend
(``"triton"``, ``"cuda"``, ``"cpu"`` or the materializing ``"torch"``) as its last argument;
the functional layer picks it through :mod:`fastcl.dispatch`.

Every op has a fake (meta) kernel, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backends

__all__ = ["contrastive_fwd", "contrastive_bwd", "contrastive_fused", "contrastive_stats",
           "FUSED_BACKENDS", "SELF_FWD_BACKENDS", "SELF_BWD_BACKENDS", "SELF_FUSED_BACKENDS",
           "LSE2_BACKENDS"]

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
#: Backends whose kernels compute the second log-sum-exp ``lse2`` (``lse2_mult > 0``) in the same
#: pass as the other statistics (forward) and its gradient term in the same tiles (backward):
#: all of them. For a backend left out (the two-pass side of a benchmark's A/B,
#: ``benchmarks._common.lse2_second_pass``) the op runs the kernels a second time at
#: ``lse2_mult`` times the scale and bias instead.
LSE2_BACKENDS = ("torch", "triton", "cpu", "cuda")


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
    lse2_mult: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics ``(lse, pos, npos, mean, col_lse, col_mean, lse2)`` of
    ``scale * q @ k.T + bias`` (``k=None``: of ``scale * q @ q.T + bias``, without column
    statistics; ``lse2`` only when ``lse2_mult > 0``)."""
    if k is None and col_stats:
        raise ValueError("fastcl::contrastive_fwd: col_stats needs k; with k=None the logits "
                         "are symmetric and the column statistics are the row statistics")
    _check_lse2_mult(lse2_mult)
    return _fwd_kernel(backend, q, k, scale, bias, targets, row_labels, col_labels,
                       exclude_diag, decoupled, pos_lse, col_stats, lse2_mult)


def _check_lse2_mult(lse2_mult: float) -> None:
    if not (math.isfinite(lse2_mult) and lse2_mult >= 0):
        raise ValueError(f"fastcl::contrastive: lse2_mult must be a finite number >= 0 "
                         f"(0: no second log-sum-exp), got {lse2_mult}")


def _fwd_kernel(backend, q, k, scale, bias, targets, row_labels, col_labels, exclude_diag,
                decoupled, pos_lse, col_stats, lse2_mult):
    """The backend's forward kernel; ``k=None`` on a backend outside
    :data:`SELF_FWD_BACKENDS` runs as ``k = q``; ``lse2`` on a backend outside
    :data:`LSE2_BACKENDS` takes a second run at ``lse2_mult`` times the scale and bias."""
    fwd = _backends.kernel(backend, "contrastive_fwd")
    keys = q if k is None and backend not in SELF_FWD_BACKENDS else k
    masks = (targets, row_labels, col_labels, exclude_diag, decoupled)
    if lse2_mult > 0 and backend not in LSE2_BACKENDS:
        out = fwd(q, keys, scale, bias, *masks, pos_lse, col_stats, 0.0)
        lse2 = fwd(q, keys, scale * lse2_mult, bias * lse2_mult, *masks, False, False, 0.0)[0]
        return (*out[:6], lse2)
    return fwd(q, keys, scale, bias, *masks, pos_lse, col_stats, lse2_mult)


@contrastive_fwd.register_fake
def _(q, k, scale, bias, targets, row_labels, col_labels, exclude_diag, decoupled, pos_lse,
      col_stats, lse2_mult, backend):
    dt = _stat_dtype(q)
    R, C = q.shape[0], (q if k is None else k).shape[0]
    rows = [q.new_empty(R, dtype=dt) for _ in range(4)]
    cols = [q.new_empty(C if col_stats else 0, dtype=dt) for _ in range(2)]
    return (*rows, *cols, q.new_empty(R if lse2_mult > 0 else 0, dtype=dt))


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
    g_lse2: Optional[Tensor],
    lse2: Tensor,
    lse2_mult: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dscale, dbias)`` from the gradients of the statistics
    (``k=None``: ``dq`` is the whole gradient of ``q`` and ``dk`` is empty)."""
    _check_lse2_mult(lse2_mult)
    if g_lse2 is not None and not lse2_mult > 0:
        raise ValueError("fastcl::contrastive_bwd: g_lse2 was given but lse2_mult is 0")
    return _bwd_kernel(backend, g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias,
                       targets, row_labels, col_labels, lse, pos, npos, col_lse,
                       exclude_diag, decoupled, pos_lse, col_stats,
                       g_lse2, lse2, lse2_mult)


def _bwd_kernel(backend, g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias,
                targets, row_labels, col_labels, lse, pos, npos, col_lse, exclude_diag,
                decoupled, pos_lse, col_stats, g_lse2=None, lse2=None, lse2_mult=0.0):
    """The backend's backward kernel; ``k=None`` on a backend outside
    :data:`SELF_BWD_BACKENDS` runs as ``k = q`` with ``dq + dk``; ``g_lse2`` on a backend
    outside :data:`LSE2_BACKENDS` takes a second run, the gradient of ``lse`` at ``lse2_mult``
    times the scale and bias."""
    masks = (targets, row_labels, col_labels)
    flags = (exclude_diag, decoupled, pos_lse, col_stats)
    if g_lse2 is not None and backend not in LSE2_BACKENDS:
        m = lse2_mult
        dq, dk, dscale, dbias = _bwd_kernel(
            backend, g_lse2, None, None, None, None, q, k, scale * m, bias * m, *masks, lse2, pos,
            npos, col_lse, exclude_diag, decoupled, pos_lse, False)
        dscale, dbias = dscale * m, dbias * m
        if any(g is not None for g in (g_lse, g_pos, g_mean, g_col_lse, g_col_mean)):
            rest = _bwd_kernel(backend, g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale,
                               bias, *masks, lse, pos, npos, col_lse, *flags)
            dq, dk, dscale, dbias = (a + b for a, b in zip(rest, (dq, dk, dscale, dbias)))
        return dq, dk, dscale, dbias
    bwd = _backends.kernel(backend, "contrastive_bwd")
    lse2_args = (g_lse2, lse2, lse2_mult) if g_lse2 is not None else ()
    if k is None and backend not in SELF_BWD_BACKENDS:
        dq, dk, dscale, dbias = bwd(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, q, scale,
                                    bias, *masks, lse, pos, npos, col_lse, *flags, *lse2_args)
        return dq + dk, _no_keys(q), dscale, dbias
    return bwd(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, *masks, lse, pos,
               npos, col_lse, *flags, *lse2_args)


def _no_keys(q: Tensor) -> Tensor:
    """The ``dk`` of ``k=None``: an empty ``[0, D]`` tensor."""
    return q.new_empty((0, q.shape[1]))


@contrastive_bwd.register_fake
def _(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, *rest):
    return (torch.empty_like(q), _no_keys(q) if k is None else torch.empty_like(k),
            torch.empty_like(scale), torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    (q, k, scale, bias, targets, row_labels, col_labels, *flags) = inputs
    lse, pos, npos, _mean, col_lse, _col_mean, lse2 = output
    ctx.save_for_backward(q, k, scale, bias, targets, row_labels, col_labels,
                          lse, pos, npos, col_lse, lse2)
    ctx.flags = tuple(flags)
    ctx.mark_non_differentiable(npos)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lse, g_pos, _g_npos, g_mean, g_col_lse, g_col_mean, g_lse2):
    (q, k, scale, bias, targets, row_labels, col_labels,
     lse, pos, npos, col_lse, lse2) = ctx.saved_tensors
    exclude_diag, decoupled, pos_lse, col_stats, lse2_mult, backend = ctx.flags
    need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
    if not (need_q or need_k or need_scale or need_bias):
        return (None,) * 13
    dq, dk, dscale, dbias = contrastive_bwd(
        g_lse, g_pos, g_mean,
        g_col_lse if col_stats else None, g_col_mean if col_stats else None,
        q, k, scale, bias, targets, row_labels, col_labels, lse, pos, npos, col_lse,
        exclude_diag, decoupled, pos_lse, col_stats,
        g_lse2 if lse2_mult > 0 else None, lse2, lse2_mult, backend,
    )
    return (dq if need_q else None, dk if need_k else None,
            dscale if need_scale else None, dbias if need_bias else None) + (None,) * 9


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
    lse, pos, npos, avg, *_ = _fwd_kernel(
        backend, q, k, scale, bias, targets, row_labels, col_labels, exclude_diag, decoupled,
        pos_lse, False, 0.0)
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
    lse2_mult: float = 0.0,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Keyword-friendly front of :func:`contrastive_fwd` (differentiable; ``k=None``: the keys
    are ``q``)."""
    return contrastive_fwd(q, k, scale, bias, targets, row_labels, col_labels,
                           exclude_diag, decoupled, pos_lse, col_stats, float(lse2_mult),
                           backend)
