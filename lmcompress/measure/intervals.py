"""95% confidence intervals for the numbers eval reports: means over windows or examples, and proportions.

- :func:`mean_interval`: Student-t interval of a mean, ``mean ± t(0.975, n−1) · sd / √n`` (sample sd).
  Used for per-window quantities (mean NLL per window, mean KL per window) and graded per-example scores (F1).
- :func:`wilson_interval`: Wilson score interval of a proportion ``k / n`` (accuracies, exact match); unlike
  ``p ± z·se`` it stays inside ``[0, 1]`` and is not empty at ``p = 0`` or ``1``.

Both return ``None`` where no interval exists (fewer than two values, or no examples).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

LEVEL = 0.95


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (``q`` in (0.5, 1)) of Student's t with ``df`` degrees of freedom.

    Solves ``F(x) = q`` by bisection, ``F(x) = 1/2 + ∫₀ˣ f(t) dt`` with the density
    ``f(t) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + t²/ν)^(−(ν+1)/2)`` integrated by Simpson's rule.
    """
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"need 0.5 < q < 1 and df >= 1, got {q}, {df}")
    if df > 1000:
        return NormalDist().inv_cdf(q)
    nu = float(df)
    log_c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 2001)
        f = np.exp(log_c - (nu + 1) / 2 * np.log1p(t * t / nu))
        h = x / 2000
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values, level: float = LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean of ``values`` (a sample); ``None`` for fewer than two values."""
    x = np.asarray(list(values), dtype=np.float64)
    n = x.size
    if n < 2:
        return None
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def wilson_interval(successes: float, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Wilson score interval of the proportion ``successes / n``; ``None`` for ``n = 0``.

    ``(p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the normal quantile at ``(1+level)/2``.
    """
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes <= 0 else max(0.0, center - half)
    return (low, 1.0 if successes >= n else min(1.0, center + half))


def exp_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """``exp`` of both ends (a mean-NLL interval becomes a perplexity interval)."""
    return None if interval is None else (math.exp(interval[0]), math.exp(interval[1]))


def overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two intervals overlap (missing intervals count as overlapping: nothing can be told apart)."""
    if a is None or b is None:
        return True
    return a[0] <= b[1] and b[0] <= a[1]
