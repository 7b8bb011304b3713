"""OWL (Yin et al., 2024): outlier-weighed layerwise sparsity.

Blocks that hold a larger share of outlier features — Wanda scores ``|W|·||X||`` more than ``M`` times
the block's mean score — are pruned less. With the outlier ratios ``D_l`` of the ``L`` blocks,
min–max normalized to ``[0, 2λ]`` as ``r_l``, block ``l`` gets sparsity ``s_l = S − (r_l − mean(r))``:
the spread between the least and most pruned block is ``2λ`` and the mean equals the target ``S``.
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (one block's Wanda scores) above ``m`` × their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return (flat > m * flat.mean()).float().mean().item()


def owl_layer_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier ratios; the mean is exactly ``target``.

    If a value would leave ``[0, 1)`` the whole allocation is shrunk towards ``target`` (keeping its
    mean) until it fits, rather than clipping, which would move the mean.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    if len(ratios) < 2 or spread == 0:
        return [float(target)] * len(ratios)
    r = (r - r.min()) / spread * (2 * lam)
    offsets = -(r - r.mean())
    hi, lo = offsets.max().item(), offsets.min().item()
    limit = 1.0 - 1e-6
    scale = 1.0
    if target + hi > limit:
        scale = min(scale, (limit - target) / hi)
    if target + lo < 0.0:
        scale = min(scale, -target / lo)
    return [float(target + scale * o) for o in offsets]
