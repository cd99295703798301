"""pytest-benchmark suite: forward, backward and forward + backward of every loss and backend.

    pytest benchmarks/test_bench_losses.py --benchmark-enable              # this machine's sizes
    pytest benchmarks/test_bench_losses.py --benchmark-enable --benchmark-json out.json
    FASTCL_BENCH_GRID=full pytest benchmarks/test_bench_losses.py --benchmark-enable

That every baseline of :mod:`benchmarks._common` computes the loss fastcl computes (value and
gradients, fp64), so that the timings compare the same work, is checked by
``tests/test_benchmark_baselines.py`` (run in the test suite, and by ``make bench`` first).
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

from ._common import RssPeak

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
