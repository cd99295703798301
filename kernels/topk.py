"""Triton kernel of the tiled similarity search (top-k of ``query @ key.T`` per query row).

``topk_fwd(query, key, k, exclude_self)`` returns, for every query row, the ``k`` largest
``<q_i, k_j>`` (fp32, in decreasing order) and their key indices (int64), never holding more
than one tile of the ``N x M`` similarities.

Keys. A (value, column) pair is packed into one int64 whose signed order is "larger value
first, then smaller column": the fp32 bits mapped to an order-preserving int32 in the high
half, ``2**32 - 1 - column`` in the low half. One ``tl.sort`` of int64 then sorts values and
carries their indices, and ties are broken deterministically (smaller column first).

Kernel (``_topk_kernel``). Program ``(i, s)`` owns ``BLOCK_M`` query rows and the ``s``-th
contiguous range of key columns. For each of its ``BLOCK_M x BLOCK_N`` tiles (a ``tl.dot`` over
``D``, fp32 accumulator) it keeps only the entries above the row's threshold ``tau`` (the value
of its ``k``-th best key so far; ``-inf`` at first): those candidates are appended, compacted by
a prefix sum, to a per-program row buffer of width ``W`` in global memory (L2-resident scratch)
behind the ``K_PAD`` best keys. When a tile's candidates would overflow a row's staging space,
the rows are merged first: each row of the buffer is sorted (``tl.sort``, in chunks of
``MERGE_M`` rows; under the interpreter an equivalent rank computation), its first ``K_PAD``
keys are the new best, ``tau`` is re-read and the tile is filtered again. Later columns have
larger indices, so an entry equal to ``tau`` can never displace it: the test is a strict
``>``, and after a few tiles almost every entry is rejected by that one comparison. Nothing of
size ``N x M`` exists: the scratch is ``splits x N x W`` int64 (``W = 2 max(K_PAD, 128)``) and
the output ``splits x N x k``.

Splits. With few query rows the columns are split over ``splits`` programs per row block (to
fill the GPU in whole waves); each writes the top-k of its range and a final ``torch.topk``
over the ``splits * k`` packed candidates of each row merges them. Query rows are processed in
chunks so that the scratch stays under ``SCRATCH_BYTES``.

``k`` up to ``MAX_K`` (1024) runs in the kernel; a larger ``k`` falls back to row slabs of
materialized fp32 similarities (a stable sort per slab, which keeps the same tie order; slabs
of at most ``SCRATCH_BYTES``).

Precision: fp16 / bf16 tiles run on the tensor cores with an fp32 accumulator; fp32 inputs use
exact fp32 unless ``fastcl.kernels.contrastive.ALLOW_TF32``. Values equal ``torch.topk`` of the
materialized fp32 similarities whenever the dot products are exact in fp32 (otherwise they may
differ by the rounding of a different summation order); indices then agree up to ties.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import contrastive as _c
from .contrastive import _mma, _qk_chunked

__all__ = ["topk_fwd", "MAX_K", "SCRATCH_BYTES"]

#: Largest ``k`` served by the streaming kernel (larger ``k``: materialized row slabs).
MAX_K: int = 1024

#: Bound on the bytes of the kernel's scratch (and of a fallback slab) per launch.
SCRATCH_BYTES: int = 256 << 20

_INTERPRET = _c._INTERPRET

# key of (-inf, column 2**32 - 1): below the key of every finite value
_SENTINEL = tl.constexpr(-9187343239835811840)
_BN_MAX = 128          # widest BLOCK_N of the GPU configurations (sets the staging width)
_MERGE_ELEMS = 4096    # keys per sorted chunk of a merge (register budget)


@triton.jit
def _pack(v, col):
    """Order-preserving int64 key of fp32 ``v`` and int64 ``col`` (larger v, then smaller col)."""
    b = (v + 0.0).to(tl.int32, bitcast=True)       # + 0.0 maps -0.0 to +0.0
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (b.to(tl.int64) << 32) | (4294967295 - col)


@triton.jit
def _key_value(key):
    """The fp32 value of a packed key."""
    hi = (key >> 32).to(tl.int32)
    b = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


if _INTERPRET:

    @triton.jit
    def _sort_desc(keys, W: tl.constexpr):
        """Rows of ``keys`` in decreasing order, by ranks (the interpreter runs ``tl.sort``'s
        network one Python reduction at a time; ranks are a few vectorized operations)."""
        pos = tl.arange(0, W)
        a = keys[:, None, :]
        b = keys[:, :, None]
        ahead = (a > b) | ((a == b) & (pos[None, None, :] < pos[None, :, None]))
        rank = tl.sum(ahead.to(tl.int32), 2)                    # rank of column j, [R, W]
        sel = rank[:, None, :] == pos[None, :, None]             # [R, position, j]
        return tl.sum(tl.where(sel, a, 0), 2)

else:

    @triton.jit
    def _sort_desc(keys, W: tl.constexpr):
        """Rows of ``keys`` in decreasing order."""
        return tl.sort(keys, 1, descending=True)


@triton.jit
def _merge(region, OUT, out_row0, N_OUT,
           K_TOP: tl.constexpr, W: tl.constexpr, MERGE_M: tl.constexpr,
           BLOCK_M: tl.constexpr, FINAL: tl.constexpr):
    """Sort every buffer row (best first); return the rows' new thresholds (``[BLOCK_M]``).

    With ``FINAL`` the first ``K_TOP`` keys of each valid row go to ``OUT`` instead.
    """
    tl.debug_barrier()                     # the staged keys of every thread are in memory
    cols = tl.arange(0, W)
    for r0 in range(0, BLOCK_M, MERGE_M):
        rows = r0 + tl.arange(0, MERGE_M)
        ptrs = region + rows.to(tl.int64)[:, None] * W + cols[None, :]
        keys = _sort_desc(tl.load(ptrs, cache_modifier=".cg"), W)
        if FINAL:
            out_rows = out_row0 + rows
            tl.store(OUT + out_rows.to(tl.int64)[:, None] * K_TOP + cols[None, :], keys,
                     mask=(out_rows < N_OUT)[:, None] & (cols < K_TOP)[None, :])
        else:
            tl.store(ptrs, keys)
    tau = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if not FINAL:
        tl.debug_barrier()
        rows = tl.arange(0, BLOCK_M)
        tau = _key_value(tl.load(region + rows.to(tl.int64) * W + (K_TOP - 1),
                                 cache_modifier=".cg"))
    return tau


@triton.jit
def _topk_kernel(
    Q, K, OUT, SCR,
    N, M, D, row_offset, cols_per_split,
    stride_qm, stride_qd, stride_kn, stride_kd,
    K_TOP: tl.constexpr, K_PAD: tl.constexpr, W: tl.constexpr, MERGE_M: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, TF32: tl.constexpr, SINGLE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Packed top-``K_TOP`` keys of rows ``[pid_m * BLOCK_M, ...)`` over column range ``pid_s``.

    ``OUT``: ``[splits, N, K_TOP]`` int64. ``SCR``: at least ``splits * cdiv(N, BLOCK_M) *
    BLOCK_M * W`` int64. ``row_offset`` is the global index of query row 0 (for
    ``EXCLUDE_SELF``).
    """
    tl.static_assert(W - K_PAD >= BLOCK_N)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_mb = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < N
    q_rows = offs_m.to(tl.int64) * stride_qm
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    rows_self = offs_m + row_offset

    region = SCR + (pid_s * n_mb + pid_m).to(tl.int64) * (BLOCK_M * W)
    b_rows_loc = tl.arange(0, BLOCK_M) * W                 # int32: BLOCK_M * W < 2**31
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, M)

    # every buffer slot starts as the sentinel key
    cols_w = tl.arange(0, W)
    for r0 in range(0, BLOCK_M, MERGE_M):
        rows = r0 + tl.arange(0, MERGE_M)
        tl.store(region + rows.to(tl.int64)[:, None] * W + cols_w[None, :],
                 tl.full([MERGE_M, W], _SENTINEL, tl.int64))
    tl.debug_barrier()                     # before other threads stage keys into these slots

    if SINGLE_D:
        q_tile = tl.load(Q + q_rows[:, None] + offs_d64[None, :] * stride_qd,
                         mask=m_in[:, None] & d_in[None, :], other=0.0)

    STAGE: tl.constexpr = W - K_PAD
    tau = tl.full([BLOCK_M], float("-inf"), tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < col_hi
        k_rows = offs_n.to(tl.int64) * stride_kn
        if SINGLE_D:
            k_tile = tl.load(K + k_rows[:, None] + offs_d64[None, :] * stride_kd,
                             mask=n_in[:, None] & d_in[None, :], other=0.0)
            qk = _mma(q_tile, tl.trans(k_tile), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                      TF32)
        else:
            qk = _qk_chunked(Q, K, q_rows, m_in, k_rows, n_in, D, stride_qd, stride_kd,
                             BLOCK_M, BLOCK_N, BLOCK_D, TF32)
        valid = m_in[:, None] & n_in[None, :]
        if EXCLUDE_SELF:
            valid = valid & (rows_self[:, None] != offs_n[None, :])
        cand = valid & (qk > tau[:, None])
        n_cand = tl.sum(cand.to(tl.int32), 1)
        if tl.max(cnt + n_cand, 0) > STAGE:
            # a row's staging space would overflow: merge first, then filter again
            tau = _merge(region, OUT, 0, 0, K_TOP, W, MERGE_M, BLOCK_M, False)
            cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
            cand = valid & (qk > tau[:, None])
            n_cand = tl.sum(cand.to(tl.int32), 1)
        if tl.max(n_cand, 0) > 0:
            slot = K_PAD + cnt[:, None] + tl.cumsum(cand.to(tl.int32), 1) - 1
            keys = _pack(qk, offs_n.to(tl.int64)[None, :])
            tl.store(region + (b_rows_loc[:, None] + slot), keys, mask=cand)
            cnt += n_cand

    _merge(region, OUT, pid_s * N + pid_m * BLOCK_M, (pid_s + 1) * N,
           K_TOP, W, MERGE_M, BLOCK_M, True)


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------

def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


# BLOCK_N <= _BN_MAX in every configuration (the staging width is set before the launch)
_CONFIGS = {
    "mma": [_cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)],
    "fma": [_cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 32, 4, 2)],
}
_KEYS = ["D", "K_TOP", "K_PAD", "W", "MERGE_M", "EXCLUDE_SELF", "TF32", "SINGLE_D", "BLOCK_D"]
_TUNED = {fam: triton.autotune(cfgs, key=_KEYS)(_topk_kernel) for fam, cfgs in _CONFIGS.items()}

_INTERP_BLOCK = 16
_INTERP_BN_MAX = 16


def _decode(keys: torch.Tensor):
    """``(values fp32, indices int64)`` of packed keys."""
    hi = (keys >> 32).to(torch.int32)
    values = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return values, indices


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_splits(N: int, M: int, sms: int, unit: int) -> int:
    """Column ranges per row block: at least four programs per multiprocessor, whole waves.

    Counted for ``BLOCK_M = 64`` and one resident program per multiprocessor (the kernel
    takes the whole register file); each range keeps at least 8 tiles of ``unit`` columns.
    """
    row_blocks = triton.cdiv(N, 64)
    hi = max(1, M // (8 * unit))
    lo = min(hi, max(1, triton.cdiv(4 * sms, row_blocks)))
    best, best_eff = lo, 0.0
    for s in range(lo, min(hi, 4 * lo) + 1):
        programs = row_blocks * s
        eff = programs / (triton.cdiv(programs, sms) * sms)
        if eff > best_eff:
            best, best_eff = s, eff
        if eff >= 0.95:
            break
    return best


def _plan(N: int, M: int, k: int, device: torch.device, splits: Optional[int]):
    """``(K_PAD, W, splits, cols_per_split, rows_per_launch)``."""
    k_pad = triton.next_power_of_2(k)
    bn_max = _INTERP_BN_MAX if _INTERPRET else _BN_MAX
    W = 2 * max(k_pad, bn_max)
    unit = bn_max                                 # columns per split: a multiple of every BLOCK_N
    if splits is None:
        if _INTERPRET:
            splits = 1
        else:
            splits = _auto_splits(N, M, _num_sms(device), unit)
    splits = max(1, min(int(splits), triton.cdiv(M, unit)))
    cols_per_split = triton.cdiv(triton.cdiv(M, splits), unit) * unit
    splits = triton.cdiv(M, cols_per_split)
    # scratch splits * rows * W and output splits * rows * k, int64
    per_row = splits * (W + k) * 8
    rows = max(128, (SCRATCH_BYTES // per_row) // 128 * 128)
    return k_pad, W, splits, cols_per_split, rows


def _launch(q, key, k, exclude_self, row_offset, k_pad, W, splits, cols_per_split, scratch):
    N, D = q.shape
    M = key.shape[0]
    out = torch.empty((splits, N, k), dtype=torch.int64, device=q.device)
    tf32 = bool(_c.ALLOW_TF32)
    family, single, block_d = _c._tiling(D, q.dtype, tf32)
    merge_m_max = max(1, _MERGE_ELEMS // W)
    args = (q, key, out, scratch, N, M, D, row_offset, cols_per_split,
            q.stride(0), q.stride(1), key.stride(0), key.stride(1))
    flags = dict(K_TOP=k, K_PAD=k_pad, W=W, EXCLUDE_SELF=bool(exclude_self), TF32=tf32,
                 SINGLE_D=single, BLOCK_D=block_d)
    if _INTERPRET:
        bm = _INTERP_BLOCK
        merge_m = max(1, min(bm, (1 << 20) // (W * W)))    # the ranks hold MERGE_M * W * W
        _topk_kernel[(triton.cdiv(N, bm), splits)](
            *args, **flags, MERGE_M=merge_m, BLOCK_M=bm, BLOCK_N=_INTERP_BLOCK)
        return out
    # MERGE_M must divide every BLOCK_M (powers of two, the smallest 32)
    flags["MERGE_M"] = min(32, merge_m_max)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), splits)

    with torch.cuda.device(q.device):
        if _c.AUTOTUNE:
            _TUNED[family][grid](*args, **flags)
        else:
            cfg = _CONFIGS[family][0]
            _topk_kernel[grid(cfg.kwargs)](*args, **flags, **cfg.kwargs,
                                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _topk_slabs(query, key, k, exclude_self):
    """Large ``k``: materialized fp32 similarities in row slabs of at most ``SCRATCH_BYTES``.

    A stable sort keeps the kernel's tie order (smaller index first among equal values).
    """
    N, M = query.shape[0], key.shape[0]
    rows = max(1, SCRATCH_BYTES // (16 * M))      # similarities, sorted values and indices
    kf = key.float()
    values, indices = [], []
    for r0 in range(0, N, rows):
        sim = query[r0:r0 + rows].float() @ kf.T
        if exclude_self:
            r = torch.arange(r0, r0 + sim.shape[0], device=sim.device)
            sim[r[r < M] - r0, r[r < M]] = float("-inf")
        v, i = torch.sort(sim, dim=1, descending=True, stable=True)
        values.append(v[:, :k])
        indices.append(i[:, :k])
    return torch.cat(values), torch.cat(indices)


def topk_fwd(query, key, k: int, exclude_self: bool, splits: Optional[int] = None):
    """``(values [N, k] fp32, indices [N, k] int64)``: the ``k`` largest ``<q_i, key_j>`` per row.

    Values in decreasing order; among equal values the smaller column first. ``exclude_self``
    drops column ``j == i``. ``splits`` fixes the number of column ranges per row block
    (default: enough programs to fill the GPU).
    """
    assert query.dim() == 2 and key.dim() == 2 and query.shape[1] == key.shape[1]
    assert query.dtype == key.dtype
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    N, M = query.shape[0], key.shape[0]
    assert 1 <= k <= M - (1 if exclude_self else 0)
    assert M < 2 ** 32
    if k > MAX_K:
        return _topk_slabs(query, key, k, exclude_self)
    k_pad, W, splits, cols_per_split, rows = _plan(N, M, k, query.device, splits)
    bm_max = _INTERP_BLOCK if _INTERPRET else 128   # largest BLOCK_M of the configurations
    rows_pad = triton.cdiv(min(N, rows), bm_max) * bm_max
    scratch = torch.empty(splits * rows_pad * W, dtype=torch.int64, device=query.device)
    values = torch.empty((N, k), dtype=torch.float32, device=query.device)
    indices = torch.empty((N, k), dtype=torch.int64, device=query.device)
    for r0 in range(0, N, rows):
        q = query[r0:r0 + rows]
        out = _launch(q, key, k, exclude_self, r0, k_pad, W, splits, cols_per_split, scratch)
        if splits == 1:
            best = out[0]
        else:
            cand = out.permute(1, 0, 2).reshape(q.shape[0], splits * k)
            best = torch.topk(cand, k, dim=1).values
        v, i = _decode(best)
        values[r0:r0 + q.shape[0]] = v
        indices[r0:r0 + q.shape[0]] = i
    return values, indices
