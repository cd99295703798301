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
