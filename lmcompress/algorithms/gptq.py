"""GPTQ (Frantar et al., 2023): one-shot weight quantization with second-order error compensation.

For a layer ``y = W x`` with calibration inputs ``X``, GPTQ minimizes ``||WX − ŴX||²`` (Hessian
``H = 2 X Xᵀ``) row-wise, quantizing one input column at a time. Let ``U`` be the upper Cholesky factor of
``H⁻¹`` (``H⁻¹ = UᵀU``). After column ``j`` is rounded to ``q``, its scaled error ``e = (w_j − q) / U_jj``
is spread onto the columns not yet quantized as ``W[:, j:] −= e · U[j, j:]``: row ``j`` of ``U`` is the
OBS update with the inverse Hessian of the remaining columns already folded in (``U_jj²`` is the
``[H_F⁻¹]_jj`` of the columns ``F = j, j+1, …`` still free). Column ``j`` costs ``½ Σ (w_j − q)² / U_jj²``
of loss. Updates inside a sub-block of ``INNER`` columns are applied immediately, the rest of the block of
``blocksize`` columns receives a sub-block's errors at once, and the rest of the matrix a block's errors at
once (lazy batch updates: only the order of the arithmetic changes).

Options: act-order processes columns by decreasing ``diag H`` (the inputs with the most energy first);
grouped grids are chosen when their group starts, on the already-updated weights (a group that reaches
past the current block first receives the block's pending updates). A ``group_size`` that does not divide
the width leaves a shorter last group with its own grid. With act-order the groups are formed in processing
order, so ``QuantizedTensor.g_idx`` records each column's group (the shorter group is then the last
``in mod g`` columns processed, the lowest-energy inputs), or, with ``static_groups``, fixed up front on the
original weights in natural column order (``g_idx = c // g``, the shorter group the last ``in mod g`` inputs).
On the ``q4_0`` grid a group's ``d`` (from its signed extreme at that moment) is fixed the same way and every
column is rounded as llama.cpp rounds, ``min(15, ⌊w·(1/d) + 8.5⌋)`` (clamped at 0 too: updated weights may
pass the extreme), so GPTQ with no error to spread gives RTN's codes.

:class:`ColumnQuantizer` is shared with SparseGPT's joint prune + quantize mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, grid_params, q4_0_step
from lmcompress.algorithms.sparsegpt import INNER, catch_up_for_group, inverse_hessian_cholesky, sweep_threads


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
        self.q4_0 = spec.grid == "q4_0"
        self.inverse = torch.zeros(rows, groups, dtype=torch.float32, device=device)  # q4_0: 1/d (float32)
        self.static = static_from is not None
        positions = torch.arange(cols, device=device)
        if self.static:
            for g, c0 in enumerate(range(0, cols, self.width)):
                self._set(g, static_from[:, c0 : c0 + self.width])
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
        if self.q4_0:
            self.inverse[:, g] = q4_0_step(weights)[1]

    def quantize(self, column: torch.Tensor, pos: int) -> torch.Tensor:
        """Round ``column`` (position ``pos``) onto its group's grid; returns the dequantized column."""
        g = self._group_list[pos]
        scale, zero = self.scale[:, g], self.zero[:, g]
        if self.q4_0:  # as q4_0_codes, one column
            q = torch.clamp(torch.floor(column * self.inverse[:, g] + 8.5), 0, 15)
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
    percdamp: float = 0.01,
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
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    W = weight.detach().clone().float()
    H = hessian.detach().float().to(W.device)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not fit a weight with {cols} inputs")

    dead = torch.diag(H) == 0
    own = consume_hessian or H.data_ptr() != hessian.data_ptr()  # may the solve write over H?
    if dead.any():
        H = H if own else H.clone()  # copied only when it must change
        own = True
        H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if mask is not None:
        mask = mask.to(W.device)
        W[mask] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        static_from = W.clone() if static_groups else None
        W, H = W[:, perm], H[perm][:, perm]
        own = True
        mask = None if mask is None else mask[:, perm]
    else:
        static_from = W.clone() if static_groups else None
    quantizer = ColumnQuantizer(spec, (rows, cols), W.device, perm=perm, static_from=static_from)

    Hinv, damp = inverse_hessian_cholesky(H, percdamp, layer, overwrite=own)
    del H
    row_loss = torch.zeros(rows, dtype=torch.float32, device=W.device)
    # The sweep runs on Wᵀ: column j of W is the contiguous row j of WT (per-column reads and rank-1 updates
    # walk memory in order).
    WT = W.t().contiguous()
    del W
    maskT = None if mask is None else mask.t().contiguous()
    for b0 in range(0, cols, blocksize):
        with sweep_threads(WT.device):  # the block's many small operations; the lazy update below uses all threads
            b1 = min(b0 + blocksize, cols)
            WbT = WT[b0:b1]  # a view: updates inside the block land in WT directly
            Hb = Hinv[b0:b1, b0:b1]
            errT = torch.zeros_like(WbT)  # row j: (w_j − q_j) / U_jj of block column j
            flushed = 0  # errors of columns b0 .. b0+flushed-1 already applied right of the block
            pending = 0  # errors of block columns pending .. j-1 not yet applied past the current sub-block
            for j in range(b1 - b0):
                pos = b0 + j
                # a sub-block starts: the block's rest receives the last one's errors
                if j % INNER == 0 and j > pending:
                    WbT[j:].addmm_(Hb[pending:j, j:].t(), errT[pending:j], alpha=-1.0)
                    pending = j
                s1 = min(b1 - b0, (j // INNER + 1) * INNER)  # end of the sub-block: updates up to it are immediate
                end = quantizer.group_end(pos)
                if end is not None:
                    pending, flushed = catch_up_for_group(WT, Hinv, errT, b0, b1, j, s1, end, pending, flushed)
                    group = WT[pos:end].t()
                    if maskT is not None:
                        group = group.masked_fill(maskT[pos:end].t(), 0.0)
                    quantizer.set_group(pos, group)
                w = WbT[j]
                column = w if maskT is None else w.masked_fill(maskT[pos], 0.0)
                q = quantizer.quantize(column, pos)
                e = torch.sub(w, q, out=errT[j]).div_(Hb[j, j])
                WbT[j:s1].addr_(Hb[j, j:s1], e, alpha=-1.0)
                WbT[j] = q
        # Lazy batch update: everything right of the block receives the block's (remaining) errors at once.
        WT[b1:].addmm_(Hinv[b0 + flushed : b1, b1:].t(), errT[flushed:], alpha=-1.0)
        row_loss += 0.5 * (errT**2).sum(0)  # ½ Σ (w − q)² / U_jj², with err = (w − q) / U_jj

    del Hinv
    W = WT.t().contiguous()
    del WT
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    result = quantizer.result()
    return GPTQResult(weight=W, quantized=result, loss=row_loss.sum().item(), damping=damp, row_loss=row_loss)
