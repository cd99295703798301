"""The Triton kernels of the fused contrastive primitive against the oracle.

Forward statistics are compared with :func:`fastcl.reference.contrastive.contrastive_stats_ref`
evaluated in fp64 on the same (already rounded) inputs; the backward with the autograd of that
oracle. Without CUDA the kernels run on CPU tensors through Triton's interpreter (small shapes:
the interpreter runs one program after another). Low-precision results also obey the rule
FlashAttention tests by: the kernel's error against the fp64 oracle is at most about twice the
error of plain PyTorch computing the same thing in the input dtype.
"""

import inspect
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _memory import LargestAllocation  # noqa: E402

from fastcl.kernels import contrastive as tk  # noqa: E402
from fastcl.reference.contrastive import (  # noqa: E402
    contrastive_masks_ref,
    contrastive_stats_ref,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not tk._INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU",
                allow_module_level=True)

# Tolerances relative to the magnitude of the reference (max |ref|), per dtype.
FWD_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
BWD_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
STAT_NAMES = ("lse", "pos", "npos", "mean", "col_lse", "col_mean")
GRAD_NAMES = ("dq", "dk", "dscale", "dbias")


@pytest.fixture(autouse=True)
def _fixed_config(monkeypatch):
    """Small tests launch one configuration instead of autotuning every flag combination."""
    monkeypatch.setattr(tk, "AUTOTUNE", False)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def make_inputs(R, C, D, dtype, mode, *, scale=1 / 0.07, bias=-0.5, normalize=True, seed=0,
                n_labels=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, D, generator=g)
    k = torch.randn(C, D, generator=g)
    m = min(R, C)
    k[:m] = q[:m] + 0.7 * k[:m]          # matching pairs on the diagonal are similar
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        k = torch.nn.functional.normalize(k, dim=1)
    q = q.to(dtype).to(DEVICE)
    k = k.to(dtype).to(DEVICE)
    scale_t = torch.tensor(float(scale), device=DEVICE)
    bias_t = torch.tensor(float(bias), device=DEVICE)
    targets = row_labels = col_labels = None
    if mode == "targets":
        targets = torch.randint(-1, C, (R,), generator=g)
        targets[: min(R, C)] = torch.arange(min(R, C))  # mostly the diagonal, some -1 and others
        targets[::5] = -1
        targets[1::7] = torch.randint(0, C, targets[1::7].shape, generator=g)
        targets = targets.to(DEVICE)
    elif mode == "labels":
        row_labels = torch.randint(0, n_labels, (R,), generator=g).to(DEVICE)
        col_labels = torch.randint(0, n_labels, (C,), generator=g).to(DEVICE)
    return q, k, scale_t, bias_t, targets, row_labels, col_labels


def make_grads(R, C, present, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, n in zip(("lse", "pos", "mean", "col_lse", "col_mean"), (R, R, R, C, C)):
        out.append(torch.randn(n, generator=g).to(DEVICE) if name in present else None)
    return out


def oracle(q, k, scale, bias, targets, row_labels, col_labels, flags, grads=None):
    """fp64 statistics and, with ``grads``, the fp64 gradients ``(dq, dk, dscale, dbias)``."""
    leaves = [t.detach().double().requires_grad_(grads is not None) for t in (q, k, scale, bias)]
    with torch.enable_grad():
        stats = contrastive_stats_ref(*leaves, targets, row_labels, col_labels, **flags)
    if grads is None:
        return stats, None
    return stats, vjp(stats, leaves, grads)


def vjp(stats, leaves, grads):
    outs = (stats[0], stats[1], stats[3], stats[4], stats[5])
    pairs = [(o, gr) for o, gr in zip(outs, grads) if gr is not None and o.numel() > 0]
    if not pairs:
        return [torch.zeros_like(t) for t in leaves]
    res = torch.autograd.grad([o for o, _ in pairs], leaves,
                              [gr.to(o.dtype) for o, gr in pairs], allow_unused=True)
    return [torch.zeros_like(t) if r is None else r for r, t in zip(res, leaves)]


def lowp_torch(q, k, scale, bias, targets, row_labels, col_labels, flags, grads):
    """Plain PyTorch in the input dtype (the logits and every reduction in that dtype)."""
    dt = q.dtype
    leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, scale, bias)]
    qq, kk, sc, bb = leaves
    R, C = q.shape[0], k.shape[0]
    s = sc * (qq @ kk.T) + bb
    allowed, pos, den = contrastive_masks_ref(R, C, targets, row_labels, col_labels,
                                              flags["exclude_diag"], flags["decoupled"],
                                              q.device)

    def mlse(mask, dim):
        nonempty = mask.any(dim, keepdim=True)
        filled = torch.where(nonempty, s.masked_fill(~mask, float("-inf")), torch.zeros_like(s))
        out = torch.logsumexp(filled, dim=dim)
        return torch.where(nonempty.squeeze(dim), out, torch.full_like(out, float("-inf")))

    def mmean(mask, dim):
        cnt = mask.sum(dim).clamp_min(1).to(dt)
        return torch.where(mask, s, torch.zeros_like(s)).sum(dim) / cnt

    npos = pos.sum(1)
    lse = mlse(den, 1)
    if flags["pos_lse"]:
        p = mlse(pos, 1)
        p = torch.where(npos > 0, p, torch.zeros_like(p))
    else:
        p = mmean(pos, 1)
    mean = mmean(den, 1)
    if flags["col_stats"]:
        cl, cm = mlse(allowed, 0), mmean(allowed, 0)
    else:
        cl = cm = s.new_empty(0)
    stats = (lse, p, npos.to(dt), mean, cl, cm)
    return stats, vjp(stats, leaves, grads)


def assert_close(actual, expected, tol, name, floor=1e-6):
    """``max |actual - expected| <= tol * max |expected| + floor`` with identical infinities."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(inf_a, inf_e), f"{name}: infinities differ"
    assert torch.equal(actual[inf_a], expected[inf_e]), f"{name}: infinities differ in sign"
    fin = ~inf_e
    if fin.any():
        err = (actual[fin] - expected[fin]).abs().max().item()
        mag = expected[fin].abs().max().item()
        assert err <= tol * mag + floor, f"{name}: max error {err:.3e}, magnitude {mag:.3e}"


def max_err(actual, expected):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    fin = torch.isfinite(expected)
    if not fin.any():
        return 0.0
    return (actual[fin] - expected[fin]).abs().max().item()


def flags_of(exclude_diag=False, decoupled=False, pos_lse=False, col_stats=False):
    return dict(exclude_diag=exclude_diag, decoupled=decoupled, pos_lse=pos_lse,
                col_stats=col_stats)


def run_kernels(q, k, scale, bias, targets, row_labels, col_labels, flags, grads=None):
    stats = tk.contrastive_fwd(q, k, scale, bias, targets, row_labels, col_labels,
                               flags["exclude_diag"], flags["decoupled"], flags["pos_lse"],
                               flags["col_stats"])
    if grads is None:
        return stats, None
    lse, pos, npos, _, col_lse, *_ = stats
    g = tk.contrastive_bwd(*grads, q, k, scale, bias, targets, row_labels, col_labels,
                           lse, pos, npos, col_lse, flags["exclude_diag"], flags["decoupled"],
                           flags["pos_lse"], flags["col_stats"])
    return stats, g


def check_against_oracle(q, k, scale, bias, targets, row_labels, col_labels, flags, grads,
                         fwd_tol=None, bwd_tol=None, floor=1e-6):
    dt = q.dtype
    fwd_tol = FWD_TOL[dt] if fwd_tol is None else fwd_tol
    bwd_tol = BWD_TOL[dt] if bwd_tol is None else bwd_tol
    stats, g = run_kernels(q, k, scale, bias, targets, row_labels, col_labels, flags, grads)
    ref_stats, ref_g = oracle(q, k, scale, bias, targets, row_labels, col_labels, flags, grads)
    for name, a, e in zip(STAT_NAMES, stats, ref_stats):
        assert a.dtype == torch.float32 and a.device == q.device, name
        assert_close(a, e, fwd_tol, name)
    assert torch.equal(stats[2].cpu(), ref_stats[2].float().cpu()), "npos"
    if grads is not None:
        dq, dk, ds, db = g
        assert dq.dtype == q.dtype and dq.shape == q.shape
        assert dk.dtype == k.dtype and dk.shape == k.shape
        assert ds.dim() == 0 and db.dim() == 0 and ds.dtype == torch.float32
        for name, a, e in zip(GRAD_NAMES, g, ref_g):
            assert_close(a, e, bwd_tol, name, floor=floor)
    return stats, g, ref_stats, ref_g


# --------------------------------------------------------------------------------------------
# forward and backward against the oracle
# --------------------------------------------------------------------------------------------

ALL_G = ("lse", "pos", "mean", "col_lse", "col_mean")

CASES = [
    # (R, C, D, dtype, mode, flags, grads present)
    (1, 1, 3, torch.float32, "targets", flags_of(col_stats=True), ALL_G),
    (37, 29, 3, torch.float32, "targets", flags_of(col_stats=True), ("lse", "pos", "col_lse")),
    (37, 37, 20, torch.float32, "labels", flags_of(exclude_diag=True, col_stats=True), ALL_G),
    (29, 37, 100, torch.float32, "targets", flags_of(exclude_diag=True, decoupled=True),
     ("lse", "pos", "mean")),
    (20, 33, 20, torch.float32, "none", flags_of(col_stats=True), ("lse", "col_mean")),
    (97, 61, 20, torch.float32, "labels", flags_of(exclude_diag=True, pos_lse=True),
     ("lse", "pos")),
    (37, 29, 20, torch.bfloat16, "targets", flags_of(col_stats=True), ALL_G),
    (29, 37, 100, torch.float16, "labels",
     flags_of(exclude_diag=True, decoupled=True, col_stats=True), ("pos", "mean", "col_lse")),
]


@pytest.mark.parametrize("R,C,D,dtype,mode,flags,present", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}-"
                              + "".join(k[0] for k, v in c[5].items() if v) for c in CASES])
def test_matches_oracle(R, C, D, dtype, mode, flags, present):
    inputs = make_inputs(R, C, D, dtype, mode)
    grads = make_grads(R, C, present)
    check_against_oracle(*inputs, flags, grads)


FLAG_COMBOS = [
    (mode, *bits)
    for mode in ("none", "targets", "labels")
    for bits in itertools.product((False, True), repeat=4)
    # decoupled and pos_lse change nothing without positives
    if mode != "none" or not (bits[1] or bits[2])
]


@pytest.mark.parametrize("mode,exclude_diag,decoupled,pos_lse,col_stats", FLAG_COMBOS)
def test_flag_combinations(mode, exclude_diag, decoupled, pos_lse, col_stats):
    # two row blocks and two column tiles of the interpreter's 16 x 16 tiles, R != C
    R, C, D = 19, 23, 8
    inputs = make_inputs(R, C, D, torch.float32, mode, scale=5.0, n_labels=3)
    flags = flags_of(exclude_diag, decoupled, pos_lse, col_stats)
    check_against_oracle(*inputs, flags, make_grads(R, C, ALL_G))


# Self-similarity (k=None): one launch accumulates (G + G.T) @ q, the gradient of q as queries
# and as keys; the oracle runs with k = q as a second leaf and sums the two gradients.

SELF_COMBOS = [(mode, *bits) for mode in ("none", "targets", "labels")
               for bits in itertools.product((False, True), repeat=3)
               if mode != "none" or not (bits[1] or bits[2])]


def check_self(R, D, dtype, mode, flags, present, **kw):
    q, _k, scale, bias, targets, rl, cl = make_inputs(R, R, D, dtype, mode, **kw)
    if rl is not None:
        cl = rl  # one feature set: one label per sample
    grads = make_grads(R, R, present)
    stats = tk.contrastive_fwd(q, None, scale, bias, targets, rl, cl, flags["exclude_diag"],
                               flags["decoupled"], flags["pos_lse"], False)
    ref_stats, ref = oracle(q, q, scale, bias, targets, rl, cl, flags, grads)
    for name, a, e in zip(STAT_NAMES[:4], stats, ref_stats):
        assert a.dtype == torch.float32 and a.shape == (R,), name
        assert_close(a, e, FWD_TOL[dtype], name)
    assert torch.equal(stats[2].cpu(), ref_stats[2].float().cpu()), "npos"
    assert all(t.numel() == 0 for t in stats[4:])
    lse, pos, npos = stats[:3]
    dz, dk, ds, db = tk.contrastive_bwd(*grads, q, None, scale, bias, targets, rl, cl, lse, pos,
                                        npos, stats[4], flags["exclude_diag"],
                                        flags["decoupled"], flags["pos_lse"], False)
    assert dk.shape == (0, D) and dz.shape == q.shape and dz.dtype == q.dtype
    tol = BWD_TOL[dtype]
    for name, a, e in zip(("dz", "dscale", "dbias"), (dz, ds, db), (ref[0] + ref[1], *ref[2:])):
        assert_close(a, e, tol, name)


@pytest.mark.parametrize("mode,exclude_diag,decoupled,pos_lse", SELF_COMBOS)
def test_self_similarity_flag_combinations(mode, exclude_diag, decoupled, pos_lse):
    flags = flags_of(exclude_diag, decoupled, pos_lse)
    check_self(23, 8, torch.float32, mode, flags, ("lse", "pos", "mean"), scale=5.0, n_labels=3)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 100), (torch.bfloat16, 20),
                                     (torch.float16, 40)], ids=("fp32-chunked", "bf16", "fp16"))
def test_self_similarity_dtypes_and_chunked_d(dtype, D):
    flags = flags_of(exclude_diag=True, pos_lse=True)
    check_self(37, D, dtype, "labels", flags, ("lse", "pos"))


@pytest.mark.parametrize("dtype,R,C,D", [(torch.bfloat16, 37, 45, 20),
                                         (torch.float16, 37, 45, 20),
                                         (torch.bfloat16, 24, 19, 100)])
def test_low_precision_vs_plain_pytorch(dtype, R, C, D):
    """FlashAttention's rule: error vs the fp64 oracle at most ~2x plain PyTorch's at dtype."""
    inputs = make_inputs(R, C, D, dtype, "labels", n_labels=5)
    flags = flags_of(exclude_diag=True, col_stats=True)
    grads = make_grads(R, C, ALL_G)
    stats, g, ref_stats, ref_g = check_against_oracle(*inputs, flags, grads)
    low_stats, low_g = lowp_torch(*inputs, flags, grads)
    six = len(STAT_NAMES)
    for name, a, lo, e in zip(STAT_NAMES + GRAD_NAMES, stats[:six] + tuple(g),
                              low_stats[:six] + tuple(low_g), ref_stats[:six] + tuple(ref_g)):
        mag = e.detach().abs().max().item() if e.numel() else 0.0
        err_kernel, err_torch = max_err(a, e), max_err(lo, e)
        assert err_kernel <= 2 * err_torch + 1e-5 * mag + 1e-6, (
            f"{name}: kernel error {err_kernel:.3e} vs plain {dtype} PyTorch {err_torch:.3e}")


def test_noncontiguous_inputs():
    R, C, D = 33, 26, 20
    q, k, scale, bias, targets, _, _ = make_inputs(R, C, D, torch.float32, "targets")
    q_t = q.T.contiguous().T                        # column-major [R, D]
    k_big = torch.zeros(2 * C, D + 7, device=DEVICE)
    k_big[::2, 3:3 + D] = k
    k_s = k_big[::2, 3:3 + D]                       # row stride 2 * (D + 7), offset storage
    assert not q_t.is_contiguous() and not k_s.is_contiguous()
    flags = flags_of(exclude_diag=True, col_stats=True)
    grads = make_grads(R, C, ALL_G)
    stats_c, g_c = run_kernels(q, k, scale, bias, targets, None, None, flags, grads)
    stats_n, g_n, _, _ = check_against_oracle(q_t, k_s, scale, bias, targets, None, None,
                                              flags, grads)
    for name, a, b in zip(STAT_NAMES + GRAD_NAMES, stats_n + tuple(g_n), stats_c + tuple(g_c)):
        assert_close(a, b, 1e-6, name)
    # a strided feature axis (every other column)
    k_odd = torch.zeros(C, 2 * D, device=DEVICE)
    k_odd[:, ::2] = k
    check_against_oracle(q, k_odd[:, ::2], scale, bias, targets, None, None, flags, grads)


# lanes outside a mask may evaluate exp2 of a large argument before tl.where discards them
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 100.0), (torch.float16, 100.0)])
def test_extreme_scale_no_overflow(dtype, scale):
    """Logit scale 100 (temperature 0.01): no inf / NaN, matches the oracle."""
    R, C, D = 40, 40, 32
    inputs = make_inputs(R, C, D, dtype, "targets", scale=scale, bias=-10.0)
    flags = flags_of(exclude_diag=False, col_stats=True, pos_lse=True)
    grads = make_grads(R, C, ALL_G)
    stats, g, _, _ = check_against_oracle(*inputs, flags, grads)
    for t in stats[:4] + tuple(g):
        assert torch.isfinite(t).all()
    # far below 1 / tau: a fixed-max LSE would underflow to -inf here
    q, k, s, b, t, _, _ = inputs
    far = check_against_oracle(q, k, s, torch.tensor(-200.0, device=DEVICE), t, None, None,
                               flags, grads)
    assert torch.isfinite(far[0][0]).all()


def test_fp16_small_upstream_gradients():
    """Upstream gradients as small as a mean over a huge batch give G far below fp16's range."""
    R, C, D = 37, 45, 20
    inputs = make_inputs(R, C, D, torch.float16, "targets")
    grads = [g * 1e-5 if g is not None else None for g in make_grads(R, C, ALL_G)]
    check_against_oracle(*inputs, flags_of(col_stats=True), grads, floor=0.0)


def test_empty_sets_are_not_nan():
    """Rows with an empty denominator (lse = -inf) or no positive give zeros, never NaN."""
    flags = flags_of(exclude_diag=True, decoupled=True, col_stats=True)
    # one row, one column, the diagonal excluded: every set is empty
    inputs = make_inputs(1, 1, 5, torch.float32, "targets")
    stats, g, _, _ = check_against_oracle(*inputs, flags, make_grads(1, 1, ALL_G))
    assert torch.isinf(stats[0]).all() and torch.isinf(stats[4]).all()
    assert all(torch.count_nonzero(x) == 0 for x in g)
    # every column a positive and decoupled: empty denominators in every row
    R, C = 18, 17
    q, k, scale, bias, _, _, _ = make_inputs(R, C, 6, torch.float32, "none")
    rl = torch.zeros(R, dtype=torch.long, device=DEVICE)
    cl = torch.zeros(C, dtype=torch.long, device=DEVICE)
    for pos_lse in (False, True):
        stats, g, _, _ = check_against_oracle(
            q, k, scale, bias, None, rl, cl, flags_of(False, True, pos_lse, True),
            make_grads(R, C, ALL_G))
        assert torch.isinf(stats[0]).all() and (stats[3] == 0).all()
    # labels that match nothing: no positives anywhere
    stats, _, _, _ = check_against_oracle(q, k, scale, bias, None, rl + 1, cl,
                                          flags_of(False, True, True, False),
                                          make_grads(R, C, ALL_G))
    assert (stats[1] == 0).all() and (stats[2] == 0).all()


def test_no_grads_gives_zeros():
    R, C, D = 9, 7, 4
    q, k, scale, bias, targets, _, _ = make_inputs(R, C, D, torch.float32, "targets")
    stats, g = run_kernels(q, k, scale, bias, targets, None, None, flags_of(),
                           [None] * 5)
    assert all(torch.count_nonzero(x) == 0 for x in g)
    assert g[0].shape == q.shape and g[1].shape == k.shape and g[2].dim() == 0


def test_tf32_switch_runs():
    """The fp32 precision switch is a module attribute read at launch (exact by default)."""
    assert tk.ALLOW_TF32 == (os.environ.get("FASTCL_TF32", "0") == "1")
    old = tk.ALLOW_TF32
    try:
        tk.ALLOW_TF32 = True
        inputs = make_inputs(20, 18, 24, torch.float32, "targets")
        # TF32 keeps 10 mantissa bits of each input: logits off by ~1e-3 * scale
        check_against_oracle(*inputs, flags_of(col_stats=True), make_grads(20, 18, ALL_G),
                             fwd_tol=5e-3, bwd_tol=3e-2)
    finally:
        tk.ALLOW_TF32 = old


def test_no_quadratic_allocation():
    """No tensor of R*C elements or more is created during the forward or the backward."""
    R, C, D = 70, 60, 3                       # R*C = 4200 > R*D, C*D
    inputs = make_inputs(R, C, D, torch.float32, "labels")
    flags = flags_of(exclude_diag=True, pos_lse=True, col_stats=True)
    grads = make_grads(R, C, ALL_G)
    with LargestAllocation() as rec:
        run_kernels(*inputs, flags, grads)
    assert rec.largest[0] < R * C, rec.largest


def test_no_quadratic_allocation_self_similarity():
    """Nor in the self-similarity backward (k=None)."""
    R, D = 70, 3
    q, _k, scale, bias, _t, rl, _cl = make_inputs(R, R, D, torch.float32, "labels")
    grads = make_grads(R, R, ("lse", "pos"))
    with LargestAllocation() as rec:
        lse, pos, npos, *_ = tk.contrastive_fwd(q, q, scale, bias, None, rl, rl, True, False,
                                                True, False)
        tk.contrastive_bwd(*grads, q, None, scale, bias, None, rl, rl, lse, pos, npos, lse,
                           True, False, True, False)
    assert rec.largest[0] < R * R, rec.largest


@pytest.mark.parametrize("by_slabs", [False, True], ids=("one-launch", "slabs"))
def test_custom_op_backend(by_slabs, request):
    """Through the ``fastcl::contrastive_fwd`` op with autograd, backend ``"triton"`` (the op
    checks, among others, that no output aliases an input or another output)."""
    ops = pytest.importorskip("fastcl.ops.contrastive")
    R, C, D = 21, 18, 10
    if by_slabs:
        request.getfixturevalue("slabs")(C)
    q, k, scale, bias, targets, _, _ = make_inputs(R, C, D, torch.float32, "targets")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, scale, bias)]
    out = ops.contrastive_stats(*leaves, targets, exclude_diag=True, col_stats=True,
                                backend="triton")
    loss = (out[0] - out[1]).mean() + 0.5 * out[4].mean() + 0.1 * out[3].sum()
    loss.backward()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, scale, bias)]
    ref = contrastive_stats_ref(*ref_leaves, targets, exclude_diag=True, col_stats=True)
    ((ref[0] - ref[1]).mean() + 0.5 * ref[4].mean() + 0.1 * ref[3].sum()).backward()
    for name, a, b in zip(GRAD_NAMES, leaves, ref_leaves):
        assert_close(a.grad, b.grad, 1e-4, name)


# --------------------------------------------------------------------------------------------
# the backward by slabs (wide D): G stored per slab of rows, then a GEMM
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("R,C,D,dtype,mode,flags,present", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}-"
                              + "".join(k[0] for k, v in c[5].items() if v) for c in CASES])
@pytest.mark.parametrize("acc", [False, True], ids=("two-sweeps", "accumulated"))
def test_slabs_match_oracle(R, C, D, dtype, mode, flags, present, acc, slabs, monkeypatch):
    """Both orientations by slabs, or (``SLAB_ACCUMULATE``) ``dk`` from the slabs of rows."""
    monkeypatch.setenv("FASTCL_TRITON_SLAB_ACCUMULATE", str(int(acc)))
    slabs(max(R, C))
    check_against_oracle(*make_inputs(R, C, D, dtype, mode), flags, make_grads(R, C, present))
    assert slabs.calls == ([R] if acc else [R, C])


@pytest.mark.parametrize("mode,exclude_diag,decoupled,pos_lse,col_stats", FLAG_COMBOS)
def test_slabs_flag_combinations(mode, exclude_diag, decoupled, pos_lse, col_stats, slabs):
    R, C, D = 19, 23, 8
    slabs(C)
    inputs = make_inputs(R, C, D, torch.float32, mode, scale=5.0, n_labels=3)
    check_against_oracle(*inputs, flags_of(exclude_diag, decoupled, pos_lse, col_stats),
                         make_grads(R, C, ALL_G))


@pytest.mark.parametrize("mode,exclude_diag,decoupled,pos_lse", SELF_COMBOS)
def test_slabs_self_similarity(mode, exclude_diag, decoupled, pos_lse, slabs):
    """``G + G.T`` stored per slab: one orientation, one GEMM per slab."""
    slabs(23)
    check_self(23, 8, torch.float32, mode, flags_of(exclude_diag, decoupled, pos_lse),
               ("lse", "pos", "mean"), scale=5.0, n_labels=3)
    assert slabs.calls == [23]


def self_budget(monkeypatch, N, blocks, mode, pos_lse, lse2=False):
    """A byte budget of ``blocks`` row blocks of the self-similarity forward's partials."""
    fields = tk._state_fields(mode != "none", pos_lse and mode != "none", mode == "labels",
                              lse2)
    monkeypatch.setenv("FASTCL_TRITON_SLAB_BYTES", str(blocks * 4 * fields * N))


def recording_fwd(monkeypatch):
    """The forward launches, as ``(o0, o_end, SELF)``."""
    launches = []
    real = tk._launch_fwd

    def recording(*args, **kw):
        bound = inspect.signature(real).bind(*args, **kw)
        bound.apply_defaults()
        launches.append((bound.arguments["o0"], bound.arguments["o_end"],
                         bound.arguments["state"] is not None))
        return real(*args, **kw)

    monkeypatch.setattr(tk, "_launch_fwd", recording)
    return launches


@pytest.mark.parametrize("mode,exclude_diag,decoupled,pos_lse", SELF_COMBOS)
@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_self_forward_half_square(mode, exclude_diag, decoupled, pos_lse, blocks, slabs,
                                  monkeypatch):
    """k=None by slabs: each slab's tiles on and below the diagonal give the rows' states and,
    transposed, the partial states of the columns above; merged, they give the statistics of
    the full square. 53 rows: four row blocks of the interpreter (the last one partial) in
    slabs of ``blocks`` of them."""
    N = 53
    self_budget(monkeypatch, N, blocks, mode, pos_lse)
    launches = recording_fwd(monkeypatch)
    check_self(N, 8, torch.float32, mode, flags_of(exclude_diag, decoupled, pos_lse),
               ("lse", "pos", "mean"), scale=5.0, n_labels=3)
    rows = blocks * tk._INTERP_BLOCK
    assert launches == [(o0, min(N, o0 + rows), True) for o0 in range(0, N, rows)]


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 20), (torch.float16, 40),
                                     (torch.float32, 100)])
def test_self_forward_half_square_dtypes(dtype, D, slabs, monkeypatch):
    self_budget(monkeypatch, 45, 1, "labels", True)
    launches = recording_fwd(monkeypatch)
    check_self(45, D, dtype, "labels", flags_of(exclude_diag=True, pos_lse=True),
               ("lse", "pos"))
    assert len(launches) == 3 and all(s for *_, s in launches)


def test_self_forward_falls_back_to_the_square(slabs, monkeypatch):
    """Slabs of too few row blocks (or ``FASTCL_TRITON_SELF_FWD=0``): one launch over the full
    square, the same statistics."""
    N = 53
    self_budget(monkeypatch, N, 1, "targets", False)
    inputs = make_inputs(N, N, 8, torch.float32, "targets")
    q, targets = inputs[0], inputs[4]
    args = (inputs[2], inputs[3], targets, None, None, True, False, False, False)
    launches = recording_fwd(monkeypatch)
    half = tk.contrastive_fwd(q, None, *args)
    assert len(launches) == 4 and all(s for *_, s in launches)
    launches.clear()
    monkeypatch.setenv("FASTCL_TRITON_SELF_FWD", "0")
    switched_off = tk.contrastive_fwd(q, None, *args)
    monkeypatch.delenv("FASTCL_TRITON_SELF_FWD")
    monkeypatch.setattr(tk, "_MIN_COL_PROGRAMS", 2)
    square = tk.contrastive_fwd(q, None, *args)
    assert launches == [(0, None, False)] * 2
    for name, a, b, c in zip(STAT_NAMES[:4], half, square, switched_off):
        assert_close(a, b, 1e-6, name)
        assert torch.equal(b, c), name


def test_half_square_pays(monkeypatch):
    """The half square where the full one takes more than one wave of programs (more row
    blocks than multiprocessors), or always with ``FASTCL_TRITON_SELF_FWD=2``; always under the
    interpreter."""
    monkeypatch.delenv("FASTCL_TRITON_SELF_FWD", raising=False)
    assert not tk._half_square_pays(128, 132) and not tk._half_square_pays(132, 132)
    assert tk._half_square_pays(133, 132) and tk._half_square_pays(512, 132)
    assert tk._half_square_pays(1, None)
    monkeypatch.setenv("FASTCL_TRITON_SELF_FWD", "2")
    assert tk._half_square_pays(1, 132)


def test_self_forward_allocation_is_bounded(slabs, monkeypatch):
    """The partials of one slab and the states of the rows: nothing of N x N."""
    N, D = 70, 3
    self_budget(monkeypatch, N, 1, "labels", True)
    q, _k, scale, bias, _t, rl, _cl = make_inputs(N, N, D, torch.float32, "labels")
    with LargestAllocation() as rec:
        tk.contrastive_fwd(q, None, scale, bias, None, rl, rl, True, False, True, False)
    assert rec.largest[0] < N * N, rec.largest
    assert rec.largest_bytes[0] <= 4 * tk._state_fields(True, True, True, False) * N, \
        rec.largest_bytes


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 20), (torch.float16, 40)])
def test_slabs_self_similarity_low_precision(dtype, D, slabs):
    slabs(37)
    check_self(37, D, dtype, "labels", flags_of(exclude_diag=True, pos_lse=True),
               ("lse", "pos", "mean"))


def test_slabs_equal_one_launch(slabs):
    """Same G, same rounding to the input dtype: the two backward schedules agree to the
    order of the fp32 accumulations."""
    R, C, D = 45, 38, 24
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(R, C, D, dtype, "labels", n_labels=5)
        flags = flags_of(exclude_diag=True, col_stats=True)
        grads = make_grads(R, C, ALL_G)
        slabs(C)
        _, by_slabs = run_kernels(*inputs, flags, grads)
        os.environ["FASTCL_TRITON_SLAB_MIN_D"] = str(D + 1)
        _, one_launch = run_kernels(*inputs, flags, grads)
        os.environ["FASTCL_TRITON_SLAB_MIN_D"] = "1"
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for name, a, b in zip(GRAD_NAMES, by_slabs, one_launch):
            assert_close(a, b, tol, name)
    assert len(slabs.calls) == 4


@pytest.mark.parametrize("mode,exclude_diag,decoupled,pos_lse,col_stats", FLAG_COMBOS)
def test_accumulated_slabs_flag_combinations(mode, exclude_diag, decoupled, pos_lse, col_stats,
                                             accumulated):
    R, C, D = 19, 23, 8
    accumulated(C)
    inputs = make_inputs(R, C, D, torch.float32, mode, scale=5.0, n_labels=3)
    check_against_oracle(*inputs, flags_of(exclude_diag, decoupled, pos_lse, col_stats),
                         make_grads(R, C, ALL_G))


def test_accumulated_slabs_equal_two_sweeps(accumulated, monkeypatch):
    """The same G, the products of its slabs summed in fp32 instead of recomputed per column
    slab: the two schedules agree to the order of the fp32 accumulations (the fp16 slabs with
    their power-of-two rescaling); the self-similarity backward is one sweep either way."""
    R, C, D = 45, 38, 24
    accumulated(C)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        inputs = make_inputs(R, C, D, dtype, "targets")
        flags = flags_of(exclude_diag=True, col_stats=True)
        grads = make_grads(R, C, ALL_G)
        _, one_sweep = run_kernels(*inputs, flags, grads)
        monkeypatch.setenv("FASTCL_TRITON_SLAB_ACCUMULATE", "0")
        _, two_sweeps = run_kernels(*inputs, flags, grads)
        monkeypatch.setenv("FASTCL_TRITON_SLAB_ACCUMULATE", "1")
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for name, a, b in zip(GRAD_NAMES, one_sweep, two_sweeps):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_close(a, b, tol, name)
    assert accumulated.calls == [R, R, C] * 3
    accumulated.calls.clear()
    check_self(23, 8, torch.bfloat16, "labels", flags_of(exclude_diag=True),
               ("lse", "pos", "mean"), n_labels=3)
    assert accumulated.calls == [23]


@pytest.mark.parametrize("R,C", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulated_slabs_empty_sides(R, C, dtype, accumulated):
    """No rows or no columns: zero gradients, the accumulator included."""
    accumulated(max(C, 1))
    q, k, scale, bias, _, _, _ = make_inputs(max(R, 1), max(C, 1), 6, dtype, "none")
    q, k = q[:R], k[:C]
    _, g = run_kernels(q, k, scale, bias, None, None, None, flags_of(col_stats=True),
                       make_grads(R, C, ("lse", "col_lse", "col_mean")))
    assert g[0].shape == q.shape and g[1].shape == k.shape and g[1].dtype == dtype
    assert all(torch.count_nonzero(x) == 0 for x in g)


def test_accumulated_slabs_allocation_is_bounded(accumulated):
    """One slab of G and the fp32 accumulator of the columns' gradient (C x D): nothing of
    R x C. (Off CUDA the 16-bit slab is multiplied through an fp32 copy: twice its bytes.)"""
    R, C, D = 70, 60, 3
    accumulated(C)
    budget = int(os.environ["FASTCL_TRITON_SLAB_BYTES"])
    inputs = make_inputs(R, C, D, torch.bfloat16, "labels")
    with LargestAllocation() as rec:
        run_kernels(*inputs, flags_of(exclude_diag=True, col_stats=True),
                    make_grads(R, C, ALL_G))
    assert rec.largest_bytes[0] <= max(2 * budget, R * D * 4, C * D * 4), rec.largest_bytes
    assert rec.largest[0] < R * C, rec.largest
    assert accumulated.calls == [R]


@pytest.mark.parametrize("R,C,mode,exclude_diag", [(37, 29, "targets", False),
                                                    (45, 45, "labels", True),
                                                    (40, 70, "none", True)])
def test_slabs_forward_column_partials(R, C, mode, exclude_diag, slabs, monkeypatch):
    """The column statistics from per-slab partials (one pass over the logits) equal those of
    the second launch over the columns, which the forward falls back to when a slab would have
    too few row blocks; the row statistics are the same launch's."""
    slabs(C)
    inputs = make_inputs(R, C, 20, torch.float32, mode, n_labels=3)
    flags = flags_of(exclude_diag=exclude_diag, col_stats=True)
    launches = []
    real = tk._launch_fwd

    def recording(*args, **kw):
        launches.append(args[-1] is not None if len(args) > 12 else kw.get("parts"))
        return real(*args, **kw)

    monkeypatch.setattr(tk, "_launch_fwd", recording)
    one_pass, _, ref, _ = check_against_oracle(*inputs, flags, None)
    budget = int(os.environ["FASTCL_TRITON_SLAB_BYTES"])
    rows = budget // (12 * C) * tk._INTERP_BLOCK
    assert len(launches) == -(-R // rows) > 1 and all(launches), launches
    launches.clear()
    monkeypatch.setattr(tk, "_MIN_COL_PROGRAMS", 10 ** 6)
    two_launches, _ = run_kernels(*inputs, flags)
    assert len(launches) == 2 and not any(launches), launches
    for name, a, b in zip(STAT_NAMES, one_pass, two_launches):
        assert_close(a, b, 1e-6, name)


def test_forward_column_partials_fit_the_problem(monkeypatch):
    """With the default budget, the partials of a small problem are sized by its row blocks,
    not by the budget (which would hold hundreds of thousands of them)."""
    monkeypatch.setenv("FASTCL_TRITON_SLAB_MIN_D", "1")
    monkeypatch.delenv("FASTCL_TRITON_SLAB_BYTES", raising=False)
    R = C = 40
    inputs = make_inputs(R, C, 8, torch.float32, "targets")
    with LargestAllocation() as rec:
        run_kernels(*inputs, flags_of(col_stats=True))
    assert rec.largest_bytes[0] < R * C * 4, rec.largest_bytes
    check_against_oracle(*inputs, flags_of(col_stats=True), None)


@pytest.mark.parametrize("R,C", [(0, 5), (5, 0), (0, 0)])
def test_slabs_empty_sides(R, C, slabs):
    """No rows or no columns: the statistics of the empty sets, zero gradients."""
    slabs(max(C, 1))
    q, k, scale, bias, _, _, _ = make_inputs(max(R, 1), max(C, 1), 6, torch.float32, "none")
    q, k = q[:R], k[:C]
    stats, g = run_kernels(q, k, scale, bias, None, None, None, flags_of(col_stats=True),
                           make_grads(R, C, ("lse", "col_lse", "col_mean")))
    assert torch.isinf(stats[4]).all() and (stats[5] == 0).all()
    assert g[0].shape == q.shape and g[1].shape == k.shape
    assert all(torch.count_nonzero(x) == 0 for x in g)


def test_slabs_fp16_small_upstream_gradients(slabs):
    """The rescaling of fp16 G (``_g_multiplier``) holds for the stored slabs too."""
    R, C, D = 37, 45, 20
    slabs(C)
    inputs = make_inputs(R, C, D, torch.float16, "targets")
    grads = [g * 1e-5 if g is not None else None for g in make_grads(R, C, ALL_G)]
    check_against_oracle(*inputs, flags_of(col_stats=True), grads, floor=0.0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_slabs_extreme_scale(slabs):
    R, C, D = 40, 40, 32
    slabs(C)
    inputs = make_inputs(R, C, D, torch.bfloat16, "targets", scale=100.0, bias=-10.0)
    _, g, _, _ = check_against_oracle(*inputs, flags_of(col_stats=True, pos_lse=True),
                                      make_grads(R, C, ALL_G))
    assert all(torch.isfinite(t).all() for t in g)


def test_slabs_noncontiguous_inputs(slabs):
    R, C, D = 33, 26, 20
    slabs(R)
    q, k, scale, bias, targets, _, _ = make_inputs(R, C, D, torch.float32, "targets")
    k_big = torch.zeros(2 * C, D + 7, device=DEVICE)
    k_big[::2, 3:3 + D] = k
    check_against_oracle(q.T.contiguous().T, k_big[::2, 3:3 + D], scale, bias, targets, None,
                         None, flags_of(exclude_diag=True, col_stats=True),
                         make_grads(R, C, ALL_G))


def test_slabs_allocation_is_bounded(slabs):
    """The largest tensor of the backward is one slab of G, within the byte budget, however
    many rows there are."""
    R, C, D = 70, 60, 3
    slabs(C)
    budget = int(os.environ["FASTCL_TRITON_SLAB_BYTES"])
    inputs = make_inputs(R, C, D, torch.float32, "labels")
    flags = flags_of(exclude_diag=True, pos_lse=True, col_stats=True)
    with LargestAllocation() as rec:
        run_kernels(*inputs, flags, make_grads(R, C, ALL_G))
    assert rec.largest_bytes[0] <= max(budget, R * D * 4), rec.largest_bytes
    assert rec.largest[0] < R * C, rec.largest
    assert slabs.calls == [R, C]


def test_slab_threshold(monkeypatch):
    """Wide features go by slabs (``SLAB_MIN_D`` per tiling family, or the environment)."""
    monkeypatch.delenv("FASTCL_TRITON_SLAB_MIN_D", raising=False)
    monkeypatch.setattr(tk, "SLAB_MIN_D", {"mma": 512, "fma": 128})
    if tk._INTERPRET:  # the interpreter's tiling counts as the tensor-core family
        assert tk._use_slabs(512, torch.float32) and not tk._use_slabs(511, torch.float32)
    assert tk._use_slabs(1024, torch.bfloat16) and not tk._use_slabs(256, torch.bfloat16)
    monkeypatch.setenv("FASTCL_TRITON_SLAB_MIN_D", "64")
    assert tk._use_slabs(64, torch.bfloat16) and not tk._use_slabs(63, torch.float16)


def test_g_multiplier():
    """A power of two mapping the bound into [2**13, 2**14], clamped for extreme bounds."""
    for bound in (1e-12, 3e-5, 0.5, 1.0, 7.0, 3e4):
        m = tk._g_multiplier(torch.tensor(bound)).item()
        assert m == 2.0 ** round(torch.log2(torch.tensor(m)).item())
        assert 2.0 ** 13 <= bound * m <= 2.0 ** 14
    assert tk._g_multiplier(torch.tensor(0.0)).item() == 2.0 ** 100


# --------------------------------------------------------------------------------------------
# real sizes on a GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestGPU:
    @pytest.fixture(autouse=True)
    def _autotune(self, monkeypatch):
        monkeypatch.setattr(tk, "AUTOTUNE", True)

    @pytest.mark.parametrize("R,C,D,dtype,mode,flags", [
        (16384, 16384, 1024, torch.bfloat16, "targets", flags_of(col_stats=True)),
        (16384, 16384, 512, torch.float16, "targets", flags_of(col_stats=True)),
        (8192, 4096, 768, torch.bfloat16, "labels",
         flags_of(exclude_diag=True, decoupled=True, pos_lse=True)),
        (4096, 4096, 256, torch.float32, "labels", flags_of(exclude_diag=True, col_stats=True)),
        (2048, 3000, 4096, torch.bfloat16, "targets", flags_of(col_stats=True)),
        (12345, 6789, 100, torch.bfloat16, "targets", flags_of(exclude_diag=True)),
    ])
    def test_real_sizes(self, R, C, D, dtype, mode, flags):
        inputs = make_inputs(R, C, D, dtype, mode, n_labels=100)
        grads = [g / R if g is not None else None for g in make_grads(R, C, ALL_G)]
        if not flags["col_stats"]:
            grads[3] = grads[4] = None
        stats, g = run_kernels(*inputs, flags, grads)
        torch.cuda.synchronize()
        ref_stats, ref_g = oracle(*inputs, flags, grads)
        low_stats, low_g = lowp_torch(*inputs, flags, grads) if dtype != torch.float32 \
            else (ref_stats, ref_g)
        for name, a, lo, e in zip(STAT_NAMES + GRAD_NAMES, stats + tuple(g),
                                  low_stats + tuple(low_g), ref_stats + tuple(ref_g)):
            assert not torch.isnan(a).any(), name
            mag = e.detach().abs().max().item() if e.numel() else 0.0
            tol = (FWD_TOL if name in STAT_NAMES else BWD_TOL)[dtype]
            err = max_err(a, e)
            if dtype == torch.float32:
                assert err <= tol * mag + 1e-6, (name, err, mag)
            else:
                assert err <= max(2 * max_err(lo, e), tol * mag) + 1e-6, (name, err, mag)

    @pytest.mark.parametrize("D,acc", [(256, False), (1024, False), (1024, True)],
                             ids=("one-launch", "slabs", "slabs-accumulated"))
    def test_memory_is_linear(self, D, acc, monkeypatch):
        """Beyond the gradients: O(R + C) for the one-launch backward; one slab of G (its
        budget) and one slab of fp32 products for the backward by slabs (and the fp32 C x D
        accumulator with SLAB_ACCUMULATE)."""
        R = C = 32768
        budget = 64 << 20
        monkeypatch.setenv("FASTCL_TRITON_SLAB_BYTES", str(budget))
        monkeypatch.setenv("FASTCL_TRITON_SLAB_ACCUMULATE", str(int(acc)))
        slabbed = tk._use_slabs(D, torch.bfloat16)
        assert slabbed == (D == 1024)
        q, k, scale, bias, targets, _, _ = make_inputs(R, C, D, torch.bfloat16, "targets")
        flags = flags_of(col_stats=True)
        grads = make_grads(R, C, ("lse", "pos", "col_lse"))
        run_kernels(q, k, scale, bias, targets, None, None, flags, grads)  # autotune
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run_kernels(q, k, scale, bias, targets, None, None, flags, grads)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        grads_bytes = (R + C) * D * 2
        allowed = grads_bytes + 64 * (R + C) + (1 << 20)
        if slabbed:
            rows = budget // (C * 2)
            allowed += budget + rows * D * 4 + 2 * rows * (C // 64 + 1) * 4
        if acc:
            allowed += C * D * 4
        assert extra <= allowed, (extra, allowed)
        del out

    def test_slabs_equal_one_launch(self, monkeypatch):
        """The three backward schedules at a real size (cuBLAS products, accumulated or not,
        against tl.dot)."""
        R, C, D = 8192, 6000, 1024
        inputs = make_inputs(R, C, D, torch.bfloat16, "labels", n_labels=100)
        flags = flags_of(exclude_diag=True, col_stats=True)
        grads = [g / R for g in make_grads(R, C, ALL_G)]
        monkeypatch.setenv("FASTCL_TRITON_SLAB_BYTES", str(32 << 20))  # several slabs
        assert tk._use_slabs(D, torch.bfloat16)
        _, by_slabs = run_kernels(*inputs, flags, grads)
        monkeypatch.setenv("FASTCL_TRITON_SLAB_ACCUMULATE", "1")
        _, accumulated = run_kernels(*inputs, flags, grads)
        monkeypatch.setenv("FASTCL_TRITON_SLAB_MIN_D", str(D + 1))
        _, one_launch = run_kernels(*inputs, flags, grads)
        torch.cuda.synchronize()
        for name, a, b, c in zip(GRAD_NAMES, by_slabs, one_launch, accumulated):
            assert_close(a, b, 1e-2, name)
            assert_close(c, b, 1e-2, name)

    @pytest.mark.parametrize("R,D,dtype,mode,flags", [
        (16384, 1024, torch.bfloat16, "targets", flags_of(exclude_diag=True)),
        (8192, 768, torch.float16, "labels", flags_of(exclude_diag=True, pos_lse=True)),
        (4096, 256, torch.float32, "targets", flags_of(exclude_diag=True, decoupled=True)),
    ])
    def test_self_similarity_real_sizes(self, R, D, dtype, mode, flags, monkeypatch):
        """k=None at real sizes: the statistics of the half-square forward equal those of the
        full square, the gradient of q the sum of the two launches'."""
        q, _k, scale, bias, targets, rl, _cl = make_inputs(R, R, D, dtype, mode, n_labels=100)
        if mode == "targets":
            targets = torch.arange(R, device=DEVICE).roll(R // 2)  # NT-Xent's pairs
        grads = [g / R for g in make_grads(R, R, ("lse", "pos"))[:2]] + [None] * 3
        fwd_args = (scale, bias, targets, rl, rl, flags["exclude_diag"], flags["decoupled"],
                    flags["pos_lse"], False)
        lse, pos, npos, mean, *_ = tk.contrastive_fwd(q, q, *fwd_args)
        monkeypatch.setenv("FASTCL_TRITON_SELF_FWD", "2")  # the half square at every size
        half = tk.contrastive_fwd(q, None, *fwd_args)
        monkeypatch.delenv("FASTCL_TRITON_SELF_FWD")
        for name, a, b in zip(STAT_NAMES[:4], half, (lse, pos, npos, mean)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        args = (scale, bias, targets, rl, rl, lse, pos, npos, lse, flags["exclude_diag"],
                flags["decoupled"], flags["pos_lse"], False)
        dz, dk, ds, db = tk.contrastive_bwd(*grads, q, None, *args)
        dq2, dk2, ds2, db2 = tk.contrastive_bwd(*grads, q, q, *args)
        torch.cuda.synchronize()
        want = dq2.float() + dk2.float()
        assert dk.numel() == 0 and not torch.isnan(dz).any()
        tol = BWD_TOL[dtype] * want.abs().max().item() + 1e-6
        assert (dz.float() - want).abs().max().item() <= tol
        torch.testing.assert_close(ds, ds2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(db, db2, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the second log-sum-exp (lse2_mult > 0): the hard-negative loss's LSE at another multiplier
# --------------------------------------------------------------------------------------------

def check_lse2(R, C, D, dtype, mode, flags, self_sim, mu=0.6, with_lse=True, **kw):
    """``lse2`` and the gradients of ``g_lse2 . lse2`` (plus ``g_lse . lse``) against the fp64
    oracle, from the same launches as the other statistics."""
    q, k, scale, bias, targets, rl, cl = make_inputs(R, C, D, dtype, mode, **kw)
    if self_sim:
        k, cl = q, rl
    keys = None if self_sim else k
    stats = tk.contrastive_fwd(q, keys, scale, bias, targets, rl, cl, flags["exclude_diag"],
                               flags["decoupled"], flags["pos_lse"], False, mu)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, scale, bias)]
    kd = leaves[0] if self_sim else k.detach().double().requires_grad_(True)
    ref = contrastive_stats_ref(leaves[0], kd, leaves[1], leaves[2], targets, rl, cl,
                                lse2_mult=mu, **flags)
    assert stats[6].shape == (R,) and stats[6].dtype == torch.float32
    assert_close(stats[6], ref[6], FWD_TOL[dtype], "lse2")
    gen = torch.Generator().manual_seed(5)
    g_lse2 = torch.randn(R, generator=gen).to(DEVICE)
    g_lse = torch.randn(R, generator=gen).to(DEVICE) if with_lse else None
    got = tk.contrastive_bwd(g_lse, None, None, None, None, q, keys, scale, bias, targets, rl,
                             cl, stats[0], stats[1], stats[2], stats[4], flags["exclude_diag"],
                             flags["decoupled"], flags["pos_lse"], False, g_lse2, stats[6], mu)
    total = [(ref[6], g_lse2)] + ([(ref[0], g_lse)] if with_lse else [])
    fin = [(o, gr.double().masked_fill(torch.isinf(o.detach()), 0)) for o, gr in total]
    wrt = leaves if self_sim else [leaves[0], kd, leaves[1], leaves[2]]
    want = torch.autograd.grad([o.masked_fill(torch.isinf(o.detach()), 0) for o, _ in fin],
                               wrt, [gr for _, gr in fin], allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for w, t in zip(want, wrt)]
    names = ("dz", "dscale", "dbias") if self_sim else GRAD_NAMES
    outs = (got[0], got[2], got[3]) if self_sim else got
    for name, a, e in zip(names, outs, want):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, BWD_TOL[dtype], name)


LSE2_CASES = [
    # (R, C, D, dtype, mode, flags, self_sim)
    (37, 29, 8, torch.float32, "targets", flags_of(decoupled=True), False),
    (29, 37, 100, torch.float32, "labels", flags_of(exclude_diag=True), False),
    (33, 33, 20, torch.float32, "targets", flags_of(exclude_diag=True, decoupled=True), True),
    (35, 35, 8, torch.float32, "labels", flags_of(exclude_diag=True, pos_lse=True), True),
    (20, 31, 8, torch.float32, "none", flags_of(), False),
    (37, 29, 20, torch.bfloat16, "targets", flags_of(exclude_diag=True, decoupled=True), False),
    (29, 29, 40, torch.float16, "labels", flags_of(exclude_diag=True, decoupled=True), True),
]
LSE2_IDS = [f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}-{'self' if c[6] else 'kq'}"
            for c in LSE2_CASES]


@pytest.mark.parametrize("R,C,D,dtype,mode,flags,self_sim", LSE2_CASES, ids=LSE2_IDS)
@pytest.mark.parametrize("with_lse", [True, False], ids=("with-lse", "alone"))
def test_lse2_matches_oracle(R, C, D, dtype, mode, flags, self_sim, with_lse):
    check_lse2(R, C, D, dtype, mode, flags, self_sim, with_lse=with_lse, scale=5.0,
               n_labels=3)


@pytest.mark.parametrize("R,C,D,dtype,mode,flags,self_sim", LSE2_CASES, ids=LSE2_IDS)
def test_lse2_slabs_match_oracle(R, C, D, dtype, mode, flags, self_sim, slabs):
    slabs(C)
    check_lse2(R, C, D, dtype, mode, flags, self_sim, mu=1.7, scale=5.0, n_labels=3)
    assert slabs.calls  # by slabs of G


@pytest.mark.parametrize("mode,pos_lse", [("targets", False), ("labels", True), ("none", False)])
@pytest.mark.parametrize("blocks", [1, 2])
def test_lse2_self_forward_half_square(mode, pos_lse, blocks, slabs, monkeypatch):
    """k=None by slabs of row blocks: the transposed partials and their merge carry the
    running sum of lse2 (one more field)."""
    N = 53
    self_budget(monkeypatch, N, blocks, mode, pos_lse, lse2=True)
    launches = recording_fwd(monkeypatch)
    check_lse2(N, N, 8, torch.float32, mode,
               flags_of(exclude_diag=True, decoupled=mode != "none", pos_lse=pos_lse), True,
               scale=5.0, n_labels=3)
    assert launches and all(s for *_, s in launches)
    assert len(launches) == -(-N // (blocks * tk._INTERP_BLOCK))


def test_lse2_accumulated_slabs(accumulated):
    accumulated(29)
    check_lse2(37, 29, 20, torch.float32, "targets", flags_of(exclude_diag=True), False,
               scale=5.0)
    assert accumulated.calls == [37]  # one sweep


def test_lse2_empty_denominator_is_not_nan():
    """Rows whose denominator set is empty (every other sample a positive, decoupled): lse2 is
    -inf like lse, and the gradients stay finite."""
    N = 6
    q = torch.randn(N, 4).to(DEVICE)
    labels = torch.zeros(N, dtype=torch.long, device=DEVICE)
    scale, bias = torch.tensor(3.0, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    stats = tk.contrastive_fwd(q, None, scale, bias, None, labels, labels, True, True, False,
                               False, 0.5)
    assert torch.isinf(stats[6]).all() and (stats[6] < 0).all()
    dz, _dk, ds, db = tk.contrastive_bwd(None, None, None, None, None, q, None, scale, bias,
                                         None, labels, labels, stats[0], stats[1], stats[2],
                                         stats[4], True, True, False, False,
                                         torch.ones(N, device=DEVICE), stats[6], 0.5)
    assert torch.isfinite(dz).all() and (dz == 0).all() and ds == 0 and db == 0
