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
