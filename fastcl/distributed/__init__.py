"""Global negatives across processes, on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

The public functions take ``gather=None | "all_gather" | "ring"`` and ``group=``. Both
strategies give every rank the loss of its own anchors against the anchors of all ranks (like
open_clip's ``local_loss=True, gather_with_grad=True``), through the same fused kernels, and the
same values and gradients:

- ``"all_gather"`` gathers the keys of every rank (with gradient) into one ``[world * n, D]``
  tensor, this rank's block first, so the kernels see the layout of one process. Memory per rank:
  O(world * n * D) for the gathered keys and their gradient. The other direction of a symmetric
  loss (CLIP) comes from the same pass: the column statistics of the gathered keys against this
  rank's rows are merged across ranks by ``all_reduce`` (``[world * n]`` vectors). A loss over
  the logits of one feature set with itself (NT-Xent, DCL, SupCon, the multi-view losses), whose
  global square is symmetric, is computed by halves: each pair of ranks' entries on one of the
  two, which passes the other its column statistics the same way; every rank does half the work
  of its rows-by-all-columns rectangle. SupCon's positive terms (means of logits, linear in them)
  come from per-label sums of the gathered features; positives by sample (the other views) are
  computed by the loss from the rank's own views.
- ``"ring"`` never gathers: the key blocks travel around the ring of ranks with
  ``torch.distributed.batch_isend_irecv``; while block ``t`` is contrasted with the local rows,
  block ``t + 1`` is already in transfer. Each block gives per-row statistics (log-sum-exp,
  positive term, positive count, mean, and the second log-sum-exp ``lse2`` of the
  hard-negative loss) that are merged exactly (log-sum-exps by ``logaddexp``,
  means weighted by their counts). The backward runs the ring again with the merged (global)
  statistics: every key block visits every rank together with the accumulator of its gradient,
  each rank adds its contribution, and the accumulator returns to the block's owner. No rank
  holds more than two key blocks (the one in hand and the one arriving) and their gradient
  accumulators at a time: memory per rank O(n * D), independent of the world size. A symmetric
  loss (CLIP) takes both directions from the same ring: the column statistics of a key block
  follow it like its gradient accumulator, merged by every rank, and in the backward the
  block's column gradients and global column log-sum-exp travel with it. The sigmoid loss
  (SigLIP) adds up per-block row sums (positives on the diagonal of the own block only). The
  ring is not traced by ``torch.compile``: the compiled function breaks the graph there and
  runs the loss eagerly, and ``fullgraph=True`` refuses it (use ``"all_gather"``, which
  compiles).

Gradient convention (the one under which DDP's gradient averaging gives every parameter exactly
the gradient of one process training on the global batch), for both strategies:

- the mean over ranks of the returned losses is the loss of the global batch;
- each rank's gradient with respect to its shard is ``world_size`` times the gradient of the
  global loss with respect to that shard.

Replicated inputs (a logit scale) receive this rank's share; DDP's averaging over ranks makes it
the gradient of the global loss. Shards must have equal sizes on every rank (checked; unequal
shards are refused).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..ops import siglip as siglip_ops
from ..ops.contrastive import contrastive_stats
from .ring import ring_siglip_rows, ring_stats

__all__ = ["GATHER", "Shard", "check_gather", "shard"]

GATHER = (None, "all_gather", "ring")


class Shard:
    """Where this rank's anchors sit in the global batch, and the collectives to reach the rest.

    ``strategy`` is ``"all_gather"`` or ``"ring"`` (see the module docstring).
    """

    def __init__(self, strategy: str = "all_gather", group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"gather={strategy!r} needs torch.distributed to be initialized "
                               "(torch.distributed.init_process_group)")
        self.strategy = strategy
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
            raise ValueError(f"gather={self.strategy!r} needs equal shards on every rank; {name} "
                             f"has {values} rows on ranks 0..{self.world - 1}")

    def stats(
        self,
        rows: Tensor,
        cols: Tensor,
        a: Tensor,
        b: Tensor,
        targets: Optional[Tensor] = None,
        row_labels: Optional[Tensor] = None,
        col_labels: Optional[Tensor] = None,
        extra: Optional[Tensor] = None,
        *,
        exclude_diag: bool = False,
        decoupled: bool = False,
        pos_lse: bool = False,
        col_stats: bool = False,
        lse2_mult: float = 0.0,
        symmetric: bool = False,
        backend: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Statistics ``(lse, pos, npos, mean, col_lse, col_mean, lse2)`` of this rank's
        ``rows`` against every rank's ``cols`` (differentiable), as
        :func:`fastcl.ops.contrastive.contrastive_stats` defines them on the global columns
        ``[own cols; extra; other ranks' cols]`` (``lse2`` empty unless ``lse2_mult > 0``).

        ``targets`` and ``exclude_diag`` refer to this rank's own block (and ``extra``, this
        rank's additional negative columns, which no other rank sees); ``col_labels`` are the
        labels of this rank's ``cols``, and travel with them.

        ``col_stats``: ``col_lse`` and ``col_mean`` of this rank's ``cols`` (``[n]``) against
        the rows of every rank (the other direction of a symmetric loss, from the same pass);
        only without masks (``exclude_diag``, labels) and ``pos_lse``. Else they are empty.

        ``symmetric``: ``cols`` are ``rows`` (the logits of one feature set with itself, NT-Xent,
        DCL, SupCon), and ``col_labels`` are ``row_labels``. With ``"all_gather"``, without
        ``pos_lse``, ``lse2`` or ``extra`` (and with labels, without ``decoupled``), each rank
        then computes half of the global square (:meth:`_half_square`); the positive terms of
        labels, linear in the logits, come from per-label feature sums
        (:meth:`_label_positives`).
        """
        if extra is not None and col_labels is not None:
            raise ValueError("extra columns cannot be combined with column labels")
        if col_stats and (exclude_diag or decoupled or pos_lse or row_labels is not None
                          or col_labels is not None):
            raise ValueError("col_stats across ranks needs unmasked logits (no exclude_diag, "
                             "decoupled, pos_lse or labels)")
        labelled = row_labels is not None
        if symmetric and self.strategy == "all_gather" and extra is None \
                and not (pos_lse or col_stats) and lse2_mult == 0 \
                and (not labelled or (targets is None and not decoupled)):
            parts = _AllGather.apply(rows, self.group, self.world, self.rank)
            lse, pos, npos, mean, *empty = self._half_square(
                rows, parts, a, b, targets, exclude_diag=exclude_diag, decoupled=decoupled,
                backend=backend)
            if labelled:  # the denominator does not depend on the labels: only the positives
                pos, npos = self._label_positives(rows, parts, row_labels, a, b, exclude_diag)
            return (lse, pos, npos, mean, *empty)
        flags = dict(exclude_diag=exclude_diag, decoupled=decoupled, pos_lse=pos_lse,
                     col_stats=col_stats, lse2_mult=lse2_mult, backend=backend)
        if self.strategy == "ring":
            return ring_stats(rows, cols, a, b, targets, row_labels, col_labels, extra,
                              group=self.group, world=self.world, rank=self.rank, **flags)
        keys = self.columns(cols)
        if extra is not None:
            keys = torch.cat([keys, extra], dim=0)
        labels = None if col_labels is None else self.columns_nograd(col_labels)
        lse, pos, npos, mean, col_lse, col_mean, lse2 = contrastive_stats(
            rows, keys, a, b, targets, row_labels, labels, **flags)
        if col_stats:  # partial over this rank's rows -> over every rank's, own block kept
            n = cols.shape[0]
            own = slice(self.rank * n, (self.rank + 1) * n)
            order = torch.argsort(self.block_ids(n, cols.device))  # gathered -> global order
            col_lse, col_sum = _ColumnsAllReduce.apply(col_lse[:self.world * n][order],
                                                       col_mean[:self.world * n][order],
                                                       self.group)
            col_lse, col_mean = col_lse[own], col_sum[own] / self.world
        return lse, pos, npos, mean, col_lse, col_mean, lse2

    def _half_square(self, x: Tensor, parts: tuple[Tensor, ...], a: Tensor, b: Tensor,
                     targets: Optional[Tensor], *, exclude_diag: bool, decoupled: bool,
                     backend: str):
        """:meth:`stats` of this rank's ``x`` against every rank's ``x`` (``parts``, in rank
        order, gathered with gradient) from half of the global logit square, which is
        symmetric: the entries of ranks ``r`` and ``s`` are computed once, on one of the two,
        which gets the row statistics of its rows and the column statistics (its rows'
        contribution to the other rank's row statistics) from one pass.

        Rank ``r`` computes its own block (the op's self path, itself half a square, with the
        masks: ``targets`` and the diagonal are in the own block) and its rows against the
        ranks ``r + 1 .. r + (world - 1) // 2``; for an even world, the pair of ranks
        ``world / 2`` apart shares its block: the lower rank takes its rows against the first
        half of the upper rank's, the upper rank its second half of rows against the lower
        rank's. The column statistics are put in global order and merged over the ranks
        (:class:`_ColumnsAllReduce`); every rank's work is half of the rows-by-all rectangle.
        """
        W, r, m = self.world, self.rank, x.shape[0]
        lse, pos, npos, mean, *_ = contrastive_stats(
            x, None, a, b, targets, exclude_diag=exclude_diag, decoupled=decoupled,
            backend=backend)
        if W == 1:
            return lse, pos, npos, mean, lse[:0], mean[:0], lse[:0]
        h = m // 2
        # (row slice of x, [(rank, column slice)]) of the off-diagonal work of this rank
        cols = [(s, slice(0, m)) for s in ((r + d) % W for d in range(1, (W + 1) // 2))]
        calls = [(slice(0, m), cols)]
        if W % 2 == 0:
            s = (r + W // 2) % W
            if r < s:  # h = 0 for one row: the zero-column call stays, so that every
                # rank's graph uses the gathered blocks and runs their backward all_reduce
                cols.append((s, slice(0, h)))
            else:
                calls.append((slice(h, m), [(s, slice(0, m))]))
        neg_inf = torch.full((W * m,), float("-inf"), dtype=lse.dtype, device=x.device)
        col_lse, col_sum = neg_inf, torch.zeros_like(neg_inf)
        row_lse, row_sum = [lse], [mean * _den_count(m, npos, exclude_diag, decoupled)]
        for rows, blocks in calls:
            if not blocks:
                continue
            keys = torch.cat([parts[s][c] for s, c in blocks])
            b_lse, _, _, b_mean, c_lse, c_mean, _ = contrastive_stats(
                x[rows], keys, a, b, col_stats=True, backend=backend)
            count = rows.stop - rows.start
            pad = (rows.start, m - rows.stop)
            row_lse.append(F.pad(b_lse, pad, value=float("-inf")))
            row_sum.append(F.pad(b_mean * keys.shape[0], pad))
            at = torch.cat([torch.arange(s * m + c.start, s * m + c.stop, device=x.device)
                            for s, c in blocks])
            col_lse = col_lse.index_put((at,), c_lse)
            col_sum = col_sum.index_put((at,), c_mean * count)
        col_lse, col_sum = _ColumnsAllReduce.apply(col_lse, col_sum, self.group)
        own = slice(r * m, (r + 1) * m)
        lse = torch.logsumexp(torch.stack(row_lse + [col_lse[own]]), dim=0)
        count = _den_count(m, npos, exclude_diag, decoupled) + (W - 1) * m
        mean = (torch.stack(row_sum).sum(0) + col_sum[own]) / count
        return lse, pos, npos, mean, lse[:0], mean[:0], lse[:0]

    def _label_positives(self, x: Tensor, parts: tuple[Tensor, ...], labels: Tensor,
                         a: Tensor, b: Tensor, exclude_diag: bool) -> tuple[Tensor, Tensor]:
        """``(pos, npos)`` of :meth:`stats` for this rank's ``x`` against every rank's ``x``
        (``parts``, in rank order) with labels (positives: the same label; the anchor itself
        too unless ``exclude_diag``), without the logits: their mean is
        ``a <x_i, sum of the positives> / npos + b``, from per-label sums of the gathered
        features (``O(world * n * D)``, differentiable)."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        keys = torch.cat(parts).to(dt)
        # dense label ids from a sort (static shapes: no host sync, traceable by torch.compile)
        ordered, order = torch.sort(torch.cat(self._parts_nograd(labels)))
        starts = torch.cat([ordered.new_zeros(1), (ordered[1:] != ordered[:-1]).long()])
        inv = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0))
        sums = keys.new_zeros(keys.shape).index_add(0, inv, keys)
        counts = keys.new_zeros(keys.shape[0]).index_add(0, inv, torch.ones_like(keys[:, 0]))
        m = x.shape[0]
        own, xs = inv[self.rank * m:(self.rank + 1) * m], x.to(dt)
        partners, npos = sums[own], counts[own]
        if exclude_diag:
            partners, npos = partners - xs, npos - 1
        has = npos > 0
        pos = a.to(dt) * (xs * partners).sum(-1) / npos.clamp_min(1) + b.to(dt)
        return torch.where(has, pos, torch.zeros_like(pos)), npos

    def siglip_rows(self, x: Tensor, y: Tensor, a: Tensor, b: Tensor, *, backend: str) -> Tensor:
        """Per-row sums ``[n]`` of the sigmoid pair losses of this rank's ``x`` against every
        rank's ``y`` (differentiable): the own block has its positives on the diagonal
        (``diag_pos``), the other ranks' texts are negatives."""
        if self.strategy == "ring":
            return ring_siglip_rows(x, y, a, b, group=self.group, world=self.world,
                                    rank=self.rank, backend=backend)
        return siglip_ops.siglip_fwd(x, self.columns(y), a, b, True, backend)

    def columns(self, x: Tensor, dim: int = 0) -> Tensor:
        """All ranks' ``x`` concatenated along ``dim``, this rank's block first, with gradient.

        The backward sums, for this rank's block, the gradients that every rank computed.
        """
        parts = _AllGather.apply(x, self.group, self.world, self.rank)
        order = [parts[self.rank]] + [p for j, p in enumerate(parts) if j != self.rank]
        return torch.cat(order, dim=dim)

    def columns_nograd(self, x: Tensor, dim: int = 0) -> Tensor:
        """Like :meth:`columns` for tensors that carry no gradient (labels, weights)."""
        parts = self._parts_nograd(x)
        order = [parts[self.rank]] + [p for j, p in enumerate(parts) if j != self.rank]
        return torch.cat(order, dim=dim)

    def _parts_nograd(self, x: Tensor) -> list[Tensor]:
        """Every rank's ``x`` (no gradient), in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts

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


def _den_count(m: int, npos: Tensor, exclude_diag: bool, decoupled: bool) -> Tensor:
    """Size of each row's denominator set within a symmetric block of ``m`` rows."""
    count = torch.full_like(npos, m - int(exclude_diag))
    return count - npos if decoupled else count


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


class _ColumnsAllReduce(torch.autograd.Function):
    """Column statistics of disjoint row sets merged over the ranks: ``log sum_ranks exp(x)``
    (log-sum-exps) and ``sum_ranks u`` (sums), elementwise, in two all-reduces (the maximum, then
    both sums at once). The backward all-reduces both gradients at once and gives each rank
    ``g_x exp(x - y)`` and ``g_u``."""

    @staticmethod
    def forward(ctx, x, u, group):
        ctx.group = group
        m = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        sums = torch.stack([torch.exp(x.detach() - m), u.detach()])
        dist.all_reduce(sums, group=group)
        y = m + torch.log(sums[0])
        ctx.save_for_backward(x, y)
        return y, sums[1]

    @staticmethod
    def backward(ctx, g_y, g_sum):
        x, y = ctx.saved_tensors
        g = torch.stack([g_y, g_sum])
        dist.all_reduce(g, group=ctx.group)
        share = torch.where(x > float("-inf"), torch.exp(x - y), torch.zeros_like(x))
        return g[0] * share, g[1], None


def check_gather(gather: Optional[str]) -> Optional[str]:
    """``gather`` itself if it names a strategy of :data:`GATHER`, else ``ValueError``."""
    if gather not in GATHER:
        raise ValueError(f"gather must be one of {GATHER}, got {gather!r}")
    return gather


def shard(gather: Optional[str], group=None) -> Optional[Shard]:
    """``None`` for a single-process loss, else the :class:`Shard` of this rank."""
    if check_gather(gather) is None:
        return None
    return Shard(gather, group)
