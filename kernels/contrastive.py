"""Triton kernels of the fused contrastive primitive and their launch wrappers.

The statistics and the gradient are defined in :mod:`fastcl.reference.contrastive`; the logits
``s = scale * q @ k.T + bias`` are never materialized.

Forward (``_contrastive_fwd_kernel``): one program per ``BLOCK_M`` rows of ``s`` walks over the
columns in tiles of ``BLOCK_N``. Each tile is a ``tl.dot`` over ``D`` in ``BLOCK_D`` chunks (input
dtype on the tensor cores, fp32 accumulator), followed by the masks (tails, ``exclude_diag``,
targets or labels, ``decoupled``), an online log-sum-exp in base 2 (running max, ``log2(e)``
folded into the scale and bias), running positive sums / counts (or a second online log-sum-exp
for ``pos_lse``), running sums over the denominator set for the mean and, with ``HAS_LSE2``, one
more running sum for ``lse2`` (the log-sum-exp at ``lse2_mult`` times the logits, whose maximum
is ``lse2_mult`` times the running max). Column statistics are the
same kernel launched a second time with the roles of ``q`` and ``k`` swapped (positives play no
role there, ``allowed`` is symmetric in ``r`` and ``c``): no atomics, no ``R x C`` buffer. From
``SLAB_MIN_D`` features on they come from the row launch itself (``COL_PARTIALS``), one pass
over the logits instead of two: each row block writes the column statistics of its tiles to
``[blocks, C]`` partials, for a slab of rows within ``SLAB_BYTES`` at a time, and
``_merge_partials_kernel`` merges them into running per-column states
(``_fwd_col_partials``). Self-similarity (``k=None``: the keys are the queries, as in NT-Xent,
SupCon and DCL), from ``SLAB_MIN_D`` on:
the logits are symmetric, so the launch with ``SELF`` computes the blocks on and below the
diagonal only (half the square) and each tile strictly below it gives, transposed, the partial
states of its columns as rows; per slab of rows, ``_merge_partials_kernel`` folds them into the
states of those rows and ``_finalize_kernel`` turns the states into the statistics
(``_fwd_self``; where the full square takes more than one wave of programs, as otherwise the
longest row block sets the time of both; ``FASTCL_TRITON_SELF_FWD=0`` computes the full square,
``2`` the half whatever the size).

Backward (``_contrastive_bwd_kernel``): one kernel, two launches. Row-parallel
(``TRANSPOSED=False``): a program owns ``BLOCK_M`` rows and a ``BLOCK_DV`` slice of ``dq``,
recomputes each logit tile, builds ``G`` from the saved statistics and accumulates
``G @ k`` in fp32 registers; the programs of the first slice also write per-row partial sums of
``G * (q . k)`` and ``G`` (``[R]`` buffers reduced with ``torch.sum`` afterwards, giving
``dscale`` and ``dbias``). Column-parallel (``TRANSPOSED=True``): a program owns ``BLOCK_M``
columns and accumulates ``G.T @ q`` into ``dk``. Each output tile is written once; extra memory
is ``O(R + C)``. When ``D`` is wider than one ``BLOCK_DV`` slice, the logit tiles are recomputed
once per slice (``ceil(D / BLOCK_DV)`` times); from ``SLAB_MIN_D`` on (wide features) the
backward goes by slabs instead (``_bwd_slabs``): the same kernel with ``STORE_G`` writes ``G``
for a slab of rows (one tile per program, the logits recomputed once, at most ``SLAB_BYTES``)
and a GEMM multiplies it by the features, so the logits are recomputed once per orientation
whatever ``D``; with ``SLAB_ACCUMULATE`` once in all, the slabs of rows also giving ``dk`` by
GEMMs accumulated in an fp32 ``C x D`` buffer. Self-similarity (``k=None``: the keys are the
queries): one row-parallel launch (``SELF``) builds both
orientations of ``G`` from each logit tile and accumulates ``(G + G.T) @ q`` into the whole
gradient of ``q``: two GEMMs' worth of work instead of the four of the two launches. By slabs,
``G + G.T`` is stored for the blocks on and below the diagonal only, and two GEMMs (the slab's
rows, and the rows above it through the transposed slab) give the gradient: one and a half
GEMMs' worth, two with the half-square forward.

Precision of fp32 inputs: ``tl.dot`` of fp32 tiles uses exact fp32 (``input_precision="ieee"``,
CUDA cores) by default. Set the environment variable ``FASTCL_TF32=1`` before import, or assign
``fastcl.kernels.contrastive.ALLOW_TF32 = True`` at run time, to run fp32 inputs on TF32 tensor
cores (10 mantissa bits per product, fp32 accumulation). fp16 / bf16 inputs always use the
tensor cores in their own dtype (``G`` is rounded to that dtype for ``G @ k`` and ``G.T @ q``, as
FlashAttention rounds ``P``; for fp16 after a power-of-two rescaling that keeps it in range);
statistics and accumulators are fp32 whatever the input dtype.

Block sizes: under the Triton interpreter (``TRITON_INTERPRET=1`` when triton is imported) one
small fixed configuration keeps CPU runs fast. On a GPU the launch goes through
``triton.autotune`` keyed on ``D``, the flags and the dtypes (``FASTCL_AUTOTUNE=0``, or
``AUTOTUNE = False``, launches the first configuration of each list instead).
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["contrastive_fwd", "contrastive_bwd", "ALLOW_TF32", "AUTOTUNE", "SLAB_MIN_D",
           "SLAB_BYTES", "SLAB_ACCUMULATE"]

#: fp32 inputs run ``tl.dot`` on TF32 tensor cores when True (exact fp32 "ieee" when False).
ALLOW_TF32: bool = os.environ.get("FASTCL_TF32", "0") == "1"

#: GPU launches pick their block sizes with ``triton.autotune`` when True, else they use the
#: first configuration of each list (no benchmarking; ``FASTCL_AUTOTUNE=0``).
AUTOTUNE: bool = os.environ.get("FASTCL_AUTOTUNE", "1") != "0"

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)     # log(x) = log2(x) * ln(2)

# triton >= 3.0 spells the fp32 dot precision ``input_precision``; older releases ``allow_tf32``.
_HAS_INPUT_PRECISION = "input_precision" in inspect.signature(tl.dot).parameters


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _interpret_probe(x):
    pass


# True when triton.jit builds interpreted functions (TRITON_INTERPRET=1 at import time): the
# kernels then run on CPU tensors, one program after another.
_INTERPRET = type(_interpret_probe).__name__ == "InterpretedFunction"

if _INTERPRET:

    @triton.jit
    def _mma(a, b, acc, TF32: tl.constexpr):
        """``acc + a @ b``: every element of the product rounded once to fp32.

        Like a tensor core (exact products, wide accumulation) or a chain of fp32 FMAs, and
        unlike a BLAS sgemm, the result of an element does not depend on the orientation of the
        tile, so logits recomputed as ``k @ q.T`` match the forward's ``q @ k.T``. (The
        interpreter would also multiply bf16 tiles as raw integers.)
        """
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)

elif _HAS_INPUT_PRECISION:

    @triton.jit
    def _mma(a, b, acc, TF32: tl.constexpr):
        """``acc + a @ b`` with an fp32 accumulator; fp32 operands exact unless ``TF32``."""
        if a.dtype == tl.float32:
            if TF32:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

else:  # pragma: no cover - triton < 3.0

    @triton.jit
    def _mma(a, b, acc, TF32: tl.constexpr):
        """``acc + a @ b`` with an fp32 accumulator; fp32 operands exact unless ``TF32``."""
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, allow_tf32=TF32)
        else:
            acc = tl.dot(a, b, acc)
        return acc


if _INTERPRET:

    @triton.jit
    def _lowp(x, dtype: tl.constexpr):
        """``x.to(dtype)`` rounded to nearest even (the interpreter truncates fp32 to bf16)."""
        if dtype == tl.bfloat16:
            b = x.to(tl.int32, bitcast=True)
            b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
            x = b.to(tl.float32, bitcast=True)
        return x.to(dtype)

else:

    @triton.jit
    def _lowp(x, dtype: tl.constexpr):
        """``x.to(dtype)`` (round to nearest even)."""
        return x.to(dtype)


@triton.jit
def _store_g(OUT, g, g_mul, rows, r_in, cols, c_in, stride_om, stride_od,
             RESCALE_G: tl.constexpr):
    """``OUT[rows, cols] = G`` (times ``g_mul`` with ``RESCALE_G``) in ``OUT``'s dtype."""
    if RESCALE_G:
        g = g * g_mul
    ptrs = OUT + rows.to(tl.int64)[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_od
    tl.store(ptrs, _lowp(g, OUT.dtype.element_ty), mask=r_in[:, None] & c_in[None, :])


@triton.jit
def _emit_g(acc, g, g_mul, OUT, g_rows, o_in, offs_n, n_in, stride_om, stride_od,
            b_tile, B, b_rows, offs_v64, v_in, stride_bd,
            STORE_G: tl.constexpr, SINGLE_D: tl.constexpr, RESCALE_G: tl.constexpr,
            TF32: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What a backward kernel does with its tile of ``G``: with ``STORE_G`` write it to the
    slab ``OUT`` (rows ``g_rows``), else accumulate its product with ``B`` into ``acc``."""
    if STORE_G:
        _store_g(OUT, g, g_mul, g_rows, o_in, offs_n, n_in, stride_om, stride_od, RESCALE_G)
    else:
        acc = _accumulate_gv(acc, g, g_mul, b_tile, B, b_rows, offs_v64, n_in, v_in,
                             stride_bd, SINGLE_D, RESCALE_G, TF32, BLOCK_D, BLOCK_DV)
    return acc


@triton.jit
def _accumulate_gv(acc, g, g_mul, b_tile, B, b_rows, offs_v64, n_in, v_in, stride_bd,
                   SINGLE_D: tl.constexpr, RESCALE_G: tl.constexpr, TF32: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``acc + G @ B[inner, slice]``: ``G`` (times ``g_mul`` with ``RESCALE_G``) rounded to the
    features' dtype, as FlashAttention rounds ``P``. With ``SINGLE_D`` the slice is the whole
    of ``D``, the ``b_tile`` the logits were computed from."""
    if SINGLE_D:
        tl.static_assert(BLOCK_DV == BLOCK_D)
        v_tile = b_tile
    else:
        v_tile = tl.load(B + b_rows[:, None] + offs_v64[None, :] * stride_bd,
                         mask=n_in[:, None] & v_in[None, :], other=0.0)
    if RESCALE_G:
        g = g * g_mul
    return _mma(_lowp(g, v_tile.dtype), v_tile, acc, TF32)


@triton.jit
def _qk_chunked(A, B, a_rows, a_in, b_rows, b_in, D, stride_ad, stride_bd,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                TF32: tl.constexpr):
    """``A[a_rows] . B[b_rows]`` as a ``[BLOCK_M, BLOCK_N]`` fp32 tile, looping over ``D``.

    ``a_rows`` / ``b_rows`` are the int64 row offsets already multiplied by the row strides.
    """
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_in = dd < D
        dd = dd.to(tl.int64)
        a = tl.load(A + a_rows[:, None] + dd[None, :] * stride_ad,
                    mask=a_in[:, None] & d_in[None, :], other=0.0)
        b = tl.load(B + b_rows[:, None] + dd[None, :] * stride_bd,
                    mask=b_in[:, None] & d_in[None, :], other=0.0)
        acc = _mma(a, tl.trans(b), acc, TF32)
    return acc


@triton.jit
def _program_tiles(O0, O_END, NB, STORE_G: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(block, second, n_lo, n_hi)`` of this program: its block of outer rows (counted from
    ``O0``), the second grid index and the range of inner columns it walks.

    One launch per orientation (``STORE_G`` off): grid ``(row blocks, output slices)``, every
    column. ``STORE_G``: one program per tile of the slab ``[O0, O_END) x [0, NB)`` from a
    one-dimensional grid, in grouped order (``GROUP_M`` row blocks walk the column tiles
    together, so that the column tiles they share stay in the L2 cache); ``second`` is the
    column tile.
    """
    if STORE_G:
        num_m = tl.cdiv(O_END - O0, BLOCK_M)
        num_n = tl.cdiv(NB, BLOCK_N)
        pid_all = tl.program_id(0)
        per_group = GROUP_M * num_n
        first_m = (pid_all // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        block = first_m + (pid_all % per_group) % group_rows
        second = (pid_all % per_group) // group_rows
        n_lo = second * BLOCK_N
        n_hi = n_lo + BLOCK_N
    else:
        block = tl.program_id(0)
        second = tl.program_id(1)
        n_lo = 0
        n_hi = NB
    return block, second, n_lo, n_hi


@triton.jit
def _row_coefs(r, r_in, C, lse_ptr, pos_ptr, npos_ptr, g_lse_ptr, g_pos_ptr, g_mean_ptr,
               tgt_ptr, rlab_ptr, l2_ptr, g_l2_ptr, lse2_mult,
               HAS_TARGETS: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
               DECOUPLED: tl.constexpr, POS_LSE: tl.constexpr, HAS_G_LSE: tl.constexpr,
               HAS_G_POS: tl.constexpr, HAS_G_MEAN: tl.constexpr, HAS_G_LSE2: tl.constexpr):
    """Per-row coefficients of ``G`` for the rows ``r`` (1-D), zeros for disabled terms.

    Returns ``(g_lse, lse2, g_pos, pos2, g_mean / |den|, target, label, g_l2, l2)`` where
    ``lse2``, ``pos2`` and ``l2`` (the statistic ``lse2``) are in base-2 units, ``g_pos`` is
    already divided by ``npos`` unless ``POS_LSE``, and ``g_l2`` is ``g_lse2 * lse2_mult``.
    """
    zero = tl.zeros(r.shape, dtype=tl.float32)
    g_l = zero
    lse2 = zero
    if HAS_G_LSE:
        g_l = tl.load(g_lse_ptr + r, mask=r_in, other=0.0).to(tl.float32)
        lse2 = tl.load(lse_ptr + r, mask=r_in, other=0.0).to(tl.float32) * _LOG2E
    npos = zero
    if HAS_TARGETS or HAS_LABELS:
        if HAS_G_POS or (HAS_G_MEAN and DECOUPLED):
            npos = tl.load(npos_ptr + r, mask=r_in, other=0.0).to(tl.float32)
    g_p = zero
    pos2 = zero
    if HAS_G_POS and (HAS_TARGETS or HAS_LABELS):
        g_p = tl.load(g_pos_ptr + r, mask=r_in, other=0.0).to(tl.float32)
        if POS_LSE:
            pos2 = tl.load(pos_ptr + r, mask=r_in, other=0.0).to(tl.float32) * _LOG2E
        else:
            g_p = g_p / tl.maximum(npos, 1.0)
    g_m = zero
    if HAS_G_MEAN:
        cnt = zero + C
        if EXCLUDE_DIAG:
            cnt = cnt - (r < C).to(tl.float32)
        if DECOUPLED:
            cnt = cnt - npos
        g_m = tl.load(g_mean_ptr + r, mask=r_in, other=0.0).to(tl.float32)
        g_m = g_m / tl.maximum(cnt, 1.0)
    tgt = tl.full(r.shape, -1, tl.int64)
    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + r, mask=r_in, other=-1).to(tl.int64)
    lab = tl.zeros(r.shape, dtype=tl.int64)
    if HAS_LABELS:
        lab = tl.load(rlab_ptr + r, mask=r_in, other=0).to(tl.int64)
    g_l2 = zero
    l2 = zero
    if HAS_G_LSE2:
        g_l2 = tl.load(g_l2_ptr + r, mask=r_in, other=0.0).to(tl.float32) * lse2_mult
        l2 = tl.load(l2_ptr + r, mask=r_in, other=0.0).to(tl.float32) * _LOG2E
    return g_l, lse2, g_p, pos2, g_m, tgt, lab, g_l2, l2


@triton.jit
def _col_coefs(c, c_in, R, col_lse_ptr, g_col_lse_ptr, g_col_mean_ptr, clab_ptr,
               HAS_LABELS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
               HAS_G_COL_LSE: tl.constexpr, HAS_G_COL_MEAN: tl.constexpr):
    """Per-column coefficients ``(g_col_lse, col_lse2, g_col_mean / |allowed|, label)``."""
    zero = tl.zeros(c.shape, dtype=tl.float32)
    g_cl = zero
    cl2 = zero
    if HAS_G_COL_LSE:
        g_cl = tl.load(g_col_lse_ptr + c, mask=c_in, other=0.0).to(tl.float32)
        cl2 = tl.load(col_lse_ptr + c, mask=c_in, other=0.0).to(tl.float32) * _LOG2E
    g_cm = zero
    if HAS_G_COL_MEAN:
        cnt = zero + R
        if EXCLUDE_DIAG:
            cnt = cnt - (c < R).to(tl.float32)
        g_cm = tl.load(g_col_mean_ptr + c, mask=c_in, other=0.0).to(tl.float32)
        g_cm = g_cm / tl.maximum(cnt, 1.0)
    lab = tl.zeros(c.shape, dtype=tl.int64)
    if HAS_LABELS:
        lab = tl.load(clab_ptr + c, mask=c_in, other=0).to(tl.int64)
    return g_cl, cl2, g_cm, lab


@triton.jit
def _grad_tile(s2, r, c, r_in, c_in, g_l, lse2, g_p, pos2, g_m, tgt, rlab, g_l2, l2, lse2_mult,
               g_cl, cl2, g_cm, clab,
               HAS_TARGETS: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
               DECOUPLED: tl.constexpr, POS_LSE: tl.constexpr, HAS_G_LSE: tl.constexpr,
               HAS_G_POS: tl.constexpr, HAS_G_MEAN: tl.constexpr, HAS_G_COL_LSE: tl.constexpr,
               HAS_G_COL_MEAN: tl.constexpr, HAS_G_LSE2: tl.constexpr):
    """``G`` on one tile. Row quantities broadcast along rows, column quantities along columns.

    The tile may be oriented either way (rows of ``s`` on the first or the second axis); every
    argument is already shaped to broadcast against ``s2``.
    """
    allowed = r_in & c_in
    if EXCLUDE_DIAG:
        allowed = allowed & (r != c)
    HAS_POS: tl.constexpr = HAS_TARGETS or HAS_LABELS
    if HAS_LABELS:
        pos = allowed & (rlab == clab)
    elif HAS_TARGETS:
        pos = allowed & (c == tgt)
    else:
        pos = allowed & (r < 0)
    if DECOUPLED and HAS_POS:
        den = allowed & (~pos)
    else:
        den = allowed
    g = tl.zeros(s2.shape, dtype=tl.float32)
    if HAS_G_LSE:
        g = tl.where(den, g_l * tl.exp2(s2 - lse2) + g_m, 0.0)
    elif HAS_G_MEAN:
        g = tl.where(den, g_m, 0.0)
    if HAS_G_LSE2:
        g += tl.where(den, g_l2 * tl.exp2(lse2_mult * s2 - l2), 0.0)
    if HAS_G_POS and HAS_POS:
        if POS_LSE:
            g += tl.where(pos, g_p * tl.exp2(s2 - pos2), 0.0)
        else:
            g += tl.where(pos, g_p, 0.0)
    if HAS_G_COL_LSE:
        g += tl.where(allowed, g_cl * tl.exp2(s2 - cl2) + g_cm, 0.0)
    elif HAS_G_COL_MEAN:
        g += tl.where(allowed, g_cm, 0.0)
    return g


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _store_state(ptr, off, FSTRIDE, mask, m, l, sd, p0, p1, cnt, l2, HAS_POS: tl.constexpr,
                 POS_LSE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_LSE2: tl.constexpr):
    """Store the online state of rows (or column partials) at ``ptr + off``, one field every
    ``FSTRIDE`` elements, the absent fields left out: the max of ``s2`` over the denominator
    set (``m``), the sum of ``exp2(s2 - m)`` (``l``), the sum of ``q . k`` over that set
    (``sd``); with positives ``p0`` (their max of ``s2`` with ``POS_LSE``, else their sum of
    ``q . k``) and, with ``POS_LSE``, ``p1`` (their sum of ``exp2(s2 - p0)``); with labels
    ``cnt`` (their count); with ``HAS_LSE2`` ``l2`` (the sum of ``exp2(mu (s2 - m))`` over the
    denominator set, ``mu = lse2_mult``)."""
    tl.store(ptr + off, m, mask=mask)
    off += FSTRIDE
    tl.store(ptr + off, l, mask=mask)
    off += FSTRIDE
    tl.store(ptr + off, sd, mask=mask)
    if HAS_POS:
        off += FSTRIDE
        tl.store(ptr + off, p0, mask=mask)
        if POS_LSE:
            off += FSTRIDE
            tl.store(ptr + off, p1, mask=mask)
    if HAS_LABELS:
        off += FSTRIDE
        tl.store(ptr + off, cnt, mask=mask)
    if HAS_LSE2:
        off += FSTRIDE
        tl.store(ptr + off, l2, mask=mask)


@triton.jit
def _load_state(ptr, off, FSTRIDE, mask, HAS_POS: tl.constexpr, POS_LSE: tl.constexpr,
                HAS_LABELS: tl.constexpr, HAS_LSE2: tl.constexpr):
    """``(m, l, sd, p0, p1, cnt, l2)`` stored by :func:`_store_state`; masked-out elements and
    absent fields are the empty state (a max of ``-inf``, sums of zero)."""
    neg_inf = float("-inf")
    m = tl.load(ptr + off, mask=mask, other=neg_inf)
    off += FSTRIDE
    l = tl.load(ptr + off, mask=mask, other=0.0)
    off += FSTRIDE
    sd = tl.load(ptr + off, mask=mask, other=0.0)
    zeros = tl.zeros_like(l)
    p0 = zeros
    p1 = zeros
    cnt = zeros
    if HAS_POS:
        off += FSTRIDE
        if POS_LSE:
            p0 = tl.load(ptr + off, mask=mask, other=neg_inf)
            off += FSTRIDE
            p1 = tl.load(ptr + off, mask=mask, other=0.0)
        else:
            p0 = tl.load(ptr + off, mask=mask, other=0.0)
    if HAS_LABELS:
        off += FSTRIDE
        cnt = tl.load(ptr + off, mask=mask, other=0.0)
    l2 = zeros
    if HAS_LSE2:
        off += FSTRIDE
        l2 = tl.load(ptr + off, mask=mask, other=0.0)
    return m, l, sd, p0, p1, cnt, l2


@triton.jit
def _merge_lse(m, l, m2, l2):
    """The online log-sum-exp state (base 2) of the union of two sets."""
    m_new = tl.maximum(m, m2)
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp2(m - safe) + l2 * tl.exp2(m2 - safe)


@triton.jit
def _rescale_lse2(l2, m, m_new, mu):
    """The sum ``l2`` of ``exp2(mu (s2 - m))`` taken to the maximum ``m_new >= m``."""
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return l2 * tl.exp2(mu * (m - safe))


@triton.jit
def _finalize_rows(m_i, l_i, sum_den, mp_i, lp_i, sum_pos, cnt_pos, l2_i, offs_m, m_in, tgt, NB,
                   scale, bias, lse_ptr, pos_ptr, npos_ptr, mean_ptr, lse2_ptr, lse2_mult,
                   HAS_TARGETS: tl.constexpr, HAS_LABELS: tl.constexpr,
                   EXCLUDE_DIAG: tl.constexpr, DECOUPLED: tl.constexpr, POS_LSE: tl.constexpr,
                   WRITE_POS: tl.constexpr, HAS_LSE2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Write ``lse``, ``mean`` (and ``pos``, ``npos``; ``lse2``) of rows ``offs_m`` from their
    online state over all ``NB`` columns."""
    neg_inf = float("-inf")
    HAS_POS: tl.constexpr = HAS_TARGETS or HAS_LABELS
    # |pos(r)| and |den(r)|
    if HAS_LABELS:
        npos = cnt_pos
    elif HAS_TARGETS:
        hit = (tgt >= 0) & (tgt < NB)
        if EXCLUDE_DIAG:
            hit = hit & (tgt != offs_m)
        npos = hit.to(tl.float32)
    else:
        npos = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_den = tl.zeros([BLOCK_M], dtype=tl.float32) + NB
    if EXCLUDE_DIAG:
        n_den = n_den - (offs_m < NB).to(tl.float32)
    if DECOUPLED and HAS_POS:
        n_den = n_den - npos

    lse = tl.where(l_i > 0.0, (m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0))) * _LN2,
                   neg_inf)
    mean = tl.where(n_den > 0.0, scale * (sum_den / tl.maximum(n_den, 1.0)) + bias, 0.0)
    tl.store(lse_ptr + offs_m, lse, mask=m_in)
    tl.store(mean_ptr + offs_m, mean, mask=m_in)
    if HAS_LSE2:  # the maximum of mu s2 over the set is mu m_i
        l2_safe = tl.where(l2_i > 0.0, l2_i, 1.0)
        lse2 = tl.where(l2_i > 0.0, (lse2_mult * m_i + tl.log2(l2_safe)) * _LN2, neg_inf)
        tl.store(lse2_ptr + offs_m, lse2, mask=m_in)
    if WRITE_POS:
        if HAS_POS:
            if POS_LSE:
                lp_safe = tl.where(lp_i > 0.0, lp_i, 1.0)
                pos_stat = tl.where(lp_i > 0.0, (mp_i + tl.log2(lp_safe)) * _LN2, 0.0)
            else:
                pos_stat = tl.where(npos > 0.0,
                                    scale * (sum_pos / tl.maximum(npos, 1.0)) + bias, 0.0)
        else:
            pos_stat = tl.zeros([BLOCK_M], dtype=tl.float32)
        tl.store(pos_ptr + offs_m, pos_stat, mask=m_in)
        tl.store(npos_ptr + offs_m, npos, mask=m_in)


@triton.jit
def _contrastive_fwd_kernel(
    A, B, scale_ptr, bias_ptr, tgt_ptr, rlab_ptr, clab_ptr,
    lse_ptr, pos_ptr, npos_ptr, mean_ptr, lse2_ptr, P, ST,
    O0, O_END, NB, D, P_FSTRIDE, ST_FSTRIDE, lse2_mult,
    stride_am, stride_ad, stride_bn, stride_bd,
    HAS_TARGETS: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
    DECOUPLED: tl.constexpr, POS_LSE: tl.constexpr, WRITE_POS: tl.constexpr,
    HAS_LSE2: tl.constexpr, COL_PARTIALS: tl.constexpr, SELF: tl.constexpr, TF32: tl.constexpr,
    SINGLE_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row statistics of ``s = scale * A @ B.T + bias`` for ``BLOCK_M`` rows of ``A``.

    The rows are ``[O0, O_END)``; row block ``blk`` of them writes row ``blk`` of the
    ``[blocks, NB]`` partials ``P`` (one field every ``P_FSTRIDE`` elements, laid out by
    :func:`_store_state`). ``COL_PARTIALS`` (a slab of rows, see ``_fwd_col_partials``): each
    tile also gives the column statistics of its rows over the ``allowed`` set (fields ``m``,
    ``l``, ``sd``). ``HAS_LSE2``: the rows' ``lse2`` too, from one more running sum that shares
    the running max (``mu = lse2_mult > 0``).

    ``SELF`` (``B`` is ``A``: the logits are symmetric; ``BLOCK_N`` divides ``BLOCK_M`` and
    ``O0`` is a multiple of ``BLOCK_M``; see ``_fwd_self``): a program walks the columns below
    the end of its diagonal block only, the longest rows first. The tiles strictly below the
    diagonal block also give the statistics of their columns as rows (the transposed tile:
    ``pos`` and ``den`` of row ``c`` against the columns ``r``), as partials of every field;
    the rows' own online states go to ``ST`` (one field every ``ST_FSTRIDE``) instead of the
    statistics, which ``_finalize_kernel`` writes once the partials are merged in.
    """
    pid = tl.program_id(0)
    if SELF:
        blk = tl.num_programs(0) - 1 - pid  # the longest rows first
    else:
        blk = pid
    row0 = O0 + blk * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_in = offs_m < O_END
    a_rows = offs_m.to(tl.int64) * stride_am
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    offs_d64 = offs_d.to(tl.int64)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    scale2 = scale * _LOG2E
    bias2 = bias * _LOG2E

    if SINGLE_D:
        a_tile = tl.load(A + a_rows[:, None] + offs_d64[None, :] * stride_ad,
                         mask=m_in[:, None] & d_in[None, :], other=0.0)
    HAS_POS: tl.constexpr = HAS_TARGETS or HAS_LABELS
    tgt = offs_m
    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + offs_m, mask=m_in, other=-1).to(tl.int64)
    clab_r = offs_m
    if HAS_LABELS:
        rlab = tl.load(rlab_ptr + offs_m, mask=m_in, other=0).to(tl.int64)
        if SELF:  # the rows' labels as columns of the transposed tiles
            clab_r = tl.load(clab_ptr + offs_m, mask=m_in, other=0).to(tl.int64)

    neg_inf = float("-inf")
    m_i = tl.full([BLOCK_M], neg_inf, tl.float32)      # running max over den (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)        # running sum of exp2(s2 - m_i)
    sum_den = tl.zeros([BLOCK_M], dtype=tl.float32)    # sum of q.k over den
    mp_i = tl.full([BLOCK_M], neg_inf, tl.float32)     # positives: running max (pos_lse)
    lp_i = tl.zeros([BLOCK_M], dtype=tl.float32)       # positives: running exp-sum (pos_lse)
    sum_pos = tl.zeros([BLOCK_M], dtype=tl.float32)    # positives: sum of q.k
    cnt_pos = tl.zeros([BLOCK_M], dtype=tl.float32)    # positives: count (label mode)
    l2_i = tl.zeros([BLOCK_M], dtype=tl.float32)       # running sum of exp2(mu (s2 - m_i))

    if SELF:
        n_end = tl.minimum(row0 + BLOCK_M, NB)
    else:
        n_end = NB
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < NB
        b_rows = offs_n.to(tl.int64) * stride_bn
        if SINGLE_D:
            b_tile = tl.load(B + b_rows[:, None] + offs_d64[None, :] * stride_bd,
                             mask=n_in[:, None] & d_in[None, :], other=0.0)
            qk = _mma(a_tile, tl.trans(b_tile), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                      TF32)
        else:
            qk = _qk_chunked(A, B, a_rows, m_in, b_rows, n_in, D, stride_ad, stride_bd,
                             BLOCK_M, BLOCK_N, BLOCK_D, TF32)
        s2 = qk * scale2 + bias2

        allowed = m_in[:, None] & n_in[None, :]
        if EXCLUDE_DIAG:
            allowed = allowed & (offs_m[:, None] != offs_n[None, :])
        if HAS_LABELS:
            clab = tl.load(clab_ptr + offs_n, mask=n_in, other=0).to(tl.int64)
            pos = allowed & (rlab[:, None] == clab[None, :])
        elif HAS_TARGETS:
            pos = allowed & (offs_n[None, :] == tgt[:, None])
        if DECOUPLED and HAS_POS:
            den = allowed & (~pos)
        else:
            den = allowed

        cp = blk.to(tl.int64) * NB + offs_n
        if COL_PARTIALS:  # the den set of a column: allowed (positives play no role)
            _col_partials(P, cp, P_FSTRIDE, n_in, s2, qk, allowed, offs_m, offs_n, tgt_ptr,
                          rlab_ptr, clab_r, lse2_mult, False, False, False, False, False)
        if SELF:
            if start_n < row0:  # below the diagonal block: the columns' statistics as rows
                _col_partials(P, cp, P_FSTRIDE, n_in, s2, qk, allowed, offs_m, offs_n,
                              tgt_ptr, rlab_ptr, clab_r, lse2_mult,
                              HAS_TARGETS, HAS_LABELS, DECOUPLED, POS_LSE, HAS_LSE2)

        s_den = tl.where(den, s2, neg_inf)
        m_new = tl.maximum(m_i, tl.max(s_den, 1))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        p = tl.exp2(s_den - m_safe[:, None])
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, 1)
        if HAS_LSE2:
            p2 = tl.exp2(lse2_mult * (s_den - m_safe[:, None]))
            l2_i = l2_i * tl.exp2(lse2_mult * (m_i - m_safe)) + tl.sum(p2, 1)
        m_i = m_new
        sum_den += tl.sum(tl.where(den, qk, 0.0), 1)

        if HAS_POS and WRITE_POS:
            if POS_LSE:
                s_pos = tl.where(pos, s2, neg_inf)
                mp_new = tl.maximum(mp_i, tl.max(s_pos, 1))
                mp_safe = tl.where(mp_new == neg_inf, 0.0, mp_new)
                lp_i = lp_i * tl.exp2(mp_i - mp_safe) + tl.sum(tl.exp2(s_pos - mp_safe[:, None]), 1)
                mp_i = mp_new
            else:
                sum_pos += tl.sum(tl.where(pos, qk, 0.0), 1)
            if HAS_LABELS:
                cnt_pos += tl.sum(pos.to(tl.float32), 1)

    if SELF:
        tl.static_assert(WRITE_POS)
        _store_state(ST, offs_m.to(tl.int64), ST_FSTRIDE, m_in, m_i, l_i, sum_den,
                     mp_i if POS_LSE else sum_pos, lp_i, cnt_pos, l2_i, HAS_POS, POS_LSE,
                     HAS_LABELS, HAS_LSE2)
    else:
        _finalize_rows(m_i, l_i, sum_den, mp_i, lp_i, sum_pos, cnt_pos, l2_i, offs_m, m_in, tgt,
                       NB, scale, bias, lse_ptr, pos_ptr, npos_ptr, mean_ptr, lse2_ptr,
                       lse2_mult, HAS_TARGETS, HAS_LABELS, EXCLUDE_DIAG, DECOUPLED, POS_LSE,
                       WRITE_POS, HAS_LSE2, BLOCK_M)


@triton.jit
def _col_partials(P, cp, P_FSTRIDE, n_in, s2, qk, allowed, offs_m, offs_n, tgt_ptr,
                  rlab_ptr, clab_r, lse2_mult, HAS_TARGETS: tl.constexpr,
                  HAS_LABELS: tl.constexpr, DECOUPLED: tl.constexpr, POS_LSE: tl.constexpr,
                  HAS_LSE2: tl.constexpr):
    """The statistics of the columns ``c`` of a tile over its rows ``r``, stored as one row of
    partials (``_store_state``). Without positives (``COL_PARTIALS``) the fields ``m``, ``l``
    and ``sd`` over ``allowed``; with them (``SELF``: a tile of symmetric logits below the
    diagonal, whose columns are rows of the transposed tile) every field, with ``pos(c, r)``
    (``targets[c] == r``, or ``row_labels[c] == col_labels[r]``) and ``den(c, r)``, and with
    ``HAS_LSE2`` the sum of ``exp2(mu (s2 - m))`` over ``den(c, r)``."""
    neg_inf = float("-inf")
    HAS_POS: tl.constexpr = HAS_TARGETS or HAS_LABELS
    den_c = allowed
    if HAS_LABELS:
        rlab_c = tl.load(rlab_ptr + offs_n, mask=n_in, other=0).to(tl.int64)
        pos_c = allowed & (clab_r[:, None] == rlab_c[None, :])
    elif HAS_TARGETS:
        tgt_c = tl.load(tgt_ptr + offs_n, mask=n_in, other=-1).to(tl.int64)
        pos_c = allowed & (offs_m[:, None] == tgt_c[None, :])
    if DECOUPLED and HAS_POS:
        den_c = allowed & (~pos_c)
    s_col = tl.where(den_c, s2, neg_inf)
    c_max = tl.max(s_col, 0)
    c_safe = tl.where(c_max == neg_inf, 0.0, c_max)
    c_l = tl.sum(tl.exp2(s_col - c_safe[None, :]), 0)
    c_sd = tl.sum(tl.where(den_c, qk, 0.0), 0)
    p0 = c_sd  # placeholders of the absent fields (never stored)
    p1 = c_sd
    cnt = c_sd
    c_l2 = c_sd
    if HAS_LSE2:
        c_l2 = tl.sum(tl.exp2(lse2_mult * (s_col - c_safe[None, :])), 0)
    if HAS_POS:
        if POS_LSE:
            s_pos = tl.where(pos_c, s2, neg_inf)
            p0 = tl.max(s_pos, 0)
            p_safe = tl.where(p0 == neg_inf, 0.0, p0)
            p1 = tl.sum(tl.exp2(s_pos - p_safe[None, :]), 0)
        else:
            p0 = tl.sum(tl.where(pos_c, qk, 0.0), 0)
        if HAS_LABELS:
            cnt = tl.sum(pos_c.to(tl.float32), 0)
    _store_state(P, cp, P_FSTRIDE, n_in, c_max, c_l, c_sd, p0, p1, cnt, c_l2, HAS_POS, POS_LSE,
                 HAS_LABELS, HAS_LSE2)


@triton.jit
def _merge_partials_kernel(
    P, ST, O0, N_PARTS, C_END, NB, P_FSTRIDE, ST_FSTRIDE, lse2_mult,
    HAS_POS: tl.constexpr, POS_LSE: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_LSE2: tl.constexpr, BELOW: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the ``N_PARTS`` rows of partials ``P`` of a slab into the states ``ST`` of the
    columns ``[0, C_END)``: ``COL_PARTIALS`` (every row valid for every column), or with
    ``BELOW`` those of ``SELF``, row ``p`` from the row block starting at ``O0 + p * ROWS``,
    written for the columns below that start only."""
    pid = tl.program_id(0)
    c0 = pid * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_in = offs_c < C_END
    offs_c64 = offs_c.to(tl.int64)
    m, l, sd, p0, p1, cnt, l2 = _load_state(ST, offs_c64, ST_FSTRIDE, c_in, HAS_POS, POS_LSE,
                                            HAS_LABELS, HAS_LSE2)
    p_lo = 0
    if BELOW:
        p_lo = tl.where(c0 < O0, 0, (c0 - O0) // ROWS + 1)  # the first row block below c0
    for p in range(p_lo, N_PARTS):
        valid = c_in
        if BELOW:
            valid = valid & (offs_c < O0 + p * ROWS)
        pm, pl, psd, pp0, pp1, pcnt, pl2 = _load_state(P, offs_c64 + p * NB, P_FSTRIDE, valid,
                                                       HAS_POS, POS_LSE, HAS_LABELS, HAS_LSE2)
        m_old = m
        m, l = _merge_lse(m, l, pm, pl)
        if HAS_LSE2:
            l2 = _rescale_lse2(l2, m_old, m, lse2_mult) + _rescale_lse2(pl2, pm, m, lse2_mult)
        sd += psd
        if POS_LSE:
            p0, p1 = _merge_lse(p0, p1, pp0, pp1)
        else:
            p0 += pp0
        cnt += pcnt
    _store_state(ST, offs_c64, ST_FSTRIDE, c_in, m, l, sd, p0, p1, cnt, l2, HAS_POS, POS_LSE,
                 HAS_LABELS, HAS_LSE2)


@triton.jit
def _finalize_kernel(
    ST, ST_FSTRIDE, tgt_ptr, scale_ptr, bias_ptr, lse_ptr, pos_ptr, npos_ptr, mean_ptr, lse2_ptr,
    NA, NB, lse2_mult,
    HAS_TARGETS: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
    DECOUPLED: tl.constexpr, POS_LSE: tl.constexpr, WRITE_POS: tl.constexpr,
    HAS_LSE2: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The statistics of the ``NA`` rows (or columns) of ``[NA, NB]`` logits from their merged
    online states ``ST``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < NA
    HAS_POS: tl.constexpr = HAS_TARGETS or HAS_LABELS
    m, l, sd, p0, p1, cnt, l2 = _load_state(ST, offs_m.to(tl.int64), ST_FSTRIDE, m_in, HAS_POS,
                                            POS_LSE, HAS_LABELS, HAS_LSE2)
    tgt = offs_m
    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + offs_m, mask=m_in, other=-1).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    _finalize_rows(m, l, sd, p0, p1, p0, cnt, l2, offs_m, m_in, tgt, NB, scale, bias, lse_ptr,
                   pos_ptr, npos_ptr, mean_ptr, lse2_ptr, lse2_mult, HAS_TARGETS, HAS_LABELS,
                   EXCLUDE_DIAG, DECOUPLED, POS_LSE, WRITE_POS, HAS_LSE2, BLOCK_M)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _contrastive_bwd_kernel(
    A, B, OUT, scale_ptr, bias_ptr, tgt_ptr, rlab_ptr, clab_ptr,
    lse_ptr, pos_ptr, npos_ptr, col_lse_ptr,
    g_lse_ptr, g_pos_ptr, g_mean_ptr, g_col_lse_ptr, g_col_mean_ptr, g_mul_ptr,
    l2_ptr, g_l2_ptr, lse2_mult, ds_ptr, db_ptr,
    O0, O_END, PART_STRIDE, NA, NB, D,
    stride_am, stride_ad, stride_bn, stride_bd, stride_om, stride_od,
    TRANSPOSED: tl.constexpr, SELF: tl.constexpr, STORE_G: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
    DECOUPLED: tl.constexpr, POS_LSE: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_POS: tl.constexpr, HAS_G_MEAN: tl.constexpr,
    HAS_G_COL_LSE: tl.constexpr, HAS_G_COL_MEAN: tl.constexpr, HAS_G_LSE2: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr, RESCALE_G: tl.constexpr, TF32: tl.constexpr,
    SINGLE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``OUT[outer, slice] = scale * sum_inner G(outer, inner) B[inner, slice]``, or ``G`` itself.

    ``TRANSPOSED=False``: ``A = q`` (outer = rows of ``s``), ``B = k``, ``OUT = dq``.
    ``TRANSPOSED=True``: ``A = k`` (outer = columns of ``s``), ``B = q``, ``OUT = dk``.
    ``SELF`` (with ``TRANSPOSED=False``): ``A = B = q`` (the keys are the queries, so ``s`` is
    symmetric) and ``OUT`` receives the whole gradient of ``q``, ``G + G.T`` per tile: both
    orientations of ``G`` from one logit tile (the partial sums count ``G`` once).
    The outer rows are ``[O0, O_END)`` (the whole of ``A`` except in ``STORE_G``).
    Program ``(i, j)`` owns outer rows ``O0 + [i*BLOCK_M, (i+1)*BLOCK_M)`` and output columns
    ``[j*BLOCK_DV, (j+1)*BLOCK_DV)``. With ``SINGLE_D`` the whole of ``D`` fits one
    ``BLOCK_D == BLOCK_DV`` tile and the ``B`` tile of the logits is reused for the update.
    ``STORE_G`` (one slab of outer rows, see ``_bwd_slabs``): program ``(i, j)`` (from one
    grouped program id) computes the single tile ``(i, j)`` of ``G`` (``SELF``: of ``G + G.T``,
    on the columns below ``O_END`` only, the blocks on and below the diagonal) and writes it,
    times ``*g_mul``, to ``OUT[outer - O0, inner]`` in ``OUT``'s dtype; the product with ``B``
    is left to a GEMM, and the partial sums go to ``ds_ptr[j * PART_STRIDE + outer - O0]``
    (``SELF``: ``G`` on its columns and ``G.T`` on those below ``O0``, so that the slabs count
    every entry of ``G`` once).
    ``RESCALE_G`` (fp16 inputs): ``G`` is multiplied by ``*g_mul``, a power of two that maps
    the bound of ``|G|`` near 2**14 (``_g_multiplier``), before its cast to fp16, and divided
    out of the fp32 accumulator, so small upstream gradients neither underflow nor overflow
    fp16.
    """
    # SELF by slabs: the columns below the slab's end only (the blocks on and below the
    # diagonal), whose tiles of G + G.T give the whole gradient by two GEMMs (_bwd_slabs)
    if SELF and STORE_G:
        n_end = O_END
    else:
        n_end = NB
    pid, pid_1, n_lo, n_hi = _program_tiles(O0, O_END, n_end, STORE_G, BLOCK_M, BLOCK_N, GROUP_M)
    if TRANSPOSED:
        R = NB
        C = NA
    else:
        R = NA
        C = NB
    offs_o = O0 + pid * BLOCK_M + tl.arange(0, BLOCK_M)
    o_in = offs_o < O_END
    a_rows = offs_o.to(tl.int64) * stride_am
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    offs_v = pid_1 * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_in = offs_v < D
    offs_v64 = offs_v.to(tl.int64)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    scale2 = scale * _LOG2E
    bias2 = bias * _LOG2E

    if SINGLE_D:
        a_tile = tl.load(A + a_rows[:, None] + offs_d64[None, :] * stride_ad,
                         mask=o_in[:, None] & d_in[None, :], other=0.0)

    # statistics of the outer index, loaded once
    if TRANSPOSED or SELF:
        g_cl_o, cl2_o, g_cm_o, clab_o = _col_coefs(
            offs_o, o_in, R, col_lse_ptr, g_col_lse_ptr, g_col_mean_ptr, clab_ptr,
            HAS_LABELS, EXCLUDE_DIAG, HAS_G_COL_LSE, HAS_G_COL_MEAN)
    if not TRANSPOSED:
        g_l_o, lse2_o, g_p_o, pos2_o, g_m_o, tgt_o, rlab_o, g_l2_o, l2_o = _row_coefs(
            offs_o, o_in, C, lse_ptr, pos_ptr, npos_ptr, g_lse_ptr, g_pos_ptr, g_mean_ptr,
            tgt_ptr, rlab_ptr, l2_ptr, g_l2_ptr, lse2_mult, HAS_TARGETS, HAS_LABELS,
            EXCLUDE_DIAG, DECOUPLED, POS_LSE, HAS_G_LSE, HAS_G_POS, HAS_G_MEAN, HAS_G_LSE2)

    if RESCALE_G:
        g_mul = tl.load(g_mul_ptr).to(tl.float32)
    else:
        g_mul = 1.0

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    ds_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < n_end
        b_rows = offs_n.to(tl.int64) * stride_bn
        if SINGLE_D:
            b_tile = tl.load(B + b_rows[:, None] + offs_d64[None, :] * stride_bd,
                             mask=n_in[:, None] & d_in[None, :], other=0.0)
            qk = _mma(a_tile, tl.trans(b_tile), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                      TF32)
        else:
            qk = _qk_chunked(A, B, a_rows, o_in, b_rows, n_in, D, stride_ad, stride_bd,
                             BLOCK_M, BLOCK_N, BLOCK_D, TF32)
        s2 = qk * scale2 + bias2

        if TRANSPOSED or SELF:  # G of the inner rows against the outer columns
            g_l, lse2, g_p, pos2, g_m, tgt, rlab, g_l2, l2 = _row_coefs(
                offs_n, n_in, C, lse_ptr, pos_ptr, npos_ptr, g_lse_ptr, g_pos_ptr, g_mean_ptr,
                tgt_ptr, rlab_ptr, l2_ptr, g_l2_ptr, lse2_mult, HAS_TARGETS, HAS_LABELS,
                EXCLUDE_DIAG, DECOUPLED, POS_LSE, HAS_G_LSE, HAS_G_POS, HAS_G_MEAN, HAS_G_LSE2)
            g_t = _grad_tile(
                s2, offs_n[None, :], offs_o[:, None], n_in[None, :], o_in[:, None],
                g_l[None, :], lse2[None, :], g_p[None, :], pos2[None, :], g_m[None, :],
                tgt[None, :], rlab[None, :], g_l2[None, :], l2[None, :], lse2_mult,
                g_cl_o[:, None], cl2_o[:, None], g_cm_o[:, None], clab_o[:, None],
                HAS_TARGETS, HAS_LABELS, EXCLUDE_DIAG, DECOUPLED, POS_LSE, HAS_G_LSE,
                HAS_G_POS, HAS_G_MEAN, HAS_G_COL_LSE, HAS_G_COL_MEAN, HAS_G_LSE2)
        if TRANSPOSED:
            g = g_t
        else:
            g_cl, cl2, g_cm, clab = _col_coefs(
                offs_n, n_in, R, col_lse_ptr, g_col_lse_ptr, g_col_mean_ptr, clab_ptr,
                HAS_LABELS, EXCLUDE_DIAG, HAS_G_COL_LSE, HAS_G_COL_MEAN)
            g = _grad_tile(
                s2, offs_o[:, None], offs_n[None, :], o_in[:, None], n_in[None, :],
                g_l_o[:, None], lse2_o[:, None], g_p_o[:, None], pos2_o[:, None],
                g_m_o[:, None], tgt_o[:, None], rlab_o[:, None], g_l2_o[:, None],
                l2_o[:, None], lse2_mult,
                g_cl[None, :], cl2[None, :], g_cm[None, :], clab[None, :],
                HAS_TARGETS, HAS_LABELS, EXCLUDE_DIAG, DECOUPLED, POS_LSE, HAS_G_LSE,
                HAS_G_POS, HAS_G_MEAN, HAS_G_COL_LSE, HAS_G_COL_MEAN, HAS_G_LSE2)

        if WRITE_PARTIALS:
            ds_acc += tl.sum(g * qk, 1)
            db_acc += tl.sum(g, 1)
            if SELF and STORE_G:  # G.T of the blocks above the diagonal: counted here only
                g_above = tl.where(offs_n[None, :] < O0, g_t, 0.0)
                ds_acc += tl.sum(g_above * qk, 1)
                db_acc += tl.sum(g_above, 1)
        if SELF:
            g = g + g_t

        acc = _emit_g(acc, g, g_mul, OUT, offs_o - O0, o_in, offs_n, n_in, stride_om, stride_od,
                      b_tile if SINGLE_D else None, B, b_rows, offs_v64, v_in, stride_bd,
                      STORE_G, SINGLE_D, RESCALE_G, TF32, BLOCK_D, BLOCK_DV)

    if not STORE_G:
        out = acc * (scale / g_mul)
        o_rows = offs_o.to(tl.int64) * stride_om
        tl.store(OUT + o_rows[:, None] + offs_v64[None, :] * stride_od,
                 out.to(OUT.dtype.element_ty), mask=o_in[:, None] & v_in[None, :])
    if WRITE_PARTIALS:
        if STORE_G:  # per row and inner tile, summed on the host
            part = pid_1 * PART_STRIDE + (offs_o - O0)
            tl.store(ds_ptr + part, ds_acc, mask=o_in)
            tl.store(db_ptr + part, db_acc, mask=o_in)
        elif pid_1 == 0:  # the per-row sums once, from the first output slice
            tl.store(ds_ptr + offs_o, ds_acc, mask=o_in)
            tl.store(db_ptr + offs_o, db_acc, mask=o_in)


# --------------------------------------------------------------------------------------------
# block sizes and autotuning
# --------------------------------------------------------------------------------------------

# Under the interpreter: one small configuration. D <= _INTERP_RESIDENT_D keeps the whole
# feature dimension in one tile; wider D exercises the chunked paths (D loop, BLOCK_DV slices).
_INTERP_BLOCK = 16
_INTERP_RESIDENT_D = 32
_INTERP_BLOCK_DV = 32

# On a GPU there are two families of tiles. "mma": fp16 / bf16 inputs, and fp32 inputs with
# ALLOW_TF32 (tensor cores). "fma": fp32 inputs in exact fp32 (CUDA cores; smaller tiles, or the
# fp32 tl.dot spills). Per family: D up to RESIDENT_D is one tile of A held for the whole loop
# (BLOCK_D = next power of two of D); wider D loops over BLOCK_D chunks (the GEMM k-loop,
# software pipelined by num_stages) and the backward splits the output over BLOCK_DV slices.
_FAMILY = {
    # family: (RESIDENT_D, BLOCK_D for 2-byte inputs, BLOCK_D for 4-byte inputs)
    "mma": (128, 64, 32),
    "fma": (32, 16, 16),
}


def _cfg(bm, bn, w, s, dv=None):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn}
    if dv is not None:
        kw["BLOCK_DV"] = dv
    return triton.Config(kw, num_warps=w, num_stages=s)


_CONFIGS = {
    ("fwd", "mma"): [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 128, 4, 3),
                     _cfg(128, 64, 4, 4), _cfg(64, 64, 4, 4), _cfg(128, 128, 8, 2),
                     _cfg(64, 64, 4, 2)],
    ("fwd", "fma"): [_cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(128, 64, 8, 2),
                     _cfg(64, 64, 8, 2)],
    ("bwd_single", "mma"): [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2), _cfg(128, 32, 8, 3),
                            _cfg(64, 128, 8, 2), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    ("bwd_single", "fma"): [_cfg(64, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2)],
    ("bwd_chunked", "mma"): [_cfg(64, 64, 8, 2, 256), _cfg(128, 64, 8, 2, 128),
                             _cfg(64, 64, 4, 3, 128), _cfg(128, 64, 8, 2, 256),
                             _cfg(64, 128, 8, 2, 256), _cfg(64, 64, 8, 2, 512),
                             _cfg(64, 32, 8, 2, 512), _cfg(64, 64, 4, 3, 64)],
    ("bwd_chunked", "fma"): [_cfg(64, 32, 4, 2, 64), _cfg(64, 32, 8, 2, 128),
                             _cfg(32, 64, 4, 2, 128), _cfg(64, 64, 8, 2, 64)],
    # the forward with column partials (COL_PARTIALS): BLOCK_M fixed per family, as the
    # partials are laid out per row block (_COLS_BLOCK_M)
    ("fwd_cols", "mma"): [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 4),
                          _cfg(128, 128, 8, 2)],
    ("fwd_cols", "fma"): [_cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2)],
    # one tile of G per program (STORE_G); BLOCK_N is fixed per family, as the partial sums
    # are laid out per inner tile (_GRAD_BLOCK_N)
    ("grad", "mma"): [_cfg(64, 128, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 128, 4, 3),
                      _cfg(64, 128, 8, 4), _cfg(128, 128, 8, 4)],
    ("grad", "fma"): [_cfg(32, 64, 4, 2), _cfg(64, 64, 4, 2), _cfg(64, 64, 8, 2)],
    # the element-wise passes of the self-similarity forward (_fwd_self), one configuration
    # each: the merge updates its states in place, which a benchmarking autotuner would repeat
    ("merge", "all"): [triton.Config({"BLOCK_C": 256}, num_warps=4, num_stages=1)],
    ("finalize", "all"): [triton.Config({"BLOCK_M": 256}, num_warps=4, num_stages=1)],
}

#: BLOCK_N of the STORE_G launches per family (every configuration of ("grad", family) has it)
#: and BLOCK_M of the forward with COL_PARTIALS (one row of column partials per row block)
_GRAD_BLOCK_N = {"mma": 128, "fma": 64}
_COLS_BLOCK_M = {"mma": 128, "fma": 64}
assert all(c.kwargs["BLOCK_N"] == _GRAD_BLOCK_N[f]
           for (kind, f), cs in _CONFIGS.items() if kind == "grad" for c in cs)
assert all(c.kwargs["BLOCK_M"] == _COLS_BLOCK_M[f]
           for (kind, f), cs in _CONFIGS.items() if kind == "fwd_cols" for c in cs)
assert len(_CONFIGS["merge", "all"]) == len(_CONFIGS["finalize", "all"]) == 1
_GROUP_M = 8


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def _prune_chunked(configs, named_args, **kwargs):
    """Drop output slices wider than D needs (the grid has ceil(D / BLOCK_DV) of them)."""
    limit = _pow2(named_args["D"], 64)
    keep = [c for c in configs if c.kwargs["BLOCK_DV"] <= limit]
    return keep or configs[-1:]


_FWD_KEYS = ["D", "HAS_TARGETS", "HAS_LABELS", "EXCLUDE_DIAG", "DECOUPLED", "POS_LSE",
             "WRITE_POS", "HAS_LSE2", "COL_PARTIALS", "SELF", "TF32", "SINGLE_D", "BLOCK_D"]
_BWD_KEYS = ["D", "HAS_TARGETS", "HAS_LABELS", "EXCLUDE_DIAG", "DECOUPLED", "POS_LSE",
             "TRANSPOSED", "SELF", "STORE_G", "HAS_G_LSE", "HAS_G_POS", "HAS_G_MEAN",
             "HAS_G_COL_LSE", "HAS_G_COL_MEAN", "HAS_G_LSE2", "TF32", "SINGLE_D", "BLOCK_D"]

# autotuned launchers, one per (kernel, tiling family); the autotuner also keys on dtypes
_TUNED = {}
for (_kind, _family), _configs in _CONFIGS.items():
    if _kind in ("fwd", "fwd_cols"):
        _TUNED[_kind, _family] = triton.autotune(_configs, key=_FWD_KEYS)(
            _contrastive_fwd_kernel)
    elif _kind in ("bwd_single", "grad"):
        _TUNED[_kind, _family] = triton.autotune(_configs, key=_BWD_KEYS)(
            _contrastive_bwd_kernel)
    elif _kind == "merge":
        _TUNED[_kind, _family] = triton.autotune(
            _configs, key=["HAS_POS", "POS_LSE", "HAS_LABELS", "HAS_LSE2", "BELOW", "ROWS"])(
                _merge_partials_kernel)
    elif _kind == "finalize":
        _TUNED[_kind, _family] = triton.autotune(
            _configs, key=["HAS_TARGETS", "HAS_LABELS", "EXCLUDE_DIAG", "DECOUPLED",
                           "POS_LSE", "WRITE_POS", "HAS_LSE2"])(_finalize_kernel)
    else:
        _TUNED[_kind, _family] = triton.autotune(
            _configs, key=_BWD_KEYS, prune_configs_by={"early_config_prune": _prune_chunked})(
            _contrastive_bwd_kernel)


def _tiling(D: int, dtype: torch.dtype, tf32: bool):
    """``(family, SINGLE_D, BLOCK_D)``; the forward and the backward's logits share them."""
    if _INTERPRET:
        if D <= _INTERP_RESIDENT_D:
            return "interp", True, _pow2(D)
        return "interp", False, _INTERP_BLOCK
    family = "fma" if dtype == torch.float32 and not tf32 else "mma"
    resident_d, bd2, bd4 = _FAMILY[family]
    if D <= resident_d:
        return family, True, _pow2(D)
    return family, False, (bd2 if dtype.itemsize <= 2 else bd4)


# --------------------------------------------------------------------------------------------
# launch wrappers
# --------------------------------------------------------------------------------------------

def _vec(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """A per-row / per-column vector as a dense tensor, or ``dummy`` (never read) when absent."""
    return dummy if t is None else t.contiguous()


def _launch(kind, family, kernel, grid, args, flags, table=None):
    """Launch on a GPU: autotuned (through ``table``, this module's ``_TUNED`` by default), or
    the first configuration of ``_CONFIGS[kind, family]`` that suits ``D``."""
    with torch.cuda.device(args[0].device):
        if AUTOTUNE:
            (_TUNED if table is None else table)[kind, family][grid](*args, **flags)
            return
        configs = _CONFIGS[kind, family]
        if kind == "bwd_chunked":
            configs = _prune_chunked(configs, {"D": args[kernel.arg_names.index("D")]})
        cfg = configs[0]
        kernel[grid(cfg.kwargs)](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)


def _launch_fwd(a, b, scale, bias, tgt, rlab, clab, lse, pos, npos, mean, flags,
                o0=0, o_end=None, parts=None, state=None, lse2=None, lse2_mult=0.0):
    """Row statistics of the rows ``[o0, o_end)`` of ``a`` (all by default). With ``parts``
    (``[fields, blocks, NB]`` fp32) also the column partials of each row block:
    ``COL_PARTIALS``, or with ``state`` (``[fields, NA]`` fp32) ``SELF``, where the rows' online
    states go to ``state`` instead of the statistics. ``HAS_LSE2`` in ``flags``: ``lse2`` at
    ``lse2_mult`` too."""
    NA, D = a.shape
    NB = b.shape[0]
    o_end = NA if o_end is None else o_end
    if o_end <= o0:
        return
    tf32 = bool(ALLOW_TF32)
    family, single, block_d = _tiling(D, a.dtype, tf32)
    self_sim = state is not None
    p = lse if parts is None else parts
    st = state if self_sim else lse
    args = (a, b, scale, bias, tgt, rlab, clab, lse, pos, npos, mean,
            lse if lse2 is None else lse2, p, st, o0, o_end, NB, D,
            p.stride(0) if parts is not None else 0, st.stride(0) if self_sim else 0,
            float(lse2_mult), a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    flags = dict(flags, COL_PARTIALS=parts is not None and not self_sim, SELF=self_sim,
                 TF32=tf32, SINGLE_D=single, BLOCK_D=block_d)
    if _INTERPRET:
        grid = (triton.cdiv(o_end - o0, _INTERP_BLOCK),)
        _contrastive_fwd_kernel[grid](*args, **flags, BLOCK_M=_INTERP_BLOCK,
                                      BLOCK_N=_INTERP_BLOCK)
        return
    _launch("fwd" if parts is None else "fwd_cols", family, _contrastive_fwd_kernel,
            lambda meta: (triton.cdiv(o_end - o0, meta["BLOCK_M"]),), args, flags)


#: The forward takes the column statistics from per-slab partials (and the self-similarity
#: forward the half square) only when a slab has at least this many row blocks (or all of
#: them): fewer programs would leave the GPU idle, and the second launch over the columns (the
#: full square) is used instead.
_MIN_COL_PROGRAMS = 128


def _partials_block_m(q) -> int:
    """The rows of a block of the forward launches that write partials (``_COLS_BLOCK_M``)."""
    family = _tiling(q.shape[1], q.dtype, bool(ALLOW_TF32))[0]
    return _INTERP_BLOCK if _INTERPRET else _COLS_BLOCK_M[family]


def _partial_blocks(all_blocks: int, fields: int, cols: int) -> Optional[int]:
    """Row blocks per slab whose ``[fields, blocks, cols]`` fp32 partials fit ``SLAB_BYTES``
    (and whose row offsets ``blocks * cols`` fit 32 bits), or None when a slab would have
    fewer than ``_MIN_COL_PROGRAMS`` of the ``all_blocks`` row blocks."""
    budget = _env_int("FASTCL_TRITON_SLAB_BYTES", SLAB_BYTES)
    cols = max(cols, 1)
    blocks = min(all_blocks, max(1, budget // (4 * fields * cols)), (2 ** 31 - 1) // cols)
    return None if blocks < min(all_blocks, _MIN_COL_PROGRAMS) else blocks


def _fwd_col_partials(q, k, scale, bias, tgt, rlab, clab, lse, pos, npos, mean, flags,
                      exclude_diag, lse2=None, lse2_mult=0.0):
    """Row statistics and ``(col_lse, col_mean)`` in one pass over the logits, or None.

    By slabs of rows: each launch writes the column statistics of every row block of the slab
    (``[blocks, C]`` partials within ``SLAB_BYTES``), merged into running per-column states
    (max, sum of ``exp2``, sum of ``q . k``) after each slab by ``_merge_partials_kernel``, as
    the online log-sum-exp merges tiles; ``_finalize_kernel`` then gives the statistics. None
    when a slab would have fewer than ``_MIN_COL_PROGRAMS`` row blocks (and more rows remain):
    the caller then launches the columns as rows of ``k @ q.T``.
    """
    R, C = q.shape[0], k.shape[0]
    if R == 0:
        return None
    block_m = _partials_block_m(q)
    blocks = _partial_blocks(triton.cdiv(R, block_m), 3, C)
    if blocks is None:
        return None
    f32 = torch.float32
    dev = q.device
    parts = torch.empty((3, blocks, C), dtype=f32, device=dev)  # the fields m, l, sd
    state = torch.zeros((3, C), dtype=f32, device=dev)          # the columns' states
    state[0] = float("-inf")
    layout = dict(HAS_POS=False, POS_LSE=False, HAS_LABELS=False, HAS_LSE2=False, BELOW=False,
                  ROWS=block_m)
    rows = blocks * block_m
    for o0 in range(0, R, rows):
        o_end = min(R, o0 + rows)
        _launch_fwd(q, k, scale, bias, tgt, rlab, clab, lse, pos, npos, mean, flags,
                    o0, o_end, parts, lse2=lse2, lse2_mult=lse2_mult)
        n = triton.cdiv(o_end - o0, block_m)
        if C > 0:
            _launch_elementwise(
                "merge", _merge_partials_kernel, C, "BLOCK_C",
                (parts, state, o0, n, C, C, parts.stride(0), state.stride(0), 0.0), layout)
    col_lse = torch.empty(C, dtype=f32, device=dev)
    col_mean = torch.empty(C, dtype=f32, device=dev)
    if C > 0:  # the columns as the rows of k @ q.T, with the row counts of the columns
        _launch_elementwise(
            "finalize", _finalize_kernel, C, "BLOCK_M",
            (state, state.stride(0), lse, scale, bias, col_lse, col_lse, col_lse, col_mean,
             col_lse, C, R, 0.0),
            dict(HAS_TARGETS=False, HAS_LABELS=False, EXCLUDE_DIAG=bool(exclude_diag),
                 DECOUPLED=False, POS_LSE=False, WRITE_POS=False, HAS_LSE2=False))
    return col_lse, col_mean


def _state_fields(has_pos: bool, pos_lse: bool, has_labels: bool, has_lse2: bool) -> int:
    """How many fields :func:`_store_state` writes."""
    return 3 + (1 + int(pos_lse)) * int(has_pos) + int(has_labels) + int(has_lse2)


def _half_square_pays(row_blocks: int, sms: Optional[int]) -> bool:
    """Whether the self-similarity forward over the half square beats the full square.

    A program of either walks the columns of one row block: all of them in the full square, up
    to its diagonal block in the half, so the half's longest program (the last row block) takes
    as long as every program of the full square. The half square wins (up to twice as fast)
    only when the full square's programs take more than one wave, that is when there are more
    row blocks than multiprocessors (``sms``; one program of ``_COLS_BLOCK_M`` rows fills one);
    otherwise both take one program's time, plus the half's transposed statistics and its
    merge. The environment variable ``FASTCL_TRITON_SELF_FWD=2`` takes the half square
    whatever the size (``0``: never; ``1``, the default: when it pays). Always under the
    interpreter (``sms=None``).
    """
    if sms is None or _env_int("FASTCL_TRITON_SELF_FWD", 1) == 2:
        return True
    return row_blocks > sms


def _fwd_self(q, scale, bias, tgt, rlab, clab, lse, pos, npos, mean, flags, lse2=None,
              lse2_mult=0.0):
    """Row statistics of the symmetric logits ``scale * q @ q.T + bias`` from the blocks on and
    below the diagonal only (half the logits of the full square), or False.

    By slabs of row blocks, in order: one ``SELF`` launch writes the online states of the
    slab's rows and, from each tile below the diagonal block, the partial states of its columns
    as rows (``[fields, blocks, N]`` within ``SLAB_BYTES``); ``_merge_partials_kernel`` then
    merges them into the states of the columns (rows of this slab or of earlier ones, whose
    states are written by then). Once every slab is in, ``_finalize_kernel`` turns the states
    into the statistics. False when a slab would have fewer than ``_MIN_COL_PROGRAMS`` row
    blocks (and more rows remain), or when the half square would not pay
    (:func:`_half_square_pays`): the caller then computes the full square.
    """
    N = q.shape[0]
    block_m = _partials_block_m(q)
    all_blocks = triton.cdiv(N, block_m)
    sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
           if q.device.type == "cuda" and not _INTERPRET else None)
    if not _half_square_pays(all_blocks, sms):
        return False
    has_pos = flags["HAS_TARGETS"] or flags["HAS_LABELS"]
    layout = dict(HAS_POS=has_pos, POS_LSE=flags["POS_LSE"], HAS_LABELS=flags["HAS_LABELS"],
                  HAS_LSE2=flags["HAS_LSE2"])
    fields = _state_fields(*layout.values())
    blocks = _partial_blocks(all_blocks, fields, N)
    if blocks is None:
        return False
    dev = q.device
    state = torch.empty((fields, N), dtype=torch.float32, device=dev)
    parts = torch.empty((fields, blocks, N), dtype=torch.float32, device=dev)
    rows = blocks * block_m
    for o0 in range(0, N, rows):
        o_end = min(N, o0 + rows)
        _launch_fwd(q, q, scale, bias, tgt, rlab, clab, lse, pos, npos, mean, flags, o0, o_end,
                    parts, state, lse2, lse2_mult)
        n = triton.cdiv(o_end - o0, block_m)
        c_end = o0 + (n - 1) * block_m  # the columns below the slab's last row block
        if c_end > 0:
            _launch_elementwise(
                "merge", _merge_partials_kernel, c_end, "BLOCK_C",
                (parts, state, o0, n, c_end, N, parts.stride(0), state.stride(0),
                 float(lse2_mult)),
                dict(layout, BELOW=True, ROWS=block_m))
    _launch_elementwise(
        "finalize", _finalize_kernel, N, "BLOCK_M",
        (state, state.stride(0), tgt, scale, bias, lse, pos, npos, mean,
         lse if lse2 is None else lse2, N, N, float(lse2_mult)),
        dict({name: flags[name] for name in ("HAS_TARGETS", "HAS_LABELS", "EXCLUDE_DIAG",
                                             "DECOUPLED", "POS_LSE", "HAS_LSE2")},
             WRITE_POS=True))
    return True


def _launch_elementwise(kind, kernel, n, block, args, flags):
    """A one-dimensional launch over ``n`` elements, ``block`` (a constexpr) per program."""
    if _INTERPRET:
        kernel[(triton.cdiv(n, _INTERP_BLOCK),)](*args, **flags, **{block: _INTERP_BLOCK})
        return
    _launch(kind, "all", kernel, lambda meta: (triton.cdiv(n, meta[block]),), args, flags)


def _launch_bwd(a, b, out, rest, parts, flags):
    """``out = scale * G @ b`` (the outer rows of ``G`` are the rows of ``a``) in one launch."""
    NA, D = a.shape
    NB = b.shape[0]
    if NA == 0:
        return
    tf32 = bool(ALLOW_TF32)
    family, single, block_d = _tiling(D, a.dtype, tf32)
    args = (a, b, out, *rest, *parts, 0, NA, 0, NA, NB, D,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    flags = dict(flags, STORE_G=False, TF32=tf32, SINGLE_D=single, BLOCK_D=block_d,
                 GROUP_M=_GROUP_M)
    if _INTERPRET:
        block_dv = block_d if single else _INTERP_BLOCK_DV
        grid = (triton.cdiv(NA, _INTERP_BLOCK), max(1, triton.cdiv(D, block_dv)))
        _contrastive_bwd_kernel[grid](*args, **flags, BLOCK_M=_INTERP_BLOCK,
                                      BLOCK_N=_INTERP_BLOCK, BLOCK_DV=block_dv)
    elif single:
        _launch("bwd_single", family, _contrastive_bwd_kernel,
                lambda meta: (triton.cdiv(NA, meta["BLOCK_M"]), 1),
                args, dict(flags, BLOCK_DV=block_d))
    else:
        _launch("bwd_chunked", family, _contrastive_bwd_kernel,
                lambda meta: (triton.cdiv(NA, meta["BLOCK_M"]),
                              max(1, triton.cdiv(D, meta["BLOCK_DV"]))),
                args, flags)


# --------------------------------------------------------------------------------------------
# the schedule by slabs (wide D)
# --------------------------------------------------------------------------------------------

#: Feature widths from which the schedule goes by slabs of rows, per tiling family: the
#: backward materializes ``G`` one slab at a time and leaves its products to GEMMs
#: (``_bwd_slabs``), and the forward takes the column statistics from per-slab partials of the
#: row pass (``_fwd_col_partials``); below, the one-launch kernels, which recompute the logits
#: once per ``BLOCK_DV`` slice of the output, and a second forward launch over the columns.
#: The environment variable ``FASTCL_TRITON_SLAB_MIN_D`` (read at each call) sets both.
SLAB_MIN_D = {"mma": 512, "fma": 128}

#: Byte budget of a slab of ``G`` (rows x columns in the inputs' dtype) and of the forward's
#: column partials; the environment variable ``FASTCL_TRITON_SLAB_BYTES`` (read at each call)
#: overrides it. It does not grow with the number of rows.
SLAB_BYTES = 256 << 20

#: Whether the backward by slabs of rows also accumulates the gradient of the columns from them
#: (``dk += G_slab.T @ q_slab``: GEMMs into an fp32 ``C x D`` buffer, ``4 C D`` more bytes for
#: 16-bit inputs) instead of a second sweep over slabs of columns that recomputes the logits:
#: one logit recompute per backward instead of two. The environment variable
#: ``FASTCL_TRITON_SLAB_ACCUMULATE`` (``1`` / ``0``, read at each call) overrides it.
SLAB_ACCUMULATE = False

_ROW_PAD = 8  # slab rows padded to 16-byte multiples (GEMM operand alignment)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _use_slabs(D: int, dtype: torch.dtype) -> bool:
    family = _tiling(D, dtype, bool(ALLOW_TF32))[0]
    limit = SLAB_MIN_D["fma" if family == "fma" else "mma"]
    return D >= _env_int("FASTCL_TRITON_SLAB_MIN_D", limit)


def _slab_accumulate() -> bool:
    return _env_int("FASTCL_TRITON_SLAB_ACCUMULATE", int(SLAB_ACCUMULATE)) != 0


def _g_multiplier(bound: torch.Tensor) -> torch.Tensor:
    """The power of two that maps ``bound`` (an upper bound of ``|G|``) near 2**14 (fp16 G)."""
    g_exp = 14.0 - torch.ceil(torch.log2(bound.float().clamp_min(1e-30)))
    return torch.exp2(g_exp.clamp(-100.0, 100.0))


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=float32) works for 16-bit CUDA operands
_ADDMM_OUT_DTYPE = [True]  # so does torch.addmm(..., out_dtype=float32)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (16-bit operands are not rounded to 16 bits
    at the output; their products are exact in fp32)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return a.float() @ b.float()


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` (16-bit operands accumulated in fp32)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[0] = False
    acc.add_(_mm_f32(a, b))


def _bwd_slabs(a, b, out, scale, g_mul, flags, n_parts, kernel, table, head, out_b=None):
    """``out = scale * (G @ b)``, one slab of outer rows (rows of ``a``) at a time.

    Per slab of ``S`` rows (``S x C`` in the inputs' dtype within ``SLAB_BYTES``), one launch of
    ``kernel`` in its ``STORE_G`` mode (autotuned over ``table["grad", family]``; its arguments
    are ``head(g_slab, parts)``, then ``O0, O_END, PART_STRIDE, NA, NB, D`` and the strides of
    ``a``, ``b`` and the slab): one program per tile of ``G * g_mul`` (the logits recomputed
    once), written to ``g_slab[: s]``, and ``n_parts`` per-row partial sums per inner tile of
    ``BLOCK_N`` columns to ``parts[p, tile, : s]``. Then one GEMM multiplies the slab by ``b``
    in fp32 and the rows of ``out`` are written once, times ``scale / g_mul``. Logit work: one
    recompute per orientation, whatever ``D``, against ``ceil(D / BLOCK_DV)`` for the
    one-launch kernels. With ``out_b`` (shaped like ``b``), the other orientation too:
    ``out_b = scale * (G.T @ a)``, the slabs' products ``slab.T @ a_slab`` accumulated in fp32
    (in ``out_b`` itself when it is fp32 and contiguous), so that no second sweep is needed.
    With ``SELF`` in ``flags`` (``a`` and ``b`` both ``q``, the logits symmetric) the slab of
    rows ``I = [o0, e)`` holds ``H = G + G.T`` on the columns below ``e`` only, and
    ``out_I = H @ b[:e]``, ``out[:o0] += H[:, :o0].T @ a_I`` (the blocks above the diagonal),
    accumulated in fp32: half the logits of the full square are recomputed, and the two GEMMs
    together do the work of one square, as the full square's single GEMM did.
    Returns the partials summed over the tiles, ``[n_parts, NA]`` fp32.
    """
    NA, D = a.shape
    NB = b.shape[0]
    dev = a.device
    f32 = torch.float32
    sums = torch.zeros((n_parts, NA), dtype=f32, device=dev)
    if NA == 0 or NB == 0:  # no logits: a zero gradient
        out.zero_()
        if out_b is not None:
            out_b.zero_()
        return sums
    tf32 = bool(ALLOW_TF32)
    family, single, block_d = _tiling(D, a.dtype, tf32)
    block_n = _INTERP_BLOCK if _INTERPRET else _GRAD_BLOCK_N[family]
    cols = -(-NB // _ROW_PAD) * _ROW_PAD
    budget = _env_int("FASTCL_TRITON_SLAB_BYTES", SLAB_BYTES)
    S = max(1, min(NA, budget // (cols * a.element_size())))
    g_slab = torch.empty((S, cols), dtype=a.dtype, device=dev)
    n_tiles = triton.cdiv(NB, block_n)
    parts = torch.empty((max(n_parts, 1), n_tiles if n_parts else 1, S if n_parts else 1),
                        dtype=f32, device=dev)
    factor = scale.to(device=dev, dtype=f32).reshape(()) / g_mul
    lower = bool(flags.get("SELF"))

    def fp32_accumulator(t):  # t itself when it can accumulate in place
        return t if t.dtype == f32 and t.is_contiguous() else torch.empty(t.shape, dtype=f32,
                                                                          device=dev)

    acc = None
    if out_b is not None:
        acc = fp32_accumulator(out_b).zero_()
    acc_a = fp32_accumulator(out) if lower else None
    flags = dict(flags, STORE_G=True, TF32=tf32, SINGLE_D=single, BLOCK_D=block_d,
                 BLOCK_DV=block_d, GROUP_M=_GROUP_M)
    for o0 in range(0, NA, S):
        s = min(S, NA - o0)
        end = o0 + s if lower else NB  # the slab's columns
        tiles = triton.cdiv(end, block_n)
        args = (*head(g_slab, parts), o0, o0 + s, S, NA, NB, D, a.stride(0), a.stride(1),
                b.stride(0), b.stride(1), g_slab.stride(0), 1)

        def programs(block_m, _s=s, _tiles=tiles):
            return triton.cdiv(_s, block_m) * _tiles

        if _INTERPRET:
            kernel[(programs(_INTERP_BLOCK),)](*args, **flags, BLOCK_M=_INTERP_BLOCK,
                                               BLOCK_N=_INTERP_BLOCK)
        else:
            _launch("grad", family, kernel, lambda meta: (programs(meta["BLOCK_M"]),), args,
                    flags, table)
        if lower:
            acc_a[o0:end].copy_(_mm_f32(g_slab[:s, :end], b[:end]))
            if o0 > 0:
                _addmm_f32(acc_a[:o0], g_slab[:s, :o0].T, a[o0:end])
        else:
            product = _mm_f32(g_slab[:s, :NB], b)
            out[o0:o0 + s].copy_(product.mul_(factor))
        if acc is not None:
            _addmm_f32(acc, g_slab[:s, :NB].T, a[o0:o0 + s])
        if n_parts:
            sums[:, o0:o0 + s] = parts[:n_parts, :tiles, :s].sum(1)
    for total, dst in ((acc, out_b), (acc_a, out)):
        if total is None:
            continue
        if total is dst:
            dst.mul_(factor)
        else:
            dst.copy_(total.mul_(factor))
    return sums


def _check_inputs(q, k, scale, bias, targets, row_labels, col_labels):
    assert q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1]
    assert q.dtype == k.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert scale.numel() == 1 and bias.numel() == 1
    assert (row_labels is None) == (col_labels is None)


def contrastive_fwd(q, k, scale, bias, targets, row_labels, col_labels,
                    exclude_diag, decoupled, pos_lse, col_stats, lse2_mult=0.0):
    """Statistics ``(lse, pos, npos, mean, col_lse, col_mean, lse2)`` of
    ``scale * q @ k.T + bias``.

    Same signature and return conventions as :func:`fastcl.ops._reference_impl.contrastive_fwd`:
    four fp32 ``[R]`` tensors, two fp32 ``[C]`` tensors (empty unless ``col_stats``), then
    ``lse2`` (fp32 ``[R]`` when ``lse2_mult > 0``, else empty), from the same pass: one more
    running sum per row, sharing the running max.
    Labels take precedence over targets when both are given. ``k=None`` (no column
    statistics): the keys are ``q`` itself; from ``SLAB_MIN_D`` features on, the statistics
    then come from the blocks on and below the diagonal of the symmetric logits
    (``_fwd_self``): half the logits of the full square, when the full square would take more
    than one wave of programs (``_half_square_pays``; the environment variable
    ``FASTCL_TRITON_SELF_FWD``: ``0`` never, ``2`` always).
    """
    self_sim = k is None and _env_int("FASTCL_TRITON_SELF_FWD", 1) != 0
    if k is None:
        assert not col_stats, "self-similarity takes row statistics only"
        k = q
    _check_inputs(q, k, scale, bias, targets, row_labels, col_labels)
    R, C = q.shape[0], k.shape[0]
    dev = q.device
    has_labels = row_labels is not None
    has_targets = targets is not None and not has_labels
    f32 = torch.float32
    lse = torch.empty(R, dtype=f32, device=dev)
    pos = torch.empty(R, dtype=f32, device=dev)
    npos = torch.empty(R, dtype=f32, device=dev)
    mean = torch.empty(R, dtype=f32, device=dev)
    tgt = _vec(targets if has_targets else None, lse)
    rlab = _vec(row_labels if has_labels else None, lse)
    clab = _vec(col_labels if has_labels else None, lse)
    lse2_mult = float(lse2_mult)
    has_lse2 = lse2_mult > 0
    row_flags = dict(HAS_TARGETS=has_targets, HAS_LABELS=has_labels,
                     EXCLUDE_DIAG=bool(exclude_diag), DECOUPLED=bool(decoupled),
                     POS_LSE=bool(pos_lse), WRITE_POS=True, HAS_LSE2=has_lse2)
    lse2 = torch.empty(R if has_lse2 else 0, dtype=f32, device=dev)
    rows_lse2 = dict(lse2=lse2 if has_lse2 else None, lse2_mult=lse2_mult)
    if self_sim and R > 0 and _use_slabs(q.shape[1], q.dtype) and _fwd_self(
            q, scale, bias, tgt, rlab, clab, lse, pos, npos, mean, row_flags, **rows_lse2):
        return (lse, pos, npos, mean, torch.empty(0, dtype=f32, device=dev),
                torch.empty(0, dtype=f32, device=dev), lse2)
    if col_stats and _use_slabs(q.shape[1], q.dtype):
        cols = _fwd_col_partials(q, k, scale, bias, tgt, rlab, clab, lse, pos, npos, mean,
                                 row_flags, exclude_diag, **rows_lse2)
        if cols is not None:
            return (lse, pos, npos, mean, *cols, lse2)
    _launch_fwd(q, k, scale, bias, tgt, rlab, clab, lse, pos, npos, mean, row_flags,
                **rows_lse2)
    if col_stats:
        col_lse = torch.empty(C, dtype=f32, device=dev)
        col_mean = torch.empty(C, dtype=f32, device=dev)
        # the columns as rows of k @ q.T: the set is `allowed` (symmetric in r and c)
        _launch_fwd(k, q, scale, bias, lse, lse, lse, col_lse, lse, lse, col_mean,
                    dict(HAS_TARGETS=False, HAS_LABELS=False, EXCLUDE_DIAG=bool(exclude_diag),
                         DECOUPLED=False, POS_LSE=False, WRITE_POS=False, HAS_LSE2=False))
    else:
        col_lse = torch.empty(0, dtype=f32, device=dev)
        col_mean = torch.empty(0, dtype=f32, device=dev)
    return lse, pos, npos, mean, col_lse, col_mean, lse2


def contrastive_bwd(g_lse, g_pos, g_mean, g_col_lse, g_col_mean, q, k, scale, bias, targets,
                    row_labels, col_labels, lse, pos, npos, col_lse,
                    exclude_diag, decoupled, pos_lse, col_stats, g_lse2=None, lse2=None,
                    lse2_mult=0.0):
    """Gradients ``(dq, dk, dscale, dbias)`` from the gradients of the statistics.

    Same signature and return conventions as :func:`fastcl.ops._reference_impl.contrastive_bwd`:
    ``dq`` / ``dk`` in the input dtype shaped like ``q`` / ``k``, ``dscale`` / ``dbias`` 0-dim
    fp32. Any ``g_*`` may be ``None`` (a zero gradient; its term of ``G`` is compiled out).
    ``k=None`` (no column statistics): the keys are ``q`` itself; ``dq`` is then the gradient of
    ``q`` in both roles (one launch, ``G + G.T`` per tile; by slabs, on the blocks on and below
    the diagonal only) and ``dk`` an empty ``[0, D]`` tensor.
    From ``SLAB_MIN_D`` features on, by slabs of ``G`` and GEMMs (``_bwd_slabs``); their fp32
    products follow ATen's matmul precision (``torch.backends.cuda.matmul.allow_tf32``).
    """
    self_sim = k is None
    if self_sim:
        assert not col_stats, "self-similarity takes row statistics only"
        k = q
    _check_inputs(q, k, scale, bias, targets, row_labels, col_labels)
    R, C = q.shape[0], k.shape[0]
    dev = q.device
    has_labels = row_labels is not None
    has_targets = targets is not None and not has_labels
    if not col_stats or (g_col_lse is not None and g_col_lse.numel() == 0):
        g_col_lse = None
    if not col_stats or (g_col_mean is not None and g_col_mean.numel() == 0):
        g_col_mean = None
    if not (has_labels or has_targets):
        g_pos = None  # no positives: the term is zero
    f32 = torch.float32
    no_dk = q.new_empty((0, q.shape[1])) if self_sim else None
    if g_lse is None and g_pos is None and g_mean is None and g_col_lse is None \
            and g_col_mean is None and g_lse2 is None:
        return (torch.zeros(q.shape, dtype=q.dtype, device=dev),
                no_dk if self_sim else torch.zeros(k.shape, dtype=k.dtype, device=dev),
                torch.zeros((), dtype=f32, device=dev), torch.zeros((), dtype=f32, device=dev))

    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dummy = torch.empty(1, dtype=f32, device=dev)   # for the absent vectors (never read)

    def v(t):
        return _vec(t, dummy)

    lse2_mult = float(lse2_mult)
    present = [t for t in (g_lse, g_pos, g_mean, g_col_lse, g_col_mean) if t is not None]
    if g_lse2 is not None:
        present.append(g_lse2.detach().float() * lse2_mult)
    rescale = q.dtype == torch.float16
    if rescale:
        # |G| <= sum of max |g_*| (every factor multiplying a g_* in G is at most 1; g_lse2's,
        # lse2_mult, is folded in above)
        parts = [torch.linalg.vector_norm(t.detach().float(), float("inf"))
                 for t in present if t.numel() > 0]
        g_bound = torch.stack(parts).sum() if parts else torch.ones((), dtype=f32, device=dev)
        if self_sim:
            g_bound = 2 * g_bound  # |G + G.T|
        g_mul = _g_multiplier(g_bound)
    else:
        g_mul = torch.ones((), dtype=f32, device=dev)

    rest = (scale, bias, v(targets if has_targets else None),
            v(row_labels if has_labels else None), v(col_labels if has_labels else None),
            v(lse if g_lse is not None else None), v(pos if g_pos is not None else None),
            v(npos if (has_labels or has_targets) else None),
            v(col_lse if g_col_lse is not None else None),
            v(g_lse), v(g_pos), v(g_mean), v(g_col_lse), v(g_col_mean), g_mul,
            v(lse2 if g_lse2 is not None else None), v(g_lse2), lse2_mult)
    flags = dict(
        HAS_TARGETS=has_targets, HAS_LABELS=has_labels, EXCLUDE_DIAG=bool(exclude_diag),
        DECOUPLED=bool(decoupled), POS_LSE=bool(pos_lse),
        HAS_G_LSE=g_lse is not None, HAS_G_POS=g_pos is not None,
        HAS_G_MEAN=g_mean is not None, HAS_G_COL_LSE=g_col_lse is not None,
        HAS_G_COL_MEAN=g_col_mean is not None, HAS_G_LSE2=g_lse2 is not None,
        RESCALE_G=rescale,
    )
    row_flags = dict(flags, TRANSPOSED=False, SELF=self_sim, WRITE_PARTIALS=True)
    col_flags = dict(flags, TRANSPOSED=True, SELF=False, WRITE_PARTIALS=False)
    dk = no_dk if self_sim else torch.empty(k.shape, dtype=k.dtype, device=dev)
    if _use_slabs(q.shape[1], q.dtype):
        def head(a, b):  # the kernel's arguments before O0 (the partials: ds, db)
            return lambda g_slab, parts: (a, b, g_slab, *rest, parts[0], parts[-1])

        accumulate = not self_sim and _slab_accumulate()
        sums = _bwd_slabs(q, k, dq, scale, g_mul, row_flags, 2, _contrastive_bwd_kernel,
                          _TUNED, head(q, k), out_b=dk if accumulate else None)
        if not (self_sim or accumulate):
            _bwd_slabs(k, q, dk, scale, g_mul, col_flags, 0, _contrastive_bwd_kernel, _TUNED,
                       head(k, q))
        ds, db = (row.sum() for row in sums)
        return dq, dk, ds, db
    ds_part = torch.empty(R, dtype=f32, device=dev)   # per-row sums of G * (q . k)
    db_part = torch.empty(R, dtype=f32, device=dev)   # per-row sums of G
    _launch_bwd(q, k, dq, rest, (ds_part, db_part), row_flags)
    if not self_sim:
        _launch_bwd(k, q, dk, rest, (ds_part, db_part), col_flags)
    return dq, dk, ds_part.sum(), db_part.sum()
