"""``nn.Module`` losses: hyperparameters in the constructor, ``forward`` returns the loss.

Each module calls the function of the same family in :mod:`fastcl.functional`. Modules with a
temperature accept ``learnable_temperature=True``: the logit scale then becomes a parameter,
stored as its logarithm (initialized at ``1 / temperature``) and clamped at ``max_logit_scale``
(100, as in CLIP) when used. The modules of losses with global negatives take ``gather=None |
"all_gather" | "ring"`` and ``group=`` and pass them on (see :mod:`fastcl.distributed`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from .distributed import check_gather as _gather

__all__ = [
    "InfoNCELoss",
    "ClipLoss",
    "NTXentLoss",
    "SupConLoss",
    "MultiViewLoss",
    "HardNegativeNCELoss",
    "DCLLoss",
    "SigLipLoss",
    "AlignUniformLoss",
]


class _TemperatureLoss(nn.Module):
    """A loss with a fixed or learnable temperature."""

    def __init__(self, temperature: float, learnable_temperature: bool = False,
                 max_logit_scale: float = 100.0, backend: str = "auto", gather=None, group=None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.max_logit_scale = float(max_logit_scale)
        self.backend = backend
        self.gather, self.group = _gather(gather), group
        if learnable_temperature:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.register_parameter("log_logit_scale", None)

    @property
    def learnable_temperature(self) -> bool:
        return self.log_logit_scale is not None

    def logit_scale(self):
        """The logit scale in use: a float, or the clamped exponential of the parameter."""
        if self.log_logit_scale is None:
            return 1.0 / self.temperature
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def _settings(self) -> str:
        gather = "" if self.gather is None else f", gather={self.gather!r}"
        if self.learnable_temperature:
            return (f"temperature=learnable (init {self.temperature:g}, "
                    f"max_logit_scale={self.max_logit_scale:g}){gather}")
        return f"temperature={self.temperature:g}{gather}"

    def _dist(self) -> dict:
        return dict(gather=self.gather, group=self.group)


class InfoNCELoss(_TemperatureLoss):
    """InfoNCE over ``(query, key)`` pairs; see :func:`fastcl.info_nce`.

    ``forward(query, key, targets=None, negatives=None)``.
    """

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False,
                 symmetric_weight: float = 0.5, label_smoothing: float = 0.0,
                 normalize: bool = False, reduction: str = "mean",
                 learnable_temperature: bool = False, max_logit_scale: float = 100.0,
                 backend: str = "auto", gather: Optional[str] = None, group=None):
        super().__init__(temperature, learnable_temperature, max_logit_scale, backend, gather,
                         group)
        self.symmetric = symmetric
        self.symmetric_weight = symmetric_weight
        self.label_smoothing = label_smoothing
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, query: Tensor, key: Tensor, targets: Optional[Tensor] = None,
                negatives: Optional[Tensor] = None) -> Tensor:
        """The loss of queries ``[N, D]`` against keys ``[M, D]`` (row ``i``'s positive is key
        ``targets[i]``, by default key ``i``), with optional extra negatives ``[Q, D]``."""
        return F.info_nce(query, key, logit_scale=self.logit_scale(), targets=targets,
                          negatives=negatives, symmetric=self.symmetric,
                          symmetric_weight=self.symmetric_weight,
                          label_smoothing=self.label_smoothing, normalize=self.normalize,
                          reduction=self.reduction, backend=self.backend, **self._dist())

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"{self._settings()}, symmetric={self.symmetric}, "
                f"symmetric_weight={self.symmetric_weight}, label_smoothing={self.label_smoothing}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}")


class ClipLoss(InfoNCELoss):
    """The symmetric CLIP loss; see :func:`fastcl.clip_loss`.

    ``forward(image_features, text_features, logit_scale=None)``: a ``logit_scale`` passed to
    ``forward`` (the model's, already exponentiated) takes precedence over the module's own.
    """

    def __init__(self, temperature: float = 0.07, *, symmetric_weight: float = 0.5,
                 label_smoothing: float = 0.0, normalize: bool = False, reduction: str = "mean",
                 learnable_temperature: bool = False, max_logit_scale: float = 100.0,
                 backend: str = "auto", gather: Optional[str] = None, group=None):
        super().__init__(temperature, symmetric=True, symmetric_weight=symmetric_weight,
                         label_smoothing=label_smoothing, normalize=normalize,
                         reduction=reduction, learnable_temperature=learnable_temperature,
                         max_logit_scale=max_logit_scale, backend=backend, gather=gather,
                         group=group)

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale=None) -> Tensor:
        """The symmetric loss of paired ``[N, D]`` image and text features."""
        scale = self.logit_scale() if logit_scale is None else logit_scale
        return F.clip_loss(image_features, text_features, scale,
                           symmetric_weight=self.symmetric_weight,
                           label_smoothing=self.label_smoothing, normalize=self.normalize,
                           reduction=self.reduction, backend=self.backend, **self._dist())


class NTXentLoss(_TemperatureLoss):
    """NT-Xent (SimCLR) over two views; see :func:`fastcl.nt_xent`. ``forward(z1, z2)``.

    ``normalize`` defaults to True here (cosine similarity, as SimCLR defines it).
    """

    def __init__(self, temperature: float = 0.5, *, normalize: bool = True,
                 reduction: str = "mean", learnable_temperature: bool = False,
                 max_logit_scale: float = 100.0, backend: str = "auto",
                 gather: Optional[str] = None, group=None):
        super().__init__(temperature, learnable_temperature, max_logit_scale, backend, gather,
                         group)
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The loss of two ``[N, D]`` views of the same ``N`` samples."""
        return F.nt_xent(z1, z2, temperature=None, logit_scale=self.logit_scale(),
                         normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                         **self._dist())

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"{self._settings()}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss; see :func:`fastcl.supcon`. ``forward(features, labels=None)``."""

    def __init__(self, temperature: float = 0.1, *, variant: str = "out",
                 base_temperature: Optional[float] = None, normalize: bool = False,
                 reduction: str = "mean", learnable_temperature: bool = False,
                 max_logit_scale: float = 100.0, backend: str = "auto",
                 gather: Optional[str] = None, group=None):
        super().__init__(temperature, learnable_temperature, max_logit_scale, backend, gather,
                         group)
        self.variant = variant
        self.base_temperature = base_temperature
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, features: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The loss of ``[N, V, D]`` (or ``[N, D]``) features with ``[N]`` class labels
        (``None``: each sample its own class, the SimCLR case)."""
        return F.supcon(features, labels, temperature=None, logit_scale=self.logit_scale(),
                        variant=self.variant, base_temperature=self.base_temperature,
                        normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                        **self._dist())

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"{self._settings()}, variant={self.variant!r}, "
                f"base_temperature={self.base_temperature}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class MultiViewLoss(_TemperatureLoss):
    """Multi-view losses over ``[V, N, D]`` views; see :func:`fastcl.multiview_loss`."""

    def __init__(self, temperature: float = 0.1, *, method: str = "mv_infonce",
                 cmc_mode: str = "full", normalize: bool = False, reduction: str = "mean",
                 learnable_temperature: bool = False, max_logit_scale: float = 100.0,
                 backend: str = "auto", gather: Optional[str] = None, group=None):
        super().__init__(temperature, learnable_temperature, max_logit_scale, backend, gather,
                         group)
        self.method = method
        self.cmc_mode = cmc_mode
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, views: Tensor) -> Tensor:
        """The loss of ``V`` views ``[V, N, D]`` of the same ``N`` samples."""
        return F.multiview_loss(views, logit_scale=self.logit_scale(), method=self.method,
                                cmc_mode=self.cmc_mode, normalize=self.normalize,
                                reduction=self.reduction, backend=self.backend, **self._dist())

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"{self._settings()}, method={self.method!r}, cmc_mode={self.cmc_mode!r}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}")


class HardNegativeNCELoss(nn.Module):
    """Hard-negative weighting / debiasing; see :func:`fastcl.hard_negative_nce`. ``forward(z1, z2)``."""

    def __init__(self, temperature: float = 0.5, *, beta: float = 1.0, tau_plus: float = 0.1,
                 layout: str = "two_view", normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather: Optional[str] = None, group=None):
        super().__init__()
        self.gather, self.group = _gather(gather), group
        self.temperature = temperature
        self.beta = beta
        self.tau_plus = tau_plus
        self.layout = layout
        self.normalize = normalize
        self.reduction = reduction
        self.backend = backend

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The loss of two ``[N, D]`` views (``layout="paired"``: queries and keys)."""
        return F.hard_negative_nce(z1, z2, temperature=self.temperature, beta=self.beta,
                                   tau_plus=self.tau_plus, layout=self.layout,
                                   normalize=self.normalize, reduction=self.reduction,
                                   backend=self.backend, gather=self.gather, group=self.group)

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"temperature={self.temperature:g}, beta={self.beta:g}, tau_plus={self.tau_plus:g}, "
                f"layout={self.layout!r}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}"
                + ("" if self.gather is None else f", gather={self.gather!r}"))


class DCLLoss(_TemperatureLoss):
    """Decoupled contrastive loss (DCL / DCLW); see :func:`fastcl.dcl`. ``forward(z1, z2)``.

    ``normalize`` defaults to True, as lightly's ``DCLLoss`` does.
    """

    def __init__(self, temperature: float = 0.1, *, weighted: bool = False, sigma: float = 0.5,
                 normalize: bool = True, reduction: str = "mean",
                 learnable_temperature: bool = False, max_logit_scale: float = 100.0,
                 backend: str = "auto", gather: Optional[str] = None, group=None):
        super().__init__(temperature, learnable_temperature, max_logit_scale, backend, gather,
                         group)
        self.weighted = weighted
        self.sigma = sigma
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The loss of two ``[N, D]`` views of the same ``N`` samples."""
        return F.dcl(z1, z2, temperature=None, logit_scale=self.logit_scale(),
                     weighted=self.weighted, sigma=self.sigma, normalize=self.normalize,
                     reduction=self.reduction, backend=self.backend, **self._dist())

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"{self._settings()}, weighted={self.weighted}, sigma={self.sigma:g}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}")


class SigLipLoss(nn.Module):
    """The SigLIP sigmoid loss with a learnable logit scale and bias (init ``log 10`` and -10).

    ``forward(image_features, text_features, logit_scale=None, logit_bias=None)``: values
    passed to ``forward`` (a model's own) take precedence over the module's parameters.
    """

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0,
                 *, normalize: bool = False, reduction: str = "mean", backend: str = "auto",
                 gather: Optional[str] = None, group=None):
        super().__init__()
        self.gather, self.group = _gather(gather), group
        self.log_logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.normalize = normalize
        self.reduction = reduction
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale=None,
                logit_bias=None) -> Tensor:
        """The loss of paired ``[N, D]`` image and text features."""
        scale = self.log_logit_scale.exp() if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        return F.siglip_loss(image_features, text_features, scale, bias,
                             normalize=self.normalize, reduction=self.reduction,
                             backend=self.backend, gather=self.gather, group=self.group)

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"normalize={self.normalize}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}"
                + ("" if self.gather is None else f", gather={self.gather!r}"))


class AlignUniformLoss(nn.Module):
    """Alignment and uniformity (Wang & Isola 2020) as one objective:
    ``align_weight * alignment(x, y, alpha) + unif_weight * (uniformity(x, t) +
    uniformity(y, t)) / 2``; see :func:`fastcl.alignment` and :func:`fastcl.uniformity`.
    ``forward(x, y)`` on two ``[N, D]`` views (paired rows).

    ``normalize`` (default True) puts the features on the unit sphere first, where the paper
    defines both terms. With ``gather``, the uniformity terms run over the features of every
    rank and the alignment over this rank's pairs (the mean over ranks is the global one).
    """

    def __init__(self, align_weight: float = 1.0, unif_weight: float = 1.0, *, alpha: float = 2,
                 t: float = 2, normalize: bool = True, backend: str = "auto",
                 gather: Optional[str] = None, group=None):
        super().__init__()
        for name, w in (("align_weight", align_weight), ("unif_weight", unif_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (
                    math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        self.gather, self.group = _gather(gather), group
        self.align_weight, self.unif_weight = float(align_weight), float(unif_weight)
        self.alpha, self.t = alpha, t
        self.normalize = normalize
        self.backend = backend

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The weighted sum of the alignment of the pairs ``(x_i, y_i)`` and the mean
        uniformity of ``x`` and ``y``."""
        if self.normalize:
            x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
        unif = [F.uniformity(z, self.t, backend=self.backend, gather=self.gather,
                             group=self.group) for z in (x, y)]
        return (self.align_weight * F.alignment(x, y, self.alpha)
                + self.unif_weight * (unif[0] + unif[1]) / 2)

    def extra_repr(self) -> str:
        """The settings shown by ``repr(module)``."""
        return (f"align_weight={self.align_weight:g}, unif_weight={self.unif_weight:g}, "
                f"alpha={self.alpha:g}, t={self.t:g}, normalize={self.normalize}, "
                f"backend={self.backend!r}"
                + ("" if self.gather is None else f", gather={self.gather!r}"))
