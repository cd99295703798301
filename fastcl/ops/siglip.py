"""The sigmoid loss (SigLIP) as ``torch.library`` custom ops with autograd.

- ``fastcl::siglip_fwd``: the per-row sums ``[R]`` of ``softplus(-z_ij s_ij)`` for ``x`` of
  ``[R, D]`` and ``y`` of ``[C, D]``, ``s = scale * x @ y.T + bias``, ``z = +1`` on the diagonal
  ``i == j`` when ``diag_pos`` and ``-1`` elsewhere (every pair is negative when not
  ``diag_pos``, as the texts of other ranks are for an image); its autograd calls
  ``fastcl::siglip_bwd``, which recomputes the logit tiles (any upstream gradient).
- ``fastcl::siglip_fused``: the loss reduced by ``mean`` (sum over pairs / R) or ``sum``
  together with its gradients ``(dx, dy, dscale, dbias)``, all from one pass over the tiles:
  the gradient of every pair is known in the forward. Its autograd multiplies those saved
  gradients by the upstream scalar, so the backward launches no kernel. The gradients are
  computed even when no backward follows: use it when gradients are wanted.

Every op takes the name of the kernel backend (``"triton"``, ``"cuda"``, ``"cpu"`` or the
materializing ``"torch"``) as its last argument, and has a fake kernel for ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends

__all__ = ["siglip_fwd", "siglip_bwd", "siglip_fused", "FUSED_BACKENDS"]

#: Backends whose kernels include ``siglip_fused`` (the others run ``siglip_fwd`` then
#: ``siglip_bwd``). A static list: it is consulted while tracing, when nothing may be imported.
FUSED_BACKENDS = ("triton", "cuda", "cpu", "torch")


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastcl::siglip_fwd", mutates_args=())
def siglip_fwd(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_pos: bool,
               backend: str) -> Tensor:
    """Per-row sums ``[R]`` of the pair losses ``-log sigmoid(z_ij (scale <x_i, y_j> + bias))``."""
    return _backends.kernel(backend, "siglip_fwd")(x, y, scale, bias, diag_pos)


@siglip_fwd.register_fake
def _(x, y, scale, bias, diag_pos, backend):
    return x.new_empty(x.shape[0], dtype=_stat_dtype(x))


@torch.library.custom_op("fastcl::siglip_bwd", mutates_args=())
def siglip_bwd(g_row: Tensor, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor,
               diag_pos: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dy, dscale, dbias)`` of ``sum_i g_row[i] * row_loss[i]``."""
    return _backends.kernel(backend, "siglip_bwd")(g_row, x, y, scale, bias, diag_pos)


@siglip_bwd.register_fake
def _(g_row, x, y, scale, bias, diag_pos, backend):
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale),
            torch.empty_like(bias))


def _setup_fwd(ctx, inputs, output):
    x, y, scale, bias, diag_pos, backend = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.diag_pos, ctx.backend = diag_pos, backend
    ctx.set_materialize_grads(False)


def _backward_fwd(ctx, g_row):
    x, y, scale, bias = ctx.saved_tensors
    if g_row is None or not any(ctx.needs_input_grad[:4]):
        return None, None, None, None, None, None
    dx, dy, dscale, dbias = siglip_bwd(g_row, x, y, scale, bias, ctx.diag_pos, ctx.backend)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dy if need[1] else None,
            dscale if need[2] else None, dbias if need[3] else None, None, None)


siglip_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


@torch.library.custom_op("fastcl::siglip_fused", mutates_args=())
def siglip_fused(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_pos: bool, mean: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dx, dy, dscale, dbias)``: the reduced loss and its gradients, one pass."""
    return _backends.kernel(backend, "siglip_fused")(x, y, scale, bias, diag_pos, mean)


@siglip_fused.register_fake
def _(x, y, scale, bias, diag_pos, mean, backend):
    return (x.new_empty((), dtype=_stat_dtype(x)), torch.empty_like(x), torch.empty_like(y),
            torch.empty_like(scale), torch.empty_like(bias))


def _setup_fused(ctx, inputs, output):
    _loss, dx, dy, dscale, dbias = output
    ctx.save_for_backward(dx, dy, dscale, dbias)
    ctx.mark_non_differentiable(dx, dy, dscale, dbias)
    ctx.set_materialize_grads(False)


def _backward_fused(ctx, g_loss, *_unused):
    if g_loss is None:
        return None, None, None, None, None, None, None
    dx, dy, dscale, dbias = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = g_loss.detach()
    # a 0-dim fp32 factor keeps dx's dtype; the product is rounded once
    return (dx * g if need[0] else None,
            dy * g if need[1] else None,
            (dscale * g).to(dscale.dtype) if need[2] else None,
            (dbias * g).to(dbias.dtype) if need[3] else None, None, None, None)


siglip_fused.register_autograd(_backward_fused, setup_context=_setup_fused)
