"""The baselines of the benchmarks compute the losses fastcl computes (value and gradients,
fp64), so that their timings compare the same work; and bench_clip's A/B variant of NT-Xent
takes the path it claims to take."""

from __future__ import annotations

import os

import pytest
import torch

import fastcl
from benchmarks._common import (eager_clip, eager_info_nce, eager_nt_xent, lse2_second_pass,
                                open_clip_clip, pml_clip, pml_info_nce, self_forward)
from benchmarks.bench_clip import LOSSES, _pairs, implementations, measure, nt_xent_unreduced
from fastcl import dispatch

# --------------------------------------------------------------------------------------------
# the baselines compute the loss fastcl computes
# --------------------------------------------------------------------------------------------

# name -> (factory of f(q, k, scale) or None where not installed, symmetric, tolerance);
# eager casts its logits to fp32, hence its looser tolerance; torch.compile runs the eager
# function itself (and compiles for ~15 s on a CPU), so it is not repeated here
BASELINES = {
    "eager": (lambda: eager_clip, True, 1e-5),
    "eager-one": (lambda: eager_info_nce, False, 1e-5),
    "open_clip": (open_clip_clip, True, 1e-10),
    "pml": (pml_clip, True, 1e-10),
    "pml-supcon": (lambda: pml_clip("supcon"), True, 1e-10),
    "pml-one": (pml_info_nce, False, 1e-10),
    "pml-supcon-one": (lambda: pml_info_nce("supcon"), False, 1e-10),
}


def _loss_and_grads(fn, q, k, scale):
    q, k, scale = (t.detach().clone().requires_grad_(True) for t in (q, k, scale))
    loss = fn(q, k, scale)
    return [loss.detach(), *torch.autograd.grad(loss, (q, k, scale))]


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_matches_fastcl(name):
    factory, symmetric, tol = BASELINES[name]
    fn = factory()
    if fn is None:
        pytest.skip(f"{name}: its package is not installed")
    # rows of unequal norms: the two directions then differ by far more than the tolerance, and
    # a baseline that normalizes its inputs (a cosine similarity) gets other gradients
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 16, generator=g, dtype=torch.float64)
    k = torch.randn(64, 16, generator=g, dtype=torch.float64)
    k = k * 2 * torch.rand(64, 1, generator=g, dtype=torch.float64)
    scale = torch.tensor(1.5, dtype=torch.float64)
    clip = lambda q, k, s: fastcl.clip_loss(q, k, s)  # noqa: E731
    one = lambda q, k, s: fastcl.info_nce(q, k, logit_scale=s)  # noqa: E731
    want = _loss_and_grads(clip if symmetric else one, q, k, scale)
    other = _loss_and_grads(one if symmetric else clip, q, k, scale)
    got = _loss_and_grads(fn, q, k, scale)
    for what, a, b, c in zip(("loss", "dq", "dk", "dscale"), got, want, other):
        # the other direction's figures differ well beyond the tolerance: a baseline computing
        # the wrong one of the two losses cannot pass
        assert (b - c).abs().max() > 1e3 * tol, what
        # (eager returns its loss in fp32)
        torch.testing.assert_close(a.to(b.dtype), b, rtol=tol, atol=tol)


def test_eager_nt_xent_matches_fastcl():
    """The CPU suite's eager NT-Xent computes fastcl.nt_xent's loss (value and gradients)."""
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(48, 16, generator=g, dtype=torch.float64)
    z2 = torch.randn(48, 16, generator=g, dtype=torch.float64)
    z2 = z2 * 2 * torch.rand(48, 1, generator=g, dtype=torch.float64)
    scale = torch.tensor(1.5, dtype=torch.float64)
    want = _loss_and_grads(lambda a, b, s: fastcl.nt_xent(a, b, logit_scale=s), z1, z2, scale)
    other = _loss_and_grads(lambda a, b, s: fastcl.clip_loss(a, b, s), z1, z2, scale)
    got = _loss_and_grads(eager_nt_xent, z1, z2, scale)
    for what, a, b, c in zip(("loss", "dz1", "dz2", "dscale"), got, want, other):
        assert (b - c).abs().max() > 1e-3, what
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ntxent_pairs_variant_skips_the_self_backward(monkeypatch):
    """bench_clip's fastcl-triton-pairs: the same NT-Xent loss and gradients as fastcl-triton,
    with a backward over two feature sets (k given) where fastcl-triton passes k=None."""
    from fastcl.kernels import contrastive as triton_kernels

    if dispatch.why_not("triton", "nt_xent", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the Triton backend cannot run here")
    keys = []
    real = triton_kernels.contrastive_bwd

    def recording(*args, **kw):
        keys.append(args[6] is None)
        return real(*args, **kw)

    monkeypatch.setattr(triton_kernels, "contrastive_bwd", recording)
    fast = LOSSES["ntxent"][1]
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    scale = torch.tensor(3.0)
    want = _loss_and_grads(lambda a, b, s: fast(a, b, s, "triton"), z1, z2, scale)
    assert keys and all(keys)
    keys.clear()
    got = _loss_and_grads(_pairs(fast, "triton"), z1, z2, scale)
    assert keys and not any(keys)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _triton_calls(monkeypatch, name):
    """The results of the calls of ``fastcl.kernels.contrastive.<name>``, with the schedule by
    slabs at every feature width (the test is skipped without the Triton backend)."""
    from fastcl.kernels import contrastive as triton_kernels

    if dispatch.why_not("triton", "nt_xent", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the Triton backend cannot run here")
    monkeypatch.setenv("FASTCL_TRITON_SLAB_MIN_D", "1")
    calls = []
    real = getattr(triton_kernels, name)

    def recording(*args, **kw):
        calls.append(real(*args, **kw))
        return calls[-1]

    monkeypatch.setattr(triton_kernels, name, recording)
    return calls


@pytest.mark.parametrize("variant", ["noslabs", "acc"])
@pytest.mark.parametrize("loss", ["clip", "ntxent", "siglip", "infonce"])
def test_schedule_variants_take_their_path(loss, variant, monkeypatch):
    """bench_clip's fastcl-triton-noslabs never goes by slabs of G where the default does
    (every width by slabs here); fastcl-triton-acc sweeps slabs of rows only, once per backward
    (the default twice, but for NT-Xent's self-similarity); both through ``measure`` and in a
    step of their own, with the default's loss and gradients; the setting is restored
    afterwards."""
    calls = _triton_calls(monkeypatch, "_bwd_slabs")
    cpu = torch.device("cpu")
    impls = implementations(cpu, torch.float32, ["fastcl-triton", f"fastcl-triton-{variant}"],
                            loss)
    default, other = impls["fastcl-triton"], impls[f"fastcl-triton-{variant}"]
    want = measure(default, 20, 8, torch.float32, cpu, reps=1, warmup=0)
    assert calls, "the default goes by slabs"
    calls.clear()
    got = measure(other, 20, 8, torch.float32, cpu, reps=1, warmup=0)
    assert bool(calls) == (variant == "acc") and "seconds" in got
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert os.environ["FASTCL_TRITON_SLAB_MIN_D"] == "1"
    assert "FASTCL_TRITON_SLAB_ACCUMULATE" not in os.environ
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    scale = torch.tensor(3.0)
    calls.clear()
    with other.step_context():
        grads = _loss_and_grads(other, q, k, scale)
    sweeps = len(calls)
    calls.clear()
    for a, b in zip(grads, _loss_and_grads(default, q, k, scale)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sweeps == (0 if variant == "noslabs" else 1)
    assert len(calls) == (1 if loss == "ntxent" else 2)


@pytest.mark.parametrize("mode", ["square", "half"])
def test_self_forward_variants(mode, monkeypatch):
    """bench_clip's fastcl-triton-squarefwd (NT-Xent only) computes the forward over the full
    square where the default takes the half below the diagonal (always, under the
    interpreter), -halffwd takes the half too, both with the default's loss and gradients; the
    setting is restored afterwards."""
    calls = _triton_calls(monkeypatch, "_fwd_self")
    name = f"fastcl-triton-{mode}fwd"
    impls = implementations(torch.device("cpu"), torch.float32, ["fastcl-triton", name],
                            "ntxent")
    assert set(impls) == {"fastcl-triton", name}
    default, other = impls["fastcl-triton"], impls[name]
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    scale = torch.tensor(3.0)
    want = _loss_and_grads(default, z1, z2, scale)
    assert calls == [True]
    calls.clear()
    with other.step_context():
        assert os.environ["FASTCL_TRITON_SELF_FWD"] == ("0" if mode == "square" else "2")
        got = _loss_and_grads(other, z1, z2, scale)
    assert calls == ([] if mode == "square" else [True])
    assert "FASTCL_TRITON_SELF_FWD" not in os.environ
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert name not in implementations(torch.device("cpu"), torch.float32, None, "clip")


def test_cuda_square_forward_variant(monkeypatch, stats_keys):
    """bench_clip's fastcl-cuda-stats-squarefwd: within its context the statistics op hands the
    CUDA C++ forward ``k = q`` (the full square) where it otherwise hands it ``k=None``; the
    list of backends is restored on exit. fastcl-cuda-stats takes the statistics op with
    ``k=None`` and gives fastcl.nt_xent's loss and gradients (checked on the CPU backend)."""
    from fastcl import _backends
    from fastcl.ops import contrastive as contrastive_ops

    seen = []
    q = torch.randn(4, 3)
    one = torch.ones(())
    before = contrastive_ops.SELF_FWD_BACKENDS

    def forward():
        contrastive_ops._fwd_kernel("cuda", q, None, one, one, None, None, None, True, False,
                                    False, False, 0.0)

    with monkeypatch.context() as m:
        m.setattr(_backends, "kernel",
                  lambda backend, op: (lambda q, k, *rest: seen.append(k is None)))
        forward()
        with self_forward("square", "cuda"):
            forward()
        forward()
    assert seen == [True, False, True]
    assert contrastive_ops.SELF_FWD_BACKENDS == before
    with pytest.raises(ValueError, match="no forced half square"):
        self_forward("half", "cuda")

    if dispatch.why_not("cpu", "nt_xent", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the CPU backend is not built")
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    scale = torch.tensor(2.0)
    want = _loss_and_grads(lambda a, b, s: fastcl.nt_xent(a, b, logit_scale=s, backend="cpu"),
                           z1, z2, scale)
    stats_keys.clear()
    got = _loss_and_grads(lambda a, b, s: nt_xent_unreduced(a, b, s, "cpu"), z1, z2, scale)
    assert stats_keys == [True]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_lse2_second_pass_variant(backend, monkeypatch):
    """The -twopass variants of the hard-negative loss: within lse2_second_pass the statistics
    op runs the backend's forward kernel twice (the second at lse2_mult times the scale) and
    its backward twice, outside once each; the list is restored on exit; the loss and its
    gradients are the same."""
    from fastcl import _backends
    from fastcl.ops import contrastive as contrastive_ops

    reason = dispatch.why_not(backend, "hard_negative_nce", torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    calls = []
    real = _backends.kernel

    def counting(be, op):
        fn = real(be, op)

        def wrapped(*args, **kw):
            calls.append(op)
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(_backends, "kernel", counting)
    before = contrastive_ops.LSE2_BACKENDS
    assert backend in before
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)

    def loss(a, b, s):
        return fastcl.hard_negative_nce(a, b, temperature=1 / s, beta=1.0, tau_plus=0.1,
                                        backend=backend)

    scale = torch.tensor(2.0)
    one = _loss_and_grads(loss, z1, z2, scale)
    assert calls == ["contrastive_fwd", "contrastive_bwd"]
    calls.clear()
    with lse2_second_pass(backend):
        assert backend not in contrastive_ops.LSE2_BACKENDS
        two = _loss_and_grads(loss, z1, z2, scale)
    assert calls == ["contrastive_fwd"] * 2 + ["contrastive_bwd"] * 2
    assert contrastive_ops.LSE2_BACKENDS == before
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    impls = implementations(torch.device("cpu"), torch.float32, None, "hcl")
    if backend == "cpu":
        assert {"eager", "fastcl-cpu", "fastcl-cpu-twopass"} <= set(impls)
        assert impls["fastcl-cpu-twopass"].step_context is not None


def test_pml_ntxent_refuses_cubic_memory():
    fn = pml_clip()
    if fn is None:
        pytest.skip("pytorch-metric-learning is not installed")
    x = torch.zeros(4096, 1)
    with pytest.raises(MemoryError, match="NTXentLoss would hold"):
        fn(x, x, 1.0)


def test_cpu_statistics_path_variants(stats_keys):
    """bench_cpu_contrastive's fastcl-stats-ntxent (k=None) and fastcl-pairs-ntxent (k given)
    compute fastcl.nt_xent's loss and gradients, through the statistics op they claim."""
    from benchmarks.bench_cpu_contrastive import fastcl_nt_xent_pairs, fastcl_nt_xent_stats

    if dispatch.why_not("cpu", "nt_xent", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the CPU backend is not built")
    keys = stats_keys
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    scale = torch.tensor(2.0)
    want = _loss_and_grads(lambda a, b, s: fastcl.nt_xent(a, b, logit_scale=s, backend="cpu"),
                           z1, z2, scale)
    for fn, self_keys in ((fastcl_nt_xent_stats, True), (fastcl_nt_xent_pairs, False)):
        keys.clear()
        got = _loss_and_grads(fn, z1, z2, scale)
        assert keys == [self_keys]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
