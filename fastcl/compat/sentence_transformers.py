"""Drop-in replacements for sentence-transformers' ``MultipleNegativesRankingLoss`` and
``CachedMultipleNegativesRankingLoss``.

Swap the import and keep the trainer as it is::

    # from sentence_transformers.losses import MultipleNegativesRankingLoss
    from fastcl.compat.sentence_transformers import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(model)            # scale=20.0, similarity_fct=cos_sim
    trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss)

Both classes subclass the sentence-transformers ones (same constructor, attributes, config dict
and ``forward(sentence_features, labels)``) and replace only the loss computation from the
embeddings: with columns ``(anchor, positive, negative_1, ..., negative_k)`` the loss is
:func:`fastcl.info_nce` of the anchors against the ``N (1 + k)`` positive and hard-negative
rows, ``logit_scale=scale``, cosine similarity (``similarity_fct=cos_sim``, normalized) or the
dot product (``dot_score``). ``directions=("query_to_doc", "doc_to_query")`` with
``partition_mode="per_direction"`` (the symmetric variant) adds the document-to-query InfoNCE,
``0.5 (info_nce(q, [d; negatives]) + info_nce(d, q))``, from the same pass over the logits
(``info_nce(symmetric=True)``).

``gather_across_devices=True`` with several processes (``torch.distributed``): each process's
anchors against the positives and hard negatives of every process, as sentence-transformers
gathers them (with gradient), on fastcl's ``gather="all_gather"``; the hard negatives are
gathered by the adapter and passed as extra columns.

The cached variant keeps sentence-transformers' GradCache mechanism (``CachedLossMixin``:
mini-batches embedded without gradient, RNG states recorded, each mini-batch re-embedded with
the same RNG state in the backward pass and back-propagated with the cached gradient) and
replaces its chunked loss by one fused loss and its gradient with respect to the embeddings.

What is not fused runs the original sentence-transformers code, with a one-time
:class:`CompatFallbackWarning` per loss object and reason: other similarity functions, the
``query_to_query`` / ``doc_to_doc`` directions, ``doc_to_query`` in the joint partition,
and hardness weighting.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import functional as _F
from ..distributed import Shard
from ._util import CompatFallbackWarning, warn_once, world_size

try:
    from sentence_transformers.util import cos_sim, dot_score
    try:
        from sentence_transformers.sentence_transformer import losses as _st_losses
    except ImportError:  # pragma: no cover - older layout
        from sentence_transformers import losses as _st_losses
except ImportError as exc:  # pragma: no cover - exercised only without the library
    raise ImportError("fastcl.compat.sentence_transformers needs sentence-transformers "
                      "(pip install sentence-transformers)") from exc

_STMNRL = _st_losses.MultipleNegativesRankingLoss
_STCachedMNRL = _st_losses.CachedMultipleNegativesRankingLoss

if not hasattr(_STMNRL, "compute_loss_from_embeddings") or not hasattr(_STCachedMNRL,
                                                                        "calculate_loss"):
    raise ImportError(  # pragma: no cover
        "fastcl.compat.sentence_transformers needs a sentence-transformers version whose "
        "MultipleNegativesRankingLoss has compute_loss_from_embeddings and whose "
        "CachedMultipleNegativesRankingLoss has calculate_loss (6.x)")

__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
           "CompatFallbackWarning"]

_SYMMETRIC = {"query_to_doc", "doc_to_query"}


def _unfused_reason(loss) -> Optional[str]:
    """Why this configuration has no fused equivalent (None if it has one)."""
    fct = loss.similarity_fct
    if fct is not cos_sim and fct is not dot_score:
        name = getattr(fct, "__name__", type(fct).__name__)
        return f"similarity_fct={name} (only cos_sim and dot_score are fused)"
    directions = set(loss.directions)
    if directions != {"query_to_doc"} and not (
            directions == _SYMMETRIC and loss.partition_mode == "per_direction"):
        return (f"directions={tuple(loss.directions)} with partition_mode="
                f"{loss.partition_mode!r}")
    if loss.hardness_mode is not None and loss.hardness_strength > 0.0:
        return f"hardness_mode={loss.hardness_mode!r}"
    return None


def _fused_loss(loss, queries: Tensor, docs: list) -> Tensor:
    gather = "all_gather" if loss.gather_across_devices and world_size() > 1 else None
    negatives = docs[1:]
    if gather is not None and negatives:  # every process's hard negatives, with gradient
        shard = Shard(gather)
        negatives = [shard.columns(d) for d in negatives]
    return _F.info_nce(queries, docs[0], logit_scale=loss.scale,
                       negatives=torch.cat(negatives, dim=0) if negatives else None,
                       normalize=loss.similarity_fct is cos_sim,
                       symmetric=set(loss.directions) != {"query_to_doc"}, gather=gather)


def _warn(loss, reason: str) -> None:
    warn_once(loss, reason,
              f"fastcl.compat.sentence_transformers.{type(loss).__name__}: {reason} has no fused "
              f"fastcl equivalent; running sentence-transformers' own loss computation.",
              stacklevel=4)


class MultipleNegativesRankingLoss(_STMNRL):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (``scale=20.0``,
    ``similarity_fct=cos_sim``) on :func:`fastcl.info_nce`; see the module docstring."""

    def compute_loss_from_embeddings(self, embeddings: list, labels: Tensor) -> Tensor:
        """The loss of the anchors ``embeddings[0]`` against the positives
        ``embeddings[1]`` and hard negatives ``embeddings[2:]``; the peer's own computation
        (with a warning) where the settings cannot be fused."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        reason = _unfused_reason(self)
        if reason is not None:
            _warn(self, reason)
            return super().compute_loss_from_embeddings(embeddings, labels)
        return _fused_loss(self, embeddings[0], list(embeddings[1:]))


class CachedMultipleNegativesRankingLoss(_STCachedMNRL):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (``scale=20.0``,
    ``similarity_fct=cos_sim``, ``mini_batch_size=32``): GradCache with the fused loss; see the
    module docstring."""

    def calculate_loss(self, reps: list, labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the cached mini-batch embeddings ``reps`` (anchors, positives,
        hard negatives), backpropagated at once if ``with_backward``; the peer's own
        computation (with a warning) where the settings cannot be fused."""
        reason = _unfused_reason(self)
        if reason is not None:
            _warn(self, reason)
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        queries = torch.cat(reps[0])
        docs = [torch.cat(r) for r in reps[1:]]
        loss = _fused_loss(self, queries, docs)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss
