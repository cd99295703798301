"""Drop-in replacements for lightly's ``NTXentLoss``, ``DCLLoss`` and ``DCLWLoss``.

Swap the import and keep the training loop as it is::

    # from lightly.loss import NTXentLoss, DCLLoss, DCLWLoss
    from fastcl.compat.lightly import NTXentLoss, DCLLoss, DCLWLoss

    loss = criterion(out0, out1)

Same constructor arguments, attributes and results as lightly (which L2-normalizes ``out0`` and
``out1`` inside the loss): ``NTXentLoss`` runs on :func:`fastcl.nt_xent`, or with a memory bank
on :func:`fastcl.info_nce` against the bank; ``DCLLoss`` / ``DCLWLoss`` run on
:func:`fastcl.dcl`. lightly itself is not imported.

Several processes: ``gather_distributed=True`` while ``torch.distributed`` runs more than one
process contrasts each process's samples with those of every process, as lightly does with its
gathered features (gradients through the gathering), on fastcl's ``gather="all_gather"``
strategy (:mod:`fastcl.distributed`): the same loss and gradients on every rank. With one
process, or with the memory bank (whose negatives lightly does not gather), it changes nothing.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import functional as _F
from ._util import CompatFallbackWarning, world_size

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "MemoryBank", "negative_mises_fisher_weights",
           "CompatFallbackWarning"]


def _gather(gather_distributed: bool) -> Optional[str]:
    """fastcl's ``gather`` for lightly's ``gather_distributed``: ``"all_gather"`` when it is set
    and ``torch.distributed`` runs more than one process, else None."""
    return "all_gather" if gather_distributed and world_size() > 1 else None


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if abs(temperature) < 1e-8:
        raise ValueError("Illegal temperature: abs({}) < 1e-8".format(temperature))
    if not temperature > 0:
        raise ValueError(f"fastcl needs a positive temperature, got {temperature}")


class MemoryBank(nn.Module):
    """lightly's ``MemoryBankModule`` as ``NTXentLoss`` uses it: a FIFO queue of ``(K, D)``
    unit vectors, initialized with normalized Gaussian noise (drawn from the global RNG at
    construction, as lightly draws it), updated with the detached second view of every batch
    whose first view requires grad; a batch that would run past the end fills the bank to its
    end and the pointer wraps to 0 (the rest of that batch is dropped), as in lightly.

    ``bank`` is ``(K, D)`` (``feature_dim_first`` is not used by ``NTXentLoss``).
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(
                f"Memory bank size 'size={size}' does not specify the feature dimension. Set it "
                f"with 'size=({size}, dim)', or pass 'size=0' to disable the memory bank.")
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) "
                             "tuple, or 'size=0' to disable the memory bank.")
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.register_buffer("bank", torch.empty(size=size_tuple, dtype=torch.float),
                             persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            with torch.no_grad():
                self.bank = F.normalize(torch.randn(size_tuple).type_as(self.bank), dim=-1)
                self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    @torch.no_grad()
    def dequeue_and_enqueue(self, batch: Tensor) -> None:
        """Write ``batch`` (detached) into the queue at its pointer, wrapping around at
        the end as lightly does; with ``gather_distributed`` and several processes, the batches
        of every process (in rank order)."""
        if self.gather_distributed and world_size() > 1:
            parts = [torch.empty_like(batch) for _ in range(world_size())]
            torch.distributed.all_gather(parts, batch.detach().contiguous())
            batch = torch.cat(parts, dim=0)
        batch_size = batch.shape[0]
        ptr = int(self.bank_ptr)
        if ptr + batch_size >= self.size[0]:
            self.bank[ptr:] = batch[: self.size[0] - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr: ptr + batch_size] = batch.detach()
            self.bank_ptr[0] = ptr + batch_size


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``.

    Without a memory bank: NT-Xent (SimCLR) over the ``2N`` normalized rows of
    ``[out0; out1]``. With ``memory_bank_size=(K, D)`` (MoCo): row ``i`` of ``out0`` against its
    own positive ``out1[i]`` and the ``K`` bank entries only,
    ``l_i = log(exp(s_ii) + sum_k exp(s_ik)) - s_ii``; the bank is read before it is updated with
    ``out1`` (when ``out0`` requires grad).
    """

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.memory_bank = MemoryBank(size=memory_bank_size,
                                      gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        _check_temperature(temperature)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. Please set "
                "gather_distributed=False or install a torch version with distributed support.")

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """The loss of the two views ``out0``, ``out1`` (``[N, D]``, normalized here), with
        the memory bank's entries as extra negatives if it is enabled (the bank is then
        updated with ``out1`` when gradients are wanted)."""
        if not self.memory_bank.enabled:
            return _F.nt_xent(out0, out1, temperature=self.temperature, normalize=True,
                              gather=_gather(self.gather_distributed))
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        negatives = self.memory_bank.bank.clone().detach().to(device=out0.device,
                                                              dtype=out0.dtype)
        if out0.requires_grad:
            self.memory_bank.dequeue_and_enqueue(out1)
        return _bank_loss(out0, out1, negatives, self.temperature)

    def extra_repr(self) -> str:
        """The loss's settings, for ``repr``."""
        return (f"temperature={self.temperature:g}, memory_bank_size={self.memory_bank.size}, "
                f"gather_distributed={self.gather_distributed}")


def _bank_loss(q: Tensor, k: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """``mean_i [log(exp(s_ii) + sum_b exp(s_ib)) - s_ii]`` for unit ``q``, ``k``, ``bank``.

    The log-sum-exp over the bank comes from the fused :func:`fastcl.info_nce` against the bank
    with target column 0 (``LSE_b s_ib - s_i0``), to which ``s_i0`` is added back.
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / temperature
    zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    lse_bank = _F.info_nce(q, bank, temperature=temperature, targets=zeros, reduction="none")
    lse_bank = lse_bank + scale * (q.to(dt) @ bank[0].to(dt))
    s_pos = scale * (q.to(dt) * k.to(dt)).sum(-1)
    return torch.logaddexp(torch.zeros_like(s_pos), lse_bank - s_pos).mean()


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly's DCLW weights ``2 - N softmax_i(<out0_i, out1_i> / sigma)`` (detached)."""
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return (2 - out0.shape[0] * F.softmax(similarity, dim=0)).detach()


class DCLLoss(nn.Module):
    """lightly's ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``.

    The decoupled loss over the ``2N`` normalized rows, ``0.5 (loss(out0, out1) + loss(out1,
    out0))``. ``weight_fn(out0, out1)`` (called with the normalized views, as lightly does)
    scales each positive term ``-s_ii``: the loss is then :func:`fastcl.dcl` per anchor plus
    ``(1 - w_i) s_ii``, exact for any weight function, with its gradient if it has one.
    """

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        _check_temperature(temperature)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. Please set "
                "gather_distributed=False or install a torch version with distributed support.")

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """The decoupled loss of the two views ``out0``, ``out1`` (``[N, D]``, normalized
        here), weighted by ``weight_fn`` if set."""
        gather = _gather(self.gather_distributed)
        fn = self.weight_fn
        if not fn:
            return _F.dcl(out0, out1, temperature=self.temperature, normalize=True, gather=gather)
        # lightly's weights are a softmax over this process's samples: fastcl's weighted loss
        # takes it over the global batch, so with a gather the weights are applied here
        if gather is None and isinstance(fn, partial) and fn.func is negative_mises_fisher_weights \
                and not fn.args and set(fn.keywords) <= {"sigma"}:
            sigma = fn.keywords.get("sigma", 0.5)
            return _F.dcl(out0, out1, temperature=self.temperature, weighted=True, sigma=sigma,
                          normalize=True)
        u0 = F.normalize(out0, dim=1)
        u1 = F.normalize(out1, dim=1)
        n = u0.shape[0]
        per = _F.dcl(u0, u1, temperature=self.temperature, reduction="none", gather=gather)
        dt = per.dtype
        s_pos = (u0.to(dt) * u1.to(dt)).sum(-1) / self.temperature
        w0 = fn(u0, u1)
        w1 = fn(u1, u0)
        loss0 = (per[:n] + (1 - w0) * s_pos).mean()
        loss1 = (per[n:] + (1 - w1) * s_pos).mean()
        return 0.5 * (loss0 + loss1)

    def extra_repr(self) -> str:
        """The loss's settings, for ``repr``."""
        return (f"temperature={self.temperature:g}, weight_fn={self.weight_fn}, "
                f"gather_distributed={self.gather_distributed}")


class DCLWLoss(DCLLoss):
    """lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``: DCL with the
    negative von Mises-Fisher weights; :func:`fastcl.dcl` with ``weighted=True``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature,
                         weight_fn=partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed=gather_distributed)
        self.sigma = sigma
