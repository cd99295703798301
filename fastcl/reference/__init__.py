"""fastcl.reference: the plain-PyTorch oracle of every fastcl loss and of the fused primitive.

Nothing here imports the rest of fastcl; every kernel and public loss is tested against it.
"""

from .contrastive import contrastive_masks_ref, contrastive_stats_ref
from .losses import (
    alignment_ref,
    dcl_ref,
    hard_negative_nce_ref,
    info_nce_ref,
    multiview_ref,
    nt_xent_ref,
    siglip_ref,
    supcon_ref,
    topk_similarity_ref,
    uniformity_ref,
)

__all__ = [
    "contrastive_stats_ref",
    "contrastive_masks_ref",
    "info_nce_ref",
    "nt_xent_ref",
    "supcon_ref",
    "multiview_ref",
    "hard_negative_nce_ref",
    "dcl_ref",
    "siglip_ref",
    "alignment_ref",
    "uniformity_ref",
    "topk_similarity_ref",
]
