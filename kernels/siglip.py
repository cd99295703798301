"""Triton kernels of the sigmoid loss (SigLIP) and their launch wrappers.

``s_ij = scale * <x_i, y_j> + bias`` for ``x`` of ``[R, D]`` and ``y`` of ``[C, D]``, ``z_ij = +1`` on
the diagonal ``i == j`` when ``diag_pos`` (one process, or the own block of a gathered batch) and
``-1`` elsewhere (every pair when not ``diag_pos``: the blocks of other ranks), and the loss of a
pair is ``softplus(-z_ij s_ij) = -log sigmoid(z_ij s_ij)``. Its gradient is
``dL/ds_ij = -g_i z_ij sigmoid(-z_ij s_ij)`` for an upstream gradient ``g_i`` of row ``i``'s
sum; nothing else of the loss enters it, so no statistic has to be saved between passes.

One kernel, ``_siglip_kernel``, serves every pass through constexpr switches. It shares the tile
machinery of :mod:`fastcl.kernels.contrastive` (``_mma``, ``_qk_chunked``, the tilings, the
configuration lists and the interpreter workaround) and differs from the contrastive kernels
only in what it does with a logit tile:

- forward (``WRITE_LOSS``, no ``HAS_GRAD``): one program per ``BLOCK_M`` rows of ``s`` walks the
  columns in ``BLOCK_N`` tiles and accumulates the per-row sums of the softplus;
- backward (``HAS_GRAD``): row-parallel (``TRANSPOSED=False``: ``OUT = dx = scale * G @ y``, the
  programs of the first ``BLOCK_DV`` slice also write per-row partial sums of ``G * <x, y>``
  and ``G`` for ``dscale`` / ``dbias``) and column-parallel (``TRANSPOSED=True``:
  ``OUT = dy = scale * G.T @ x``); every output tile is written once, without atomics;
- fused forward + backward (``WRITE_LOSS`` and ``HAS_GRAD`` with ``UNIFORM_G``): when the
  upstream gradient of every row is the same number (the loss is reduced by ``mean`` or
  ``sum``), the row-parallel backward launch also writes the row losses, so loss and gradients
  cost two launches (four GEMMs) instead of three (five GEMMs);
- backward by slabs (``STORE_G``, from ``SLAB_MIN_D`` features on, as the contrastive
  backward): one program per tile of a slab of rows writes its tile of ``G`` (and the row sums
  of the loss, ``G * <x, y>`` and ``G`` per column tile), and a GEMM multiplies the slab by
  ``y`` (by ``x`` for the slabs of columns): the logits are recomputed once per orientation
  instead of once per ``BLOCK_DV`` slice of the output.

Softplus and sigmoid share one ``exp2`` and one reciprocal: with ``t = -z s``,
``e = exp(-|t|)``, ``u = 1 + e``, ``softplus(t) = max(t, 0) + log(u) + (e - (u - 1)) / u``
(the last term restores the bits of ``e`` that ``1 + e`` rounds away, so terms far below one,
as the off-diagonal pairs are with ``bias = -10``, keep full relative precision) and
``sigmoid(t) = 1 / u`` for ``t >= 0``, ``e / u`` otherwise. No step overflows for any logit.

Precision and block sizes follow :mod:`fastcl.kernels.contrastive` (``ALLOW_TF32`` and
``AUTOTUNE`` are read from that module at launch): fp32 accumulators, ``G`` rounded to the input
dtype for the ``G @ y`` products (fp16 after a power-of-two rescaling from a bound on ``|g|``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contrastive as _c
from .contrastive import _LN2, _LOG2E, _emit_g, _lowp, _mma, _program_tiles, _qk_chunked

__all__ = ["siglip_fwd", "siglip_bwd", "siglip_fused"]

_INTERPRET = _c._INTERPRET


@triton.jit
def _siglip_kernel(
    A, B, OUT, scale_ptr, bias_ptr, g_ptr, g_mul_ptr, loss_ptr, ds_ptr, db_ptr,
    O0, O_END, PART_STRIDE, NA, NB, D,
    stride_am, stride_ad, stride_bn, stride_bd, stride_om, stride_od,
    TRANSPOSED: tl.constexpr, STORE_G: tl.constexpr, WRITE_LOSS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    UNIFORM_G: tl.constexpr, RESCALE_G: tl.constexpr, DIAG_POS: tl.constexpr,
    TF32: tl.constexpr, SINGLE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Row losses and / or ``OUT[outer, slice] = scale * sum_inner G(outer, inner) B[inner, :]``,
    or ``G`` itself.

    ``TRANSPOSED=False``: ``A = x`` (outer = rows of ``s``), ``B = y``, ``OUT = dx``.
    ``TRANSPOSED=True``: ``A = y`` (outer = columns of ``s``), ``B = x``, ``OUT = dy``.
    ``g_ptr``: the upstream gradient of each row's sum (``[R]``), or with ``UNIFORM_G`` one
    number for every row. ``loss_ptr`` (``WRITE_LOSS``), ``ds_ptr`` and ``db_ptr`` (``HAS_GRAD``
    and not ``TRANSPOSED``) are ``[R]`` fp32 outputs written by the programs of slice 0.
    ``DIAG_POS``: the pairs ``i == j`` are positives (``z = +1``); else every pair is negative.
    The outer rows are ``[O0, O_END)``; ``STORE_G`` (a slab of them, see
    :func:`fastcl.kernels.contrastive._bwd_slabs`): one tile per program, ``G`` times
    ``*g_mul`` written to ``OUT[outer - O0, inner]``, the per-row sums to
    ``ptr[tile * PART_STRIDE + outer - O0]``.
    """
    pid, pid_1, n_lo, n_hi = _program_tiles(O0, O_END, NB, STORE_G, BLOCK_M, BLOCK_N, GROUP_M)
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

    if SINGLE_D:
        a_tile = tl.load(A + a_rows[:, None] + offs_d64[None, :] * stride_ad,
                         mask=o_in[:, None] & d_in[None, :], other=0.0)

    if HAS_GRAD:
        if UNIFORM_G:
            g_o = tl.load(g_ptr).to(tl.float32)
        elif not TRANSPOSED:
            g_o = tl.load(g_ptr + offs_o, mask=o_in, other=0.0).to(tl.float32)
        if RESCALE_G:
            g_mul = tl.load(g_mul_ptr).to(tl.float32)
        else:
            g_mul = 1.0
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        ds_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    loss_acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < NB
        b_rows = offs_n.to(tl.int64) * stride_bn
        if SINGLE_D:
            b_tile = tl.load(B + b_rows[:, None] + offs_d64[None, :] * stride_bd,
                             mask=n_in[:, None] & d_in[None, :], other=0.0)
            qk = _mma(a_tile, tl.trans(b_tile), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                      TF32)
        else:
            qk = _qk_chunked(A, B, a_rows, o_in, b_rows, n_in, D, stride_ad, stride_bd,
                             BLOCK_M, BLOCK_N, BLOCK_D, TF32)
        s = qk * scale + bias
        valid = o_in[:, None] & n_in[None, :]
        if DIAG_POS:
            diag = offs_o[:, None] == offs_n[None, :]
        else:
            diag = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int1)
        t = tl.where(diag, -s, s)                 # softplus argument -z * s
        e = tl.exp2(-tl.abs(t) * _LOG2E)
        u = 1.0 + e
        r = 1.0 / u
        if WRITE_LOSS:
            sp = tl.maximum(t, 0.0) + tl.log2(u) * _LN2 + (e - (u - 1.0)) * r
            loss_acc += tl.sum(tl.where(valid, sp, 0.0), 1)
        if HAS_GRAD:
            sig = tl.where(t >= 0.0, r, e * r)    # sigmoid(t)
            if UNIFORM_G:
                g_row = g_o
            elif TRANSPOSED:
                g_row = tl.load(g_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
            else:
                g_row = g_o[:, None]
            g = tl.where(valid, g_row * tl.where(diag, -sig, sig), 0.0)   # -g z sigmoid(t)
            if not TRANSPOSED:
                ds_acc += tl.sum(g * qk, 1)
                db_acc += tl.sum(g, 1)
            acc = _emit_g(acc, g, g_mul, OUT, offs_o - O0, o_in, offs_n, n_in, stride_om,
                          stride_od, b_tile if SINGLE_D else None, B, b_rows, offs_v64, v_in,
                          stride_bd, STORE_G, SINGLE_D, RESCALE_G, TF32, BLOCK_D, BLOCK_DV)

    if HAS_GRAD and not STORE_G:
        out = acc * (scale / g_mul)
        o_rows = offs_o.to(tl.int64) * stride_om
        tl.store(OUT + o_rows[:, None] + offs_v64[None, :] * stride_od,
                 _lowp(out, OUT.dtype.element_ty), mask=o_in[:, None] & v_in[None, :])
    if STORE_G:  # per row and column tile, summed on the host
        part = pid_1 * PART_STRIDE + (offs_o - O0)
    else:
        part = offs_o
    if STORE_G or pid_1 == 0:  # else once, from the first output slice
        if WRITE_LOSS:
            tl.store(loss_ptr + part, loss_acc, mask=o_in)
        if HAS_GRAD and not TRANSPOSED:
            tl.store(ds_ptr + part, ds_acc, mask=o_in)
            tl.store(db_ptr + part, db_acc, mask=o_in)


# --------------------------------------------------------------------------------------------
# autotuning: the configuration lists of the contrastive kernels (same tiles, same pressure)
# --------------------------------------------------------------------------------------------

_KEYS = ["D", "TRANSPOSED", "STORE_G", "WRITE_LOSS", "HAS_GRAD", "UNIFORM_G", "RESCALE_G",
         "DIAG_POS", "TF32", "SINGLE_D", "BLOCK_D"]

_TUNED = {}
for (_kind, _family), _configs in _c._CONFIGS.items():
    if _kind in ("fwd_cols", "merge", "finalize"):  # the contrastive forward's own passes
        continue
    if _kind == "bwd_chunked":
        _TUNED[_kind, _family] = triton.autotune(
            _configs, key=_KEYS, prune_configs_by={"early_config_prune": _c._prune_chunked})(
            _siglip_kernel)
    else:
        _TUNED[_kind, _family] = triton.autotune(_configs, key=_KEYS)(_siglip_kernel)


def _launch(a, b, out, rest, flags):
    """One launch over the rows of ``a``: interpreter, autotuned, or first configuration."""
    NA, D = a.shape
    NB = b.shape[0]
    if NA == 0:
        return
    tf32 = bool(_c.ALLOW_TF32)
    family, single, block_d = _c._tiling(D, a.dtype, tf32)
    args = (a, b, out, *rest, 0, NA, 0, NA, NB, D,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    flags = dict(flags, STORE_G=False, TF32=tf32, SINGLE_D=single, BLOCK_D=block_d,
                 GROUP_M=_c._GROUP_M)
    has_grad = flags["HAS_GRAD"]
    if _INTERPRET:
        block_dv = block_d if (single or not has_grad) else _c._INTERP_BLOCK_DV
        n_v = max(1, triton.cdiv(D, block_dv)) if has_grad else 1
        _siglip_kernel[(triton.cdiv(NA, _c._INTERP_BLOCK), n_v)](
            *args, **flags, BLOCK_M=_c._INTERP_BLOCK, BLOCK_N=_c._INTERP_BLOCK, BLOCK_DV=block_dv)
        return
    if not has_grad:
        kind = "fwd"
        flags["BLOCK_DV"] = block_d

        def grid(meta):
            return (triton.cdiv(NA, meta["BLOCK_M"]), 1)
    elif single:
        kind = "bwd_single"
        flags["BLOCK_DV"] = block_d

        def grid(meta):
            return (triton.cdiv(NA, meta["BLOCK_M"]), 1)
    else:
        kind = "bwd_chunked"

        def grid(meta):
            return (triton.cdiv(NA, meta["BLOCK_M"]), max(1, triton.cdiv(D, meta["BLOCK_DV"])))
    _c._launch(kind, family, _siglip_kernel, grid, args, flags, _TUNED)


# --------------------------------------------------------------------------------------------
# launch wrappers
# --------------------------------------------------------------------------------------------

def _check_inputs(x, y, scale, bias):
    assert x.dim() == 2 and y.dim() == 2 and x.shape[1] == y.shape[1]
    assert x.dtype == y.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert scale.numel() == 1 and bias.numel() == 1


def _grad_launches(x, y, scale, bias, g, uniform, loss, diag_pos):
    """``(dx, dy, dscale, dbias)``; with ``loss`` the row-parallel launch also writes it."""
    N = x.shape[0]
    f32 = torch.float32
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    rescale = x.dtype == torch.float16
    if rescale:
        # |G| <= max |g| (a sigmoid is at most 1)
        g_mul = _c._g_multiplier(torch.linalg.vector_norm(g.detach().float(), float("inf")))
    else:
        g_mul = torch.ones((), dtype=f32, device=x.device)
    flags = dict(HAS_GRAD=True, UNIFORM_G=uniform, RESCALE_G=rescale, DIAG_POS=bool(diag_pos))
    if _c._use_slabs(x.shape[1], x.dtype):
        return _grad_by_slabs(x, y, dx, dy, scale, bias, g, g_mul, loss, flags)
    ds_part = torch.empty(N, dtype=f32, device=x.device)
    db_part = torch.empty(N, dtype=f32, device=x.device)
    _launch(x, y, dx, (scale, bias, g, g_mul, ds_part if loss is None else loss,
                       ds_part, db_part),
            dict(flags, TRANSPOSED=False, WRITE_LOSS=loss is not None))
    _launch(y, x, dy, (scale, bias, g, g_mul, ds_part, ds_part, db_part),
            dict(flags, TRANSPOSED=True, WRITE_LOSS=False))
    return dx, dy, ds_part.sum().to(scale.dtype), db_part.sum().to(bias.dtype)


def _grad_by_slabs(x, y, dx, dy, scale, bias, g, g_mul, loss, flags):
    """:func:`_grad_launches` for wide features: slabs of ``G`` and GEMMs
    (:func:`fastcl.kernels.contrastive._bwd_slabs`), the row losses and the partial sums of
    ``dscale`` / ``dbias`` from the row-orientation slabs (which give ``dy`` too, by accumulated
    GEMMs, with ``SLAB_ACCUMULATE``)."""

    def head(a, b):  # the kernel's arguments before O0 (the partials: loss, ds, db)
        return lambda g_slab, parts: (a, b, g_slab, scale, bias, g, g_mul, parts[-1], parts[0],
                                      parts[min(1, len(parts) - 1)])

    # partial sums of the rows: dscale, dbias and (with ``loss``) the row losses
    accumulate = _c._slab_accumulate()
    sums = _c._bwd_slabs(x, y, dx, scale, g_mul,
                         dict(flags, TRANSPOSED=False, WRITE_LOSS=loss is not None), 3,
                         _siglip_kernel, _TUNED, head(x, y), out_b=dy if accumulate else None)
    if not accumulate:
        _c._bwd_slabs(y, x, dy, scale, g_mul, dict(flags, TRANSPOSED=True, WRITE_LOSS=False), 0,
                      _siglip_kernel, _TUNED, head(y, x))
    if loss is not None:
        loss.copy_(sums[2])
    return dx, dy, sums[0].sum().to(scale.dtype), sums[1].sum().to(bias.dtype)


def siglip_fwd(x, y, scale, bias, diag_pos):
    """Per-row sums ``[R]`` (fp32) of ``softplus(-z_ij s_ij)`` over every column ``j``."""
    _check_inputs(x, y, scale, bias)
    loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _launch(x, y, loss.view(-1, 1), (scale, bias, loss, loss, loss, loss, loss),
            dict(TRANSPOSED=False, WRITE_LOSS=True, HAS_GRAD=False, UNIFORM_G=False,
                 RESCALE_G=False, DIAG_POS=bool(diag_pos)))
    return loss


def siglip_bwd(g_row, x, y, scale, bias, diag_pos):
    """Gradients ``(dx, dy, dscale, dbias)`` of ``sum_i g_row[i] * row_loss[i]``.

    ``dx`` / ``dy`` in the input dtype, ``dscale`` / ``dbias`` 0-dim in the dtypes of
    ``scale`` / ``bias``. The logit tiles are recomputed; extra memory is ``O(R)``.
    """
    _check_inputs(x, y, scale, bias)
    g = g_row.detach().to(torch.float32).contiguous()
    return _grad_launches(x, y, scale, bias, g, False, None, diag_pos)


def siglip_fused(x, y, scale, bias, diag_pos, mean: bool):
    """Loss and gradients in one pass: ``(loss, dx, dy, dscale, dbias)``.

    ``loss`` is the 0-dim fp32 sum of every pair's term, divided by ``R`` when ``mean``; the
    gradients are those of ``loss`` (a uniform upstream gradient ``1/R`` or ``1`` per row).
    """
    _check_inputs(x, y, scale, bias)
    N = x.shape[0]
    g = torch.full((), 1.0 / max(N, 1) if mean else 1.0, dtype=torch.float32, device=x.device)
    rows = torch.empty(N, dtype=torch.float32, device=x.device)
    dx, dy, dscale, dbias = _grad_launches(x, y, scale, bias, g, True, rows, diag_pos)
    loss = rows.sum()
    if mean and N:
        loss = loss / N
    return loss, dx, dy, dscale, dbias
