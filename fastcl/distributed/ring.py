"""The ring strategy: key blocks travel between neighbouring ranks, statistics are merged.

Step ``t`` of a ring on rank ``r`` contrasts the local rows with the key block of rank
``r - t`` (mod world) while the block of rank ``r - t - 1`` is received from rank ``r - 1`` and
the block in hand is sent to rank ``r + 1`` (``batch_isend_irecv``, posted before the kernel
runs). Step 0 is the own block: ``targets``, ``exclude_diag`` and the local extra columns apply
there only; other blocks carry their column labels, and no positives otherwise.

The same ring serves the sigmoid loss (:func:`ring_siglip_rows`): the own block has its
positives on the diagonal, the other blocks none; row sums add up.

Forward: per-block statistics of :func:`fastcl.ops.contrastive.contrastive_fwd` merged into the
global ones. Backward: the same ring with the merged statistics passed to
:func:`fastcl.ops.contrastive.contrastive_bwd`; the gradient accumulator of a key block follows
the block one step behind (it is sent while the next block is processed), each rank adding its
contribution, and after the last step it reaches the block's owner.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.contrastive import contrastive_bwd, contrastive_fwd
from ..ops.siglip import siglip_bwd, siglip_fwd

__all__ = ["ring_stats", "ring_siglip_rows"]


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


def _ring_pass(ring: _Neighbours, world: int, hand: list[Tensor], visit) -> None:
    """``visit(step, hand)`` on every rank's block in turn, the next block in transfer meanwhile.

    The block in hand goes on to the next rank while this rank works on it; once the visit has
    returned and the transfers are done, only the incoming block stays referenced: two blocks at
    most.
    """
    for step in range(world):
        incoming, works = ring.shift([] if step == world - 1 else hand)
        visit(step, hand)
        _wait(works)
        del works
        hand = incoming


def _add(acc: Tensor, part: Tensor) -> Tensor:
    return acc.add_(part)


def _ring_gradient(ring: _Neighbours, world: int, hand: list[Tensor], visit,
                   merge=_add) -> Tensor:
    """Like :func:`_ring_pass`, where ``visit(step, hand)`` returns this rank's part of a
    quantity of the block in hand (its gradient, fp32/fp64); returns this rank's block's parts
    of every rank merged (by default summed; ``merge(acc, part)`` returns the merged tensor).

    The accumulator of a block follows it one step behind: at step ``t`` the finished
    accumulator of the previous block is sent while the one of the block in hand arrives, and
    this rank's part is merged into it; after the last step it goes to the block's owner.
    """
    sent: list[Tensor] = []
    for step in range(world):
        last = step == world - 1
        incoming, works = ring.shift(([] if last else hand) + sent)
        grad = visit(step, hand)
        _wait(works)
        del works
        hand = incoming[:len(incoming) - len(sent)]
        sent = [grad if step == 0 else merge(incoming[-1], grad)]
        del incoming, grad
    if world == 1:
        return sent[0]
    incoming, works = ring.shift(sent)
    del sent
    _wait(works)
    return incoming[0]


class _Spec:
    """The non-tensor settings of one ring call."""

    def __init__(self, group, world, rank, exclude_diag, decoupled, pos_lse, backend,
                 lse2_mult=0.0, col_stats=False, labelled=False):
        self.ring = _Neighbours(group, world, rank)
        self.world = world
        self.exclude_diag, self.decoupled, self.pos_lse = exclude_diag, decoupled, pos_lse
        self.backend = backend
        self.lse2_mult = float(lse2_mult)
        self.col_stats, self.labelled = col_stats, labelled

    def block(self, step, hand, extra, targets):
        """``(keys, targets, col_labels, exclude_diag)`` of the kernel call of ``step`` on the
        travelling tensors ``hand`` (``[keys]``, then the labels if ``labelled``, then what
        the backward adds)."""
        keys, labels = hand[0], (hand[1] if self.labelled else None)
        if step == 0:
            if extra is not None:
                keys = torch.cat([keys, extra], dim=0)
            return keys, targets, labels, self.exclude_diag
        return keys, None, labels, False

    def counts(self, R, C, own, npos, device, dtype):
        """The rows' ``C - [exclude_diag and r < C] - [decoupled] npos`` for ``C`` columns."""
        count = torch.full((R,), float(C), dtype=dtype, device=device)
        if own and self.exclude_diag:
            count = count - (torch.arange(R, device=device) < C).to(dtype)
        if self.decoupled:
            count = count - npos
        return count


def _merge_col_stats(acc: Tensor, part: Tensor) -> Tensor:
    """Merge ``[col_lse; col_mean sum]`` parts of disjoint row sets: log-sum-exp and sum."""
    return torch.stack([torch.logaddexp(acc[0], part[0]), acc[1] + part[1]])


def _pad_columns(packed: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_col_lse, g_col_mean, col_lse)`` of a block's ``n`` columns from their packed
    ``[3, n]`` form, extended to ``C >= n`` columns (the own block's extra columns, which no
    column term reaches: zero gradients, col_lse +inf)."""
    g_cl, g_cm, col_lse = packed.unbind(0)
    pad = C - packed.shape[1]
    if pad:
        zeros = packed.new_zeros(pad)
        g_cl, g_cm = torch.cat([g_cl, zeros]), torch.cat([g_cm, zeros])
        col_lse = torch.cat([col_lse, packed.new_full((pad,), float("inf"))])
    return g_cl, g_cm, col_lse


class _RingStats(torch.autograd.Function):

    @staticmethod
    def forward(ctx, spec, rows, cols, extra, a, b, targets, row_labels, col_labels):
        R = rows.shape[0]
        dt = torch.float64 if rows.dtype == torch.float64 else torch.float32
        ninf = torch.full((R,), float("-inf"), dtype=dt, device=rows.device)
        zero = torch.zeros(R, dtype=dt, device=rows.device)
        n = cols.shape[0]
        with_lse2 = spec.lse2_mult > 0
        acc = dict(lse=ninf, pos=ninf if spec.pos_lse else zero, npos=zero, mean=zero, den=zero,
                   lse2=ninf if with_lse2 else rows.new_empty(0, dtype=dt))

        def visit(step, hand):
            keys, tgt, labels, diag = spec.block(step, hand, extra, targets)
            lse_b, pos_b, npos_b, mean_b, col_lse_b, col_mean_b, lse2_b = contrastive_fwd(
                rows, keys, a, b, tgt, row_labels, labels, diag, spec.decoupled, spec.pos_lse,
                spec.col_stats, spec.lse2_mult, spec.backend)
            den_b = spec.counts(R, keys.shape[0], step == 0, npos_b, rows.device, dt)
            acc["lse"] = torch.logaddexp(acc["lse"], lse_b)
            if with_lse2:
                acc["lse2"] = torch.logaddexp(acc["lse2"], lse2_b)
            if spec.pos_lse:
                acc["pos"] = torch.logaddexp(acc["pos"], torch.where(npos_b > 0, pos_b, ninf))
            else:
                acc["pos"] = acc["pos"] + pos_b * npos_b
            acc["npos"] = acc["npos"] + npos_b
            acc["mean"] = acc["mean"] + mean_b * den_b
            acc["den"] = acc["den"] + den_b
            if spec.col_stats:  # the block's columns against this rank's rows, to travel on
                return torch.stack([col_lse_b[:n], col_mean_b[:n]]).to(dt)
            return None

        travelling = _travelling(cols, col_labels)
        if spec.col_stats:  # the keys' statistics follow them round the ring, merged per rank
            col_lse, col_mean = _ring_gradient(spec.ring, spec.world, travelling, visit,
                                               merge=_merge_col_stats).unbind(0)
            col_mean = col_mean / spec.world  # every rank has as many rows
        else:
            _ring_pass(spec.ring, spec.world, travelling, visit)
            col_lse = col_mean = rows.new_empty(0, dtype=dt)
        lse, pos_acc, npos, mean_acc, den, lse2 = (
            acc[k] for k in ("lse", "pos", "npos", "mean", "den", "lse2"))
        has_pos = npos > 0
        if not spec.pos_lse:
            pos_acc = pos_acc / npos.clamp_min(1)
        pos = torch.where(has_pos, pos_acc, torch.zeros_like(pos_acc))
        mean = torch.where(den > 0, mean_acc / den.clamp_min(1), torch.zeros_like(mean_acc))
        ctx.spec = spec
        ctx.save_for_backward(rows, cols, extra, a, b, targets, row_labels, col_labels,
                              lse, pos, npos, den, lse2, col_lse)
        ctx.mark_non_differentiable(npos)
        ctx.set_materialize_grads(False)
        return lse, pos, npos, mean, col_lse, col_mean, lse2

    @staticmethod
    def backward(ctx, g_lse, g_pos, _g_npos, g_mean, g_col_lse, g_col_mean, g_lse2):
        spec = ctx.spec
        (rows, cols, extra, a, b, targets, row_labels, col_labels,
         lse, pos, npos, den, lse2, col_lse) = ctx.saved_tensors
        if not spec.lse2_mult > 0:
            g_lse2 = None
        with_cols = spec.col_stats and (g_col_lse is not None or g_col_mean is not None)
        R, n = rows.shape[0], cols.shape[0]
        dt = lse.dtype
        labelled = row_labels is not None
        no_col = lse.new_empty(0)
        dq = torch.zeros(rows.shape, dtype=dt, device=rows.device)
        local = dict(dq=dq, dscale=torch.zeros_like(a), dbias=torch.zeros_like(b), d_extra=None)

        def visit(step, hand):
            keys, tgt, labels, diag = spec.block(step, hand, extra, targets)
            g_cl = g_cm = None
            block_col_lse = no_col
            if with_cols:  # the block's column gradients and global col_lse travel with it
                g_cl, g_cm, block_col_lse = _pad_columns(hand[-1], keys.shape[0])
            with_pos = labelled or tgt is not None
            gm = None
            if g_mean is not None:  # the kernels divide by their own count of the block
                count = spec.counts(R, keys.shape[0], step == 0,
                                    npos if with_pos else torch.zeros_like(npos), rows.device, dt)
                gm = torch.where(den > 0, g_mean * count.clamp_min(1) / den.clamp_min(1),
                                 torch.zeros_like(g_mean))
            dq_b, dk_b, ds_b, db_b = contrastive_bwd(
                g_lse, g_pos if with_pos else None, gm, g_cl, g_cm, rows, keys, a, b, tgt,
                row_labels, labels, lse, pos, npos, block_col_lse, diag, spec.decoupled,
                spec.pos_lse, with_cols, g_lse2, lse2, spec.lse2_mult, spec.backend)
            local["dq"] += dq_b
            local["dscale"] = local["dscale"] + ds_b
            local["dbias"] = local["dbias"] + db_b
            if step == 0 and extra is not None:
                local["d_extra"] = dk_b[n:]
                dk_b = dk_b[:n]
            return dk_b.to(dt)

        travelling = _travelling(cols, col_labels)
        if with_cols:
            zeros = torch.zeros_like(col_lse)
            travelling.append(torch.stack([
                zeros if g_col_lse is None else g_col_lse.to(dt),
                zeros if g_col_mean is None else g_col_mean.to(dt) / spec.world,
                col_lse]).contiguous())
        acc = _ring_gradient(spec.ring, spec.world, travelling, visit)
        dscale, dbias, d_extra = local["dscale"], local["dbias"], local["d_extra"]
        return (None, dq.to(rows.dtype), acc.to(cols.dtype),
                None if d_extra is None else d_extra,
                dscale, dbias, None, None, None)


class _RingSiglip(torch.autograd.Function):

    @staticmethod
    def forward(ctx, spec, x, y, a, b):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc = {"rows": torch.zeros(x.shape[0], dtype=dt, device=x.device)}

        def visit(step, hand):
            acc["rows"] = acc["rows"] + siglip_fwd(x, hand[0], a, b, step == 0, spec.backend)

        _ring_pass(spec.ring, spec.world, [y.contiguous()], visit)
        ctx.spec = spec
        ctx.save_for_backward(x, y, a, b)
        ctx.set_materialize_grads(False)
        return acc["rows"]

    @staticmethod
    def backward(ctx, g_row):
        spec = ctx.spec
        x, y, a, b = ctx.saved_tensors
        if g_row is None:
            return None, None, None, None, None
        dt = g_row.dtype
        local = {"dx": torch.zeros(x.shape, dtype=dt, device=x.device),
                 "dscale": torch.zeros_like(a), "dbias": torch.zeros_like(b)}

        def visit(step, hand):
            dx_b, dy_b, ds_b, db_b = siglip_bwd(g_row, x, hand[0], a, b, step == 0, spec.backend)
            local["dx"] += dx_b
            local["dscale"] = local["dscale"] + ds_b
            local["dbias"] = local["dbias"] + db_b
            return dy_b.to(dt)

        dy = _ring_gradient(spec.ring, spec.world, [y.contiguous()], visit)
        return (None, local["dx"].to(x.dtype), dy.to(y.dtype), local["dscale"], local["dbias"])


def _refuse_compile() -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError("gather='ring' is not supported under torch.compile (its "
                           "point-to-point exchange is not traceable); use gather='all_gather' "
                           "or keep the loss outside the compiled region")


def ring_siglip_rows(x: Tensor, y: Tensor, a: Tensor, b: Tensor, *, group, world: int,
                     rank: int, backend: str) -> Tensor:
    """Per-row sums ``[R]`` of the sigmoid pair losses of ``x`` against the ``y`` of every rank
    (positives: the diagonal of the own block), over a ring; differentiable."""
    _refuse_compile()
    spec = _Spec(group, world, rank, False, False, False, backend)
    return _RingSiglip.apply(spec, x, y, a, b)


def ring_stats(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor, targets: Optional[Tensor],
               row_labels: Optional[Tensor], col_labels: Optional[Tensor],
               extra: Optional[Tensor], *, group, world: int, rank: int, exclude_diag: bool,
               decoupled: bool, pos_lse: bool, col_stats: bool = False, lse2_mult: float = 0.0,
               backend: str):
    """``(lse, pos, npos, mean, col_lse, col_mean, lse2)`` of ``rows`` against the keys of
    every rank, over a ring (``col_lse``, ``col_mean``: of this rank's keys against every rank's
    rows, when ``col_stats``; ``lse2`` when ``lse2_mult > 0``; else empty).

    See :meth:`fastcl.distributed.Shard.stats` for the arguments.
    """
    _refuse_compile()
    spec = _Spec(group, world, rank, exclude_diag, decoupled, pos_lse, backend, lse2_mult,
                 col_stats, col_labels is not None)
    return _RingStats.apply(spec, rows, cols, extra, a, b, targets, row_labels, col_labels)
