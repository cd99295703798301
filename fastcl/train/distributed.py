"""Multi-GPU hook: ``torchrun --nproc_per_node=G -m fastcl.train ...``.

What is here:

- :func:`setup`: when ``WORLD_SIZE > 1`` (set by ``torchrun``), initializes the default process
  group (NCCL on CUDA, gloo on CPU) from the ``env://`` variables, pins each rank to its
  ``LOCAL_RANK`` GPU, and returns a :class:`World`; with one process it does nothing.
- :func:`wrap_model`: wraps the model in ``DistributedDataParallel`` (``find_unused_parameters``
  for two-tower models, whose passes each use one tower). The chunked step calls the wrapper's
  ``no_sync`` on every replayed chunk but the last, so gradients are all-reduced once per step.

What is missing: a contrastive loss must see the embeddings of *every* rank (each sample's
negatives are the whole global batch), and each rank must read its own shard of the data. The
losses can gather across ranks (``gather="all_gather"`` of :mod:`fastcl.distributed`), but this
loop does not yet shard its data sets per rank, so :func:`gather_for_loss` raises
``NotImplementedError`` as soon as a run has more than one process, before any training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["World", "world_size_from_env", "setup", "teardown", "wrap_model", "gather_for_loss"]


@dataclass
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def setup(device: torch.device) -> World:
    """Initialize ``torch.distributed`` when launched with ``WORLD_SIZE > 1``."""
    size = world_size_from_env()
    if size <= 1:
        return World()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
        initialized_here = True
    return World(size, rank, local_rank, initialized_here)


def teardown(world: World) -> None:
    if world.initialized_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` on more than one process, else ``model``."""
    if world.size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else world.local_rank] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=getattr(model, "num_slots", 1) > 1)


def gather_for_loss(embeddings: list, labels: Optional[torch.Tensor], world: World):
    """The embeddings (and labels) of the global batch, as the loss must see them.

    One process: returned unchanged. More: ``NotImplementedError`` (the loop does not shard its
    data per rank yet).
    """
    if world.size <= 1:
        return embeddings, labels
    raise NotImplementedError(
        f"fastcl.train runs on {world.size} processes, but this training loop does not yet shard "
        f"its data per rank nor gather the embeddings of all ranks for the loss. Run on one "
        f"process (python -m fastcl.train, or torchrun --nproc_per_node=1), or call the fastcl "
        f"losses with gather='all_gather' in your own loop.")
