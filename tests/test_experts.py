"""Expert dropping for MoE models: routing math, removal, config, round trips, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_cli as run
from transformers import AutoModelForCausalLM

from lmcompress.algorithms.routing import (
    frequency_counts,
    moe_output,
    reconstruction_errors,
    router_mass,
    routing_weights,
    select_keep,
)
from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.models.layouts import MOE_LAYOUTS
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.experts import ExpertConfig, _expert_outputs, drop_experts, slice_experts

MOE = sorted(MOE_LAYOUTS)


def _moe(model, layer=0):
    return model.model.layers[layer].mlp


def _routed(moe, x):
    """The routed part of a MoE layer's output on tokens ``x`` [n, hidden] (shared expert removed)."""
    y = moe(x.unsqueeze(0))[0]
    if getattr(moe, "shared_expert", None) is not None:
        y = y - torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    return y


# ---- pure routing functions ------------------------------------------------------------------------------


def test_routing_weights_shape_and_normalization():
    logits = torch.randn(50, 8)
    w = routing_weights(logits, 2, normalize=True)
    assert ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w.sum(1), torch.ones(50))
    raw = routing_weights(logits, 2, normalize=False)
    assert (raw.sum(1) < 1).all()
    alive = torch.tensor([True] * 4 + [False] * 4)
    assert (routing_weights(logits, 2, True, alive)[:, 4:] == 0).all()
    with pytest.raises(ValueError, match="top-k"):
        routing_weights(logits, 2, True, torch.tensor([True] + [False] * 7))


def test_frequency_and_mass_totals():
    logits = torch.randn(100, 6)
    assert frequency_counts(logits, 2).sum().item() == 200
    torch.testing.assert_close(router_mass(logits).sum(), torch.tensor(100.0))
    logits[:, 3] = -1e4  # never chosen, no mass
    assert frequency_counts(logits, 2)[3] == 0
    assert router_mass(logits)[3] == 0


def test_reconstruction_zero_for_unused_expert_and_inf_for_dead():
    logits, outs = torch.randn(40, 5), torch.randn(5, 40, 8)
    logits[:, 2] = -1e4
    errs = reconstruction_errors(logits, outs, 2, True)
    assert errs[2] == 0 and (errs[[0, 1, 3, 4]] > 0).all()
    alive = torch.tensor([True, True, False, True, True])
    assert torch.isinf(reconstruction_errors(logits, outs, 2, True, alive)[2])


def test_select_keep_highest_with_ties_to_lower_index():
    assert select_keep(torch.tensor([0.1, 0.5, 0.5, 0.3]), 2).tolist() == [1, 2]
    assert select_keep(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]
    alive = torch.tensor([True, False, True, True])
    assert select_keep(torch.tensor([0.1, 9.0, 0.5, 0.3]), 2, alive).tolist() == [2, 3]
    with pytest.raises(ValueError):
        select_keep(torch.tensor([1.0, 2.0]), 2, torch.tensor([True, False]))


# ---- against the real HF MoE modules --------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE)
@torch.no_grad()
def test_routing_model_matches_hf_moe_layer(family):
    """Our routed-sum formula reproduces the model's own MoE output (so the criteria score the real layer)."""
    model = build_tiny_model(family, 128)
    moe, layout = _moe(model), MOE_LAYOUTS[family]
    x = torch.randn(30, model.config.hidden_size)
    logits = moe.gate(x)[0]
    normalize = bool(model.config.norm_topk_prob) if layout.renormalize is None else layout.renormalize
    outs = _expert_outputs(moe.experts, x, torch.ones(logits.shape[1], dtype=torch.bool))
    ours = moe_output(routing_weights(logits, model.config.num_experts_per_tok, normalize), outs)
    torch.testing.assert_close(ours, _routed(moe, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@torch.no_grad()
def test_reconstruction_criterion_equals_removing_the_expert(family):
    """The reconstruction score of expert e is exactly the output change of the layer with e sliced away."""
    model = build_tiny_model(family, 128)
    moe, layout = _moe(model), MOE_LAYOUTS[family]
    x = torch.randn(40, model.config.hidden_size)
    n = moe.gate.weight.shape[0]
    normalize = bool(getattr(model.config, "norm_topk_prob", True)) if layout.renormalize is None else True
    outs = _expert_outputs(moe.experts, x, torch.ones(n, dtype=torch.bool))
    errs = reconstruction_errors(moe.gate(x)[0], outs, model.config.num_experts_per_tok, normalize)
    y = _routed(moe, x)
    for e in (0, 3, n - 1):
        smaller = copy.deepcopy(moe)
        slice_experts(smaller, layout, torch.tensor([i for i in range(n) if i != e]))
        direct = (y - _routed(smaller, x)).pow(2).sum().item()
        assert errs[e].item() == pytest.approx(direct, rel=1e-4, abs=1e-6)


def _with_dead_experts(family: str, dead: list[int], vocab: int):
    """A tiny MoE model in which the ``dead`` experts can never be routed to.

    Hidden dimension 0 carries a small positive constant: every embedding has 2σ there (σ: the embeddings'
    spread) and nothing writes to it (those rows of the output projections are zero), so the router input has a
    positive feature 0 in every layer. The dead experts' router rows are −10⁶·e₀: logits far below −1000, zero
    softmax mass, never in any top-k. The other experts route as before, token by token.
    """
    model = build_tiny_model(family, vocab, max_positions=256)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 2 * emb[:, 1:].std()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            moe = layer.mlp
            moe.experts.down_proj[:, 0, :] = 0
            if getattr(moe, "shared_expert", None) is not None:
                moe.shared_expert.down_proj.weight[0] = 0
            moe.gate.weight[dead] = 0
            moe.gate.weight[dead, 0] = -1e6
    return model


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("criterion", ["frequency", "router-weight", "reconstruction"])
def test_dropping_never_routed_experts_keeps_output_identical(family, criterion, tokenizer, calib):
    dead = [1, 5]
    model = _with_dead_experts(family, dead, tokenizer.vocab_size)
    ref = model(calib[:2]).logits
    report = drop_experts(model, ExpertConfig(keep=6, criterion=criterion), calib, progress=False)
    alive = [i for i in range(8) if i not in dead]
    assert all(k == alive for k in report.kept.values()), report.kept
    torch.testing.assert_close(model(calib[:2]).logits, ref, atol=1e-5, rtol=1e-5)
    assert all(err < 1e-10 for err in report.relative_error.values())


@pytest.mark.parametrize("family", MOE)
def test_routing_stays_valid_after_removal(family, tokenizer, calib):
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    report = drop_experts(model, ExpertConfig(keep=3, criterion="frequency", iterative=True), calib, progress=False)
    layout = MOE_LAYOUTS[family]
    assert getattr(model.config, layout.count_key) == 3 == report.experts_after
    assert report.params_after < report.params_before
    for layer in model.model.layers:
        moe = layer.mlp
        assert moe.gate.weight.shape[0] == moe.experts.gate_up_proj.shape[0] == moe.experts.down_proj.shape[0] == 3
        assert moe.gate.num_experts == moe.experts.num_experts == 3
        assert moe.gate.top_k <= 3
        _, _, idx = moe.gate(torch.randn(20, model.config.hidden_size))
        assert int(idx.max()) < 3
    assert torch.isfinite(model(calib[:2]).logits).all()


def test_keep_below_top_k_or_above_count_is_a_clear_error(tokenizer, calib):
    model = build_tiny_model("mixtral", tokenizer.vocab_size, max_positions=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="top-k"):
        drop_experts(model, ExpertConfig(keep=1), calib, progress=False)
    with pytest.raises(UserError, match="more than the 8 experts"):
        drop_experts(model, ExpertConfig(keep=9), calib, progress=False)
    with pytest.raises(UserError, match="criterion"):
        ExpertConfig(keep=4, criterion="random")
    with pytest.raises(UserError, match="mixture-of-experts"):
        drop_experts(build_tiny_model("llama", 64), ExpertConfig(keep=2), calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_iterative_rescores_between_drops(tokenizer, calib):
    """Iterative dropping can differ from one-shot (scores re-estimated after each removal); both are valid."""
    results = {}
    for iterative in (False, True):
        model = build_tiny_model("olmoe", tokenizer.vocab_size, max_positions=256, seed=3)
        config = ExpertConfig(keep=2, criterion="reconstruction", iterative=iterative)
        results[iterative] = drop_experts(model, config, calib, progress=False)
    for report in results.values():
        assert all(len(k) == 2 for k in report.kept.values())
    # layer 0 sees the same inputs in both modes, so its first-round scores agree (later layers see the
    # outputs of differently pruned layers before them)
    first = "model.layers.0.mlp"
    assert results[False].scores[first] == results[True].scores[first]


@pytest.mark.parametrize("family", MOE)
def test_save_from_pretrained_round_trip(family, tmp_path, tokenizer, calib):
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    drop_experts(model, ExpertConfig(keep=4, criterion="router-weight"), calib, progress=False)
    ref = model(calib[:2]).logits
    save_model(model, tokenizer, tmp_path / "out", {"kind": "experts"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert getattr(loaded.config, MOE_LAYOUTS[family].count_key) == 4
    assert _moe(loaded).experts.gate_up_proj.shape[0] == 4
    torch.testing.assert_close(loaded(calib[:2]).logits, ref, atol=1e-5, rtol=1e-5)


def test_cli_drop_experts(tmp_path, tiny_folder, calib_text, capsys):
    src = tiny_folder("qwen2_moe")
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(calib_text)
    out = tmp_path / "moe6"
    args = ["drop-experts", str(src), "--keep", "6", "--criterion", "frequency"]
    args += ["--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "32", "-q", "-o", str(out)]
    assert run(args) == 0
    assert "kept 6 of 8 experts" in capsys.readouterr().out
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["kind"] == "experts" and recipe["experts_after"] == 6
    assert json.loads((out / "config.json").read_text())["num_experts"] == 6
    AutoModelForCausalLM.from_pretrained(out)
    assert run([*args[:3], "1", *args[4:-1], str(tmp_path / "bad")]) == 2
    assert "top-k" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family", sorted(MOE_LAYOUTS))
def test_flops_count_the_top_k_experts_a_token_runs(family, tokenizer, calib):
    from lmcompress.measure.profile import flops_breakdown

    model = build_tiny_model(family, tokenizer.vocab_size)
    layout = MOE_LAYOUTS[family]
    top_k, n = getattr(model.config, layout.topk_key), getattr(model.config, layout.count_key)
    moe = _moe(model)
    per_expert = moe.experts.gate_up_proj[0].numel() + moe.experts.down_proj[0].numel()
    before = flops_breakdown(model, 16)["experts"]
    assert before == model.config.num_hidden_layers * (2 * top_k * per_expert + 2 * n * model.config.hidden_size)
    drop_experts(model, ExpertConfig(keep=4, criterion="frequency"), calib[:2], progress=False)
    # the experts a token runs are as many as before; only the router got smaller
    assert flops_breakdown(model, 16)["experts"] == before - model.config.num_hidden_layers * 2 * 4 * 64


def test_cli_refuses_options_of_other_structures(tmp_path, tiny_folder, capsys):
    src = str(tiny_folder("mixtral"))
    for extra in (["--ratio", "0.5"], ["--correction", "bias"], ["--sparsity", "0.5"]):
        assert run(["prune", src, "--structure", "experts", "--keep", "4", *extra, "-o", str(tmp_path / "x")]) == 2
        assert "not apply to dropping experts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
