"""The Optimal-Brain-Surgeon column sweep that SparseGPT and GPTQ share: factor, lazy updates, threads.

For a layer ``y = W x`` with calibration inputs ``X`` the layer-wise loss ``||WX − ŴX||²`` has Hessian
``H = 2 X Xᵀ``, the same for every row of ``W``. Let ``U`` be the upper Cholesky factor of ``(H + λI)⁻¹``
(``H⁻¹ = UᵀU``; :func:`inverse_hessian_cholesky`). Columns are fixed left to right; when column ``j`` is
replaced by ``q_j`` (pruned, rounded or both: the method's choice), its scaled error ``e = (w_j − q_j) / U_jj``
is spread onto the columns not yet fixed as ``W[:, j:] −= e · U[j, j:]``, at a cost of
``½ Σ (w_j − q_j)² / U_jj²`` (row ``j`` of ``U`` already holds the inverse Hessian of the columns still free).

This module holds what does not depend on how ``q_j`` is chosen: the damped factor ``U`` and the order of
the update arithmetic. The sweep runs on ``Wᵀ`` (column ``j`` of ``W`` is the contiguous row ``j``) and
applies the updates lazily at two levels, which changes only the order of the arithmetic: a block of
``blocksize`` columns is swept on one CPU thread (:func:`sweep_threads`); inside it, a column's update
reaches the rest of its sub-block of ``inner`` columns at once (the method writes that rank-1 update), the
block's later columns receive a finished sub-block's errors as one product (:meth:`Block.columns`), and the
columns right of the block the whole block's errors when it ends (:meth:`Sweep.block`). A method that reads
columns beyond the current sub-block before they are due (a quantization group's grid) first calls
:meth:`Block.catch_up`, so everything it reads is up to date.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lmcompress.job_options import check_percdamp

log = logging.getLogger(__name__)

INNER = 16  # columns updated one by one inside a sub-block; the rest of the block gets them as one product
FACTOR_CHUNK = 256  # rows and columns of the blocks of R in inverse_hessian_cholesky
CHOLESKY_PANEL = 128  # columns per panel of upper_cholesky_
BASE_DAMP = 0.01  # the standard dampening fraction (the GPTQ and SparseGPT papers'), and ``auto``'s usual value
AUTO_FEW_TOKENS = 0.1  # ``auto``: the fraction for a layer whose Hessian summed fewer tokens than it has inputs


def damping_fraction(percdamp: float | str, inputs: int, tokens: int | None = None) -> float:
    """The dampening fraction ``p`` of ``λ = p · mean(diag H)`` for a layer with ``inputs`` inputs whose Hessian
    ``H = 2XᵀX / tokens`` summed ``tokens`` calibration tokens: ``percdamp`` itself, or for ``"auto"``

        p = BASE_DAMP        if tokens ≥ inputs (or tokens unknown),
        p = AUTO_FEW_TOKENS  if tokens < inputs.

    With fewer tokens than inputs ``H`` has rank at most ``tokens``: its null space is held up only by ``λ``, and
    with ``BASE_DAMP`` the solve moves weights freely along directions the calibration never saw, which other
    tokens do use (GPTQ over-fits the calibration windows; on Qwen models whose ``down_proj`` reads 8,960 inputs
    and a massive activation, it ends worse than round-to-nearest).
    """
    percdamp = check_percdamp(percdamp)
    if percdamp != "auto":
        return percdamp
    return AUTO_FEW_TOKENS if tokens is not None and tokens < inputs else BASE_DAMP


@contextmanager
def sweep_threads(device: torch.device) -> Iterator[None]:
    """Run a column sweep's operations on one thread on a CPU, and restore the thread count after.

    Inside a block of columns the sweep is thousands of small operations (one rank-1 update per column):
    waking a second thread for each costs more than it saves where threads sleep between operations or run in
    a worker thread, as the engine's solves do (SmolLM2 at two threads: 1.4–1.7× faster this way); where they
    spin in the main thread it costs 5–10 % (bench/HISTORY.md, "Whole-process speed vs llm-compressor"). The
    lazy updates between blocks are large matrix products and run outside, on all threads.
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


def damping_raised(used: float, percdamp: float | str) -> bool:
    """Whether a solve used more dampening than ``percdamp`` names (for ``"auto"``: more than ``BASE_DAMP``), so the
    report can list the layer: its factorization failed and was retried, or ``auto`` raised it."""
    return used > (BASE_DAMP if percdamp == "auto" else float(percdamp))


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
    hessian: torch.Tensor, percdamp: float | str, layer: str = "", *, overwrite: bool = False
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = p · mean(diag H)``: ``p = percdamp`` (``"auto"``, whose
    token count the caller resolves with :func:`damping_fraction`, is ``BASE_DAMP`` here).

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
    diag = torch.diag(hessian)
    mean_diag = torch.mean(diag).item()
    damp = damping_fraction(percdamp, len(hessian))
    for _ in range(8):
        try:
            r = hessian.to(dtype=torch.float64, device=hessian.device, copy=True)
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
        inv_diag = _diagonal_inverses(r, u.dtype)
        del r
        return _invert_upper_(u, inv_diag), damp
    raise RuntimeError(f"Hessian of {layer or 'layer'} is not positive definite even with dampening {damp}")


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + FACTOR_CHUNK, n)) for a in range(0, n, FACTOR_CHUNK)]


def _diagonal_inverses(r: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """``R_cc⁻¹`` of each diagonal block of ``R`` (float64), stored in ``dtype``."""
    eye = torch.eye(FACTOR_CHUNK, dtype=r.dtype, device=r.device)
    return [
        torch.linalg.solve_triangular(r[a:b, a:b], eye[: b - a, : b - a], upper=True).to(dtype)
        for a, b in _chunks(len(r))
    ]


def _invert_upper_(u: torch.Tensor, inv_diag: list[torch.Tensor]) -> torch.Tensor:
    """``u`` (holding ``R``) becomes ``U = R⁻¹`` by block columns, as :func:`inverse_hessian_cholesky` says."""
    blocks = _chunks(len(u))
    for c, (c0, c1) in enumerate(blocks):
        for i0, i1 in blocks[:c]:  # top down: row block i reads rows i0.. of block column c, not yet rewritten
            u[i0:i1, c0:c1] = (u[i0:i1, i0:c0] @ u[i0:c0, c0:c1]).neg_() @ inv_diag[c]
        u[c0:c1, c0:c1] = inv_diag[c]
    return u


def usable_hessian(
    hessian: torch.Tensor, device: torch.device, consume: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``hessian`` as float32 on ``device``, with inputs that never fire (``H_jj = 0``) given ``H_jj = 1``.

    Their weights cannot matter to the loss (the caller zeroes them); the unit diagonal keeps ``H``
    positive definite without touching the other columns. Returns ``(H, dead, own)``: ``dead`` marks those
    inputs, ``own`` whether the solve may write over ``H`` (a copy, or ``consume``). ``hessian`` is copied only
    where it must change and may not be consumed.
    """
    H = hessian.detach().float().to(device)
    dead = torch.diag(H) == 0
    own = consume or H.data_ptr() != hessian.data_ptr()
    if dead.any():
        H = H if own else H.clone()
        own = True
        H[dead, dead] = 1.0
    return H, dead, own


class Block:
    """Columns ``b0:b1`` of a :class:`Sweep`: ``W`` (rows ``b0:b1`` of ``Wᵀ``, a view, so updates land in the
    whole), ``U`` (the diagonal block of the factor) and ``err``.

    For each column ``j`` that :meth:`columns` yields, with its sub-block end ``s1``, the method chooses
    ``q_j``, stores ``err[j] = e = (w_j − q_j) / U_jj``, applies ``W[j:s1] −= U[j, j:s1] ⊗ e`` (``Wᵀ``'s
    layout) and sets ``W[j] = q_j`` (at the latest when the block ends); the block and the sweep apply the rest
    of each update lazily.
    """

    def __init__(self, WT: torch.Tensor, factor: torch.Tensor, b0: int, b1: int, inner: int) -> None:
        self.WT, self.factor, self.b0, self.b1, self.inner = WT, factor, b0, b1, inner
        self.W = WT[b0:b1]
        self.U = factor[b0:b1, b0:b1]
        self.err = torch.zeros_like(self.W)
        self.pending = 0  # errors of block columns pending .. j−1 not yet applied past the current sub-block
        self.flushed = 0  # errors of block columns 0 .. flushed−1 already applied right of the block

    def columns(self) -> Iterator[tuple[int, int]]:
        """The block's columns ``j`` with the end ``s1`` of their sub-block, up to which the method applies a
        column's update at once; when a sub-block starts, the block's rest first receives the errors not yet
        applied to it, ``W[:, j:] −= E[:, pending:j] U[pending:j, j:]``."""
        width = self.b1 - self.b0
        for j in range(width):
            if j % self.inner == 0 and j > self.pending:
                self.W[j:].addmm_(self.U[self.pending : j, j:].t(), self.err[self.pending : j], alpha=-1.0)
                self.pending = j
            yield j, min(width, (j // self.inner + 1) * self.inner)

    def catch_up(self, j: int, s1: int, end: int) -> None:
        """Bring columns up to ``end`` (exclusive, absolute) up to date before they are read at column ``j``
        (sub-block end ``s1``): the block's columns past the sub-block receive the errors of columns
        ``pending .. j−1``, and, when ``end`` reaches past the block, every column right of it those of
        columns ``flushed .. j−1``."""
        b0, b1 = self.b0, self.b1
        if j > self.pending:
            self.WT[b0 + s1 : b1].addmm_(
                self.factor[b0 + self.pending : b0 + j, b0 + s1 : b1].t(), self.err[self.pending : j], alpha=-1.0
            )
            self.pending = j
        if end > b1 and j > self.flushed:
            self.WT[b1:].addmm_(
                self.factor[b0 + self.flushed : b0 + j, b1:].t(), self.err[self.flushed : j], alpha=-1.0
            )
            self.flushed = j


class Sweep:
    """The column sweep of ``WT`` (``Wᵀ``, updated in place) with factor ``U`` by blocks of ``blocksize``.

    ``row_loss`` accumulates ``½ Σ_j e_j²`` per row of ``W`` (``e_j = (w_j − q_j) / U_jj``) as blocks finish.
    """

    def __init__(self, WT: torch.Tensor, factor: torch.Tensor, blocksize: int, inner: int) -> None:
        self.WT, self.factor, self.blocksize, self.inner = WT, factor, blocksize, inner
        self.row_loss = torch.zeros(WT.shape[1], dtype=torch.float32, device=WT.device)

    def starts(self) -> range:
        """The first column of each block."""
        return range(0, self.WT.shape[0], self.blocksize)

    @contextmanager
    def block(self, b0: int) -> Iterator[Block]:
        """The block starting at ``b0``, swept on one thread; when the body finishes, the columns right of it
        receive its remaining errors at once, ``W[:, b1:] −= E[:, flushed:] U[b0+flushed:b1, b1:]``, on all
        threads, and its loss is added to ``row_loss``."""
        b1 = min(b0 + self.blocksize, self.WT.shape[0])
        with sweep_threads(self.WT.device):
            block = Block(self.WT, self.factor, b0, b1, self.inner)
            yield block
        f = block.flushed
        self.WT[b1:].addmm_(self.factor[b0 + f : b1, b1:].t(), block.err[f:], alpha=-1.0)
        self.row_loss += 0.5 * (block.err**2).sum(0)
