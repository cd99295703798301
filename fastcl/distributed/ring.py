"""The ring strategy: key blocks travel between neighbouring ranks, statistics are merged.

Step ``t`` of a ring on rank ``r`` contrasts the local rows with the key block of rank
``r - t`` (mod world) while the block of rank ``r - t - 1`` is received from rank ``r - 1`` and
the block in hand is sent to rank ``r + 1`` (``batch_isend_irecv``, posted before the kernel
runs). Step 0 is the own block: ``targets``, ``exclude_diag`` and the local extra columns apply
there only; other blocks carry their column labels, and no positives otherwise.

Forward: per-block statistics of :func:`fastcl.ops.contrastive.contrastive_fwd` merged into the
global ones. Backward: the same ring with the merged statistics passed to
:func:`fastcl.ops.contrastive.contrastive_bwd`; the gradient accumulator of a key block follows
the block one step behind (it is sent while the next block is processed), each rank adding its
contribution, and after the last step it reaches the block's owner.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.contrastive import contrastive_bwd, contrastive_fwd

__all__ = ["ring_stats"]


class _Neighbours:
    """Point-to-point exchange on a ring: send to ``rank + 1``, receive from ``rank - 1``."""

    def __init__(self, group, world: int, rank: int):
        self.group = group
        self.next = (rank + 1) % world
        self.prev = (rank - 1) % world

    def shift(self, tensors: list[Tensor]) -> tuple[list[Tensor], list]:
        """Post the sends of ``tensors`` and the receives of their successors (same shapes)."""
        if not tensors:
            return [], []
        received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=self.next, tag=i)
               for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.prev, tag=i)
                for i, t in enumerate(received)]
        return received, dist.batch_isend_irecv(ops)


def _travelling(cols: Tensor, col_labels: Optional[Tensor]) -> list[Tensor]:
    """The tensors that travel as a block: its keys, and their labels if any."""
    return [cols.contiguous()] + ([] if col_labels is None else [col_labels.contiguous()])


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class _Spec:
    """The non-tensor settings of one ring call."""

    def __init__(self, group, world, rank, exclude_diag, decoupled, pos_lse, backend):
        self.ring = _Neighbours(group, world, rank)
        self.world = world
        self.exclude_diag, self.decoupled, self.pos_lse = exclude_diag, decoupled, pos_lse
        self.backend = backend

    def block(self, step, hand, extra, targets):
        """``(keys, targets, col_labels, exclude_diag)`` of the kernel call of ``step`` on the
        travelling tensors ``hand`` (``[keys]`` or ``[keys, labels]``)."""
        keys, labels = hand[0], (hand[1] if len(hand) > 1 else None)
        if step == 0:
            if extra is not None:
                keys = torch.cat([keys, extra], dim=0)
            return keys, targets, labels, self.exclude_diag
        return keys, None, labels, False

    def counts(self, R, C, own, npos, device, dtype):
        """``C - [exclude_diag and r < C] - [decoupled] npos`` for the rows of a ``C``-column call."""
        count = torch.full((R,), float(C), dtype=dtype, device=device)
        if own and self.exclude_diag:
            count = count - (torch.arange(R, device=device) < C).to(dtype)
        if self.decoupled:
            count = count - npos
        return count


class _RingStats(torch.autograd.Function):

    @staticmethod
    def forward(ctx, spec, rows, cols, extra, a, b, targets, row_labels, col_labels):
        R = rows.shape[0]
        dt = torch.float64 if rows.dtype == torch.float64 else torch.float32
        ninf = torch.full((R,), float("-inf"), dtype=dt, device=rows.device)
        lse, pos_acc = ninf, ninf
        npos = torch.zeros(R, dtype=dt, device=rows.device)
        mean_acc, den = torch.zeros_like(npos), torch.zeros_like(npos)
        if not spec.pos_lse:
            pos_acc = torch.zeros_like(npos)
        hand = _travelling(cols, col_labels)
        for step in range(spec.world):
            # the next block is in transfer while the kernel runs on the block in hand
            incoming, works = spec.ring.shift([] if step == spec.world - 1 else hand)
            keys, tgt, labels, diag = spec.block(step, hand, extra, targets)
            lse_b, pos_b, npos_b, mean_b, _, _ = contrastive_fwd(
                rows, keys, a, b, tgt, row_labels, labels, diag, spec.decoupled, spec.pos_lse,
                False, spec.backend)
            den_b = spec.counts(R, keys.shape[0], step == 0, npos_b, rows.device, dt)
            lse = torch.logaddexp(lse, lse_b)
            if spec.pos_lse:
                pos_acc = torch.logaddexp(pos_acc, torch.where(npos_b > 0, pos_b, ninf))
            else:
                pos_acc = pos_acc + pos_b * npos_b
            npos = npos + npos_b
            mean_acc = mean_acc + mean_b * den_b
            den = den + den_b
            _wait(works)
            del keys, labels, works  # the block in hand is sent: only the incoming one stays
            hand = incoming
        has_pos = npos > 0
        if not spec.pos_lse:
            pos_acc = pos_acc / npos.clamp_min(1)
        pos = torch.where(has_pos, pos_acc, torch.zeros_like(pos_acc))
        mean = torch.where(den > 0, mean_acc / den.clamp_min(1), torch.zeros_like(mean_acc))
        ctx.spec = spec
        ctx.save_for_backward(rows, cols, extra, a, b, targets, row_labels, col_labels,
                              lse, pos, npos, den)
        ctx.mark_non_differentiable(npos)
        ctx.set_materialize_grads(False)
        return lse, pos, npos, mean

    @staticmethod
    def backward(ctx, g_lse, g_pos, _g_npos, g_mean):
        spec = ctx.spec
        (rows, cols, extra, a, b, targets, row_labels, col_labels,
         lse, pos, npos, den) = ctx.saved_tensors
        R, n = rows.shape[0], cols.shape[0]
        dt = lse.dtype
        labelled = row_labels is not None
        no_col = lse.new_empty(0)
        dq = torch.zeros(rows.shape, dtype=dt, device=rows.device)
        dscale = torch.zeros_like(a)
        dbias = torch.zeros_like(b)
        d_extra = None
        # the gradient of the block in hand follows it one step behind: ``sent`` is the finished
        # accumulator of the previous block, on its way to the next rank
        sent: list[Tensor] = []
        hand = _travelling(cols, col_labels)
        for step in range(spec.world):
            last = step == spec.world - 1
            incoming, works = spec.ring.shift(([] if last else hand) + sent)
            keys, tgt, labels, diag = spec.block(step, hand, extra, targets)
            with_pos = labelled or tgt is not None
            gm = None
            if g_mean is not None:  # the kernels divide by their own count of the block
                count = spec.counts(R, keys.shape[0], step == 0,
                                    npos if with_pos else torch.zeros_like(npos), rows.device, dt)
                gm = torch.where(den > 0, g_mean * count.clamp_min(1) / den.clamp_min(1),
                                 torch.zeros_like(g_mean))
            dq_b, dk_b, ds_b, db_b = contrastive_bwd(
                g_lse, g_pos if with_pos else None, gm, None, None, rows, keys, a, b, tgt,
                row_labels, labels, lse, pos, npos, no_col, diag, spec.decoupled, spec.pos_lse,
                False, spec.backend)
            dq += dq_b
            dscale = dscale + ds_b
            dbias = dbias + db_b
            if step == 0 and extra is not None:
                d_extra = dk_b[n:]
                dk_b = dk_b[:n]
            del keys, labels, dq_b
            _wait(works)
            del works
            hand = incoming[:len(incoming) - len(sent)]
            # this rank's contribution joins the accumulator that arrived with the block
            sent = [dk_b.to(dt) if step == 0 else incoming[-1].add_(dk_b)]
            del incoming, dk_b
        acc = sent[0]
        if spec.world > 1:  # the last accumulator goes to its owner; ours arrives
            incoming, works = spec.ring.shift(sent)
            del sent
            _wait(works)
            acc = incoming[0]
        return (None, dq.to(rows.dtype), acc.to(cols.dtype),
                None if d_extra is None else d_extra,
                dscale, dbias, None, None, None)


def ring_stats(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor, targets: Optional[Tensor],
               row_labels: Optional[Tensor], col_labels: Optional[Tensor],
               extra: Optional[Tensor], *, group, world: int, rank: int, exclude_diag: bool,
               decoupled: bool, pos_lse: bool, backend: str):
    """``(lse, pos, npos, mean)`` of ``rows`` against the keys of every rank, over a ring.

    See :meth:`fastcl.distributed.Shard.stats` for the arguments.
    """
    if torch.compiler.is_compiling():
        raise RuntimeError("gather='ring' is not supported under torch.compile (its "
                           "point-to-point exchange is not traceable); use gather='all_gather' "
                           "or keep the loss outside the compiled region")
    spec = _Spec(group, world, rank, exclude_diag, decoupled, pos_lse, backend)
    return _RingStats.apply(spec, rows, cols, extra, a, b, targets, row_labels, col_labels)
