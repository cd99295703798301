"""The CUDA kernels of the sigmoid loss (``fastcl._C.siglip_{fwd,bwd,fused}_cuda``).

Contract (every backend): x ``[R, D]`` against y ``[C, D]``, ``s_ij = scale <x_i, y_j> + bias``,
``z_ij = +1`` if ``diag_pos`` and ``i == j``, else ``-1``; ``fwd`` gives the row sums of
``softplus(-z_ij s_ij)``, ``bwd`` the gradients of ``sum_i g_row[i] rows[i]``, ``fused`` the loss
(divided by R when ``mean``) with its gradients.

Without a GPU: the build binds the three functions, and they refuse CPU tensors with a clear
message before any CUDA call.

With a GPU (``gpu`` marker): everything against a materialized fp64 oracle on the same (rounded)
inputs, its gradients by autograd of ``-logsigmoid(z s)`` (not by the formula the kernels use).
Tight in fp64; in fp32, bf16 and fp16 a gradient's error against the fp64 oracle may be at most
about twice the error of the same oracle computed in fp32 and rounded to the output dtype, plus a
small slack relative to the gradient's magnitude (the kernels round the gradient tile to bf16 or
fp16 before its GEMMs). Slab boundaries through ``FASTCL_CUDA_SLAB_BYTES``; rectangular and odd
shapes, extreme scales and biases, N up to 16384 and D up to 1024, and peak memory.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl import dispatch

from _cuda_cases import (DEVICE, SLAB_SHAPES, assert_cuda_build, extension_with, padded,
                         peak_extra_memory)
from _cuda_cases import slab_bytes  # noqa: F401 - a fixture

try:
    from fastcl import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
NAMES = ("siglip_fwd_cuda", "siglip_bwd_cuda", "siglip_fused_cuda")
GRAD_NAMES = ("dx", "dy", "dscale", "dbias")

# Row sums vs the fp64 oracle on the same inputs: the kernels form the logits in fp32 (exact
# products of half-precision inputs, fp32 accumulation; an error that grows with |scale|) and sum
# each row in fp32 per thread. Bound: 2 x the error of the oracle computed in fp32, plus
# FWD_RTOL * |row| + FWD_ATOL; fp64 inputs: FWD_RTOL_64.
FWD_RTOL, FWD_ATOL, FWD_RTOL_64 = 2e-5, 5e-5, 1e-10
# Gradients: err(kernel) <= 2 * err(fp32 oracle rounded to the dtype) + ATOL * max|grad|.
GRAD_ATOL = {F64: 1e-10, F32: 2e-5, BF16: 1e-2, F16: 2e-3}


def _ext():
    return extension_with("siglip_fwd_cuda", "CUDA SigLIP kernels")


# ---------------------------------------------------------------------------------------------
# Without a GPU: build and boundary checks


def test_extension_binds_siglip_cuda():
    if _C is None:
        pytest.skip("fastcl._C is not built")
    assert_cuda_build(_C)
    if not _C.WITH_CUDA:
        assert not any(hasattr(_C, n) for n in NAMES)
        return
    for name in NAMES:
        fn = getattr(_C, name, None)
        assert callable(fn), f"fastcl._C was built with CUDA but does not bind {name}"
        assert fn.__doc__ and "CUDA" in fn.__doc__


def _cpu_args(R=5, C=4, D=3, device="cpu"):
    x, y = torch.randn(R, D, device=device), torch.randn(C, D, device=device)
    return x, y, torch.tensor(2.0), torch.tensor(-1.0)


def test_cpu_tensors_are_refused_before_any_cuda_call():
    ext = _ext()
    x, y, scale, bias = _cpu_args()
    g = torch.ones(5)
    calls = {
        "siglip_fwd_cuda": lambda: ext.siglip_fwd_cuda(x, y, scale, bias, True),
        "siglip_bwd_cuda": lambda: ext.siglip_bwd_cuda(g, x, y, scale, bias, False),
        "siglip_fused_cuda": lambda: ext.siglip_fused_cuda(x, y, scale, bias, True, True),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{name} expects CUDA tensors, got cpu for x"):
            call()
    xm = torch.empty(5, 3, device="meta")
    with pytest.raises(RuntimeError, match="siglip_fwd_cuda expects CUDA tensors, got meta for x"):
        ext.siglip_fwd_cuda(xm, y, scale, bias, False)


def test_keyword_arguments_follow_the_contract():
    ext = _ext()
    x, y, scale, bias = _cpu_args()
    with pytest.raises(RuntimeError, match="expects CUDA tensors"):
        ext.siglip_fwd_cuda(x=x, y=y, scale=scale, bias=bias, diag_pos=True)
    with pytest.raises(RuntimeError, match="expects CUDA tensors"):
        ext.siglip_bwd_cuda(g_row=torch.ones(5), x=x, y=y, scale=scale, bias=bias, diag_pos=True)
    with pytest.raises(RuntimeError, match="expects CUDA tensors"):
        ext.siglip_fused_cuda(x=x, y=y, scale=scale, bias=bias, diag_pos=True, mean=False)
    with pytest.raises(TypeError):
        ext.siglip_fused_cuda(x, y, scale, bias, True)  # `mean` is required


# ---------------------------------------------------------------------------------------------
# GPU helpers


def _stat_dtype(dtype):
    return F64 if dtype == F64 else F32


def make_case(R, C, D, dtype=F64, *, scale=10.0, bias=-5.0, seed=0, align=0.6, normalize=True,
              scalar_dtype=None):
    """x [R, D] and y [C, D]; the first min(R, C) rows of y lean towards x (positive pairs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, D, generator=g, dtype=F64)
    y = torch.randn(C, D, generator=g, dtype=F64)
    n = min(R, C)
    y[:n] = align * x[:n] + (1 - align) * y[:n]
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    sdt = scalar_dtype or _stat_dtype(dtype)
    dev = torch.device(DEVICE)
    return dict(x=x.to(dtype).to(dev), y=y.to(dtype).to(dev),
                scale=torch.tensor(scale, dtype=sdt, device=dev),
                bias=torch.tensor(bias, dtype=sdt, device=dev))


def random_g(R, dtype, seed=1, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(R, generator=g, dtype=F64) * magnitude
    if R > 2:
        v[1] = 0.0  # a row without gradient
    return v.to(_stat_dtype(dtype)).to(DEVICE)


def k_fwd(case, diag_pos):
    return _ext().siglip_fwd_cuda(case["x"], case["y"], case["scale"], case["bias"], diag_pos)


def k_bwd(case, g_row, diag_pos):
    return _ext().siglip_bwd_cuda(g_row, case["x"], case["y"], case["scale"], case["bias"],
                                  diag_pos)


def k_fused(case, diag_pos, mean):
    return _ext().siglip_fused_cuda(case["x"], case["y"], case["scale"], case["bias"], diag_pos,
                                    mean)


def _pair_losses(x, y, a, b, diag_pos, r0):
    s = a * (x @ y.T) + b
    z = torch.full_like(s, -1.0)
    if diag_pos:
        # rows r0 .. r0 + len(x) of the full matrix: the positive of row r is column r
        r = torch.arange(r0, r0 + x.shape[0], device=x.device)
        keep = r < y.shape[0]
        z[keep.nonzero().squeeze(1), r[keep]] = 1.0
    return -F.logsigmoid(z * s)


def oracle(case, g_row=None, compute=F64, chunk=4096):
    """Materialized row sums (and, with g_row, the gradients by autograd) at dtype ``compute``.

    Row chunks of at most ``chunk`` rows keep the materialized logits bounded for large cases.
    """
    x, y = case["x"].to(compute), case["y"].to(compute)
    a0, b0 = case["scale"].to(compute), case["bias"].to(compute)
    R = x.shape[0]
    rows = torch.zeros(R, dtype=compute, device=x.device)
    if g_row is None:
        with torch.no_grad():
            for r0 in range(0, R, chunk):
                xs = x[r0:r0 + chunk]
                rows[r0:r0 + xs.shape[0]] = _pair_losses(xs, y, a0, b0, case.get("diag_pos"),
                                                         r0).sum(1)
        return rows
    g = g_row.to(compute)
    dx = torch.zeros_like(x)
    dy = torch.zeros_like(y)
    da = torch.zeros_like(a0)
    db = torch.zeros_like(b0)
    yl = y.clone().requires_grad_(True)
    for r0 in range(0, R, chunk):
        xs = x[r0:r0 + chunk].clone().requires_grad_(True)
        a = a0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        yl.grad = None
        per = _pair_losses(xs, yl, a, b, case.get("diag_pos"), r0).sum(1)
        rows[r0:r0 + xs.shape[0]] = per.detach()
        gx, gy, ga, gb = torch.autograd.grad((per * g[r0:r0 + xs.shape[0]]).sum(), (xs, yl, a, b))
        dx[r0:r0 + xs.shape[0]] = gx
        dy += gy
        da += ga
        db += gb
    return rows, (dx, dy, da, db)


def with_diag(case, diag_pos):
    return dict(case, diag_pos=diag_pos)


def check_rows(rows, case, dtype):
    """Kernel row sums against the fp64 oracle (``case`` holds diag_pos)."""
    R = case["x"].shape[0]
    assert rows.dtype == _stat_dtype(dtype), f"rows: dtype {rows.dtype}"
    assert rows.shape == (R,) and rows.device == case["x"].device
    assert torch.isfinite(rows).all(), "rows: NaN or inf"
    want = oracle(case)
    if dtype == F64:
        torch.testing.assert_close(rows, want, rtol=FWD_RTOL_64, atol=FWD_RTOL_64)
        return
    err = (rows.to(F64) - want).abs()
    err_plain = (oracle(case, compute=F32).to(F64) - want).abs().max().item() if R else 0.0
    bound = 2 * err_plain + FWD_RTOL * want.abs() + FWD_ATOL
    bad = err > bound
    assert not bad.any(), (f"rows: {int(bad.sum())} of {R} exceed the bound; worst error "
                           f"{err.max().item():.3e} (fp32-oracle error {err_plain:.3e})")


def check_grads(got, case, g_row, dtype, mag_floor=1e-3, exact=None, atol=None):
    """Kernel gradients ``got`` against the fp64 oracle's, for upstream row gradients g_row."""
    leaves = (case["x"], case["y"], case["scale"], case["bias"])
    for name, a, ref in zip(GRAD_NAMES, got, leaves):
        assert a.dtype == ref.dtype and a.shape == ref.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert a.device == ref.device, f"{name}: device {a.device}"
        assert torch.isfinite(a).all(), f"{name}: NaN or inf"
    if exact is None:
        exact = oracle(case, g_row, F64)[1]
    if dtype == F64:
        for name, a, b in zip(GRAD_NAMES, got, exact):
            torch.testing.assert_close(a, b.to(a.device), rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name: f"{n}: {m}")
        return
    plain = oracle(case, g_row, F32)[1]
    for name, a, p, b, ref in zip(GRAD_NAMES, got, plain, exact, leaves):
        b = b.to(a.device)
        mag = max(b.abs().max().item() if b.numel() else 0.0, mag_floor)
        err = (a.to(F64) - b).abs().max().item() if b.numel() else 0.0
        p = p.to(ref.dtype).to(a.device).to(F64)
        err_plain = (p - b).abs().max().item() if b.numel() else 0.0
        bound = 2 * err_plain + (atol or GRAD_ATOL[dtype]) * mag
        assert err <= bound, (f"{name}: error {err:.3e} vs fp64 oracle exceeds 2 x fp32-oracle "
                              f"error {err_plain:.3e} + slack ({bound:.3e}; max |grad| {mag:.3e})")


def check_fused(case, diag_pos, dtype, mean, mag_floor=1e-3):
    """The fused loss and gradients against the fp64 oracle (g_row = 1 / R or 1)."""
    R = case["x"].shape[0]
    c = with_diag(case, diag_pos)
    out = k_fused(case, diag_pos, mean)
    loss, grads = out[0], out[1:]
    assert loss.dtype == _stat_dtype(dtype) and loss.shape == () and loss.device == case["x"].device
    g = torch.full((R,), 1.0 / R if mean else 1.0, dtype=F64, device=DEVICE)
    rows, exact = oracle(c, g, F64)
    div = R if mean else 1
    want = rows.sum() / div
    if dtype == F64:
        torch.testing.assert_close(loss, want, rtol=FWD_RTOL_64, atol=FWD_RTOL_64)
    else:
        # the loss error is at most the sum of the row errors
        err_plain = (oracle(c, compute=F32).to(F64) - rows).abs().sum().item() / div
        bound = 2 * err_plain + FWD_RTOL * want.abs().item() + FWD_ATOL
        err = (loss.to(F64) - want).abs().item()
        assert err <= bound, f"loss: error {err:.3e} > {bound:.3e}"
    check_grads(grads, c, g.to(_stat_dtype(dtype)), dtype, mag_floor=mag_floor, exact=exact)
    return out


def run_all(case, dtype, diag_pos, g_seed=1, mag_floor=1e-3):
    """Forward, backward (random row gradients) and fused (mean and sum) against the oracle."""
    c = with_diag(case, diag_pos)
    check_rows(k_fwd(case, diag_pos), c, dtype)
    g = random_g(case["x"].shape[0], dtype, seed=g_seed)
    check_grads(k_bwd(case, g, diag_pos), c, g, dtype, mag_floor=mag_floor)
    for mean in (True, False):
        check_fused(case, diag_pos, dtype, mean, mag_floor=mag_floor)


# ---------------------------------------------------------------------------------------------
# fp64: exact up to rounding, several slabs with a ragged last one


FP64_SHAPES = [(37, 29, 6, 7), (29, 37, 6, 5), (16, 16, 8, 3), (33, 33, 5, 33), (1, 9, 3, None),
               (9, 1, 3, 1), (1, 1, 1, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("diag_pos", (True, False))
@pytest.mark.parametrize("R,C,D,slab_rows", FP64_SHAPES)
def test_fp64(R, C, D, slab_rows, diag_pos, slab_bytes):
    if slab_rows is not None:
        slab_bytes(slab_rows * padded(C) * 8)
    case = make_case(R, C, D, F64, scale=4.0, bias=-1.5, seed=R * C + D)
    run_all(case, F64, diag_pos)


# ---------------------------------------------------------------------------------------------
# fp32 / bf16 / fp16


@pytest.mark.gpu
@pytest.mark.parametrize("R,C", [(53, 41), (41, 53), (64, 64)])
@pytest.mark.parametrize("diag_pos", (True, False))
@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
def test_low_precision(dtype, diag_pos, R, C, slab_bytes):
    slab_bytes(16 * padded(C) * 4)
    case = make_case(R, C, 24, dtype, scale=10.0, bias=-5.0, seed=3)
    run_all(case, dtype, diag_pos, g_seed=4)


# ---------------------------------------------------------------------------------------------
# Shapes: R = 1, C = 1, slab boundaries, R != C, D not a multiple of 8, one-row slabs


@pytest.mark.gpu
@pytest.mark.parametrize("R,C,D,slab_rows", SLAB_SHAPES + [(7, 3, 1, 2)])
@pytest.mark.parametrize("dtype", (F64, F32, BF16), ids=str)
def test_shapes(R, C, D, slab_rows, dtype, slab_bytes):
    esize = 8 if dtype == F64 else 4
    if slab_rows is not None:
        slab_bytes(slab_rows * padded(C) * esize)
    case = make_case(R, C, D, dtype, scale=8.0, bias=-3.0, seed=R + C + D)
    run_all(case, dtype, diag_pos=True, g_seed=7)


@pytest.mark.gpu
def test_slab_size_does_not_change_results(slab_bytes):
    R, C, D = 300, 257, 16
    case = make_case(R, C, D, F64, seed=11)
    g = random_g(R, F64)
    outs = []
    for rows in (1, 13, 300):
        slab_bytes(rows * padded(C) * 8)
        outs.append((k_fwd(case, True),) + tuple(k_bwd(case, g, True))
                    + tuple(k_fused(case, True, True)))
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
def test_fused_equals_forward_then_backward(dtype):
    R, C, D = 200, 150, 40
    case = make_case(R, C, D, dtype, seed=5)
    for mean in (True, False):
        loss, *grads = k_fused(case, True, mean)
        rows = k_fwd(case, True)
        torch.testing.assert_close(loss, rows.sum() / (R if mean else 1), rtol=1e-5, atol=1e-6)
        g = torch.full((R,), 1.0 / R if mean else 1.0, device=DEVICE)
        for name, a, b in zip(GRAD_NAMES, grads, k_bwd(case, g, True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# Extreme scales and biases, strides, scalars on the CPU, small and large upstream gradients


@pytest.mark.gpu
@pytest.mark.parametrize("scale,bias", [(100.0, -50.0), (100.0, 0.0), (1e-3, 30.0), (-7.0, 2.0),
                                        (0.0, -3.0), (10.0, -1e4), (10.0, 1e4), (300.0, -300.0)])
@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=str)
def test_extreme_scale_and_bias(scale, bias, dtype, slab_bytes):
    R, C, D = 70, 90, 32
    slab_bytes(32 * padded(C) * 4)
    case = make_case(R, C, D, dtype, scale=scale, bias=bias, seed=9, align=0.9)
    for diag_pos in (True, False):
        c = with_diag(case, diag_pos)
        check_rows(k_fwd(case, diag_pos), c, dtype)
        g = random_g(R, dtype, seed=2)
        check_grads(k_bwd(case, g, diag_pos), c, g, dtype)
        check_fused(case, diag_pos, dtype, mean=True)


@pytest.mark.gpu
def test_non_contiguous_inputs_and_cpu_scalars():
    R, C, D = 40, 33, 12
    base = make_case(R, C, D, F64, seed=2)
    wide = torch.zeros(R, 2 * D, dtype=F64, device=DEVICE)
    wide[:, ::2] = base["x"]
    tall = torch.zeros(2 * C, D, dtype=F64, device=DEVICE)
    tall[::2] = base["y"]
    g = torch.randn(2 * R, dtype=F64, device=DEVICE)[::2]
    for x, y in ((wide[:, ::2], base["y"].t().contiguous().t()),
                 (base["x"].t().contiguous().t(), tall[::2])):
        assert not (x.is_contiguous() and y.is_contiguous())
        case = dict(base, x=x, y=y)
        run_all(case, F64, diag_pos=True)
        check_grads(k_bwd(case, g, True), with_diag(base, True), g, F64)
    # scale and bias on the CPU: values copied, gradients returned on the CPU
    case = dict(base, scale=base["scale"].cpu(), bias=base["bias"].cpu())
    dx, dy, ds, db = k_bwd(case, g, False)
    assert ds.device.type == "cpu" and db.device.type == "cpu"
    check_grads((dx, dy, ds, db), with_diag(case, False), g, F64)
    check_rows(k_fwd(case, False), with_diag(case, False), F64)
    check_fused(case, False, F64, mean=True)


@pytest.mark.gpu
def test_fp64_scale_with_fp32_features():
    R, C, D = 30, 20, 8
    case = make_case(R, C, D, F32, seed=6, scalar_dtype=F64)
    c = with_diag(case, True)
    check_rows(k_fwd(case, True), c, F32)
    g = random_g(R, F32)
    grads = k_bwd(case, g, True)
    assert grads[2].dtype == F64 and grads[3].dtype == F64
    check_grads(grads, c, g, F32)
    check_fused(case, True, F32, mean=False)


@pytest.mark.gpu
@pytest.mark.parametrize("magnitude", [1e-6, 1e3])
@pytest.mark.parametrize("dtype", (F16, BF16), ids=str)
def test_gradient_tile_keeps_small_and_large_entries(magnitude, dtype):
    """Row gradients of 1e-6 give tile entries far below fp16's normal range, and 1e3 (loss
    scaling) entries near its maximum: the tile is stored times a power of two chosen from
    max |g_row|."""
    R, C, D = 512, 512, 64
    case = make_case(R, C, D, dtype, scale=10.0, bias=-10.0, seed=12)
    g = random_g(R, dtype, seed=5, magnitude=magnitude)
    check_grads(k_bwd(case, g, True), with_diag(case, True), g, dtype, mag_floor=0.0)


@pytest.mark.gpu
def test_no_rows_or_no_columns():
    for R, C in ((0, 5), (5, 0), (0, 0)):
        case = make_case(R, C, 4, F32)
        rows = k_fwd(case, True)
        assert rows.shape == (R,) and rows.dtype == F32 and (rows == 0).all()
        leaves = (case["x"], case["y"], case["scale"], case["bias"])
        g = torch.ones(R, device=DEVICE)
        for grads in (k_bwd(case, g, True), k_fused(case, True, True)[1:]):
            for a, ref in zip(grads, leaves):
                assert a.shape == ref.shape and a.dtype == ref.dtype and (a == 0).all()
        for mean in (True, False):
            loss = k_fused(case, False, mean)[0]
            assert loss.shape == () and loss.dtype == F32 and loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Large shapes and memory


@pytest.mark.gpu
@pytest.mark.device_only
@pytest.mark.parametrize("R,C,D,dtype,diag_pos", [
    (16384, 16384, 1024, BF16, True),
    (16384, 16384, 256, F16, True),
    (8192, 8192, 1000, F32, True),
    (12345, 7777, 77, BF16, False),
    (4096, 16384, 1024, BF16, True),
])
def test_large(R, C, D, dtype, diag_pos):
    """SigLIP's initialization (scale 10, bias -10) at training sizes, mean reduction."""
    case = make_case(R, C, D, dtype, scale=10.0, bias=-10.0, seed=R + D)
    c = with_diag(case, diag_pos)
    g = torch.full((R,), 1.0 / R, dtype=F64, device=DEVICE)
    rows_want, exact = oracle(c, g, F64, chunk=2048)
    rows = k_fwd(case, diag_pos)
    torch.testing.assert_close(rows.to(F64), rows_want, rtol=1e-4, atol=1e-4)
    loss, *fused = k_fused(case, diag_pos, True)
    torch.testing.assert_close(loss.to(F64), rows_want.sum() / R, rtol=1e-4, atol=1e-6)
    bwd = k_bwd(case, g.float(), diag_pos)
    tol = {BF16: 1e-2, F16: 2e-3, F32: 1e-4}[dtype]
    for got in (fused, bwd):
        for name, a, b in zip(GRAD_NAMES, got, exact):
            assert torch.isfinite(a).all(), f"{name}: NaN or inf"
            mag = b.abs().max().item()
            err = (a.to(F64) - b).abs().max().item()
            bound = tol * mag + 1e-7
            assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (max |grad| {mag:.3e})"


@pytest.mark.gpu
@pytest.mark.device_only
def test_peak_memory_is_linear(monkeypatch):
    """At R = C = 32768 the extra memory is one slab plus O((R + C) D), far below R * C * 4."""
    ext = _ext()
    N, D = 32768, 256
    budget = 64 << 20
    x = F.normalize(torch.randn(N, D, device=DEVICE), dim=1).to(BF16)
    y = F.normalize(torch.randn(N, D, device=DEVICE), dim=1).to(BF16)
    scale = torch.tensor(10.0, device=DEVICE)
    bias = torch.tensor(-10.0, device=DEVICE)
    g = torch.full((N,), 1.0 / N, device=DEVICE)

    def run(n):
        loss, *grads = ext.siglip_fused_cuda(x[:n], y[:n], scale, bias, True, True)
        rows = ext.siglip_fwd_cuda(x[:n], y[:n], scale, bias, True)
        return [loss, rows, *grads, *ext.siglip_bwd_cuda(g[:n], x[:n], y[:n], scale, bias, True)]

    extra, out = peak_extra_memory(run, N, budget, monkeypatch)
    assert all(torch.isfinite(t).all() for t in out)
    # one slab, the fp32 dy accumulator, the outputs of both calls, per-slab products, row sums
    linear = 6 * N * D * 4 + 64 * N * 4 + (16 << 20)
    assert extra <= budget + linear, f"extra memory {extra / 2**20:.1f} MiB"
    assert extra < N * N * 4 // 8, (f"extra memory {extra / 2**20:.1f} MiB is not far below "
                                     f"R * C * 4 bytes")


# ---------------------------------------------------------------------------------------------
# The public loss on the cuda backend (once the dispatch table routes SigLIP to it)


@pytest.mark.gpu
@pytest.mark.device_only
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
def test_siglip_loss_end_to_end(dtype, reduction):
    _ext()
    reason = dispatch.why_not("cuda", "siglip_loss", torch.device(DEVICE), dtype)
    if reason is not None:
        pytest.skip(f"siglip_loss is not routed to the cuda backend: {reason}")
    N, D = 257, 96
    g = torch.Generator().manual_seed(0)
    x0 = F.normalize(torch.randn(N, D, generator=g), dim=1).to(DEVICE, dtype)
    y0 = F.normalize(torch.randn(N, D, generator=g), dim=1).to(DEVICE, dtype)
    results = {}
    for backend in ("cuda", "reference"):
        x = x0.clone().requires_grad_(True)
        y = y0.clone().requires_grad_(True)
        s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
        b = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
        out = fastcl.siglip_loss(x, y, s, b, reduction=reduction, backend=backend)
        (out.sum() if reduction == "none" else out).backward()
        results[backend] = (out.detach(), x.grad, y.grad, s.grad, b.grad)
    rel = 1e-4 if dtype == F32 else 2e-2
    for name, a, b in zip(("loss", "dx", "dy", "dscale", "dbias"), results["cuda"],
                          results["reference"]):
        assert a.shape == b.shape, f"{name}: {a.shape} vs {b.shape}"
        err = (a.double() - b.double()).abs().max().item()
        bound = rel * b.double().abs().max().item() + 1e-6
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e}"
