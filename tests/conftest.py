"""Shared test setup: Triton's interpreter on machines without a GPU, the `gpu` marker."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton (and fastcl.kernels) are imported: Triton kernels then run on
    # CPU tensors, which is how their math is checked without a GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def stats_keys(monkeypatch):
    """A list that records, for each call of the statistics op by fastcl's losses, whether the
    keys were passed as ``None`` (the symmetric path) or as a feature set."""
    from fastcl import functional

    calls = []
    real = functional.contrastive_stats

    def recording(q, k, *args, **kw):
        calls.append(k is None)
        return real(q, k, *args, **kw)

    monkeypatch.setattr(functional, "contrastive_stats", recording)
    return calls


#: rows of one slab of G in the ``slabs`` fixture at 4 bytes an element (14 at 2 bytes)
SLAB_ROWS = 7


@pytest.fixture
def slabs(monkeypatch):
    """The Triton schedule by slabs at every feature width: the backward by slabs of G
    (contrastive and SigLIP) and the forward's column statistics from per-slab partials.

    ``slabs(C)`` sets a budget of ``SLAB_ROWS`` rows of ``C`` fp32 columns (so that the small
    shapes of the tests take several slabs, the last one partial); the calls of
    ``fastcl.kernels.contrastive._bwd_slabs`` are counted in ``slabs.calls`` (the number of
    outer rows of each)."""
    from fastcl.kernels import contrastive as tk  # after the test module chose interpretation

    monkeypatch.setenv("FASTCL_TRITON_SLAB_MIN_D", "1")
    monkeypatch.setattr(tk, "_MIN_COL_PROGRAMS", 1)  # column partials even with few row blocks
    calls = []
    real = tk._bwd_slabs

    def counting(a, *args, **kw):
        calls.append(a.shape[0])
        return real(a, *args, **kw)

    monkeypatch.setattr(tk, "_bwd_slabs", counting)

    def set_budget(C):
        padded = -(-C // tk._ROW_PAD) * tk._ROW_PAD
        monkeypatch.setenv("FASTCL_TRITON_SLAB_BYTES", str(SLAB_ROWS * padded * 4))

    set_budget.calls = calls
    return set_budget


@pytest.fixture
def accumulated(slabs, monkeypatch):
    """The ``slabs`` schedule with ``SLAB_ACCUMULATE``: the gradient of the columns accumulated
    from the slabs of rows (one sweep, ``slabs.calls`` holds one entry per backward)."""
    monkeypatch.setenv("FASTCL_TRITON_SLAB_ACCUMULATE", "1")
    return slabs
