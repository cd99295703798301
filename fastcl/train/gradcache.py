"""GradCache-style chunked training: a contrastive batch far larger than the encoder's memory.

A contrastive loss couples every sample of the batch to every other, so the batch cannot be cut
into independent micro-batches. GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup") splits the step in three:

1. **embed**: the encoder runs over the batch chunk by chunk *without* a graph; only the
   ``[N, D]`` embeddings are kept, and the RNG state (CPU and CUDA) before each chunk is saved;
2. **loss**: the fused fastcl loss runs on the full batch of embeddings (detached, with
   ``requires_grad``) and its backward gives ``dL/dE`` (``[N, D]``) and the gradients of the
   loss's own parameters (the learnable temperature); the fused loss holds no ``N x N`` matrix;
3. **replay**: each chunk is encoded again, with a graph, from its saved RNG state (identical
   dropout masks), and ``E_chunk.backward(dL/dE_chunk)`` accumulates its parameter gradients.

By the chain rule, ``sum_c J_c^T (dL/dE)_c = J^T dL/dE``: the parameter gradients equal those of
one graph over the whole batch with the same dropout masks. Encoder memory is that of one chunk,
the loss's is linear in N, so the batch size is limited only by ``N x D`` embeddings. The price
is a second encoder forward pass.

The encoder must be per-sample (LayerNorm, not BatchNorm: a BatchNorm would normalize by chunk
statistics and update its running averages twice).

Several processes: the step runs on each rank's shard with a loss that gathers the other ranks'
embeddings (the objective's business, see :mod:`fastcl.train.distributed`); phase 2 then holds
the collectives of the loss, outside the ``DistributedDataParallel`` wrapper, and phase 3 runs
each replayed chunk under ``no_sync`` but the last, whose backward all-reduces the accumulated
gradients once. ``DistributedDataParallel`` allows one forward per backward, so with ``no_sync``
given, a model with several slots always takes the chunked path (one chunk per slot when
``chunk_size`` is ``None``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["RNGState", "StepResult", "contrastive_step"]


class RNGState:
    """The CPU RNG state and, for a CUDA device, that device's RNG state."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, cpu: Tensor, cuda: Optional[Tensor], device: Optional[torch.device]):
        self.cpu, self.cuda, self.device = cpu, cuda, device

    @classmethod
    def capture(cls, device: torch.device) -> "RNGState":
        cuda = None
        if device.type == "cuda":
            cuda = torch.cuda.get_rng_state(device)
        return cls(torch.get_rng_state(), cuda, device if device.type == "cuda" else None)

    def restore(self) -> None:
        """Put the captured CPU (and CUDA) random-number state back."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@dataclass
class StepResult:
    """What one training step reports.

    ``loss``: the loss (0-dim, detached). ``embeddings``: the detached per-slot embeddings.
    ``loss_peak_bytes``: peak memory of the loss forward + backward above what was in use
    before it (phase 2 only; ``None`` when not measured or not separable, as in unchunked mode).
    ``chunks``: encoder chunks per slot (1: unchunked). ``phase_peaks["embed"]``: the peak
    memory reading taken before the loss phase resets the peak (the step's peak is the larger of
    it and the reading after the step).
    """

    loss: Tensor
    embeddings: list
    loss_peak_bytes: Optional[int] = None
    chunks: int = 1
    phase_peaks: dict = field(default_factory=dict)


def _split(x: Tensor, chunk: int) -> Sequence[Tensor]:
    return x.split(chunk, dim=0)


def contrastive_step(
    model: nn.Module,
    objective: Callable[[list, Optional[Tensor]], Tensor],
    inputs: Sequence[Tensor],
    labels: Optional[Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    memory=None,
    replay_rng: bool = True,
) -> StepResult:
    """Forward and backward of one contrastive step; parameter gradients are accumulated in
    ``.grad`` (call ``optimizer.zero_grad()`` before, ``optimizer.step()`` after).

    Args:
        model: ``model(x, slot) -> [n, D]`` embeddings of the input of slot ``slot``.
        objective: ``objective(embeddings, labels) -> loss`` over the list of per-slot
            ``[N, D]`` embeddings (an :class:`fastcl.train.Objective`, or any function).
        inputs: one ``[N, ...]`` tensor per slot.
        labels: ``[N]`` labels passed to the objective, or ``None``.
        chunk_size: rows per encoder chunk; ``None`` (or at least ``N``) runs one graph over
            the whole batch, which is plain training.
        autocast: a factory of the autocast context of the encoder passes (mixed precision);
            the loss itself runs outside it, on the embeddings as the encoder returns them.
        no_sync: a factory of ``DistributedDataParallel.no_sync`` (gradient all-reduce only on
            the last replayed chunk). With it, several slots are always encoded in chunks (one
            forward per backward, as DDP requires), one chunk per slot if ``chunk_size`` is
            ``None``.
        memory: a :class:`fastcl.train.metrics.PeakMemory` to measure the loss phase with.
        replay_rng: restore each chunk's RNG state before its replay (turning it off breaks
            the equality with unchunked training as soon as the encoder has dropout; it exists
            to show exactly that).
    """
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one slot")
    n = inputs[0].shape[0]
    for i, x in enumerate(inputs):
        if x.shape[0] != n:
            raise ValueError(f"every slot needs the same batch size, slot 0 has {n} rows and "
                             f"slot {i} has {x.shape[0]}")
    amp = autocast or contextlib.nullcontext
    sync_off = no_sync or contextlib.nullcontext
    device = inputs[0].device

    if no_sync is not None and len(inputs) > 1:
        chunk_size = n if chunk_size is None else min(chunk_size, n)
    elif chunk_size is None or chunk_size >= n:
        with amp():
            embeddings = [model(x, slot) for slot, x in enumerate(inputs)]
        loss = objective(embeddings, labels)
        loss.backward()
        return StepResult(loss.detach(), [e.detach() for e in embeddings], None, 1)

    # 1. embed without a graph, saving the RNG state before each chunk
    states: list = []
    cached: list = []
    with torch.no_grad(), amp():
        for slot, x in enumerate(inputs):
            parts = []
            for chunk in _split(x, chunk_size):
                states.append(RNGState.capture(device))
                parts.append(model(chunk, slot))
            cached.append(torch.cat(parts) if len(parts) > 1 else parts[0])
            del parts
    after = RNGState.capture(device)

    # 2. the loss on the full batch, and its gradient with respect to the embeddings
    leaves = [e.detach().requires_grad_(True) for e in cached]
    del cached
    phase_peaks: dict = {}
    if memory is not None:
        phase_peaks["embed"] = memory.peak()
        memory.reset()
        base = memory.current()
    loss = objective(leaves, labels)
    loss.backward()
    loss_peak = None
    if memory is not None:
        peak = memory.peak()
        loss_peak = None if peak is None or base is None else max(0, peak - base)
    grads = []
    for slot, e in enumerate(leaves):
        if e.grad is None:
            raise RuntimeError(f"the loss does not depend on the embeddings of slot {slot}")
        grads.append(e.grad)

    # 3. replay each chunk with its RNG state and push the cached gradient through it
    total = sum(len(_split(x, chunk_size)) for x in inputs)
    i = 0
    for slot, x in enumerate(inputs):
        for chunk, g in zip(_split(x, chunk_size), _split(grads[slot], chunk_size)):
            if replay_rng:
                states[i].restore()
            last = i == total - 1
            with (contextlib.nullcontext() if last else sync_off()):
                with amp():
                    out = model(chunk, slot)
                out.backward(g.to(out.dtype))
            i += 1
    if replay_rng:
        after.restore()  # the RNG advances as if each chunk had been encoded once
    return StepResult(loss.detach(), [e.detach() for e in leaves], loss_peak,
                      len(_split(inputs[0], chunk_size)), phase_peaks)
