"""Any fastcl loss, by name, as a function of the embeddings of a batch.

:class:`Objective` wraps the ``fastcl.nn`` module of the loss (which owns the learnable
``log_logit_scale`` when the temperature is learned) and maps the list of per-slot embeddings
``[E_0, ..., E_{V-1}]`` (each ``[N, D]``) onto the loss's own calling convention:

=====================  ===============================  ==========================
name                   call                             slots
=====================  ===============================  ==========================
``clip``               ``clip_loss(E0, E1, scale)``     2
``info_nce``           ``info_nce(E0, E1)``             2
``nt_xent``            ``nt_xent(E0, E1)``              2
``dcl``                ``dcl(E0, E1)``                  2
``hard_negative_nce``  ``hard_negative_nce(E0, E1)``    2
``siglip``             ``siglip_loss(E0, E1, a, b)``    2
``supcon``             ``supcon([N, V, D], labels)``    any (labels if given)
``multiview``          ``multiview_loss([V, N, D])``    >= 2
``align_uniform``      ``AlignUniformLoss(E0, E1)``     2
=====================  ===============================  ==========================

On several processes the trainer calls :meth:`Objective.set_gather` (``"all_gather"`` by
default, or ``"ring"``): the module then reaches the embeddings of every rank through
:mod:`fastcl.distributed`, which also says which values exist.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn
from ..distributed import check_gather

__all__ = ["LOSSES", "LossSpec", "Objective", "build_objective"]


@dataclass(frozen=True)
class LossSpec:
    module: type
    op: str                  # name of the op in fastcl.dispatch
    slots: Optional[int]     # exact number of embedding slots, None: any (>= min_slots)
    min_slots: int = 2
    temperature: bool = True  # takes temperature / learnable_temperature
    uses_labels: bool = False


LOSSES = {
    "clip": LossSpec(fnn.ClipLoss, "info_nce", 2),
    "info_nce": LossSpec(fnn.InfoNCELoss, "info_nce", 2),
    "nt_xent": LossSpec(fnn.NTXentLoss, "nt_xent", 2),
    "dcl": LossSpec(fnn.DCLLoss, "dcl", 2),
    "hard_negative_nce": LossSpec(fnn.HardNegativeNCELoss, "hard_negative_nce", 2),
    "siglip": LossSpec(fnn.SigLipLoss, "siglip_loss", 2, temperature=False),
    "supcon": LossSpec(fnn.SupConLoss, "supcon", None, min_slots=1, uses_labels=True),
    "multiview": LossSpec(fnn.MultiViewLoss, "multiview_loss", None, min_slots=2),
    "align_uniform": LossSpec(fnn.AlignUniformLoss, "uniformity", 2, temperature=False),
}

# Options the trainer sets itself (through TrainConfig), not through loss_options.
_RESERVED = ("temperature", "learnable_temperature", "max_logit_scale", "normalize", "backend")


class Objective(nn.Module):
    """``forward(embeddings, labels=None) -> loss`` for the loss ``name``.

    The module's ``gather`` and ``group`` (see :mod:`fastcl.distributed`) say how the loss
    reaches the embeddings of the other ranks; the trainer sets them on several processes.
    """

    def __init__(self, name: str, module: nn.Module, *, use_labels: bool = True):
        super().__init__()
        self.name = name
        self.spec = LOSSES[name]
        self.loss = module
        self.use_labels = use_labels

    def set_gather(self, gather: Optional[str], group=None) -> None:
        """Contrast with the embeddings of every rank of ``group`` (``gather="all_gather"`` or
        ``"ring"``), or only with this process's (``None``); unknown values raise ValueError."""
        self.loss.gather, self.loss.group = check_gather(gather), group

    @property
    def gather(self) -> Optional[str]:
        return self.loss.gather

    @property
    def op(self) -> str:
        return self.spec.op

    def check_slots(self, slots: int) -> None:
        """Refuse data whose number of embedding slots (views / towers) the loss cannot
        take (``ValueError``)."""
        s = self.spec
        if (s.slots is not None and slots != s.slots) or slots < s.min_slots:
            want = str(s.slots) if s.slots is not None else f"at least {s.min_slots}"
            raise ValueError(f"loss {self.name!r} takes {want} embedding slots (views / towers), "
                             f"the data gives {slots}")

    def forward(self, embeddings: list, labels: Optional[Tensor] = None) -> Tensor:
        """The loss of the slots' embeddings (and the labels, for a supervised loss)."""
        e = embeddings
        if self.name == "supcon":
            args = (torch.stack(e, dim=1), labels if self.use_labels else None)
        elif self.name == "multiview":
            args = (torch.stack(e, dim=0),)
        else:
            args = (e[0], e[1])
        return self.loss(*args)

    def logit_scale(self) -> Optional[float]:
        """The logit scale in use (``1 / temperature``), for logs; ``None`` if the loss has none."""
        m = self.loss
        if getattr(m, "log_logit_scale", None) is not None:
            return float(m.log_logit_scale.detach().exp().clamp(max=getattr(m, "max_logit_scale", math.inf)))
        t = getattr(m, "temperature", None)
        return None if t is None else 1.0 / float(t)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep a learnable ``log(logit_scale)`` in ``[0, log(max_logit_scale)]`` (as CLIP does
        after each optimizer step), so momentum cannot push it past the clamp."""
        m = self.loss
        p = getattr(m, "log_logit_scale", None)
        if p is not None and hasattr(m, "max_logit_scale"):
            p.clamp_(0.0, math.log(m.max_logit_scale))


def build_objective(name: str, *, options: Optional[dict] = None, temperature: Optional[float] = None,
                    learnable_temperature: bool = False, max_logit_scale: float = 100.0,
                    normalize: bool = True, use_labels: bool = True,
                    backend: str = "auto") -> Objective:
    """The :class:`Objective` of loss ``name`` with its ``options`` (keyword arguments of the
    ``fastcl.nn`` module: ``variant``, ``method``, ``symmetric``, ``label_smoothing``, ...)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    spec = LOSSES[name]
    options = dict(options or {})
    clash = sorted(set(options) & set(_RESERVED))
    if clash:
        raise ValueError(f"set {', '.join(clash)} through the trainer's own options "
                         f"(--temperature, --learnable-temperature, --no-normalize, --backend), "
                         f"not through loss options")
    params = inspect.signature(spec.module.__init__).parameters
    accepted = [p for p in params if p not in ("self", *_RESERVED)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for loss {name!r}; "
                         f"accepted: {', '.join(accepted) or 'none'}")
    kwargs = dict(options, normalize=normalize, backend=backend)
    if spec.temperature:
        if temperature is not None:
            kwargs["temperature"] = float(temperature)
        if learnable_temperature:
            if "learnable_temperature" not in params:
                raise ValueError(f"loss {name!r} has a fixed temperature; it cannot be learned")
            kwargs["learnable_temperature"] = True
            kwargs["max_logit_scale"] = float(max_logit_scale)
    elif temperature is not None or learnable_temperature:
        raise ValueError(f"loss {name!r} has no temperature (SigLIP learns its own logit scale "
                         f"and bias; alignment / uniformity use distances); drop temperature / "
                         f"learnable_temperature")
    return Objective(name, spec.module(**kwargs), use_labels=use_labels)
