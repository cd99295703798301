"""Drop-in replacements for pytorch-metric-learning's ``NTXentLoss``, ``SupConLoss``,
``SelfSupervisedLoss`` and ``DistributedLossWrapper``.

Swap the import and keep the training loop as it is::

    # from pytorch_metric_learning.losses import NTXentLoss, SupConLoss, SelfSupervisedLoss
    from fastcl.compat.pytorch_metric_learning import NTXentLoss, SupConLoss, SelfSupervisedLoss

The classes subclass pml's own (same constructor, attributes, ``forward(embeddings, labels=None,
indices_tuple=None, ref_emb=None, ref_labels=None)``). The calls whose pml semantics a fused
fastcl function reproduces exactly run on it; every other call runs pml's original code, with a
one-time :class:`CompatFallbackWarning` per loss object and reason.

What is fused (pml's distance is ``CosineSimilarity``, the default, or ``DotProductSimilarity``,
``power=1``; its reducer ``MeanReducer``, ``AvgNonZeroReducer`` or ``SumReducer``; no
``embedding_regularizer``; no ``indices_tuple``):

- ``NTXentLoss`` (one term per positive pair ``(a, p)``:
  ``-log(exp(s_ap) / (exp(s_ap) + sum_{n: y_n != y_a} exp(s_an)))``):

  * labels that hold each value at most twice, with at least one positive pair and one
    negative pair. An anchor then has at most one positive, so its term is
    ``LSE_{j != a} s_aj - s_ap``: in the two-view layout ``[z1; z2]`` with
    ``labels[N:] == labels[:N]`` (what ``SelfSupervisedLoss`` builds) this is
    :func:`fastcl.nt_xent`, in any other order :func:`fastcl.supcon` over one view (anchors
    without a positive have no term). A label held three or more times gives an anchor several
    positives, each with the others *out* of its denominator: that is not SupCon, and runs pml.
  * ``ref_emb`` with ``ref_labels`` (a tensor other than ``labels``) in which every anchor
    matches at most one reference row: :func:`fastcl.info_nce` of the embeddings against the
    reference rows, targets the matching rows (anchors without a match have no term).

- ``SupConLoss`` without ``ref_emb``, any labels with at least one positive pair and one
  negative pair: :func:`fastcl.supcon` (``L_out``) over one view; anchors without a positive
  contribute a zero, as in pml.

The reducers are applied to the same per-pair (NT-Xent) or per-anchor (SupCon) losses pml hands
them. The loss comes back in fp32 (fp64 for fp64 embeddings).

``DistributedLossWrapper(loss)`` around either loss, on several processes, computes each
process's anchors against every process's embeddings (``gather="all_gather"``) instead of the
whole gathered batch on every process, with pml's value and gradients.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import functional as _F
from ..distributed import shard as _shard
from ._util import CompatFallbackWarning, warn_once, world_size

try:
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning.utils import distributed as _pml_distributed
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
    from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer, SumReducer
except ImportError as exc:  # pragma: no cover - exercised only without the library
    raise ImportError("fastcl.compat.pytorch_metric_learning needs pytorch-metric-learning "
                      "(pip install pytorch-metric-learning)") from exc

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss", "DistributedLossWrapper",
           "CompatFallbackWarning"]

_PML_NTXENT = _pml_losses.NTXentLoss
_PML_SUPCON = _pml_losses.SupConLoss


# --------------------------------------------------------------------------------------------
# what can be fused
# --------------------------------------------------------------------------------------------

def _settings_reason(loss) -> Optional[str]:
    """Why the loss object's settings have no fused equivalent (None if they have one)."""
    if getattr(loss, "embedding_regularizer", None) is not None:
        return "an embedding_regularizer"
    d = loss.distance
    if type(d) not in (CosineSimilarity, DotProductSimilarity) or d.power != 1 or (
            d.normalize_embeddings and d.p != 2):
        return f"the distance {type(d).__name__}(p={d.p}, power={d.power})"
    r = loss.reducer
    ok = (type(r) in (MeanReducer, SumReducer)
          or (type(r) is AvgNonZeroReducer and r.low == 0 and r.high is None))
    if not ok:
        return f"the reducer {type(r).__name__}"
    t = loss.temperature
    if isinstance(t, Tensor):
        if t.numel() != 1 or not bool(t.detach().reshape(()) > 0):
            return "a temperature that is not one positive number"
    elif isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        return "a temperature that is not a positive number"
    return None


def _call_reason(embeddings, labels, indices_tuple, ref_emb, ref_labels) -> Optional[str]:
    if indices_tuple is not None:
        return "an indices_tuple (mined pairs or triplets)"
    if labels is None:
        return "labels=None"
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 \
            or not embeddings.is_floating_point() or embeddings.shape[0] == 0:
        return "embeddings that are not a non-empty 2-D floating-point tensor"
    if not isinstance(labels, Tensor) or labels.dim() != 1 \
            or labels.shape[0] != embeddings.shape[0]:
        return "labels that are not a 1-D tensor with one entry per embedding"
    if ref_emb is not None:
        if ref_labels is None:
            return "ref_emb without ref_labels"
        if ref_labels is labels:
            return "ref_labels given as the labels object itself"
        if not isinstance(ref_emb, Tensor) or ref_emb.dim() != 2 or ref_emb.shape[0] == 0 \
                or ref_emb.shape[1] != embeddings.shape[1] or ref_emb.dtype != embeddings.dtype:
            return "a ref_emb that does not match the embeddings"
        if not isinstance(ref_labels, Tensor) or ref_labels.dim() != 1 \
                or ref_labels.shape[0] != ref_emb.shape[0]:
            return "ref_labels that are not a 1-D tensor with one entry per ref_emb row"
    return None


def _reduce(per: Tensor, reducer, embeddings: Tensor) -> Tensor:
    """pml's reducer applied to the per-element losses ``per``."""
    if type(reducer) is SumReducer:
        return per.sum()
    if type(reducer) is MeanReducer:
        return per.mean()
    kept = per[per > 0]  # AvgNonZeroReducer
    if kept.numel() >= 1:
        return kept.mean()
    return torch.sum(embeddings * 0)


def _labels_reason(counts: Tensor, kind: str) -> Optional[str]:
    """Why a batch whose labels occur ``counts`` times each has no fused equivalent."""
    if counts.numel() < 2:
        return "a batch with a single label (no negative pair)"
    most = int(counts.max())
    if most < 2:
        return "a batch without a positive pair"
    if kind == "ntxent" and most > 2:
        return ("a label held by more than two embeddings: pml's NTXentLoss then makes one term "
                "per positive pair with the other positives out of the denominator, which is not "
                "SupCon")
    return None


def _ntxent(loss, embeddings, labels, ref_emb, ref_labels):
    """(loss, None) when fused, (None, reason) otherwise."""
    labels = labels.to(embeddings.device)
    normalize = bool(loss.distance.normalize_embeddings)
    t = loss.temperature
    if ref_emb is None:
        _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        reason = _labels_reason(counts, "ntxent")
        if reason is not None:
            return None, reason
        n = embeddings.shape[0] // 2
        if 2 * n == embeddings.shape[0] and bool((counts == 2).all()) \
                and torch.equal(inv[:n], inv[n:]):
            per = _F.nt_xent(embeddings[:n], embeddings[n:], temperature=t,
                             normalize=normalize, reduction="none")
        else:
            per = _F.supcon(embeddings, inv, temperature=t, normalize=normalize,
                            reduction="none")
            per = per[counts[inv] == 2]
        return _reduce(per, loss.reducer, embeddings), None

    ref_labels = ref_labels.to(ref_emb.device)
    both = torch.cat([labels.to(ref_labels.device), ref_labels])
    uniq, inv = torch.unique(both, return_inverse=True)
    n, m = labels.shape[0], ref_labels.shape[0]
    anchor_ids, ref_ids = inv[:n], inv[n:]
    if uniq.numel() < 2:
        return None, "a batch with a single label (no negative pair)"
    ref_counts = torch.bincount(ref_ids, minlength=uniq.numel())
    matches = ref_counts[anchor_ids]
    if int(matches.max()) > 1:
        return None, ("an anchor whose label several ref_emb rows hold: pml's NTXentLoss then "
                      "makes one term per positive pair with the other positives out of the "
                      "denominator")
    n_pos = int(matches.sum())
    if n_pos == 0:
        return None, "a batch without a positive pair"
    if n_pos <= 1 and n * m - n_pos <= 1:
        return None, "a batch with a single positive and a single negative pair"
    row_of_id = torch.full((uniq.numel(),), -1, dtype=torch.long, device=ref_ids.device)
    row_of_id[ref_ids] = torch.arange(m, device=ref_ids.device)
    targets = torch.where(matches > 0, row_of_id[anchor_ids], torch.full_like(anchor_ids, -1))
    targets = targets.to(embeddings.device)
    per = _F.info_nce(embeddings, ref_emb, temperature=t, targets=targets, normalize=normalize,
                      reduction="none")
    return _reduce(per[targets >= 0], loss.reducer, embeddings), None


def _supcon(loss, embeddings, labels, ref_emb, ref_labels):
    if ref_emb is not None:
        return None, ("ref_emb: SupCon of the embeddings against a separate reference set has "
                      "no fused equivalent")
    labels = labels.to(embeddings.device)
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    reason = _labels_reason(counts, "supcon")
    if reason is not None:
        return None, reason
    per = _F.supcon(embeddings, inv, temperature=loss.temperature,
                    normalize=bool(loss.distance.normalize_embeddings), reduction="none")
    return _reduce(per, loss.reducer, embeddings), None


def _forward(loss, kind: str, fallback: Callable, warn_owner, embeddings, labels=None,
             indices_tuple=None, ref_emb=None, ref_labels=None):
    reason = _settings_reason(loss) or _call_reason(embeddings, labels, indices_tuple, ref_emb,
                                                    ref_labels)
    if reason is None:
        compute = _ntxent if kind == "ntxent" else _supcon
        value, reason = compute(loss, embeddings, labels, ref_emb, ref_labels)
        if reason is None:
            loss.reset_stats()
            return value
    name = "NTXentLoss" if kind == "ntxent" else "SupConLoss"
    warn_once(warn_owner, reason,
              f"fastcl.compat.pytorch_metric_learning.{name}: {reason} has no fused fastcl "
              f"equivalent; running pytorch-metric-learning's own {name} for such calls.",
              stacklevel=4)
    return fallback(embeddings, labels, indices_tuple, ref_emb, ref_labels)


# --------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------

class NTXentLoss(_PML_NTXENT):
    """pml's ``NTXentLoss`` (default temperature 0.07), fused where pml's semantics allow; see the
    module docstring for the layouts that map to ``nt_xent`` / ``supcon`` / ``info_nce``."""

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        """pml's ``forward``: fused where the arguments allow, else pml's own computation."""
        return _forward(self, "ntxent", super().forward, self, embeddings, labels,
                        indices_tuple, ref_emb, ref_labels)


class SupConLoss(_PML_SUPCON):
    """pml's ``SupConLoss`` (default temperature 0.1) on :func:`fastcl.supcon` where pml's
    semantics allow; see the module docstring."""

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        """pml's ``forward``: fused where the arguments allow, else pml's own computation."""
        return _forward(self, "supcon", super().forward, self, embeddings, labels,
                        indices_tuple, ref_emb, ref_labels)


class SelfSupervisedLoss(_pml_losses.SelfSupervisedLoss):
    """pml's ``SelfSupervisedLoss(loss, symmetric=True)``: ``forward(embeddings, ref_emb)`` with
    ``ref_emb`` an augmented view of ``embeddings``.

    ``symmetric=True`` gives the wrapped loss ``[embeddings; ref_emb]`` with labels
    ``[0..N-1, 0..N-1]`` (for ``NTXentLoss``: :func:`fastcl.nt_xent`; for ``SupConLoss``:
    :func:`fastcl.supcon`); ``symmetric=False`` gives it ``ref_emb`` as the reference set (for
    ``NTXentLoss``: :func:`fastcl.info_nce` of ``embeddings`` against ``ref_emb``; ``SupConLoss``
    with a reference set runs pml). A wrapped pml ``NTXentLoss`` / ``SupConLoss`` (the original
    classes) is fused the same way as the fastcl ones; other wrapped losses run as they are.
    """

    def forward(self, embeddings, ref_emb):
        """The loss of ``embeddings`` against their augmented views ``ref_emb`` (row ``i``
        of one is the positive of row ``i`` of the other); with ``symmetric`` both sets are
        anchors, else only ``embeddings``."""
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            args = (torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0),
                    None, None, None)
        else:
            args = (embeddings, labels, None, ref_emb, labels.clone())
        inner = self.loss
        if isinstance(inner, (NTXentLoss, SupConLoss)):
            return inner(*args)
        if type(inner) in (_PML_NTXENT, _PML_SUPCON):
            kind = "ntxent" if type(inner) is _PML_NTXENT else "supcon"
            return _forward(inner, kind, inner, self, *args)
        warn_once(self, "wrapped", f"fastcl.compat.pytorch_metric_learning.SelfSupervisedLoss: "
                  f"the wrapped {type(inner).__name__} has no fused fastcl equivalent; it runs "
                  f"as it is.")
        return inner(*args)


# --------------------------------------------------------------------------------------------
# several processes
# --------------------------------------------------------------------------------------------

def _distributed(loss, kind: str, sh, embeddings, labels):
    """pml's ``DistributedLossWrapper(loss)`` value (``world_size`` times the loss of the
    gathered batch) from this rank's anchors against every rank's embeddings, or
    ``(None, reason)`` where the gathered batch has no fused equivalent."""
    labels = labels.to(embeddings.device)
    everyone = sh.columns_nograd(labels)
    _, inv, counts = torch.unique(everyone, return_inverse=True, return_counts=True)
    reason = _labels_reason(counts, kind)
    if reason is not None:
        return None, reason
    own = inv[:embeddings.shape[0]]  # the gathered labels put this rank's block first
    per = _F.supcon(embeddings, own, temperature=loss.temperature,
                    normalize=bool(loss.distance.normalize_embeddings), reduction="none",
                    gather="all_gather")
    kept = (counts[own] == 2) if kind == "ntxent" else torch.ones_like(own, dtype=torch.bool)
    reducer = type(loss.reducer)
    if reducer is AvgNonZeroReducer:
        kept = kept & (per.detach() > 0)
    local = torch.where(kept, per, torch.zeros_like(per)).sum()
    if reducer is not SumReducer:
        count = sh.total(kept.sum().to(per.dtype))
        if not bool(count > 0):  # AvgNonZeroReducer without a positive term: pml's zero
            return torch.sum(embeddings * 0), None
        local = local / count
    # this rank's share carries the gradient (world * d loss / d shard, DDP averages it); the
    # value is the sum over ranks: pml's world_size times the loss of the gathered batch
    local = sh.world * local
    return local + (sh.total(local) - local.detach()), None


class DistributedLossWrapper(_pml_distributed.DistributedLossWrapper):
    """pml's ``DistributedLossWrapper(loss, efficient=False)`` that runs a wrapped
    ``NTXentLoss`` / ``SupConLoss`` (fastcl's or pml's) on ``gather="all_gather"``.

    pml gathers every process's embeddings and computes the whole gathered batch's loss on every
    process (``world_size`` times the work, an ``N x N`` matrix of the global batch in pml's
    own loss). Here each process computes only its own anchors against the gathered embeddings
    through the fused kernels, with the same value (``world_size`` times the loss of the gathered
    batch) and the same gradients on every process. Calls that have no fused equivalent on the
    gathered batch (``indices_tuple``, ``ref_emb``, label layouts the adapters refuse, other
    losses, ``CrossBatchMemory``) and ``efficient=True`` (whose gradients leave out the other
    processes' anchors) run pml's own wrapper, which hands the inner loss the gathered batch.
    """

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, enqueue_mask=None):
        """pml's ``forward``; fused across processes where the arguments allow."""
        inner = self.loss
        kinds = {NTXentLoss: "ntxent", _PML_NTXENT: "ntxent", SupConLoss: "supcon",
                 _PML_SUPCON: "supcon"}
        kind = kinds.get(type(inner))
        if kind is not None and not self.efficient and enqueue_mask is None \
                and world_size() > 1:
            reason = _settings_reason(inner) or _call_reason(embeddings, labels, indices_tuple,
                                                             ref_emb, ref_labels)
            if reason is None:
                value, reason = _distributed(inner, kind, _shard("all_gather"), embeddings,
                                             labels)
                if reason is None:
                    inner.reset_stats()
                    return value
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               enqueue_mask)
