"""GPTQ (Frantar et al., 2023): one-shot weight quantization with second-order error compensation.

GPTQ minimizes the layer-wise loss ``||WX − ŴX||²`` (Hessian ``H = 2 X Xᵀ``) row-wise, quantizing one input
column at a time with :mod:`lmcompress.algorithms.obs`'s sweep. With ``U`` the upper Cholesky factor of
``H⁻¹`` (``H⁻¹ = UᵀU``), column ``j`` is rounded to ``q`` on its group's grid, and its scaled error
``e = (w_j − q) / U_jj`` is spread onto the columns not yet quantized as ``W[:, j:] −= e · U[j, j:]``: row
``j`` of ``U`` is the OBS update with the inverse Hessian of the remaining columns already folded in
(``U_jj²`` is the ``[H_F⁻¹]_jj`` of the columns ``F = j, j+1, …`` still free). Column ``j`` costs
``½ Σ (w_j − q)² / U_jj²`` of loss.

Options: act-order processes columns by decreasing ``diag H`` (the inputs with the most energy first);
grouped grids are chosen when their group starts, on the already-updated weights (a group that reaches
past the current sub-block or block first receives the pending lazy updates). A ``group_size`` that does not
divide the width leaves a shorter last group with its own grid. With act-order the groups are formed in processing
order, so ``QuantizedTensor.g_idx`` records each column's group (the shorter group is then the last
``in mod g`` columns processed, the lowest-energy inputs), or, with ``static_groups``, fixed up front on the
original weights in natural column order (``g_idx = c // g``, the shorter group the last ``in mod g`` inputs).
On the ``q4_0`` grid a group's ``d`` (from its signed extreme at that moment) is fixed the same way and every
column is rounded as llama.cpp rounds, ``min(15, ⌊w·(1/d) + 8.5⌋)`` (clamped at 0 too: updated weights may
pass the extreme), so GPTQ with no error to spread gives RTN's codes; likewise ``q5_0``, ``q5_1`` and ``q8_0``
(:func:`~lmcompress.algorithms.quant.legacy_codes`). On a K-quant grid (``q2_k`` … ``q6_k``)
the whole grid — fp16 super-block scales and integer sub-block scales and minimums — is fixed before the sweep
from the original weights, its least-squares search weighted by ``diag H`` as an importance vector (the
groups are static whatever ``static_groups`` says), and each column is rounded to the nearest point of its
sub-block, ``clamp(round((w + m₁) / d₁), 0, 2^b − 1)`` or ``clamp(round(w / d₁), −mid, mid − 1) + mid``: the
codes and integers GPTQ solved are the ones llama.cpp's blocks store.

:class:`ColumnQuantizer` is shared with SparseGPT's joint prune + quantize mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.algorithms.kquants import KTYPES, check_row, kquant_grid
from lmcompress.algorithms.obs import INNER, Block, Sweep, inverse_hessian_cholesky, usable_hessian
from lmcompress.algorithms.quant import LEGACY, QuantizedTensor, QuantSpec, grid_params, legacy_codes, legacy_step


class ColumnQuantizer:
    """Quantizes the columns of an ``[rows, cols]`` weight one at a time, in a processing order.

    Position ``p`` of the processing order is original column ``perm[p]`` (identity without ``perm``).
    Dynamic groups are ``width`` consecutive positions whose grid is set by :meth:`set_group` when the
    group starts; static groups (``static_from``) are original-order groups whose grids are computed at
    once from ``static_from``. When ``width`` does not divide ``cols`` the last group (in processing order
    for dynamic groups, in column order for static ones) holds the remaining ``cols mod width`` positions.
    Codes are recorded as columns are quantized; :meth:`result` returns them in the original column order.
    It is the :class:`~lmcompress.algorithms.sparsegpt.JointQuantizer` of ``sparsegpt_prune``'s joint mode.
    """

    def __init__(
        self,
        spec: QuantSpec,
        shape: tuple[int, int],
        device: torch.device | str = "cpu",
        *,
        perm: torch.Tensor | None = None,
        static_from: torch.Tensor | None = None,
        importance: torch.Tensor | None = None,
    ) -> None:
        rows, cols = shape
        self.spec = spec
        self.width = spec.width(cols)
        self.perm = perm
        self.cols = cols
        groups = spec.groups(cols)
        self.codes = torch.zeros(rows, cols, dtype=torch.float32, device=device)  # integer-valued; uint8 at the end
        self.scale = torch.zeros(rows, groups, dtype=torch.float32, device=device)
        self.zero = torch.zeros(rows, groups, dtype=torch.float32, device=device)
        self.legacy = spec.grid in LEGACY  # q4_0, q5_0, q5_1, q8_0: llama.cpp's own rounding
        self.inverse = torch.zeros(rows, groups, dtype=torch.float32, device=device)  # legacy: 1/d (float32)
        self.lo = torch.zeros(rows, groups, dtype=torch.float32, device=device)  # q5_1: the group's minimum
        self.static = static_from is not None
        positions = torch.arange(cols, device=device)
        self.kquant = spec.kquant
        if self.kquant:  # the whole grid at once (static groups)
            self._set_kquant(static_from, importance)
        elif self.static:
            for g, c0 in enumerate(range(0, cols, self.width)):
                self._set(g, static_from[:, c0 : c0 + self.width])
        if self.static:
            original = positions if perm is None else perm.to(device)
            self.group_of = original // self.width  # position -> group of its original column
        else:
            self.group_of = positions // self.width  # position -> group, contiguous in processing order
        self._group_list = self.group_of.tolist()  # the same, as Python ints for the per-column hot path

    def group_end(self, pos: int) -> int | None:
        """Where a dynamic group begins at ``pos``: the end (exclusive) of that group, whose grid must be set
        before this position is quantized; elsewhere (and for static groups) None."""
        if self.static or pos % self.width:
            return None
        return min(pos + self.width, self.cols)

    def set_group(self, pos: int, weights: torch.Tensor) -> None:
        """Set the grid of the dynamic group starting at ``pos`` from its current ``weights`` ([rows, k])."""
        self._set(self._group_list[pos], weights)

    def _set(self, g: int, weights: torch.Tensor) -> None:
        self.scale[:, g], self.zero[:, g] = grid_params(weights, self.spec)
        if self.legacy:
            _, self.inverse[:, g], self.lo[:, g] = legacy_step(weights, self.spec.grid)

    def _set_kquant(self, weights: torch.Tensor | None, importance: torch.Tensor | None) -> None:
        """Fix the whole K-quant grid from ``weights`` ([rows, cols], natural column order) at once."""
        if weights is None:
            raise ValueError(f"the {self.spec.grid} grid is fixed up front: pass static_from (the weights)")
        grid = kquant_grid(weights, self.spec.grid, importance)
        self.scale, self.zero = grid.step(), grid.zero()
        self.offset = grid.offset()  # m₁ per sub-block (0 on the symmetric types)
        self.empty = self.scale == 0  # sub-blocks with d₁ = 0: one code, read as −m₁ (0)
        self.safe_step = torch.where(self.empty, torch.ones_like(self.scale), self.scale)
        self.mid = (self.spec.maxq + 1) // 2 if self.spec.sym else 0

    def quantize(self, column: torch.Tensor, pos: int) -> torch.Tensor:
        """Round ``column`` (position ``pos``) onto its group's grid; returns the dequantized column."""
        g = self._group_list[pos]
        scale, zero = self.scale[:, g], self.zero[:, g]
        if self.kquant:  # as kquants.kquant_codes, one column
            if self.mid:
                q = torch.clamp(torch.round(column / self.safe_step[:, g]), -self.mid, self.mid - 1) + self.mid
            else:
                q = torch.clamp(torch.round((column + self.offset[:, g]) / self.safe_step[:, g]), 0, self.spec.maxq)
            q = torch.where(self.empty[:, g], float(self.mid), q)
        elif self.legacy:  # as legacy_codes, one column
            q = legacy_codes(column.unsqueeze(1), self.spec.grid, self.inverse[:, g], self.lo[:, g]).squeeze(1)
        else:  # as quantize_codes, one column
            q = torch.clamp(torch.round(column / scale) + zero, 0, self.spec.maxq)
        self.codes[:, pos] = q
        return (q - zero) * scale  # the same arithmetic as QuantizedTensor.dequantize, so bit-identical

    def result(self) -> QuantizedTensor:
        """The recorded codes and grids as a :class:`QuantizedTensor` in the original column order."""
        codes, group_of = self.codes, self.group_of
        if self.perm is not None:
            inverse = torch.argsort(self.perm.to(codes.device))
            codes, group_of = codes[:, inverse], group_of[inverse]
        natural = torch.arange(codes.shape[1], device=codes.device) // self.width
        g_idx = None if torch.equal(group_of, natural) else group_of.to(torch.int32)
        return QuantizedTensor(codes.to(torch.uint8), self.scale, self.zero, self.spec, g_idx)


@dataclass
class GPTQResult:
    weight: torch.Tensor  # the dequantized weight, float32, [out, in]; equals quantized.dequantize() exactly
    quantized: QuantizedTensor  # codes, scales, zero points (and g_idx) in the original column order
    loss: float  # Σ over columns of the OBS error estimate ½ Σ (w − q)² / U_jj² (U: upper Cholesky factor of H⁻¹)
    damping: float  # fraction of the mean Hessian diagonal that was finally added
    row_loss: torch.Tensor | None = None  # the loss per output row, [out]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    blocksize: int = 128,
    percdamp: float | str = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mask: torch.Tensor | None = None,
    layer: str = "",
    consume_hessian: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` ([out, in]) to ``spec`` with GPTQ using Hessian ``hessian`` ([in, in]).

    ``mask`` (bool, [out, in], True = pruned) holds weights at exactly zero while the others absorb their
    error, as for a model pruned before it is quantized. Inputs that never fire (``diag H == 0``) have
    their weights set to zero. Rows are solved independently given ``H`` (grids are per row), so layers
    that read the same input may be stacked row-wise into one call and the result split again.
    ``consume_hessian`` lets the solve overwrite ``hessian`` (a caller done with it saves an ``n × n`` copy).
    """
    if spec.kquant:
        check_row(KTYPES[spec.grid], weight.shape[1], layer)
    W, H, own, mask = prepare(weight, hessian, mask, blocksize=blocksize, consume_hessian=consume_hessian)
    rows, cols = W.shape
    perm = None
    static_groups = static_groups or spec.kquant  # a K-quant grid is fixed up front
    static_from = W.clone() if static_groups else None  # static grids: from the weights in natural order
    importance = torch.diag(H).float() if spec.kquant else None
    if act_order:
        W, H, mask, perm = in_act_order(W, H, mask)
        own = True
    quantizer = ColumnQuantizer(spec, (rows, cols), W.device, perm=perm, static_from=static_from, importance=importance)
    del static_from
    WT = W.t().contiguous()  # Wᵀ: column j of W is the contiguous row j, updated in place by the sweep
    del W
    W, row_loss, damp = sweep_columns(WT, H, quantizer, blocksize=blocksize, percdamp=percdamp, perm=perm, mask=mask,
                                      layer=layer, overwrite=own)  # fmt: skip
    return GPTQResult(
        weight=W, quantized=quantizer.result(), loss=row_loss.sum().item(), damping=damp, row_loss=row_loss
    )


def prepare(
    weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor | None, *, blocksize: int, consume_hessian: bool
) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]:
    """The set-up every GPTQ sweep shares: ``(W, H, own, mask)`` with ``W`` a float32 copy of ``weight`` whose
    inputs that never fire (``diag H == 0``) and masked weights are zero, ``H`` usable
    (:func:`~lmcompress.algorithms.obs.usable_hessian`), whether the solve owns ``H``, and ``mask`` on ``W``'s
    device. Refuses a non-positive ``blocksize`` and a Hessian that does not fit."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    W = weight.detach().clone().float()
    cols = W.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight with {cols} inputs")
    H, dead, own = usable_hessian(hessian, W.device, consume_hessian)
    W[:, dead] = 0.0
    if mask is not None:
        mask = mask.to(W.device)
        W[mask] = 0.0
    return W, H, own, mask


def in_act_order(
    W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``W``, ``H`` and ``mask`` with the inputs by decreasing ``diag H`` (act-order), and that permutation."""
    perm = torch.argsort(torch.diag(H), descending=True)
    return W[:, perm], H[perm][:, perm], None if mask is None else mask[:, perm], perm


def sweep_columns(
    WT: torch.Tensor,
    H: torch.Tensor,
    quantizer,
    *,
    blocksize: int,
    percdamp: float | str,
    perm: torch.Tensor | None,
    mask: torch.Tensor | None,
    layer: str,
    overwrite: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ's sweep of ``WT`` (``Wᵀ`` [cols, rows], contiguous, updated in place; columns of ``W`` already in
    processing order ``perm``) with Hessian ``H`` (in the same order): each column rounded by ``quantizer`` (a
    :class:`ColumnQuantizer`, or any object with its ``group_end`` / ``set_group`` / ``quantize``), its error spread
    onto the columns not yet rounded. Returns the rounded ``W`` in natural column order, the loss per row and the
    damping used; ``overwrite`` lets the solve reuse ``H``'s memory."""
    Hinv, damp = inverse_hessian_cholesky(H, percdamp, layer, overwrite=overwrite)
    del H
    maskT = None if mask is None else mask.t().contiguous()
    sweep = Sweep(WT, Hinv, blocksize, INNER)
    for b0 in sweep.starts():
        with sweep.block(b0) as block:
            _sweep_block(block, quantizer, maskT)
    del Hinv
    W = WT.t().contiguous()
    del WT
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W, sweep.row_loss, damp


def _sweep_block(block: Block, quantizer: ColumnQuantizer, maskT: torch.Tensor | None) -> None:
    """Quantize the block's columns in order, each onto its group's grid (set when the group starts, from the
    up-to-date weights); weights under ``maskT`` ([cols, rows], True = pruned) are held at zero."""
    WbT, Ub = block.W, block.U
    for j, s1 in block.columns():
        pos = block.b0 + j
        end = quantizer.group_end(pos)
        if end is not None:
            block.catch_up(j, s1, end)
            group = block.WT[pos:end].t()
            if maskT is not None:
                group = group.masked_fill(maskT[pos:end].t(), 0.0)
            quantizer.set_group(pos, group)
        w = WbT[j]
        column = w if maskT is None else w.masked_fill(maskT[pos], 0.0)
        q = quantizer.quantize(column, pos)
        e = torch.sub(w, q, out=block.err[j]).div_(Ub[j, j])  # (w_j − q) / U_jj
        WbT[j:s1].addr_(Ub[j, j:s1], e, alpha=-1.0)  # W[:, j:s1] −= e · U[j, j:s1]; the rest lazily
        WbT[j] = q
