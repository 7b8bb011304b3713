"""Expert merging (MC-SMoE) for MoE models: grouping, neuron matching, averaging, the walker, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from transformers import AutoModelForCausalLM

from lmcompress.algorithms.merging import (
    dominant_experts,
    group_by_router,
    least_squares_down,
    linear_assignment,
    match_neurons,
    merge_weights,
    neuron_features,
    permute_neurons,
    weighted_average,
)
from lmcompress.errors import UserError
from lmcompress.models.layouts import MOE_LAYOUTS
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.merge import MergeConfig, merge_experts

MOE = sorted(MOE_LAYOUTS)


def _expert(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


# ---- pure functions -------------------------------------------------------------------------------------


def test_linear_assignment_is_optimal():
    """Against every permutation of small matrices (ties included)."""
    from itertools import permutations

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 6):
        for trial in range(6):
            cost = rng.standard_normal((n, n))
            if trial % 2:
                cost = np.round(cost)  # ties
            col = linear_assignment(cost)
            assert sorted(col.tolist()) == list(range(n))
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in permutations(range(n)))
            assert cost[np.arange(n), col].sum() == pytest.approx(best, abs=1e-9)
    with pytest.raises(ValueError, match="square"):
        linear_assignment(np.zeros((2, 3)))


def test_permuting_neurons_keeps_the_function():
    gate_up, down, x = torch.randn(2 * 16, 8), torch.randn(8, 16), torch.randn(5, 8)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    gu, dn = permute_neurons(gate_up, down, perm)
    assert not torch.equal(gu, gate_up)
    torch.testing.assert_close(_expert(gu, dn, x), _expert(gate_up, down, x))
    assert torch.equal(neuron_features(gu, dn), neuron_features(gate_up, down)[perm])


def test_alignment_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(2 * 64, 32, generator=g), torch.randn(32, 64, generator=g)
    perm = torch.randperm(64, generator=g)
    # the other expert: the reference's neurons shuffled, plus a little noise
    gu, dn = permute_neurons(gate_up, down, perm)
    gu, dn = gu + 0.05 * torch.randn(gu.shape, generator=g), dn + 0.05 * torch.randn(dn.shape, generator=g)
    found = match_neurons(gate_up, down, gu, dn)
    assert torch.equal(perm[found], torch.arange(64))  # neuron found[i] of the other is neuron i of the reference
    aligned_gu, aligned_dn = permute_neurons(gu, dn, found)
    assert (aligned_gu - gate_up).abs().max() < 0.5 and (aligned_dn - down).abs().max() < 0.5


def test_grouping_by_router_logit_similarity():
    """Experts 3, 4, 5 are (noisy) multiples of the dominant experts 0, 1, 2: each joins its own."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=g)
    noise = 0.1 * torch.randn(200, 3, generator=g)
    logits = torch.cat([base, 2.0 * base[:, [2]], 0.5 * base[:, [0]], base[:, [1]]], dim=1)
    logits[:, 3:] += noise
    group, sim = group_by_router(logits, torch.tensor([0, 1, 2]))
    assert group.tolist() == [0, 1, 2, 2, 0, 1]
    assert sim[:3].tolist() == [1.0, 1.0, 1.0] and (sim[3:] > 0.9).all()
    # dominant experts by frequency, ties to the lower index
    assert dominant_experts(torch.tensor([0.1, 0.3, 0.3, 0.2, 0.0]), 2).tolist() == [1, 2]


def test_frequency_weighted_average():
    w = merge_weights(torch.tensor([3.0, 1.0]))
    assert w.tolist() == [0.75, 0.25]
    assert merge_weights(torch.zeros(4)).tolist() == [0.25] * 4  # nobody routed: a plain mean
    a, b = torch.ones(2, 2), torch.full((2, 2), 5.0)
    assert torch.equal(weighted_average([a, b], w), torch.full((2, 2), 2.0))
    with pytest.raises(ValueError):
        weighted_average([a], w)


def test_least_squares_down_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    z, true = torch.randn(200, 8, generator=g), torch.randn(4, 8, generator=g)
    torch.testing.assert_close(least_squares_down(z, z @ true.T, damp=0.0), true.double())
    # damping shrinks the fit, and keeps it defined with fewer rows than columns
    few = least_squares_down(z[:3], (z @ true.T)[:3], damp=0.01)
    assert torch.isfinite(few).all() and few.shape == (4, 8)


# ---- whole models -------------------------------------------------------------------------------------------


def _identical_experts(family: str, vocab: int, shuffle: bool):
    """A tiny MoE model whose experts in each layer are all one function (expert 0's), optionally each with its
    neurons in a different random order. With top-k weights renormalized to sum to 1 (Mixtral always; the
    others with ``norm_topk_prob``), the layer's output is that function whatever the router picks."""
    model = build_tiny_model(family, vocab, max_positions=256, norm_topk_prob=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for e in range(1, ex.gate_up_proj.shape[0]):
                perm = torch.randperm(ex.down_proj.shape[2], generator=g)
                gu, dn = ex.gate_up_proj[0], ex.down_proj[0]
                ex.gate_up_proj[e], ex.down_proj[e] = permute_neurons(gu, dn, perm) if shuffle else (gu, dn)
    return model


@pytest.mark.parametrize("family", MOE)
def test_merging_identical_experts_returns_the_same_function(family, tokenizer, calib):
    model = _identical_experts(family, tokenizer.vocab_size, shuffle=False)
    ref = model(calib[:2]).logits
    report = merge_experts(model, MergeConfig(keep=3), calib, progress=False)
    assert getattr(model.config, MOE_LAYOUTS[family].count_key) == 3 == report.experts_after
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3
    for groups in report.groups.values():  # every expert in exactly one group
        assert sorted(e for g in groups for e in g) == list(range(8))
    torch.testing.assert_close(model(calib[:2]).logits, ref, atol=1e-5, rtol=1e-5)
    assert all(err < 1e-10 for err in report.relative_error.values())


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_alignment_makes_permuted_identical_experts_merge_exactly(family, tokenizer, calib):
    """Same function, neurons shuffled: averaging without alignment changes the function, with it it does not."""
    results = {}
    for align in (False, True):
        model = _identical_experts(family, tokenizer.vocab_size, shuffle=True)
        ref = model(calib[:2]).logits
        report = merge_experts(model, MergeConfig(keep=2, align=align), calib, progress=False)
        results[align] = ((model(calib[:2]).logits - ref).abs().max().item(), report)
    assert results[False][0] > 1e-3
    assert results[True][0] < 1e-4
    for name, (before, after) in results[True][1].neuron_cosine.items():
        assert after == pytest.approx(1.0) and before < 0.5, name


@pytest.mark.parametrize("family", MOE)
def test_merged_model_routes_validly_and_round_trips(family, tmp_path, tokenizer, calib):
    from lmcompress.checkpoint.save import save_model

    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    before = {k: v.clone() for k, v in model.state_dict().items() if "experts" in k}
    report = merge_experts(model, MergeConfig(keep=4, align=True), calib, progress=False)
    for name, groups in report.groups.items():
        assert [g[0] for g in groups] == sorted(g[0] for g in groups)  # dominant experts in their original order
        freq = report.frequency[name]
        assert {g[0] for g in groups} == set(np.argsort(-np.array(freq), kind="stable")[:4].tolist())
    # a singleton group keeps its expert's weights exactly
    layer = model.model.layers[0].mlp.experts
    for new, members in enumerate(report.groups["model.layers.0.mlp"]):
        if len(members) == 1:
            assert torch.equal(layer.gate_up_proj[new], before["model.layers.0.mlp.experts.gate_up_proj"][members[0]])
    assert report.params_after < report.params_before
    ref = model(calib[:2]).logits
    save_model(model, tokenizer, tmp_path / "out", {"kind": "merge-experts"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert getattr(loaded.config, MOE_LAYOUTS[family].count_key) == 4
    torch.testing.assert_close(loaded(calib[:2]).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_refit_lowers_the_calibration_error(family, tokenizer, calib):
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    report = merge_experts(model, MergeConfig(keep=4, align=True, refit=True), calib, progress=False)
    for name, err in report.relative_error.items():
        assert err < 0.5 * report.merged_error[name], (name, err, report.merged_error[name])
    plain = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    same = merge_experts(plain, MergeConfig(keep=4, align=True), calib, progress=False)
    first = "model.layers.0.mlp"  # the same inputs reach layer 0 in both runs
    assert same.relative_error[first] == same.merged_error[first] == pytest.approx(report.merged_error[first])
    # only down_proj is refit; router and gate/up are the merge's
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, plain.model.layers[0].mlp.experts.gate_up_proj)
    assert not torch.equal(model.model.layers[0].mlp.experts.down_proj, plain.model.layers[0].mlp.experts.down_proj)


def test_bad_input_is_a_clear_error_and_changes_nothing(tokenizer, calib):
    model = build_tiny_model("mixtral", tokenizer.vocab_size, max_positions=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="not fewer than the 8 experts"):
        merge_experts(model, MergeConfig(keep=8), calib, progress=False)
    with pytest.raises(UserError, match="top-k"):
        merge_experts(model, MergeConfig(keep=1), calib, progress=False)
    with pytest.raises(UserError, match="positive"):
        MergeConfig(keep=0)
    with pytest.raises(UserError, match="refit_damp"):
        MergeConfig(keep=4, refit_damp=-1.0)
    with pytest.raises(UserError, match="calibration"):
        merge_experts(model, MergeConfig(keep=4), None, progress=False)
    with pytest.raises(UserError, match="mixture-of-experts"):
        merge_experts(build_tiny_model("llama", 64), MergeConfig(keep=2), calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- command line -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_cli_merge_experts(family, tmp_path, tiny_folder, calib_file, capsys):
    src = tiny_folder(family)
    out = tmp_path / "merged"
    args = ["merge-experts", str(src), "--keep", "4", "--align", "--calib-data", str(calib_file)]
    args += ["--refit"] if family == "olmoe" else []
    args += ["--nsamples", "4", "--seqlen", "32", "-q", "-o", str(out)]
    assert run(args) == 0
    assert "merged 8 experts into 4 per layer" in capsys.readouterr().out
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["kind"] == "merge-experts" and recipe["experts_after"] == 4 and recipe["align"] is True
    assert recipe["refit"] is (family == "olmoe")
    assert len(recipe["merged_groups"]["model.layers.0.mlp"]) == 4
    key = MOE_LAYOUTS[family].count_key
    assert json.loads((out / "config.json").read_text())[key] == 4
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.layers[0].mlp.experts.down_proj.shape[0] == 4


def test_cli_merge_experts_bad_input_writes_nothing(tmp_path, tiny_folder, calib_file, capsys):
    src = str(tiny_folder("mixtral"))
    fast = ["--calib-data", str(calib_file), "--nsamples", "2", "--seqlen", "32", "-q"]
    for keep, message in (("8", "not fewer than the 8 experts"), ("0", "positive"), ("1", "top-k")):
        bad = tmp_path / f"bad{keep}"
        assert run(["merge-experts", src, "--keep", keep, *fast, "-o", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and "--keep" in err, err
        assert not bad.exists()
    dense = str(tiny_folder("llama"))
    assert run(["merge-experts", dense, "--keep", "2", *fast, "-o", str(tmp_path / "bad")]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
