"""The C++ CPU kernels of the sigmoid loss (``fastcl._C.siglip_{fwd,bwd,fused}_cpu``).

Each kernel is compared with the fp64 materialized computation of the contract
(``s = scale * x @ y.T + bias``, ``z_ij = +1`` only on the diagonal when ``diag_pos``, pair loss
``softplus(-z s)``, gradients through autograd). In fp64 the comparison is tight. In fp32, bf16
and fp16 an output's error against the fp64 oracle may be at most about twice the error of the
same materialized computation run at that dtype (fp32 arithmetic, outputs rounded to the input
dtypes), plus a small slack relative to the output's size. Slab boundaries are exercised through
``FASTCL_CPU_SLAB_BYTES`` (read at every call), both instruction-set variants through
``FASTCL_CPU_ISA``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _memory import peak_rss_growth

try:
    from fastcl import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

if _C is None or not hasattr(_C, "siglip_fwd_cpu"):
    pytest.skip("fastcl._C with the CPU siglip kernels is not built", allow_module_level=True)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ATOL = {F64: 1e-12, F32: 1e-5, BF16: 1e-2, F16: 2e-3}


def _stat_dtype(dtype):
    return F64 if dtype == F64 else F32


def make_case(R, C, D, dtype=F64, *, scale=3.0, bias=-1.5, seed=0, normalize=True,
              scalar_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, D, generator=g, dtype=F64)
    y = torch.randn(C, D, generator=g, dtype=F64)
    if normalize:
        x = F.normalize(x, dim=1)
        y = F.normalize(y, dim=1)
    if R and C:  # some positive pairs alike, as in training
        n = min(R, C)
        y[:n] = 0.5 * y[:n] + 0.5 * x[:n]
    sdt = scalar_dtype or _stat_dtype(dtype)
    return dict(x=x.to(dtype), y=y.to(dtype), scale=torch.tensor(scale, dtype=sdt),
                bias=torch.tensor(bias, dtype=sdt))


def oracle(case, diag_pos, g_row=None, dt=F64):
    """(rows, dx, dy, dscale, dbias) materialized in ``dt``; gradients of sum(g_row * rows)
    (g_row = ones when None), rounded to the dtypes of the inputs."""
    x, y, scale, bias = case["x"], case["y"], case["scale"], case["bias"]
    leaves = [t.detach().to(dt).requires_grad_(True) for t in (x, y, scale, bias)]
    xx, yy, a, b = leaves
    s = a * (xx @ yy.T) + b
    R, C = s.shape
    z = -torch.ones(R, C, dtype=dt)
    if diag_pos:
        n = min(R, C)
        z[torch.arange(n), torch.arange(n)] = 1.0
    rows = -F.logsigmoid(z * s).sum(1)
    g = torch.ones(R, dtype=dt) if g_row is None else g_row.to(dt)
    grads = torch.autograd.grad((rows * g).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves)]
    outs = [rows.detach()] + [gr.to(t.dtype) for gr, t in zip(grads, (x, y, scale, bias))]
    return outs


def check(got, case, diag_pos, g_row=None, dtype=F64, slack=1.0):
    """Compare kernel outputs with the fp64 oracle (rows may be None)."""
    exact = oracle(case, diag_pos, g_row, F64)
    if dtype == F64:
        for name, a, b in zip(("rows", "dx", "dy", "dscale", "dbias"), got, exact):
            if a is None:
                continue
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * slack, msg=name)
        return
    low = oracle(case, diag_pos, g_row, F32)
    for name, a, b, c in zip(("rows", "dx", "dy", "dscale", "dbias"), got, exact, low):
        if a is None:
            continue
        assert a.dtype == c.dtype, name
        assert a.shape == b.shape, name
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        ref_err = (c.double() - b.double()).abs().max().item() if a.numel() else 0.0
        size = b.double().abs().max().item() if a.numel() else 0.0
        bound = 2 * ref_err + slack * ATOL[dtype] * max(size, 1.0)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (oracle at dtype: {ref_err:.3g})"


def fwd(case, diag_pos):
    return _C.siglip_fwd_cpu(case["x"], case["y"], case["scale"], case["bias"], diag_pos)


def bwd(case, g_row, diag_pos):
    return _C.siglip_bwd_cpu(g_row, case["x"], case["y"], case["scale"], case["bias"], diag_pos)


def fused(case, diag_pos, mean):
    return _C.siglip_fused_cpu(case["x"], case["y"], case["scale"], case["bias"], diag_pos, mean)


@pytest.fixture
def slab_bytes(monkeypatch):
    def set_(n):
        monkeypatch.setenv("FASTCL_CPU_SLAB_BYTES", str(n))
    return set_


SHAPES = [(0, 5, 3), (5, 0, 3), (0, 0, 2), (1, 1, 1), (1, 7, 3), (7, 1, 3), (2, 3, 129),
          (13, 17, 129), (17, 13, 3), (31, 31, 5), (97, 61, 8), (61, 97, 1), (8, 1031, 4)]


# ---------------------------------------------------------------------------------------------
# fp64: every kernel, both diagonal conventions, awkward shapes


@pytest.mark.parametrize("diag_pos", (True, False))
@pytest.mark.parametrize("R,C,D", SHAPES)
def test_fp64(R, C, D, diag_pos):
    case = make_case(R, C, D, F64, seed=R * 7 + C + D)
    rows = fwd(case, diag_pos)
    assert rows.shape == (R,) and rows.dtype == F64
    check([rows], case, diag_pos)
    g = torch.randn(R, dtype=F64, generator=torch.Generator().manual_seed(1))
    check([None, *bwd(case, g, diag_pos)], case, diag_pos, g)
    for mean in (True, False):
        loss, *grads = fused(case, diag_pos, mean)
        ex = oracle(case, diag_pos)
        total = ex[0].sum() / max(R, 1) if mean else ex[0].sum()
        assert loss.dim() == 0 and loss.dtype == F64
        torch.testing.assert_close(loss, total, rtol=1e-12, atol=1e-12)
        gu = torch.full((R,), 1.0 / R if mean and R else 1.0, dtype=F64)
        check([None, *grads], case, diag_pos, gu)


# ---------------------------------------------------------------------------------------------
# fp32 / bf16 / fp16


@pytest.mark.parametrize("diag_pos", (True, False))
@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
@pytest.mark.parametrize("R,C,D", [(1, 1, 1), (13, 17, 129), (53, 41, 24), (37, 1030, 3)])
def test_low_precision(R, C, D, dtype, diag_pos, slab_bytes):
    slab_bytes(5 * C * 4)
    case = make_case(R, C, D, dtype, scale=10.0, bias=-5.0, seed=3)
    rows = fwd(case, diag_pos)
    assert rows.dtype == F32
    check([rows], case, diag_pos, dtype=dtype)
    g = torch.randn(R, generator=torch.Generator().manual_seed(4))
    check([None, *bwd(case, g, diag_pos)], case, diag_pos, g, dtype=dtype)
    loss, *grads = fused(case, diag_pos, True)
    assert loss.dtype == F32
    total = oracle(case, diag_pos)[0].sum() / R
    torch.testing.assert_close(loss.double(), total, rtol=1e-5, atol=1e-6)
    check([None, *grads], case, diag_pos, torch.full((R,), 1.0 / R), dtype=dtype)


def test_fused_equals_forward_then_backward():
    case = make_case(45, 38, 9, F64, seed=5)
    for mean in (True, False):
        loss, dx, dy, ds, db = fused(case, True, mean)
        rows = fwd(case, True)
        g = torch.full((45,), 1 / 45 if mean else 1.0, dtype=F64)
        ref = bwd(case, g, True)
        torch.testing.assert_close(loss, rows.sum() / (45 if mean else 1), rtol=1e-13, atol=0)
        for a, b in zip((dx, dy, ds, db), ref):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Slabs, threads, instruction sets


@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
def test_slab_size_does_not_change_results(dtype, slab_bytes):
    R, C, D = 300, 257, 16
    case = make_case(R, C, D, dtype, seed=11)
    g = torch.randn(R, dtype=_stat_dtype(dtype))
    ldl = (C + 7) // 8 * 8
    outs = []
    for rows in (1, 13, 300):
        slab_bytes(rows * ldl * 8)
        outs.append([fwd(case, True), *bwd(case, g, True), *fused(case, False, True)])
    # fp32: dy sums the slabs' contributions in a different grouping
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            torch.testing.assert_close(a, b, **tol)
    check([outs[1][0], *outs[1][1:5]], case, True, g, dtype=dtype)


def test_slab_of_one_row_and_ragged_last_slab(slab_bytes):
    R, C, D = 23, 10, 6
    case = make_case(R, C, D, F64, seed=2)
    g = torch.randn(R, dtype=F64)
    for rows in (1, 4, 22):
        slab_bytes(rows * 16 * 8)
        check([fwd(case, True), *bwd(case, g, True)], case, True, g)


def test_thread_count_does_not_change_results():
    case = make_case(200, 150, 12, F64, seed=8)
    g = torch.randn(200, dtype=F64)
    n = torch.get_num_threads()
    try:
        outs = []
        for t in (1, max(2, n)):
            torch.set_num_threads(t)
            outs.append([fwd(case, True), *bwd(case, g, True)])
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", (F32, F64), ids=str)
def test_generic_and_avx2_variants_agree(dtype, monkeypatch):
    case = make_case(45, 38, 9, dtype, seed=5)
    g = torch.randn(45, dtype=_stat_dtype(dtype))
    results = []
    for isa in ("generic", "auto"):
        monkeypatch.setenv("FASTCL_CPU_ISA", isa)
        results.append([fwd(case, True), *bwd(case, g, False), *fused(case, True, True)])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


# ---------------------------------------------------------------------------------------------
# Extreme logits, strides, metadata


@pytest.mark.parametrize("scale,bias", [(100.0, -200.0), (100.0, 50.0), (-30.0, 10.0),
                                        (1e-3, -1e-3), (0.0, 0.0)])
@pytest.mark.parametrize("dtype", (F64, F32, BF16, F16), ids=str)
def test_extreme_scale_and_bias(dtype, scale, bias):
    """Very negative and very positive logits: no inf or NaN, full relative precision of tiny
    pair losses (bias -200 makes every off-diagonal pair loss about e^-200 in fp64)."""
    R, C = 40, 33
    case = make_case(R, C, 16, dtype, scale=scale, bias=bias, seed=9)
    g = torch.randn(R, generator=torch.Generator().manual_seed(1)).to(_stat_dtype(dtype))
    rows = fwd(case, True)
    grads = bwd(case, g, True)
    loss, *fgrads = fused(case, True, True)
    for t in (rows, loss, *grads, *fgrads):
        assert torch.isfinite(t).all()
    check([rows, *grads], case, True, g, dtype=dtype)
    if dtype == F64:
        # rows are dominated by the diagonal term; the off-diagonal ones keep relative precision
        off = make_case(R, C, 16, F64, scale=scale, bias=bias, seed=9)
        torch.testing.assert_close(fwd(off, False), oracle(off, False)[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", (F64, F32), ids=str)
def test_nan_input_gives_nan(dtype):
    """A NaN feature poisons its row's loss and the gradients, as the materialized loss does."""
    case = make_case(12, 20, 4, dtype, seed=3)
    case["x"][5, 1] = float("nan")
    rows = fwd(case, True)
    assert torch.isnan(rows[5]) and torch.isfinite(rows[torch.arange(12) != 5]).all()
    dx, dy, ds, db = bwd(case, torch.ones(12, dtype=_stat_dtype(dtype)), True)
    assert torch.isnan(dx[5]).all() and torch.isnan(dy).all() and torch.isnan(ds)
    assert torch.isfinite(dx[torch.arange(12) != 5]).all()
    loss = fused(case, False, True)[0]
    assert torch.isnan(loss)


def test_non_contiguous_inputs():
    R, C, D = 40, 33, 12
    base = make_case(R, C, D, F64, seed=2)
    wide = torch.zeros(R, 2 * D, dtype=F64)
    wide[:, ::2] = base["x"]
    tall = torch.zeros(2 * C, D, dtype=F64)
    tall[::2] = base["y"]
    g = torch.randn(2 * R, dtype=F64)[::2]
    for x, y in ((wide[:, ::2], base["y"].t().contiguous().t()),
                 (base["x"].t().contiguous().t(), tall[::2])):
        assert not x.is_contiguous() or not y.is_contiguous()
        case = dict(base, x=x, y=y)
        check([fwd(case, True), *bwd(case, g, True)], base, True, g)
        dx, dy, *_ = bwd(case, g, True)
        assert dx.shape == x.shape and dy.shape == y.shape


def test_output_dtypes_follow_inputs():
    case = make_case(9, 6, 4, BF16, scalar_dtype=F64)
    case["bias"] = torch.tensor(0.5, dtype=F32)
    dx, dy, ds, db = bwd(case, torch.ones(9), True)
    assert dx.dtype == BF16 and dy.dtype == BF16
    assert ds.dtype == F64 and ds.dim() == 0 and db.dtype == F32 and db.dim() == 0
    loss, dx, dy, ds, db = fused(case, False, False)
    assert loss.dtype == F32 and loss.dim() == 0 and ds.dtype == F64 and db.dtype == F32
    assert fwd(case, True).dtype == F32


def test_through_python_call_with_default_diag_pos():
    case = make_case(6, 6, 4, F64)
    torch.testing.assert_close(_C.siglip_fwd_cpu(case["x"], case["y"], case["scale"],
                                                 case["bias"]), fwd(case, True))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, never a crash


def _args(**over):
    case = make_case(6, 5, 4, F32)
    args = dict(x=case["x"], y=case["y"], scale=case["scale"], bias=case["bias"])
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(x=torch.randn(6)), r"siglip_fwd_cpu: x must be a 2-D tensor"),
    (dict(y=torch.randn(5, 4, 1)), r"y must be a 2-D tensor"),
    (dict(y=torch.randn(5, 3)), r"x and y must have the same feature size D"),
    (dict(y=torch.randn(5, 4, dtype=F64)), r"x and y must have the same dtype"),
    (dict(x=torch.randint(0, 3, (6, 4)), y=torch.randint(0, 3, (5, 4))), r"float32, float64"),
    (dict(x=torch.empty(6, 4, device="meta")), r"expects CPU tensors, got meta for x"),
    (dict(scale=torch.ones(2)), r"scale must be a scalar"),
    (dict(bias=torch.tensor(1)), r"bias must be a floating-point"),
])
def test_bad_input(over, match):
    a = _args(**over)
    with pytest.raises((RuntimeError, ValueError), match=match):
        _C.siglip_fwd_cpu(a["x"], a["y"], a["scale"], a["bias"], True)
    with pytest.raises((RuntimeError, ValueError), match=match.replace("fwd", "fused")):
        _C.siglip_fused_cpu(a["x"], a["y"], a["scale"], a["bias"], True, True)


def test_bad_backward_input():
    a = _args()
    with pytest.raises(RuntimeError, match=r"g_row must be a 1-D tensor of length R"):
        _C.siglip_bwd_cpu(torch.ones(5), a["x"], a["y"], a["scale"], a["bias"], True)
    with pytest.raises(RuntimeError, match=r"g_row must be a floating-point tensor"):
        _C.siglip_bwd_cpu(torch.ones(6, dtype=torch.long), a["x"], a["y"], a["scale"],
                          a["bias"], True)
    with pytest.raises(RuntimeError, match=r"expects CPU tensors, got meta for g_row"):
        _C.siglip_bwd_cpu(torch.ones(6, device="meta"), a["x"], a["y"], a["scale"], a["bias"],
                          True)


# ---------------------------------------------------------------------------------------------
# Memory: nothing of size R x C


MEMORY_SCRIPT = """
    from fastcl import _C

    n, d = int(sys.argv[1]), int(sys.argv[2])
    x = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    _C.siglip_fused_cpu(x[:64], y[:64], scale, bias, True, True)  # load libraries, start threads
    reset_peak()
    rows = _C.siglip_fwd_cpu(x, y, scale, bias, True)
    loss, dx, dy, ds, db = _C.siglip_fused_cpu(x, y, scale, bias, True, True)
    dx2, dy2, ds2, db2 = _C.siglip_bwd_cpu(torch.full((n,), 1.0 / n), x, y, scale, bias, True)
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all() and torch.isfinite(loss)
    assert torch.allclose(loss, rows.sum() / n) and torch.allclose(dx, dx2, atol=1e-6)
    print(peak_growth())
"""



def test_peak_memory_is_linear():
    n, d = 16384, 64
    slab = 16 << 20
    growth = peak_rss_growth(MEMORY_SCRIPT, n, d, env={"FASTCL_CPU_SLAB_BYTES": str(slab)})
    logits_bytes = n * n * 4
    assert growth < 0.1 * logits_bytes, (
        f"peak RSS grew by {growth / 2**20:.1f} MiB at N={n}: not far below the "
        f"{logits_bytes / 2**20:.0f} MiB of the logits")
    # one slab plus O((R + C) * D): two sets of gradients, an x slab, allocator slack
    linear = slab + 6 * n * d * 4 + (24 << 20)
    assert growth < linear, f"peak RSS grew by {growth / 2**20:.1f} MiB, expected < {linear / 2**20:.0f} MiB"
