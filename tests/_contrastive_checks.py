"""What the tests of the compiled contrastive kernels share (``test_cpu_contrastive.py``,
``test_cuda_contrastive.py``): the cases, the calls of a backend's forward and backward
functions (``fastcl._C.contrastive_{fwd,bwd}_<backend>``, one signature for both), and their
comparison with :func:`fastcl.reference.contrastive.contrastive_stats_ref`.

Statistics are compared with the oracle run at the same dtype (the oracle upcasts bf16 / fp16 to
fp32, and so do the kernels). Gradients are compared with the oracle's autograd in fp64: tight in
fp64; in fp32, bf16 and fp16 a gradient's error against fp64 may be at most about twice the error
of the plain-PyTorch oracle run at that dtype, plus a small slack relative to the gradient's
magnitude.
"""

from __future__ import annotations

import itertools

import torch

from fastcl.reference.contrastive import contrastive_stats_ref

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# Forward statistics vs the oracle at the same dtype. Logits here are O(10).
FWD_TOL = {
    F64: dict(rtol=1e-10, atol=1e-10),
    F32: dict(rtol=2e-5, atol=5e-5),
    BF16: dict(rtol=2e-5, atol=5e-5),
    F16: dict(rtol=2e-5, atol=5e-5),
}
# Gradients: err(kernel) <= 2 * err(oracle at dtype) + ATOL * max|grad|, errors against fp64.
GRAD_ATOL = {F64: 1e-10, F32: 2e-5, BF16: 1e-2, F16: 2e-3}

MODES = ("none", "targets", "labels")
STAT_NAMES = ("lse", "pos", "npos", "mean", "col_lse", "col_mean")
GRAD_NAMES = ("dq", "dk", "dscale", "dbias")

FLAG_COMBOS = [
    dict(exclude_diag=e, decoupled=d, pos_lse=p, col_stats=c)
    for e, d, p, c in itertools.product((False, True), repeat=4)
]


def flag_id(flags):
    return "-".join(k for k, v in flags.items() if v) or "plain"


def stat_dtype(dtype):
    return F64 if dtype == F64 else F32


def flags_of(flags):
    """The four flags of the primitive, False where ``flags`` leaves one out."""
    return {name: flags.get(name, False)
            for name in ("exclude_diag", "decoupled", "pos_lse", "col_stats")}


def make_case(R, C, D, dtype=F64, mode="targets", *, device="cpu", scale=3.0, bias=0.25,
              seed=0, normalize=True, n_classes=4):
    """Features, scale, bias and masks of one problem (``mode``: no positives, targets with
    some rows targeting their own column and one row without a target, or labels with one row
    whose label no column has)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, D, generator=g, dtype=F64)
    k = torch.randn(C, D, generator=g, dtype=F64)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        k = torch.nn.functional.normalize(k, dim=1)
    sdt = stat_dtype(dtype)
    targets = row_labels = col_labels = None
    if mode == "targets":
        targets = torch.randint(-1, C, (R,), generator=g)
        diag = torch.arange(0, min(R, C), 3)
        targets[diag] = diag  # some rows target their own column (excluded by exclude_diag)
        targets[R // 2] = -1
    elif mode == "labels":
        row_labels = torch.randint(0, n_classes, (R,), generator=g)
        col_labels = torch.randint(0, n_classes, (C,), generator=g)
        row_labels[-1] = n_classes + 7  # a row whose label no column has
    dev = torch.device(device)
    opt = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return dict(q=q.to(dtype).to(dev), k=k.to(dtype).to(dev),
                scale=torch.tensor(scale, dtype=sdt, device=dev),
                bias=torch.tensor(bias, dtype=sdt, device=dev), targets=opt(targets),
                row_labels=opt(row_labels), col_labels=opt(col_labels))


def call_fwd(fn, case, **flags):
    """``fn`` (a backend's ``contrastive_fwd_*``) on ``case``."""
    f = flags_of(flags)
    return fn(case["q"], case["k"], case["scale"], case["bias"], case["targets"],
              case["row_labels"], case["col_labels"], f["exclude_diag"], f["decoupled"],
              f["pos_lse"], f["col_stats"])


def call_bwd(fn, case, grads, stats, **flags):
    """``fn`` (a backend's ``contrastive_bwd_*``) on ``case`` with the statistics' gradients
    ``grads`` and the forward's ``stats``."""
    f = flags_of(flags)
    lse, pos, npos, _mean, col_lse = stats[:5]
    return fn(*grads, case["q"], case["k"], case["scale"], case["bias"], case["targets"],
              case["row_labels"], case["col_labels"], lse, pos, npos, col_lse,
              f["exclude_diag"], f["decoupled"], f["pos_lse"], f["col_stats"])


def call_fused(fn, case, grads, mean, keys="k", **flags):
    """``fn`` (a backend's ``contrastive_fused_*``) on ``case`` with the coefficients ``grads``
    (g_lse, g_pos, g_mean); ``keys=None``: without k (self-similarity, the keys are q)."""
    f = flags_of(flags)
    return fn(*grads, case["q"], case[keys] if keys else None, case["scale"], case["bias"],
              case["targets"], case["row_labels"], case["col_labels"], f["exclude_diag"],
              f["decoupled"], f["pos_lse"], mean)


def call_bwd_self(fn, case, grads, stats, **flags):
    """``fn`` (a backend's ``contrastive_bwd_*``) without k (self-similarity) on ``case``, with
    the gradients of the row statistics ``grads[:3]`` and the forward's ``stats``."""
    f = flags_of(flags)
    lse, pos, npos = stats[:3]
    return fn(*grads[:3], None, None, case["q"], None, case["scale"], case["bias"],
              case["targets"], case["row_labels"], case["col_labels"], lse, pos, npos,
              lse.new_empty(0), f["exclude_diag"], f["decoupled"], f["pos_lse"], False)


def self_case(R, D, dtype, mode, **kw):
    """A case of self-similarity: ``k`` is ``q`` (the oracle runs it as a second leaf)."""
    case = make_case(R, R, D, dtype, mode, **kw)
    case["k"] = case["q"]
    return case


def _cast(case, dtype):
    sdt = stat_dtype(dtype)
    out = dict(case)
    out["q"], out["k"] = case["q"].to(dtype), case["k"].to(dtype)
    out["scale"], out["bias"] = case["scale"].to(sdt), case["bias"].to(sdt)
    return out


def ref_stats(case, dtype=None, lse2_mult=0.0, **flags):
    """The oracle's seven statistics of ``case`` (at ``dtype`` when given; ``lse2`` at
    ``lse2_mult``, empty when 0)."""
    c = _cast(case, dtype) if dtype is not None else case
    with torch.no_grad():
        return contrastive_stats_ref(c["q"], c["k"], c["scale"], c["bias"], c["targets"],
                                     c["row_labels"], c["col_labels"], lse2_mult=lse2_mult,
                                     **flags_of(flags))


def ref_grads(case, grads, dtype, g_lse2=None, lse2_mult=0.0, **flags):
    """Gradients (dq, dk, dscale, dbias) of sum(g * stat) (``grads``: of lse, pos, mean,
    col_lse, col_mean; ``g_lse2``: of lse2 at ``lse2_mult``) by the oracle's autograd at
    ``dtype``; infinite statistics count for nothing."""
    c = _cast(case, dtype)
    leaves = [c[n].detach().clone().requires_grad_(True) for n in ("q", "k", "scale", "bias")]
    out = contrastive_stats_ref(*leaves, c["targets"], c["row_labels"], c["col_labels"],
                                lse2_mult=lse2_mult, **flags_of(flags))
    pairs = [(o, g) for o, g in zip((out[0], out[1], out[3], out[4], out[5], out[6]),
                                    list(grads) + [g_lse2])
             if g is not None and o.numel() > 0]
    if not pairs:
        return [torch.zeros_like(x) for x in leaves]
    total = sum((o.masked_fill(torch.isinf(o), 0) * g.to(o.dtype)).sum() for o, g in pairs)
    got = torch.autograd.grad(total, leaves, allow_unused=True)
    return [torch.zeros_like(x) if gx is None else gx for gx, x in zip(got, leaves)]


def random_grads(R, C, dtype, col_stats, seed=1, drop=(), magnitude=1.0, device="cpu"):
    """Gradients of (lse, pos, mean, col_lse, col_mean); the column ones only with
    ``col_stats``, those at the positions ``drop`` absent."""
    g = torch.Generator().manual_seed(seed)
    sdt = stat_dtype(dtype)
    out = [torch.randn(R, generator=g, dtype=F64) for _ in range(3)]
    out += [torch.randn(C, generator=g, dtype=F64) if col_stats else None for _ in range(2)]
    return [None if (i in drop or x is None) else (x * magnitude).to(sdt).to(device)
            for i, x in enumerate(out)]


def check_stats(got, want, dtype):
    """The kernel's statistics ``got`` against the oracle's ``want``: dtype, device, shape, the
    same -inf entries, and values within FWD_TOL."""
    want_dt = stat_dtype(dtype)
    for name, a, b in zip(STAT_NAMES, got, want):
        assert a.dtype == want_dt, f"{name}: dtype {a.dtype}, expected {want_dt}"
        assert a.device == b.device, f"{name}: device {a.device}"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{name}: -inf pattern differs"
        assert torch.isfinite(a[~torch.isneginf(a)]).all(), f"{name}: NaN or +inf"
        torch.testing.assert_close(a.masked_fill(torch.isinf(a), 0).to(F64),
                                   b.masked_fill(torch.isinf(b), 0).to(F64),
                                   msg=lambda m, n=name: f"{n}: {m}", **FWD_TOL[dtype])


def check_grads(got, case, grads, dtype, mag_floor=1e-3, **flags):
    """A kernel's gradients ``got`` (dq, dk, dscale, dbias) for the statistics' gradients
    ``grads`` against the oracle's (see the module docstring); returns ``got``."""
    exact = ref_grads(case, [None if g is None else g.to(F64) for g in grads], F64, **flags)
    for name, a, x in zip(GRAD_NAMES, got, (case["q"], case["k"], case["scale"], case["bias"])):
        assert a.dtype == x.dtype and a.shape == x.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert a.device == x.device, f"{name}: device {a.device}"
        assert torch.isfinite(a).all(), f"{name}: NaN or inf"
    if dtype == F64:
        for name, a, b in zip(GRAD_NAMES, got, exact):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name: f"{n}: {m}")
        return got
    plain = ref_grads(case, grads, dtype, **flags)
    for name, a, p, b in zip(GRAD_NAMES, got, plain, exact):
        mag = max(b.abs().max().item(), mag_floor)
        err = (a.to(F64) - b).abs().max().item()
        err_plain = (p.to(F64) - b).abs().max().item()
        bound = 2 * err_plain + GRAD_ATOL[dtype] * mag
        assert err <= bound, (f"{name}: error {err:.3e} vs fp64 oracle exceeds 2 x oracle-at-dtype "
                              f"error {err_plain:.3e} + slack ({bound:.3e})")
    return got


def fused_expected(stats, grads, mean):
    """What the fused sweep (``contrastive_fused``) must return, from the oracle's fp64 row
    statistics ``stats = (lse, pos, npos, mean, ...)`` and the coefficients ``grads = (g_lse,
    g_pos, g_mean)`` (any may be None): ``(loss, npos, scaled)``, where ``scaled`` are the
    gradients of the statistics that give the same feature gradients (the coefficients masked to
    the rows with a positive and multiplied by the mean's ``1 / #rows``), then two ``None`` (no
    column statistics)."""
    lse, pos, npos, avg = stats[:4]
    has = npos > 0
    norm = 1.0 / max(int(has.sum()), 1) if mean else 1.0
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    loss = zero.clone()
    scaled = []
    for g, stat in zip(grads, (lse, pos, avg)):
        if g is None:
            scaled.append(None)
            continue
        g = torch.where(has, g.to(lse.dtype), zero)
        loss = loss + torch.where(has, g * stat, zero).sum() * norm
        scaled.append((g * norm).to(g.dtype))
    return loss, npos, scaled + [None, None]


def check_fused_equals_two_kernels(fused_out, stats, kernel_bwd, case, grads, **flags):
    """A fused sweep's ``(loss, npos, dq, dk, dscale, dbias)`` against the forward's statistics
    ``stats`` and the backward ``kernel_bwd`` given the coefficients ``grads`` masked to the rows
    with a positive and divided by their number (the mean)."""
    _loss, npos, *got = fused_out
    has = stats[2] > 0
    zero = torch.zeros((), dtype=stats[2].dtype, device=stats[2].device)
    masked = [torch.where(has, g, zero) / has.sum() for g in grads]
    want = kernel_bwd(case, masked + [None, None], stats, **flags)
    torch.testing.assert_close(npos, stats[2], rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def check_fwd_lse2(got, case, mu, dtype, **flags):
    """A forward's seven outputs at ``lse2_mult=mu`` against the oracle's at ``dtype`` (lse2:
    its dtype, device, shape, -inf pattern and values, as the other statistics)."""
    assert len(got) == 7
    want = ref_stats(case, dtype, lse2_mult=mu, **flags)
    check_stats(got[:6], want[:6], dtype)
    a, b = got[6], want[6]
    assert a.dtype == stat_dtype(dtype) and a.device == case["q"].device, \
        f"lse2: {a.dtype} {a.device}"
    assert a.shape == b.shape == ((case["q"].shape[0],) if mu > 0 else (0,)), a.shape
    assert torch.equal(torch.isneginf(a).cpu(), torch.isneginf(b).cpu()), \
        "lse2: -inf pattern differs"
    assert torch.isfinite(a[~torch.isneginf(a)]).all(), "lse2: NaN or +inf"
    torch.testing.assert_close(a.masked_fill(torch.isinf(a), 0).to(F64).cpu(),
                               b.masked_fill(torch.isinf(b), 0).to(F64).cpu(),
                               msg=lambda m: f"lse2: {m}", **FWD_TOL[dtype])


def check_grads_lse2(got, case, grads, g_lse2, mu, dtype, self_sim=False, mag_floor=1e-3,
                     **flags):
    """A backward's (dq, dk, dscale, dbias) for the statistics' gradients ``grads`` and
    ``g_lse2`` at ``lse2_mult=mu`` against the oracle's (``self_sim``, k=None: dz against the
    oracle's dq + dk, dk empty): fp64 tight; lower precision within twice the error of the
    oracle run at that dtype (both against fp64) plus GRAD_ATOL times the magnitude."""
    q = case["q"]
    for name, a, x in zip(GRAD_NAMES, got, (q, case["k"], case["scale"], case["bias"])):
        want_shape = (0, q.shape[1]) if (name == "dk" and self_sim) else x.shape
        assert a.dtype == x.dtype and a.shape == want_shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert a.device == x.device and torch.isfinite(a).all(), f"{name}: NaN or inf"
    to64 = lambda g: None if g is None else g.to(F64)  # noqa: E731
    fold = (lambda r: [r[0].to(F64) + r[1].to(F64), r[2], r[3]]) if self_sim else list
    names, got = list(GRAD_NAMES), list(got)
    if self_sim:
        names, got = ["dz", "dscale", "dbias"], [got[0], got[2], got[3]]
    exact = fold(ref_grads(case, [to64(g) for g in grads], F64, to64(g_lse2), mu, **flags))
    if dtype == F64:
        for name, a, b in zip(names, got, exact):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name: f"{n}: {m}")
        return
    plain = fold(ref_grads(case, grads, dtype, g_lse2, mu, **flags))
    for name, a, p, b in zip(names, got, plain, exact):
        mag = max(b.abs().max().item() if b.numel() else 0.0, mag_floor)
        err = (a.to(F64) - b).abs().max().item() if b.numel() else 0.0
        err_plain = (p.to(F64) - b).abs().max().item() if b.numel() else 0.0
        bound = 2 * err_plain + GRAD_ATOL[dtype] * mag
        assert err <= bound, f"{name}: error {err:.3e} exceeds {bound:.3e}"


def check_self_stats(fwd, case, **flags):
    """A backend's forward ``fwd`` (``contrastive_fwd_*``) without k on the fp64 ``case``: the
    statistics against the oracle (k = q), and against the same kernel with k given (the full
    square) to 1e-12."""
    got = call_fwd(fwd, dict(case, k=None), **flags)
    check_stats(got, ref_stats(case, **flags), F64)
    square = call_fwd(fwd, case, **flags)
    for name, a, b in zip(STAT_NAMES[:4], got, square):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def check_self_grads(case, scaled, got, dtype, **flags):
    """``(dz, dk, dscale, dbias)`` of a self-similarity kernel (``k=None``) against the oracle's
    dq + dk, dscale, dbias for the statistics' gradients ``scaled`` (fp64: tight; lower
    precision: the 2x-oracle-error rule of :func:`check_grads`)."""
    dz, dk, dscale, dbias = got
    q = case["q"]
    assert dk.shape == (0, q.shape[1]) and dz.shape == q.shape and dz.dtype == q.dtype
    assert dz.device == q.device and torch.isfinite(dz).all()
    g64 = [None if g is None else g.to(F64) for g in scaled] + [None, None]
    exact = ref_grads(case, g64[:5], F64, **flags)
    exact = [exact[0] + exact[1], exact[2], exact[3]]
    if dtype == F64:
        for name, a, b in zip(("dz", "dscale", "dbias"), (dz, dscale, dbias), exact):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name: f"{n}: {m}")
        return
    plain = ref_grads(case, [None if g is None else g.to(stat_dtype(dtype)) for g in scaled[:3]]
                      + [None, None], dtype, **flags)
    plain = [plain[0].to(F64) + plain[1].to(F64), plain[2], plain[3]]
    for name, a, p, b in zip(("dz", "dscale", "dbias"), (dz, dscale, dbias), plain, exact):
        mag = max(b.abs().max().item(), 1e-3)
        err = (a.to(F64) - b).abs().max().item()
        bound = 2 * (p.to(F64) - b).abs().max().item() + GRAD_ATOL[dtype] * mag
        assert err <= bound, f"{name}: error {err:.3e} exceeds {bound:.3e}"
