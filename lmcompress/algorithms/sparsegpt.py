"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight updates.

The column sweep is :mod:`lmcompress.algorithms.obs`'s: with ``U`` the upper Cholesky factor of ``H⁻¹``
(``H = 2 X Xᵀ``), column ``j`` is replaced by ``q_j`` (``w_j`` with its pruned entries zeroed), its scaled
error ``e = (w_j − q_j) / U_jj`` is spread onto the columns not yet processed as ``W[:, j:] −= e · U[j, j:]``,
at a cost of ``½ Σ (w_j − q_j)² / U_jj²``. What SparseGPT adds is the mask: chosen adaptively per block of
``blocksize`` columns by the OBS saliency ``w² / U_jj²`` (the loss of pruning that weight alone), from the
block's weights as the earlier blocks left them; for N:M it is chosen per group of M columns, as the group
is reached.

In the joint prune + quantize mode a :class:`JointQuantizer` rounds the kept weights of each column onto
per-group grids; a group's grid is chosen when the group starts, from the current (already updated) weights.
A group that reaches past the current sub-block or block (``group_size`` not dividing ``blocksize``, or a
shorter last group) first receives the pending lazy updates (:meth:`~lmcompress.algorithms.obs.Block.catch_up`),
so its grid never sees stale weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lmcompress.algorithms.masks import Pattern, check_nm_shape, lowest_k
from lmcompress.algorithms.obs import INNER, Block, Sweep, inverse_hessian_cholesky, usable_hessian


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


def _inner_width(m: int) -> int:
    """Sub-block width: a multiple of ``m`` (an N:M group never straddles two sub-blocks), at least INNER."""
    return m * -(-INNER // m)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | Sequence[float],
    pattern: Pattern = Pattern(),
    *,
    blocksize: int = 128,
    percdamp: float | str = 0.01,
    quantizer: JointQuantizer | None = None,
    segments: Sequence[int] | None = None,
    layer: str = "",
    consume_hessian: bool = False,
) -> SparseGPTResult:
    """Prune ``weight`` ([out, in]) to ``sparsity`` (or to ``pattern``) using Hessian ``hessian`` ([in, in]).

    Unstructured sparsity is exact per block of ``blocksize`` columns: ``round(sparsity · rows · width)``
    weights are removed in each block. With ``quantizer``, the kept weights are quantized in the same
    pass (SparseGPT's joint mode) and the quantization error is compensated as well.

    Every row is solved on its own given ``H``, so layers that read the same input can be stacked row-wise
    and pruned in one pass: ``segments`` gives their row counts (and ``sparsity`` one value per segment);
    each segment's mask is chosen within its own rows, exactly as if it were pruned alone.
    ``consume_hessian`` lets the solve overwrite ``hessian`` (a caller done with it saves an ``n × n`` copy).
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
    WT = weight.detach().float().t().contiguous()  # Wᵀ, a copy: the caller's weight is not touched
    H, dead, own = usable_hessian(hessian, WT.device, consume_hessian)
    WT[dead] = 0.0  # inputs that never fire: their weights cannot matter
    Hinv, damp = inverse_hessian_cholesky(H, percdamp, layer, overwrite=own)
    del H
    mask = torch.zeros(WT.shape[::-1], dtype=torch.bool, device=WT.device)
    sweep = Sweep(WT, Hinv, blocksize, _inner_width(pattern.m if pattern.is_nm else 1))
    for b0 in sweep.starts():
        with sweep.block(b0) as block:
            if pattern.is_nm:
                block_mask = torch.zeros_like(block.W.t(), dtype=torch.bool)
            else:  # the lowest saliencies w²/U_jj² of each segment's rows in this block
                block_mask = _saliency_mask(block, bounds)
            if pattern.is_nm or quantizer is not None:
                _sweep_columns(block, block_mask, pattern, quantizer)
            else:
                _sweep_fixed_mask(block, block_mask)
        mask[:, block.b0 : block.b1] = block_mask
    del Hinv
    W = WT.t().contiguous()  # pruned entries are exactly zero: set as each column (or block) was finished
    del WT
    row_loss = sweep.row_loss
    return SparseGPTResult(weight=W, mask=mask, damping=damp, loss=row_loss.sum().item(), row_loss=row_loss)


def _saliency_mask(block: Block, bounds: list[tuple[int, int, float]]) -> torch.Tensor:
    """The block's mask ([rows, width], True = pruned): in each segment ``r0:r1`` the ``round(s · rows · width)``
    weights of lowest OBS saliency ``w² / U_jj²``."""
    width = block.b1 - block.b0
    saliency = (block.W**2 / torch.diag(block.U).unsqueeze(1) ** 2).t().contiguous()
    block_mask = torch.zeros((saliency.shape[0], width), dtype=torch.bool, device=saliency.device)
    for r0, r1, s_seg in bounds:
        k = round((r1 - r0) * width * s_seg)
        block_mask[r0:r1] = lowest_k(saliency[r0:r1].reshape(1, -1), k).reshape(r1 - r0, width)
    return block_mask


def _sweep_fixed_mask(block: Block, block_mask: torch.Tensor) -> None:
    """The sweep of a block whose mask is fixed (unstructured, no quantizer): ``q_j`` is ``w_j`` with its pruned
    entries zeroed, so ``e = w_j / U_jj`` where pruned and ``0`` where kept: one division each, by ``U_jj`` or
    by ``+inf`` (an exact 0). The pruned entries are zeroed once the block is done."""
    WbT = block.W
    pruned_t = block_mask.t().contiguous().float()  # [width, rows]: 1 where pruned
    divisor = torch.diag(block.U).unsqueeze(1) / pruned_t  # U_jj / 1 = U_jj, U_jj / 0 = +inf
    w_rows, e_rows, v_rows, u_rows = WbT.unbind(0), block.err.unbind(0), divisor.unbind(0), block.U.unbind(0)
    for j, s1 in block.columns():
        e = torch.div(w_rows[j], v_rows[j], out=e_rows[j])  # (w_j − q_j) / U_jj
        if j + 1 < s1:  # W[:, j+1:s1] −= e · U[j, j+1:s1]; column j itself becomes q_j below
            WbT[j + 1 : s1].addr_(u_rows[j][j + 1 : s1], e, alpha=-1.0)
    WbT.addcmul_(WbT, pruned_t, value=-1.0)  # w − w·1 = 0 exactly where pruned, w − w·0 = w where kept


def _sweep_columns(block: Block, block_mask: torch.Tensor, pattern: Pattern, quantizer: JointQuantizer | None) -> None:
    """The sweep of a block column by column: N:M groups chosen by ``w² / U_jj²`` as they are reached (filling
    ``block_mask``), and kept weights rounded by ``quantizer`` when there is one."""
    WbT, Ub, d = block.W, block.U, torch.diag(block.U)
    for j, s1 in block.columns():
        pos = block.b0 + j
        end = None if quantizer is None else quantizer.group_end(pos)
        if end is not None:  # a quantization group starts: its grid is chosen from its up-to-date weights
            block.catch_up(j, s1, end)
            quantizer.set_group(pos, block.WT[pos:end].t())
        if pattern.is_nm and j % pattern.m == 0:
            group = WbT[j : j + pattern.m].t() ** 2 / d[j : j + pattern.m].unsqueeze(0) ** 2
            drop = torch.topk(group, pattern.m - pattern.n, dim=1, largest=False).indices
            block_mask[:, j : j + pattern.m].scatter_(1, drop, True)
        w = WbT[j]
        q = w.masked_fill(block_mask[:, j], 0.0)
        if quantizer is not None:
            q = quantizer.quantize(q, pos).masked_fill_(block_mask[:, j], 0.0)
        e = (w - q) / d[j]
        WbT[j:s1].addr_(Ub[j, j:s1], e, alpha=-1.0)  # W[:, j:s1] −= e · U[j, j:s1]; the rest lazily
        WbT[j] = q
        block.err[j] = e
