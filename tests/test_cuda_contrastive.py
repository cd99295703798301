"""The CUDA kernels of the contrastive primitive (``fastcl._C.contrastive_{fwd,bwd}_cuda``).

Without a GPU: the build (``WITH_CUDA`` where nvcc was found, the functions bound), the argument
checks at the C++ boundary (CPU tensors are refused before any CUDA call) and the reasons the
dispatch table gives.

With a GPU (``gpu`` marker): forward statistics against
:func:`fastcl.reference.contrastive.contrastive_stats_ref`, gradients against the autograd of the
same oracle in fp64, as in ``test_cpu_contrastive.py``: tight in fp64; in fp32, bf16 and fp16 a
gradient's error against the fp64 oracle may be at most about twice the error of the plain-PyTorch
oracle run at that dtype, plus a small slack relative to the gradient's magnitude. Slab
boundaries are exercised through ``FASTCL_CUDA_SLAB_BYTES`` (read at every call). The seventh
statistic ``lse2`` (``lse2_mult > 0``) and its gradient ``g_lse2`` are checked the same way, with k
given and with k=None. Then large shapes, peak memory, ``torch.library.opcheck`` and the public
losses end to end.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastcl
from fastcl import _backends, dispatch

from _contrastive_checks import (BF16, F16, F32, F64, FLAG_COMBOS, GRAD_NAMES, MODES, call_bwd,
                                 call_bwd_self, call_fused, call_fwd,
                                 check_fused_equals_two_kernels, check_fwd_lse2,
                                 check_grads_lse2, check_self_grads, check_self_stats,
                                 check_stats, flags_of, fused_expected, ref_grads, ref_stats)
from _contrastive_checks import check_grads as check_grads_of
from _contrastive_checks import flag_id as _id
from _contrastive_checks import make_case as make_case_on
from _contrastive_checks import random_grads as random_grads_on
from _contrastive_checks import self_case as self_case_on
from _contrastive_checks import stat_dtype as _stat_dtype
from _cuda_cases import DEVICE, SLAB_SHAPES, slab_bytes  # noqa: F401 - slab_bytes is a fixture
from _cuda_cases import nvcc_found as _nvcc_found
from _cuda_cases import padded as _padded
from _cuda_cases import peak_extra_memory

try:
    from fastcl import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None


def _ext():
    if _C is None or not hasattr(_C, "contrastive_fwd_cuda"):
        pytest.skip("fastcl._C has no CUDA contrastive kernels (built without nvcc)")
    return _C


# ---------------------------------------------------------------------------------------------
# Without a GPU: build, boundary checks, dispatch


def test_extension_imports_and_reports_cuda():
    if _C is None:
        pytest.skip("fastcl._C is not built")
    assert isinstance(_C.WITH_CUDA, bool)
    cuda_build = (torch.version.cuda is not None and _nvcc_found()
                  and os.environ.get("FASTCL_BUILD_CUDA", "1") != "0")
    if cuda_build:
        assert _C.WITH_CUDA, ("nvcc and a CUDA build of torch are present but fastcl._C was built "
                              "without CUDA: rebuild with `pip install --no-build-isolation -e .`")
    if _C.WITH_CUDA:
        for name in ("contrastive_fwd_cuda", "contrastive_bwd_cuda", "contrastive_fused_cuda",
                     "cuda_slab_bytes"):
            assert hasattr(_C, name), f"fastcl._C was built with CUDA but does not bind {name}"
        assert _backends.implements("cuda", "contrastive")


def _cpu_case(R=5, C=4, D=3):
    q, k = torch.randn(R, D), torch.randn(C, D)
    return q, k, torch.tensor(2.0), torch.tensor(0.0), torch.arange(R) % C


def test_cpu_tensors_are_refused_before_any_cuda_call():
    C_ = _ext()
    q, k, scale, bias, targets = _cpu_case()
    with pytest.raises(RuntimeError, match="contrastive_fwd_cuda expects CUDA tensors, got cpu"):
        C_.contrastive_fwd_cuda(q, k, scale, bias, targets, None, None, False, False, False, True)
    g = torch.ones(5)
    with pytest.raises(RuntimeError, match="contrastive_bwd_cuda expects CUDA tensors, got cpu"):
        C_.contrastive_bwd_cuda(g, None, None, None, None, q, k, scale, bias, targets, None, None,
                                g, g, g, torch.empty(0), False, False, False, False)
    for keys in (k, None):
        with pytest.raises(RuntimeError,
                           match="contrastive_fused_cuda expects CUDA tensors, got cpu"):
            C_.contrastive_fused_cuda(g, None, None, q, keys, scale, bias, targets, None, None,
                                      False, False, False, True)


def test_slab_bytes_env(monkeypatch):
    C_ = _ext()
    monkeypatch.delenv("FASTCL_CUDA_SLAB_BYTES", raising=False)
    assert C_.cuda_slab_bytes() == 512 << 20
    monkeypatch.setenv("FASTCL_CUDA_SLAB_BYTES", "12345")
    assert C_.cuda_slab_bytes() == 12345
    monkeypatch.setenv("FASTCL_CUDA_SLAB_BYTES", "garbage")
    assert C_.cuda_slab_bytes() == 512 << 20


def test_dispatch_reasons_without_cuda_tensors():
    reason = dispatch.why_not("cuda", "info_nce", torch.device("cpu"), torch.float32)
    assert reason is not None and "needs CUDA tensors" in reason and "cpu" in reason
    reason = dispatch.why_not("cuda", "info_nce", torch.device("cuda"), torch.float64)
    assert reason is not None and "float64" in reason
    x = torch.randn(4, 8)
    with pytest.raises(dispatch.BackendUnavailableError, match="needs CUDA tensors"):
        fastcl.clip_loss(x, x, 10.0, backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU helpers


def make_case(R, C, D, dtype=F64, mode="targets", **kw):
    return make_case_on(R, C, D, dtype, mode, device=DEVICE, **kw)


def random_grads(R, C, dtype, col_stats, **kw):
    return random_grads_on(R, C, dtype, col_stats, device=DEVICE, **kw)


def kernel_fwd(case, **flags):
    return call_fwd(_ext().contrastive_fwd_cuda, case, **flags)


def kernel_bwd(case, grads, stats, **flags):
    """The backward given the forward's statistics (the first six of its seven outputs)."""
    return call_bwd(_ext().contrastive_bwd_cuda, case, grads, tuple(stats)[:6], **flags)


def check_grads(case, grads, stats, dtype, mag_floor=1e-3, got=None, **flags):
    """``got`` (default: the backward kernel's gradients) against the oracle's for ``grads``."""
    got = kernel_bwd(case, grads, stats, **flags) if got is None else got
    return check_grads_of(got, case, grads, dtype, mag_floor=mag_floor, **flags)


# ---------------------------------------------------------------------------------------------
# fp64: every flag combination in every mode, slabs of 7 rows (several slabs, a ragged last one)


FP64_CASES = [(mode, flags) for mode in MODES for flags in FLAG_COMBOS]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,flags", FP64_CASES, ids=[f"{m}-{_id(f)}" for m, f in FP64_CASES])
def test_fp64_all_flags(mode, flags, slab_bytes):
    R, C, D = 37, 29, 6
    slab_bytes(7 * _padded(C) * 8)
    case = make_case(R, C, D, F64, mode, scale=4.0, bias=-0.5)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, **flags), F64)
    grads = random_grads(R, C, F64, flags["col_stats"])
    check_grads(case, grads, stats, F64, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("drop", [(0,), (1, 2), (0, 1, 2), (3,), (4,), (0, 3), (0, 1, 2, 3, 4)])
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fp64_missing_grads(mode, drop):
    R, C, D = 23, 31, 5
    flags = dict(exclude_diag=True, decoupled=mode == "labels", pos_lse=mode == "labels",
                 col_stats=True)
    case = make_case(R, C, D, F64, mode)
    stats = kernel_fwd(case, **flags)
    grads = random_grads(R, C, F64, True, drop=drop)
    check_grads(case, grads, stats, F64, **flags)


# ---------------------------------------------------------------------------------------------
# The fused sweep (row statistics, their gradients known before the forward): loss = norm * sum
# over the rows with a positive of g . (lse, pos, mean), and its gradients


FUSED_FLAGS = [f for f in FLAG_COMBOS if not f["col_stats"]]


def kernel_fused(case, grads, mean, keys="k", **flags):
    return call_fused(_ext().contrastive_fused_cuda, case, grads, mean, keys=keys, **flags)


def check_fused(case, grads, mean, dtype, **flags):
    loss, npos, *got = kernel_fused(case, grads, mean, **flags)
    want_loss, want_npos, scaled = fused_expected(ref_stats(case, F64, **flags), grads, mean)
    assert loss.dtype == _stat_dtype(dtype) and loss.dim() == 0
    torch.testing.assert_close(npos.to(F64), want_npos)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == F64 else dict(rtol=2e-5, atol=5e-5)
    torch.testing.assert_close(loss.to(F64), want_loss, **tol)
    sdt = _stat_dtype(dtype)
    check_grads(case, [None if g is None else g.to(sdt) for g in scaled], None, dtype, got=got,
                **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("mean", (True, False), ids=("mean", "sum"))
@pytest.mark.parametrize("mode,flags", [(m, f) for m in MODES for f in FUSED_FLAGS],
                         ids=[f"{m}-{_id(f)}" for m in MODES for f in FUSED_FLAGS])
def test_fused_fp64(mode, flags, mean, slab_bytes):
    R, C, D = 37, 29, 6
    slab_bytes(7 * _padded(C) * 8)  # several slabs and a ragged last one
    case = make_case(R, C, D, F64, mode, scale=4.0, bias=-0.5)
    check_fused(case, random_grads(R, C, F64, False)[:3], mean, F64, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("drop", [(0,), (1, 2), (0, 2), (0, 1, 2)])
def test_fused_missing_coefficients(drop):
    R, C = 23, 23
    case = make_case(R, C, 5, F64, "targets")
    grads = random_grads(R, C, F64, False, drop=drop)[:3]
    check_fused(case, grads, True, F64, exclude_diag=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fused_low_precision(dtype, mode, slab_bytes):
    R, C, D = 70, 53, 24
    slab_bytes(16 * _padded(C) * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
    case = make_case(R, C, D, dtype, mode, scale=8.0)
    check_fused(case, random_grads(R, C, dtype, False)[:3], True, dtype, **flags)


@pytest.mark.gpu
def test_fused_equals_forward_then_backward(slab_bytes):
    """Same statistics and gradients as the two kernels given the masked, normalized
    coefficients."""
    R, C = 41, 41
    slab_bytes(9 * _padded(C) * 4)
    case = make_case(R, C, 8, F32, "labels")
    flags = dict(exclude_diag=True, decoupled=True)
    grads = random_grads(R, C, F32, False)[:3]
    check_fused_equals_two_kernels(kernel_fused(case, grads, True, **flags),
                                   kernel_fwd(case, **flags), kernel_bwd, case, grads, **flags)


# ---------------------------------------------------------------------------------------------
# Self-similarity (k=None: the keys are q): G + G.T on the blocks on and below the diagonal, in
# the fused sweep and in the backward. The oracle runs with k = q as a second leaf; the gradient
# of q is the sum of both.


def self_case(R, D, dtype, mode, **kw):
    return self_case_on(R, D, dtype, mode, device=DEVICE, **kw)


def kernel_fwd_self(case, **flags):
    return call_fwd(_ext().contrastive_fwd_cuda, dict(case, k=None), **flags)


def kernel_self(kind, case, grads, mean, **flags):
    """``(loss, npos, dz, dk, dscale, dbias, scaled)`` of the fused sweep (``kind="fused"``) or
    of the forward then the backward without k (``"bwd"``, given the fused contract's scaled
    coefficients), and the statistics' gradients the oracle is to be given."""
    want_loss, want_npos, scaled = fused_expected(ref_stats(case, F64, **flags), grads, mean)
    if kind == "fused":
        loss, npos, *got = kernel_fused(case, grads, mean, keys=None, **flags)
        return loss, npos, got, want_loss, want_npos, scaled
    stats = kernel_fwd_self(case, **flags)
    sdt = _stat_dtype(case["q"].dtype)
    coefs = [None if g is None else g.to(sdt) for g in scaled[:3]]
    got = call_bwd_self(_ext().contrastive_bwd_cuda, case, coefs, stats, **flags)
    return None, stats[2], got, want_loss, want_npos, scaled


def check_self(kind, case, grads, mean, dtype, **flags):
    loss, npos, got, want_loss, want_npos, scaled = kernel_self(kind, case, grads, mean, **flags)
    torch.testing.assert_close(npos.to(F64), want_npos)
    if loss is not None:
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == F64 else dict(rtol=2e-5, atol=5e-5)
        torch.testing.assert_close(loss.to(F64), want_loss, **tol)
    check_self_grads(case, scaled, got, dtype, **flags)


SELF_CASES = [(kind, m, f) for kind in ("fused", "bwd") for m in MODES for f in FUSED_FLAGS]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,mode,flags", SELF_CASES,
                         ids=[f"{k}-{m}-{_id(f)}" for k, m, f in SELF_CASES])
def test_self_fp64(kind, mode, flags, slab_bytes):
    R, D = 37, 6
    slab_bytes(7 * _padded(R) * 8)  # slabs of 7 rows, a ragged last one
    case = self_case(R, D, F64, mode, scale=4.0, bias=-0.5)
    check_self(kind, case, random_grads(R, R, F64, False)[:3], kind == "fused", F64, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", (1, 8, 13, 200), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("kind", ("fused", "bwd"))
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_self_slab_sizes(mode, kind, rows, slab_bytes):
    """Slabs of one row, of a few rows with a ragged last one, and one slab for all."""
    R, D = 61, 5
    slab_bytes(rows * _padded(R) * 8)
    flags = dict(exclude_diag=True, decoupled=(mode == "targets"), pos_lse=(mode == "labels"))
    case = self_case(R, D, F64, mode, scale=6.0)
    check_self(kind, case, random_grads(R, R, F64, False, seed=rows)[:3], True, F64, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
@pytest.mark.parametrize("kind", ("fused", "bwd"))
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_self_low_precision(mode, kind, dtype, slab_bytes):
    R, D = 70, 24
    slab_bytes(16 * _padded(R) * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
    case = self_case(R, D, dtype, mode, scale=8.0)
    check_self(kind, case, random_grads(R, R, dtype, False)[:3], True, dtype, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (F64, F32, BF16), ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_self_is_the_sum_of_both_roles(mode, dtype, slab_bytes):
    """k=None gives the loss of k = q and, within rounding, the sum of its two gradients."""
    R, D = 45, 12
    slab_bytes(8 * _padded(R) * 8)
    case = self_case(R, D, dtype, mode, scale=5.0)
    flags = dict(exclude_diag=True, decoupled=(mode == "labels"))
    grads = random_grads(R, R, dtype, False)[:3]
    loss, npos, dz, dk, ds, db = kernel_fused(case, grads, True, keys=None, **flags)
    want = kernel_fused(dict(case, k=case["q"].clone()), grads, True, **flags)
    assert dk.shape == (0, D) and dz.shape == (R, D) and dz.dtype == dtype
    torch.testing.assert_close(npos, want[1], rtol=0, atol=0)
    for a, b in ((loss, want[0]), (ds, want[4]), (db, want[5])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    total = want[2].double() + want[3].double()
    mag = total.abs().max().item()
    # G + G.T is rounded once where the two feature sets round G twice and add
    rounding = {F64: 1e-12, F32: 1e-5, BF16: 2 ** -6}[dtype] * mag
    torch.testing.assert_close(dz.double(), total, rtol=0, atol=rounding + 1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("R", (0, 1, 9))
def test_self_empty_and_tiny(R):
    case = self_case(R, 3, F64, "targets" if R > 0 else "none")
    grads = random_grads(R, R, F64, False)[:3]
    for kind in ("fused", "bwd"):
        check_self(kind, case, grads, True, F64, exclude_diag=True)


@pytest.mark.gpu
def test_bwd_self_refuses_column_statistics():
    case = self_case(6, 4, F32, "targets")
    lse, pos, npos, *_ = kernel_fwd(case)
    g = torch.ones(6, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"column statistics need k"):
        _ext().contrastive_bwd_cuda(g, None, None, g, None, case["q"], None, case["scale"],
                                    case["bias"], case["targets"], None, None, lse, pos, npos,
                                    lse, False, False, False, True)


# The forward without k: per slab the columns up to its end; the rows before the slab get their
# sets over its columns from the part left of its diagonal block, read column by column, in
# running states finished after the last slab. Against the oracle with k = q, and against the
# full square (k given).


SELF_FWD_CASES = [(m, f) for m in MODES for f in FUSED_FLAGS]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,flags", SELF_FWD_CASES,
                         ids=[f"{m}-{_id(f)}" for m, f in SELF_FWD_CASES])
def test_fwd_self_fp64(mode, flags, slab_bytes):
    R, D = 37, 6
    slab_bytes(7 * _padded(R) * 8)  # slabs of 7 rows, a ragged last one
    check_self_stats(_ext().contrastive_fwd_cuda, self_case(R, D, F64, mode, scale=4.0, bias=-0.5), **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", (1, 8, 13, 200), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fwd_self_slab_sizes(mode, dtype, rows, slab_bytes):
    """Slabs of one row, of a few rows with a ragged last one, and one slab for all; the targets
    point both below and above the diagonal (seen by the row kernel or the column kernel)."""
    R, D = 61, 5
    slab_bytes(rows * _padded(R) * _stat_dtype(dtype).itemsize)
    for flags in (dict(exclude_diag=True, decoupled=True),
                  dict(exclude_diag=True, pos_lse=(mode == "labels"))):
        case = self_case(R, D, dtype, mode, scale=6.0)
        check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", (128, 256), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fwd_self_row_parts(mode, rows, slab_bytes):
    """Slabs of 128 and 256 rows: the column kernel cuts them into two and four row parts, each
    merged into its own states; a slab narrower than one block of columns and a ragged one."""
    R, D = 300, 4
    slab_bytes(rows * _padded(R) * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"), decoupled=(mode == "targets"))
    case = self_case(R, D, F32, mode, scale=5.0, n_classes=7)
    check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), F32)


@pytest.mark.gpu
def test_self_default_slabs():
    """The default budget: 2500 rows take slabs of 2048 and 452 (at most about an eighth of the
    rows, at least 2048), 32 row parts in the column kernel; forward, then backward."""
    R, D = 2500, 4
    flags = dict(exclude_diag=True, pos_lse=True)
    case = self_case(R, D, F32, "labels", scale=5.0, n_classes=50)
    check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), F32)
    check_self("bwd", case, random_grads(R, R, F32, False)[:3], True, F32, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (BF16, F16), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fwd_self_low_precision(dtype, mode, slab_bytes):
    R, D = 70, 24
    slab_bytes(16 * _padded(R) * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
    case = self_case(R, D, dtype, mode, scale=8.0)
    check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("R", (0, 1, 2, 9))
def test_fwd_self_tiny(R, slab_bytes):
    slab_bytes(2 * _padded(max(R, 1)) * 8)  # slabs of two rows
    for mode in ("none", "targets", "labels"):
        case = self_case(R, 3, F64, mode if R > 0 else "none")
        for flags in (dict(), dict(exclude_diag=True, decoupled=True)):
            check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), F64)


def test_fwd_self_refuses_column_statistics():
    """Checked before the tensors' device: runs without a GPU."""
    ext = _ext()
    q = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match=r"column statistics need k"):
        ext.contrastive_fwd_cuda(q, None, torch.tensor(1.0), torch.tensor(0.0), None, None, None,
                                 False, False, False, True)


@pytest.mark.gpu
@pytest.mark.parametrize("R,C", [(0, 5), (5, 0), (1, 1)])
def test_fused_empty_and_tiny(R, C):
    case = make_case(R, C, 3, F64, "targets" if R > 0 else "none")
    grads = random_grads(R, C, F64, False)[:3]
    loss, npos, dq, dk, ds, db = kernel_fused(case, grads, True)
    want_loss, want_npos, _ = fused_expected(ref_stats(case, F64), grads, True)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(npos, want_npos)
    assert dq.shape == (R, 3) and dk.shape == (C, 3)
    if R == 0 or C == 0:
        assert loss.item() == 0 and all((t == 0).all() for t in (dq, dk, ds, db))


@pytest.mark.gpu
def test_fused_leaves_the_coefficients_alone():
    """The sweep masks copies of the coefficients, not the caller's tensors."""
    case = make_case(9, 9, 4, F32, "targets")
    grads = random_grads(9, 9, F32, False)[:3]
    before = [g.clone() for g in grads]
    kernel_fused(case, grads, True)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


@pytest.mark.gpu
def test_fused_bad_input():
    case = make_case(6, 5, 4, F32, "targets")
    grads = random_grads(6, 5, F32, False)[:3]
    with pytest.raises(RuntimeError, match=r"g_pos must be a 1-D tensor of length R"):
        kernel_fused(case, [grads[0], torch.ones(5, device=DEVICE), grads[2]], True)
    with pytest.raises(RuntimeError, match=r"same dtype"):
        kernel_fused(dict(case, k=case["k"].double()), grads, True)


# ---------------------------------------------------------------------------------------------
# fp32 / bf16 / fp16


LOWP_FLAGS = [
    dict(col_stats=True),
    dict(exclude_diag=True, col_stats=True),
    dict(exclude_diag=True, decoupled=True),
    dict(pos_lse=True, col_stats=True),
    dict(exclude_diag=True, decoupled=True, pos_lse=True, col_stats=True),
]
LOWP_CASES = [(dtype, mode, flags) for dtype in (F32, BF16, F16) for mode in MODES
              for flags in LOWP_FLAGS]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mode,flags", LOWP_CASES,
                         ids=[f"{str(d)[6:]}-{m}-{_id(f)}" for d, m, f in LOWP_CASES])
def test_low_precision(dtype, mode, flags, slab_bytes):
    R, C, D = 53, 41, 24
    slab_bytes(16 * _padded(C) * 4)
    case = make_case(R, C, D, dtype, mode, scale=10.0, bias=0.1, seed=3)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, dtype, **flags), dtype)
    grads = random_grads(R, C, dtype, flags.get("col_stats", False), seed=4)
    check_grads(case, grads, stats, dtype, **flags)


# ---------------------------------------------------------------------------------------------
# Shapes: R = 1, C = 1, slab boundaries, C != R, D not a multiple of 8, one-row slabs


@pytest.mark.gpu
@pytest.mark.parametrize("R,C,D,slab_rows", SLAB_SHAPES)
@pytest.mark.parametrize("dtype", (F64, F32, BF16), ids=str)
def test_shapes(R, C, D, slab_rows, dtype, slab_bytes):
    esize = 8 if dtype == F64 else 4
    if slab_rows is not None:
        slab_bytes(slab_rows * _padded(C) * esize)
    flags = dict(exclude_diag=True, col_stats=True)
    case = make_case(R, C, D, dtype, "targets", scale=5.0, seed=R + C + D)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, dtype, **flags), dtype)
    grads = random_grads(R, C, dtype, True, seed=7)
    check_grads(case, grads, stats, dtype, **flags)


@pytest.mark.gpu
def test_wide_logit_spread():
    """Rows whose logits lie at very different heights (norms 0.01 .. 50, unnormalized)."""
    R, C, D = 70, 2100, 4
    case = make_case(R, C, D, F32, "targets", scale=1.0, seed=8, normalize=False)
    case["q"] = case["q"] * torch.logspace(-2, 1.7, R, dtype=F32, device=DEVICE)[:, None]
    flags = dict(exclude_diag=True, col_stats=True)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, F32, **flags), F32)
    check_grads(case, random_grads(R, C, F32, True), stats, F32, **flags)


@pytest.mark.gpu
def test_slab_size_does_not_change_results(slab_bytes):
    R, C, D = 300, 257, 16
    flags = dict(exclude_diag=True, col_stats=True, pos_lse=True)
    case = make_case(R, C, D, F64, "labels", seed=11)
    grads = random_grads(R, C, F64, True)
    outs = []
    for rows in (1, 13, 300):
        slab_bytes(rows * _padded(C) * 8)
        stats = kernel_fwd(case, **flags)
        outs.append((stats, kernel_bwd(case, grads, stats, **flags)))
    for stats, g in outs[1:]:
        for a, b in zip(stats + g, outs[0][0] + outs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Strides, extreme scales, empty sets, small fp16 gradients


@pytest.mark.gpu
def test_non_contiguous_inputs():
    R, C, D = 40, 33, 12
    flags = dict(exclude_diag=True, col_stats=True)
    base = make_case(R, C, D, F64, "targets", seed=2)
    wide = torch.zeros(R, 2 * D, dtype=F64, device=DEVICE)
    wide[:, ::2] = base["q"]
    kt = base["k"].t().contiguous()
    tall = torch.zeros(2 * C, D, dtype=F64, device=DEVICE)
    tall[::2] = base["k"]
    for q, k in ((wide[:, ::2], kt.t()), (base["q"].t().contiguous().t(), tall[::2])):
        assert not q.is_contiguous() or not k.is_contiguous()
        case = dict(base, q=q, k=k)
        stats = kernel_fwd(case, **flags)
        check_stats(stats, ref_stats(base, **flags), F64)
        grads = random_grads(R, C, F64, True)
        check_grads(case, grads, stats, F64, **flags)
    # k=None: the forward over half the square of non-contiguous features, slabs of 8 rows
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FASTCL_CUDA_SLAB_BYTES", str(8 * _padded(R) * 8))
        for q in (wide[:, ::2], base["q"].t().contiguous().t()):
            square = dict(base, k=base["q"])
            got = kernel_fwd_self(dict(square, q=q), **dict(flags, col_stats=False))
            check_stats(got, ref_stats(square, exclude_diag=True), F64)
    # non-contiguous targets, labels and statistic gradients; int32 targets
    targets = torch.stack([base["targets"], base["targets"]], 1)[:, 0]
    for t in (targets, base["targets"].int()):
        case = dict(base, targets=t)
        stats = kernel_fwd(case, **flags)
        check_stats(stats, ref_stats(base, **flags), F64)
        grads = [g[::2] for g in (torch.randn(2 * R, dtype=F64, device=DEVICE),) * 3]
        grads += [torch.randn(2 * C, dtype=F64, device=DEVICE)[::2], None]
        check_grads(case, grads, stats, F64, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (BF16, F16, F32), ids=str)
def test_scale_100_no_overflow(dtype):
    """CLIP's clamp (scale 100) with the self-similarity on the excluded diagonal (NT-Xent)."""
    R = 64
    case = make_case(R, R, 32, dtype, "targets", scale=100.0, bias=-10.0, seed=9)
    case["k"] = case["q"]
    case["targets"] = torch.arange(R, device=DEVICE).roll(1)
    flags = dict(exclude_diag=True, col_stats=True)
    stats = kernel_fwd(case, **flags)
    for s in stats:
        assert torch.isfinite(s).all()
    check_stats(stats, ref_stats(case, dtype, **flags), dtype)
    grads = random_grads(R, R, dtype, True, seed=2)
    check_grads(case, grads, stats, dtype, **flags)


@pytest.mark.gpu
def test_empty_sets_give_minus_inf_and_zero_grad():
    # R = C = 1 with the diagonal excluded: every set is empty.
    case = make_case(1, 1, 4, F64, "targets")
    flags = dict(exclude_diag=True, col_stats=True)
    stats = kernel_fwd(case, **flags)
    lse, pos, npos, mean, col_lse, col_mean, lse2 = stats
    assert lse2.shape == (0,)
    assert torch.isneginf(lse).all() and torch.isneginf(col_lse).all()
    assert (pos == 0).all() and (npos == 0).all() and (mean == 0).all() and (col_mean == 0).all()
    dq, dk, ds, db = kernel_bwd(case, random_grads(1, 1, F64, True), stats, **flags)
    for t in (dq, dk, ds, db):
        assert (t == 0).all()
    # decoupled label mode where every allowed column is a positive: empty denominator
    case = make_case(3, 3, 4, F64, "labels")
    case["row_labels"] = torch.zeros(3, dtype=torch.long, device=DEVICE)
    case["col_labels"] = torch.zeros(3, dtype=torch.long, device=DEVICE)
    flags = dict(exclude_diag=True, decoupled=True, pos_lse=True)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, **flags), F64)
    assert torch.isneginf(stats[0]).all()
    check_grads(case, random_grads(3, 3, F64, False), stats, F64, **flags)


@pytest.mark.gpu
def test_no_rows_or_no_columns():
    for R, C in ((0, 5), (5, 0), (0, 0)):
        case = make_case(R, C, 4, F32, "none")
        flags = dict(col_stats=True)
        stats = kernel_fwd(case, **flags)
        check_stats(stats, ref_stats(case, F32, **flags), F32)
        grads = random_grads(R, C, F32, True)
        for g, x in zip(kernel_bwd(case, grads, stats, **flags),
                        (case["q"], case["k"], case["scale"], case["bias"])):
            assert g.shape == x.shape and (g == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("scale,magnitude", [(5.0, 1e-5), (20.0, 1e3)])
def test_fp16_gradient_tile_keeps_small_and_large_entries(scale, magnitude):
    """Statistic gradients of about 1e-5 over a flat softmax (a mean over a large batch) give
    tile entries near 1e-8, which fp16 flushes to zero; large ones (loss scaling) must not
    overflow. The tile is stored times a power of two chosen from the gradients' magnitude."""
    R, C, D = 512, 512, 64
    flags = dict(col_stats=True)
    case = make_case(R, C, D, F16, "targets", scale=scale, seed=12)
    stats = kernel_fwd(case, **flags)
    grads = random_grads(R, C, F16, True, seed=5, magnitude=magnitude)
    check_grads(case, grads, stats, F16, mag_floor=0.0, **flags)


# ---------------------------------------------------------------------------------------------
# lse2: the second log-sum-exp of the denominator set at lse2_mult = mu times the logits, from the
# same kernels (one more running sum under lse's running maximum; in the backward one more
# exponential per element of the tile, only with g_lse2), with k given and with k=None (the
# self-similarity forward over several slabs and row parts, the G + G.T backward). Against the
# oracle's lse2 (contrastive_stats_ref(..., lse2_mult=mu)) and the autograd of
# sum g . stats + g_lse2 . lse2, as above.


LSE2_MULTS = (0.5, 2.0)


def kernel_fwd2(case, mu, keys="k", **flags):
    """The forward's seven outputs at ``lse2_mult=mu`` (``keys=None``: k=None)."""
    f = flags_of(flags)
    return _ext().contrastive_fwd_cuda(
        case["q"], case[keys] if keys else None, case["scale"], case["bias"], case["targets"],
        case["row_labels"], case["col_labels"], f["exclude_diag"], f["decoupled"], f["pos_lse"],
        f["col_stats"], mu)


def kernel_bwd2(case, grads, g_lse2, stats, mu, keys="k", **flags):
    """The backward given the five statistics' gradients ``grads``, ``g_lse2`` and the forward's
    seven outputs ``stats``."""
    f = flags_of(flags)
    lse, pos, npos, _mean, col_lse, _col_mean, lse2 = stats
    return _ext().contrastive_bwd_cuda(
        *grads, case["q"], case[keys] if keys else None, case["scale"], case["bias"],
        case["targets"], case["row_labels"], case["col_labels"], lse, pos, npos, col_lse,
        f["exclude_diag"], f["decoupled"], f["pos_lse"], f["col_stats"], g_lse2, lse2, mu)


def lse2_grad(R, dtype, seed=21, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, generator=g, dtype=F64) * magnitude).to(_stat_dtype(dtype)).to(DEVICE)


def run_lse2(case, mu, dtype, keys="k", grads=None, **flags):
    """Forward at mu against the oracle, then the backward with g_lse2 alone and with the other
    statistics' gradients ``grads`` (default: g_lse, g_pos, and the column ones with
    col_stats) too."""
    R, C = case["q"].shape[0], case["k"].shape[0]
    stats = kernel_fwd2(case, mu, keys, **flags)
    check_fwd_lse2(stats, case, mu, dtype, **flags)
    g2 = lse2_grad(R, dtype)
    none = [None] * 5
    if grads is None:
        grads = random_grads(R, C, dtype, flags.get("col_stats", False), drop=(2,))
    for gs in (none, grads):
        got = kernel_bwd2(case, gs, g2, stats, mu, keys, **flags)
        check_grads_lse2(got, case, gs, g2, mu, dtype, keys is None, **flags)
    return stats


LSE2_CASES = [(mode, flags, mu) for mode in MODES for flags in FLAG_COMBOS for mu in LSE2_MULTS]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,flags,mu", LSE2_CASES,
                         ids=[f"{m}-{_id(f)}-mu{mu}" for m, f, mu in LSE2_CASES])
def test_lse2_fp64(mode, flags, mu, slab_bytes):
    R, C, D = 37, 29, 6
    slab_bytes(7 * _padded(C) * 8)  # several slabs, a ragged last one
    case = make_case(R, C, D, F64, mode, scale=4.0, bias=-0.5)
    run_lse2(case, mu, F64, **flags)


LSE2_SELF_CASES = [(mode, flags, mu) for mode in MODES for flags in FUSED_FLAGS
                   for mu in LSE2_MULTS]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,flags,mu", LSE2_SELF_CASES,
                         ids=[f"{m}-{_id(f)}-mu{mu}" for m, f, mu in LSE2_SELF_CASES])
def test_lse2_self_fp64(mode, flags, mu, slab_bytes):
    """k=None: the forward over slabs of 7 rows (running row states, the self column kernel)
    and the G + G.T backward; the statistics also equal those of the full square (k given)."""
    R, D = 37, 6
    slab_bytes(7 * _padded(R) * 8)
    case = self_case(R, D, F64, mode, scale=4.0, bias=-0.5)
    stats = run_lse2(case, mu, F64, keys=None, **flags)
    square = kernel_fwd2(case, mu, **flags)
    for name, a, b in zip(("lse", "pos", "npos", "mean", "lse2"),
                          stats[:4] + stats[6:], square[:4] + square[6:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", (1, 13, 200), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_lse2_self_slab_sizes(mode, rows, slab_bytes):
    """k=None with slabs of one row, of a few rows with a ragged last one, and one for all."""
    R, D = 61, 5
    slab_bytes(rows * _padded(R) * 8)
    flags = dict(exclude_diag=True, decoupled=(mode == "targets"), pos_lse=(mode == "labels"))
    case = self_case(R, D, F64, mode, scale=6.0)
    run_lse2(case, 2.0 if rows == 13 else 0.5, F64, keys=None, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", (128, 256), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_lse2_self_row_parts(mode, rows, slab_bytes):
    """k=None, slabs of 128 and 256 rows: the self column kernel's two and four row parts, each
    with its own running states (lse2's sums merged with theirs)."""
    R, D = 300, 4
    slab_bytes(rows * _padded(R) * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"), decoupled=(mode == "targets"))
    case = self_case(R, D, F32, mode, scale=5.0, n_classes=7)
    stats = kernel_fwd2(case, 0.5, None, **flags)
    check_fwd_lse2(stats, case, 0.5, F32, **flags)


@pytest.mark.gpu
def test_lse2_self_default_slabs():
    """k=None at the default budget: 2100 rows take slabs of 2048 and 52, 32 row parts in the
    self column kernel; forward, then the backward with g_lse2 and g_lse."""
    R, D, mu = 2100, 4, 0.5
    flags = dict(exclude_diag=True, pos_lse=True)
    case = self_case(R, D, F32, "labels", scale=5.0, n_classes=50)
    stats = kernel_fwd2(case, mu, None, **flags)
    check_fwd_lse2(stats, case, mu, F32, **flags)
    grads = [random_grads(R, R, F32, False)[0], None, None, None, None]
    g2 = lse2_grad(R, F32)
    got = kernel_bwd2(case, grads, g2, stats, mu, None, **flags)
    check_grads_lse2(got, case, grads, g2, mu, F32, True, **flags)


LSE2_LOWP_CASES = [(dtype, keys, mode) for dtype in (F32, BF16, F16) for keys in ("k", None)
                   for mode in ("targets", "labels")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,keys,mode", LSE2_LOWP_CASES,
                         ids=[f"{str(d)[6:]}-{k or 'self'}-{m}" for d, k, m in LSE2_LOWP_CASES])
def test_lse2_low_precision(dtype, keys, mode, slab_bytes):
    R, C, D = (53, 41, 24) if keys else (70, 70, 24)
    slab_bytes(16 * _padded(C) * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"), decoupled=(mode == "targets"),
                 col_stats=keys is not None)
    case = (make_case(R, C, D, dtype, mode, scale=10.0, bias=0.1, seed=3) if keys
            else self_case(R, D, dtype, mode, scale=8.0))
    for mu in LSE2_MULTS:
        run_lse2(case, mu, dtype, keys, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("keys", ("k", None), ids=("k", "self"))
@pytest.mark.parametrize("magnitude", (1e-5, 1e3))
def test_lse2_fp16_tile_range(magnitude, keys):
    """g_lse2 alone sets the fp16 tile's factor (|G| <= |g_lse2| mu): small gradients are not
    flushed to zero, large ones do not overflow."""
    R, D, mu = 256, 32, 0.5
    flags = dict(exclude_diag=True)
    case = (make_case(R, R, D, F16, "targets", scale=10.0, seed=12) if keys
            else self_case(R, D, F16, "targets", scale=10.0, seed=12))
    stats = kernel_fwd2(case, mu, keys, **flags)
    g2 = lse2_grad(R, F16, magnitude=magnitude)
    got = kernel_bwd2(case, [None] * 5, g2, stats, mu, keys, **flags)
    check_grads_lse2(got, case, [None] * 5, g2, mu, F16, keys is None, mag_floor=0.0, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("keys", ("k", None), ids=("k", "self"))
def test_lse2_empty_sets(keys):
    """Rows with an empty denominator set: lse2 = -inf, and their g_lse2 gives no term (no
    NaN), beside rows whose set is not empty."""
    mu = 0.5
    # R = C = 1 with the diagonal excluded: every set is empty
    case = make_case(1, 1, 4, F64, "targets") if keys else self_case(1, 4, F64, "targets")
    flags = dict(exclude_diag=True)
    stats = kernel_fwd2(case, mu, keys, **flags)
    assert torch.isneginf(stats[6]).all()
    got = kernel_bwd2(case, [torch.ones(1, dtype=F64, device=DEVICE)] + [None] * 4,
                      torch.ones(1, dtype=F64, device=DEVICE), stats, mu, keys, **flags)
    assert all((t == 0).all() for t in got)
    # decoupled label mode: the rows of label 0 have every column as a positive (k given: the
    # others none; k=None: every row has the same label, all sets empty)
    flags = dict(exclude_diag=True, decoupled=True, pos_lse=True)
    if keys:
        case = make_case(5, 4, 4, F64, "labels")
        case["row_labels"] = torch.tensor([0, 1, 0, 1, 1], device=DEVICE)
        case["col_labels"] = torch.zeros(4, dtype=torch.long, device=DEVICE)
    else:
        case = self_case(4, 4, F64, "labels")
        case["row_labels"] = case["col_labels"] = torch.zeros(4, dtype=torch.long, device=DEVICE)
    R = case["q"].shape[0]
    grads = [lse2_grad(R, F64, seed=1), lse2_grad(R, F64, seed=2), None, None, None]
    stats = run_lse2(case, mu, F64, keys, grads=grads, **flags)
    empty = case["row_labels"] == 0
    assert torch.isneginf(stats[6][empty]).all() and torch.isfinite(stats[6][~empty]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("R,C,keys", [(0, 5, "k"), (5, 0, "k"), (0, 0, "k"), (1, 1, "k"),
                                      (1, 3, "k"), (0, 0, None), (1, 1, None), (2, 2, None)])
def test_lse2_tiny(R, C, keys, slab_bytes):
    slab_bytes(2 * _padded(max(C, 1)) * 8)  # slabs of two rows
    mu = 2.0
    mode = "targets" if R > 0 and C > 0 else "none"
    case = make_case(R, C, 3, F64, mode) if keys else self_case(R, 3, F64, mode)
    for flags in (dict(), dict(exclude_diag=True, col_stats=keys is not None)):
        stats = kernel_fwd2(case, mu, keys, **flags)
        check_fwd_lse2(stats, case, mu, F64, **flags)
        if C == 0:
            assert torch.isneginf(stats[6]).all()
        grads = [lse2_grad(R, F64, seed=3), None, None, None, None]
        for gs in ([None] * 5, grads):
            got = kernel_bwd2(case, gs, lse2_grad(R, F64), stats, mu, keys, **flags)
            check_grads_lse2(got, case, gs, lse2_grad(R, F64), mu, F64, keys is None, **flags)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (F64, BF16), ids=str)
@pytest.mark.parametrize("keys", ("k", None), ids=("k", "self"))
def test_lse2_off(keys, dtype, slab_bytes):
    """mu = 0 (the default): lse2 is an empty [0] of the statistics dtype; lse2 changes none of
    the other statistics; the backward without g_lse2 ignores lse2 and its multiplier, and a
    zero g_lse2 adds nothing."""
    R, D = 29, 8
    slab_bytes(8 * _padded(R) * 8)
    flags = dict(exclude_diag=True, pos_lse=True)
    case = (make_case(R, R, D, dtype, "labels", scale=5.0) if keys
            else self_case(R, D, dtype, "labels", scale=5.0))
    off = kernel_fwd2(case, 0.0, keys, **flags)
    default = call_fwd(_ext().contrastive_fwd_cuda, dict(case, k=case["k"] if keys else None),
                       **flags)
    on = kernel_fwd2(case, 2.0, keys, **flags)
    sdt = _stat_dtype(dtype)
    for stats in (off, default):
        assert len(stats) == 7 and stats[6].shape == (0,) and stats[6].dtype == sdt
    for a, b, c in zip(off[:6], default[:6], on[:6]):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-12 if dtype == F64 else 1e-6, atol=1e-12)
    grads = random_grads(R, R, dtype, False, drop=(2,))
    want = kernel_bwd2(case, grads, None, off, 0.0, keys, **flags)
    for g2 in (None, torch.zeros(R, dtype=sdt, device=DEVICE)):
        got = kernel_bwd2(case, grads, g2, on, 2.0, keys, **flags)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12 if dtype == F64 else 1e-5, atol=1e-12)


def check_lse2_errors(ext, device):
    """The refusals of the lse2 arguments (before the tensors' device is checked)."""
    R, D = 5, 3
    q = torch.randn(R, D, device=device)
    k = torch.randn(4, D, device=device)
    scale = torch.tensor(2.0, device=device)
    bias = torch.tensor(0.0, device=device)
    for keys in (k, None):
        for mu in (-1.0, float("nan"), float("inf")):
            with pytest.raises(RuntimeError,
                               match=r"contrastive_fwd_cuda: lse2_mult must be a finite number "
                                     r">= 0"):
                ext.contrastive_fwd_cuda(q, keys, scale, bias, None, None, None, False, False,
                                         False, False, mu)
    g = torch.ones(R, device=device)
    empty = torch.empty(0, device=device)

    def bwd(g_lse2, lse2, mu, keys=k):
        return ext.contrastive_bwd_cuda(g, None, None, None, None, q, keys, scale, bias, None,
                                        None, None, g, g, g, empty, False, False, False, False,
                                        g_lse2, lse2, mu)

    for keys in (k, None):
        with pytest.raises(RuntimeError, match=r"contrastive_bwd_cuda: lse2_mult must be a "
                                               r"finite number >= 0"):
            bwd(g, g, -0.5, keys)
        with pytest.raises(RuntimeError, match=r"contrastive_bwd_cuda: g_lse2 was given but "
                                               r"lse2_mult is 0"):
            bwd(g, g, 0.0, keys)
        with pytest.raises(RuntimeError, match=r"contrastive_bwd_cuda: g_lse2 was given but "
                                               r"lse2 is None"):
            bwd(g, None, 0.5, keys)
        with pytest.raises(RuntimeError, match=r"contrastive_bwd_cuda: lse2 must be a 1-D "
                                               r"tensor of length R = 5, got shape \[4\]"):
            bwd(g, g[:4], 0.5, keys)
        with pytest.raises(RuntimeError, match=r"contrastive_bwd_cuda: lse2 must be a 1-D "
                                               r"tensor of length R = 5"):
            bwd(g, g[:, None], 0.5, keys)
        with pytest.raises(RuntimeError, match=r"contrastive_bwd_cuda: g_lse2 must be a 1-D "
                                               r"tensor of length R = 5, got shape \[6\]"):
            bwd(torch.ones(6, device=device), g, 0.5, keys)


def test_lse2_bad_arguments_are_refused_before_the_device():
    """Checked before the tensors' device: runs without a GPU (CPU tensors)."""
    check_lse2_errors(_ext(), "cpu")


@pytest.mark.gpu
def test_lse2_bad_arguments():
    check_lse2_errors(_ext(), DEVICE)


# ---------------------------------------------------------------------------------------------
# Large shapes


@pytest.mark.gpu
@pytest.mark.device_only
@pytest.mark.parametrize("N,D,dtype", [(16384, 1024, BF16), (16384, 256, F16), (8192, 1000, F32),
                                       (12345, 77, BF16)])
def test_large(N, D, dtype):
    """A symmetric CLIP-like call: targets on the diagonal, column statistics, scale 1/0.07."""
    flags = dict(col_stats=True)
    case = make_case(N, N, D, dtype, "none", scale=1 / 0.07, bias=0.0, seed=N)
    case["targets"] = torch.arange(N, device=DEVICE)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, dtype, **flags), dtype)
    g = torch.full((N,), 0.5 / N, dtype=F32, device=DEVICE)
    grads = [g, -g, None, g, None]
    got = kernel_bwd(case, grads, stats, **flags)
    want = ref_grads(case, grads, F32, **flags)
    for name, a, b in zip(GRAD_NAMES, got, want):
        mag = b.abs().max().item()
        err = (a.float() - b).abs().max().item()
        tol = {BF16: 1e-2, F16: 2e-3, F32: 1e-4}[dtype] * mag + 1e-7
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e} (max |grad| {mag:.3e})"


@pytest.mark.gpu
@pytest.mark.device_only
@pytest.mark.parametrize("keys", ("k", "self"))
def test_peak_memory_is_linear(keys, monkeypatch):
    """At N = 32768 the extra memory is one slab plus O(N D) terms, far below N^2 bytes; with
    k=None (self-similarity: the running row states of the forward, the dq accumulator of the
    backward) too."""
    ext = _ext()
    N, D = 32768, 256
    budget = 64 << 20
    q = torch.nn.functional.normalize(torch.randn(N, D, device=DEVICE), dim=1).to(BF16)
    k = torch.nn.functional.normalize(torch.randn(N, D, device=DEVICE), dim=1).to(BF16)
    scale = torch.tensor(1 / 0.07, device=DEVICE)
    bias = torch.tensor(0.0, device=DEVICE)
    targets = torch.arange(N, device=DEVICE)
    g = torch.full((N,), 0.5 / N, device=DEVICE)
    flags = (False, False, False, True)

    def run(n):
        if keys == "self":
            no_cols = flags[:3] + (False,)
            st = ext.contrastive_fwd_cuda(q[:n], None, scale, bias, targets[:n], None, None,
                                          *no_cols)
            return ext.contrastive_bwd_cuda(g[:n], -g[:n], g[:n], None, None, q[:n], None,
                                            scale, bias, targets[:n], None, None, st[0], st[1],
                                            st[2], st[4], *no_cols)
        st = ext.contrastive_fwd_cuda(q[:n], k[:n], scale, bias, targets[:n], None, None, *flags)
        return ext.contrastive_bwd_cuda(g[:n], -g[:n], None, g[:n], None, q[:n], k[:n], scale,
                                        bias, targets[:n], None, None, st[0], st[1], st[2], st[4],
                                        *flags)

    extra, grads = peak_extra_memory(run, N, budget, monkeypatch)
    assert all(torch.isfinite(x).all() for x in grads)
    # one slab, the fp32 dk accumulator, dq/dk, per-slab products, statistics, and slack
    linear = 4 * N * D * 4 + 64 * N * 4 + (16 << 20)
    assert extra <= budget + linear, f"extra memory {extra / 2**20:.1f} MiB"
    assert extra < N * N // 4, f"extra memory {extra / 2**20:.1f} MiB is not far below N^2 bytes"


# ---------------------------------------------------------------------------------------------
# The op and the public losses on the cuda backend


@pytest.mark.gpu
@pytest.mark.parametrize("mu", (0.0, 0.5), ids=("no-lse2", "lse2"))
@pytest.mark.parametrize("labels,col", [(False, True), (True, False)])
def test_opcheck(labels, col, mu):
    from fastcl.ops.contrastive import contrastive_bwd, contrastive_fwd

    _ext()
    dev = torch.device(DEVICE)
    q = torch.randn(6, 5, device=dev, requires_grad=True)
    k = torch.randn(6, 5, device=dev, requires_grad=True)
    scale = torch.tensor(2.0, device=dev, requires_grad=True)
    bias = torch.tensor(0.5, device=dev, requires_grad=True)
    targets = None if labels else torch.tensor([1, 0, 3, -1, 5, 4], device=dev)
    lab = torch.tensor([0, 1, 0, 1, 2, 2], device=dev) if labels else None
    args = (q, k, scale, bias, targets, lab, lab, labels, False, labels, col, mu, "cuda")
    torch.library.opcheck(contrastive_fwd, args)
    with torch.no_grad():
        lse, pos, npos, mean, col_lse, col_mean, lse2 = contrastive_fwd(*args)
    assert lse2.shape == ((6,) if mu > 0 else (0,))
    g = [torch.randn_like(lse), torch.randn_like(pos), None,
         torch.randn_like(col_lse) if col else None, None]
    g_lse2 = torch.randn_like(lse) if mu > 0 else None
    bwd_args = (*g, q.detach(), k.detach(), scale.detach(), bias.detach(), targets, lab, lab,
                lse, pos, npos, col_lse, labels, False, labels, col, g_lse2, lse2, mu, "cuda")
    torch.library.opcheck(contrastive_bwd, bwd_args)


def _clip(x, y, s, backend):
    return fastcl.clip_loss(x, y, s, label_smoothing=0.1, backend=backend)


def _info_nce_negatives(x, y, s, backend):
    return fastcl.info_nce(x, y, logit_scale=s, negatives=0.5 * y[:5], backend=backend)


def _nt_xent(x, y, s, backend):
    return fastcl.nt_xent(x, y, logit_scale=s, backend=backend)


def _supcon_in(x, y, s, backend):
    labels = torch.arange(x.shape[0], device=x.device) % 7
    return fastcl.supcon(torch.stack([x, y], 1), labels, logit_scale=s, variant="in",
                         backend=backend)


def _dcl(x, y, s, backend):
    return fastcl.dcl(x, y, logit_scale=s, backend=backend)


def _nt_xent_per_anchor(x, y, s, backend):
    """The statistics op with k=None (no reduction), weighted per anchor."""
    per = fastcl.nt_xent(x, y, logit_scale=s, reduction="none", backend=backend)
    return (per * torch.linspace(0.5, 1.5, per.numel(), device=per.device)).sum()


def _multiview(x, y, s, backend):
    """mv_infonce over three views: the statistics op with k=None over 3N anchors."""
    return fastcl.multiview_loss(torch.stack([x, y, x.flip(0)]), logit_scale=s,
                                 backend=backend)


LOSSES = dict(clip=_clip, info_nce_negatives=_info_nce_negatives, nt_xent=_nt_xent,
              supcon_in=_supcon_in, dcl=_dcl, nt_xent_per_anchor=_nt_xent_per_anchor,
              multiview=_multiview)


@pytest.mark.gpu
@pytest.mark.device_only
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
def test_losses_end_to_end(loss, dtype, backend):
    """Every loss on the GPU backends against the reference (the CUDA C++ backend runs the
    reduced one-direction and self-similarity losses as one fused sweep, and its backward
    takes k=None on the blocks on and below the diagonal; Triton runs its one-launch symmetric
    backward)."""
    if backend == "cuda":
        _ext()
    assert dispatch.why_not(backend, "info_nce", torch.device(DEVICE), dtype) is None
    N, D = 257, 96
    g = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(DEVICE, dtype)
    y0 = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(DEVICE, dtype)
    results = {}
    for be in (backend, "reference"):
        x = x0.clone().requires_grad_(True)
        y = y0.clone().requires_grad_(True)
        s = torch.tensor(14.0, device=DEVICE, requires_grad=True)
        out = LOSSES[loss](x, y, s, be)
        out.backward()
        results[be] = (out.detach(), x.grad, y.grad, s.grad)
    rel = 1e-4 if dtype == F32 else 2e-2
    for name, a, b in zip(("loss", "dx", "dy", "dscale"), results[backend],
                          results["reference"]):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{loss} {name}: {a.dtype} {a.shape}"
        err = (a.double() - b.double()).abs().max().item()
        bound = rel * b.double().abs().max().item() + 1e-6
        assert err <= bound, f"{loss} {name}: error {err:.3e} > {bound:.3e}"
