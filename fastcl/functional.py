"""The public loss functions of fastcl.

Every function validates its inputs, picks a backend through :mod:`fastcl.dispatch`, and either
composes the fused statistics of :func:`fastcl.ops.contrastive.contrastive_stats` (no N x M
matrix in memory, forward or backward; a reduced one-direction loss with gradients on a backend
of :data:`fastcl.ops.contrastive.FUSED_BACKENDS`, or of ``SELF_FUSED_BACKENDS`` for a loss over
one feature set, takes the one-sweep :func:`fastcl.ops.contrastive.contrastive_fused`; a loss
over one feature set passes ``k=None``, the keys being the anchors) or, with
``backend="reference"``, calls the oracle in :mod:`fastcl.reference`. The math of each loss is
in the docstrings and in ``LOSSES.md``.

Conventions shared by all functions:

- ``temperature`` / ``logit_scale``: exactly one of them where both exist; the logit scale is
  ``a = 1 / temperature``. A tensor ``logit_scale`` (already exponentiated, as open_clip and
  Hugging Face pass it) receives a gradient.
- ``normalize=True`` L2-normalizes the features first (cosine similarity); otherwise the
  features are used as given.
- ``reduction``: ``"mean"`` over the anchors that have at least one positive, ``"sum"``, or
  ``"none"`` (a per-anchor vector).
- The loss is returned in fp32 (fp64 for fp64 inputs), whatever the input dtype.
- ``gather`` (losses with global negatives): ``None`` (this process's batch), ``"all_gather"``
  (every rank's columns gathered with gradient) or ``"ring"`` (the columns pass around the ring
  of ranks, memory independent of the world size), over ``group``; same values and gradients,
  under the convention of :mod:`fastcl.distributed`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate as V
from . import dispatch
from . import reference as ref
from .distributed import Shard, shard
from .ops import contrastive as contrastive_ops
from .ops import siglip as siglip_ops
from .ops import topk as topk_ops
from .ops.contrastive import contrastive_stats

__all__ = [
    "info_nce",
    "clip_loss",
    "nt_xent",
    "supcon",
    "multiview_loss",
    "hard_negative_nce",
    "dcl",
    "siglip_loss",
    "alignment",
    "uniformity",
    "topk_similarity",
]

Scalar = Union[float, Tensor]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm(x: Optional[Tensor], normalize: bool) -> Optional[Tensor]:
    return F.normalize(x, dim=-1) if (normalize and x is not None) else x


def _reduce(per_anchor: Tensor, weight: Optional[Tensor], reduction: str,
            sh: Optional[Shard] = None) -> Tensor:
    """Reduce a per-anchor loss; ``weight`` marks anchors that count (have a positive)."""
    if sh is not None:
        return sh.reduce(per_anchor, weight, reduction)
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    if weight is None:
        return per_anchor.mean()
    return per_anchor.sum() / weight.sum().clamp_min(1)


def _view_logits(views: Tensor, a: Tensor, other: bool = False) -> Tensor:
    """``[V, V, N]`` logits ``a <views[l, i], views[m, i]>`` between the views of each sample
    (``O(V^2 N D)``), in the statistics dtype; ``other``: ``-inf`` where ``l == m``."""
    v = views.to(_stat_dtype(views))
    s = a * torch.einsum("lnd,mnd->lmn", v, v)
    if other:
        eye = torch.eye(views.shape[0], dtype=torch.bool, device=views.device)[:, :, None]
        s = s.masked_fill(eye, float("-inf"))
    return s


def _two_view_targets(n: int, device: torch.device) -> Tensor:
    """Positive of row ``i`` in ``[z1; z2]``: ``i + n`` for the first view, ``i - n`` for the second."""
    idx = torch.arange(2 * n, device=device)
    return (idx + n) % (2 * n)


def _pair_scale(scale: Tensor, x: Tensor) -> Tensor:
    return scale.to(_stat_dtype(x))


def _stats(sh: Optional[Shard], rows: Tensor, cols: Optional[Tensor], a: Tensor, b: Tensor,
           targets: Optional[Tensor] = None, row_labels: Optional[Tensor] = None,
           col_labels: Optional[Tensor] = None, extra: Optional[Tensor] = None,
           **flags) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics ``(lse, pos, npos, mean, col_lse, col_mean, lse2)`` of ``rows`` against
    ``[cols; extra]``, as :func:`fastcl.ops.contrastive.contrastive_stats` returns them.

    On one process (``sh`` None) the fused op on the given columns; with a shard, against the
    ``cols`` of every rank by the shard's strategy (:meth:`fastcl.distributed.Shard.stats`).
    ``cols=None``: the columns are the rows themselves (symmetric logits; on one process the op
    then takes ``k=None``, whose backward exploits the symmetry; with ``"all_gather"`` each rank
    computes half of the global square).
    """
    if sh is not None:
        return sh.stats(rows, rows if cols is None else cols, a, b, targets, row_labels,
                        col_labels, extra, symmetric=cols is None, **flags)
    if extra is not None:  # the columns are not the rows alone
        cols = torch.cat([rows if cols is None else cols, extra], dim=0)
    return contrastive_stats(rows, cols, a, b, targets, row_labels, col_labels, **flags)


def _wants_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fusable(be: str, sh: Optional[Shard], reduction: str, *tensors: Optional[Tensor],
             self_sim: bool = False) -> bool:
    """Whether the loss and its gradients come from one sweep of ``contrastive_fused``.

    On one process, for a reduced loss whose gradients are wanted, on a backend where the
    fused sweep saves work (:data:`fastcl.ops.contrastive.FUSED_BACKENDS`; with ``self_sim``,
    a loss over the logits of one feature set with itself,
    :data:`fastcl.ops.contrastive.SELF_FUSED_BACKENDS`). The gradients are then computed in the
    forward, even if no backward follows.
    """
    backends = (contrastive_ops.SELF_FUSED_BACKENDS if self_sim
                else contrastive_ops.FUSED_BACKENDS)
    return sh is None and reduction != "none" and be in backends and _wants_grad(*tensors)


def _fused(rows: Tensor, cols: Optional[Tensor], a: Tensor, b: Tensor,
           targets: Optional[Tensor] = None,
           row_labels: Optional[Tensor] = None, col_labels: Optional[Tensor] = None, *,
           g_pos: Union[float, Tensor] = -1.0, g_mean: Optional[float] = None, reduction: str,
           backend: str, exclude_diag: bool = False, decoupled: bool = False,
           pos_lse: bool = False) -> tuple[Tensor, Tensor]:
    """``(loss, npos)``: ``lse_r + g_pos pos_r + g_mean mean_r`` over the rows with a positive,
    summed or averaged by ``reduction``, with its gradients from one sweep (see :func:`_fusable`).
    ``cols=None``: the columns are the rows themselves (symmetric logits).
    """
    n, dt = rows.shape[0], _stat_dtype(rows)

    def coef(v):
        if v is None or isinstance(v, Tensor):
            return v
        return torch.full((n,), float(v), dtype=dt, device=rows.device)

    loss, npos, *_ = contrastive_ops.contrastive_fused(
        coef(1.0), coef(g_pos), coef(g_mean), rows, cols, a, b, targets, row_labels, col_labels,
        exclude_diag, decoupled, pos_lse, reduction == "mean", backend)
    return loss, npos


def _sharded(gather: Optional[str], group, name: str, x: Tensor) -> Optional[Shard]:
    """The :class:`Shard` of this rank (``None`` without ``gather``), equal shards checked."""
    sh = shard(gather, group)
    if sh is not None:
        sh.check_equal(name, x)
    return sh


def _select(op: str, x: Tensor, backend: str, sh: Optional[Shard]) -> str:
    """The backend of a call; with a shard, the reference is served by the "torch" op backend."""
    be = dispatch.select(op, x.device, x.dtype, backend)
    return "torch" if (be == "reference" and sh is not None) else be


# --------------------------------------------------------------------------------------------
# InfoNCE family
# --------------------------------------------------------------------------------------------

def info_nce(
    query: Tensor,
    key: Tensor,
    *,
    temperature: Optional[Scalar] = None,
    logit_scale: Optional[Scalar] = None,
    logit_bias: Optional[Scalar] = None,
    targets: Optional[Tensor] = None,
    negatives: Optional[Tensor] = None,
    symmetric: bool = False,
    symmetric_weight: float = 0.5,
    label_smoothing: float = 0.0,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """InfoNCE (CPC, MoCo, SimCSE, MNRL) and, with ``symmetric=True``, the CLIP/ALIGN loss.

    ``l_i = LSE_j s_ij - (1 - e) s_{i,t_i} - e mean_j s_ij`` with ``s_ij = a <q_i, k_j> + b``
    over the columns ``[key; negatives]`` and ``e = label_smoothing``.

    Args:
        query: ``[N, D]`` queries.
        key: ``[M, D]`` keys; the positive of query ``i`` is key ``targets[i]`` (default ``i``,
            which needs ``N <= M``). A target of ``-1`` means "no positive": that query gets
            weight 0.
        temperature, logit_scale: exactly one; ``a = 1 / temperature`` or ``a = logit_scale``.
        logit_bias: optional additive bias ``b`` (no effect on softmax losses; accepted for
            models that carry one).
        negatives: ``[Q, D]`` extra negative columns (a MoCo queue, hard negatives); they get
            a gradient only if they require grad.
        symmetric: also the key->query direction over the ``N`` queries (needs ``N == M`` and
            default targets): ``L = w mean_i l^{q->k}_i + (1 - w) mean_j l^{k->q}_j``.
        symmetric_weight: ``w`` (0.5 for CLIP, 0.75 for ConVIRT).
        label_smoothing: ``e`` in ``[0, 1)``.
        normalize: L2-normalize query, key and negatives first.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (for symmetric: ``w l_row + (1-w) l_col``
            per index).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.
        gather: ``"all_gather"`` or ``"ring"`` contrasts this rank's queries (and, if
            symmetric, keys) with the keys (queries) of every rank of ``group``, by gathering
            them or by passing them around a ring of ranks (memory independent of the world
            size); see :mod:`fastcl.distributed` for both and the gradient convention.
            ``negatives`` stay local extra columns; ``targets`` must be None.

    Returns:
        The loss (0-dim, or ``[N]`` for ``reduction="none"``).
    """
    V.features("query", query)
    V.features("key", key)
    V.same_dim("query", query, "key", key)
    if negatives is not None:
        V.features("negatives", negatives)
        V.same_dim("query", query, "negatives", negatives)
    V.same_device_dtype(query=query, key=key, negatives=negatives)
    V.reduction(reduction)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not 0.0 <= float(symmetric_weight) <= 1.0:
        raise ValueError(f"symmetric_weight must be in [0, 1], got {symmetric_weight}")
    n, m = query.shape[0], key.shape[0]
    device = query.device
    if targets is not None:
        targets = V.labels("targets", targets, n, device)
        if symmetric:
            raise ValueError("symmetric=True uses the diagonal as positives; targets must be None")
    elif n > m:
        raise ValueError(f"without targets, query i is paired with key i, so key needs at least "
                         f"as many rows as query; got query {tuple(query.shape)} and key "
                         f"{tuple(key.shape)}")
    if symmetric and n != m:
        raise ValueError(f"symmetric=True needs as many queries as keys, got {n} and {m}")
    sh = shard(gather, group)
    if sh is not None:
        if targets is not None:
            raise ValueError(f"gather={gather!r} pairs query i with key i of the same rank; "
                             "targets must be None")
        if n != m:
            raise ValueError(f"gather={gather!r} needs as many queries as keys per rank, got "
                             f"{n} and {m}")
        sh.check_equal("query", query)
    scale = V.logit_scale(temperature, logit_scale, device)
    bias = V.scalar("logit_bias", 0.0 if logit_bias is None else logit_bias, device)
    query, key, negatives = _norm(query, normalize), _norm(key, normalize), _norm(negatives, normalize)

    be = _select("info_nce", query, backend, sh)
    if be == "reference":
        return ref.info_nce_ref(query, key, scale=scale, bias=bias, targets=targets,
                                negatives=negatives, symmetric=symmetric,
                                symmetric_weight=symmetric_weight,
                                label_smoothing=label_smoothing, reduction=reduction)

    if targets is None:
        targets = torch.arange(n, device=device)
    e = float(label_smoothing)
    a, b = _pair_scale(scale, query), _pair_scale(bias, query)

    w = float(symmetric_weight)
    if not symmetric and _fusable(be, sh, reduction, query, key, negatives, a, b):
        cols = key if negatives is None else torch.cat([key, negatives], dim=0)
        return _fused(query, cols, a, b, targets, g_pos=-(1.0 - e), g_mean=-e if e else None,
                      reduction=reduction, backend=be)[0]
    # one pass for both directions: the key->query direction from the column statistics (with
    # a shard, the keys' statistics against every rank's queries)
    lse, pos, npos, mean, col_lse, col_mean, _ = _stats(
        sh, query, key, a, b, targets, extra=negatives, col_stats=symmetric, backend=be)
    has_pos = npos > 0
    row = lse - (1.0 - e) * pos
    if e:
        row = row - e * mean
    row = torch.where(has_pos, row, torch.zeros_like(row))
    if not symmetric:
        return _reduce(row, has_pos, reduction, sh)
    col = col_lse[:m] - (1.0 - e) * pos
    if e:
        col = col - e * col_mean[:m]
    if reduction == "none":
        return w * row + (1.0 - w) * col
    return w * _reduce(row, None, reduction, sh) + (1.0 - w) * _reduce(col, None, reduction, sh)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    symmetric_weight: float = 0.5,
    label_smoothing: float = 0.0,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """The symmetric CLIP / ALIGN loss: ``(CE(logits) + CE(logits.T)) / 2`` without the logits.

    ``logits = logit_scale * image_features @ text_features.T`` (``logit_scale`` already
    exponentiated, as open_clip and Hugging Face models return it); image ``i`` and text ``i``
    are the positive pair. Equivalent to :func:`info_nce` with ``symmetric=True``.
    """
    return info_nce(image_features, text_features, logit_scale=logit_scale, logit_bias=logit_bias,
                    symmetric=True, symmetric_weight=symmetric_weight,
                    label_smoothing=label_smoothing, normalize=normalize,
                    reduction=reduction, backend=backend, gather=gather, group=group)


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: Optional[Scalar] = 0.5,
    logit_scale: Optional[Scalar] = None,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """NT-Xent (SimCLR): two views ``z1``, ``z2`` of ``N`` samples, ``2N`` anchors.

    ``Z = [z1; z2]``, ``s_ij = <z_i, z_j> / tau``, the positive of row ``i`` is ``i +- N``:
    ``l_i = -s_{i,p(i)} + LSE_{j != i} s_ij``, mean over the ``2N`` rows. SimCLR uses cosine
    similarity: pass ``normalize=True`` for it. ``reduction="none"`` returns the ``2N`` vector.
    """
    V.paired("z1", z1, "z2", z2)
    V.reduction(reduction)
    if logit_scale is not None and temperature == 0.5:
        temperature = None
    sh = _sharded(gather, group, "z1", z1)
    scale = V.logit_scale(temperature, logit_scale, z1.device)
    z1, z2 = _norm(z1, normalize), _norm(z2, normalize)
    be = _select("nt_xent", z1, backend, sh)
    if be == "reference":
        return ref.nt_xent_ref(z1, z2, scale=scale, reduction=reduction)
    z = torch.cat([z1, z2], dim=0)
    zero = torch.zeros((), dtype=_stat_dtype(z), device=z.device)
    a, targets = _pair_scale(scale, z), _two_view_targets(z1.shape[0], z.device)
    if _fusable(be, sh, reduction, z, a, self_sim=True):  # each row has a positive: 2N rows
        return _fused(z, None, a, zero, targets, reduction=reduction, backend=be,
                      exclude_diag=True)[0]
    lse, pos, *_ = _stats(sh, z, None, a, zero, targets, exclude_diag=True, backend=be)
    return _reduce(lse - pos, None, reduction, sh)


def supcon(
    features: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: Optional[Scalar] = 0.1,
    logit_scale: Optional[Scalar] = None,
    variant: str = "out",
    base_temperature: Optional[float] = None,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), any number of views.

    ``features`` is ``[N, V, D]`` (or ``[N, D]`` for one view), flattened view-major to
    ``A = N V`` anchors; ``labels`` ``[N]`` (default: the sample index, which gives the
    self-supervised multi-view loss). Positives of an anchor: the other anchors with its label;
    the denominator: every anchor but itself.

    - ``variant="out"``: ``l_r = LSE_{a != r} s_ra - mean_{p in P(r)} s_rp`` (the default),
    - ``variant="in"``: ``l_r = LSE_{a != r} s_ra - LSE_{p in P(r)} s_rp + log |P(r)|``.

    Anchors without positives count for nothing (weight 0, never NaN). ``base_temperature``
    multiplies the loss by ``temperature / base_temperature`` as the SupContrast code does
    (0.07 there; off by default). ``reduction="none"`` returns the ``A`` vector.
    """
    V.features("features", features, ndims=(2, 3))
    V.reduction(reduction)
    V.choice("variant", variant, ("out", "in"))
    if features.dim() == 2:
        features = features.unsqueeze(1)
    n, views = features.shape[0], features.shape[1]
    if labels is not None:
        labels = V.labels("labels", labels, n, features.device)
    if base_temperature is not None:
        V.positive_number("base_temperature", base_temperature)
    if logit_scale is not None and temperature == 0.1:
        temperature = None
    sh = _sharded(gather, group, "features", features)
    scale = V.logit_scale(temperature, logit_scale, features.device)
    features = _norm(features, normalize)
    be = _select("supcon", features, backend, sh)
    if be == "reference":
        return ref.supcon_ref(features, labels, scale=scale, variant=variant,
                              base_temperature=base_temperature, reduction=reduction)
    anchors = torch.cat(torch.unbind(features, dim=1), dim=0)
    by_sample = labels is None  # the positives: the other views of the same sample
    if labels is None:
        labels = (torch.arange(n, device=features.device) if sh is None
                  else sh.block_ids(n, features.device)[:n])
    anchor_labels = labels.repeat(views)
    zero = torch.zeros((), dtype=_stat_dtype(anchors), device=anchors.device)
    a = _pair_scale(scale, anchors)
    factor = None if base_temperature is None else 1.0 / (a * base_temperature)
    if _fusable(be, sh, reduction, anchors, a, self_sim=True):
        loss, npos = _fused(anchors, None, a, zero, None, anchor_labels, anchor_labels,
                            reduction=reduction, backend=be, exclude_diag=True,
                            pos_lse=(variant == "in"))
        if variant == "in":  # + log |P(r)| over the rows with a positive
            has_pos = npos > 0
            logs = torch.where(has_pos, torch.log(npos.clamp_min(1)), torch.zeros_like(npos))
            loss = loss + _reduce(logs, has_pos, reduction)
        return loss if factor is None else loss * factor
    if sh is not None and by_sample and variant == "in":
        # across processes the log-sum-exp of the positives comes from this rank's own views,
        # and the op computes the denominator without labels (half the square with all_gather)
        lse = _stats(sh, anchors, None, a, zero, exclude_diag=True, backend=be)[0]
        pos = torch.logsumexp(_view_logits(features.transpose(0, 1), a, other=True), 1)
        pos, npos = pos.reshape(-1), torch.full_like(lse, views - 1)
    else:
        lse, pos, npos, *_ = _stats(
            sh, anchors, None, a, zero, None, anchor_labels, anchor_labels, exclude_diag=True,
            pos_lse=(variant == "in"), backend=be)
    has_pos = npos > 0
    per = lse - pos
    if variant == "in":
        per = per + torch.log(npos.clamp_min(1))
    per = torch.where(has_pos, per, torch.zeros_like(per))
    if factor is not None:
        per = per * factor
    return _reduce(per, has_pos, reduction, sh)


def dcl(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: Optional[Scalar] = 0.1,
    logit_scale: Optional[Scalar] = None,
    weighted: bool = False,
    sigma: float = 0.5,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022), lightly's ``DCLLoss`` / ``DCLWLoss``.

    The positive is removed from the denominator: ``l_i = -w_i s_{i,p} + LSE_{n in Neg(i)} s_in``
    over the ``2N`` anchors of ``[z1; z2]``, where the negatives of an anchor are both views of
    every other sample. ``weighted=True`` (DCLW) uses ``w_i = 2 - N softmax_i(cos(z1_i, z2_i) /
    sigma)`` (detached, cosine similarity as in lightly), else ``w_i = 1``. lightly normalizes the features: pass
    ``normalize=True`` to match it. ``reduction="none"`` returns the ``2N`` vector.
    """
    V.paired("z1", z1, "z2", z2)
    V.reduction(reduction)
    V.positive_number("sigma", sigma)
    if z1.shape[0] < 2:
        raise ValueError(f"dcl needs at least 2 samples (the denominator holds only other samples), "
                         f"got z1 of shape {tuple(z1.shape)}")
    if logit_scale is not None and temperature == 0.1:
        temperature = None
    sh = _sharded(gather, group, "z1", z1)
    scale = V.logit_scale(temperature, logit_scale, z1.device)
    z1, z2 = _norm(z1, normalize), _norm(z2, normalize)
    be = _select("dcl", z1, backend, sh)
    if be == "reference":
        return ref.dcl_ref(z1, z2, scale=scale, weighted=weighted, sigma=sigma, reduction=reduction)
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    zero = torch.zeros((), dtype=_stat_dtype(z), device=z.device)
    a, targets = _pair_scale(scale, z), _two_view_targets(n, z.device)
    w = _dclw_weights(z1, z2, sigma, sh) if weighted else None
    if _fusable(be, sh, reduction, z, a, self_sim=True):  # each row has a positive: 2N rows
        return _fused(z, None, a, zero, targets, g_pos=-1.0 if w is None else -w.repeat(2),
                      reduction=reduction, backend=be, exclude_diag=True, decoupled=True)[0]
    lse, pos, *_ = _stats(sh, z, None, a, zero, targets, exclude_diag=True,
                                    decoupled=True, backend=be)
    if w is not None:
        pos = pos * w.repeat(2)
    return _reduce(lse - pos, None, reduction, sh)


def _dclw_weights(z1: Tensor, z2: Tensor, sigma: float, sh: Optional[Shard]) -> Tensor:
    """DCLW's detached weights ``w_i = 2 - N softmax_i(cos(z1_i, z2_i) / sigma)``."""
    n, dt = z1.shape[0], _stat_dtype(z1)
    with torch.no_grad():  # lightly weighs with cosine similarity, whatever `normalize`
        u1, u2 = (F.normalize(t.to(dt), dim=1) for t in (z1, z2))
        sim = (u1 * u2).sum(-1) / sigma
        if sh is None:
            return 2.0 - n * torch.softmax(sim, dim=0)
        # the softmax runs over the global batch
        return 2.0 - sh.world * n * torch.softmax(sh.columns_nograd(sim), dim=0)[:n]


def multiview_loss(
    views: Tensor,
    *,
    temperature: Optional[Scalar] = None,
    logit_scale: Optional[Scalar] = None,
    method: str = "mv_infonce",
    cmc_mode: str = "full",
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """Multi-view contrastive losses over ``views`` of shape ``[V, N, D]`` (``V >= 2``).

    - ``"mv_infonce"`` (Koromilas et al.): ``-(1/N) sum_i [log sum_{l != m} exp s(il,im) -
      log sum_l sum_{(j,m) != (i,l)} exp s(il,jm)]``; positives stay in the denominator.
    - ``"mv_dhel"``: ``(1/N) sum_i [sum_l LSE_{j != i} s(il,jl) - LSE_{l<m} s(il,im)]``:
      uniformity within each view only (``V N^2`` cost).
    - ``"cmc"``: ``sum_{l<m} (L^{l->m} + L^{m->l})`` of one-direction InfoNCE losses over the
      full graph of view pairs (``cmc_mode="full"``) or the pairs with view 0 (``"core"``).

    ``reduction="none"`` returns the ``[N]`` per-sample terms.
    """
    V.features("views", views, ndims=(3,))
    V.reduction(reduction)
    V.choice("method", method, ("mv_infonce", "mv_dhel", "cmc"))
    V.choice("cmc_mode", cmc_mode, ("full", "core"))
    nv, n = views.shape[0], views.shape[1]
    if nv < 2:
        raise ValueError(f"views must hold at least 2 views along dim 0, got shape {tuple(views.shape)}")
    sh = _sharded(gather, group, "views[0]", views[0])
    scale = V.logit_scale(temperature, logit_scale, views.device)
    views = _norm(views, normalize)
    be = _select("multiview_loss", views, backend, sh)
    if be == "reference":
        return ref.multiview_ref(views, scale=scale, method=method, cmc_mode=cmc_mode,
                                 reduction=reduction)
    sdt = _stat_dtype(views)
    a = _pair_scale(scale, views)
    zero = torch.zeros((), dtype=sdt, device=views.device)
    if method == "mv_infonce" and sh is not None:
        # across processes the positives come from this rank's own views, and the op computes
        # the denominator without labels (half the square with all_gather)
        lse = _stats(sh, views.reshape(nv * n, -1), None, a, zero, exclude_diag=True,
                     backend=be)[0]
        pairs = _view_logits(views, a, other=True).flatten(0, 1)
        per = torch.logsumexp(lse.view(nv, n), 0) - torch.logsumexp(pairs, 0)
    elif method == "mv_infonce":
        anchors = views.reshape(nv * n, -1)
        sample = torch.arange(n, device=views.device).repeat(nv)
        lse, pos, *_ = _stats(sh, anchors, None, a, zero, None, sample, sample,
                              exclude_diag=True, pos_lse=True, backend=be)
        per = torch.logsumexp(lse.view(nv, n), 0) - torch.logsumexp(pos.view(nv, n), 0)
    elif method == "mv_dhel":
        uniform = 0
        for v in range(nv):
            lse, *_ = _stats(sh, views[v], None, a, zero, exclude_diag=True, backend=be)
            uniform = uniform + lse
        upper = torch.triu_indices(nv, nv, 1, device=views.device)
        pair_logits = _view_logits(views, a)[upper[0], upper[1]]  # [pairs l < m, N]
        per = uniform - torch.logsumexp(pair_logits, dim=0)
    else:
        pairs = [(l, m) for l in range(nv) for m in range(l + 1, nv)
                 if cmc_mode == "full" or l == 0]
        diag = torch.arange(n, device=views.device)
        per = 0
        for l, m in pairs:  # both directions of a pair from one pass (its column statistics)
            lse, pos, _np, _m, col_lse, *_ = _stats(sh, views[l], views[m], a, zero, diag,
                                                    col_stats=True, backend=be)
            per = per + (lse - pos) + (col_lse[:n] - pos)
    return _reduce(per, None, reduction, sh)


# --------------------------------------------------------------------------------------------
# Hard negatives, SigLIP, alignment / uniformity, top-k
# --------------------------------------------------------------------------------------------

def hard_negative_nce(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: Scalar,
    beta: float = 1.0,
    tau_plus: float = 0.0,
    layout: str = "two_view",
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """Hard-negative weighting (Robinson et al. 2021) and debiasing (Chuang et al. 2020).

    With ``s`` the scaled logits of an anchor (``tau = temperature``), ``imp_n = exp(beta s_n)``,
    ``R = sum_n imp_n exp(s_n) / mean_n imp_n``,
    ``Ng = max((R - tau_plus Nn exp(s_p)) / (1 - tau_plus), Nn exp(-1/tau))`` and
    ``l = -log(exp(s_p) / (exp(s_p) + Ng))``. ``beta = 0, tau_plus = 0`` is plain InfoNCE.
    The importance weights are not detached (as in the authors' code).
    ``layout="two_view"``: ``2N`` anchors of ``[z1; z2]``, ``Nn = 2N - 2``; ``"paired"``: queries
    ``z1`` against keys ``z2`` with ``Nn = N - 1``.

    Fused as two streaming log-sum-exps over the negatives, ``LSE_n (1+beta) s_n`` and
    ``LSE_n beta s_n`` (one when ``beta = 0``), from one pass over the logits (the statistics
    op's ``lse2``; with ``gather="ring"`` it is merged across ranks like the other statistics),
    evaluated in log space so that large scales do not overflow.
    """
    V.paired("z1", z1, "z2", z2)
    V.reduction(reduction)
    V.choice("layout", layout, ("two_view", "paired"))
    if not 0.0 <= float(tau_plus) < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    n = z1.shape[0]
    sh = _sharded(gather, group, "z1", z1)
    n_global = n if sh is None else n * sh.world
    n_neg = 2 * n_global - 2 if layout == "two_view" else n_global - 1
    if n_neg < 1:
        raise ValueError(f"hard_negative_nce needs at least one negative per anchor, got z1 of "
                         f"shape {tuple(z1.shape)} with layout={layout!r}")
    scale = V.logit_scale(temperature, None, z1.device)
    z1, z2 = _norm(z1, normalize), _norm(z2, normalize)
    be = _select("hard_negative_nce", z1, backend, sh)
    if be == "reference":
        return ref.hard_negative_nce_ref(z1, z2, scale=scale, beta=beta, tau_plus=tau_plus,
                                         layout=layout, reduction=reduction)
    if layout == "two_view":  # the keys are the anchors themselves (k None: symmetric logits)
        q, k = torch.cat([z1, z2], dim=0), None
        targets = _two_view_targets(n, q.device)
    else:
        q, k = z1, z2
        targets = torch.arange(n, device=q.device)
    a = _pair_scale(scale, q)
    zero = torch.zeros((), dtype=a.dtype, device=q.device)
    beta = float(beta)
    mult = 1.0 + beta
    # both log-sum-exps from one pass: the logits at (1 + beta) a, the second sum at
    # beta / (1 + beta) of them
    lse_hard, pos, *_, lse_beta = _stats(sh, q, k, a * mult, zero, targets,
                                         exclude_diag=(layout == "two_view"), decoupled=True,
                                         lse2_mult=beta / mult, backend=be)
    s_p = pos / mult
    # R = sum_n exp((1+beta) s_n) / mean_n exp(beta s_n)
    log_r = lse_hard - lse_beta + math.log(n_neg) if beta else lse_hard
    if tau_plus:
        # Ng_est = R (1 - u) / (1 - tau_plus), u = tau_plus Nn exp(s_p) / R, defined while u < 1
        log_u = math.log(tau_plus * n_neg) + s_p - log_r
        valid = log_u < 0
        safe = torch.where(valid, log_u, torch.full_like(log_u, -1.0))
        log_ng = log_r + torch.log(-torch.expm1(safe)) - math.log(1.0 - tau_plus)
        log_ng = torch.where(valid, log_ng, torch.full_like(log_ng, float("-inf")))
    else:
        log_ng = log_r
    log_floor = math.log(n_neg) - a  # log(Nn exp(-1/tau))
    log_ng = torch.maximum(log_ng, log_floor.expand_as(log_ng))
    per = torch.logaddexp(torch.zeros_like(log_ng), log_ng - s_p)
    return _reduce(per, None, reduction, sh)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar,
    *,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    gather: Optional[str] = None,
    group=None,
) -> Tensor:
    """The sigmoid loss of SigLIP: ``-(1/N) sum_ij log sigmoid(z_ij (a <x_i, y_j> + b))``.

    ``z_ij = 1`` on the diagonal, ``-1`` elsewhere; ``a = logit_scale`` (exponentiated, init
    10) and ``b = logit_bias`` (init -10) may be tensors that receive gradients.
    ``reduction="none"`` returns the per-image row sums. The fused backends never hold the
    N x N logits: a pass over tiles of ``x @ y.T`` gives the row sums, and the backward
    recomputes the tiles; with ``reduction="mean"`` or ``"sum"`` and gradients wanted, one pass
    yields the loss and its gradients together (the gradient of every pair is known in the
    forward). ``backend="reference"`` materializes the logits.

    ``gather="all_gather"`` or ``"ring"`` (over ``group``): each rank's images against the texts
    of every rank (the pairs of other ranks are negatives), the loss of the global batch ``B``
    divided by ``B`` under the convention of :mod:`fastcl.distributed`. ``"all_gather"`` keeps
    the one-pass loss and gradients; the ring computes the row sums, and the backward runs the
    ring again.
    """
    V.paired("image_features", image_features, "text_features", text_features)
    V.reduction(reduction)
    device = image_features.device
    sh = _sharded(gather, group, "image_features", image_features)
    scale = V.scalar("logit_scale", logit_scale, device, positive=True)
    bias = V.scalar("logit_bias", logit_bias, device)
    x, y = _norm(image_features, normalize), _norm(text_features, normalize)
    be = _select("siglip_loss", x, backend, sh)
    if be == "reference":
        return ref.siglip_ref(x, y, scale=scale, bias=bias, reduction=reduction)
    a, b = _pair_scale(scale, x), _pair_scale(bias, x)
    fused = reduction != "none" and _wants_grad(x, y, a, b) and be in siglip_ops.FUSED_BACKENDS
    if sh is not None and not (fused and sh.strategy == "all_gather"):
        return _reduce(sh.siglip_rows(x, y, a, b, backend=be), None, reduction, sh)
    if fused:  # with all_gather: the own rows against every rank's texts, own block first
        texts = y if sh is None else sh.columns(y)
        loss = siglip_ops.siglip_fused(x, texts, a, b, True, reduction == "mean", be)[0]
        # the mean divides by this rank's rows: world * sum / (world * n) by the convention
        return loss if (sh is None or reduction == "mean") else sh.world * loss
    rows = siglip_ops.siglip_fwd(x, y, a, b, True, be)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / x.shape[0]


def alignment(x: Tensor, y: Tensor, alpha: float = 2) -> Tensor:
    """Alignment (Wang & Isola 2020): ``mean_i ||x_i - y_i||^alpha`` (linear cost, no kernel)."""
    V.paired("x", x, "y", y)
    V.positive_number("alpha", alpha)
    dt = _stat_dtype(x)
    return (x.to(dt) - y.to(dt)).norm(dim=1).pow(alpha).mean()


def uniformity(x: Tensor, t: float = 2, *, backend: str = "auto",
               gather: Optional[str] = None, group=None) -> Tensor:
    """Uniformity (Wang & Isola 2020): ``log mean_{i != j} exp(-t ||x_i - x_j||^2)``.

    One global log-sum-exp over the ``N (N - 1)`` ordered pairs, fused: with
    ``u_i = [x_i, |x_i|^2, 1]`` and ``v_j = [x_j, -1/2, -|x_j|^2 / 2]`` (fp32),
    ``-t ||x_i - x_j||^2 = 2t <u_i, v_j>``, so the per-row log-sum-exps of the fused op give
    the loss without the ``N x N`` distances. Exact squared distances: no unit norm assumed.
    """
    V.features("x", x)
    V.positive_number("t", t)
    n = x.shape[0]
    sh = _sharded(gather, group, "x", x)
    n_global = n if sh is None else n * sh.world
    if n_global < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got x of shape {tuple(x.shape)}")
    be = _select("uniformity", x, backend, sh)
    if be == "reference":
        return ref.uniformity_ref(x, t=t)
    xf = x.to(_stat_dtype(x))
    sq = (xf * xf).sum(-1, keepdim=True)
    one = torch.ones_like(sq)
    u = torch.cat([xf, sq, one], dim=1)
    v = torch.cat([xf, -0.5 * one, -0.5 * sq], dim=1)
    scale = torch.tensor(2.0 * float(t), dtype=xf.dtype, device=x.device)
    zero = torch.zeros((), dtype=xf.dtype, device=x.device)
    lse, *_ = _stats(sh, u, v, scale, zero, exclude_diag=True, backend=be)
    if sh is not None:  # every rank returns the global value
        lse = sh.columns(lse)
    return torch.logsumexp(lse, 0) - math.log(n_global * (n_global - 1))


def topk_similarity(
    query: Tensor,
    key: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest ``<q_i, k_j>`` of every query and their key indices.

    ``exclude_self`` drops column ``j == i`` (a query's own entry when query and key are the
    same set). Returns ``(values, indices)`` of shape ``[N, k]``, values in descending order.
    The fused backends stream tiles of ``query @ key.T`` through a running per-query top-k and
    never hold the N x M similarities; there the values are fp32 and carry no gradient, and
    among equal values the smaller key index comes first. ``backend="reference"``
    materializes the similarities (values in the compute dtype, differentiable).
    """
    V.features("query", query)
    V.features("key", key)
    V.same_dim("query", query, "key", key)
    V.same_device_dtype(query=query, key=key)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    available = key.shape[0] - (1 if exclude_self else 0)
    if k > available:
        raise ValueError(f"k={k} exceeds the {available} candidate keys per query")
    be = _select("topk_similarity", query, backend, None)
    if be == "reference":
        return ref.topk_similarity_ref(query, key, k, exclude_self=exclude_self)
    return topk_ops.topk_fwd(query.detach(), key.detach(), k, exclude_self, be)
