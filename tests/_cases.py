"""Cases shared by the kernel tests of several backends (CPU, Triton, CUDA)."""

from __future__ import annotations

import functools

import torch

# (R, C, D, rows per slab or None for the default budget): R = 1, C = 1, slab boundaries, R != C,
# D not a multiple of 8, one-row slabs, a wide D.
SLAB_SHAPES = [
    (1, 1, 3, None),
    (1, 5, 3, None),
    (5, 1, 3, 1),
    (97, 97, 100, 32),
    (97, 61, 3, 1),
    (61, 97, 100, 96),
    (1025, 33, 7, 512),
    (1026, 9, 5, 1025),
    (130, 1030, 17, None),
    (45, 4500, 8, 40),
    (300, 257, 1000, 64),
]


# --------------------------------------------------------------------------------------------
# top-k: exact similarities and the documented tie order


def int_inputs(R, C, D, dtype=torch.float32, lo=-3, hi=3, seed=0, device="cpu"):
    """Small integers: exact dot products and many tied similarities."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (R, D), generator=g).to(dtype).to(device)
    k = torch.randint(lo, hi + 1, (C, D), generator=g).to(dtype).to(device)
    return q, k


def int_inputs_on(device):
    """:func:`int_inputs` on ``device``."""
    return functools.partial(int_inputs, device=device)


def similarities(q, k, exclude_self):
    """The fp64 similarities, the diagonal at -inf when ``exclude_self``."""
    sim = q.double() @ k.double().T
    if exclude_self:
        n = min(q.shape[0], k.shape[0])
        sim[torch.arange(n), torch.arange(n)] = float("-inf")
    return sim


def expected(q, k, kk, exclude_self):
    """Values and indices under the tie order "larger value, then smaller index" (fp64 sim)."""
    sim = similarities(q, k, exclude_self)
    # stable sort by decreasing value keeps increasing index among ties
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :kk]
    return sim.gather(1, order), order

