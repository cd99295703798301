"""The Triton kernels of the sigmoid loss (SigLIP) against the oracle.

Row losses are compared with :func:`fastcl.reference.siglip_ref` evaluated in fp64 on the same
(already rounded) inputs, gradients with the autograd of that oracle; the rectangular blocks
(``x`` of ``[R, D]`` against ``y`` of ``[C, D]``, with or without positives on the diagonal) that
the gathered and ring strategies need are compared with the same pair terms written out. Without CUDA the kernels
run on CPU tensors through Triton's interpreter (small shapes). Low-precision results also obey
FlashAttention's rule: the kernel's error against the fp64 oracle is at most about twice the
error of plain PyTorch computing the same thing in the input dtype.
"""

import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _memory import LargestAllocation  # noqa: E402

import fastcl  # noqa: E402
from fastcl.kernels import contrastive as tc  # noqa: E402
from fastcl.kernels import siglip as sk  # noqa: E402
from fastcl.ops import siglip as ops  # noqa: E402
from fastcl.reference import siglip_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not tc._INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU",
                allow_module_level=True)

# Tolerances relative to the magnitude of the reference (max |ref|), per dtype.
FWD_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
BWD_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_NAMES = ("dx", "dy", "dscale", "dbias")


@pytest.fixture(autouse=True)
def _fixed_config(monkeypatch):
    """Small tests launch one configuration instead of autotuning every flag combination."""
    monkeypatch.setattr(tc, "AUTOTUNE", False)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def make_inputs(N, D, dtype, *, C=None, scale=10.0, bias=-10.0, seed=0, normalize=True):
    """``x`` of ``[N, D]``, ``y`` of ``[C, D]`` (default ``C = N``), pairs ``(i, i)`` similar."""
    g = torch.Generator().manual_seed(seed)
    C = N if C is None else C
    x = torch.randn(N, D, generator=g)
    y = torch.randn(C, D, generator=g)
    m = min(N, C)
    y[:m] = x[:m] + 0.8 * y[:m]                     # matching pairs are similar
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        y = torch.nn.functional.normalize(y, dim=1)
    return (x.to(dtype).to(DEVICE), y.to(dtype).to(DEVICE),
            torch.tensor(float(scale), device=DEVICE), torch.tensor(float(bias), device=DEVICE))


def make_g(N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=g).to(DEVICE)


def pair_signs(R, C, diag_pos, dtype=torch.float64):
    """``z``: +1 on the diagonal when ``diag_pos``, -1 everywhere else."""
    diag = torch.eye(R, C, dtype=torch.bool, device=DEVICE) & diag_pos
    return torch.where(diag, 1.0, -1.0).to(dtype)


def oracle(x, y, scale, bias, g=None, dt=torch.float64, diag_pos=True):
    """Row losses and, with ``g``, the gradients of ``sum_i g_i rows_i``, computed in ``dt``."""
    leaves = [t.detach().to(dt).requires_grad_(g is not None) for t in (x, y, scale, bias)]
    with torch.enable_grad():
        if diag_pos and x.shape[0] == y.shape[0]:
            rows = siglip_ref(leaves[0], leaves[1], scale=leaves[2], bias=leaves[3],
                              reduction="none")
        else:
            z = pair_signs(x.shape[0], y.shape[0], diag_pos, dt)
            s = leaves[2] * (leaves[0] @ leaves[1].T) + leaves[3]
            rows = -torch.nn.functional.logsigmoid(z * s).sum(1)
    if g is None:
        return rows, None
    return rows, torch.autograd.grad(rows, leaves, g.to(dt))


def plain_lowp(x, y, scale, bias, g):
    """Plain PyTorch in the input dtype: logits, logsigmoid and the backward in that dtype."""
    dt = x.dtype
    leaves = [t.detach().to(dt).requires_grad_(True) for t in (x, y, scale, bias)]
    xx, yy, a, b = leaves
    N = x.shape[0]
    z = 2 * torch.eye(N, dtype=dt, device=x.device) - 1
    rows = -torch.nn.functional.logsigmoid(z * (a * (xx @ yy.T) + b)).sum(1)
    return rows, torch.autograd.grad(rows, leaves, g.to(dt))


def max_err(actual, expected):
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_close(actual, expected, tol, name, floor=1e-6):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    err = (actual - expected).abs().max().item()
    mag = expected.abs().max().item()
    assert err <= tol * mag + floor, f"{name}: max error {err:.3e}, magnitude {mag:.3e}"


def check(x, y, scale, bias, g, fwd_tol=None, bwd_tol=None, floor=1e-6, diag_pos=True):
    dt = x.dtype
    fwd_tol = FWD_TOL[dt] if fwd_tol is None else fwd_tol
    bwd_tol = BWD_TOL[dt] if bwd_tol is None else bwd_tol
    rows = sk.siglip_fwd(x, y, scale, bias, diag_pos)
    grads = sk.siglip_bwd(g, x, y, scale, bias, diag_pos)
    ref_rows, ref_grads = oracle(x, y, scale, bias, g, diag_pos=diag_pos)
    assert rows.dtype == torch.float32 and rows.shape == (x.shape[0],)
    assert_close(rows, ref_rows, fwd_tol, "rows")
    dx, dy, ds, db = grads
    assert dx.dtype == x.dtype and dx.shape == x.shape and dy.dtype == y.dtype
    assert dy.shape == y.shape
    assert ds.dim() == 0 and db.dim() == 0 and ds.dtype == torch.float32
    for name, a, e in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(a, e, bwd_tol, name, floor=floor)
    return rows, grads, ref_rows, ref_grads


def check_fused(x, y, scale, bias, mean, bwd_tol=None, diag_pos=True):
    N = x.shape[0]
    loss, *grads = sk.siglip_fused(x, y, scale, bias, diag_pos, mean)
    g = torch.full((N,), 1.0 / N if mean else 1.0, device=x.device)
    ref_rows, ref_grads = oracle(x, y, scale, bias, g, diag_pos=diag_pos)
    ref_loss = ref_rows.sum() / N if mean else ref_rows.sum()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, ref_loss, FWD_TOL[x.dtype], "loss")
    tol = BWD_TOL[x.dtype] if bwd_tol is None else bwd_tol
    for name, a, e in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(a, e, tol, name)


# --------------------------------------------------------------------------------------------
# forward and backward against the oracle
# --------------------------------------------------------------------------------------------

CASES = [
    # (N, D, dtype, scale, bias)
    (1, 3, torch.float32, 10.0, -10.0),
    (37, 3, torch.float32, 10.0, -10.0),
    (37, 100, torch.float32, 5.0, 0.5),        # D wider than one tile: chunked D, D slices
    (20, 20, torch.float32, 1.0, 0.0),
    (33, 20, torch.bfloat16, 10.0, -10.0),
    (29, 40, torch.float16, 10.0, -10.0),
]


@pytest.mark.parametrize("N,D,dtype,scale,bias", CASES,
                         ids=[f"{c[0]}x{c[1]}-{str(c[2])[6:]}" for c in CASES])
def test_matches_oracle(N, D, dtype, scale, bias):
    x, y, a, b = make_inputs(N, D, dtype, scale=scale, bias=bias)
    check(x, y, a, b, make_g(N))


@pytest.mark.parametrize("N,D,dtype,mean", [(1, 3, torch.float32, True),
                                            (37, 20, torch.float32, True),
                                            (37, 20, torch.float32, False),
                                            (29, 40, torch.bfloat16, True),
                                            (29, 40, torch.float16, True)])
def test_fused_matches_oracle(N, D, dtype, mean):
    x, y, a, b = make_inputs(N, D, dtype)
    check_fused(x, y, a, b, mean)


RECT_CASES = [
    # (R, C, D, dtype, diag_pos): a rank's images against the texts of all ranks (R < C, own
    # block first) or of another rank (no positives), and the transposed shapes
    (13, 40, 20, torch.float32, True),
    (40, 13, 20, torch.float32, True),
    (21, 37, 100, torch.float32, False),
    (37, 37, 20, torch.float32, False),
    (17, 45, 24, torch.bfloat16, True),
    (30, 19, 24, torch.float16, False),
    (1, 5, 3, torch.float32, True),
]


@pytest.mark.parametrize("R,C,D,dtype,diag_pos", RECT_CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{'diag' if c[4] else 'neg'}"
                              for c in RECT_CASES])
def test_rectangular_blocks_match_oracle(R, C, D, dtype, diag_pos):
    x, y, a, b = make_inputs(R, D, dtype, C=C)
    check(x, y, a, b, make_g(R), diag_pos=diag_pos)
    for mean in (True, False):
        check_fused(x, y, a, b, mean, diag_pos=diag_pos)


@pytest.mark.parametrize("by_slabs", [False, True], ids=("one-launch", "slabs"))
@pytest.mark.parametrize("R,C", [(0, 7), (7, 0), (0, 0)])
def test_empty_blocks(R, C, by_slabs, request):
    if by_slabs:
        request.getfixturevalue("slabs")(max(C, 1))
    x, y, a, b = make_inputs(max(R, 1), 5, torch.float32, C=max(C, 1))
    x, y = x[:R], y[:C]
    for diag_pos in (True, False):
        rows = sk.siglip_fwd(x, y, a, b, diag_pos)
        dx, dy, ds, db = sk.siglip_bwd(make_g(max(R, 1))[:R], x, y, a, b, diag_pos)
        assert rows.shape == (R,) and (rows == 0).all()
        assert dx.shape == x.shape and dy.shape == y.shape
        assert not dx.any() and not dy.any() and ds.item() == 0 and db.item() == 0
        loss, *fg = sk.siglip_fused(x, y, a, b, diag_pos, True)
        assert loss.item() == 0 and all(not t.any() for t in fg)


def test_diag_pos_only_flips_the_diagonal():
    """Without positives, the rows differ from the diagonal case by exactly the diagonal pairs."""
    N, D = 23, 16
    x, y, a, b = make_inputs(N, D, torch.float32)
    with_pos = sk.siglip_fwd(x, y, a, b, True).double()
    without = sk.siglip_fwd(x, y, a, b, False).double()
    s = (a.double() * (x.double() * y.double()).sum(1) + b.double())
    F = torch.nn.functional
    assert_close(without - with_pos, F.softplus(s) - F.softplus(-s), 1e-5, "diagonal terms")


@pytest.mark.parametrize("dtype,N,D", [(torch.bfloat16, 37, 20), (torch.float16, 37, 20),
                                       (torch.bfloat16, 24, 100)])
def test_low_precision_vs_plain_pytorch(dtype, N, D):
    """FlashAttention's rule: error vs the fp64 oracle at most ~2x plain PyTorch's at dtype."""
    x, y, a, b = make_inputs(N, D, dtype, scale=10.0, bias=-2.0)
    g = make_g(N)
    rows, grads, ref_rows, ref_grads = check(x, y, a, b, g)
    lo_rows, lo_grads = plain_lowp(x, y, a, b, g)
    for name, k, lo, e in zip(("rows",) + GRAD_NAMES, (rows, *grads), (lo_rows, *lo_grads),
                              (ref_rows, *ref_grads)):
        mag = e.abs().max().item()
        err_k, err_lo = max_err(k, e), max_err(lo, e)
        assert err_k <= 2 * err_lo + 1e-5 * mag + 1e-6, (
            f"{name}: kernel error {err_k:.3e} vs plain {dtype} PyTorch {err_lo:.3e}")


def test_noncontiguous_inputs():
    N, D = 33, 20
    x, y, a, b = make_inputs(N, D, torch.float32)
    g = make_g(N)
    x_t = x.T.contiguous().T                        # column-major [N, D]
    y_big = torch.zeros(2 * N, D + 7, device=DEVICE)
    y_big[::2, 3:3 + D] = y
    y_s = y_big[::2, 3:3 + D]                       # row stride 2 * (D + 7), offset storage
    assert not x_t.is_contiguous() and not y_s.is_contiguous()
    rows_c, grads_c, _, _ = check(x, y, a, b, g)
    rows_n, grads_n, _, _ = check(x_t, y_s, a, b, g)
    assert_close(rows_n, rows_c, 1e-6, "rows")
    for name, u, v in zip(GRAD_NAMES, grads_n, grads_c):
        assert_close(u, v, 1e-6, name)
    y_odd = torch.zeros(N, 2 * D, device=DEVICE)
    y_odd[:, ::2] = y
    check(x, y_odd[:, ::2], a, b, g)                # a strided feature axis


# lanes outside a mask may evaluate exp2 of a large argument before tl.where discards them
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extreme_scale_bias(dtype):
    """Logit scale 100 and bias -10 (SigLIP's regime, sharpened): finite, matches the oracle."""
    N, D = 40, 32
    x, y, a, b = make_inputs(N, D, dtype, scale=100.0, bias=-10.0)
    rows, grads, _, _ = check(x, y, a, b, make_g(N))
    assert torch.isfinite(rows).all() and all(torch.isfinite(t).all() for t in grads)
    loss, *fg = sk.siglip_fused(x, y, a, b, True, True)
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in fg)
    # raw (unnormalized) features: logits in the thousands
    x2, y2, a2, b2 = make_inputs(N, D, dtype, scale=100.0, bias=-10.0, normalize=False)
    check(x2, y2, a2, b2, make_g(N))


def test_fp16_small_upstream_gradients():
    """A mean over a large batch gives upstream gradients far below fp16's normal range."""
    N, D = 37, 20
    x, y, a, b = make_inputs(N, D, torch.float16)
    check(x, y, a, b, make_g(N) * 1e-5, floor=0.0)


def test_no_quadratic_allocation():
    """No tensor of N*N elements or more is created by the forward, backward or fused pass."""
    N, D = 70, 3                               # N*N = 4900 > N*D
    x, y, a, b = make_inputs(N, D, torch.float32)
    with LargestAllocation() as rec:
        for diag_pos in (True, False):
            sk.siglip_fwd(x, y, a, b, diag_pos)
            sk.siglip_bwd(make_g(N), x, y, a, b, diag_pos)
            sk.siglip_fused(x, y, a, b, diag_pos, True)
    assert rec.largest[0] < N * N, rec.largest
    leaves = [t.clone().requires_grad_(True) for t in (x, y, a, b)]
    with LargestAllocation() as rec:
        for reduction in ("mean", "none"):
            loss = fastcl.siglip_loss(*leaves, reduction=reduction, backend="triton")
            loss.sum().backward()
    assert rec.largest[0] < N * N, rec.largest


# --------------------------------------------------------------------------------------------
# the backward by slabs (wide D): G stored per slab of rows, then a GEMM
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,D,dtype,scale,bias", CASES,
                         ids=[f"{c[0]}x{c[1]}-{str(c[2])[6:]}" for c in CASES])
@pytest.mark.parametrize("acc", [False, True], ids=("two-sweeps", "accumulated"))
def test_slabs_match_oracle(N, D, dtype, scale, bias, acc, slabs, monkeypatch):
    """Both orientations by slabs, or (``SLAB_ACCUMULATE``) ``dy`` from the slabs of rows."""
    monkeypatch.setenv("FASTCL_TRITON_SLAB_ACCUMULATE", str(int(acc)))
    slabs(N)
    x, y, a, b = make_inputs(N, D, dtype, scale=scale, bias=bias)
    check(x, y, a, b, make_g(N))
    assert slabs.calls == ([N] if acc else [N, N])
    check_fused(x, y, a, b, True)


@pytest.mark.parametrize("R,C,D,dtype,diag_pos", RECT_CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{'diag' if c[4] else 'neg'}"
                              for c in RECT_CASES])
def test_slabs_rectangular_blocks(R, C, D, dtype, diag_pos, slabs):
    slabs(max(R, C))
    x, y, a, b = make_inputs(R, D, dtype, C=C)
    check(x, y, a, b, make_g(R), diag_pos=diag_pos)
    for mean in (True, False):
        check_fused(x, y, a, b, mean, diag_pos=diag_pos)


def test_slabs_equal_one_launch(slabs):
    """Loss, row sums and gradients of the two backward schedules agree."""
    N, D = 45, 24
    slabs(N)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y, a, b = make_inputs(N, D, dtype)
        g = make_g(N)
        by_slabs = (*sk.siglip_bwd(g, x, y, a, b, True), *sk.siglip_fused(x, y, a, b, True, True))
        os.environ["FASTCL_TRITON_SLAB_MIN_D"] = str(D + 1)
        one_launch = (*sk.siglip_bwd(g, x, y, a, b, True),
                      *sk.siglip_fused(x, y, a, b, True, True))
        os.environ["FASTCL_TRITON_SLAB_MIN_D"] = "1"
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for name, p, q in zip(GRAD_NAMES + ("loss",) + GRAD_NAMES, by_slabs, one_launch):
            assert_close(p, q, tol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_accumulated_slabs_rectangular_blocks(dtype, accumulated):
    R, C, D = 23, 41, 12
    accumulated(C)
    x, y, a, b = make_inputs(R, D, dtype, C=C)
    check(x, y, a, b, make_g(R), diag_pos=False)
    check_fused(x, y, a, b, False, diag_pos=False)


def test_slabs_fp16_small_upstream_gradients(slabs):
    N, D = 37, 20
    slabs(N)
    x, y, a, b = make_inputs(N, D, torch.float16)
    check(x, y, a, b, make_g(N) * 1e-5, floor=0.0)


def test_slabs_allocation_is_bounded(slabs):
    N, D = 70, 3
    slabs(N)
    budget = int(os.environ["FASTCL_TRITON_SLAB_BYTES"])
    x, y, a, b = make_inputs(N, D, torch.float32)
    with LargestAllocation() as rec:
        sk.siglip_bwd(make_g(N), x, y, a, b, True)
        sk.siglip_fused(x, y, a, b, False, True)
    assert rec.largest_bytes[0] <= max(budget, 3 * N * 4 * 4), rec.largest_bytes
    assert rec.largest[0] < N * N, rec.largest
    assert slabs.calls == [N, N, N, N]


# --------------------------------------------------------------------------------------------
# the custom ops
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton", "triton-slabs"])
@pytest.mark.parametrize("C,diag_pos", [(6, True), (9, False)])
def test_opcheck(backend, C, diag_pos, request):
    N, D = 6, 5
    if backend == "triton-slabs":
        request.getfixturevalue("slabs")(3)   # two slabs of 3 rows
        backend = "triton"
    x, y, a, b = make_inputs(N, D, torch.float32, C=C)
    leaves = [t.clone().requires_grad_(True) for t in (x, y, a, b)]
    torch.library.opcheck(ops.siglip_fwd, (*leaves, diag_pos, backend))
    torch.library.opcheck(ops.siglip_bwd, (make_g(N), x, y, a, b, diag_pos, backend))
    for mean in (True, False):
        torch.library.opcheck(ops.siglip_fused, (*leaves, diag_pos, mean, backend))


@pytest.mark.parametrize("by_slabs", [False, True], ids=("one-launch", "slabs"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradients_through_the_op(reduction, by_slabs, request):
    """``fastcl.siglip_loss`` with ``backend="triton"``: loss and every gradient (the fused
    one-pass path for mean / sum, forward + backward ops for none) against the fp64 oracle."""
    N, D = 21, 10
    if by_slabs:
        request.getfixturevalue("slabs")(N)
    x, y, a, b = make_inputs(N, D, torch.float32, scale=8.0, bias=-4.0)
    leaves = [t.clone().requires_grad_(True) for t in (x, y, a, b)]
    loss = fastcl.siglip_loss(*leaves, reduction=reduction, backend="triton")
    w = make_g(N) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    (loss * w).sum().backward()
    ref = [t.detach().double().requires_grad_(True) for t in (x, y, a, b)]
    ref_loss = siglip_ref(ref[0], ref[1], scale=ref[2], bias=ref[3], reduction=reduction)
    (ref_loss * w.double()).sum().backward()
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-5, "loss")
    for name, u, v in zip(GRAD_NAMES, leaves, ref):
        assert_close(u.grad, v.grad, 1e-4, name)


def test_fused_and_unfused_paths_agree():
    N, D = 19, 12
    x, y, a, b = make_inputs(N, D, torch.bfloat16)
    fused = [t.clone().requires_grad_(True) for t in (x, y, a, b)]
    plain = [t.clone().requires_grad_(True) for t in (x, y, a, b)]
    fastcl.siglip_loss(*fused, backend="triton").backward()                 # one pass
    fastcl.siglip_loss(*plain, reduction="none", backend="triton").mean().backward()
    for name, u, v in zip(GRAD_NAMES, fused, plain):
        assert_close(u.grad, v.grad, 1e-2, name)
    with torch.no_grad():                                                   # no gradients
        assert_close(fastcl.siglip_loss(x, y, a, b, backend="triton"),
                     fastcl.siglip_loss(*fused, backend="triton"), 1e-6, "loss")


# --------------------------------------------------------------------------------------------
# real sizes on a GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestGPU:
    @pytest.fixture(autouse=True)
    def _autotune(self, monkeypatch):
        monkeypatch.setattr(tc, "AUTOTUNE", True)

    @pytest.mark.parametrize("N,D,dtype", [
        (16384, 768, torch.bfloat16),
        (8192, 1024, torch.float16),
        (4096, 256, torch.float32),
        (12345, 100, torch.bfloat16),
        (3000, 4096, torch.bfloat16),
    ])
    def test_real_sizes(self, N, D, dtype):
        x, y, a, b = make_inputs(N, D, dtype)
        g = make_g(N) / N
        rows = sk.siglip_fwd(x, y, a, b, True)
        grads = sk.siglip_bwd(g, x, y, a, b, True)
        loss, *fgrads = sk.siglip_fused(x, y, a, b, True, True)
        torch.cuda.synchronize()
        ref_rows, ref_grads = oracle(x, y, a, b, g)
        if dtype == torch.float32:
            lo_rows, lo_grads = ref_rows, ref_grads
        else:
            lo_rows, lo_grads = plain_lowp(x, y, a, b, g)
        for name, k, lo, e in zip(("rows",) + GRAD_NAMES, (rows, *grads),
                                  (lo_rows, *lo_grads), (ref_rows, *ref_grads)):
            assert torch.isfinite(k).all(), name
            mag = e.abs().max().item()
            tol = FWD_TOL[dtype] if name == "rows" else BWD_TOL[dtype]
            err = max_err(k, e)
            if dtype == torch.float32:
                assert err <= tol * mag + 1e-6, (name, err, mag)
            else:
                assert err <= max(2 * max_err(lo, e), tol * mag) + 1e-6, (name, err, mag)
        del ref_grads, lo_grads
        gm = torch.full((N,), 1.0 / N, device=DEVICE)
        ref_rows, ref_grads = oracle(x, y, a, b, gm)
        assert_close(loss, ref_rows.sum() / N, 1e-5, "fused loss")
        for name, k, e in zip(GRAD_NAMES, fgrads, ref_grads):
            assert_close(k, e, BWD_TOL[dtype], f"fused {name}")

    def test_memory_is_linear_and_timing(self, monkeypatch):
        N, D = 32768, 512
        budget = 64 << 20
        monkeypatch.setenv("FASTCL_TRITON_SLAB_BYTES", str(budget))
        slab_extra = 0
        if tc._use_slabs(D, torch.bfloat16):  # one slab of G and its fp32 products
            rows = budget // (N * 2)
            slab_extra = budget + rows * D * 4 + 3 * rows * (N // 64 + 1) * 4 + 3 * N * 4
        x, y, a, b = make_inputs(N, D, torch.bfloat16)
        leaves = [t.clone().requires_grad_(True) for t in (x, y, a, b)]

        def fused(n):
            ls = [leaves[0][:n], leaves[1][:n], leaves[2], leaves[3]]
            return lambda: fastcl.siglip_loss(*ls, backend="triton").backward()

        def eager(n):
            ls = [(t.detach()[:n] if t.dim() else t.detach()).requires_grad_(True)
                  for t in (x, y, a, b)]
            z = 2 * torch.eye(n, device=DEVICE) - 1

            def run():
                logits = ls[2] * (ls[0] @ ls[1].T).float() + ls[3]
                (-torch.nn.functional.logsigmoid(z * logits).sum() / n).backward()
            return run

        def timed(fn, reps=5):
            fn()                                     # warm-up (and autotuning)
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[len(ts) // 2]

        step = fused(N)
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        # the gradients (dx, dy saved by the fused pass, then returned) and O(N) vectors
        assert extra <= 2 * (2 * N * D * 2) + 64 * N + (1 << 20) + slab_extra, extra
        t_fused = timed(step)
        n_e = 16384                                  # eager at a size that fits comfortably
        t_small, t_eager = timed(fused(n_e)), timed(eager(n_e))
        print(f"\nsiglip fwd+bwd bf16 N={N} D={D}: {t_fused * 1e3:.1f} ms "
              f"({8 * N * N * D / t_fused / 1e12:.0f} TFLOP/s counting 4 GEMMs), extra "
              f"{extra / 2**20:.0f} MiB; N={n_e}: fastcl {t_small * 1e3:.1f} ms, eager "
              f"{t_eager * 1e3:.1f} ms ({t_eager / t_small:.2f}x)")
