"""OWL (Yin et al., 2024): outlier-weighed layerwise sparsity.

Blocks that hold a larger share of outlier features — Wanda scores ``|W|·||X||`` more than ``M`` times
the block's mean score — are pruned less. With the outlier ratios ``D_l`` of the ``L`` blocks,
min–max normalized to ``[0, 2λ]`` as ``r_l``, block ``l`` gets sparsity ``s_l = S − (r_l − mean(r))``:
the spread between the least and most pruned block is ``2λ`` and the mean equals the target ``S``.
No block may exceed ``max_sparsity`` (0.99 by default, never 100%) nor go below 0: when one would, the
offsets are scaled down together, which shrinks the effective λ and keeps the mean at ``S``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAX_BLOCK_SPARSITY = 0.99  # OWL never prunes a block harder than this (or the target, if that is higher)


@dataclass
class OwlAllocation:
    """Per-block sparsities and the λ they really use (``lam`` shrunk when a block hit a bound)."""

    sparsities: list[float]
    lam: float
    shrunk: bool


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (one block's Wanda scores) above ``m`` × their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return (flat > m * flat.mean()).float().mean().item()


def owl_allocation(
    ratios: list[float], target: float, lam: float, max_sparsity: float = MAX_BLOCK_SPARSITY
) -> OwlAllocation:
    """Per-block sparsity from the blocks' outlier ratios; the mean is exactly ``target``.

    Every value lies in ``[0, max(max_sparsity, target)]``: if one would not, the whole allocation is shrunk
    towards ``target`` (keeping its mean) until it fits, rather than clipped, which would move the mean. The
    shrink is logged as a warning and reported as the effective ``lam``.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    if not 0.0 < max_sparsity < 1.0:
        raise ValueError(f"max_sparsity must be in (0, 1), got {max_sparsity}")
    r = torch.tensor(ratios, dtype=torch.float64)
    if len(ratios) < 2 or r.max() == r.min() or lam == 0:
        return OwlAllocation([float(target)] * len(ratios), float(lam), False)
    r = (r - r.min()) / (r.max() - r.min()) * (2 * lam)
    offsets = -(r - r.mean())
    hi, lo = offsets.max().item(), offsets.min().item()
    limit = max(max_sparsity, target)
    scale = 1.0
    if target + hi > limit:
        scale = min(scale, (limit - target) / hi)
    if target + lo < 0.0:
        scale = min(scale, -target / lo)
    sparsities = [min(max(float(target + scale * o), 0.0), limit) for o in offsets]
    if scale < 1.0:
        log.warning(
            "OWL: λ %.4g would push a block's sparsity outside [0, %.3g] at target %.3g; shrunk to λ %.4g "
            "(block sparsities %.3f..%.3f)",
            lam,
            limit,
            target,
            lam * scale,
            min(sparsities),
            max(sparsities),
        )
    return OwlAllocation(sparsities, float(lam * scale), scale < 1.0)


def owl_layer_sparsities(
    ratios: list[float], target: float, lam: float, max_sparsity: float = MAX_BLOCK_SPARSITY
) -> list[float]:
    """The sparsities of :func:`owl_allocation`."""
    return owl_allocation(ratios, target, lam, max_sparsity).sparsities
