"""pytest-benchmark suite: forward, backward and forward + backward of every loss and backend.

    pytest benchmarks/test_bench_losses.py --benchmark-enable              # this machine's sizes
    pytest benchmarks/test_bench_losses.py --benchmark-enable --benchmark-json out.json
    FASTCL_BENCH_GRID=full pytest benchmarks/test_bench_losses.py --benchmark-enable

Before them, ``test_baseline_matches_fastcl`` checks that every baseline of
:mod:`benchmarks._common` computes the loss fastcl computes (value and gradients, fp64), so that
the timings compare the same work.
Two suites: ``test_loss`` runs every loss on every backend at one size per device, in every
phase; ``test_scaling`` runs the symmetric CLIP loss forward + backward over a grid of N, D and
dtype (on a GPU N from 1k to 1M where memory allows, D from 128 to 4096; on a CPU a small grid,
a regression guard; ``FASTCL_BENCH_GRID=full`` widens it). The materializing reference is run
only where its N x N logits fit. Peak memory beyond the inputs goes to ``extra_info``
(``torch.cuda.max_memory_allocated`` on a GPU, the resident-set high-water mark on a CPU).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl import dispatch

from ._common import RssPeak, eager_clip, open_clip_clip, pml_clip, pml_info_nce

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
N = 8192 if GPU else 1024
D = 512 if GPU else 128

LOSSES = {
    "info_nce": lambda x, y, be: fastcl.info_nce(x, y, temperature=0.07, backend=be),
    "clip_loss": lambda x, y, be: fastcl.clip_loss(x, y, 1 / 0.07, backend=be),
    "nt_xent": lambda x, y, be: fastcl.nt_xent(x, y, temperature=0.5, backend=be),
    "supcon": lambda x, y, be: fastcl.supcon(torch.stack([x, y], 1), backend=be),
    "dcl": lambda x, y, be: fastcl.dcl(x, y, backend=be),
    "hard_negative_nce": lambda x, y, be: fastcl.hard_negative_nce(
        x, y, temperature=0.5, beta=1.0, tau_plus=0.1, backend=be),
    "multiview_loss": lambda x, y, be: fastcl.multiview_loss(torch.stack([x, y]), temperature=0.2,
                                                             backend=be),
    "siglip_loss": lambda x, y, be: fastcl.siglip_loss(x, y, 10.0, -10.0, backend=be),
    "uniformity": lambda x, y, be: fastcl.uniformity(x, backend=be),
}
OPS = {"clip_loss": "info_nce"}


# --------------------------------------------------------------------------------------------
# the baselines compute the loss fastcl computes
# --------------------------------------------------------------------------------------------

# name -> (factory of f(q, k, scale) or None where not installed, symmetric, tolerance);
# eager casts its logits to fp32, hence its looser tolerance; torch.compile runs the eager
# function itself (and compiles for ~15 s on a CPU), so it is not repeated here
BASELINES = {
    "eager": (lambda: eager_clip, True, 1e-5),
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
    from ._common import eager_nt_xent

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


def test_pml_ntxent_refuses_cubic_memory():
    fn = pml_clip()
    if fn is None:
        pytest.skip("pytorch-metric-learning is not installed")
    x = torch.zeros(4096, 1)
    with pytest.raises(MemoryError, match="NTXentLoss would hold"):
        fn(x, x, 1.0)


def _backends():
    out = ["reference"]
    for be in ("triton", "cuda", "cpu"):
        if dispatch.why_not(be, "info_nce", DEVICE, DTYPE) is None:
            out.append(be)
    return out


def _inputs(n=N, d=D, dtype=DTYPE):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = F.normalize(torch.randn(n, d, device=DEVICE, generator=g), dim=1).to(dtype)
    y = F.normalize(torch.randn(n, d, device=DEVICE, generator=g), dim=1).to(dtype)
    return x.requires_grad_(True), y.requires_grad_(True)


def _record_peak(benchmark, fn):
    """One more call of ``fn`` with its peak memory beyond the start in ``extra_info``."""
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        benchmark.extra_info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        with RssPeak() as peak:
            fn()
        benchmark.extra_info["peak_extra_rss_bytes"] = peak.extra


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("phase", ["forward", "backward", "forward_backward"])
def test_loss(benchmark, loss, backend, phase):
    op = OPS.get(loss, loss)
    if backend != "reference" and dispatch.why_not(backend, op, DEVICE, DTYPE) is not None:
        pytest.skip(dispatch.why_not(backend, op, DEVICE, DTYPE))
    if loss == "uniformity" and backend == "reference" and not GPU:
        pytest.skip("N^2 reference at this size is not informative")
    x, y = _inputs()
    fn = LOSSES[loss]

    def forward():
        out = fn(x, y, backend)
        _sync()
        return out

    def backward(out):
        out.backward()
        _sync()

    if phase == "forward":
        with torch.no_grad():
            benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
        run = forward
    elif phase == "backward":
        benchmark.pedantic(backward, setup=lambda: ((forward(),), {}), rounds=3, warmup_rounds=1)
        run = lambda: backward(forward())  # noqa: E731
    else:
        run = lambda: backward(forward())  # noqa: E731
        benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(n=N, d=D, dtype=str(DTYPE), device=str(DEVICE))
    if phase == "forward":
        with torch.no_grad():
            _record_peak(benchmark, run)
    else:
        _record_peak(benchmark, run)


# --------------------------------------------------------------------------------------------
# scaling of the symmetric CLIP loss over N, D and dtype
# --------------------------------------------------------------------------------------------

FULL = os.environ.get("FASTCL_BENCH_GRID", "") == "full"
if GPU:
    GRID_N = [1024, 4096, 16384, 65536, 262144, 1048576]
    GRID_D = [128, 1024, 4096] if FULL else [128, 1024]
    GRID_DTYPES = [torch.bfloat16, torch.float16, torch.float32] if FULL else [torch.bfloat16]
    GRID_BYTES = 48 << 30           # inputs + gradients held by one case at most
    REFERENCE_MAX_N = 32768         # its N x N fp32 logits and their softmax: 8.6 GB
else:
    GRID_N = [1024, 4096, 16384] if FULL else [1024, 4096]
    GRID_D = [128, 512] if FULL else [128]
    GRID_DTYPES = [torch.float32, torch.bfloat16] if FULL else [torch.float32]
    GRID_BYTES = 2 << 30
    REFERENCE_MAX_N = 8192


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("d", GRID_D)
@pytest.mark.parametrize("n", GRID_N)
@pytest.mark.parametrize("backend", _backends())
def test_scaling(benchmark, backend, n, d, dtype):
    if 4 * n * d * dtype.itemsize > GRID_BYTES:
        pytest.skip(f"{n} x {d} inputs and gradients exceed this suite's memory budget")
    if backend == "reference" and n > REFERENCE_MAX_N:
        pytest.skip("the reference holds N x N logits")
    if backend != "reference" and dispatch.why_not(backend, "info_nce", DEVICE, dtype):
        pytest.skip(dispatch.why_not(backend, "info_nce", DEVICE, dtype))
    x, y = _inputs(n, d, dtype)
    scale = torch.tensor(1 / 0.07, device=DEVICE, requires_grad=True)

    def run():
        x.grad = y.grad = scale.grad = None
        fastcl.clip_loss(x, y, scale, backend=backend).backward()
        _sync()

    rounds = 3 if GPU or n <= 4096 else 1
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update(n=n, d=d, dtype=str(dtype), device=str(DEVICE),
                                flops=8 * n * n * d)
    _record_peak(benchmark, run)
