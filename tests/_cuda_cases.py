"""Helpers shared by the tests of the CUDA kernels of ``fastcl._C`` (``test_cuda_*.py``)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _cases import SLAB_SHAPES  # noqa: F401 - the CUDA tests take it from here

DEVICE = "cuda"


def nvcc_found() -> bool:
    """Whether the build could find nvcc (``CUDA_HOME`` / ``CUDA_PATH`` or the PATH)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def cuda_build_expected() -> bool:
    """Whether ``pip install -e .`` here builds the CUDA kernels (setup.py's condition)."""
    return (torch.version.cuda is not None and nvcc_found()
            and os.environ.get("FASTCL_BUILD_CUDA", "1") != "0")


def extension_with(name: str, what: str):
    """``fastcl._C`` if it binds ``name``, else skip the test (``what``: the kernels missing)."""
    try:
        from fastcl import _C
    except ImportError:
        _C = None
    if _C is None or not hasattr(_C, name):
        pytest.skip(f"fastcl._C has no {what} (built without nvcc)")
    return _C


def assert_cuda_build(ext) -> None:
    """Where nvcc and a CUDA torch are present, the extension must have been built with CUDA."""
    if cuda_build_expected():
        assert ext.WITH_CUDA, ("nvcc and a CUDA build of torch are present but fastcl._C was "
                               "built without CUDA: rebuild with `pip install "
                               "--no-build-isolation -e .`")


def peak_extra_memory(run, n, budget, monkeypatch):
    """``(extra, out)``: the peak CUDA memory ``out = run(n)`` allocates beyond what was allocated
    before it, under a slab budget of ``budget`` bytes. ``run(64)`` first goes over several small
    slabs: cuBLAS workspaces are allocated on first use and kept."""
    monkeypatch.setenv("FASTCL_CUDA_SLAB_BYTES", str(16 * 64 * 4))
    run(64)
    monkeypatch.setenv("FASTCL_CUDA_SLAB_BYTES", str(budget))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run(n)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


def padded(C: int) -> int:
    """Elements per row of a slab of C logits (rows are padded to multiples of 8)."""
    return (C + 7) // 8 * 8


@pytest.fixture
def slab_bytes(monkeypatch):
    """``slab_bytes(n)`` sets the CUDA kernels' slab budget (read at every call) for one test."""
    def set_(n):
        monkeypatch.setenv("FASTCL_CUDA_SLAB_BYTES", str(n))
    return set_
