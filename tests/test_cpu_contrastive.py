"""The C++ CPU kernels of the contrastive primitive (``fastcl._C.contrastive_{fwd,bwd,fused}_cpu``).

Forward statistics against :func:`fastcl.reference.contrastive.contrastive_stats_ref`; gradients
against the autograd of the same oracle in fp64. In fp64 the comparison is tight. In fp32, bf16
and fp16 a gradient's error against the fp64 oracle may be at most about twice the error of the
plain-PyTorch oracle run at that dtype, plus a small absolute slack (the rule flash-attention's
tests use). Slab boundaries are exercised through ``FASTCL_CPU_SLAB_BYTES`` (read at every call),
both instruction-set variants through ``FASTCL_CPU_ISA``, and both ways of taking the
exponentials (one shared shift per tile, or separate row and column shifts) through
``FASTCL_CPU_EXP_SPAN`` (negative: always separate shifts).
"""

from __future__ import annotations

import pytest
import torch
from _cases import SLAB_SHAPES
from _contrastive_checks import (BF16, F16, F32, F64, FLAG_COMBOS, MODES, call_bwd,
                                 call_bwd_self, call_fused, call_fwd,
                                 check_fused_equals_two_kernels, check_fwd_lse2,
                                 check_grads_lse2, check_self_grads, check_self_stats,
                                 check_stats, flags_of, fused_expected, make_case, random_grads,
                                 ref_stats, self_case)
from _contrastive_checks import check_grads as check_grads_of
from _contrastive_checks import flag_id as _id
from _contrastive_checks import stat_dtype as _stat_dtype
from _memory import peak_rss_growth

try:
    from fastcl import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

if _C is None or not hasattr(_C, "contrastive_fwd_cpu"):
    pytest.skip("fastcl._C with the CPU contrastive kernels is not built", allow_module_level=True)


def kernel_fwd(case, **flags):
    return call_fwd(_C.contrastive_fwd_cpu, case, **flags)


def kernel_bwd(case, grads, stats, **flags):
    return call_bwd(_C.contrastive_bwd_cpu, case, grads, stats, **flags)


def check_grads(case, grads, stats, dtype, got=None, **flags):
    """``got`` (default: the backward kernel's gradients) against the oracle's for ``grads``."""
    got = kernel_bwd(case, grads, stats, **flags) if got is None else got
    return check_grads_of(got, case, grads, dtype, **flags)


@pytest.fixture
def slab_bytes(monkeypatch):
    def set_(n):
        monkeypatch.setenv("FASTCL_CPU_SLAB_BYTES", str(n))
    return set_


# ---------------------------------------------------------------------------------------------
# fp64: every flag combination in every mode, slabs of 7 rows (several slabs, a ragged last one)


SHIFTS = ("shared-shift", "separate-shifts")


def use_shift(monkeypatch, shift):
    if shift == "separate-shifts":
        monkeypatch.setenv("FASTCL_CPU_EXP_SPAN", "-1")


# the shift choice only matters with column statistics
FP64_CASES = [(mode, flags, shift) for mode in MODES for flags in FLAG_COMBOS for shift in SHIFTS
              if shift == "shared-shift" or flags["col_stats"]]


@pytest.mark.parametrize("mode,flags,shift", FP64_CASES,
                         ids=[f"{m}-{_id(f)}-{s}" for m, f, s in FP64_CASES])
def test_fp64_all_flags(mode, flags, shift, slab_bytes, monkeypatch):
    use_shift(monkeypatch, shift)
    R, C, D = 37, 29, 6
    slab_bytes(7 * C * 8)
    case = make_case(R, C, D, F64, mode, scale=4.0, bias=-0.5)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, **flags), F64)
    grads = random_grads(R, C, F64, flags["col_stats"])
    check_grads(case, grads, stats, F64, **flags)


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
# fp32 / bf16 / fp16


LOWP_FLAGS = [
    dict(col_stats=True),
    dict(exclude_diag=True, col_stats=True),
    dict(exclude_diag=True, decoupled=True),
    dict(pos_lse=True, col_stats=True),
    dict(exclude_diag=True, decoupled=True, pos_lse=True, col_stats=True),
]


LOWP_CASES = [(dtype, mode, flags, shift) for dtype in (F32, BF16, F16) for mode in MODES
              for flags in LOWP_FLAGS for shift in SHIFTS
              if shift == "shared-shift" or (dtype == F32 and flags.get("col_stats"))]


@pytest.mark.parametrize("dtype,mode,flags,shift", LOWP_CASES,
                         ids=[f"{str(d)[6:]}-{m}-{_id(f)}-{s}" for d, m, f, s in LOWP_CASES])
def test_low_precision(dtype, mode, flags, shift, slab_bytes, monkeypatch):
    use_shift(monkeypatch, shift)
    R, C, D = 53, 41, 24
    slab_bytes(16 * C * 4)
    case = make_case(R, C, D, dtype, mode, scale=10.0, bias=0.1, seed=3)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, dtype, **flags), dtype)
    grads = random_grads(R, C, dtype, flags.get("col_stats", False), seed=4)
    check_grads(case, grads, stats, dtype, **flags)


# ---------------------------------------------------------------------------------------------
# Shapes: R = 1, slab boundaries, C != R, odd D, one-row slabs


@pytest.mark.parametrize("R,C,D,slab_rows", SLAB_SHAPES)
@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
def test_shapes(R, C, D, slab_rows, dtype, slab_bytes):
    esize = 8 if dtype == F64 else 4
    if slab_rows is not None:
        slab_bytes(slab_rows * C * esize)
    flags = dict(exclude_diag=True, col_stats=True)
    case = make_case(R, C, D, dtype, "targets", scale=5.0, seed=R + C + D)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, dtype, **flags), dtype)
    grads = random_grads(R, C, dtype, True, seed=7)
    check_grads(case, grads, stats, dtype, **flags)


def test_wide_logit_spread(monkeypatch):
    """Rows and columns whose maxima lie far apart (more than the shared-shift span)."""
    R, C, D = 70, 2100, 4
    case = make_case(R, C, D, F32, "targets", scale=1.0, seed=8, normalize=False)
    case["q"] = case["q"] * torch.logspace(-2, 1.7, R, dtype=F32)[:, None]  # norms 0.01 .. 50
    flags = dict(exclude_diag=True, col_stats=True)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, F32, **flags), F32)
    check_grads(case, random_grads(R, C, F32, True), stats, F32, **flags)


def test_slab_size_does_not_change_results(slab_bytes):
    R, C, D = 300, 257, 16
    flags = dict(exclude_diag=True, col_stats=True, pos_lse=True)
    case = make_case(R, C, D, F64, "labels", seed=11)
    grads = random_grads(R, C, F64, True)
    outs = []
    for rows in (1, 13, 300):
        slab_bytes(rows * C * 8)
        stats = kernel_fwd(case, **flags)
        outs.append((stats, kernel_bwd(case, grads, stats, **flags)))
    for stats, g in outs[1:]:
        for a, b in zip(stats + g, outs[0][0] + outs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", (F32, F64), ids=str)
def test_generic_and_avx2_variants_agree(dtype, monkeypatch):
    R, C, D = 45, 38, 9
    flags = dict(exclude_diag=True, col_stats=True, pos_lse=True, decoupled=True)
    case = make_case(R, C, D, dtype, "labels", seed=5)
    grads = random_grads(R, C, dtype, True)
    results = []
    for isa in ("generic", "auto"):
        monkeypatch.setenv("FASTCL_CPU_ISA", isa)
        stats = kernel_fwd(case, **flags)
        results.append(list(stats) + list(kernel_bwd(case, grads, stats, **flags)))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)
    monkeypatch.setenv("FASTCL_CPU_ISA", "generic")
    assert _C.cpu_kernel_isa() == "generic"


# ---------------------------------------------------------------------------------------------
# Strides and extreme scales


def test_non_contiguous_inputs():
    R, C, D = 40, 33, 12
    flags = dict(exclude_diag=True, col_stats=True)
    base = make_case(R, C, D, F64, "targets", seed=2)
    wide = torch.zeros(R, 2 * D, dtype=F64)
    wide[:, ::2] = base["q"]
    kt = base["k"].t().contiguous()
    tall = torch.zeros(2 * C, D, dtype=F64)
    tall[::2] = base["k"]
    for q, k in ((wide[:, ::2], kt.t()), (base["q"].t().contiguous().t(), tall[::2])):
        assert not q.is_contiguous() or not k.is_contiguous()
        case = dict(base, q=q, k=k)
        stats = kernel_fwd(case, **flags)
        check_stats(stats, ref_stats(base, **flags), F64)
        grads = random_grads(R, C, F64, True)
        check_grads(case, grads, stats, F64, **flags)
    # non-contiguous targets, labels and statistic gradients
    targets = torch.stack([base["targets"], base["targets"]], 1)[:, 0]
    case = dict(base, targets=targets)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(base, **flags), F64)
    grads = [g[::2] for g in (torch.randn(2 * R, dtype=F64),) * 3] + [torch.randn(2 * C, dtype=F64)[::2], None]
    check_grads(case, grads, stats, F64, **flags)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("dtype", (BF16, F16, F32), ids=str)
def test_scale_100_no_overflow(dtype, shift, monkeypatch):
    """CLIP's clamp (scale 100) with the self-similarity on the excluded diagonal (NT-Xent)."""
    use_shift(monkeypatch, shift)
    R = 64
    case = make_case(R, R, 32, dtype, "targets", scale=100.0, bias=-10.0, seed=9)
    case["k"] = case["q"]
    case["targets"] = torch.arange(R).roll(1)
    flags = dict(exclude_diag=True, col_stats=True)
    stats = kernel_fwd(case, **flags)
    for s in stats:
        assert torch.isfinite(s).all()
    check_stats(stats, ref_stats(case, dtype, **flags), dtype)
    grads = random_grads(R, R, dtype, True, seed=2)
    check_grads(case, grads, stats, dtype, **flags)


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
    case["row_labels"] = torch.zeros(3, dtype=torch.long)
    case["col_labels"] = torch.zeros(3, dtype=torch.long)
    flags = dict(exclude_diag=True, decoupled=True, pos_lse=True)
    stats = kernel_fwd(case, **flags)
    check_stats(stats, ref_stats(case, **flags), F64)
    assert torch.isneginf(stats[0]).all()
    check_grads(case, random_grads(3, 3, F64, False), stats, F64, **flags)


def test_no_grads_gives_zeros():
    case = make_case(7, 5, 3, F32, "targets")
    stats = kernel_fwd(case, col_stats=True)
    for t in kernel_bwd(case, [None] * 5, stats, col_stats=True):
        assert (t == 0).all()


def test_outputs_follow_fake_kernel_metadata():
    case = make_case(9, 6, 4, BF16, "targets")
    case["scale"] = torch.tensor(2.0, dtype=F64)
    stats = kernel_fwd(case, col_stats=False)
    assert all(s.dtype == F32 for s in stats)
    assert stats[4].shape == (0,) and stats[5].shape == (0,)
    dq, dk, ds, db = kernel_bwd(case, random_grads(9, 6, BF16, False), stats)
    assert dq.dtype == BF16 and dk.dtype == BF16
    assert ds.dtype == F64 and ds.dim() == 0 and db.dtype == F32 and db.dim() == 0
    qt = case["q"].t().contiguous().t()
    dq, *_ = kernel_bwd(dict(case, q=qt), random_grads(9, 6, BF16, False), stats)
    assert dq.stride() == qt.stride()


def test_through_the_custom_op():
    from fastcl.ops.contrastive import contrastive_stats

    case = make_case(33, 33, 8, F64, "targets")
    q = case["q"].clone().requires_grad_(True)
    k = case["k"].clone().requires_grad_(True)
    scale = case["scale"].clone().requires_grad_(True)
    lse, pos, _n, _m, col_lse, _cm, *_ = contrastive_stats(
        q, k, scale, case["bias"], torch.arange(33), col_stats=True, backend="cpu")
    loss = 0.5 * (lse - pos).mean() + 0.5 * (col_lse - pos).mean()
    loss.backward()
    q2 = case["q"].clone().requires_grad_(True)
    k2 = case["k"].clone().requires_grad_(True)
    s2 = case["scale"].clone().requires_grad_(True)
    logits = s2 * q2 @ k2.T + case["bias"]
    t = torch.arange(33)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, t)
                 + torch.nn.functional.cross_entropy(logits.T, t))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (scale.grad, s2.grad)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# The fused sweep: loss = norm * sum over rows with a positive of g . (lse, pos, mean)


def kernel_fused(case, grads, mean, **flags):
    return call_fused(_C.contrastive_fused_cpu, case, grads, mean, **flags)


def fused_oracle(case, grads, mean, **flags):
    """The loss of the fused contract from the oracle's statistics, and the statistics'
    gradients that give the same gradients: masked to rows with a positive, scaled by norm."""
    return fused_expected(ref_stats(case, F64, **flags), grads, mean)


FUSED_FLAGS = [f for f in FLAG_COMBOS if not f["col_stats"]]


@pytest.mark.parametrize("mean", (True, False), ids=("mean", "sum"))
@pytest.mark.parametrize("mode,flags", [(m, f) for m in MODES for f in FUSED_FLAGS],
                         ids=[f"{m}-{_id(f)}" for m in MODES for f in FUSED_FLAGS])
def test_fused_fp64(mode, flags, mean, slab_bytes):
    R, C, D = 37, 29, 6
    slab_bytes(7 * C * 8)  # several slabs and a ragged last one
    case = make_case(R, C, D, F64, mode, scale=4.0, bias=-0.5)
    grads = random_grads(R, C, F64, False)[:3]
    loss, npos, *got = kernel_fused(case, grads, mean, **flags)
    want_loss, want_npos, scaled = fused_oracle(case, grads, mean, **flags)
    torch.testing.assert_close(npos, want_npos)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    check_grads(case, [None if g is None else g.to(F64) for g in scaled], None, F64, got=got,
                **flags)


@pytest.mark.parametrize("drop", [(0,), (1, 2), (0, 2), (0, 1, 2)])
def test_fused_missing_coefficients(drop):
    R, C = 23, 23
    case = make_case(R, C, 5, F64, "targets")
    grads = [None if i in drop else g for i, g in enumerate(random_grads(R, C, F64, False)[:3])]
    loss, _npos, *got = kernel_fused(case, grads, True, exclude_diag=True)
    want_loss, _, scaled = fused_oracle(case, grads, True, exclude_diag=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    check_grads(case, scaled, None, F64, got=got, exclude_diag=True)


@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fused_low_precision(dtype, mode, slab_bytes):
    R, C, D = 70, 53, 24
    slab_bytes(16 * C * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
    case = make_case(R, C, D, dtype, mode, scale=8.0)
    grads = random_grads(R, C, dtype, False)[:3]
    loss, _npos, *got = kernel_fused(case, grads, True, **flags)
    want_loss, _, scaled = fused_oracle(case, grads, True, **flags)
    assert loss.dtype == F32 and loss.dim() == 0
    torch.testing.assert_close(loss.to(F64), want_loss, rtol=2e-5, atol=5e-5)
    check_grads(case, [None if g is None else g.to(_stat_dtype(dtype)) for g in scaled], None,
                dtype, got=got, **flags)


def test_fused_equals_forward_then_backward():
    """Same gradients as the two kernels given the masked, normalized coefficients."""
    R, C = 41, 41
    case = make_case(R, C, 8, F32, "labels")
    flags = dict(exclude_diag=True, decoupled=True)
    grads = random_grads(R, C, F32, False)[:3]
    check_fused_equals_two_kernels(kernel_fused(case, grads, True, **flags),
                                   kernel_fwd(case, **flags), kernel_bwd, case, grads, **flags)


@pytest.mark.parametrize("R,C", [(0, 5), (5, 0), (1, 1)])
def test_fused_empty_and_tiny(R, C):
    case = make_case(R, C, 3, F64, "targets" if R > 0 else "none")
    grads = random_grads(R, C, F64, False)[:3]
    loss, npos, dq, dk, ds, db = kernel_fused(case, grads, True)
    want_loss, want_npos, _ = fused_oracle(case, grads, True)
    torch.testing.assert_close(loss, want_loss)
    assert dq.shape == (R, 3) and dk.shape == (C, 3)
    if R == 0 or C == 0:
        assert loss.item() == 0 and all((t == 0).all() for t in (dq, dk, ds, db))


def test_fused_bad_input():
    case = make_case(6, 5, 4, F32, "targets")
    grads = random_grads(6, 5, F32, False)[:3]
    with pytest.raises(RuntimeError, match=r"g_pos must be a 1-D tensor of length R"):
        kernel_fused(case, [grads[0], torch.ones(5), grads[2]], True)
    with pytest.raises(RuntimeError, match=r"same dtype"):
        kernel_fused(dict(case, k=case["k"].double()), grads, True)


# ---------------------------------------------------------------------------------------------
# The fused sweep over self-similarity (k=None: the keys are q): G + G.T on the blocks on and
# below the diagonal. The oracle runs with k = q as a second leaf; the gradient of q is the sum.


def kernel_fused_self(case, grads, mean, **flags):
    return call_fused(_C.contrastive_fused_cpu, case, grads, mean, keys=None, **flags)


@pytest.mark.parametrize("mean", (True, False), ids=("mean", "sum"))
@pytest.mark.parametrize("mode,flags", [(m, f) for m in MODES for f in FUSED_FLAGS],
                         ids=[f"{m}-{_id(f)}" for m in MODES for f in FUSED_FLAGS])
def test_fused_self_fp64(mode, flags, mean, slab_bytes):
    R, D = 37, 6
    slab_bytes(7 * R * 8)  # 7 rows -> slabs of 4 (a multiple of the fp64 vector), ragged last
    case = self_case(R, D, F64, mode, scale=4.0, bias=-0.5)
    grads = random_grads(R, R, F64, False)[:3]
    loss, npos, *got = kernel_fused_self(case, grads, mean, **flags)
    want_loss, want_npos, scaled = fused_oracle(case, grads, mean, **flags)
    torch.testing.assert_close(npos, want_npos)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    check_self_grads(case, scaled, got, F64, **flags)


@pytest.mark.parametrize("isa", ("generic", "auto"))
@pytest.mark.parametrize("rows", (1, 8, 13, 200), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fused_self_slab_sizes(mode, rows, isa, slab_bytes, monkeypatch):
    """Slabs of one vector, of a few vectors with a ragged last one, and one slab for all."""
    monkeypatch.setenv("FASTCL_CPU_ISA", isa)
    R, D = 61, 5
    slab_bytes(rows * R * 4)
    flags = dict(exclude_diag=True, decoupled=(mode == "targets"), pos_lse=(mode == "labels"))
    case = self_case(R, D, F32, mode, scale=6.0)
    case = dict(case, q=case["q"].double(), k=case["q"].double(), scale=case["scale"].double(),
                bias=case["bias"].double())
    grads = random_grads(R, R, F64, False)[:3]
    loss, _npos, *got = kernel_fused_self(case, grads, True, **flags)
    want_loss, _, scaled = fused_oracle(case, grads, True, **flags)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    check_self_grads(case, scaled, got, F64, **flags)


@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fused_self_low_precision(dtype, mode, slab_bytes):
    R, D = 70, 24
    slab_bytes(20 * R * 4)  # 20 rows -> slabs of 16 (a multiple of the fp32 vector)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
    case = self_case(R, D, dtype, mode, scale=8.0)
    grads = random_grads(R, R, dtype, False)[:3]
    loss, _npos, *got = kernel_fused_self(case, grads, True, **flags)
    want_loss, _, scaled = fused_oracle(case, grads, True, **flags)
    assert loss.dtype == F32 and loss.dim() == 0
    torch.testing.assert_close(loss.to(F64), want_loss, rtol=2e-5, atol=5e-5)
    check_self_grads(case, scaled, got, dtype, **flags)


def test_fused_self_equals_two_feature_sets():
    """k=None gives the loss of k = q and the sum of its two gradients."""
    R = 45
    case = self_case(R, 16, F32, "labels")
    flags = dict(exclude_diag=True)
    grads = random_grads(R, R, F32, False)[:3]
    loss, npos, dz, dk, ds, db = kernel_fused_self(case, grads, True, **flags)
    two = kernel_fused(dict(case, k=case["q"].clone()), grads, True, **flags)
    torch.testing.assert_close(loss, two[0])
    torch.testing.assert_close(npos, two[1], rtol=0, atol=0)
    torch.testing.assert_close(dz, two[2] + two[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, two[4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, two[5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("R", (0, 1))
def test_fused_self_empty_and_tiny(R):
    case = self_case(R, 3, F64, "targets" if R > 0 else "none")
    grads = random_grads(R, R, F64, False)[:3]
    loss, npos, dz, dk, ds, db = kernel_fused_self(case, grads, True)
    want_loss, _, _ = fused_oracle(case, grads, True)
    torch.testing.assert_close(loss, want_loss)
    assert dz.shape == (R, 3) and dk.shape == (0, 3)


def test_fused_self_bad_input():
    case = self_case(6, 4, F32, "targets")
    grads = random_grads(6, 6, F32, False)[:3]
    with pytest.raises(RuntimeError, match=r"g_lse must be a 1-D tensor of length R"):
        kernel_fused_self(case, [torch.ones(5), grads[1], grads[2]], True)
    with pytest.raises(RuntimeError, match=r"col_labels"):
        kernel_fused_self(dict(case, targets=None, row_labels=torch.zeros(6, dtype=torch.long),
                               col_labels=torch.zeros(5, dtype=torch.long)), grads, True)


# ---------------------------------------------------------------------------------------------
# The backward kernel with k=None: any gradients of the row statistics (rows without a positive
# included), through the same G + G.T sweep as the fused one.


def kernel_bwd_self(case, grads, stats, **flags):
    return call_bwd_self(_C.contrastive_bwd_cpu, case, grads, stats, **flags)


@pytest.mark.parametrize("mode,flags", [(m, f) for m in MODES for f in FUSED_FLAGS],
                         ids=[f"{m}-{_id(f)}" for m in MODES for f in FUSED_FLAGS])
def test_bwd_self_fp64(mode, flags, slab_bytes):
    R, D = 37, 6
    slab_bytes(7 * R * 8)  # slabs of 4 rows, a ragged last one
    case = self_case(R, D, F64, mode, scale=4.0, bias=-0.5)
    stats = kernel_fwd(case, **flags)
    grads = random_grads(R, R, F64, False)[:3]
    check_self_grads(case, grads, kernel_bwd_self(case, grads, stats, **flags), F64, **flags)


@pytest.mark.parametrize("isa", ("generic", "auto"))
@pytest.mark.parametrize("rows", (1, 8, 13, 200), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
def test_bwd_self_slab_sizes(dtype, rows, isa, slab_bytes, monkeypatch):
    monkeypatch.setenv("FASTCL_CPU_ISA", isa)
    R, D = 61, 5
    slab_bytes(rows * R * dtype.itemsize)
    flags = dict(exclude_diag=True, decoupled=True)
    case = self_case(R, D, dtype, "labels", scale=6.0)
    stats = kernel_fwd(case, **flags)
    grads = random_grads(R, R, dtype, False, seed=rows)[:3]
    check_self_grads(case, grads, kernel_bwd_self(case, grads, stats, **flags), dtype, **flags)


@pytest.mark.parametrize("dtype", (BF16, F16), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_bwd_self_low_precision(dtype, mode, slab_bytes):
    R, D = 70, 24
    slab_bytes(20 * R * 4)
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
    case = self_case(R, D, dtype, mode, scale=8.0)
    stats = kernel_fwd(case, **flags)
    grads = random_grads(R, R, dtype, False)[:3]
    check_self_grads(case, grads, kernel_bwd_self(case, grads, stats, **flags), dtype, **flags)


@pytest.mark.parametrize("drop", [(0,), (1, 2), (0, 2), (0, 1, 2)])
def test_bwd_self_missing_grads_and_tiny(drop):
    for R in (0, 1, 9):
        case = self_case(R, 3, F64, "targets" if R > 0 else "none")
        stats = kernel_fwd(case, exclude_diag=True)
        grads = random_grads(R, R, F64, False, drop=drop)[:3]
        got = kernel_bwd_self(case, grads, stats, exclude_diag=True)
        check_self_grads(case, grads, got, F64, exclude_diag=True)


def test_bwd_self_equals_two_feature_sets():
    R = 45
    case = self_case(R, 16, F32, "labels")
    flags = dict(exclude_diag=True, pos_lse=True)
    stats = kernel_fwd(case, **flags)
    grads = random_grads(R, R, F32, False)[:3]
    dz, dk, ds, db = kernel_bwd_self(case, grads, stats, **flags)
    two = kernel_bwd(dict(case, k=case["q"].clone()), grads + [None, None], stats, **flags)
    assert dk.shape == (0, 16)
    torch.testing.assert_close(dz, two[0] + two[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, two[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, two[3], rtol=1e-5, atol=1e-6)


def test_bwd_self_refuses_column_statistics():
    case = self_case(6, 4, F32, "targets")
    lse, pos, npos, *_ = kernel_fwd(case)
    with pytest.raises(RuntimeError, match=r"column statistics need k"):
        _C.contrastive_bwd_cpu(torch.ones(6), None, None, torch.ones(6), None, case["q"], None,
                               case["scale"], case["bias"], case["targets"], None, None, lse, pos,
                               npos, lse, False, False, False, True)


# ---------------------------------------------------------------------------------------------
# The forward kernel with k=None: half of the symmetric logits (each slab's columns up to its
# end; the part before the slab transposed for the earlier rows), every row's state merged
# slab after slab. Against the oracle with k = q, and against the full square (k given).


def kernel_fwd_self(case, **flags):
    return call_fwd(_C.contrastive_fwd_cpu, dict(case, k=None), **flags)


@pytest.mark.parametrize("mode,flags", [(m, f) for m in MODES for f in FUSED_FLAGS],
                         ids=[f"{m}-{_id(f)}" for m in MODES for f in FUSED_FLAGS])
def test_fwd_self_fp64(mode, flags, slab_bytes):
    R, D = 37, 6
    slab_bytes(7 * R * 8)  # slabs of 4 rows (the fp64 vector), a ragged last one
    check_self_stats(_C.contrastive_fwd_cpu, self_case(R, D, F64, mode, scale=4.0, bias=-0.5), **flags)


@pytest.mark.parametrize("isa", ("generic", "auto"))
@pytest.mark.parametrize("rows", (1, 8, 13, 200), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fwd_self_slab_sizes(mode, dtype, rows, isa, slab_bytes, monkeypatch):
    """Slabs of one vector, of a few vectors with a ragged last one, and one slab for all; the
    targets point both below and above the diagonal (seen by the row pass or the transposed
    one)."""
    monkeypatch.setenv("FASTCL_CPU_ISA", isa)
    R, D = 61, 5
    slab_bytes(rows * R * dtype.itemsize)
    for flags in (dict(exclude_diag=True, decoupled=True),
                  dict(exclude_diag=True, pos_lse=(mode == "labels"))):
        case = self_case(R, D, dtype, mode, scale=6.0)
        check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), dtype)


@pytest.mark.parametrize("dtype", (BF16, F16), ids=str)
@pytest.mark.parametrize("mode", ("targets", "labels"))
def test_fwd_self_low_precision(dtype, mode, slab_bytes):
    R, D = 70, 24
    slab_bytes(20 * R * 4)  # slabs of 16 rows
    flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
    case = self_case(R, D, dtype, mode, scale=8.0)
    check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), dtype)


@pytest.mark.parametrize("R", (0, 1, 2, 9))
def test_fwd_self_tiny(R):
    for mode in ("none", "targets", "labels"):
        case = self_case(R, 3, F64, mode if R > 0 else "none")
        for flags in (dict(), dict(exclude_diag=True, decoupled=True)):
            check_stats(kernel_fwd_self(case, **flags), ref_stats(case, **flags), F64)


def test_fwd_self_refuses_column_statistics():
    case = self_case(6, 4, F32, "targets")
    with pytest.raises(RuntimeError, match=r"column statistics need k"):
        kernel_fwd_self(case, col_stats=True)


# ---------------------------------------------------------------------------------------------
# lse2: log sum_{c in den(r)} exp(mu * s[r, c]) (lse2_mult = mu > 0), from the same sweep as lse
# (one more running sum per row, the running max shared), and its gradient term
# g_lse2 * den * mu * exp(mu * s - lse2). k given and k=None (the half-square forward, the
# G + G.T backward), several slabs and row parts, both instruction sets, both ways of taking the
# exponentials. Against the oracle's lse2 and the autograd of sum(g . stats) + sum(g_lse2 lse2).


MUS = (0.5, 2.0)


def fwd_lse2(case, mu, self_=False, **flags):
    """The forward kernel at lse2_mult = mu (``self_``: k=None): its seven outputs."""
    f = flags_of(flags)
    return _C.contrastive_fwd_cpu(case["q"], None if self_ else case["k"], case["scale"],
                                  case["bias"], case["targets"], case["row_labels"],
                                  case["col_labels"], f["exclude_diag"], f["decoupled"],
                                  f["pos_lse"], f["col_stats"], lse2_mult=mu)


def bwd_lse2(case, grads, g_lse2, stats, mu, self_=False, **flags):
    """The backward kernel for the gradients ``grads`` (g_lse, g_pos, g_mean, g_col_lse,
    g_col_mean) and ``g_lse2``, from the forward's seven outputs ``stats``."""
    f = flags_of(flags)
    lse, pos, npos, _mean, col_lse, _col_mean, lse2 = stats
    return _C.contrastive_bwd_cpu(*grads, case["q"], None if self_ else case["k"],
                                  case["scale"], case["bias"], case["targets"],
                                  case["row_labels"], case["col_labels"], lse, pos, npos,
                                  col_lse, f["exclude_diag"], f["decoupled"], f["pos_lse"],
                                  f["col_stats"], g_lse2=g_lse2, lse2=lse2, lse2_mult=mu)


def lse2_grad_sets(R, C, dtype, col_stats, seed=1):
    """(grads, g_lse2) pairs: g_lse2 alone; with g_lse and g_pos; with every other gradient."""
    sdt = _stat_dtype(dtype)
    g2 = torch.randn(R, generator=torch.Generator().manual_seed(seed + 100), dtype=F64).to(sdt)
    full = random_grads(R, C, dtype, col_stats, seed=seed)
    return [([None] * 5, g2), (full[:2] + [None] * 3, g2), (full, g2)]


LSE2_FP64_CASES = [(mode, flags, shift, mu) for mode in MODES for flags in FLAG_COMBOS
                   for shift in SHIFTS for mu in MUS
                   if shift == "shared-shift" or flags["col_stats"]]


@pytest.mark.parametrize("mode,flags,shift,mu", LSE2_FP64_CASES,
                         ids=[f"{m}-{_id(f)}-{s}-mu{u}" for m, f, s, u in LSE2_FP64_CASES])
def test_lse2_fp64(mode, flags, shift, mu, slab_bytes, monkeypatch):
    use_shift(monkeypatch, shift)
    R, C, D = 37, 29, 6
    slab_bytes(7 * C * 8)  # several slabs, a ragged last one
    case = make_case(R, C, D, F64, mode, scale=4.0, bias=-0.5)
    stats = fwd_lse2(case, mu, **flags)
    check_fwd_lse2(stats, case, mu, F64, **flags)
    for grads, g2 in lse2_grad_sets(R, C, F64, flags["col_stats"]):
        got = bwd_lse2(case, grads, g2, stats, mu, **flags)
        check_grads_lse2(got, case, grads, g2, mu, F64, **flags)


LSE2_SELF_CASES = [(mode, flags, mu) for mode in MODES for flags in FUSED_FLAGS for mu in MUS]


@pytest.mark.parametrize("mode,flags,mu", LSE2_SELF_CASES,
                         ids=[f"{m}-{_id(f)}-mu{u}" for m, f, u in LSE2_SELF_CASES])
def test_lse2_self_fp64(mode, flags, mu, slab_bytes):
    """k=None: the half-square forward (and the same kernel with k given, the full square, to
    1e-12) and the G + G.T backward."""
    R, D = 37, 6
    slab_bytes(7 * R * 8)  # slabs of 4 rows (the fp64 vector), a ragged last one
    case = self_case(R, D, F64, mode, scale=4.0, bias=-0.5)
    stats = fwd_lse2(case, mu, self_=True, **flags)
    check_fwd_lse2(stats, case, mu, F64, **flags)
    square = fwd_lse2(case, mu, **flags)
    torch.testing.assert_close(stats[6], square[6], rtol=1e-12, atol=1e-12)
    for grads, g2 in lse2_grad_sets(R, R, F64, False):
        got = bwd_lse2(case, grads, g2, stats, mu, self_=True, **flags)
        check_grads_lse2(got, case, grads, g2, mu, F64, self_sim=True, **flags)


@pytest.mark.parametrize("self_", (False, True), ids=("k", "self"))
@pytest.mark.parametrize("isa", ("generic", "auto"))
@pytest.mark.parametrize("rows", (1, 8, 13, 200), ids=lambda r: f"slab{r}")
@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
def test_lse2_slab_sizes(dtype, rows, isa, self_, slab_bytes, monkeypatch):
    """One-row (self: one-vector) slabs, a few rows with a ragged last slab, one slab for all;
    with k=None the part before each slab spans one and two row parts."""
    monkeypatch.setenv("FASTCL_CPU_ISA", isa)
    R, D = 61, 5
    slab_bytes(rows * R * dtype.itemsize)
    flags = dict(exclude_diag=True, decoupled=True)
    mu = MUS[rows % 2]
    case = self_case(R, D, dtype, "labels", scale=6.0)
    stats = fwd_lse2(case, mu, self_=self_, **flags)
    check_fwd_lse2(stats, case, mu, dtype, **flags)
    for grads, g2 in lse2_grad_sets(R, R, dtype, False, seed=rows)[:2]:
        got = bwd_lse2(case, grads, g2, stats, mu, self_=self_, **flags)
        check_grads_lse2(got, case, grads, g2, mu, dtype, self_sim=self_, **flags)


@pytest.mark.parametrize("self_", (False, True), ids=("k", "self"))
@pytest.mark.parametrize("mu", MUS, ids=lambda u: f"mu{u}")
@pytest.mark.parametrize("mode", ("targets", "labels"))
@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
def test_lse2_low_precision(dtype, mode, mu, self_, slab_bytes):
    if self_:
        R, C, D = 70, 70, 24
        flags = dict(exclude_diag=True, pos_lse=(mode == "labels"))
        case = self_case(R, D, dtype, mode, scale=8.0)
    else:
        R, C, D = 53, 41, 24
        flags = dict(exclude_diag=True, decoupled=(mode == "labels"), col_stats=True)
        case = make_case(R, C, D, dtype, mode, scale=10.0, bias=0.1, seed=3)
    slab_bytes(16 * C * 4)
    stats = fwd_lse2(case, mu, self_=self_, **flags)
    check_fwd_lse2(stats, case, mu, dtype, **flags)
    for grads, g2 in lse2_grad_sets(R, C, dtype, flags.get("col_stats", False), seed=4):
        got = bwd_lse2(case, grads, g2, stats, mu, self_=self_, **flags)
        check_grads_lse2(got, case, grads, g2, mu, dtype, self_sim=self_, **flags)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("mu", MUS, ids=lambda u: f"mu{u}")
def test_lse2_rows_far_apart_in_one_tile(mu, shift, monkeypatch):
    """fp32 rows whose maxima lie ~45 apart in every tile (rows of norm 0.1 and 1 alternate,
    every cosine in [0.7, 1]), within the span of one shared shift M per tile (the largest
    maximum): a row's sum of exp(mu (s - M)) would underflow at mu = 2; the kernel keeps lse2
    relative to the row's own maximum."""
    use_shift(monkeypatch, shift)
    R, C, D = 32, 64, 4
    case = make_case(R, C, D, F32, "targets", scale=55.0, bias=0.0, seed=12)
    g = torch.Generator().manual_seed(12)
    axis = torch.zeros(D, dtype=F64)
    axis[0] = 1.0

    def near_axis(n):
        return torch.nn.functional.normalize(axis + 0.25 * torch.randn(n, D, generator=g,
                                                                       dtype=F64), dim=1)

    norms = torch.tensor([0.1, 1.0], dtype=F64).repeat(R // 2)[:, None]
    case["q"] = (near_axis(R) * norms).to(F32)
    case["k"] = near_axis(C).to(F32)
    flags = dict(exclude_diag=True, col_stats=True)
    stats = fwd_lse2(case, mu, **flags)
    check_fwd_lse2(stats, case, mu, F32, **flags)
    want64 = ref_stats(case, F64, lse2_mult=mu, **flags)[6]
    torch.testing.assert_close(stats[6].to(F64), want64, rtol=1e-5, atol=1e-4)
    for grads, g2 in lse2_grad_sets(R, C, F32, True)[:2]:
        got = bwd_lse2(case, grads, g2, stats, mu, **flags)
        check_grads_lse2(got, case, grads, g2, mu, F32, **flags)


def test_lse2_empty_denominator_rows():
    """Rows whose denominator set is empty: lse2 = -inf (like lse), no NaN in the gradients."""
    mu = 2.0
    # R = C = 1, the diagonal excluded (k given and k=None)
    for self_ in (False, True):
        case = make_case(1, 1, 4, F64, "targets")
        flags = dict(exclude_diag=True, col_stats=not self_)
        stats = fwd_lse2(case, mu, self_=self_, **flags)
        assert torch.isneginf(stats[6]).all() and torch.isneginf(stats[0]).all()
        grads = random_grads(1, 1, F64, not self_)
        for gs in ([None] * 5, grads):
            for t in bwd_lse2(case, gs, torch.ones(1, dtype=F64), stats, mu, self_=self_, **flags):
                assert (t == 0).all()
    # decoupled labels: rows of class 0 have every column as a positive (empty set), the others
    # none; several slabs
    for self_ in (False, True):
        R = 13
        case = make_case(R, R, 4, F64, "labels", seed=3)
        case["row_labels"] = torch.arange(R) % 2
        case["col_labels"] = torch.zeros(R, dtype=torch.long)
        if self_:
            case["k"] = case["q"]
        flags = dict(exclude_diag=True, decoupled=True, pos_lse=True)
        stats = fwd_lse2(case, mu, self_=self_, **flags)
        check_fwd_lse2(stats, case, mu, F64, **flags)
        assert torch.isneginf(stats[6]).any() and torch.isfinite(stats[6]).any()
        for grads, g2 in lse2_grad_sets(R, R, F64, False):
            got = bwd_lse2(case, grads, g2, stats, mu, self_=self_, **flags)
            check_grads_lse2(got, case, grads, g2, mu, F64, self_sim=self_, **flags)


@pytest.mark.parametrize("self_", (False, True), ids=("k", "self"))
@pytest.mark.parametrize("R,C", [(0, 5), (1, 5), (1, 1), (4, 0)])
def test_lse2_empty_and_tiny(R, C, self_):
    if self_:
        C = R
    mu = 0.5
    case = make_case(R, C, 3, F64, "targets" if R > 0 and C > 0 else "none")
    if self_:
        case["k"] = case["q"]
    flags = dict(exclude_diag=True)
    stats = fwd_lse2(case, mu, self_=self_, **flags)
    assert stats[6].shape == (R,)
    check_fwd_lse2(stats, case, mu, F64, **flags)
    for grads, g2 in lse2_grad_sets(R, C, F64, False):
        got = bwd_lse2(case, grads, g2, stats, mu, self_=self_, **flags)
        check_grads_lse2(got, case, grads, g2, mu, F64, self_sim=self_, **flags)


@pytest.mark.parametrize("self_", (False, True), ids=("k", "self"))
@pytest.mark.parametrize("dtype", (F64, BF16), ids=str)
def test_lse2_off_and_unchanged(dtype, self_):
    """lse2_mult = 0 (the default) gives an empty lse2 of the statistics dtype and the same six
    statistics; lse2_mult > 0 leaves the other statistics, and g_lse2 = None the gradients, as
    they are."""
    R, C = 41, 41
    flags = dict(exclude_diag=True, pos_lse=True, col_stats=not self_)
    case = self_case(R, 8, dtype, "labels") if self_ else make_case(R, C, 8, dtype, "labels")
    base = fwd_lse2(case, 0.0, self_=self_, **flags)
    k = None if self_ else case["k"]
    f = flags_of(flags)
    default = _C.contrastive_fwd_cpu(case["q"], k, case["scale"], case["bias"], None,
                                     case["row_labels"], case["col_labels"], f["exclude_diag"],
                                     f["decoupled"], f["pos_lse"], f["col_stats"])
    assert base[6].shape == (0,) and base[6].dtype == _stat_dtype(dtype)
    assert default[6].shape == (0,) and default[6].dtype == _stat_dtype(dtype)
    for a, b in zip(base[:6], default[:6]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    on = fwd_lse2(case, 2.0, self_=self_, **flags)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-6, atol=1e-5)
    for a, b in zip(on[:6], base[:6]):
        torch.testing.assert_close(a, b, **tol)
    grads = random_grads(R, C, dtype, not self_)
    plain = bwd_lse2(case, grads, None, base, 0.0, self_=self_, **flags)
    with_mult = bwd_lse2(case, grads, None, (*base[:6], on[6]), 2.0, self_=self_, **flags)
    for a, b in zip(plain, with_mult):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (F32, F64), ids=str)
def test_lse2_generic_and_avx2_variants_agree(dtype, monkeypatch, slab_bytes):
    R, D = 45, 9
    flags = dict(exclude_diag=True, pos_lse=True, decoupled=True)
    case = self_case(R, D, dtype, "labels", seed=5)
    slab_bytes(8 * R * dtype.itemsize)
    grads, g2 = lse2_grad_sets(R, R, dtype, False)[1]
    results = []
    for isa in ("generic", "auto"):
        monkeypatch.setenv("FASTCL_CPU_ISA", isa)
        out = []
        for self_ in (False, True):
            stats = fwd_lse2(case, 2.0, self_=self_, **flags)
            out += [stats[6], *bwd_lse2(case, grads, g2, stats, 2.0, self_=self_, **flags)]
        results.append(out)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def test_lse2_slab_size_does_not_change_results(slab_bytes):
    R, D = 300, 16
    flags = dict(exclude_diag=True, decoupled=True, pos_lse=True)
    case = self_case(R, D, F64, "labels", seed=11)
    grads, g2 = lse2_grad_sets(R, R, F64, False)[2]
    for self_ in (False, True):
        outs = []
        for rows in (1, 13, 300):
            slab_bytes(rows * R * 8)
            stats = fwd_lse2(case, 0.5, self_=self_, **flags)
            outs.append([stats[6], *bwd_lse2(case, grads, g2, stats, 0.5, self_=self_, **flags)])
        for out in outs[1:]:
            for a, b in zip(out, outs[0]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _lse2_call(self_=False, fwd=True, mu=0.5, g_lse2="ok", lse2="ok"):
    R, C = 6, 5
    case = make_case(R, C, 4, F32, "targets")
    k = None if self_ else case["k"]
    args = (case["q"], k, case["scale"], case["bias"], case["targets"], None, None, False, False,
            False, False)
    if fwd:
        return lambda: _C.contrastive_fwd_cpu(*args, lse2_mult=mu)
    stats = _C.contrastive_fwd_cpu(*args, lse2_mult=0.5)
    g = {"ok": torch.ones(R), "short": torch.ones(R - 1), None: None}[g_lse2]
    saved = {"ok": stats[6], "short": stats[6][:-1], "2d": stats[6][:, None], None: None}[lse2]
    return lambda: _C.contrastive_bwd_cpu(torch.ones(R), None, None, None, None, case["q"], k,
                                          case["scale"], case["bias"], case["targets"], None,
                                          None, stats[0], stats[1], stats[2], stats[4], False,
                                          False, False, False, g_lse2=g, lse2=saved,
                                          lse2_mult=mu)


@pytest.mark.parametrize("self_", (False, True), ids=("k", "self"))
@pytest.mark.parametrize("call,match", [
    (dict(mu=-0.5), r"lse2_mult must be a finite number >= 0"),
    (dict(mu=float("nan")), r"lse2_mult must be a finite number >= 0"),
    (dict(mu=float("inf")), r"lse2_mult must be a finite number >= 0"),
    (dict(fwd=False, mu=-1.0), r"lse2_mult must be a finite number >= 0"),
    (dict(fwd=False, mu=float("inf"), g_lse2=None), r"lse2_mult must be a finite number >= 0"),
    (dict(fwd=False, mu=0.0), r"g_lse2 was given but lse2_mult is 0"),
    (dict(fwd=False, lse2=None), r"g_lse2 was given without lse2"),
    (dict(fwd=False, lse2="short"), r"lse2 must be a 1-D tensor of length R = 6"),
    (dict(fwd=False, lse2="2d"), r"lse2 must be a 1-D tensor of length R = 6"),
    (dict(fwd=False, g_lse2="short"), r"g_lse2 must be a 1-D tensor of length R = 6"),
], ids=["neg", "nan", "inf", "bwd-neg", "bwd-inf", "g_lse2-mult0", "no-lse2", "lse2-short",
        "lse2-2d", "g_lse2-short"])
def test_lse2_bad_input(call, match, self_):
    with pytest.raises(RuntimeError, match=match):
        _lse2_call(self_=self_, **call)()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, never a crash


def _bad_call(**over):
    case = make_case(6, 5, 4, F32, "targets")
    args = dict(q=case["q"], k=case["k"], scale=case["scale"], bias=case["bias"],
                targets=case["targets"], row_labels=None, col_labels=None)
    args.update(over)
    return lambda: _C.contrastive_fwd_cpu(args["q"], args["k"], args["scale"], args["bias"],
                                          args["targets"], args["row_labels"],
                                          args["col_labels"], False, False, False, True)


@pytest.mark.parametrize("over,match", [
    (dict(q=torch.randn(6)), r"q must be a 2-D tensor"),
    (dict(k=torch.randn(5, 3)), r"same feature size D"),
    (dict(k=torch.randn(5, 4, dtype=F64)), r"same dtype"),
    (dict(q=torch.randint(0, 3, (6, 4)), k=torch.randint(0, 3, (5, 4))), r"float32, float64"),
    (dict(q=torch.empty(6, 4, device="meta")), r"expects CPU tensors, got meta for q"),
    (dict(scale=torch.ones(2)), r"scale must be a scalar"),
    (dict(bias=torch.tensor(1)), r"bias must be a floating-point"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), r"targets must be a 1-D tensor of length R"),
    (dict(targets=torch.zeros(6)), r"targets must be an integer tensor"),
    (dict(row_labels=torch.zeros(6, dtype=torch.long)), r"given together"),
    (dict(row_labels=torch.zeros(6, dtype=torch.long), col_labels=torch.zeros(4, dtype=torch.long)),
     r"col_labels must be a 1-D tensor of length C"),
])
def test_bad_forward_input(over, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        _bad_call(**over)()


def test_bad_backward_input():
    case = make_case(6, 5, 4, F32, "targets")
    stats = kernel_fwd(case, col_stats=False)
    grads = random_grads(6, 5, F32, False)
    with pytest.raises(RuntimeError, match=r"g_lse must be a 1-D tensor of length R"):
        kernel_bwd(case, [torch.ones(5)] + grads[1:], stats)
    with pytest.raises(RuntimeError, match=r"col_stats is False"):
        kernel_bwd(case, grads[:3] + [torch.ones(5), None], stats)
    with pytest.raises(RuntimeError, match=r"lse must be a 1-D tensor"):
        kernel_bwd(case, grads, (torch.ones(3),) + tuple(stats[1:]))
    with pytest.raises(RuntimeError, match=r"expects CPU tensors, got meta for g_pos"):
        kernel_bwd(case, [grads[0], torch.empty(6, device="meta")] + grads[2:], stats)


def test_out_of_range_targets_mean_no_positive():
    case = make_case(6, 5, 4, F64, "targets")
    case["targets"] = torch.tensor([0, 5, 99, -1, -7, 4])
    stats = kernel_fwd(case, col_stats=True)
    check_stats(stats, ref_stats(case, col_stats=True), F64)


# ---------------------------------------------------------------------------------------------
# Memory: nothing of size R x C


MEMORY_SCRIPT = """
    from fastcl import _C

    n, d = int(sys.argv[1]), int(sys.argv[2])
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    scale, bias, t = torch.tensor(14.0), torch.tensor(0.0), torch.arange(n)
    small = _C.contrastive_fwd_cpu(q[:64], k[:64], scale, bias, t[:64], None, None,
                                   False, False, False, True)  # load libraries, start threads
    reset_peak()
    lse, pos, npos, mean, cl, cm, _ = _C.contrastive_fwd_cpu(q, k, scale, bias, t, None, None,
                                                             False, False, False, True)
    g = torch.full((n,), 0.5 / n)
    dq, dk, ds, db = _C.contrastive_bwd_cpu(g, -2 * g, None, g, None, q, k, scale, bias, t, None,
                                            None, lse, pos, npos, cl, False, False, False, True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    print(peak_growth())
"""



FUSED_MEMORY_SCRIPT = """
    from fastcl import _C

    n, d = int(sys.argv[1]), int(sys.argv[2])
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    scale, bias, t = torch.tensor(14.0), torch.tensor(0.0), torch.arange(n)
    ones = torch.ones(n)
    small = _C.contrastive_fused_cpu(ones[:64], -ones[:64], None, q[:64], k[:64], scale, bias,
                                     t[:64], None, None, False, False, False, True)
    reset_peak()
    loss, npos, dq, dk, ds, db = _C.contrastive_fused_cpu(ones, -ones, None, q, k, scale, bias, t,
                                                          None, None, False, False, False, True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    print(peak_growth())
"""


# self-similarity: z, its scale and bias, targets half the batch away (the other view)
_SELF_INPUTS = """
    from fastcl import _C

    n, d = int(sys.argv[1]), int(sys.argv[2])
    z = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    scale, bias = torch.tensor(14.0), torch.tensor(0.0)
    t = torch.arange(n).roll(n // 2)
"""


SELF_MEMORY_SCRIPT = _SELF_INPUTS + """
    ones = torch.ones(n)
    small = _C.contrastive_fused_cpu(ones[:64], -ones[:64], None, z[:64], None, scale, bias,
                                     t[:64] % 64, None, None, True, False, False, True)
    reset_peak()
    loss, npos, dz, dk, ds, db = _C.contrastive_fused_cpu(ones, -ones, None, z, None, scale, bias,
                                                          t, None, None, True, False, False, True)
    assert torch.isfinite(dz).all() and dk.numel() == 0
    print(peak_growth())
"""


SELF_STATS_MEMORY_SCRIPT = _SELF_INPUTS + """
    g = torch.ones(n)
    small = _C.contrastive_fwd_cpu(z[:64], None, scale, bias, t[:64] % 64, None, None, True,
                                   False, False, False)
    reset_peak()
    lse, pos, npos, mean, cl, cm, _ = _C.contrastive_fwd_cpu(z, None, scale, bias, t, None, None,
                                                             True, False, False, False)
    dz, dk, ds, db = _C.contrastive_bwd_cpu(g, -g, None, None, None, z, None, scale, bias, t,
                                            None, None, lse, pos, npos, cl, True, False, False,
                                            False)
    assert torch.isfinite(lse).all() and torch.isfinite(dz).all() and dk.numel() == 0
    print(peak_growth())
"""


@pytest.mark.parametrize("script,slabs", ((MEMORY_SCRIPT, 1), (FUSED_MEMORY_SCRIPT, 1),
                                          (SELF_MEMORY_SCRIPT, 2), (SELF_STATS_MEMORY_SCRIPT, 2)),
                         ids=("fwd-bwd", "fused", "fused-self", "fwd-bwd-self"))
def test_peak_memory_is_linear(script, slabs):
    n, d = 8192, 64
    slab = 16 << 20
    growth = peak_rss_growth(script, n, d, env={"FASTCL_CPU_SLAB_BYTES": str(slab)},
                             timeout=600)
    logits_bytes = n * n * 4
    assert growth < 0.25 * logits_bytes, (
        f"peak RSS grew by {growth / 2**20:.1f} MiB during fwd+bwd at N={n}: not far below the "
        f"{logits_bytes / 2**20:.0f} MiB of the logits")
    # one slab (self-similarity: and its transposed left part) plus O((R + C) * D): gradients,
    # an fp32 q slab, statistics, allocator slack
    linear = slabs * slab + 4 * n * d * 4 + (24 << 20)
    assert growth < linear, f"peak RSS grew by {growth / 2**20:.1f} MiB, expected < {linear / 2**20:.0f} MiB"
