"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

__all__ = ["WarmupCosine", "build_optimizer", "build_scheduler"]


class WarmupCosine:
    """LR multiplier of step ``s``: ``(s + 1) / warmup`` during the warmup, then a cosine from 1
    down to ``min_ratio`` at ``total`` steps. A plain object (its ``__dict__`` is the state),
    so ``LambdaLR.state_dict`` stores it."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        self.warmup = int(warmup)
        self.total = max(int(total), 1)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(modules: Iterable[nn.Module], *, lr: float, weight_decay: float,
                    betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the parameters of ``modules``: weight decay on tensors of 2 or more dimensions
    (weights), none on biases, norms and scalars (the logit scale and bias)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
