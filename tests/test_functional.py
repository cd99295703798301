"""The public functions: every fused path against fastcl.reference, loss and gradients.

The fused path is exercised through each kernel backend that this machine can run ("cpu" with
the compiled extension, "triton" under Triton's interpreter on CPU) and through "torch", the
materializing implementation of the same custom ops, which checks the composition of the
statistics into each loss independently of any kernel.
"""

from __future__ import annotations

import pytest
import torch

import fastcl
from fastcl import dispatch

TORCH_OP = "torch"


def kernel_backends():
    out = [TORCH_OP]
    for name in ("cpu", "triton"):
        if dispatch.why_not(name, "info_nce", torch.device("cpu"), torch.float32) is None:
            out.append(name)
    return out


@pytest.fixture(params=kernel_backends())
def backend(request, monkeypatch):
    """Run fastcl's functions through one kernel backend ("torch" bypasses the dispatch table)."""
    name = request.param
    if name == TORCH_OP:
        real = dispatch.select

        def select(op, device, dtype, backend="auto"):
            if backend == TORCH_OP:
                return TORCH_OP if dispatch.OPS[op] else "reference"
            return real(op, device, dtype, backend)

        monkeypatch.setattr(dispatch, "select", select)
    return name


def _dtype_for(backend):
    # fp64 where the backend takes it (tight comparison); the interpreter runs fp32.
    return torch.float32 if backend == "triton" else torch.float64


def _assert_close(got, want, dtype):
    """fp64: tight; fp32: relative to the magnitude of the fp64 oracle's values."""
    want = want.to(got.dtype)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    else:
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6 * scale)


def _leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(True)


def _compare(fn, inputs, backend, dtype):
    """Loss and gradients of ``fn(..., backend=backend)`` against the fp64 reference."""
    got = fn(*inputs, backend=backend)
    clones = [(x.detach().double() if x.is_floating_point() else x.detach()).requires_grad_(
        x.requires_grad) for x in inputs]
    want = fn(*clones, backend="reference")
    _assert_close(got, want, dtype)
    weights = torch.randn_like(got) if got.dim() else torch.ones_like(got)
    gs = torch.autograd.grad((got * weights).sum(), [x for x in inputs if x.requires_grad])
    ws = torch.autograd.grad((want * weights.double()).sum(), [x for x in clones if x.requires_grad])
    for g, w in zip(gs, ws):
        _assert_close(g, w, dtype)


REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["plain", "smooth", "negatives", "targets", "symmetric", "sym_smooth"])
def test_info_nce(backend, case, reduction):
    dt = _dtype_for(backend)
    n, m, d = 7, 9 if case in ("plain", "targets", "negatives", "smooth") else 7, 5
    q, k = _leaf(n, d, dtype=dt), _leaf(m, d, dtype=dt)
    scale = torch.tensor(3.0, dtype=dt, requires_grad=True)
    negs = _leaf(4, d, dtype=dt) if case == "negatives" else None
    targets = torch.tensor([2, 0, -1, 4, 4, 8, 1]) if case == "targets" else None
    kwargs = dict(label_smoothing=0.1 if "smooth" in case else 0.0,
                  symmetric=case.startswith("sym"), reduction=reduction)

    def fn(q, k, scale, *rest, backend):
        return fastcl.info_nce(q, k, logit_scale=scale, negatives=rest[0] if rest else None,
                               targets=targets, backend=backend, **kwargs)

    _compare(fn, [q, k, scale] + ([negs] if negs is not None else []), backend, dt)


def test_clip_loss_bias_and_weight(backend):
    dt = _dtype_for(backend)
    x, y = _leaf(6, 4, dtype=dt), _leaf(6, 4, dtype=dt)
    scale = torch.tensor(10.0, dtype=dt, requires_grad=True)

    def fn(x, y, scale, *, backend):
        return fastcl.clip_loss(x, y, scale, logit_bias=-2.0, symmetric_weight=0.75,
                                normalize=True, backend=backend)

    _compare(fn, [x, y, scale], backend, dt)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nt_xent(backend, reduction):
    dt = _dtype_for(backend)
    z1, z2 = _leaf(5, 6, dtype=dt), _leaf(5, 6, dtype=dt)
    _compare(lambda a, b, *, backend: fastcl.nt_xent(a, b, temperature=0.3, normalize=True,
                                                     reduction=reduction, backend=backend),
             [z1, z2], backend, dt)


@pytest.mark.parametrize("variant", ["out", "in"])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_supcon(backend, variant, labelled, reduction):
    dt = _dtype_for(backend)
    feats = _leaf(6, 3, 4, dtype=dt)
    labels = torch.tensor([0, 1, 0, 2, 1, 3]) if labelled else None

    def fn(f, *, backend):
        return fastcl.supcon(f, labels, temperature=0.2, variant=variant, base_temperature=0.07,
                             reduction=reduction, backend=backend)

    _compare(fn, [feats], backend, dt)


def test_supcon_single_view_without_positives(backend):
    dt = _dtype_for(backend)
    feats = _leaf(5, 4, dtype=dt)
    labels = torch.tensor([0, 1, 0, 2, 3])  # three anchors have no positive
    loss = fastcl.supcon(feats, labels, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()
    _compare(lambda f, *, backend: fastcl.supcon(f, labels, backend=backend), [feats], backend, dt)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dcl(backend, weighted, reduction):
    dt = _dtype_for(backend)
    z1, z2 = _leaf(5, 4, dtype=dt), _leaf(5, 4, dtype=dt)
    _compare(lambda a, b, *, backend: fastcl.dcl(a, b, temperature=0.5, weighted=weighted,
                                                 normalize=False, reduction=reduction,
                                                 backend=backend),
             [z1, z2], backend, dt)


@pytest.mark.parametrize("method,mode", [("mv_infonce", "full"), ("mv_dhel", "full"),
                                         ("cmc", "full"), ("cmc", "core")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_multiview(backend, method, mode, reduction):
    dt = _dtype_for(backend)
    views = _leaf(3, 5, 4, dtype=dt)
    _compare(lambda v, *, backend: fastcl.multiview_loss(v, temperature=0.5, method=method,
                                                         cmc_mode=mode, normalize=True,
                                                         reduction=reduction, backend=backend),
             [views], backend, dt)


@pytest.mark.parametrize("layout", ["two_view", "paired"])
@pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.0), (0.0, 0.1), (1.0, 0.0), (0.5, 0.1)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hard_negative_nce(backend, layout, beta, tau_plus, reduction):
    dt = _dtype_for(backend)
    z1, z2 = _leaf(6, 4, dtype=dt), _leaf(6, 4, dtype=dt)
    _compare(lambda a, b, *, backend: fastcl.hard_negative_nce(
        a, b, temperature=0.5, beta=beta, tau_plus=tau_plus, layout=layout, normalize=True,
        reduction=reduction, backend=backend), [z1, z2], backend, dt)


def test_hard_negative_nce_clamp_active(backend):
    # raw (unnormalized) vectors, a strong debiasing term: the floor Nn exp(-1/tau) is active
    dt = _dtype_for(backend)
    z1, z2 = _leaf(5, 3, dtype=dt, scale=2.0), _leaf(5, 3, dtype=dt, scale=2.0)
    _compare(lambda a, b, *, backend: fastcl.hard_negative_nce(
        a, b, temperature=0.7, beta=0.5, tau_plus=0.5, reduction="none", backend=backend),
        [z1, z2], backend, dt)


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity(backend, t):
    dt = _dtype_for(backend)
    x = _leaf(9, 5, dtype=dt)
    _compare(lambda x, *, backend: fastcl.uniformity(x, t=t, backend=backend), [x], backend, dt)


def test_siglip_topk_alignment_run():
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.isfinite(fastcl.siglip_loss(x, y, 10.0, -10.0))
    torch.testing.assert_close(fastcl.alignment(x, y), (x - y).norm(dim=1).pow(2).mean())
    vals, idx = fastcl.topk_similarity(x, y, 3)
    full = x @ y.T
    torch.testing.assert_close(vals, full.topk(3, dim=1).values)
    with pytest.raises(fastcl.BackendUnavailableError, match="needs CUDA tensors"):
        fastcl.siglip_loss(x, y, 10.0, -10.0, backend="cuda")
    assert "no fused cuda kernel" in dispatch.why_not("cuda", "topk_similarity",
                                                      torch.device("cuda"), torch.float32)


def _skip_without_family(backend, op):
    if backend != TORCH_OP and dispatch.why_not(backend, op, torch.device("cpu"),
                                                _dtype_for(backend)) is not None:
        pytest.skip(f"the {backend} backend has no fused {op} kernels")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [False, True])
def test_siglip_loss(backend, reduction, normalize):
    _skip_without_family(backend, "siglip_loss")
    dt = _dtype_for(backend)
    x, y = _leaf(7, 5, dtype=dt), _leaf(7, 5, dtype=dt)
    scale = torch.tensor(4.0, dtype=dt, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=dt, requires_grad=True)

    def fn(x, y, scale, bias, *, backend):
        return fastcl.siglip_loss(x, y, scale, bias, normalize=normalize, reduction=reduction,
                                  backend=backend)

    _compare(fn, [x, y, scale, bias], backend, dt)


def test_siglip_loss_without_gradients(backend):
    _skip_without_family(backend, "siglip_loss")
    dt = _dtype_for(backend)
    x, y = torch.randn(6, 4, dtype=dt), torch.randn(6, 4, dtype=dt)
    want = fastcl.siglip_loss(x.double(), y.double(), 10.0, -10.0, backend="reference")
    with torch.no_grad():
        got = fastcl.siglip_loss(x, y, 10.0, -10.0, backend=backend)
    _assert_close(got, want, dt)
    got = fastcl.siglip_loss(x, y, 10.0, -10.0, reduction="sum", backend=backend)
    _assert_close(got, want * 6, dt)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_topk_similarity(backend, exclude_self):
    _skip_without_family(backend, "topk_similarity")
    dt = _dtype_for(backend)
    # small integers: exact similarities, with ties
    q = torch.randint(-3, 4, (9, 5)).to(dt)
    k = torch.randint(-3, 4, (13, 5)).to(dt)
    v, i = fastcl.topk_similarity(q, k, 4, exclude_self=exclude_self, backend=backend)
    rv, _ = fastcl.topk_similarity(q, k, 4, exclude_self=exclude_self, backend="reference")
    assert v.dtype == rv.dtype and i.dtype == torch.int64 and v.shape == i.shape == (9, 4)
    assert torch.equal(v, rv)
    sim = q.to(rv.dtype) @ k.to(rv.dtype).T
    assert torch.equal(sim.gather(1, i), v)
    if exclude_self:
        assert (i != torch.arange(9)[:, None]).all()


def test_one_sweep_path_taken_exactly_where_it_applies(monkeypatch):
    """On the CPU backend, reduced one-direction losses with gradients take contrastive_fused
    (and agree with the reference); without gradients, per-row results or symmetric losses
    they take the statistics op."""
    from fastcl.ops import contrastive as contrastive_ops

    if dispatch.why_not("cpu", "info_nce", torch.device("cpu"), torch.float64) is not None:
        pytest.skip("the CPU backend is not built")
    calls = []
    real = contrastive_ops.contrastive_fused

    def counting(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(contrastive_ops, "contrastive_fused", counting)
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    f = torch.randn(10, 2, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(10) % 3
    fused = [lambda be: fastcl.info_nce(x, y, temperature=0.2, backend=be),
             lambda be: fastcl.info_nce(x, y, temperature=0.2, reduction="sum", backend=be),
             lambda be: fastcl.nt_xent(x, y, backend=be),
             lambda be: fastcl.supcon(f, labels, backend=be),
             lambda be: fastcl.dcl(x, y, weighted=True, backend=be)]
    for fn in fused:
        calls.clear()
        got, want = fn("cpu"), fn("reference")
        assert calls == ["cpu"]
        _assert_close(got, want, torch.float64)
        gs = torch.autograd.grad(got, [x, y, f], allow_unused=True)
        ws = torch.autograd.grad(want, [x, y, f], allow_unused=True)
        for g, w in zip(gs, ws):
            assert (g is None) == (w is None)
            if g is not None:
                _assert_close(g, w, torch.float64)
    calls.clear()
    fastcl.info_nce(x, y, temperature=0.2, reduction="none", backend="cpu")
    fastcl.clip_loss(x, y, 5.0, backend="cpu")
    with torch.no_grad():
        fastcl.nt_xent(x, y, backend="cpu")
    fastcl.nt_xent(x.detach(), y.detach(), backend="cpu")
    assert calls == []


def test_self_similarity_path_on_triton(monkeypatch):
    """On the Triton backend the losses over one feature set (NT-Xent, SupCon, DCL) take
    contrastive_fused with k=None (one backward launch for G + G.T) and agree with the
    reference; InfoNCE over two feature sets keeps the statistics op."""
    from fastcl.ops import contrastive as contrastive_ops

    if dispatch.why_not("triton", "info_nce", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the Triton backend cannot run here")
    calls = []
    real = contrastive_ops.contrastive_fused

    def counting(*args):
        calls.append((args[4] is None, args[-1]))
        return real(*args)

    monkeypatch.setattr(contrastive_ops, "contrastive_fused", counting)
    x = torch.randn(10, 6, requires_grad=True)
    y = torch.randn(10, 6, requires_grad=True)
    f = torch.randn(10, 2, 6, requires_grad=True)
    labels = torch.arange(10) % 3
    for fn in (lambda be: fastcl.nt_xent(x, y, backend=be),
               lambda be: fastcl.supcon(f, labels, variant="in", backend=be),
               lambda be: fastcl.dcl(x, y, weighted=True, backend=be)):
        calls.clear()
        got, want = fn("triton"), fn("reference")
        assert calls == [(True, "triton")]
        _assert_close(got, want.float(), torch.float32)
        gs = torch.autograd.grad(got, [x, y, f], allow_unused=True)
        ws = torch.autograd.grad(want, [x, y, f], allow_unused=True)
        for g, w in zip(gs, ws):
            assert (g is None) == (w is None)
            if g is not None:
                _assert_close(g, w.float(), torch.float32)
    calls.clear()
    fastcl.info_nce(x, y, temperature=0.2, backend="triton")
    assert calls == []


@pytest.mark.parametrize("layout", ["two_view", "paired"])
def test_hard_negative_nce_takes_one_pass(backend, layout, stats_keys):
    """Both log-sum-exps of the negatives (at (1 + beta) / T and beta / T) come from one call of
    the statistics op (its lse2), whose backward serves both."""
    dt = _dtype_for(backend)
    x, y = _leaf(7, 4, dtype=dt), _leaf(7, 4, dtype=dt)
    loss = fastcl.hard_negative_nce(x, y, temperature=0.5, beta=0.8, tau_plus=0.1,
                                    layout=layout, backend=backend)
    assert stats_keys == [layout == "two_view"]
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_statistics_op_takes_self_similarity(backend, stats_keys):
    """Losses over the logits of one feature set that go through the statistics op (no
    reduction, the multi-view losses, the two-view hard-negative loss) pass k=None, whose
    backward exploits the symmetry; loss and gradients agree with the reference."""
    calls = stats_keys
    dt = _dtype_for(backend)
    x, y = _leaf(9, 5, dtype=dt), _leaf(9, 5, dtype=dt)
    views = _leaf(3, 7, 5, dtype=dt)
    feats = _leaf(8, 2, 5, dtype=dt)
    labels = torch.arange(8) % 3
    cases = [
        lambda be: fastcl.nt_xent(x, y, reduction="none", backend=be),
        lambda be: fastcl.supcon(feats, labels, reduction="none", backend=be),
        lambda be: fastcl.dcl(x, y, reduction="none", backend=be),
        lambda be: fastcl.multiview_loss(views, temperature=0.5, backend=be),
        lambda be: fastcl.multiview_loss(views, temperature=0.5, method="mv_dhel", backend=be),
        lambda be: fastcl.hard_negative_nce(x, y, temperature=0.5, beta=0.5, tau_plus=0.1,
                                            backend=be),
    ]
    leaves = [x, y, views, feats]
    for fn in cases:
        calls.clear()
        got = fn(backend)
        assert calls and all(calls), calls
        want = fn("reference")
        _assert_close(got, want, dt)
        w = torch.randn_like(got)
        gs = torch.autograd.grad((got * w).sum(), leaves, allow_unused=True)
        ws = torch.autograd.grad((want * w).sum(), leaves, allow_unused=True)
        for g, r in zip(gs, ws):
            assert (g is None) == (r is None)
            if g is not None:
                _assert_close(g, r, dt)
