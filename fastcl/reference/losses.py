"""Plain-PyTorch oracles of every loss in fastcl (the math of docs/LOSSES.md, one function each).

These functions materialize the full logit matrix and let PyTorch's autograd differentiate it.
They are written to be read and to be right, not to be fast: every fused kernel and every public
loss of fastcl is tested against them.

Conventions shared by all functions:

- ``scale`` (``a``) is the logit scale (``1 / temperature``), a Python float or a one-element
  tensor that may require grad; ``bias`` (``b``) likewise. The logit of a pair is
  ``s_ij = a * <q_i, k_j> (+ b)``.
- Computation happens in the input's floating dtype promoted to at least fp32
  (fp16 / bf16 -> fp32, fp32 -> fp32, fp64 -> fp64). The result is returned in that dtype.
- Inputs are used as given: no function normalizes its inputs (except where a peer's weighting
  is defined on the unit sphere, see :func:`dcl_ref`).
- ``reduction``: ``"mean"`` is the mean over the anchors that have at least one positive
  (``0`` if there are none), ``"sum"`` the sum, ``"none"`` the per-anchor vector (``0`` for an
  anchor without a positive).
- Bad arguments (unknown options, wrong shapes or dtypes, values out of range) raise
  ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "info_nce_ref",
    "nt_xent_ref",
    "supcon_ref",
    "multiview_ref",
    "hard_negative_nce_ref",
    "dcl_ref",
    "siglip_ref",
    "alignment_ref",
    "uniformity_ref",
    "topk_similarity_ref",
]

Scalar = Union[float, int, Tensor]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype the oracle computes in: the inputs' float dtype promoted to at least fp32."""
    dt = torch.float32
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _check_features(x: Tensor, name: str, ndim: int = 2) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_same_dim(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{na} and {nb} must have the same feature dimension, got {a.shape[-1]} and "
            f"{b.shape[-1]}"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _as_scalar(x: Scalar, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor of ``dtype`` on ``device``; a tensor keeps its autograd history."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a real number, got dtype {x.dtype}")
        return x.reshape(()).to(dtype=dtype, device=device)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a float or a scalar tensor, got {type(x).__name__}")
    return torch.tensor(float(x), dtype=dtype, device=device)


def _masked_logsumexp(s: Tensor, mask: Tensor, dim: int) -> Tensor:
    """``log sum_{mask} exp(s)`` along ``dim``; ``-inf`` with a zero (never NaN) gradient when
    the masked set is empty."""
    nonempty = mask.any(dim=dim, keepdim=True)
    filled = torch.where(nonempty, s.masked_fill(~mask, float("-inf")), torch.zeros_like(s))
    out = torch.logsumexp(filled, dim=dim)
    return torch.where(nonempty.squeeze(dim), out, torch.full_like(out, float("-inf")))


def _reduce(per_anchor: Tensor, has_pos: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` to a per-anchor loss vector (already ``0`` where ``~has_pos``).

    ``"mean"`` divides by the number of anchors with at least one positive."""
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    count = has_pos.sum().clamp_min(1).to(per_anchor.dtype)
    return per_anchor.sum() / count


def _check_targets(targets: Tensor, n_rows: int, n_cols: int) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dim() != 1:
        raise ValueError("targets must be a 1-D integer tensor")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.shape[0] != n_rows:
        raise ValueError(f"targets must have {n_rows} entries, got {targets.shape[0]}")
    if targets.numel() > 0 and (int(targets.min()) < -1 or int(targets.max()) >= n_cols):
        raise ValueError(f"targets must lie in [-1, {n_cols}) (-1 = no positive)")
    return targets.long()


# --------------------------------------------------------------------------------------------
# 1-2. InfoNCE, one direction or symmetric
# --------------------------------------------------------------------------------------------


def info_nce_ref(
    query: Tensor,
    key: Tensor,
    *,
    scale: Scalar,
    bias: Optional[Scalar] = None,
    targets: Optional[Tensor] = None,
    negatives: Optional[Tensor] = None,
    symmetric: bool = False,
    symmetric_weight: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE (CPC, MoCo, SimCSE, MNRL) and the symmetric CLIP / ConVIRT loss (LOSSES 1-2).

    ``query`` is ``[N, D]``, ``key`` is ``[M, D]``, optional ``negatives`` ``[Q, D]`` are appended
    as extra columns, so the logits are ``s = a * q @ [k; neg]^T + b`` of shape ``[N, M + Q]``.

    Row direction (query -> key), with target column ``t_i`` (default ``i``, which needs
    ``N <= M``; ``-1`` means "no positive") and label smoothing ``e``::

        l_i = LSE_j s_ij - (1 - e) s_{i,t_i} - e * mean_j s_ij

    (``j`` over all ``M + Q`` columns); this equals ``F.cross_entropy(s, t,
    label_smoothing=e, ignore_index=-1, reduction="none")``.

    Symmetric (``symmetric=True``; needs default targets and ``N == M``): the column direction
    (key -> query) uses the key columns only (not ``negatives``), over the ``N`` queries::

        l^col_j = LSE_i s_ij - (1 - e) s_jj - e * mean_i s_ij      (j < M)
        L = w * mean_i l^row_i + (1 - w) * mean_j l^col_j,          w = symmetric_weight

    ``reduction="none"`` returns ``w * l^row + (1 - w) * l^col`` per index (``[N]``), ``"sum"``
    its sum, ``"mean"`` its mean (= ``L``). For the one-directional loss ``"none"`` returns
    ``l`` (``[N]``, ``0`` where ``t_i = -1``), ``"mean"`` its mean over anchors with a target.
    """
    _check_features(query, "query")
    _check_features(key, "key")
    _check_same_dim(query, key, "query", "key")
    _check_reduction(reduction)
    if negatives is not None:
        _check_features(negatives, "negatives")
        _check_same_dim(query, negatives, "query", "negatives")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    N, M = query.shape[0], key.shape[0]
    Q = negatives.shape[0] if negatives is not None else 0
    dev = query.device
    dt = _compute_dtype(query, key, negatives)

    if symmetric:
        if targets is not None:
            raise ValueError("symmetric=True uses the diagonal targets; do not pass targets")
        if N != M:
            raise ValueError(f"symmetric=True needs as many queries as keys, got {N} and {M}")
        if not 0.0 <= float(symmetric_weight) <= 1.0:
            raise ValueError(f"symmetric_weight must lie in [0, 1], got {symmetric_weight}")
    if targets is None:
        if N > M:
            raise ValueError(f"default targets arange(N) need N <= M, got N={N}, M={M}")
        targets = torch.arange(N, device=dev)
    else:
        targets = _check_targets(targets, N, M + Q).to(dev)

    a = _as_scalar(scale, "scale", dt, dev)
    columns = key.to(dt) if negatives is None else torch.cat([key.to(dt), negatives.to(dt)])
    logits = a * (query.to(dt) @ columns.T)  # [N, M + Q]
    if bias is not None:
        logits = logits + _as_scalar(bias, "bias", dt, dev)

    e = float(label_smoothing)
    has_pos = targets >= 0
    safe_t = targets.clamp_min(0)
    s_pos = logits.gather(1, safe_t[:, None]).squeeze(1)
    l_row = torch.logsumexp(logits, dim=1) - (1.0 - e) * s_pos - e * logits.mean(dim=1)
    l_row = torch.where(has_pos, l_row, torch.zeros_like(l_row))

    if not symmetric:
        return _reduce(l_row, has_pos, reduction)

    key_logits = logits[:, :M]  # [N, N]: the column direction sees the keys only
    s_diag = torch.diagonal(key_logits)
    l_col = torch.logsumexp(key_logits, dim=0) - (1.0 - e) * s_diag - e * key_logits.mean(dim=0)
    w = float(symmetric_weight)
    per_index = w * l_row + (1.0 - w) * l_col
    return _reduce(per_index, torch.ones_like(has_pos), reduction)


# --------------------------------------------------------------------------------------------
# 3. NT-Xent
# --------------------------------------------------------------------------------------------


def nt_xent_ref(z1: Tensor, z2: Tensor, *, scale: Scalar, reduction: str = "mean") -> Tensor:
    """NT-Xent (SimCLR) over two views ``z1``, ``z2`` of ``N`` samples (LOSSES 3).

    ``Z = [z1; z2]`` (``2N`` rows), ``s_ij = a <Z_i, Z_j>``, positive ``p(i) = i + N mod 2N``::

        l_i = LSE_{j != i} s_ij - s_{i,p(i)},        L = mean over the 2N rows

    ``reduction="none"`` returns the ``[2N]`` vector ``l``.
    """
    _check_features(z1, "z1")
    _check_features(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    _check_reduction(reduction)
    N = z1.shape[0]
    dt = _compute_dtype(z1, z2)
    dev = z1.device
    a = _as_scalar(scale, "scale", dt, dev)
    Z = torch.cat([z1, z2]).to(dt)
    s = a * (Z @ Z.T)
    rows = torch.arange(2 * N, device=dev)
    positive = (rows + N) % (2 * N)
    not_self = rows[:, None] != rows[None, :]
    lse = _masked_logsumexp(s, not_self, dim=1)
    per_row = lse - s[rows, positive]
    return _reduce(per_row, torch.ones(2 * N, dtype=torch.bool, device=dev), reduction)


# --------------------------------------------------------------------------------------------
# 4. Supervised contrastive
# --------------------------------------------------------------------------------------------


def supcon_ref(
    features: Tensor,
    labels: Optional[Tensor] = None,
    *,
    scale: Scalar,
    variant: str = "out",
    base_temperature: Optional[float] = None,
    reduction: str = "mean",
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020; LOSSES 4).

    ``features`` is ``[N, V, D]`` (``[N, D]`` means ``V = 1``). Rows are ordered view-major as in
    HobbitLong/SupContrast (``torch.cat(torch.unbind(features, dim=1))``): row ``r`` is view
    ``r // N`` of sample ``r % N``, ``A = N * V`` rows. ``labels`` ``[N]`` default to the instance
    id ``arange(N)``. With ``s_ra = a <f_r, f_a>`` and ``P(r) = {p != r : y_p = y_r}``::

        "out": l_r = LSE_{a != r} s_ra - (1 / |P(r)|) sum_{p in P(r)} s_rp
        "in":  l_r = LSE_{a != r} s_ra - LSE_{p in P(r)} s_rp + log |P(r)|

    An anchor with ``P(r)`` empty has ``l_r = 0`` and no gradient. If ``base_temperature`` is
    given, every ``l_r`` is multiplied by ``(1 / a) / base_temperature``. ``"mean"`` is the mean
    over anchors with ``|P(r)| >= 1``; ``"none"`` returns the ``[A]`` vector.
    """
    if not isinstance(features, Tensor) or features.dim() not in (2, 3):
        raise ValueError("features must be a [N, V, D] or [N, D] tensor")
    _check_features(features, "features", features.dim())
    _check_reduction(reduction)
    if variant not in ("out", "in"):
        raise ValueError(f"variant must be 'out' or 'in', got {variant!r}")
    if features.dim() == 2:
        features = features.unsqueeze(1)
    N, V, _ = features.shape
    dev = features.device
    dt = _compute_dtype(features)
    if labels is None:
        labels = torch.arange(N, device=dev)
    else:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != N:
            raise ValueError(f"labels must be a 1-D tensor of {N} entries")
        labels = labels.to(dev)

    a = _as_scalar(scale, "scale", dt, dev)
    rows = torch.cat(torch.unbind(features, dim=1)).to(dt)  # [A, D], row r = view r//N, sample r%N
    row_labels = labels.repeat(V)  # label of row r is labels[r % N]
    A = N * V
    s = a * (rows @ rows.T)
    idx = torch.arange(A, device=dev)
    not_self = idx[:, None] != idx[None, :]
    pos = (row_labels[:, None] == row_labels[None, :]) & not_self
    npos = pos.sum(dim=1)
    has_pos = npos > 0

    lse_all = _masked_logsumexp(s, not_self, dim=1)
    if variant == "out":
        pos_term = torch.where(pos, s, torch.zeros_like(s)).sum(dim=1) / npos.clamp_min(1).to(dt)
    else:
        pos_term = _masked_logsumexp(s, pos, dim=1) - torch.log(npos.clamp_min(1).to(dt))
    per_anchor = torch.where(has_pos, lse_all - pos_term, torch.zeros_like(lse_all))
    if base_temperature is not None:
        if not float(base_temperature) > 0:
            raise ValueError(f"base_temperature must be positive, got {base_temperature}")
        per_anchor = per_anchor * ((1.0 / a) / float(base_temperature))
    return _reduce(per_anchor, has_pos, reduction)


# --------------------------------------------------------------------------------------------
# 5. Multi-view losses
# --------------------------------------------------------------------------------------------


def multiview_ref(
    views: Tensor,
    *,
    scale: Scalar,
    method: str = "mv_infonce",
    cmc_mode: str = "full",
    reduction: str = "mean",
) -> Tensor:
    """Multi-view contrastive losses over ``views`` ``[V, N, D]`` (LOSSES 5).

    ``s(il, jm) = a <views[l, i], views[m, j]>``. Per-sample terms ``c_i``:

    - ``"mv_infonce"`` (Koromilas et al.)::

          c_i = log sum_l sum_{(j,m) != (i,l)} exp s(il,jm) - log sum_{l != m} exp s(il,im)

    - ``"mv_dhel"`` (needs ``N >= 2``)::

          c_i = sum_l LSE_{j != i} s(il,jl) - LSE_{l < m} s(il,im)

    - ``"cmc"``: ``c_i = sum_{(l,m) in pairs} (l^{l->m}_i + l^{m->l}_i)`` with the InfoNCE term
      ``l^{l->m}_i = LSE_j s(il,jm) - s(il,im)``; pairs are all ``l < m`` (``cmc_mode="full"``)
      or ``(0, m)``, ``m >= 1`` (``"core"``). ``mean_i c_i`` is then the CMC loss
      ``sum_pairs (L^{l->m} + L^{m->l})`` with each ``L`` a mean over ``N``.

    ``"mean"`` returns ``mean_i c_i``, ``"sum"`` ``sum_i c_i``, ``"none"`` the ``[N]`` vector.
    """
    _check_features(views, "views", ndim=3)
    _check_reduction(reduction)
    if method not in ("mv_infonce", "mv_dhel", "cmc"):
        raise ValueError(f"method must be 'mv_infonce', 'mv_dhel' or 'cmc', got {method!r}")
    if cmc_mode not in ("full", "core"):
        raise ValueError(f"cmc_mode must be 'full' or 'core', got {cmc_mode!r}")
    V, N, _ = views.shape
    if V < 2:
        raise ValueError(f"multi-view losses need at least 2 views, got {V}")
    if method == "mv_dhel" and N < 2:
        raise ValueError("mv_dhel needs at least 2 samples (its uniformity term is over j != i)")
    dev = views.device
    dt = _compute_dtype(views)
    a = _as_scalar(scale, "scale", dt, dev)
    x = views.to(dt)
    # S[l, m, i, j] = s(il, jm)
    S = a * torch.einsum("lid,mjd->lmij", x, x)
    view_idx = torch.arange(V, device=dev)
    sample_idx = torch.arange(N, device=dev)
    same_sample = sample_idx[:, None] == sample_idx[None, :]  # [N, N]
    S_ii = torch.diagonal(S, dim1=2, dim2=3)  # [V, V, N]: s(il, im)

    if method == "mv_infonce":
        # denominator: every (l, j, m) with (j, m) != (i, l); numerator: (l, m) with l != m
        same_view = view_idx[:, None] == view_idx[None, :]  # [V, V]
        is_self = same_view[:, :, None, None] & same_sample[None, None, :, :]  # [V, V, N, N]
        den_logits = S.permute(2, 0, 1, 3).reshape(N, -1)  # [i, (l, m, j)]
        den_mask = (~is_self).permute(2, 0, 1, 3).reshape(N, -1)
        num_logits = S_ii.permute(2, 0, 1).reshape(N, -1)  # [i, (l, m)]
        num_mask = (~same_view).reshape(1, -1).expand(N, -1)
        per_sample = _masked_logsumexp(den_logits, den_mask, 1) - _masked_logsumexp(
            num_logits, num_mask, 1
        )
    elif method == "mv_dhel":
        within = S[view_idx, view_idx]  # [V, N, N]: s(il, jl)
        uniformity = _masked_logsumexp(within, ~same_sample[None].expand(V, -1, -1), 2).sum(0)
        upper = view_idx[:, None] < view_idx[None, :]
        num_logits = S_ii.permute(2, 0, 1).reshape(N, -1)
        num_mask = upper.reshape(1, -1).expand(N, -1)
        per_sample = uniformity - _masked_logsumexp(num_logits, num_mask, 1)
    else:
        if cmc_mode == "full":
            pairs = [(l, m) for l in range(V) for m in range(l + 1, V)]
        else:
            pairs = [(0, m) for m in range(1, V)]
        per_sample = torch.zeros(N, dtype=dt, device=dev)
        for l, m in pairs:
            s_lm = S[l, m]  # [N, N]: rows are view l anchors, columns view m candidates
            pos = torch.diagonal(s_lm)
            l_to_m = torch.logsumexp(s_lm, dim=1) - pos
            m_to_l = torch.logsumexp(s_lm, dim=0) - pos  # S[m, l] = S[l, m]^T
            per_sample = per_sample + l_to_m + m_to_l
    return _reduce(per_sample, torch.ones(N, dtype=torch.bool, device=dev), reduction)


# --------------------------------------------------------------------------------------------
# 6. Hard-negative (HCL) and debiased (DCL-debiased) InfoNCE
# --------------------------------------------------------------------------------------------


def hard_negative_nce_ref(
    z1: Tensor,
    z2: Tensor,
    *,
    scale: Scalar,
    beta: float,
    tau_plus: float,
    layout: str = "two_view",
    reduction: str = "mean",
) -> Tensor:
    """Hard-negative / debiased InfoNCE (Robinson et al. 2021, Chuang et al. 2020; LOSSES 6).

    With ``tau = 1 / a``, for anchor ``i`` with positive logit ``s_p`` and negatives ``s_n``
    (``Nn`` of them), all ``s = a <z_i, z_j>``::

        imp_n = exp(beta * s_n)                                (not detached, as in joshr17/HCL)
        R_i   = sum_n imp_n exp(s_n) / mean_n imp_n
        Ng_i  = max((R_i - tau_plus * Nn * exp(s_p)) / (1 - tau_plus), Nn * exp(-1 / tau))
        l_i   = -log(exp(s_p) / (exp(s_p) + Ng_i))

    Layouts: ``"two_view"``: ``Z = [z1; z2]`` (``2N`` rows), positive ``i +- N``, negatives the
    other ``2N - 2`` rows; ``"paired"``: queries ``z1``, keys ``z2``, positive ``k_i``, negatives
    the other ``N - 1`` keys. ``"none"`` returns the per-row vector (``[2N]`` or ``[N]``).

    Evaluated in log space (``log R_i = LSE_n (1+beta) s_n - LSE_n beta s_n + log Nn`` and
    ``l_i = log(1 + Ng_i exp(-s_p))``) so that large scales do not overflow; the value and the
    gradient are those of the formula above (the ``max`` sends the gradient to the larger side).
    ``beta = 0, tau_plus = 0`` is InfoNCE / NT-Xent whenever the clamp is inactive (always for
    unit vectors).
    """
    _check_features(z1, "z1")
    _check_features(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    _check_reduction(reduction)
    if layout not in ("two_view", "paired"):
        raise ValueError(f"layout must be 'two_view' or 'paired', got {layout!r}")
    tau_plus = float(tau_plus)
    beta = float(beta)
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must lie in [0, 1), got {tau_plus}")
    N = z1.shape[0]
    dev = z1.device
    dt = _compute_dtype(z1, z2)
    a = _as_scalar(scale, "scale", dt, dev)

    if layout == "two_view":
        Z = torch.cat([z1, z2]).to(dt)
        s = a * (Z @ Z.T)  # [2N, 2N]
        R = 2 * N
        rows = torch.arange(R, device=dev)
        positive = (rows + N) % R
    else:
        s = a * (z1.to(dt) @ z2.to(dt).T)  # [N, N]
        R = N
        rows = torch.arange(R, device=dev)
        positive = rows
    cols = torch.arange(s.shape[1], device=dev)
    negative = (cols[None, :] != rows[:, None]) & (cols[None, :] != positive[:, None])
    Nn = R - 2 if layout == "two_view" else N - 1
    if Nn < 1:
        raise ValueError("hard_negative_nce_ref needs at least one negative per anchor")

    s_p = s[rows, positive]  # [R]
    s_n = s[negative].reshape(R, Nn)  # [R, Nn]
    log_R = torch.logsumexp((1.0 + beta) * s_n, 1) - torch.logsumexp(beta * s_n, 1) + math.log(Nn)
    if tau_plus == 0.0:
        log_ng_est = log_R
    else:
        # Ng_est = R (1 - u) / (1 - tau_plus) with u = tau_plus Nn exp(s_p) / R; valid while u < 1
        log_u = math.log(tau_plus * Nn) + s_p - log_R
        valid = log_u < 0
        safe_log_u = torch.where(valid, log_u, torch.full_like(log_u, -1.0))
        log_ng_est = log_R + torch.log(-torch.expm1(safe_log_u)) - math.log(1.0 - tau_plus)
        log_ng_est = torch.where(valid, log_ng_est, torch.full_like(log_ng_est, float("-inf")))
    log_floor = math.log(Nn) - a  # log(Nn exp(-1/tau))
    log_ng = torch.maximum(log_ng_est, log_floor.expand_as(log_ng_est))
    per_row = torch.logaddexp(torch.zeros_like(log_ng), log_ng - s_p)
    return _reduce(per_row, torch.ones(R, dtype=torch.bool, device=dev), reduction)


# --------------------------------------------------------------------------------------------
# 7. Decoupled contrastive learning
# --------------------------------------------------------------------------------------------


def dcl_ref(
    z1: Tensor,
    z2: Tensor,
    *,
    scale: Scalar,
    weighted: bool = False,
    sigma: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """Decoupled contrastive loss, DCL and DCLW (Yeh et al. 2022; lightly's DCLLoss / DCLWLoss).

    ``Z = [z1; z2]`` (``2N`` rows, ``N >= 2``), ``s_ij = a <Z_i, Z_j>``, positive
    ``p(i) = i +- N``, negatives ``Neg(i)`` = both views of every other sample (``2N - 2``)::

        l_i = -w_{i mod N} s_{i,p(i)} + LSE_{n in Neg(i)} s_in,     L = mean over the 2N rows

    (= ``(l(z1, z2) + l(z2, z1)) / 2`` of lightly). ``w = 1`` for DCL; for DCLW
    (``weighted=True``) ``w_i = 2 - N softmax_i(<z1_i, z2_i> / sigma)``, softmax over the batch,
    detached, with the inner product of the unit-normalized ``z1_i``, ``z2_i`` (lightly computes
    it on the normalized embeddings). ``"none"`` returns the ``[2N]`` vector ``l``.
    """
    _check_features(z1, "z1")
    _check_features(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    _check_reduction(reduction)
    N = z1.shape[0]
    if N < 2:
        raise ValueError("dcl_ref needs at least 2 samples (the negatives are the other samples)")
    if weighted and not float(sigma) > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    dev = z1.device
    dt = _compute_dtype(z1, z2)
    a = _as_scalar(scale, "scale", dt, dev)
    Z = torch.cat([z1, z2]).to(dt)
    s = a * (Z @ Z.T)
    rows = torch.arange(2 * N, device=dev)
    positive = (rows + N) % (2 * N)
    negative = (rows[None, :] != rows[:, None]) & (rows[None, :] != positive[:, None])
    s_pos = s[rows, positive]
    if weighted:
        with torch.no_grad():
            u1 = F.normalize(z1.detach().to(dt), dim=1)
            u2 = F.normalize(z2.detach().to(dt), dim=1)
            w = 2.0 - N * torch.softmax((u1 * u2).sum(dim=1) / float(sigma), dim=0)
        s_pos = w.repeat(2) * s_pos
    per_row = _masked_logsumexp(s, negative, dim=1) - s_pos
    return _reduce(per_row, torch.ones(2 * N, dtype=torch.bool, device=dev), reduction)


# --------------------------------------------------------------------------------------------
# 8. SigLIP
# --------------------------------------------------------------------------------------------


def siglip_ref(
    x: Tensor,
    y: Tensor,
    *,
    scale: Scalar,
    bias: Optional[Scalar],
    reduction: str = "mean",
) -> Tensor:
    """Sigmoid loss (SigLIP; LOSSES 8), ``x`` and ``y`` ``[N, D]``::

        L = -(1/N) sum_ij log sigmoid(z_ij (a <x_i, y_j> + b)),   z_ij = +1 if i == j else -1

    ``"mean"`` is that ``L`` (sum over all ``N^2`` pairs divided by ``N``, as in the paper and
    open_clip), ``"sum"`` the total over pairs, ``"none"`` the per-row sums ``[N]``.
    ``bias=None`` means ``b = 0``.
    """
    _check_features(x, "x")
    _check_features(y, "y")
    _check_same_dim(x, y, "x", "y")
    _check_reduction(reduction)
    N = x.shape[0]
    if y.shape[0] != N:
        raise ValueError(f"siglip_ref needs as many x as y rows, got {N} and {y.shape[0]}")
    dev = x.device
    dt = _compute_dtype(x, y)
    a = _as_scalar(scale, "scale", dt, dev)
    logits = a * (x.to(dt) @ y.to(dt).T)
    if bias is not None:
        logits = logits + _as_scalar(bias, "bias", dt, dev)
    z = 2.0 * torch.eye(N, dtype=dt, device=dev) - 1.0
    per_row = -F.logsigmoid(z * logits).sum(dim=1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / max(N, 1)


# --------------------------------------------------------------------------------------------
# 9. Alignment and uniformity
# --------------------------------------------------------------------------------------------


def alignment_ref(x: Tensor, y: Tensor, alpha: float = 2) -> Tensor:
    """Alignment (Wang & Isola 2020; LOSSES 9): ``mean_i ||x_i - y_i||^alpha``.

    Computed as ``(||x_i - y_i||^2)^(alpha / 2)``, exact for any vectors (no unit norm assumed).
    """
    _check_features(x, "x")
    _check_features(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("alignment_ref needs at least one pair")
    if not float(alpha) > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    dt = _compute_dtype(x, y)
    sq = (x.to(dt) - y.to(dt)).pow(2).sum(dim=1)
    return sq.pow(float(alpha) / 2.0).mean()


def uniformity_ref(x: Tensor, t: float = 2) -> Tensor:
    """Uniformity (Wang & Isola 2020; LOSSES 9)::

        L_unif = log mean_{i != j} exp(-t ||x_i - x_j||^2)

    over the ``N (N - 1)`` ordered pairs (``N >= 2``), with the exact squared distances
    (differences, not ``2 - 2 <x_i, x_j>``; no unit norm assumed).
    """
    _check_features(x, "x")
    N = x.shape[0]
    if N < 2:
        raise ValueError("uniformity_ref needs at least 2 points")
    dt = _compute_dtype(x)
    xd = x.to(dt)
    sq = torch.cdist(xd, xd, compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # [N, N]
    idx = torch.arange(N, device=x.device)
    off_diag = idx[:, None] != idx[None, :]
    return torch.logsumexp(-float(t) * sq[off_diag], dim=0) - math.log(N * (N - 1))


# --------------------------------------------------------------------------------------------
# 10. Top-k similarity search
# --------------------------------------------------------------------------------------------


def topk_similarity_ref(
    query: Tensor, key: Tensor, k: int, exclude_self: bool = False
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest ``<q_i, k_j>`` of every query and their column indices (LOSSES 10).

    ``query`` ``[N, D]``, ``key`` ``[M, D]``. Returns ``(values, indices)``, both ``[N, k]``,
    sorted by decreasing value (values in the compute dtype, indices int64).
    ``exclude_self`` drops column ``j == i`` from row ``i`` (then ``k <= M - 1``).
    """
    _check_features(query, "query")
    _check_features(key, "key")
    _check_same_dim(query, key, "query", "key")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    M = key.shape[0]
    limit = M - 1 if exclude_self else M
    if not 1 <= k <= limit:
        raise ValueError(f"k must lie in [1, {limit}], got {k}")
    dt = _compute_dtype(query, key)
    sim = query.to(dt) @ key.to(dt).T
    if exclude_self:
        rows = torch.arange(query.shape[0], device=query.device)
        cols = torch.arange(M, device=query.device)
        sim = sim.masked_fill(rows[:, None] == cols[None, :], float("-inf"))
    values, indices = torch.topk(sim, k, dim=1, largest=True, sorted=True)
    return values, indices
