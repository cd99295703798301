"""pytest-benchmark suite: forward, backward and forward + backward of every loss and backend.

    pytest benchmarks/test_bench_losses.py --benchmark-enable              # this machine's sizes
    pytest benchmarks/test_bench_losses.py --benchmark-enable --benchmark-json out.json

Sizes are small on a CPU (the suite is a regression guard there) and large on a GPU. Peak memory
beyond the inputs goes to ``extra_info`` on GPUs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl import dispatch

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


def _inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = F.normalize(torch.randn(N, D, device=DEVICE, generator=g), dim=1).to(DTYPE)
    y = F.normalize(torch.randn(N, D, device=DEVICE, generator=g), dim=1).to(DTYPE)
    return x.requires_grad_(True), y.requires_grad_(True)


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

    if GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if phase == "forward":
        with torch.no_grad():
            benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
    elif phase == "backward":
        benchmark.pedantic(backward, setup=lambda: ((forward(),), {}), rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: backward(forward()), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(n=N, d=D, dtype=str(DTYPE), device=str(DEVICE))
    if GPU:
        benchmark.extra_info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
