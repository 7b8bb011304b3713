"""Low-rank factorization of a weight matrix by truncated SVD, plain or activation-aware.

A Linear ``W`` (``[out, in]``) becomes ``up @ down`` with ``up`` ``[out, r]`` and ``down`` ``[r, in]``, which
has fewer parameters only when ``r · (in + out) < in · out``.

Activation-aware (whitened) SVD, as in SVD-LLM: with calibration inputs ``X`` (rows are tokens) the output
error of a replacement ``W'`` is ``||(W − W') Xᵀ||²_F = ||(W − W') S||²_F`` for any ``S`` with ``S Sᵀ = XᵀX``
(``S`` = Cholesky factor). So the best rank-``r`` ``W'`` truncates the SVD of ``W S = U Σ Vᵀ`` and undoes the
whitening: ``W' = (U_r Σ_r)(V_rᵀ S⁻¹)``. A diagonal ``S`` (per-input RMS) is the cheaper approximation.
With whitening the singular values measure output energy on the calibration data, not weight energy.

Rank policies read the singular values ``σ₁ ≥ σ₂ ≥ …``:

* energy ``f``: the smallest ``r`` with ``Σ_{i≤r} σᵢ² ≥ f · Σ_i σᵢ²`` (fraction of the squared Frobenius norm);
* threshold ``τ`` (WeLore-style, shared by all layers): ``r = #{i : σᵢ/σ₁ ≥ τ}``. A layer whose spectrum decays
  fast gets a low rank; a flat one keeps a rank too high to save anything and stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVD:
    """``W S = U diag(sigma) Vh`` with ``scale`` = ``S`` (``None``: plain SVD; 1-D: diagonal; 2-D: lower triangular)."""

    U: torch.Tensor  # [out, k]
    sigma: torch.Tensor  # [k], descending
    Vh: torch.Tensor  # [k, in]
    scale: torch.Tensor | None = None


def break_even_rank(n_in: int, n_out: int) -> int:
    """The largest rank whose factors have fewer parameters than the dense ``[out, in]`` matrix (may be 0)."""
    return (n_in * n_out - 1) // (n_in + n_out)


def saves_params(rank: int, n_in: int, n_out: int) -> bool:
    return rank > 0 and rank * (n_in + n_out) < n_in * n_out


def cholesky_scale(xtx: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S Sᵀ = XᵀX + λI``, ``λ = damp · mean diag`` (raised until it factors)."""
    xtx = xtx.double()
    n = xtx.shape[0]
    eye = torch.eye(n, dtype=xtx.dtype, device=xtx.device)
    mean_diag = xtx.diagonal().mean().clamp_min(1e-12)
    # dead inputs (never nonzero) would make XᵀX singular; give them the mean so that S stays invertible
    dead = xtx.diagonal() <= 0
    xtx = xtx + torch.diag(dead.to(xtx.dtype) * mean_diag)
    lam = damp * mean_diag
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(xtx + lam * eye)
        if int(info) == 0:
            return chol.float()
        lam = lam * 10 if lam > 0 else 1e-6 * mean_diag
    raise ValueError("XᵀX could not be factored even with strong dampening; use diagonal whitening")


def diagonal_scale(sq_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per-input RMS ``sqrt(mean x²)`` (the diagonal of ``(XᵀX/n)^{1/2}``), floored to stay invertible."""
    rms = (sq_sum.float() / max(tokens, 1)).sqrt()
    return rms.clamp_min(max(rms.max().item(), 1e-12) * 1e-4)


def whitened_svd(weight: torch.Tensor, scale: torch.Tensor | None = None) -> SVD:
    """SVD of ``W S`` (``W`` itself when ``scale`` is ``None``), in float32 (float64 for small matrices)."""
    w = weight.double() if weight.numel() <= 4_000_000 else weight.float()
    if scale is None:
        ws = w
    elif scale.dim() == 1:
        ws = w * scale.to(w)
    else:
        ws = w @ scale.to(w)
    U, sigma, Vh = torch.linalg.svd(ws, full_matrices=False)
    return SVD(U, sigma, Vh, scale)


def factors(svd: SVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in])`` with ``up @ down`` the best rank-``r`` fit (whitening undone).

    The singular values are split evenly (``√σ`` on each side) so both factors have similar ranges.
    """
    root = svd.sigma[:rank].sqrt()
    up = svd.U[:, :rank] * root
    down = root[:, None] * svd.Vh[:rank]
    if svd.scale is not None:
        if svd.scale.dim() == 1:
            down = down / svd.scale.to(down)
        else:  # down · S⁻¹ by a triangular solve (X S = B)
            down = torch.linalg.solve_triangular(svd.scale.to(down), down, upper=False, left=False)
    return up.float(), down.float()


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` keeping a fraction ``energy`` of ``Σσ²`` (at least 1)."""
    sq = sigma.double().pow(2)
    total = sq.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    r = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1
    return min(max(r, 1), sigma.numel())


def threshold_rank(sigma: torch.Tensor, tau: float) -> int:
    """``#{i : σᵢ / σ₁ ≥ τ}`` (at least 1)."""
    if sigma.numel() == 0 or sigma[0] <= 0:
        return 1
    return max(1, int((sigma / sigma[0] >= tau).sum().item()))


def kept_energy(sigma: torch.Tensor, rank: int) -> float:
    sq = sigma.double().pow(2)
    return float(sq[:rank].sum() / sq.sum().clamp_min(1e-300))


def params_after(rank: int, n_in: int, n_out: int) -> int:
    """Parameters of the layer after the policy: factors if they save, else the dense matrix."""
    return rank * (n_in + n_out) if saves_params(rank, n_in, n_out) else n_in * n_out


def auto_threshold(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], target: float) -> float:
    """The smallest shared threshold ``τ`` whose ranks save at least ``target`` of the layers' parameters.

    ``shapes`` are ``(in, out)`` of each layer. Layers whose rank at ``τ`` would not save parameters stay
    dense (count as no saving). Saving grows with ``τ``, so ``τ`` is found by bisection on ``[0, 1]``.
    """
    total = sum(i * o for i, o in shapes)

    def saving(tau: float) -> float:
        after = sum(params_after(threshold_rank(s, tau), i, o) for s, (i, o) in zip(spectra, shapes, strict=True))
        return 1.0 - after / total

    lo, hi = 0.0, 1.0
    if saving(hi) < target:
        return hi  # even rank 1 everywhere saves less than asked: the most it can do
    for _ in range(50):
        mid = (lo + hi) / 2
        if saving(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi
