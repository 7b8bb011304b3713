"""SparseGPT and GPTQ checked against textbook versions of the papers' Algorithm 1.

The oracles below are the straightforward loops: float64, the factor by the textbook route (invert, then
Cholesky), every column's update applied at once to all later columns, no lazy blocks, no sub-blocks, no
threads. The fast code (float32, lazy updates at two levels, a blocked factor) equals them in exact arithmetic;
what remains is rounding, so the comparisons are:

* weights and losses up to a float32 tolerance (measured differences are far below it);
* the same pruning masks, on data whose selections have no near-ties (checked: the saliency gap at every
  threshold is far above float32 rounding, so a different order of the arithmetic cannot flip a choice);
* the same quantization codes in nearly every row: a weight that float32 rounding moves across a rounding
  boundary gets the next code, and its row then spreads a different error onto its later columns (rows are
  independent given H), so a few rows may differ from there on; in each of them the first different code
  must sit at a tie (the oracle's value within 10⁻³ of a step of a rounding boundary), and the rows that
  agree agree to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

from lmcompress.algorithms import Pattern, sparsegpt_prune
from lmcompress.algorithms.gptq import ColumnQuantizer, gptq_quantize
from lmcompress.algorithms.quant import QuantSpec

PERCDAMP = 0.01


def layer(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 weight and the Hessian ``2XᵀX/n`` of correlated inputs with uneven scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(3 * cols, cols, generator=gen) @ mix * (0.5 + torch.rand(cols, generator=gen))
    return torch.randn(rows, cols, generator=gen), 2 * x.t() @ x / len(x)


def textbook_factor(h: torch.Tensor) -> torch.Tensor:
    """``U`` with ``(H + λI)⁻¹ = UᵀU``, upper triangular, as the papers write it: Cholesky(H⁻¹)ᵀ."""
    damped = h.double() + PERCDAMP * h.double().diagonal().mean() * torch.eye(len(h), dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)


def textbook_grid(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per row of a group ``w``: scale and zero point (0 always on the grid)."""
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if spec.sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    lo, hi = torch.where(hi == lo, -1.0, lo), torch.where(hi == lo, 1.0, hi)
    scale = (hi - lo) / spec.maxq
    zero = torch.full_like(scale, (spec.maxq + 1) // 2) if spec.sym else torch.round(-lo / scale)
    return scale, zero


def to_tie(x: torch.Tensor) -> torch.Tensor:
    """Distance of ``x`` (in grid steps) to the nearest rounding boundary ``k + ½``."""
    return (x - torch.floor(x) - 0.5).abs()


def textbook_sparsegpt(w, h, sparsity, pattern, blocksize, spec=None):
    """SparseGPT, Algorithm 1 (plus N:M and the joint quantization of the paper's section 3.5), unoptimized.
    Returns the weight, the mask, the loss ``½ Σ e²``, the codes with each one's distance to a rounding tie,
    and the smallest relative saliency gap at a selection threshold."""
    W, U = w.double().clone(), textbook_factor(h)
    rows, cols = W.shape
    M = torch.zeros(rows, cols, dtype=torch.bool)
    codes, tie, loss, gap = torch.zeros(rows, cols), torch.ones(rows, cols), 0.0, float("inf")
    for j in range(cols):
        if spec is not None and j % spec.width(cols) == 0:  # the group's grid, from its current weights
            scale, zero = textbook_grid(W[:, j : j + spec.width(cols)], spec)
        if not pattern.is_nm and j % blocksize == 0:  # mask the block's lowest w²/U_cc²
            s = (W[:, j : j + blocksize] ** 2 / U.diagonal()[j : j + blocksize] ** 2).flatten()
            k = round(len(s) * sparsity)
            order = torch.sort(s).values
            M[:, j : j + blocksize] = (s < order[k]).reshape(rows, -1) if k < len(s) else True
            gap = min(gap, ((order[k] - order[k - 1]) / order[k]).item()) if 0 < k < len(s) else gap
        if pattern.is_nm and j % pattern.m == 0:  # in each row, mask the group's M − N lowest w²/U_cc²
            s = W[:, j : j + pattern.m] ** 2 / U.diagonal()[j : j + pattern.m] ** 2
            order = torch.sort(s, dim=1).values
            drop = pattern.m - pattern.n
            M[:, j : j + pattern.m] = s < order[:, drop : drop + 1]
            gap = min(gap, ((order[:, drop] - order[:, drop - 1]) / order[:, drop]).min().item())
        q = W[:, j].masked_fill(M[:, j], 0.0)
        if spec is not None:
            codes[:, j], tie[:, j] = torch.clamp(torch.round(q / scale) + zero, 0, spec.maxq), to_tie(q / scale)
            q = ((codes[:, j] - zero) * scale).masked_fill(M[:, j], 0.0)
        e = (W[:, j] - q) / U[j, j]
        W[:, j:] -= torch.outer(e, U[j, j:])  # OBS: the error spread onto the columns not yet fixed
        W[:, j] = q
        loss += 0.5 * (e**2).sum().item()
    return W, M, loss, (codes, tie), gap


def textbook_gptq(w, h, spec, act_order=False, static_groups=False):
    """GPTQ, Algorithm 1 (with the reference code's groups, act-order and static groups), unoptimized.
    Returns the weight, the loss ``½ Σ e²``, and the codes with each one's distance to a rounding tie and the
    processing order (all in the original column order)."""
    W, H = w.double().clone(), h.double()
    rows, cols = W.shape
    g = spec.width(cols)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols)
    static = [textbook_grid(W[:, c : c + g], spec) for c in range(0, cols, g)] if static_groups else None
    W, U = W[:, perm], textbook_factor(H[perm][:, perm])
    codes, tie, loss = torch.zeros(rows, cols), torch.ones(rows, cols), 0.0
    for j in range(cols):
        if static is not None:  # the grid of the column's original group
            scale, zero = static[perm[j].item() // g]
        elif j % g == 0:  # a group starts: its grid from its current weights
            scale, zero = textbook_grid(W[:, j : j + g], spec)
        codes[:, j], tie[:, j] = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, spec.maxq), to_tie(W[:, j] / scale)
        q = (codes[:, j] - zero) * scale
        e = (W[:, j] - q) / U[j, j]
        W[:, j:] -= torch.outer(e, U[j, j:])  # OBS: the error spread onto the columns not yet quantized
        W[:, j] = q
        loss += 0.5 * (e**2).sum().item()
    inverse = torch.argsort(perm)
    return W[:, inverse], loss, (codes[:, inverse], tie[:, inverse], perm)


def assert_close(fast: torch.Tensor, oracle: torch.Tensor) -> None:
    """float32 against float64: within 10⁻⁴ of the weights' scale (measured: about 10⁻⁶)."""
    scale = oracle.abs().max().item()
    err = (fast.double() - oracle).abs().max().item()
    assert err <= 1e-4 * scale, f"max difference {err:.3g} at weight scale {scale:.3g}"


def assert_codes_equal_but_after_ties(fast: torch.Tensor, oracle: tuple, rows: int = 2) -> torch.Tensor:
    """At most ``rows`` rows with a different code, each first (in processing order) at a rounding tie of the
    oracle's. Returns the rows that agree entirely."""
    codes, tie, *order = oracle
    order = order[0] if order else torch.arange(codes.shape[1])
    differ = fast.float() != codes
    bad = differ.any(1)
    assert int(bad.sum()) <= rows, f"{int(bad.sum())} rows of {len(bad)} have different codes"
    for r in bad.nonzero().flatten().tolist():
        first = order[differ[r, order].nonzero()[0, 0]]
        assert tie[r, first] < 1e-3, f"row {r} column {first}: a code differs {tie[r, first]:.3g} steps from a tie"
    return ~bad


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_unstructured_equals_the_textbook_loop(sparsity):
    w, h = layer(40, 160, seed=1)  # blocks of 64: the last one shorter; sub-blocks of 16 inside
    W, M, loss, _, gap = textbook_sparsegpt(w, h, sparsity, Pattern(), blocksize=64)
    assert gap > 1e-4  # no near-tie at a threshold: float32 rounding (~1e-6) cannot flip a choice
    fast = sparsegpt_prune(w, h, sparsity, blocksize=64)
    assert torch.equal(fast.mask, M)
    assert_close(fast.weight, W)
    assert fast.loss == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8)])
def test_sparsegpt_nm_equals_the_textbook_loop(pattern):
    w, h = layer(32, 128, seed=2)
    W, M, loss, _, gap = textbook_sparsegpt(w, h, 0.5, pattern, blocksize=32)
    assert gap > 1e-5
    fast = sparsegpt_prune(w, h, 0.5, pattern, blocksize=32)
    assert torch.equal(fast.mask, M)
    assert_close(fast.weight, W)
    assert fast.loss == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_joint_sparsegpt_quantization_equals_the_textbook_loop(pattern):
    """Groups of 48 with blocks of 32: groups start inside sub-blocks and reach past blocks (catch-up)."""
    w, h = layer(32, 144, seed=3)
    spec = QuantSpec(4, 48)
    W, M, loss, codes, gap = textbook_sparsegpt(w, h, 0.5, pattern, blocksize=32, spec=spec)
    assert gap > 1e-5
    quantizer = ColumnQuantizer(spec, tuple(w.shape))
    fast = sparsegpt_prune(w, h, 0.5, pattern, blocksize=32, quantizer=quantizer)
    same = assert_codes_equal_but_after_ties(quantizer.result().codes, codes)
    assert torch.equal(fast.mask[same], M[same])
    assert_close(fast.weight[same], W[same])
    assert fast.loss == pytest.approx(loss, rel=1e-2)  # a row that took another code carries ~1/32 of it


@pytest.mark.parametrize(
    ("spec", "act_order", "static_groups"),
    [
        (QuantSpec(3, 40), False, False),  # groups start inside sub-blocks and reach past blocks of 32
        (QuantSpec(4, 40, sym=False), True, False),  # groups in processing order (g_idx)
        (QuantSpec(3, 40), True, True),  # grids fixed up front in natural order, columns in act-order
        (QuantSpec(4, -1), True, False),  # one grid per row
    ],
)
def test_gptq_equals_the_textbook_loop(spec, act_order, static_groups):
    w, h = layer(48, 120, seed=4)
    W, loss, codes = textbook_gptq(w, h, spec, act_order, static_groups)
    fast = gptq_quantize(w, h, spec, blocksize=32, act_order=act_order, static_groups=static_groups)
    same = assert_codes_equal_but_after_ties(fast.quantized.codes, codes)
    assert_close(fast.weight[same], W[same])
    assert torch.equal(fast.quantized.dequantize(), fast.weight)
    assert fast.loss == pytest.approx(loss, rel=1e-2)
