"""The pruning algorithms as pure tensor functions, checked against direct computations."""

from __future__ import annotations

import logging

import pytest
import torch

from lmcompress.algorithms import (
    Pattern,
    magnitude_mask,
    mask_from_scores,
    outlier_ratio,
    owl_layer_sparsities,
    sparsegpt_prune,
    wanda_mask,
)
from lmcompress.algorithms.obs import inverse_hessian_cholesky


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Calibration inputs with correlated features and a few large-magnitude (outlier) channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + mix)
    x[:, : max(1, d // 16)] *= 8.0
    return x


def test_pattern_parse():
    assert Pattern.parse("2:4") == Pattern(2, 4)
    assert Pattern.parse("unstructured") == Pattern()
    assert Pattern.parse("4:8").sparsity == 0.5
    assert Pattern.parse("1:4").sparsity == 0.75
    for bad in ("2-4", "4:2", "0:4", "4:4", "a:b", "2:4:8"):
        with pytest.raises(ValueError, match=r"N:M|pattern"):
            Pattern.parse(bad)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_masks_are_exact(sparsity):
    w = torch.randn(48, 96)
    per_row = mask_from_scores(w.abs(), sparsity, per_row=True)
    assert (per_row.sum(1) == round(96 * sparsity)).all()
    layer = magnitude_mask(w, sparsity)
    assert layer.sum().item() == round(w.numel() * sparsity)


def test_magnitude_mask_is_a_layer_threshold():
    w = torch.randn(32, 64)
    mask = magnitude_mask(w, 0.6)
    assert w[mask].abs().max() <= w[~mask].abs().min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_masks_hold_the_pattern(pattern):
    p = Pattern.parse(pattern)
    w = torch.randn(16, 64)
    for mask in (magnitude_mask(w, 0.0, p), wanda_mask(w, torch.rand(64), 0.0, p)):
        assert (mask.reshape(16, -1, p.m).sum(-1) == p.m - p.n).all()
    # magnitude N:M: in every group each kept |w| is at least every dropped |w|
    mask = magnitude_mask(w, 0.0, p).reshape(16, -1, p.m)
    a = w.abs().reshape(16, -1, p.m)
    kept_min = a.masked_fill(mask, float("inf")).min(-1).values
    dropped_max = a.masked_fill(~mask, -1.0).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_nm_rejects_indivisible_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        magnitude_mask(torch.randn(4, 10), 0.5, Pattern(2, 4))


def test_wanda_mask_matches_its_formula():
    torch.manual_seed(0)
    w = torch.randn(6, 12)
    x = correlated_inputs(50, 12)
    norms = (x**2).sum(0)
    mask = wanda_mask(w, norms, 0.5)
    # Direct computation in double precision: per row, the 6 smallest |W_ij| * ||X_j||_2 are dropped. The mask
    # is computed in float32, so two scores closer than its rounding may be ordered either way: compare scores
    # (every dropped score at most every kept one, up to float32 rounding), not index sets.
    for i in range(6):
        score = [abs(w[i, j].item()) * sum(x[t, j].item() ** 2 for t in range(50)) ** 0.5 for j in range(12)]
        dropped = [score[j] for j in range(12) if mask[i, j]]
        kept = [score[j] for j in range(12) if not mask[i, j]]
        assert len(dropped) == 6 and max(dropped) <= min(kept) * (1 + 1e-5)
    # N:M: within each group of 4, the 2 lowest scores are dropped
    mask = wanda_mask(w, norms, 0.5, Pattern(2, 4))
    score = w.double().abs() * (x.double() ** 2).sum(0).sqrt()
    groups, drop = score.reshape(6, 3, 4), mask.reshape(6, 3, 4)
    assert (drop.sum(-1) == 2).all()
    dropped_max = groups.masked_fill(~drop, -1.0).max(-1).values
    kept_min = groups.masked_fill(drop, float("inf")).min(-1).values
    assert (dropped_max <= kept_min * (1 + 1e-5)).all()


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.norm(x @ w.t() - x @ w_hat.t()).item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction(pattern):
    torch.manual_seed(0)
    p = Pattern.parse(pattern)
    w = torch.randn(64, 256)
    x = correlated_inputs(2048, 256)
    h = 2 * x.t() @ x / x.shape[0]
    res = sparsegpt_prune(w, h, 0.5, p, blocksize=64)
    mag = w.masked_fill(magnitude_mask(w, 0.5, p), 0)
    wan = w.masked_fill(wanda_mask(w, (x**2).sum(0), 0.5, p), 0)
    err_sgpt = reconstruction_error(w, res.weight, x)
    assert err_sgpt < reconstruction_error(w, mag, x)
    assert err_sgpt < reconstruction_error(w, wan, x)
    assert torch.equal(res.weight == 0, res.mask)


def test_sparsegpt_sparsity_is_exact_per_block():
    torch.manual_seed(1)
    w = torch.randn(32, 200)  # last block narrower than the others
    x = correlated_inputs(500, 200)
    res = sparsegpt_prune(w, 2 * x.t() @ x / 500, 0.6, blocksize=64)
    for b0 in range(0, 200, 64):
        block = res.mask[:, b0 : b0 + 64]
        assert block.sum().item() == round(block.numel() * 0.6)
    assert (res.weight[res.mask] == 0).all()


def test_sparsegpt_nm_pattern_exact():
    torch.manual_seed(2)
    w = torch.randn(16, 128)
    x = correlated_inputs(400, 128)
    res = sparsegpt_prune(w, 2 * x.t() @ x / 400, 0.5, Pattern(2, 4))
    assert ((res.weight.reshape(16, -1, 4) != 0).sum(-1) <= 2).all()
    assert (res.mask.reshape(16, -1, 4).sum(-1) == 2).all()


def test_sparsegpt_at_zero_sparsity_keeps_weights():
    w = torch.randn(8, 32)
    x = correlated_inputs(100, 32)
    res = sparsegpt_prune(w, 2 * x.t() @ x / 100, 0.0)
    assert torch.allclose(res.weight, w, atol=1e-5)


def test_sparsegpt_dead_inputs_are_pruned_first():
    w = torch.randn(8, 32)
    x = correlated_inputs(100, 32)
    x[:, 5] = 0.0  # an input that never fires
    res = sparsegpt_prune(w, 2 * x.t() @ x / 100, 0.25)
    assert (res.weight[:, 5] == 0).all()


def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse():
    x = correlated_inputs(200, 48).double()
    h = 2 * x.t() @ x / 200
    u, damp = inverse_hessian_cholesky(h, 0.01)
    assert damp == 0.01
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(48, dtype=h.dtype)
    assert torch.equal(u, torch.triu(u)) and bool((torch.diag(u) > 0).all())
    assert torch.allclose(u.t() @ u, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)
    # the factor is unique, so it equals the textbook route: invert, then factorize again
    assert torch.allclose(u, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [1, 100, 128, 300])
def test_upper_cholesky_factors_in_place_from_the_last_column(n):
    """``A = R Rᵀ`` with R upper triangular, positive diagonal, for sizes below, at and across panel
    boundaries; it equals LAPACK's factor of the reversed matrix, reversed back (the factor is unique)."""
    from lmcompress.algorithms.obs import upper_cholesky_

    x = correlated_inputs(2 * n + 10, n).double()
    a = x.t() @ x + 1e-3 * torch.eye(n, dtype=torch.float64)
    r = upper_cholesky_(a.clone(), panel=64)
    assert torch.equal(r, r.triu()) and bool((r.diagonal() > 0).all())
    assert torch.allclose(r @ r.t(), a, rtol=1e-10, atol=1e-10)
    assert torch.allclose(r, torch.linalg.cholesky(a.flip(0, 1)).flip(0, 1), rtol=1e-8, atol=1e-10)
    with pytest.raises(torch.linalg.LinAlgError):
        upper_cholesky_(-a.clone(), panel=64)


def test_sparsegpt_sweep_restores_the_thread_count():
    """The column sweeps (SparseGPT, GPTQ) run their small operations on one CPU thread; the caller's thread
    count comes back, also when the solve fails inside the sweep."""
    from lmcompress.algorithms.gptq import gptq_quantize
    from lmcompress.algorithms.quant import QuantSpec
    from lmcompress.algorithms.sparsegpt import sparsegpt_prune

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = correlated_inputs(300, 64)
        h = 2 * x.t() @ x / 300
        sparsegpt_prune(torch.randn(16, 64), h, 0.5, blocksize=32)
        assert torch.get_num_threads() == 2
        gptq_quantize(torch.randn(16, 64), h, QuantSpec(bits=4, group_size=16), blocksize=32)
        assert torch.get_num_threads() == 2

        class Broken:
            def group_end(self, pos):
                return pos + 8 if pos % 8 == 0 else None

            def set_group(self, pos, weights):
                raise RuntimeError("grid failed")

        with pytest.raises(RuntimeError, match="grid failed"):
            sparsegpt_prune(torch.randn(16, 64), h, 0.5, blocksize=32, quantizer=Broken())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_failed_cholesky_raises_dampening_and_says_so(caplog):
    h = torch.diag(torch.tensor([1.0, 1.0, -1.5, 1.0]))  # indefinite: plain 1% dampening is not enough
    with caplog.at_level(logging.WARNING):
        _, damp = inverse_hessian_cholesky(h, 0.01, "layer.x")
    assert damp > 0.01
    assert "Cholesky failed for layer.x" in caplog.text


def test_owl_mean_equals_target_and_order_follows_outliers():
    ratios = [0.01, 0.05, 0.02, 0.08, 0.03]
    s = owl_layer_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers → less pruning


def test_owl_shrinks_instead_of_clipping():
    s = owl_layer_sparsities([0.0, 1.0, 1.0, 1.0], 0.9, 0.4)
    assert all(0.0 <= v < 1.0 for v in s)
    assert sum(s) / 4 == pytest.approx(0.9)


def test_owl_equal_ratios_give_uniform():
    assert owl_layer_sparsities([0.1, 0.1, 0.1], 0.5, 0.08) == [0.5, 0.5, 0.5]


def test_outlier_ratio_counts_large_scores():
    scores = [torch.ones(10, 10), torch.ones(10)]
    scores[0][0, :5] = 100.0
    mean = (105 * 1 + 500) / 110
    assert outlier_ratio(scores, 5.0) == pytest.approx(5 / 110)
    assert 5 * mean < 100


@pytest.mark.parametrize("k", [0, 1, 7, 20, 31, 32])
def test_lowest_k_takes_exactly_k_per_row_with_ties_by_index(k):
    """The selection equals a stable sort's first k (ties broken by the lower index), exactly k per row."""
    from lmcompress.algorithms.masks import lowest_k

    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (9, 32), generator=g).float()  # many ties
    scores[0] = 0.0  # a row of one value
    mask = lowest_k(scores, k)
    expected = torch.zeros_like(mask)
    expected.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    assert torch.equal(mask, expected) and (mask.sum(1) == k).all()


def test_kth_smallest_on_cpu_equals_torch_kthvalue():
    """The CPU threshold (NumPy's selection) is the very value ``torch.kthvalue`` gives, on one long row (a
    SparseGPT block's saliencies) and on many rows with ties (Wanda's per-row comparison)."""
    from lmcompress.algorithms.masks import kth_smallest

    g = torch.Generator().manual_seed(0)
    long = torch.randn(1, 50_000, generator=g) ** 2
    ties = torch.randint(0, 5, (64, 300), generator=g).float()
    for scores in (long, ties):
        for k in (1, scores.shape[1] // 3, scores.shape[1] // 2, scores.shape[1]):
            expected = torch.kthvalue(scores, k, dim=1, keepdim=True).values
            assert torch.equal(kth_smallest(scores, k), expected)


def test_solves_leave_the_hessian_alone_unless_told_it_may_be_consumed():
    """SparseGPT and GPTQ read the statistics' Hessian in place; they write over it only with consume_hessian,
    and the result is the same either way. The factor is the upper Cholesky factor of (H + λI)⁻¹."""
    from lmcompress.algorithms.gptq import gptq_quantize
    from lmcompress.algorithms.quant import QuantSpec
    from lmcompress.algorithms.sparsegpt import sparsegpt_prune

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 700, generator=gen) * torch.rand(700, generator=gen)
    h = 2 * x.t() @ x / 512
    w = torch.randn(40, 700, generator=gen)
    u, _ = inverse_hessian_cholesky(h, 0.01)  # 700 columns: two chunks of the column-block solve
    damped = h.double() + 0.01 * h.diagonal().mean().double() * torch.eye(700, dtype=torch.float64)
    inv = torch.linalg.inv(damped)
    rel = ((u.double().t() @ u.double() - inv).norm() / inv.norm()).item()
    # float32's unit roundoff times a small factor, and well below the all-float32 route of the reference code
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped.float())), upper=True).double()
    assert rel < 1e-6 and rel < ((ref.t() @ ref - inv).norm() / inv.norm()).item() / 4
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    for solve in (
        lambda hh, c: sparsegpt_prune(w, hh, 0.5, consume_hessian=c).weight,
        lambda hh, c: gptq_quantize(w, hh, QuantSpec(bits=4, group_size=100), consume_hessian=c).weight,
    ):
        kept = h.clone()
        first = solve(kept, False)
        assert torch.equal(kept, h)  # untouched
        consumed = h.clone()
        torch.testing.assert_close(solve(consumed, True), first, rtol=0, atol=0)
        assert not torch.equal(consumed, h)  # its memory held the factor
