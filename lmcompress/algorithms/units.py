"""Structured pruning math: which FFN channels / attention heads to remove, and how to repair the layer after.

A *unit* is what gets removed as a whole: one FFN intermediate channel, or one attention head (one KV group
of heads under grouped-query attention). Every unit owns a contiguous slice of ``unit_size`` input columns
of the layer that reads the units (``down_proj`` / ``fc2`` for channels, ``o_proj`` / ``dense`` for heads),
and some rows of the layers that produce them. Importance is measured on that reading layer ``W [out, d]``
with statistics of its inputs ``x ∈ R^d`` over calibration tokens:

- ``wanda``: Σ over the unit's columns and all rows of ``|W_ij| · ‖x_j‖₂`` (Wanda's score, summed per unit).
- ``magnitude``: ``‖W[:, unit]‖_F · ‖W_in[unit rows]‖_F``, the weight norms on both sides of the unit
  (no calibration data needed).
- ``fluctuation`` (FLAP, An et al. 2024): Σ over the unit's columns of ``Var(x_j) · ‖W[:, j]‖₂²``: how much
  the unit's contribution varies around its mean, which bias compensation cannot restore.

After removing the columns ``R`` (keeping ``S``) the reading layer can be corrected from the same statistics:

- ``bias`` (FLAP's baseline compensation): ``b' = b + W_R · E[x_R]``, the removed units' mean contribution.
- ``lstsq``: ``W'_S = argmin E‖W x − W'_S x_S‖² + λ‖W'_S‖²`` (ridge), i.e. ``W'_S = W M_{:,S} (M_SS + λI)⁻¹``
  with ``M = E[x xᵀ]``. If the layer has a bias the fit is affine: ``M`` is replaced by the covariance and
  the bias absorbs the means, ``b' = b + W μ − W'_S μ_S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CRITERIA = ("wanda", "magnitude", "fluctuation")
CORRECTIONS = ("none", "bias", "lstsq")


class UnitStats:
    """Sums over calibration tokens of the inputs ``x ∈ R^d`` of a reading layer: ``Σ x`` and ``Σ x xᵀ``."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", covariance: bool = True) -> None:
        self.tokens = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device) if covariance else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sum += x.sum(0).double()
        self.sq_sum += (x * x).sum(0).double()
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    @property
    def variance(self) -> torch.Tensor:
        """Per-feature sample variance (``n − 1`` denominator)."""
        n = max(self.tokens, 2)
        return ((self.sq_sum - self.sum * self.sum / n) / (n - 1)).clamp_min(0).float()

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x xᵀ]``."""
        if self.xtx is None:
            raise RuntimeError("x xᵀ was not collected")
        return self.xtx / max(self.tokens, 1)


def _per_unit(values: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Sum a per-column vector ``[d]`` over consecutive groups of ``unit_size`` columns → ``[d / unit_size]``."""
    return values.reshape(-1, unit_size).sum(1)


def unit_scores(
    criterion: str,
    w_out: torch.Tensor,
    stats: UnitStats | None = None,
    *,
    unit_size: int = 1,
    w_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of each unit (higher = keep); ``w_out`` is the reading layer ``[out, d]``.

    ``w_in`` (``[units, k]``: all weights producing each unit, flattened per unit) is used by ``magnitude``.
    """
    w = w_out.float()
    if w.shape[1] % unit_size:
        raise ValueError(f"{w.shape[1]} input columns do not split into units of {unit_size}")
    if criterion == "magnitude":
        score = _per_unit(w.pow(2).sum(0), unit_size).sqrt()
        if w_in is not None:
            score = score * w_in.float().reshape(score.shape[0], -1).norm(dim=1)
        return score
    if stats is None:
        raise ValueError(f"criterion {criterion!r} needs calibration statistics")
    if criterion == "wanda":
        return _per_unit(w.abs().sum(0) * stats.sq_sum.float().sqrt(), unit_size)
    if criterion == "fluctuation":
        return _per_unit(stats.variance * w.pow(2).sum(0), unit_size)
    raise ValueError(f"unknown criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")


def units_to_keep(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Sorted indices of the units kept when the ``n_remove`` lowest-scoring units go (ties: lower index kept)."""
    n = scores.numel()
    if not 0 <= n_remove < n:
        raise ValueError(f"cannot remove {n_remove} of {n} units (at least one must stay)")
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[: n - n_remove].sort().values


def unit_columns(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Column (or row) indices of ``units`` when each owns ``unit_size`` consecutive ones."""
    return (units.unsqueeze(1) * unit_size + torch.arange(unit_size, device=units.device)).flatten()


@dataclass
class Correction:
    weight: torch.Tensor  # new reading-layer weight [out, |S|]
    bias: torch.Tensor | None  # new bias [out], or None if the layer stays without one


def bias_correction(w_out: torch.Tensor, bias: torch.Tensor | None, stats: UnitStats, keep: torch.Tensor) -> Correction:
    """FLAP baseline compensation: the removed columns' mean contribution ``W_R E[x_R]`` moves into the bias."""
    w = w_out.float()
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    removed[keep] = False
    base = w[:, removed] @ stats.mean.to(w.device)[removed]
    new_bias = base if bias is None else bias.float() + base
    return Correction(w[:, keep].clone(), new_bias)


def lstsq_correction(
    w_out: torch.Tensor, bias: torch.Tensor | None, stats: UnitStats, keep: torch.Tensor, damp: float = 0.01
) -> Correction:
    """Ridge least-squares refit of the kept columns so that ``W'_S x_S (+ b')`` best matches ``W x (+ b)``.

    Without a bias the fit uses the raw second moments (the kept inputs also stand in for the removed ones'
    mean); with a bias it is affine (covariance) and the bias absorbs the mean. ``damp`` is λ as a fraction
    of the mean diagonal of the kept block; it is raised tenfold until the system is positive definite.
    """
    w = w_out.float()
    m = stats.second_moment.to(w.device).double()
    mu = stats.mean.to(w.device).double()
    if bias is not None:
        m = m - torch.outer(mu, mu)
    m_ss = m[keep][:, keep]
    rhs = m[keep] @ w.double().t()  # M_S: · Wᵀ  → [|S|, out]
    scale = m_ss.diagonal().mean().clamp_min(1e-12)
    lam = damp
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(m_ss + lam * scale * torch.eye(len(keep), dtype=m.dtype, device=m.device))
        if info == 0:
            break
        lam *= 10
    else:
        raise RuntimeError("least-squares correction: the kept inputs' moment matrix is not positive definite")
    new_w = torch.cholesky_solve(rhs, chol).t()  # [out, |S|]
    new_bias = None
    if bias is not None:
        new_bias = (bias.double() + w.double() @ mu - new_w @ mu[keep]).float()
    return Correction(new_w.float(), new_bias)


def correct(
    method: str,
    w_out: torch.Tensor,
    bias: torch.Tensor | None,
    stats: UnitStats | None,
    keep: torch.Tensor,
    damp: float = 0.01,
) -> Correction:
    """The reading layer after dropping all but columns ``keep``, with the correction ``method``."""
    if method == "none":
        return Correction(w_out.float()[:, keep].clone(), None if bias is None else bias.float().clone())
    if stats is None:
        raise ValueError(f"correction {method!r} needs calibration statistics")
    if method == "bias":
        return bias_correction(w_out, bias, stats, keep)
    if method == "lstsq":
        return lstsq_correction(w_out, bias, stats, keep, damp)
    raise ValueError(f"unknown correction {method!r}: choose one of {', '.join(CORRECTIONS)}")
