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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


@contextmanager
def sweep_threads(device: torch.device) -> Iterator[None]:
    """Run a column sweep's operations on one thread on a CPU, and restore the thread count after.

    Inside a block of columns the sweep is thousands of small operations (one rank-1 update per column):
    waking a second thread for each costs more than it saves where threads sleep between operations or run in
    a worker thread, as the engine's solves do (SmolLM2 at two threads: 1.4–1.7× faster this way); where they
    spin in the main thread it costs 5–10 % (bench/README.md). The lazy updates between blocks are large
    matrix products and run outside, on all threads.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def catch_up_for_group(
    WT: torch.Tensor,
    Hinv: torch.Tensor,
    errT: torch.Tensor,
    b0: int,
    b1: int,
    j: int,
    s1: int,
    end: int,
    pending: int,
    flushed: int,
) -> tuple[int, int]:
    """Before a quantization group's grid is chosen at column ``b0 + j`` of block ``b0:b1`` (the group ends at
    ``end``), apply the errors it must see: those of block columns ``pending .. j−1`` to the block's columns
    past the current sub-block (from ``s1``), and, when the group reaches past the block, those of columns
    ``flushed .. j−1`` to every column right of the block. Returns the new ``(pending, flushed)``."""
    if j > pending:  # a group starts inside a sub-block: bring the block's rest up to date first
        WT[b0 + s1 : b1].addmm_(Hinv[b0 + pending : b0 + j, b0 + s1 : b1].t(), errT[pending:j], alpha=-1.0)
        pending = j
    if end > b1 and j > flushed:  # the group reaches past the block: bring those columns up to date
        WT[b1:].addmm_(Hinv[b0 + flushed : b0 + j, b1:].t(), errT[flushed:j], alpha=-1.0)
        flushed = j
    return pending, flushed


FACTOR_CHUNK = 256  # rows and columns of the blocks of R in inverse_hessian_cholesky
CHOLESKY_PANEL = 128  # columns per panel of upper_cholesky_


def upper_cholesky_(a: torch.Tensor, panel: int = CHOLESKY_PANEL) -> torch.Tensor:
    """``a = R Rᵀ`` in place, ``R`` upper triangular: ``a`` (symmetric positive definite) becomes ``R``.

    The Cholesky factorization run from the last column back, left-looking by panels of ``panel`` columns:
    panel ``J`` first receives the columns right of it, ``A[:f, J] −= R[:f, f:] R[J, f:]ᵀ`` (one matrix
    product), then its diagonal block is factored, ``A_JJ = R_JJ R_JJᵀ`` (``R_JJ`` is the lower Cholesky
    factor of the block with its order reversed, reversed back), and the rows above it are solved,
    ``R[:j, J] = A[:j, J] R_JJ⁻ᵀ``. Nearly all the work is matrix products on strided views, so on one CPU
    core it runs in half the time of LAPACK's ``potrf`` on a 2048-wide float64 matrix. Raises
    ``torch.linalg.LinAlgError``, as ``torch.linalg.cholesky`` does, when ``a`` is not positive definite.
    """
    n = a.shape[0]
    for f in range(n, 0, -panel):
        j = max(f - panel, 0)
        if f < n:
            a[:f, j:f].addmm_(a[:f, f:], a[j:f, f:].t(), alpha=-1.0)
        d = a[j:f, j:f]
        d.copy_(torch.linalg.cholesky(d.flip(0, 1)).flip(0, 1))
        if j > 0:
            a[:j, j:f] = torch.linalg.solve_triangular(d.t(), a[:j, j:f], upper=False, left=False)
            a[j:f, :j] = 0.0  # below the diagonal: R is upper triangular
    return a


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float, layer: str = "", *, overwrite: bool = False
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp · mean(diag H)``.

    One factorization and one triangular inverse, without forming ``H⁻¹``: ``H + λI = R Rᵀ`` with ``R``
    upper triangular (:func:`upper_cholesky_`) gives ``(H + λI)⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U`` with ``U = R⁻¹``, upper
    triangular with a positive diagonal: the factor sought. ``R`` is computed in float64 (a float32
    factorization cost SmolLM2 0.5–4 % perplexity after SparseGPT 50 % and 9 % after GPTQ 4-bit), then stored
    in ``hessian``'s dtype (float32 in practice) and inverted in place a block column at a time: with the
    columns left of block column ``c`` already inverted, ``U[i, c] = −(U[i, i:c] R[i:c, c]) R_cc⁻¹`` for each
    row block ``i`` above it (top down, so each product reads only rows not yet overwritten), and
    ``U_cc = R_cc⁻¹`` from float64. A triangular inverse is backward stable, so float32 costs it about
    ``cond(R) = √cond(H + λI)`` unit roundoffs: on SmolLM2's and a random LLaMA's Hessians
    ``‖U − U₆₄‖ / ‖U₆₄‖ ≤ 4·10⁻⁷``, against up to ``10⁻⁴`` for the reference implementation's all-float32
    route. Besides ``H`` the memory is one float64 and one float32 ``n × n`` matrix (0.38 GB for the
    5632-wide ``down_proj`` of a 1.1B LLaMA); with ``overwrite`` the result is written over ``hessian`` itself
    (once ``R`` exists), saving the latter.

    If the factorization fails (H numerically indefinite) the dampening is multiplied by 10 until it
    succeeds, and a warning says so. Returns the factor and the dampening fraction used.
    """
    n = hessian.shape[0]
    mean_diag = torch.mean(torch.diag(hessian)).item()
    damp = percdamp
    f64 = {"dtype": torch.float64, "device": hessian.device}
    blocks = [(a, min(a + FACTOR_CHUNK, n)) for a in range(0, n, FACTOR_CHUNK)]
    for _ in range(8):
        try:
            r = hessian.to(**f64, copy=True)
            r.diagonal().add_(damp * mean_diag)
            upper_cholesky_(r)
        except torch.linalg.LinAlgError:
            new_damp = damp * 10 if damp > 0 else 1e-4
            log.warning(
                "Cholesky failed for %s with dampening %.2g; retrying with %.2g",
                layer or "a layer",
                damp,
                new_damp,
            )
            damp = new_damp
            continue
        u = hessian if overwrite else torch.empty_like(hessian)
        u.copy_(r)  # R, in float32
        eye = torch.eye(FACTOR_CHUNK, **f64)
        inv_diag = [  # R_cc⁻¹ from float64
            torch.linalg.solve_triangular(r[a:b, a:b], eye[: b - a, : b - a], upper=True).to(u.dtype) for a, b in blocks
        ]
        del r
        for c, (c0, c1) in enumerate(blocks):
            for i0, i1 in blocks[:c]:  # top down: row block i reads rows i0.. of block column c, not yet rewritten
                u[i0:i1, c0:c1] = (u[i0:i1, i0:c0] @ u[i0:c0, c0:c1]).neg_() @ inv_diag[c]
            u[c0:c1, c0:c1] = inv_diag[c]
        return u, damp
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
    # The sweep runs on Wᵀ: column j of W is the contiguous row j of WT, so every per-column read and
    # rank-1 update walks memory in order (on a CPU this is what the column loop's time goes to).
    WT = weight.detach().float().t().contiguous()  # a copy: the caller's weight is not touched
    H = hessian.detach().float()
    cols = WT.shape[0]

    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter, so drop them
    own = consume_hessian or H.data_ptr() != hessian.data_ptr()  # may the solve write over H?
    if dead.any():
        H = H if own else H.clone()  # copied only when it must change
        own = True
        H[dead, dead] = 1.0
        WT[dead] = 0.0

    Hinv, damp = inverse_hessian_cholesky(H, percdamp, layer, overwrite=own)
    del H
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=WT.device)
    row_loss = torch.zeros(rows, dtype=torch.float32, device=WT.device)

    inner = _inner_width(pattern.m if pattern.is_nm else 1)
    for b0 in range(0, cols, blocksize):
        with sweep_threads(WT.device):  # the block's many small operations; the lazy update below uses all threads
            b1 = min(b0 + blocksize, cols)
            WbT = WT[b0:b1]  # a view: updates inside the block land in WT directly
            Hb = Hinv[b0:b1, b0:b1]
            d = torch.diag(Hb)
            errT = torch.zeros_like(WbT)  # row j: (w_j − q_j) / U_jj of block column j
            block_mask = torch.zeros((rows, b1 - b0), dtype=torch.bool, device=WT.device)
            if not pattern.is_nm:  # the lowest saliencies w²/U_jj² of each segment's rows in this block
                saliency = (WbT**2 / d.unsqueeze(1) ** 2).t().contiguous()
                for r0, r1, s_seg in bounds:
                    k = round((r1 - r0) * (b1 - b0) * s_seg)
                    block_mask[r0:r1] = lowest_k(saliency[r0:r1].reshape(1, -1), k).reshape(r1 - r0, b1 - b0)

            # Mask fixed for the whole block (unstructured, no quantizer): each column's error is one division,
            # by U_jj where the weight is pruned and by +inf (giving an exact 0) where it is kept.
            fixed = not pattern.is_nm and quantizer is None
            pruned_t = block_mask.t().contiguous().float() if fixed else None  # [width, rows]: 1 where pruned
            divisor = d.unsqueeze(1) / pruned_t if fixed else None  # U_jj / 1 = U_jj, U_jj / 0 = +inf
            flushed = 0  # errors of columns b0 .. b0+flushed-1 already applied right of the block
            pending = 0  # errors of block columns pending .. j-1 not yet applied past the current sub-block
            if divisor is not None:  # plain pruning: w − q is w where pruned, 0 where kept (both exact)
                w_rows, e_rows, v_rows, h_rows = WbT.unbind(0), errT.unbind(0), divisor.unbind(0), Hb.unbind(0)
                for s0 in range(0, b1 - b0, inner):
                    if s0 > 0:  # the block's rest receives the last sub-block's errors
                        WbT[s0:].addmm_(Hb[s0 - inner : s0, s0:].t(), errT[s0 - inner : s0], alpha=-1.0)
                    s1 = min(b1 - b0, s0 + inner)
                    for j in range(s0, s1):
                        e = torch.div(w_rows[j], v_rows[j], out=e_rows[j])
                        if j + 1 < s1:  # column j itself is left as it is: zeroed where pruned once the block is done
                            WbT[j + 1 : s1].addr_(h_rows[j][j + 1 : s1], e, alpha=-1.0)
                WbT.addcmul_(WbT, pruned_t, value=-1.0)  # w − w·1 = 0 exactly where pruned, w − w·0 = w where kept
            for j in range(b1 - b0 if divisor is None else 0):
                pos = b0 + j
                # a sub-block starts: the block's rest receives the last one's errors
                if j % inner == 0 and j > pending:
                    WbT[j:].addmm_(Hb[pending:j, j:].t(), errT[pending:j], alpha=-1.0)
                    pending = j
                s1 = min(b1 - b0, (j // inner + 1) * inner)  # end of the sub-block: updates up to it are immediate
                end = None if quantizer is None else quantizer.group_end(pos)
                if end is not None:
                    pending, flushed = catch_up_for_group(WT, Hinv, errT, b0, b1, j, s1, end, pending, flushed)
                    quantizer.set_group(pos, WT[pos:end].t())
                if pattern.is_nm and j % pattern.m == 0:
                    group = WbT[j : j + pattern.m].t() ** 2 / d[j : j + pattern.m].unsqueeze(0) ** 2
                    drop = torch.topk(group, pattern.m - pattern.n, dim=1, largest=False).indices
                    block_mask[:, j : j + pattern.m].scatter_(1, drop, True)
                w = WbT[j]
                q = w.masked_fill(block_mask[:, j], 0.0)
                if quantizer is not None:
                    q = quantizer.quantize(q, pos).masked_fill_(block_mask[:, j], 0.0)
                e = (w - q) / d[j]
                # OBS update of the sub-block's remaining columns; column j itself becomes q.
                WbT[j:s1].addr_(Hb[j, j:s1], e, alpha=-1.0)
                WbT[j] = q
                errT[j] = e
        # Lazy batch update: everything right of the block receives the block's (remaining) errors at once.
        WT[b1:].addmm_(Hinv[b0 + flushed : b1, b1:].t(), errT[flushed:], alpha=-1.0)
        row_loss += 0.5 * (errT**2).sum(0)  # ½ Σ (w − q)² / U_jj², with err = (w − q) / U_jj
        mask[:, b0:b1] = block_mask

    del Hinv
    W = WT.t().contiguous()  # pruned entries are exactly zero: set as each column (or block) was finished
    del WT
    return SparseGPTResult(weight=W, mask=mask, damping=damp, loss=row_loss.sum().item(), row_loss=row_loss)
