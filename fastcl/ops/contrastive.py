"""The fused contrastive primitive as a ``torch.library`` custom op with autograd.

``fastcl::contrastive_fwd`` returns the per-row / per-column statistics defined in
:mod:`fastcl.reference.contrastive`; ``fastcl::contrastive_bwd`` turns the gradients of those
statistics into gradients of ``q``, ``k``, the logit scale and the bias, recomputing the logits
tile by tile. Both take the name of the kernel backend (``"triton"``, ``"cuda"`` or ``"cpu"``)
as their last argument; the functional layer picks it through :mod:`fastcl.dispatch`.

Both ops have fake (meta) kernels, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backends

__all__ = ["contrastive_fwd", "contrastive_bwd", "contrastive_stats"]


def _stat_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastcl::contrastive_fwd", mutates_args=())
def contrastive_fwd(
    q: Tensor,
    k: Tensor,
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
    """Statistics ``(lse, pos, npos, mean, col_lse, col_mean)`` of ``scale * q @ k.T + bias``."""
    fwd = _backends.kernel(backend, "contrastive_fwd")
    return fwd(q, k, scale, bias, targets, row_labels, col_labels,
               exclude_diag, decoupled, pos_lse, col_stats)


@contrastive_fwd.register_fake
def _(q, k, scale, bias, targets, row_labels, col_labels, exclude_diag, decoupled, pos_lse,
      col_stats, backend):
    dt = _stat_dtype(q)
    R, C = q.shape[0], k.shape[0]
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
    k: Tensor,
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
    """Gradients ``(dq, dk, dscale, dbias)`` from the gradients of the statistics."""
    bwd = _backends.kernel(backend, "contrastive_bwd")
    return bwd(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, targets,
               row_labels, col_labels, lse, pos, npos, col_lse,
               exclude_diag, decoupled, pos_lse, col_stats)


@contrastive_bwd.register_fake
def _(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, *rest):
    return (torch.empty_like(q), torch.empty_like(k),
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


def contrastive_stats(
    q: Tensor,
    k: Tensor,
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
    """Keyword-friendly front of :func:`contrastive_fwd` (differentiable)."""
    return contrastive_fwd(q, k, scale, bias, targets, row_labels, col_labels,
                           exclude_diag, decoupled, pos_lse, col_stats, backend)
