"""Drop-in replacements for the contrastive losses of other libraries.

Each submodule mirrors the constructor, ``forward`` signature and results of one library's losses
and computes them with fastcl's fused functions, so that adopting fastcl in an existing trainer is
a one-line change of an import:

- :mod:`fastcl.compat.open_clip`: ``ClipLoss``, ``SigLipLoss``
- :mod:`fastcl.compat.pytorch_metric_learning`: ``NTXentLoss``, ``SupConLoss``,
  ``SelfSupervisedLoss``
- :mod:`fastcl.compat.lightly`: ``NTXentLoss`` (with memory bank), ``DCLLoss``, ``DCLWLoss``
- :mod:`fastcl.compat.sentence_transformers`: ``MultipleNegativesRankingLoss``,
  ``CachedMultipleNegativesRankingLoss``
- :mod:`fastcl.compat.huggingface`: ``clip_loss_func``, ``ClipTrainerMixin``, ``ClipTrainer``
  for CLIP / SigLIP models of ``transformers``

A call that the fused functions cannot reproduce exactly (a custom distance or reducer, a label
layout with other semantics, a direction mix that has no fused equivalent) either runs the
original library's loss, with a one-time :class:`CompatFallbackWarning` per loss object and
reason, or raises a clear error; it never returns a silently different result. The list of what
each adapter does not support is in ``docs/swap_in.md``.

Importing :mod:`fastcl` or :mod:`fastcl.compat` imports none of these libraries; a submodule
imports its own library only where it needs it (a base class, or a fallback).
"""
