"""The tiled similarity search as a ``torch.library`` custom op.

``fastcl::topk_fwd(query, key, k, exclude_self, backend)`` returns ``(values, indices)`` of
shape ``[N, k]``: the ``k`` largest ``<q_i, key_j>`` of every query in decreasing order (fp32;
fp64 for fp64 inputs on the ``"torch"`` backend) and their key indices (int64). The op has no
autograd: its outputs carry no gradient (it serves hard-negative mining, whose indices select
rows that are then scored differentiably). A fake kernel makes it traceable by
``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends

__all__ = ["topk_fwd"]


@torch.library.custom_op("fastcl::topk_fwd", mutates_args=())
def topk_fwd(query: Tensor, key: Tensor, k: int, exclude_self: bool,
             backend: str) -> tuple[Tensor, Tensor]:
    """``(values [N, k], indices [N, k])`` of the ``k`` largest similarities of each query."""
    return _backends.kernel(backend, "topk_fwd")(query, key, k, exclude_self)


@topk_fwd.register_fake
def _(query, key, k, exclude_self, backend):
    dt = torch.float64 if query.dtype == torch.float64 else torch.float32
    n = query.shape[0]
    return query.new_empty((n, k), dtype=dt), query.new_empty((n, k), dtype=torch.int64)
