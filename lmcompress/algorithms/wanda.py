"""Wanda (Sun et al., 2023): prune by |W_ij| · ||X_j||₂, compared within each output row."""

from __future__ import annotations

import torch

from lmcompress.algorithms.masks import Pattern, mask_from_scores


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Importance S_ij = |W_ij| · ||X_j||₂ from the per-input-feature squared norms ``Σ_t x_tj²``.

    Any positive rescaling of ``input_sq_norm`` (e.g. dividing by the token count) gives the same mask.
    """
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float, pattern: Pattern = Pattern()
) -> torch.Tensor:
    """Wanda mask: the lowest scores of each row (unstructured) or of each group of M inputs (N:M)."""
    return mask_from_scores(wanda_scores(weight, input_sq_norm), sparsity, pattern, per_row=True)
