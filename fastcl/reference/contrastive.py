"""The oracle of the fused contrastive primitive that every kernel backend implements.

Every softmax-family loss in fastcl (InfoNCE, symmetric CLIP, NT-Xent, SupCon, DCL, the
multi-view losses) is a function of a handful of per-row and per-column statistics of the logit
matrix ``s = scale * q @ k.T + bias``. The kernels compute those statistics tile by tile without
holding ``s``; this module computes them by materializing ``s``, in plain PyTorch, so that the
kernels' forward is compared with :func:`contrastive_stats_ref` and their backward with the
autograd of the same function.

Definitions, for rows ``r < R`` (queries) and columns ``c < C`` (keys):

- ``allowed[r, c]``: ``False`` where ``exclude_diag`` and ``r == c`` (an anchor is never its own
  candidate), else ``True``.
- ``pos[r, c]``: the positives of row ``r``. Label mode (``row_labels`` and ``col_labels``
  given): ``row_labels[r] == col_labels[c] and allowed[r, c]``. Target mode (``targets`` given):
  ``c == targets[r] and allowed[r, c]``; a target of ``-1`` means no positive. Neither: no
  positives.
- ``den[r, c]``: the denominator set: ``allowed & ~pos`` when ``decoupled`` (DCL), else
  ``allowed``.

Statistics returned, all in fp32 (fp64 for fp64 inputs):

- ``lse[r]  = log sum_{c in den} exp(s[r, c])`` (``-inf`` when the set is empty),
- ``pos[r]  = mean_{c in pos} s[r, c]``, or ``log sum_{c in pos} exp(s[r, c])`` when
  ``pos_lse``; ``0`` for a row without positives,
- ``npos[r] = |pos(r)|`` as a float (not differentiable),
- ``mean[r] = mean_{c in den} s[r, c]`` (``0`` when the set is empty),
- ``col_lse[c] = log sum_{r: allowed[r, c]} exp(s[r, c])`` and
  ``col_mean[c] = mean_{r: allowed[r, c]} s[r, c]``, only when ``col_stats`` (else empty),
- ``lse2[r] = log sum_{c in den} exp(lse2_mult * s[r, c])``, a second log-sum-exp of the
  denominator set at the logits times ``lse2_mult`` (the hard-negative weighting needs two),
  only when ``lse2_mult > 0`` (else empty). Its maximum is ``lse2_mult`` times that of ``lse``,
  so a streaming kernel keeps one more running sum per row, not another maximum.

The gradient of any scalar ``L`` built from these statistics is ``dL/ds = G`` with

``G[r,c] = g_lse[r] den[r,c] exp(s[r,c] - lse[r])``
``       + g_pos[r] pos[r,c] (exp(s[r,c] - pos[r]) if pos_lse else 1 / npos[r])``
``       + g_mean[r] den[r,c] / |den(r)|``
``       + g_col_lse[c] allowed[r,c] exp(s[r,c] - col_lse[c])``
``       + g_col_mean[c] allowed[r,c] / |allowed(:, c)|``
``       + g_lse2[r] den[r,c] lse2_mult exp(lse2_mult s[r,c] - lse2[r])``

and ``dq = scale * G @ k``, ``dk = scale * G.T @ q``, ``dscale = sum(G * (q @ k.T))``,
``dbias = sum(G)``. Kernels compute ``G`` tile by tile from the saved statistics. In the backward,
``npos`` is the statistic passed in and ``|den(r)|`` is counted from it as
``max(C - [exclude_diag and r < C] - [decoupled] npos[r], 1)`` (the forward's ``npos`` gives the
size of the set), so that a caller merging several column blocks (``gather="ring"``) can pass the
global ``npos`` and rescale ``g_mean`` per block.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["contrastive_stats_ref", "contrastive_masks_ref"]


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def contrastive_masks_ref(
    R: int,
    C: int,
    targets: Optional[Tensor],
    row_labels: Optional[Tensor],
    col_labels: Optional[Tensor],
    exclude_diag: bool,
    decoupled: bool,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean ``[R, C]`` masks ``(allowed, pos, den)`` as defined in the module docstring."""
    r = torch.arange(R, device=device)[:, None]
    c = torch.arange(C, device=device)[None, :]
    allowed = torch.ones(R, C, dtype=torch.bool, device=device)
    if exclude_diag:
        allowed = allowed & (r != c)
    if row_labels is not None:
        pos = (row_labels.reshape(-1, 1) == col_labels.reshape(1, -1)) & allowed
    elif targets is not None:
        pos = (c == targets.reshape(-1, 1)) & allowed
    else:
        pos = torch.zeros(R, C, dtype=torch.bool, device=device)
    den = allowed & ~pos if decoupled else allowed
    return allowed, pos, den


def _masked_lse(s: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Log-sum-exp over ``mask``; ``-inf`` (with a zero, not NaN, gradient) for an empty set."""
    nonempty = mask.any(dim, keepdim=True)
    filled = torch.where(nonempty, s.masked_fill(~mask, float("-inf")), torch.zeros_like(s))
    out = torch.logsumexp(filled, dim=dim)
    return torch.where(nonempty.squeeze(dim), out, torch.full_like(out, float("-inf")))


def _masked_mean(s: Tensor, mask: Tensor, dim: int) -> Tensor:
    count = mask.sum(dim).clamp_min(1).to(s.dtype)
    return torch.where(mask, s, torch.zeros_like(s)).sum(dim) / count


def contrastive_stats_ref(
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
    lse2_mult: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Materialize ``s`` and return ``(lse, pos, npos, mean, col_lse, col_mean, lse2)``.

    ``q`` is ``[R, D]``, ``k`` is ``[C, D]``, ``scale`` and ``bias`` are 0-dim tensors (they may
    require grad). See the module docstring for the exact definitions.
    """
    dt = _stat_dtype(q)
    R, C = q.shape[0], k.shape[0]
    s = scale.to(dt) * (q.to(dt) @ k.to(dt).T) + bias.to(dt)
    allowed, pos, den = contrastive_masks_ref(
        R, C, targets, row_labels, col_labels, exclude_diag, decoupled, q.device
    )
    npos = pos.sum(1).to(dt)
    lse = _masked_lse(s, den, 1)
    has_pos = npos > 0
    if pos_lse:
        pos_stat = _masked_lse(s, pos, 1)
        pos_stat = torch.where(has_pos, pos_stat, torch.zeros_like(pos_stat))
    else:
        pos_stat = _masked_mean(s, pos, 1)
    mean = _masked_mean(s, den, 1)
    if col_stats:
        col_lse = _masked_lse(s, allowed, 0)
        col_mean = _masked_mean(s, allowed, 0)
    else:
        col_lse = s.new_empty(0)
        col_mean = s.new_empty(0)
    lse2 = _masked_lse(lse2_mult * s, den, 1) if lse2_mult > 0 else s.new_empty(0)
    return lse, pos_stat, npos, mean, col_lse, col_mean, lse2
