"""fastcl: fused, linear-memory contrastive losses for PyTorch.

The losses (InfoNCE, symmetric CLIP, NT-Xent, SupCon, multi-view, hard-negative, DCL, SigLIP,
alignment / uniformity) and tiled top-k similarity, computed without ever materializing the
N x M similarity matrix, on Triton, CUDA C++ or C++ CPU kernels, with a plain-PyTorch reference
(:mod:`fastcl.reference`) as the oracle. See ``python -m fastcl info`` for the backends of this
machine.
"""

from .dispatch import BackendUnavailableError
from .functional import (
    alignment,
    clip_loss,
    dcl,
    hard_negative_nce,
    info_nce,
    multiview_loss,
    nt_xent,
    siglip_loss,
    supcon,
    topk_similarity,
    uniformity,
)

__version__ = "0.1.0"

__all__ = [
    "info_nce",
    "clip_loss",
    "nt_xent",
    "supcon",
    "multiview_loss",
    "hard_negative_nce",
    "dcl",
    "siglip_loss",
    "alignment",
    "uniformity",
    "topk_similarity",
    "BackendUnavailableError",
    "__version__",
]
