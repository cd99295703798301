"""A pytest plugin that runs the GPU tests of the CUDA C++ kernels on a machine without a GPU,
against the C++ CPU kernels.

The CUDA functions of ``fastcl._C`` (``contrastive_{fwd,bwd,fused}_cuda``,
``siglip_{fwd,bwd,fused}_cuda``) have the signatures and the contract of their CPU twins
(``*_cpu``). With this plugin every ``*_cuda`` function of the extension is the ``*_cpu`` one and
the suites' device is the CPU, so that the ``gpu``-marked tests of ``tests/test_cuda_*.py`` check
their own cases, calls and oracle comparisons, and the agreement of the two backends' contracts,
where they could otherwise not run at all. The CUDA kernels themselves are not run. Left out:
the tests without the ``gpu`` marker (they check the CUDA binding itself and run in the plain
suite) and those marked ``device_only`` (device memory, real sizes, the public losses through the
GPU backends' dispatch)::

    PYTHONPATH=tests python -m pytest -p gpu_tests_on_cpu tests/test_cuda_contrastive.py \\
        tests/test_cuda_siglip.py
"""

from __future__ import annotations

import pytest

import _cuda_cases

_cuda_cases.DEVICE = "cpu"

try:
    from fastcl import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

if _C is not None:
    for _name in dir(_C):
        if _name.endswith("_cpu") and hasattr(_C, _name[:-4] + "_cuda"):
            setattr(_C, _name[:-4] + "_cuda", getattr(_C, _name))


@pytest.fixture
def slab_bytes(monkeypatch):
    """The suites' slab budget, given to the CPU kernels too."""
    def set_(n):
        monkeypatch.setenv("FASTCL_CUDA_SLAB_BYTES", str(n))
        monkeypatch.setenv("FASTCL_CPU_SLAB_BYTES", str(n))
    return set_


_cuda_cases.slab_bytes = slab_bytes  # imported by the suites after this plugin


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    keep = [item for item in items
            if "gpu" in item.keywords and "device_only" not in item.keywords]
    for item in keep:  # the GPU tests were skipped for want of a GPU: run them here
        item.own_markers = [m for m in item.own_markers if m.name != "skip"]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
