"""SmoothQuant: the scale formula, α checks and search, and folds that leave every family's function unchanged."""

from __future__ import annotations

import pytest
import torch

from lmcompress.algorithms.smoothquant import (
    ChannelStats,
    check_alpha,
    search_golden,
    search_grid,
    smoothing_scales,
    weight_absmax,
)
from lmcompress.errors import UserError
from lmcompress.models.families import get_blocks
from lmcompress.models.smoothing import (
    SMOOTHING,
    block_groups,
    fold_scales,
    model_groups,
    recorded_inputs,
    restored,
    search_smoothing,
    smooth,
)
from lmcompress.models.tiny import build_tiny_model
from tests.conftest import logits_of, random_ids

# (family, config overrides, smoothing groups per block): Qwen2 has q/k/v biases, the NeoX/GPT-2/Phi-3 rows
# use fused projections; the tiny llama-likes have grouped-query attention (4 heads, 2 KV heads) unless overridden.
CASES = [
    ("llama", {}, 4),
    ("llama", {"num_key_value_heads": 1}, 4),
    ("mistral", {"num_key_value_heads": 4}, 4),
    ("qwen2", {}, 4),
    ("qwen3", {}, 4),
    ("phi", {}, 2),
    ("phi3", {}, 4),
    ("phi3", {"num_key_value_heads": 4}, 4),
    ("opt", {}, 3),
    ("gpt2", {}, 3),
    ("gpt_neox", {}, 3),
]


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Norm weights away from 1, biases away from 0, and a few large input channels: folds are really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
        for block in get_blocks(model):
            for g in block_groups(block, model.config):
                if g.rows is None and g.source.weight.dim() == 1:  # a norm: make two channels outliers
                    g.source.weight.data[:2] *= 20
    return model


def calibrate(model, groups, keep_tokens: int = 0):
    ids = random_ids(model.config.vocab_size)
    with recorded_inputs(groups, keep_tokens) as stats:
        logits_of(model, ids)
    return stats


@pytest.mark.parametrize(("family", "overrides", "per_block"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_fold_leaves_the_function_unchanged(family, overrides, per_block):
    model = perturbed(build_tiny_model(family, **overrides))
    ids = random_ids(model.config.vocab_size)
    dense = logits_of(model, ids)
    groups = model_groups(model)
    assert len(groups) == per_block * model.config.num_hidden_layers
    stats = calibrate(model, groups)
    before = [w.clone() for g in groups for w in g.weights()]
    scales = smooth(groups, stats, alpha=0.5)
    assert all(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())  # a real change
    assert any(not torch.equal(a, b) for a, b in zip(before, (w for g in groups for w in g.weights()), strict=True))
    torch.testing.assert_close(logits_of(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_scales_follow_the_formula_and_balance_the_maxima():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=gen) * torch.linspace(0.1, 30, 16)
    w1, w2 = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen) * 3
    stats = ChannelStats(16)
    stats.update(x[:20]), stats.update(x[20:])
    a = x.abs().amax(0)
    w = torch.cat([w1, w2]).abs().amax(0)
    for alpha in (0.0, 0.3, 1.0):
        expected = a**alpha / w ** (1 - alpha)
        torch.testing.assert_close(smoothing_scales(stats.absmax, weight_absmax([w1, w2]), alpha), expected)
    s = smoothing_scales(stats.absmax, w, 0.5)  # α = ½: max|X'_j| = max|W'_j| for every channel
    torch.testing.assert_close(a / s, w * s)
    assert stats.tokens == 50
    torch.testing.assert_close(stats.absmean, x.abs().mean(0))


def test_dead_channels_keep_scale_one():
    w = torch.randn(4, 3)
    w[:, 2] = 0
    s = smoothing_scales(torch.tensor([0.0, 2.0, 3.0]), weight_absmax([w]), 0.5)
    assert s[0] == 1 and s[2] == 1 and s[1] != 1


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "half", None])
def test_alpha_outside_the_unit_interval_is_refused(alpha):
    with pytest.raises(UserError, match="alpha must be"):
        check_alpha(alpha)
    with pytest.raises(UserError, match="alpha must be"):
        smoothing_scales(torch.ones(3), torch.ones(3), alpha)


def test_search_grid_picks_the_lowest_loss():
    best, losses = search_grid(lambda a: (a - 0.62) ** 2, 11)
    assert best == pytest.approx(0.6) and len(losses) == 11 and min(losses.values()) == losses[best]
    assert search_grid(lambda a: 1.0, [0.2, 0.8])[0] == 0.2  # ties: the first
    with pytest.raises(UserError, match="at least 2"):
        search_grid(lambda a: 0.0, 1)
    with pytest.raises(UserError, match="must be in"):
        search_grid(lambda a: 0.0, [0.5, 2.0])


def unimodal(n: int, low: int, seed: int) -> list[float]:
    """``n`` losses that strictly fall to index ``low`` and strictly rise after it (random steps)."""
    gen = torch.Generator().manual_seed(seed)
    steps = (torch.rand(n, generator=gen) + 0.01).tolist()
    return [sum(steps[i:low]) if i < low else sum(steps[low + 1 : i + 1]) for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 11, 12, 21])
def test_golden_search_finds_the_grid_minimum_of_a_unimodal_loss_in_fewer_trials(n):
    trials = {2: 2, 3: 3, 4: 3, 5: 4, 7: 4, 11: 5, 12: 5, 21: 7}[n]  # ⌈log_φ⌉-like: the Fibonacci bracket's steps
    for low in range(n):
        values = unimodal(n, low, seed=n * 100 + low)
        calls = []

        def loss(a: float, values=values, calls=calls) -> float:
            calls.append(a)
            return values[round(a * (n - 1))]

        best, losses = search_golden(loss, n)
        assert len(calls) == len(set(calls)) == len(losses) <= trials  # no point tried twice
        assert best == search_grid(loss, n)[0] == pytest.approx(low / (n - 1))
        assert losses[best] == min(losses.values()) and list(losses) == sorted(losses)


def test_golden_search_on_given_points_and_a_loss_that_is_not_unimodal():
    best, losses = search_golden(lambda a: (a - 0.33) ** 2, [1.0, 0.0, 0.25, 0.5, 0.75])  # sorted before searching
    assert best == 0.25 and len(losses) <= 4
    bumpy = [0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9]  # global minimum 0 at α = 0, local at 0.6
    best, losses = search_golden(lambda a: bumpy[round(a * 10)], 11)
    assert best == pytest.approx(0.6) and losses[best] == min(losses.values())  # a local minimum, the best tried
    with pytest.raises(UserError, match="at least 2"):
        search_golden(lambda a: 0.0, 1)
    with pytest.raises(UserError, match="must be in"):
        search_golden(lambda a: 0.0, [0.5, 2.0])


def test_search_smoothing_applies_the_best_alpha_and_restores_the_trials():
    model = perturbed(build_tiny_model("llama"))
    groups = block_groups(get_blocks(model)[0], model.config)
    stats = calibrate(model, groups)
    norm = groups[0].source.weight
    seen = {}

    def loss() -> float:  # any function of the trial's weights: distance of the norm weight from 0.7
        seen[len(seen)] = norm.detach().clone()
        return float((norm.detach() - 0.7).abs().mean())

    original = {k: v.clone() for k, v in model.state_dict().items()}
    best, losses = search_smoothing(groups, stats, loss, grid=5)
    assert min(losses.values()) == losses[best]
    reference = perturbed(build_tiny_model("llama"))
    reference.load_state_dict(original)
    ref_groups = block_groups(get_blocks(reference)[0], reference.config)
    smooth(ref_groups, stats, best)
    for (k, v), ref in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(v, ref, msg=k)


def test_restored_puts_parameters_back():
    model = build_tiny_model("gpt2")
    groups = model_groups(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with restored(groups):
        for g in groups:
            fold_scales(g, torch.full((g.features,), 3.0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_grouped_query_attention_ties_the_output_projection_inputs():
    model = build_tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)  # head_dim 16, 2 heads per KV
    group = next(g for g in block_groups(get_blocks(model)[0], model.config) if g.name == "self_attn.v_proj")
    assert group.features == 64 and group.rows.tolist() == [*range(16), *range(16), *range(16, 32), *range(16, 32)]
    values = torch.arange(64.0)
    tied = group.tie(values)  # inputs h·16 + i of heads 0, 1 share value row i; heads 2, 3 share row 16 + i
    assert tied[:16].tolist() == tied[16:32].tolist() == list(range(16, 32))
    assert tied[32:48].tolist() == tied[48:].tolist() == list(range(48, 64))
    torch.testing.assert_close(group.tie(values, "mean")[:16], torch.arange(8.0, 24.0))
    with pytest.raises(ValueError, match="one scale"):
        fold_scales(group, torch.rand(64) + 0.5)


def test_bad_scales_and_unsupported_families():
    model = build_tiny_model("llama")
    g = model_groups(model)[0]
    with pytest.raises(ValueError, match="positive"):
        fold_scales(g, torch.zeros(g.features))
    with pytest.raises(UserError, match="not supported for 'mixtral'"):
        model_groups(build_tiny_model("mixtral"))
    with pytest.raises(UserError, match="pre-LN"):
        model_groups(build_tiny_model("opt", do_layer_norm_before=False))
    assert {"llama", "qwen2", "phi", "phi3", "opt", "gpt2", "gpt_neox"} <= set(SMOOTHING)
