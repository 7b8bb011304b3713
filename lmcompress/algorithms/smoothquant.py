"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with a per-input-channel scale.

For the linear layers ``W⁽¹⁾ … W⁽ᵏ⁾`` ([out, in] each) that read one input ``X`` ([tokens, in]), channel ``j``
gets ``s_j = max_t |X_tj|^α / max_{l,i} |W⁽ˡ⁾_ij|^(1−α)``; then ``X' = X · diag(s)⁻¹`` and every
``W' = W · diag(s)`` give ``X' W'ᵀ = X Wᵀ`` exactly. ``α ∈ [0, 1]`` sets how much of the activations'
range moves into the weights (0: none from the activations, 1: all of it). The division by ``s`` is folded
into whatever produced ``X`` (a norm's weight and bias, or a preceding linear layer's output rows), so the
model computes the same function until it is quantized (``models.smoothing`` knows, per family, where).

:class:`ChannelStats` accumulates the per-channel statistics both SmoothQuant and AWQ need. On a grid of α
(or AWQ's exponent), :func:`search_grid` tries every point and keeps the lowest loss; :func:`search_golden`
finds the same point in ``O(log n)`` trials when the loss is unimodal along the grid (Fibonacci search).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lmcompress.errors import UserError

_FLOOR = 1e-5  # channel statistics below this count as zero (dead channels keep s = 1)


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """``alpha`` as a float, or a UserError when it is not a number in [0, 1]."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number in [0, 1], got {alpha!r}", param=name) from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} must be in [0, 1], got {alpha!r}", param=name)
    return value


class ChannelStats:
    """Running per-input-channel ``max|x|``, ``Σ|x|`` and token count over batches of ``[..., in]`` inputs,
    plus the first ``keep_tokens`` input rows themselves (``samples``, float32 ``[tokens, in]``)."""

    def __init__(self, features: int, keep_tokens: int = 0) -> None:
        self.absmax = torch.zeros(features, dtype=torch.float32)
        self.abssum = torch.zeros(features, dtype=torch.float64)
        self.tokens = 0
        self.keep_tokens = keep_tokens
        self.samples = torch.zeros(0, features)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        magnitude = flat.abs()
        self.absmax = torch.maximum(self.absmax, magnitude.amax(dim=0))
        self.abssum += magnitude.sum(dim=0).double()  # float32 within a batch, float64 across batches
        self.tokens += flat.shape[0]
        if self.samples.shape[0] < self.keep_tokens:
            self.samples = torch.cat([self.samples, flat[: self.keep_tokens - self.samples.shape[0]]])

    @property
    def absmean(self) -> torch.Tensor:
        """Mean ``|x_j|`` over the tokens seen (float32)."""
        return (self.abssum / max(self.tokens, 1)).float()


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max |W_ij|`` over the output rows of every ``[out, in]`` weight, per input channel ``j``."""
    return torch.stack([w.detach().abs().float().amax(dim=0).cpu() for w in weights]).amax(dim=0)


def smoothing_scales(act_absmax: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (float32, ``[in]``) from the activations' and the
    weights' (:func:`weight_absmax`) per-channel maxima; channels with no activation or no weight keep 1."""
    alpha = check_alpha(alpha)
    w_max = w_max.float().cpu()
    a_max = act_absmax.float().cpu()
    dead = (a_max < _FLOOR) | (w_max < _FLOOR)
    s = a_max.clamp(min=_FLOOR).pow(alpha) / w_max.clamp(min=_FLOOR).pow(1.0 - alpha)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=_FLOOR))


def grid_points(grid: Sequence[float] | int) -> list[float]:
    """The points of a search grid: ``grid`` itself (each checked to lie in [0, 1]) or, for a count ``n ≥ 2``,
    ``0, 1/(n−1), …, 1``."""
    if isinstance(grid, int) and grid < 2:
        raise UserError(f"a search grid needs at least 2 points, got {grid}", param="grid")
    points = [i / (grid - 1) for i in range(grid)] if isinstance(grid, int) else [check_alpha(p) for p in grid]
    if not points:
        raise UserError("the search grid is empty", param="grid")
    return points


def search_grid(loss: Callable[[float], float], grid: Sequence[float] | int = 11) -> tuple[float, dict[float, float]]:
    """The grid point with the lowest ``loss(point)`` (the first on ties), and every loss by point.

    ``grid`` is the points themselves or a count ``n`` for ``0, 1/(n−1), …, 1``. The caller's ``loss``
    applies the candidate (e.g. smooths and quantizes a block on a copy) and measures it (e.g. the KL
    divergence of the block's logits, or its output error).
    """
    points = grid_points(grid)
    losses = {p: float(loss(p)) for p in points}
    best = min(points, key=lambda p: (losses[p], points.index(p)))
    return best, losses


def search_golden(loss: Callable[[float], float], grid: Sequence[float] | int = 11) -> tuple[float, dict[float, float]]:
    """The grid point with the lowest ``loss`` by Fibonacci search (golden-section search on the indices of the
    sorted grid), and the loss of every point it tried.

    The bracket ``(lo, lo + F_k)`` (exclusive; ``F``: 1, 2, 3, 5, 8, 13, …, the first ``F_k ≥ n + 1``; indices
    past the grid count as ``+∞``) holds the minimum. Its probes ``lo + F_{k−2}`` and ``lo + F_{k−1}`` cut it to
    ``(lo, lo + F_{k−1})`` when the left one is not worse, else to ``(lo + F_{k−2}, lo + F_k)``; either way the
    kept probe is a probe of the new bracket, so each step costs one trial, and the search ends at length 2.
    When the loss along the sorted grid strictly decreases and then strictly increases (unimodal), the point
    left is the grid's minimum, the one :func:`search_grid` finds, after about ``log_φ n`` trials (at most 5 of 11).
    Otherwise it is a local minimum; the result is the lowest loss among the points tried (first on ties).
    """
    points = sorted(grid_points(grid))
    n = len(points)
    losses: dict[float, float] = {}

    def at(i: int) -> float:
        if i >= n:
            return math.inf
        if points[i] not in losses:
            losses[points[i]] = float(loss(points[i]))
        return losses[points[i]]

    fib = [1, 2]
    while fib[-1] < n + 1:
        fib.append(fib[-1] + fib[-2])
    lo, k = -1, len(fib) - 1
    while k >= 2:
        a, b = lo + fib[k - 2], lo + fib[k - 1]
        if at(a) > at(b):
            lo = a
        k -= 1
    at(lo + 1)
    best = min(losses, key=lambda p: (losses[p], points.index(p)))
    return best, dict(sorted(losses.items()))
