"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight updates.

For a layer ``y = W x`` and calibration inputs ``X``, the layer-wise loss ``||WX − ŴX||²`` has Hessian
``H = 2 X Xᵀ``. Let ``U`` be the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``; ``U_jj²`` is the inverse
Hessian diagonal entry of column ``j`` once the columns before it are fixed). Columns are processed left
to right; when column ``j`` is pruned (or quantized) to ``q_j`` its scaled error ``e = (w_j − q_j) / U_jj``
is spread onto the not-yet-processed columns as ``W[:, j:] −= e · U[j, j:]``, at a cost of
``½ Σ (w_j − q_j)² / U_jj²``. The mask is chosen adaptively per block of ``blocksize`` columns by the OBS
saliency ``w² / U_jj²`` (the loss of pruning that weight alone); for N:M it is chosen per group of M columns.

In the joint prune + quantize mode a :class:`JointQuantizer` rounds the kept weights of each column onto
per-group grids; a group's grid is chosen when the group starts, from the current (already updated) weights.
A group that reaches past the current block (``group_size`` not dividing ``blocksize``, or a shorter last
group) first receives the block's pending lazy updates, so its grid never sees stale weights.

Lazy updates are used at two levels, which changes only the order of the arithmetic: inside a sub-block of
``INNER`` columns each column's error is applied at once to the sub-block's remaining columns; the block's
remaining columns receive a finished sub-block's errors as one matrix product, and the columns right of the
block receive the whole block's errors at its end. Everything a column's rounding or mask choice reads is up
to date when it is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lmcompress.algorithms.masks import Pattern, check_nm_shape, lowest_k

log = logging.getLogger(__name__)


class JointQuantizer(Protocol):
    """Per-column rounding for the joint mode (:class:`lmcompress.algorithms.gptq.ColumnQuantizer` is one)."""

    def group_end(self, pos: int) -> int | None:
        """End (exclusive) of the group whose grid must be set before column ``pos`` is quantized, else None."""

    def set_group(self, pos: int, weights: torch.Tensor) -> None:
        """Choose the grid of the group starting at ``pos`` from its current ``weights`` ``[rows, end − pos]``."""

    def quantize(self, column: torch.Tensor, pos: int) -> torch.Tensor:
        """Column ``pos`` rounded onto its group's grid (dequantized)."""


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # the updated weight, float32, pruned entries exactly zero
    mask: torch.Tensor  # True where pruned
    damping: float  # fraction of the mean Hessian diagonal that was finally added
    loss: float  # Σ of the OBS error estimates ½ Σ (w − q)²/U_jj² over all columns (U: upper Cholesky of H⁻¹)
    row_loss: torch.Tensor | None = None  # the same per output row, [out]


INNER = 16  # columns updated one by one inside a sub-block; the rest of the block gets them as one product


def _inner_width(m: int) -> int:
    """Sub-block width: a multiple of ``m`` (an N:M group never straddles two sub-blocks), at least INNER."""
    return m * -(-INNER // m)


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float, layer: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp · mean(diag H)``.

    One factorization and one triangular solve, without forming ``H⁻¹``: with ``J`` the order-reversing
    permutation, ``J H J = M Mᵀ`` (lower Cholesky) gives ``H = R Rᵀ`` with ``R = J M J`` upper triangular, so
    ``H⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U`` with ``U = R⁻¹`` upper triangular with a positive diagonal: the factor sought.
    Done in float64, so the factor is exact to the working precision (on a quiet 2-core CPU this costs about as
    much as inverting and factorizing again in float32: 0.18 s vs 0.12 s at n = 1536).

    If the factorization fails (H numerically indefinite) the dampening is multiplied by 10 until it
    succeeds, and a warning says so. Returns the factor and the dampening fraction used.
    """
    n = hessian.shape[0]
    mean_diag = torch.mean(torch.diag(hessian)).item()
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    for _ in range(8):
        try:
            m = torch.linalg.cholesky((hessian + damp * mean_diag * eye).flip(0, 1).double())
            u = torch.linalg.solve_triangular(m.flip(0, 1), eye.double(), upper=True)
            return u.to(hessian.dtype), damp
        except torch.linalg.LinAlgError:
            new_damp = damp * 10 if damp > 0 else 1e-4
            log.warning(
                "Cholesky failed for %s with dampening %.2g; retrying with %.2g",
                layer or "a layer",
                damp,
                new_damp,
            )
            damp = new_damp
    raise RuntimeError(f"Hessian of {layer or 'layer'} is not positive definite even with dampening {damp}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | Sequence[float],
    pattern: Pattern = Pattern(),
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quantizer: JointQuantizer | None = None,
    segments: Sequence[int] | None = None,
    layer: str = "",
) -> SparseGPTResult:
    """Prune ``weight`` ([out, in]) to ``sparsity`` (or to ``pattern``) using Hessian ``hessian`` ([in, in]).

    Unstructured sparsity is exact per block of ``blocksize`` columns: ``round(sparsity · rows · width)``
    weights are removed in each block. With ``quantizer``, the kept weights are quantized in the same
    pass (SparseGPT's joint mode) and the quantization error is compensated as well.

    Every row is solved on its own given ``H``, so layers that read the same input can be stacked row-wise
    and pruned in one pass: ``segments`` gives their row counts (and ``sparsity`` one value per segment);
    each segment's mask is chosen within its own rows, exactly as if it were pruned alone.
    """
    check_nm_shape(weight, pattern)
    rows = weight.shape[0]
    segments = [rows] if segments is None else list(segments)
    sparsities = [float(sparsity)] * len(segments) if isinstance(sparsity, int | float) else list(sparsity)
    if sum(segments) != rows or len(sparsities) != len(segments):
        raise ValueError(f"segments {segments} (sparsities {sparsities}) do not split the {rows} rows")
    bounds = [(sum(segments[:i]), sum(segments[: i + 1]), s) for i, s in enumerate(sparsities)]
    if pattern.is_nm and blocksize % pattern.m != 0:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m}")
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    _rows, cols = W.shape

    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter, so drop them
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    Hinv, damp = inverse_hessian_cholesky(H, percdamp, layer)
    mask = torch.zeros_like(W, dtype=torch.bool)
    row_loss = torch.zeros(rows, dtype=torch.float32, device=W.device)

    inner = _inner_width(pattern.m if pattern.is_nm else 1)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        Wb = W[:, b0:b1]  # a view: updates inside the block land in W directly
        Hb = Hinv[b0:b1, b0:b1]
        d = torch.diag(Hb)
        err = torch.zeros_like(Wb)
        block_mask = torch.zeros(Wb.shape, dtype=torch.bool, device=W.device)
        if not pattern.is_nm:  # the lowest saliencies w²/U_jj² of each segment's rows in this block
            saliency = Wb**2 / d.unsqueeze(0) ** 2
            for r0, r1, s_seg in bounds:
                k = round((r1 - r0) * (b1 - b0) * s_seg)
                block_mask[r0:r1] = lowest_k(saliency[r0:r1].reshape(1, -1), k).reshape(r1 - r0, b1 - b0)

        flushed = 0  # errors of columns b0 .. b0+flushed-1 already applied right of the block
        pending = 0  # errors of block columns pending .. j-1 not yet applied past the current sub-block
        for j in range(b1 - b0):
            pos = b0 + j
            if j % inner == 0 and j > pending:  # a sub-block starts: the block's rest receives the last one's errors
                Wb[:, j:] -= err[:, pending:j] @ Hb[pending:j, j:]
                pending = j
            s1 = min(b1 - b0, (j // inner + 1) * inner)  # end of the sub-block: updates up to it are immediate
            end = None if quantizer is None else quantizer.group_end(pos)
            if end is not None:
                if j > pending:  # a group starts inside a sub-block: bring the block's rest up to date first
                    Wb[:, s1:] -= err[:, pending:j] @ Hb[pending:j, s1:]
                    pending = j
                if end > b1 and j > flushed:  # the group reaches past the block: bring those columns up to date
                    W[:, b1:] -= err[:, flushed:j] @ Hinv[b0 + flushed : pos, b1:]
                    flushed = j
                quantizer.set_group(pos, W[:, pos:end])
            if pattern.is_nm and j % pattern.m == 0:
                group = Wb[:, j : j + pattern.m] ** 2 / d[j : j + pattern.m].unsqueeze(0) ** 2
                drop = torch.topk(group, pattern.m - pattern.n, dim=1, largest=False).indices
                block_mask[:, j : j + pattern.m].scatter_(1, drop, True)
            w = Wb[:, j]
            q = w.masked_fill(block_mask[:, j], 0.0)
            if quantizer is not None:
                q = quantizer.quantize(q, pos).masked_fill_(block_mask[:, j], 0.0)
            e = (w - q) / d[j]
            # OBS update of the sub-block's remaining columns; column j itself becomes q.
            Wb[:, j:s1].addr_(e, Hb[j, j:s1], alpha=-1.0)
            Wb[:, j] = q
            err[:, j] = e
        # Lazy batch update: everything right of the block receives the block's (remaining) errors at once.
        W[:, b1:] -= err[:, flushed:] @ Hinv[b0 + flushed : b1, b1:]
        row_loss += 0.5 * (err**2).sum(1)  # ½ Σ (w − q)² / U_jj², with err = (w − q) / U_jj
        mask[:, b0:b1] = block_mask

    W[mask] = 0.0
    return SparseGPTResult(weight=W, mask=mask, damping=damp, loss=row_loss.sum().item(), row_loss=row_loss)
