"""Helpers shared by the adapters of :mod:`fastcl.compat` (no peer library imported here)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["CompatFallbackWarning", "warn_once", "world_size", "rank"]


class CompatFallbackWarning(UserWarning):
    """A :mod:`fastcl.compat` adapter ran the original library's loss instead of a fused one."""


def warn_once(module: nn.Module, reason: str, message: str, stacklevel: int = 3) -> None:
    """Warn once per loss object and ``reason``."""
    seen = module.__dict__.setdefault("_fastcl_warned", set())
    if reason in seen:
        return
    seen.add(reason)
    warnings.warn(message, CompatFallbackWarning, stacklevel=stacklevel)


def world_size() -> int:
    """The number of processes of the default group (1 when torch.distributed is not in use)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0
