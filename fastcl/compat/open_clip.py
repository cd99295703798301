"""Drop-in replacements for ``open_clip.loss.ClipLoss`` and ``open_clip.loss.SigLipLoss``.

Swap the import and keep the training loop as it is::

    # from open_clip.loss import ClipLoss, SigLipLoss
    from fastcl.compat.open_clip import ClipLoss, SigLipLoss

    losses = loss(**model_out, output_dict=True)   # {"contrastive_loss": ...}

Same constructor arguments, ``forward`` signature and results as open_clip: the features are
used as given (open_clip models normalize them) and ``logit_scale`` is the already exponentiated
scale the model returns; it and ``logit_bias`` receive gradients. The CLIP loss runs on
:func:`fastcl.clip_loss` / :func:`fastcl.info_nce` without the ``N x N`` logits.

Multi-process training: ``ClipLoss`` with ``world_size > 1`` gathers the features with
open_clip's own ``gather_features`` (``torch.distributed`` all-gather, with or without gradient,
or Horovod, exactly as open_clip does; open_clip is imported only then) and computes the same
global or local loss as open_clip. The setting of most trainings, ``local_loss=True,
gather_with_grad=True`` on ``torch.distributed``, runs as :func:`fastcl.clip_loss` with
``gather="all_gather"`` instead: both directions from one pass over the gathered features
(open_clip's arithmetic takes one per direction), the same loss and feature gradients; the
gradient of ``logit_scale`` (and ``logit_bias``) is split differently between the ranks, with
the same sum over ranks, so DDP's averaging gives the same update.
``SigLipLoss`` with ``world_size > 1`` contrasts each rank's images with the texts of every
rank on fastcl's ``gather="ring"`` (open_clip's neighbour exchanges, ``dist_impl="bidir"`` or
``"shift"``) or ``gather="all_gather"`` (``"reduce"``, ``"gather"``): the same loss and
gradients as open_clip on every rank.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as _F
from ._util import CompatFallbackWarning, rank, world_size

__all__ = ["ClipLoss", "SigLipLoss", "CompatFallbackWarning"]


def _check_process_group(name: str, rank: int, world_size: int) -> None:
    """Refuse ``rank`` / ``world_size`` that are not those of the default process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"fastcl.compat.open_clip.{name}(world_size={world_size}) needs "
                           "torch.distributed to be initialized (init_process_group)")
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"fastcl.compat.open_clip.{name}: rank={rank}, world_size={world_size} "
                         f"differ from the default process group's rank {dist.get_rank()} and "
                         f"world size {dist.get_world_size()}")


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: ``(CE(logits) + CE(logits.T)) / 2`` with
    ``logits = logit_scale * image_features @ text_features.T``.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
    returns the loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``. A
    ``logit_bias`` shifts every logit and so changes nothing in a softmax loss (its gradient is
    0), as in open_clip.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        # open_clip's label cache, kept for code that reads it; the fused loss needs no labels
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, num_logits) -> Tensor:
        """The targets open_clip's cross-entropy would use (kept for API parity)."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        """The loss (a dict ``{"contrastive_loss": loss}`` with ``output_dict=True``), as
        open_clip's ``ClipLoss.forward`` returns it; ``logit_bias`` is added to the logits if
        given."""
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = _F.clip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image_features, text_features, logit_scale, logit_bias):
        if self._fastcl_gather():
            return _F.clip_loss(image_features, text_features, logit_scale, logit_bias,
                                gather="all_gather")
        from open_clip.loss import gather_features

        all_image, all_text = gather_features(
            image_features, text_features, local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad, rank=self.rank,
            world_size=self.world_size, use_horovod=self.use_horovod)
        if not self.local_loss:
            # every rank computes the loss of the global batch, as open_clip does
            return _F.clip_loss(all_image, all_text, logit_scale, logit_bias)
        # local rows against all columns; targets offset by this rank's block
        n = image_features.shape[0]
        targets = torch.arange(n, device=image_features.device) + n * self.rank
        per_image = _F.info_nce(image_features, all_text, logit_scale=logit_scale,
                                logit_bias=logit_bias, targets=targets)
        per_text = _F.info_nce(text_features, all_image, logit_scale=logit_scale,
                               logit_bias=logit_bias, targets=targets)
        return (per_image + per_text) / 2

    def _fastcl_gather(self) -> bool:
        """Whether the settings are those of ``gather="all_gather"`` on the default group: local
        loss, gradients through the gathered features, this process's rank and world size."""
        return (self.local_loss and self.gather_with_grad and not self.use_horovod
                and (rank(), world_size()) == (self.rank, self.world_size))

    def extra_repr(self) -> str:
        """The distributed settings, for ``repr``."""
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"rank={self.rank}, world_size={self.world_size}, use_horovod={self.use_horovod}")


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: ``-(1/N) sum_ij log sigmoid(z_ij (logit_scale <x_i, y_j> +
    logit_bias))`` with ``z`` = +1 on the diagonal, -1 elsewhere.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``;
    ``logit_bias=None`` means no bias.

    ``world_size > 1`` (on ``torch.distributed``, with this process's rank and world size):
    this rank's images against the texts of every rank, as open_clip's exchanges of text
    features compute it, divided by the number of this rank's images; the same loss and
    gradients (``logit_scale`` and ``logit_bias`` included) on every rank. ``dist_impl``
    ``"bidir"`` / ``"shift"`` (neighbour exchanges) run on fastcl's ``gather="ring"``,
    ``"reduce"`` / ``"gather"`` on ``gather="all_gather"``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather' or "
                             f"None, got {dist_impl!r}")
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        """The loss (a dict ``{"contrastive_loss": loss}`` with ``output_dict=True``), as
        open_clip's ``SigLipLoss.forward`` returns it."""
        gather = None
        if self.world_size > 1:
            _check_process_group("SigLipLoss", self.rank, self.world_size)
            gather = "ring" if self.dist_impl in ("bidir", "shift") else "all_gather"
        bias = 0.0 if logit_bias is None else logit_bias
        loss = _F.siglip_loss(image_features, text_features, logit_scale, bias, gather=gather)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        """The distributed settings, for ``repr``."""
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"
