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
=====================  ===============================  ==========================

On several processes the trainer sets :attr:`Objective.gather` (``"all_gather"`` by default):
the loss is then called through :mod:`fastcl.functional` with that ``gather`` (the modules of
``fastcl.nn`` have no such argument), with the module's own settings and logit scale. The value
is passed through unchanged: :func:`fastcl.distributed.shard` decides which values exist.
SigLIP has no multi-process form in fastcl and is refused there.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as fF
from .. import nn as fnn

__all__ = ["LOSSES", "LossSpec", "Objective", "build_objective"]


@dataclass(frozen=True)
class LossSpec:
    module: type
    op: str                  # name of the op in fastcl.dispatch
    slots: Optional[int]     # exact number of embedding slots, None: any (>= min_slots)
    min_slots: int = 2
    temperature: bool = True  # takes temperature / learnable_temperature
    uses_labels: bool = False
    # the fastcl.functional loss called with `gather`, and the module settings it takes
    # (besides normalize, reduction, backend); None: no multi-process form
    function: Optional[str] = None
    settings: tuple = ()


LOSSES = {
    "clip": LossSpec(fnn.ClipLoss, "info_nce", 2, function="info_nce",
                     settings=("symmetric", "symmetric_weight", "label_smoothing")),
    "info_nce": LossSpec(fnn.InfoNCELoss, "info_nce", 2, function="info_nce",
                         settings=("symmetric", "symmetric_weight", "label_smoothing")),
    "nt_xent": LossSpec(fnn.NTXentLoss, "nt_xent", 2, function="nt_xent"),
    "dcl": LossSpec(fnn.DCLLoss, "dcl", 2, function="dcl", settings=("weighted", "sigma")),
    "hard_negative_nce": LossSpec(fnn.HardNegativeNCELoss, "hard_negative_nce", 2,
                                  function="hard_negative_nce",
                                  settings=("temperature", "beta", "tau_plus", "layout")),
    "siglip": LossSpec(fnn.SigLipLoss, "siglip_loss", 2, temperature=False),
    "supcon": LossSpec(fnn.SupConLoss, "supcon", None, min_slots=1, uses_labels=True,
                       function="supcon", settings=("variant", "base_temperature")),
    "multiview": LossSpec(fnn.MultiViewLoss, "multiview_loss", None, min_slots=2,
                          function="multiview_loss", settings=("method", "cmc_mode")),
}

# Options the trainer sets itself (through TrainConfig), not through loss_options.
_RESERVED = ("temperature", "learnable_temperature", "max_logit_scale", "normalize", "backend")


class Objective(nn.Module):
    """``forward(embeddings, labels=None) -> loss`` for the loss ``name``.

    ``gather`` (``None``: one process) and ``group``: how the loss reaches the embeddings of the
    other ranks (see :mod:`fastcl.distributed`); set by the trainer on several processes.
    """

    def __init__(self, name: str, module: nn.Module, *, use_labels: bool = True,
                 gather: Optional[str] = None, group=None):
        super().__init__()
        self.name = name
        self.spec = LOSSES[name]
        self.loss = module
        self.use_labels = use_labels
        self.gather = gather
        self.group = group

    def check_gather(self) -> None:
        """Refuse a loss without a multi-process form while :attr:`gather` is set."""
        if self.gather is not None and self.spec.function is None:
            raise ValueError(f"loss {self.name!r} has no multi-process form in fastcl (no "
                             f"gather=); train it on one process or pick another loss")

    @property
    def op(self) -> str:
        return self.spec.op

    def check_slots(self, slots: int) -> None:
        s = self.spec
        if (s.slots is not None and slots != s.slots) or slots < s.min_slots:
            want = str(s.slots) if s.slots is not None else f"at least {s.min_slots}"
            raise ValueError(f"loss {self.name!r} takes {want} embedding slots (views / towers), "
                             f"the data gives {slots}")

    def forward(self, embeddings: list, labels: Optional[Tensor] = None) -> Tensor:
        e = embeddings
        if self.name == "supcon":
            args = (torch.stack(e, dim=1), labels if self.use_labels else None)
        elif self.name == "multiview":
            args = (torch.stack(e, dim=0),)
        else:
            args = (e[0], e[1])
        if self.gather is None:
            return self.loss(*args)
        self.check_gather()
        return self._gathered(*args)

    def _gathered(self, *args) -> Tensor:
        """The loss through :mod:`fastcl.functional` with ``gather``: the module's settings."""
        m, spec = self.loss, self.spec
        kwargs = {k: getattr(m, k) for k in ("normalize", "reduction", "backend") + spec.settings}
        if spec.temperature and "temperature" not in spec.settings:
            kwargs.update(temperature=None, logit_scale=m.logit_scale())
        return getattr(fF, spec.function)(*args, **kwargs, gather=self.gather, group=self.group)

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
                         f"and bias); drop temperature / learnable_temperature")
    return Objective(name, spec.module(**kwargs), use_labels=use_labels)
