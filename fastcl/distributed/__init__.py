"""Global negatives across processes, on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

The public functions take ``gather=None | "all_gather"`` and ``group=``. With
``gather="all_gather"`` every rank computes the loss of its own anchors against the anchors of
all ranks (like open_clip's ``local_loss=True, gather_with_grad=True``), through the same fused
kernels: the gathered columns are ordered with the rank's own block first, so the kernels see the
same layout as on one process.

Gradient convention (the one under which DDP's gradient averaging gives every parameter exactly
the gradient of one process training on the global batch):

- the mean over ranks of the returned losses is the loss of the global batch;
- each rank's gradient with respect to its shard is ``world_size`` times the gradient of the
  global loss with respect to that shard.

Shards must have equal sizes on every rank (checked; unequal shards are refused).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GATHER", "Shard", "shard"]

GATHER = (None, "all_gather")


class Shard:
    """Where this rank's anchors sit in the global batch, and the collectives to reach the rest."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("gather='all_gather' needs torch.distributed to be initialized "
                               "(torch.distributed.init_process_group)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def check_equal(self, name: str, x: Tensor) -> None:
        """Refuse shards whose leading size differs across ranks (one small collective)."""
        if torch.compiler.is_compiling():
            return
        size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        values = [int(s) for s in sizes]
        if len(set(values)) != 1:
            raise ValueError(f"gather='all_gather' needs equal shards on every rank; {name} has "
                             f"{values} rows on ranks 0..{self.world - 1}")

    def columns(self, x: Tensor, dim: int = 0) -> Tensor:
        """All ranks' ``x`` concatenated along ``dim``, this rank's block first, with gradient.

        The backward sums, for this rank's block, the gradients that every rank computed.
        """
        parts = _AllGather.apply(x, self.group, self.world, self.rank)
        order = [parts[self.rank]] + [p for j, p in enumerate(parts) if j != self.rank]
        return torch.cat(order, dim=dim)

    def columns_nograd(self, x: Tensor, dim: int = 0) -> Tensor:
        """Like :meth:`columns` for tensors that carry no gradient (labels, weights)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        order = [parts[self.rank]] + [p for j, p in enumerate(parts) if j != self.rank]
        return torch.cat(order, dim=dim)

    def block_ids(self, n: int, device) -> Tensor:
        """Global ids ``0..world*n`` in the column order of :meth:`columns` for blocks of ``n``."""
        order = [self.rank] + [j for j in range(self.world) if j != self.rank]
        return torch.cat([torch.arange(j * n, (j + 1) * n, device=device) for j in order])

    def total(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over ranks (no gradient flows through the other ranks' terms)."""
        x = x.detach().clone()
        dist.all_reduce(x, group=self.group)
        return x

    def reduce(self, per_anchor: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
        """Reduce this rank's per-anchor losses under the convention of the module docstring."""
        if reduction == "none":
            return per_anchor
        local = per_anchor.sum()
        if reduction == "sum":
            return self.world * local
        count = (per_anchor.new_tensor(per_anchor.numel()) if weight is None
                 else weight.sum().to(per_anchor.dtype))
        return self.world * local / self.total(count).clamp_min(1)


class _AllGather(torch.autograd.Function):
    """``all_gather`` whose backward sums every rank's gradient of each block (all_reduce)."""

    @staticmethod
    def forward(ctx, x, group, world, rank):
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        total = torch.stack([g if g is not None else torch.zeros_like(grads[ctx.rank])
                             for g in grads]).contiguous()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.rank], None, None, None


def shard(gather: Optional[str], group=None) -> Optional[Shard]:
    """``None`` for a single-process loss, else the :class:`Shard` of this rank."""
    if gather not in GATHER:
        raise ValueError(f"gather must be one of {GATHER}, got {gather!r}")
    if gather is None:
        return None
    return Shard(group)
