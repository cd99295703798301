"""Several processes: ``torchrun --nproc_per_node=G -m fastcl.train ...``.

Data parallelism over a global batch of ``batch_size`` samples, with the contrastive loss over
the whole global batch:

- :func:`setup`: when ``WORLD_SIZE > 1`` (set by ``torchrun``), initializes the default process
  group (NCCL on CUDA, gloo on CPU) from the ``env://`` variables, pins each rank to its
  ``LOCAL_RANK`` GPU, and returns a :class:`World`; with one process it does nothing.
- Data: rank ``r`` reads rows ``[r B/W, (r+1) B/W)`` of every global batch
  (:func:`fastcl.train.data.read_batch`); a batch size that ``W`` does not divide is refused by
  :func:`check_batch`. Sample randomness is a function of the global batch position, so the
  shards concatenated by rank are the single-process batch.
- Loss: every rank's :class:`fastcl.train.Objective` calls its fastcl loss with the ``gather``
  of the run (``"all_gather"`` by default, or ``"ring"``): each rank contrasts its own anchors
  with the anchors of all ranks. Under the convention of :mod:`fastcl.distributed`, the mean over ranks of the
  returned losses is the global loss and each rank's gradient with respect to its embeddings is
  ``W`` times the global loss's.
- Gradients: :func:`wrap_model` wraps the encoder in ``DistributedDataParallel``, whose average
  over ranks of ``J_r^T (W dL/dE_r)`` is ``J^T dL/dE``: the single-process gradient of the global
  batch. The chunked step calls the wrapper's ``no_sync`` on every replayed chunk but the last,
  so gradients are all-reduced once per step. The loss's own parameters (a learnable
  temperature) live outside the wrapper: rank ``r``'s loss depends on them only through its
  own anchors' terms, so its gradient is ``W`` times rank ``r``'s share of the global gradient,
  and :func:`average_gradients` (the mean over ranks, as DDP would do) gives the global one.
- Bookkeeping: rank 0 alone prints, logs, plots, evaluates (on the full evaluation set, the
  result broadcast to the other ranks with :func:`broadcast_object`) and writes checkpoints;
  every rank's RNG state is gathered into the checkpoint (:func:`all_gather_object`), so a
  resumed run gives each rank its own dropout stream back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["World", "world_size_from_env", "setup", "teardown", "wrap_model", "check_batch",
           "mean_over_ranks", "average_gradients", "broadcast_object", "all_gather_object",
           "rank_seed"]


@dataclass
class World:
    """The process layout of a run: ``size`` processes, this one is ``rank``."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def setup(device: torch.device) -> World:
    """Initialize ``torch.distributed`` when launched with ``WORLD_SIZE > 1`` (a process group
    initialized by the caller is used as it is)."""
    size = world_size_from_env()
    if size <= 1:
        return World()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        initialized_here = True
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise RuntimeError(f"the process group has rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, the environment says {rank} of {size}")
    return World(size, rank, local_rank, initialized_here)


def teardown(world: World) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if world.initialized_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` on more than one process, else ``model``.

    ``find_unused_parameters`` for models whose slots have parameters of their own (a two-tower
    model: each pass uses one tower), not for a :class:`fastcl.train.SharedEncoder`.
    """
    if world.size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .models import SharedEncoder

    ids = [device.index if device.index is not None else world.local_rank] if device.type == "cuda" else None
    unused = getattr(model, "num_slots", 1) > 1 and not isinstance(model, SharedEncoder)
    return DDP(model, device_ids=ids, find_unused_parameters=unused)


def check_batch(batch_size: int, world: World) -> int:
    """Rows per rank; ``ValueError`` when ``batch_size`` does not divide among the processes."""
    from .data import shard_rows

    sl = shard_rows(batch_size, 0, world.size)
    return sl.stop - sl.start


def mean_over_ranks(x: torch.Tensor, world: World) -> torch.Tensor:
    """The mean over ranks of ``x`` (detached); ``x`` itself on one process."""
    if world.size <= 1:
        return x.detach()
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world.size


def average_gradients(params: Iterable[torch.Tensor], world: World) -> None:
    """Replace the ``.grad`` of ``params`` by its mean over ranks, in one collective (a missing
    gradient counts as zero)."""
    params = list(params)
    if world.size <= 1 or not params:
        return
    import torch.distributed as dist

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself on one process)."""
    if world.size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, world: World) -> list:
    """Every rank's ``obj``, indexed by rank (``[obj]`` on one process)."""
    if world.size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream (dropout): distinct per rank, rank 0's is
    ``seed`` itself, so that a one-process run keeps its stream."""
    if rank == 0:
        return seed
    from .data import derive_generator

    return derive_generator(seed, 6, rank).initial_seed()  # 6: a stream no dataset draws from
