"""Compression algorithms as pure tensor functions: weights + calibration statistics → masks / weights.

Nothing here knows about models, blocks or files; see ``lmcompress.calibration.engine`` for the machinery that
walks a model and feeds these functions.
"""

from lmcompress.algorithms.magnitude import magnitude_mask
from lmcompress.algorithms.masks import Pattern, mask_from_scores
from lmcompress.algorithms.owl import outlier_ratio, owl_allocation, owl_layer_sparsities
from lmcompress.algorithms.sparsegpt import sparsegpt_prune
from lmcompress.algorithms.wanda import wanda_mask, wanda_scores

__all__ = [
    "Pattern",
    "magnitude_mask",
    "mask_from_scores",
    "outlier_ratio",
    "owl_allocation",
    "owl_layer_sparsities",
    "sparsegpt_prune",
    "wanda_mask",
    "wanda_scores",
]
