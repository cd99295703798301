"""A pytest plugin that runs the GPU tests of the CUDA C++ backend on a machine without a GPU.

The CUDA functions of ``fastcl._C`` (``contrastive_{fwd,bwd,fused}_cuda``,
``siglip_{fwd,bwd,fused}_cuda``) are replaced for the process, and the suites' device becomes
the CPU, so that the ``gpu``-marked tests of ``tests/test_cuda_*.py`` run their own cases and
oracle comparisons. ``--cuda-kernels`` chooses the replacement:

- ``emulated`` (the default): the CUDA backend itself, its drivers and its kernels, compiled for
  the CUDA emulation of ``tests/cuda_emulation`` (``tests/_cuda_emulation.py``; the first run
  compiles it, about two minutes): the kernels' own code runs, thread by thread, on CPU tensors;
  with ``--cuda-sanitize``, its sanitized build, which checks every memory access of the
  drivers and kernels against the bounds of its allocation and the alignment of every vector
  load and store (run under the preload that ``_cuda_emulation.asan_preload()`` names, with
  ``ASAN_OPTIONS=detect_leaks=0``, as ``make test`` does);
- ``cpu``: the C++ CPU twins (``*_cpu``, the same signatures and contract), which checks the
  suites and the agreement of the two backends' contracts, not the CUDA code.

Left out: the tests without the ``gpu`` marker (they check the CUDA binding itself and run in
the plain suite) and those marked ``device_only`` (device memory, real sizes, the public losses
through the GPU backends' dispatch)::

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


def pytest_addoption(parser):
    parser.addoption("--cuda-kernels", choices=("emulated", "cpu"), default="emulated",
                     help="what runs in place of the CUDA functions of fastcl._C: the CUDA "
                          "backend under the CUDA emulation, or the CPU kernels")
    parser.addoption("--cuda-sanitize", action="store_true",
                     help="the emulation's AddressSanitizer build (the process must preload the "
                          "sanitizer: see tests/_cuda_emulation.asan_preload)")


def pytest_configure(config):
    if _C is None:
        return
    if config.getoption("--cuda-kernels") == "emulated":
        import _cuda_emulation

        source = _cuda_emulation.load(sanitize=config.getoption("--cuda-sanitize"))
        names = [n for n in dir(source) if n.endswith("_cuda") or n == "cuda_slab_bytes"]
        replacement = {n: getattr(source, n) for n in names}
    else:
        replacement = {n[:-4] + "_cuda": getattr(_C, n) for n in dir(_C)
                       if n.endswith("_cpu") and hasattr(_C, n[:-4] + "_cuda")}
    for name, fn in replacement.items():
        setattr(_C, name, fn)


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
