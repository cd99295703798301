"""CLIP / SigLIP training with Hugging Face ``transformers`` on the fused losses.

A ``CLIPModel``'s (or ``SiglipModel``'s) own ``forward(..., return_loss=True)`` builds the
``N x N`` logits. Here the loss is computed from the two towers only:
``model.get_image_features`` and ``model.get_text_features`` give the embeddings, which are
L2-normalized, and

- a model without ``logit_bias`` (CLIP and the like) gets :func:`fastcl.clip_loss` with
  ``logit_scale = model.logit_scale.exp()``: the loss of ``CLIPModel.forward``;
- a model with ``logit_bias`` (SigLIP) gets :func:`fastcl.siglip_loss` with
  ``model.logit_scale.exp()`` and ``model.logit_bias``: the loss of ``SiglipModel.forward``.

Use it with the Trainer by changing the trainer class (or mixing it in)::

    # from transformers import Trainer
    from fastcl.compat.huggingface import ClipTrainer as Trainer

    class MyTrainer(ClipTrainerMixin, Trainer): ...

or call ``clip_loss_func(model, inputs)`` in a custom loop. ``Trainer(compute_loss_func=...)``
is not a way in: the Trainer calls it with the outputs of ``model(**inputs)``, the full forward
that has already built the logits; ``clip_loss_func`` therefore takes the model and the inputs,
as ``Trainer.compute_loss`` does.

Several processes: a ``DistributedDataParallel``-wrapped model (as the Trainer wraps it under
``torchrun``) runs the two towers through DDP's own forward, so that its gradient
synchronization is prepared as for any forward: for that one call, the wrapped model's
``forward`` is the pair of ``get_*_features`` calls. Each process's loss is that of its own
batch, as with the model's own forward under DDP. An ``nn.DataParallel`` wrapper is unwrapped
(one device computes).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .. import functional as _F
from ._util import world_size

__all__ = ["clip_loss_func", "ClipTrainerMixin", "ClipTrainer"]

# keys of a batch that go to get_text_features; the keys in _IGNORED are dropped, the rest go to
# get_image_features (pixel_values, interpolate_pos_encoding, pixel_attention_mask, ...)
_TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_IGNORED = ("return_loss", "labels", "return_dict", "output_attentions", "output_hidden_states",
            "num_items_in_batch")


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    for name in ("get_image_features", "get_text_features", "logit_scale"):
        if not hasattr(model, name):
            raise TypeError(
                f"clip_loss_func needs a CLIP-style model with get_image_features, "
                f"get_text_features and logit_scale (CLIPModel, SiglipModel, ...); "
                f"{type(model).__name__} has no {name}")
    return model


def _embeddings(out: Any, what: str) -> Tensor:
    """The embedding tensor of ``get_*_features`` (a tensor, or an output with pooler_output)."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"get_{what}_features returned {type(out).__name__}, expected a tensor or an "
                    f"output with pooler_output")


def _towers(m: nn.Module, image_kwargs: dict, text_kwargs: dict) -> tuple[Tensor, Tensor]:
    """The image and text embeddings of the batch."""
    return (_embeddings(m.get_image_features(**image_kwargs), "image"),
            _embeddings(m.get_text_features(**text_kwargs), "text"))


_NO_FORWARD = object()


def _through_ddp(ddp: nn.Module, m: nn.Module, image_kwargs: dict,
                 text_kwargs: dict) -> tuple[Tensor, Tensor]:
    """:func:`_towers` called by DDP's forward (which moves the inputs and prepares the
    backward's gradient reduction): the wrapped module's ``forward`` is replaced for the call
    and put back after it."""
    own = m.__dict__.get("forward", _NO_FORWARD)  # an instance-level forward (e.g. autocast)
    m.forward = lambda image_kwargs, text_kwargs: _towers(m, image_kwargs, text_kwargs)
    try:
        return ddp(image_kwargs=image_kwargs, text_kwargs=text_kwargs)
    finally:
        if own is _NO_FORWARD:
            del m.forward
        else:
            m.forward = own


def clip_loss_func(model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool = False,
                   num_items_in_batch=None, *, gather: Optional[str] = None, group=None):
    """The contrastive loss of a CLIP-style model on a batch, without its logits matrix.

    Same signature as ``Trainer.compute_loss`` (less ``self``): ``inputs`` holds the text inputs
    (``input_ids``, ``attention_mask``, ...) and the image inputs (``pixel_values``, ...).
    Returns the loss, or ``(loss, {"loss", "image_embeds", "text_embeds"})`` with
    ``return_outputs=True`` (normalized embeddings). ``num_items_in_batch`` is accepted and not
    used: the loss is a per-batch mean, as the model's own.

    ``gather="all_gather"`` or ``"ring"`` (several processes, ``group``): each process's images
    and texts against those of every process (global negatives, as open_clip's
    ``local_loss=True, gather_with_grad=True``), under :mod:`fastcl.distributed`'s convention:
    the mean over processes of the returned losses is the loss of the global batch, and DDP's
    averaged gradients are its gradients. Default None: the loss of this process's batch, as the
    model's own forward computes it.
    """
    m = _unwrap(model)
    text_kwargs = {k: v for k, v in inputs.items() if k in _TEXT_KEYS}
    image_kwargs = {k: v for k, v in inputs.items()
                    if k not in _TEXT_KEYS and k not in _IGNORED}
    if isinstance(model, nn.parallel.DistributedDataParallel):
        image, text = _through_ddp(model, m, image_kwargs, text_kwargs)
    else:
        image, text = _towers(m, image_kwargs, text_kwargs)
    text = text.to(image.device)
    scale = m.logit_scale.exp()
    bias = getattr(m, "logit_bias", None)
    if bias is not None:
        loss = _F.siglip_loss(image, text, scale, bias, normalize=True, gather=gather,
                              group=group)
    else:
        loss = _F.clip_loss(image, text, scale, normalize=True, gather=gather, group=group)
    if not return_outputs:
        return loss
    outputs = {"loss": loss,
               "image_embeds": nn.functional.normalize(image.detach(), dim=-1),
               "text_embeds": nn.functional.normalize(text.detach(), dim=-1)}
    return loss, outputs


class ClipTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to compute the CLIP / SigLIP loss with
    :func:`clip_loss_func`: ``class MyTrainer(ClipTrainerMixin, Trainer)``.

    ``fastcl_gather`` (class or instance attribute, default None) is passed to
    :func:`clip_loss_func` as ``gather``: set it to ``"all_gather"`` or ``"ring"`` for global
    negatives across the processes of a distributed run.
    """

    fastcl_gather: Optional[str] = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss`` through :func:`clip_loss_func`."""
        return clip_loss_func(model, inputs, return_outputs=return_outputs,
                              num_items_in_batch=num_items_in_batch,
                              gather=self._fastcl_gather())

    def _fastcl_gather(self) -> Optional[str]:
        """``fastcl_gather`` where ``torch.distributed`` runs several processes, else None."""
        return self.fastcl_gather if world_size() > 1 else None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation through :func:`clip_loss_func` as well (the Trainer's default would call
        the full forward): returns ``(loss, (image_embeds, text_embeds), None)``."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = clip_loss_func(model, inputs, return_outputs=True,
                                           gather=self._fastcl_gather())
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        return loss, (outputs["image_embeds"], outputs["text_embeds"]), None


_CLIP_TRAINER = None


def __getattr__(name: str):
    # ClipTrainer subclasses transformers.Trainer: built on first access, so that importing this
    # module does not import transformers
    global _CLIP_TRAINER
    if name == "ClipTrainer":
        if _CLIP_TRAINER is None:
            from transformers import Trainer

            class ClipTrainer(ClipTrainerMixin, Trainer):
                """``transformers.Trainer`` whose loss is :func:`clip_loss_func`."""

            ClipTrainer.__module__ = __name__
            _CLIP_TRAINER = ClipTrainer
        return _CLIP_TRAINER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
