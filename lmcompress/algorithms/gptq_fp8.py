"""GPTQ on the FP8 E4M3 grid: per-output-channel FP8 weights solved column by column (Frantar et al., 2023).

The grid is fixed before the sweep from the original weights, one scale per output row,
``s = max|w_row| / 448`` (as round to nearest sets it, :func:`~lmcompress.algorithms.actquant.quantize_weight_fp8`);
column ``j`` is then rounded to ``q_j = s · e4m3(clamp(w_j / s, −448, 448))`` (the cast rounds to nearest even)
and its error is spread onto the columns not yet rounded exactly as on an integer grid
(:func:`~lmcompress.algorithms.gptq.sweep_columns`). E4M3's steps grow with the magnitude (three mantissa
bits per binade), so the grid is not uniform, but GPTQ's update needs only the rounding of one column at a time:
it minimizes the same ``||WX − ŴX||²`` with the same inverse-Hessian factor. Updated weights may pass the row's
original extreme: they saturate at ``±448 s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.algorithms.actquant import FP8_DTYPE, FP8Weight, dequantize, fp8_codes, quantize_weight_fp8
from lmcompress.algorithms.gptq import in_act_order, prepare, sweep_columns


class FP8ColumnQuantizer:
    """Rounds columns onto per-row FP8 E4M3 grids fixed from ``weight`` ([rows, cols], natural column order);
    position ``p`` of the processing order is original column ``perm[p]``."""

    def __init__(self, weight: torch.Tensor, perm: torch.Tensor | None = None) -> None:
        _, self.scale = quantize_weight_fp8(weight)  # [rows, 1]
        self.codes = torch.zeros(weight.shape, dtype=FP8_DTYPE, device=weight.device)  # processing order
        self.perm = perm

    def group_end(self, pos: int) -> None:
        return None  # one static grid per row: nothing to set as the sweep goes

    def quantize(self, column: torch.Tensor, pos: int) -> torch.Tensor:
        codes = fp8_codes(column.unsqueeze(1), self.scale)
        self.codes[:, pos] = codes.squeeze(1)
        return dequantize(codes, self.scale).squeeze(1)  # the arithmetic of FP8Weight.dequantize

    def result(self) -> FP8Weight:
        codes = self.codes
        if self.perm is not None:
            codes = codes[:, torch.argsort(self.perm.to(codes.device))]
        return FP8Weight(codes, self.scale)


@dataclass
class FP8GPTQResult:
    weight: torch.Tensor  # the dequantized weight, float32 [out, in]; equals fp8.dequantize() exactly
    fp8: FP8Weight
    loss: float  # Σ over columns of ½ Σ (w − q)² / U_jj², as gptq.GPTQResult
    damping: float
    row_loss: torch.Tensor  # the loss per output row, [out]


def gptq_fp8(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    blocksize: int = 128,
    percdamp: float | str = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
    layer: str = "",
    consume_hessian: bool = False,
) -> FP8GPTQResult:
    """Quantize ``weight`` ([out, in]) to FP8 E4M3 per output channel with GPTQ using ``hessian`` ([in, in]).

    Inputs that never fire (``diag H == 0``) get zero weights; ``mask`` (bool, True = pruned) holds weights at
    zero while the others absorb their error; ``act_order`` processes inputs by decreasing
    ``diag H`` (the grid does not depend on the order). Rows are independent given ``H``, so layers reading one
    input may be stacked row-wise into one call."""
    W, H, own, mask = prepare(weight, hessian, mask, blocksize=blocksize, consume_hessian=consume_hessian)
    quantizer = FP8ColumnQuantizer(W)  # the grid from the weights in natural order
    perm = None
    if act_order:
        W, H, mask, perm = in_act_order(W, H, mask)
        quantizer.perm, own = perm, True
    WT = W.t().contiguous()
    del W
    W, row_loss, damp = sweep_columns(WT, H, quantizer, blocksize=blocksize, percdamp=percdamp, perm=perm, mask=mask,
                                      layer=layer, overwrite=own)  # fmt: skip
    return FP8GPTQResult(W, quantizer.result(), float(row_loss.sum()), damp, row_loss)
