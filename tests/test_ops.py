"""The custom ops: torch.library.opcheck and torch.compile(fullgraph=True) of loss + backward."""

from __future__ import annotations

import pytest
import torch

import fastcl
from fastcl import dispatch
from fastcl.ops import contrastive as contrastive_ops
from fastcl.ops.contrastive import contrastive_bwd, contrastive_fused, contrastive_fwd


def op_backends():
    out = ["torch"]
    for name in ("cpu", "triton"):
        if dispatch.why_not(name, "info_nce", torch.device("cpu"), torch.float32) is None:
            out.append(name)
    if "triton" in out:
        out.append("triton-slabs")  # the Triton backward by slabs of G
        out.append("triton-slabs-acc")  # by slabs of rows only (SLAB_ACCUMULATE)
    return out


@pytest.fixture
def backend(request):
    """The op backend of ``op_backends()``; ``"triton-slabs"`` runs ``"triton"`` with the
    backward by slabs at every feature width (two slabs of the tests' six rows),
    ``"triton-slabs-acc"`` the same with ``SLAB_ACCUMULATE``."""
    if request.param.startswith("triton-slabs"):
        fixture = "accumulated" if request.param.endswith("-acc") else "slabs"
        request.getfixturevalue(fixture)(3)
        return "triton"
    return request.param


def _fwd_args(backend, *, labels=False, col=False, dtype=torch.float32, lse2_mult=0.0):
    q = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    k = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    bias = torch.tensor(0.5, requires_grad=True)
    targets = None if labels else torch.tensor([1, 0, 3, -1, 5, 4])
    lab = torch.tensor([0, 1, 0, 1, 2, 2]) if labels else None
    return (q, k, scale, bias, targets, lab, lab, labels, False, labels, col, lse2_mult, backend)


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
@pytest.mark.parametrize("labels,col", [(False, True), (True, False)])
def test_opcheck_contrastive(backend, labels, col):
    args = _fwd_args(backend, labels=labels, col=col)
    torch.library.opcheck(contrastive_fwd, args)
    with torch.no_grad():
        lse, pos, npos, mean, col_lse, col_mean, _lse2 = contrastive_fwd(*args)
    q, k, scale, bias, targets, rl, cl, ex, dec, plse, colf, _m, be = args
    g = [torch.randn_like(lse), torch.randn_like(pos), None,
         torch.randn_like(col_lse) if col else None, None]
    bwd_args = (*g, q.detach(), k.detach(), scale.detach(), bias.detach(), targets, rl, cl,
                lse, pos, npos, col_lse, ex, dec, plse, colf, None, _lse2, 0.0, be)
    torch.library.opcheck(contrastive_bwd, bwd_args)


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
@pytest.mark.parametrize("labels", [False, True])
def test_opcheck_contrastive_self(backend, labels):
    """The statistics op and its backward with k=None (the keys are q)."""
    q, _k, scale, bias, targets, rl, cl, ex, dec, plse, _c, _m, be = _fwd_args(backend,
                                                                              labels=labels)
    args = (q, None, scale, bias, targets, rl, cl, True, dec, plse, False, 0.0, be)
    torch.library.opcheck(contrastive_fwd, args)
    with torch.no_grad():
        lse, pos, npos, mean, col_lse, _cm, lse2 = contrastive_fwd(*args)
    g = [torch.randn_like(lse), torch.randn_like(pos), torch.randn_like(mean), None, None]
    bwd_args = (*g, q.detach(), None, scale.detach(), bias.detach(), targets, rl, cl,
                lse, pos, npos, col_lse, True, dec, plse, False, None, lse2, 0.0, be)
    torch.library.opcheck(contrastive_bwd, bwd_args)
    assert contrastive_bwd(*bwd_args)[1].shape == (0, q.shape[1])


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
def test_stats_op_self_similarity(backend):
    """k=None: the statistics of k = q, and the gradient of q in both roles."""
    q, _k, scale, bias, targets, *_ = _fwd_args(backend)
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(6, generator=gen) for _ in range(3)]

    def run(self_sim):
        z = q.detach().clone().requires_grad_(True)
        leaves = [z, scale.detach().clone().requires_grad_(True),
                  bias.detach().clone().requires_grad_(True)]
        out = contrastive_fwd(z, None if self_sim else z, leaves[1], leaves[2], targets, None,
                              None, True, True, False, False, 0.0, backend)
        total = sum(((o.masked_fill(torch.isinf(o), 0) * w).sum()
                     for o, w in zip((out[0], out[1], out[3]), g)))
        return out, torch.autograd.grad(total, leaves)

    (got, got_g), (want, want_g) = run(True), run(False)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="col_stats needs k"):
        contrastive_fwd(q, None, scale, bias, targets, None, None, True, False, False, True,
                        0.0, backend)


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
@pytest.mark.parametrize("self_sim", [False, True], ids=("two-sets", "self"))
@pytest.mark.parametrize("labels", [False, True])
def test_opcheck_contrastive_fused(backend, labels, self_sim):
    q, k, scale, bias, targets, rl, cl, _l, _d, plse, _c, _m, be = _fwd_args(backend,
                                                                            labels=labels)
    g = [torch.randn(6), -torch.ones(6), torch.randn(6) if not labels else None]
    k = None if self_sim else k
    torch.library.opcheck(contrastive_fused,
                          (*g, q, k, scale, bias, targets, rl, cl, labels, False, plse, True, be))


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
def test_fused_op_self_similarity(backend):
    """k=None: the loss of k = q, and the gradient of q in both roles in dq (dk empty)."""
    q, _k, scale, bias, targets, *_ = _fwd_args(backend)
    g = (torch.ones(6), torch.full((6,), -0.9), torch.full((6,), -0.1))
    z = q.detach().clone().requires_grad_(True)
    loss = contrastive_fused(*g, z, None, scale, bias, targets, None, None, True, False, False,
                             True, backend)[0]
    (dz,) = torch.autograd.grad(2.0 * loss, (z,))
    z2 = q.detach().clone().requires_grad_(True)
    want = contrastive_fused(*g, z2, z2, scale, bias, targets, None, None, True, False, False,
                             True, backend)[0]
    (want_dz,) = torch.autograd.grad(2.0 * want, (z2,))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(dz, want_dz)
    with torch.no_grad():
        out = contrastive_fused(*g, z, None, scale, bias, targets, None, None, True, False,
                                False, True, backend)
    assert out[3].shape == (0, 5)


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
def test_fused_op_matches_forward_and_backward(backend):
    """contrastive_fused's loss and gradients equal those of the two ops it stands for."""
    q, k, scale, bias, targets, rl, cl, *_ = _fwd_args(backend)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, scale, bias)]
    loss = contrastive_fused(torch.ones(6), torch.full((6,), -0.9), torch.full((6,), -0.1),
                             *leaves, targets, None, None, True, False, False, True, backend)[0]
    got = torch.autograd.grad(3.0 * loss, leaves)
    leaves2 = [t.detach().clone().requires_grad_(True) for t in (q, k, scale, bias)]
    lse, pos, npos, mean, *_ = contrastive_fwd(*leaves2, targets, None, None, True, False, False,
                                               False, 0.0, backend)
    has = npos > 0
    rows = torch.where(has, lse - 0.9 * pos - 0.1 * mean, torch.zeros_like(lse))
    want_loss = rows.sum() / has.sum()
    want = torch.autograd.grad(3.0 * want_loss, leaves2)
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
@pytest.mark.parametrize("self_sim", [False, True], ids=("two-sets", "self"))
@pytest.mark.parametrize("labels", [False, True])
def test_opcheck_contrastive_lse2(backend, labels, self_sim):
    """The second log-sum-exp (lse2_mult > 0): the op schema, the fake kernel and autograd."""
    q, k, scale, bias, targets, rl, cl, ex, dec, plse, _c, _m, be = _fwd_args(
        backend, labels=labels, lse2_mult=0.4)
    k = None if self_sim else k
    args = (q, k, scale, bias, targets, rl, cl, True, dec, plse, False, 0.4, be)
    torch.library.opcheck(contrastive_fwd, args)
    with torch.no_grad():
        lse, pos, npos, mean, col_lse, _cm, lse2 = contrastive_fwd(*args)
    assert lse2.shape == lse.shape
    g = [torch.randn_like(lse), None, None, None, None]
    bwd_args = (*g, q.detach(), None if k is None else k.detach(), scale.detach(),
                bias.detach(), targets, rl, cl, lse, pos, npos, col_lse, True, dec, plse, False,
                torch.randn_like(lse2), lse2, 0.4, be)
    torch.library.opcheck(contrastive_bwd, bwd_args)


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
@pytest.mark.parametrize("self_sim", [False, True], ids=("two-sets", "self"))
def test_lse2_matches_reference(backend, self_sim):
    """lse2 and the gradients of a loss built from it (with lse and pos) against the autograd of
    the materializing oracle."""
    from fastcl.reference.contrastive import contrastive_stats_ref

    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(9, 6, generator=gen, dtype=torch.float64).float(),
            torch.randn(9, 6, generator=gen, dtype=torch.float64).float(),
            torch.tensor(1.7), torch.tensor(-0.3)]
    targets = torch.tensor([1, 0, 3, -1, 5, 4, 8, 6, 7])
    w = [torch.randn(9, generator=gen) for _ in range(3)]

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in base]
        q, k, a, b = leaves
        out = fn(q, q if self_sim else k, a, b)
        lse, pos, lse2 = out[0], out[1], out[6]
        total = (w[0] * lse).sum() + (w[1] * pos).sum() + (w[2] * lse2).sum()
        return lse2, torch.autograd.grad(total, leaves, allow_unused=True)

    flags = dict(exclude_diag=True, decoupled=True)
    want, want_g = run(lambda q, k, a, b: contrastive_stats_ref(
        q, k, a, b, targets, lse2_mult=0.6, **flags))
    got, got_g = run(lambda q, k, a, b: contrastive_ops.contrastive_stats(
        q, None if self_sim else k, a, b, targets, lse2_mult=0.6, backend=backend, **flags))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i, (x, y) in enumerate(zip(got_g, want_g)):
        if self_sim and i == 1:
            continue  # k unused: the gradient of q covers both roles
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", op_backends(), indirect=True)
def test_lse2_bad_arguments(backend):
    q, k, scale, bias, targets, rl, cl, ex, dec, plse, col, _m, be = _fwd_args(backend)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lse2_mult must be a finite number >= 0"):
            contrastive_fwd(q, k, scale, bias, targets, rl, cl, ex, dec, plse, col, bad, be)
    with torch.no_grad():
        lse, pos, npos, _mean, col_lse, _cm, lse2 = contrastive_fwd(
            q, k, scale, bias, targets, rl, cl, ex, dec, plse, col, 0.0, be)
    assert lse2.numel() == 0
    with pytest.raises(ValueError, match="g_lse2 was given but lse2_mult is 0"):
        contrastive_bwd(None, None, None, None, None, q.detach(), k.detach(), scale.detach(),
                        bias.detach(), targets, rl, cl, lse, pos, npos, col_lse, ex, dec, plse,
                        col, torch.ones_like(lse), lse, 0.0, be)


def _clip(x, y, scale):
    return fastcl.clip_loss(x, y, scale, label_smoothing=0.1)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_loss_and_backward(compile_backend):
    """The forward compiles as one graph; AOTAutograd compiles its backward through the op."""
    be = dispatch.select("info_nce", torch.device("cpu"), torch.float32)
    if be == "reference":
        pytest.skip("no fused CPU backend built")
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.randn(16, 8, requires_grad=True)
    scale = torch.tensor(5.0, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(_clip, fullgraph=True, backend=compile_backend)
    got = compiled(x, y, scale)
    got_grads = torch.autograd.grad(got, (x, y, scale))
    want = _clip(x, y, scale)
    want_grads = torch.autograd.grad(want, (x, y, scale))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_statistics_op_self_similarity():
    """The statistics op with k=None (NT-Xent per anchor, the multi-view loss) traces as one
    graph, forward and backward."""
    be = dispatch.select("nt_xent", torch.device("cpu"), torch.float32)
    if be not in contrastive_ops.SELF_BWD_BACKENDS:
        pytest.skip("no CPU kernel with the self-similarity backward built")
    views = torch.randn(3, 10, 6, requires_grad=True)
    w = torch.rand(20)

    def fn(v):
        per = fastcl.nt_xent(v[0], v[1], reduction="none")
        return (per * w).sum() + fastcl.multiview_loss(v, temperature=0.5)

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(views)
    (got_g,) = torch.autograd.grad(got, (views,))
    v64 = views.detach().double().requires_grad_(True)
    want = fn(v64)
    (want_g,) = torch.autograd.grad(want, (v64,))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_g, want_g.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["info_nce", "nt_xent"])
def test_compile_fullgraph_fused_sweep(loss):
    """The one-sweep losses trace as one graph; the backward multiplies the saved gradients."""
    be = dispatch.select("info_nce", torch.device("cpu"), torch.float32)
    if be not in contrastive_ops.FUSED_BACKENDS:
        pytest.skip("no fused CPU backend built")
    fn = {"info_nce": lambda x, y, s: fastcl.info_nce(x, y, logit_scale=s, label_smoothing=0.1),
          "nt_xent": lambda x, y, s: fastcl.nt_xent(x, y, logit_scale=s)}[loss]
    x = torch.randn(12, 8, requires_grad=True)
    y = torch.randn(12, 8, requires_grad=True)
    scale = torch.tensor(4.0, requires_grad=True)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y, scale)
    got_grads = torch.autograd.grad(2.0 * got, (x, y, scale))
    want = fn(x.double(), y.double(), scale.double())
    want_grads = torch.autograd.grad(2.0 * want, (x, y, scale))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)


def test_compile_fullgraph_supcon():
    be = dispatch.select("supcon", torch.device("cpu"), torch.float32)
    if be == "reference":
        pytest.skip("no fused CPU backend built")
    f = torch.randn(8, 2, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 4])
    torch._dynamo.reset()
    fn = torch.compile(lambda f: fastcl.supcon(f, labels, variant="in"), fullgraph=True,
                       backend="aot_eager")
    loss = fn(f)
    loss.backward()
    f2 = f.detach().clone().requires_grad_(True)
    ref = fastcl.supcon(f2, labels, variant="in", backend="reference")
    ref.backward()
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.grad, f2.grad, rtol=1e-4, atol=1e-6)
