"""The fused ops implemented by materializing the logits (the op backend named "torch").

Forward: :func:`fastcl.reference.contrastive_stats_ref`; backward: the gradient tile ``G`` of
the formula in :mod:`fastcl.reference.contrastive`, built for the whole matrix at once. It
holds N x M tensors, so ``backend="auto"`` never picks it: it checks the op plumbing in tests.
"""

from __future__ import annotations

import torch

from ..reference.contrastive import contrastive_masks_ref, contrastive_stats_ref


def contrastive_fwd(q, k, scale, bias, targets, row_labels, col_labels,
                    exclude_diag, decoupled, pos_lse, col_stats, lse2_mult=0.0):
    out = contrastive_stats_ref(q.detach(), k.detach(), scale.detach(), bias.detach(), targets,
                                row_labels, col_labels, exclude_diag=exclude_diag,
                                decoupled=decoupled, pos_lse=pos_lse, col_stats=col_stats,
                                lse2_mult=lse2_mult)
    return tuple(t.contiguous() for t in out)


def contrastive_bwd(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, targets,
                    row_labels, col_labels, lse, pos, npos, col_lse,
                    exclude_diag, decoupled, pos_lse, col_stats, g_lse2=None, lse2=None,
                    lse2_mult=0.0):
    dt = lse.dtype
    R, C = q.shape[0], k.shape[0]
    dots = q.to(dt) @ k.to(dt).T
    s = scale.to(dt) * dots + bias.to(dt)
    allowed, posm, den = contrastive_masks_ref(R, C, targets, row_labels, col_labels,
                                               exclude_diag, decoupled, q.device)
    zero = torch.zeros((), dtype=dt, device=q.device)
    G = torch.zeros_like(s)
    if g_lse is not None:
        G += torch.where(den, g_lse[:, None] * torch.exp(s - lse[:, None]), zero)
    if g_lse2 is not None:
        G += torch.where(den, (g_lse2 * lse2_mult)[:, None]
                         * torch.exp(lse2_mult * s - lse2[:, None]), zero)
    if g_pos is not None:
        if pos_lse:
            coef = torch.exp(s - pos[:, None])
        else:
            coef = (1.0 / npos.clamp_min(1))[:, None].expand(R, C)
        G += torch.where(posm, g_pos[:, None] * coef, zero)
    if g_mean is not None:  # the kernels' count of den(r), from the npos passed in
        count = torch.full((R,), float(C), dtype=dt, device=q.device)
        if exclude_diag:
            count = count - (torch.arange(R, device=q.device) < C).to(dt)
        if decoupled:
            count = count - npos.to(dt)
        G += torch.where(den, (g_mean / count.clamp_min(1))[:, None], zero)
    if g_col_lse is not None:
        G += torch.where(allowed, g_col_lse[None, :] * torch.exp(s - col_lse[None, :]), zero)
    if g_col_mean is not None:
        G += torch.where(allowed, (g_col_mean / allowed.sum(0).clamp_min(1).to(dt))[None, :], zero)
    a = scale.to(dt)
    dq = (a * (G @ k.to(dt))).to(q.dtype)
    dk = (a * (G.T @ q.to(dt))).to(k.dtype)
    dscale = (G * dots).sum().to(scale.dtype)
    dbias = G.sum().to(bias.dtype)
    return dq, dk, dscale, dbias


# --------------------------------------------------------------------------------------------
# sigmoid loss (SigLIP) and top-k similarity
# --------------------------------------------------------------------------------------------

def _siglip_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _siglip_logits(x, y, scale, bias, diag_pos):
    """``(dots, s, z)`` of the contract in :mod:`fastcl.ops.siglip`, in the statistics dtype."""
    dt = _siglip_dtype(x)
    xs, ys = x.detach().to(dt), y.detach().to(dt)
    dots = xs @ ys.T
    s = scale.detach().to(dt) * dots + bias.detach().to(dt)
    R, C = dots.shape
    diag = torch.arange(R, device=x.device)[:, None] == torch.arange(C, device=x.device)[None, :]
    z = torch.where(diag & bool(diag_pos), 1.0, -1.0).to(dt)
    return dots, s, z


def siglip_fwd(x, y, scale, bias, diag_pos):
    _dots, s, z = _siglip_logits(x, y, scale, bias, diag_pos)
    return torch.nn.functional.softplus(-z * s).sum(1).contiguous()


def siglip_bwd(g_row, x, y, scale, bias, diag_pos):
    dt = _siglip_dtype(x)
    dots, s, z = _siglip_logits(x, y, scale, bias, diag_pos)
    G = -g_row.detach().to(dt)[:, None] * z * torch.sigmoid(-z * s)
    a = scale.detach().to(dt)
    dx = (a * (G @ y.detach().to(dt))).to(x.dtype)
    dy = (a * (G.T @ x.detach().to(dt))).to(y.dtype)
    return dx, dy, (G * dots).sum().to(scale.dtype), G.sum().to(bias.dtype)


def siglip_fused(x, y, scale, bias, diag_pos, mean):
    R = x.shape[0]
    rows = siglip_fwd(x, y, scale, bias, diag_pos)
    g = torch.full((R,), 1.0 / max(R, 1) if mean else 1.0, dtype=rows.dtype, device=x.device)
    dx, dy, dscale, dbias = siglip_bwd(g, x, y, scale, bias, diag_pos)
    loss = rows.sum() / max(R, 1) if mean else rows.sum()
    return loss, dx, dy, dscale, dbias


def topk_fwd(query, key, k, exclude_self):
    from ..reference.losses import topk_similarity_ref

    values, indices = topk_similarity_ref(query.detach(), key.detach(), k,
                                          exclude_self=exclude_self)
    return values.contiguous(), indices.contiguous()
