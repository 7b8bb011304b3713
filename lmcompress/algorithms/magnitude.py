"""Magnitude pruning: drop the weights of smallest |W|."""

from __future__ import annotations

import torch

from lmcompress.algorithms.masks import Pattern, mask_from_scores


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern = Pattern()) -> torch.Tensor:
    """Mask of the smallest-|W| weights: one threshold per layer (unstructured), per row group (N:M)."""
    return mask_from_scores(weight.abs().float(), sparsity, pattern, per_row=False)
