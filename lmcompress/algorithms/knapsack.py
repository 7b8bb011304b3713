"""The allocation that minimises an additive loss under a budget: a multiple-choice knapsack solved exactly.

Given ``value[u][l]`` (the predicted loss of unit ``u`` at level ``l``, ``inf`` where a level is not allowed) and a
:class:`~lmcompress.algorithms.evolution.LevelSpace` (``cost[u][l]``, a budget and a slack), find levels ``x`` with
``budget − slack ≤ Σ_u cost[u][x_u] ≤ budget`` that minimise ``Σ_u value[u][x_u]``.

Costs are measured in a *grain* ``q``: the largest number such that every cost's distance from its unit's
level-0 cost is an integer multiple of it (found from the smallest step, within a relative ``1e-6``), so the
savings ``s[u][l] = (cost[u][0] − cost[u][l]) / q`` are integers and dynamic programming over the total saving is
exact: ``best_u(t) = min_l best_{u−1}(t − s[u][l]) + value[u][l]``. Sparsity levels on units whose sizes are
commensurate (SmolLM2's and LLaMA-3's layers: q, k, v, o and MLP sizes are multiples of one) give small integer
savings (units × levels × total saving, vectorised over the saving). Where the costs are not commensurate at a
grain small enough to keep the table under ``max_cells``, ``None`` is returned and the caller falls back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lmcompress.algorithms.evolution import LevelSpace

MAX_CELLS = 50_000_000  # units × (total saving + 1): the largest table solved


def _grain(space: LevelSpace) -> float | None:
    """The common step ``q`` of all savings, or None when they are not commensurate (within 1e-6 relative)."""
    savings = [c[0] - v for c in space.cost for v in c]
    positive = sorted(s for s in savings if s > 1e-9 * max(1.0, abs(space.budget)))
    if not positive:
        return None
    step = positive[0]
    for divisor in range(1, 65):  # the smallest saving may itself be a multiple of the grain (e.g. 3 q)
        q = step / divisor
        if all(abs(s / q - round(s / q)) <= 1e-6 * max(1.0, s / q) for s in positive):
            return q
    return None


def knapsack(space: LevelSpace, value: Sequence[Sequence[float]], max_cells: int = MAX_CELLS) -> list[int] | None:
    """Levels on the budget of ``space`` with the least ``Σ_u value[u][x_u]`` (ties: the lower total cost's
    first level found), or None when the costs are not commensurate or the table would exceed ``max_cells``
    (see the module docstring). Raises ``ValueError`` when no allowed (finite-valued) allocation meets the budget.
    """
    units, levels = space.units, space.levels
    if len(value) != units or any(len(row) != levels for row in value):
        raise ValueError(f"value must be {units} units × {levels} levels")
    q = _grain(space)
    if q is None:
        return None
    save = [[round((c[0] - v) / q) for v in c] for c in space.cost]
    top = sum(max(row) for row in save)
    if units * (top + 1) > max_cells:
        return None
    base = sum(c[0] for c in space.cost)  # every unit at level 0
    # the totals on the budget, in saved grains: cost = base − t·q ∈ [budget − slack, budget] (with tolerance)
    lo = math.ceil((base - space.budget - space.tolerance) / q - 1e-6)
    hi = math.floor((base - space.budget + space.slack + space.tolerance) / q + 1e-6)
    inf = float("inf")
    best = torch.full((top + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros(units, top + 1, dtype=torch.int16)
    reach = 0  # the largest saving reachable so far
    for u in range(units):
        new = torch.full((top + 1,), inf, dtype=torch.float64)
        pick = torch.zeros(top + 1, dtype=torch.int16)
        for lv in range(levels):
            v = float(value[u][lv])
            if not math.isfinite(v):
                continue
            s = save[u][lv]
            shifted = best[: reach + 1] + v
            window = new[s : s + reach + 1]
            better = shifted < window
            window[better] = shifted[better]
            pick[s : s + reach + 1][better] = lv
        reach += max(save[u])
        best, choice[u] = new, pick
    lo, hi = max(lo, 0), min(hi, top)
    if lo > hi or not torch.isfinite(best[lo : hi + 1]).any():
        raise ValueError("no allowed allocation meets the budget")
    t = lo + int(torch.argmin(best[lo : hi + 1]))
    out = [0] * units
    for u in range(units - 1, -1, -1):
        lv = int(choice[u, t])
        out[u] = lv
        t -= save[u][lv]
    return out
