"""Structured removal of FFN channels and attention heads: exactness, shapes, configs, round trips, corrections."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmcompress
from lmcompress.algorithms.units import UnitStats, correct, unit_scores, units_to_keep
from lmcompress.calibration.data import draw
from lmcompress.calibration.engine import capture_block_inputs, run_block
from lmcompress.checkpoint.load import load_model
from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.jobs import structured_prune_pretrained
from lmcompress.measure.profile import flops_breakdown, latency_per_token
from lmcompress.models.families import get_blocks, weight_matrix
from lmcompress.models.layouts import LAYOUTS, head_shape
from lmcompress.models.params import count_params
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.shrink import StructureConfig, structured_prune

HEAD_FAMILIES = sorted(n for n, lay in LAYOUTS.items() if lay.heads != "none")
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def zero_units(model, structure: str, n: int) -> None:
    """Make the first ``n`` units of every block contribute exactly nothing (their reading columns = 0)."""
    layout = LAYOUTS[model.config.model_type]
    for block in get_blocks(model):
        if structure == "ffn":
            weight_matrix(block.get_submodule(layout.ffn_out))[:, :n] = 0
        else:
            shape = head_shape(model.config)
            weight_matrix(block.get_submodule(layout.o))[:, : n * shape.group * shape.head_dim] = 0


# ----------------------------------------------------------------------------------------------- algorithms


def test_scores_rank_zero_units_last_and_keep_is_sorted():
    torch.manual_seed(0)
    w = torch.randn(8, 12)
    w[:, [3, 7]] = 0
    stats = UnitStats(12)
    stats.add(torch.randn(100, 12) + 1)
    for crit in ("wanda", "magnitude", "fluctuation"):
        keep = units_to_keep(unit_scores(crit, w, stats), 2)
        assert keep.tolist() == [i for i in range(12) if i not in (3, 7)]
    grouped = unit_scores("wanda", w, stats, unit_size=4)
    assert grouped.shape == (3,)
    with pytest.raises(ValueError):
        units_to_keep(grouped, 3)


def test_corrections_reduce_reconstruction_error():
    torch.manual_seed(0)
    x = torch.randn(2000, 16) @ torch.randn(16, 16) * 0.5 + torch.linspace(-1, 2, 16)  # correlated, non-zero mean
    w = torch.randn(6, 16)
    stats = UnitStats(16)
    stats.add(x)
    keep = torch.arange(0, 16, 2)
    err = {}
    for method in ("none", "bias", "lstsq"):
        fix = correct(method, w, None, stats, keep)
        y = x[:, keep] @ fix.weight.t() + (0 if fix.bias is None else fix.bias)
        err[method] = (y - x @ w.t()).pow(2).mean().item()
    assert err["bias"] < err["none"]
    assert err["lstsq"] < err["none"]
    # with a bias the least-squares fit is affine: at least as good as the bias-only correction
    fix = correct("lstsq", w, torch.zeros(6), stats, keep, damp=1e-6)
    y = x[:, keep] @ fix.weight.t() + fix.bias
    assert (y - x @ w.t()).pow(2).mean().item() <= err["bias"] + 1e-6


# --------------------------------------------------------------------------------------- exactness per family


@pytest.mark.parametrize(
    "family,structure",
    [(f, "ffn") for f in sorted(LAYOUTS)] + [(f, "heads") for f in HEAD_FAMILIES],
)
def test_removing_zero_units_keeps_logits(family, structure, tmp_path, tokenizer):
    """Units whose reading columns are exactly zero are removed and the output does not change; the saved
    folder loads with plain from_pretrained (one ratio for all blocks) and gives the same logits."""
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=64)
    layout = LAYOUTS[family]
    if structure == "ffn":
        units = weight_matrix(get_blocks(model)[0].get_submodule(layout.ffn_out)).shape[1]
        n = units // 4
    else:
        units, n = head_shape(model.config).kv_heads, head_shape(model.config).kv_heads // 2
    zero_units(model, structure, n)
    before = logits(model)
    params = count_params(model)
    report = structured_prune(model, StructureConfig(structure, n / units, "magnitude"), progress=False)
    after = logits(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(r == list(range(n)) for r in report.removed.values())
    assert report.uniform and report.surgery == []
    assert count_params(model) == report.params_after < params

    save_model(model, tokenizer, tmp_path / "out", {"kind": "structured"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded), after, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- shapes and configs


def test_ffn_shapes_and_config():
    model = build_tiny_model("llama", 300)
    report = structured_prune(model, StructureConfig("ffn", 0.25, "magnitude"), progress=False)
    assert model.config.intermediate_size == 96 and report.ffn_widths == [96, 96]
    for block in get_blocks(model):
        assert block.mlp.gate_proj.weight.shape == (96, 64)
        assert block.mlp.up_proj.weight.shape == (96, 64)
        assert block.mlp.down_proj.weight.shape == (64, 96)


def test_gqa_groups_removed_together():
    """8 query heads over 4 KV heads: removing a KV group removes its 2 query heads, nothing else."""
    model = build_tiny_model("llama", 300, num_attention_heads=8, num_key_value_heads=4)
    dense = copy.deepcopy(model)
    report = structured_prune(model, StructureConfig("heads", 0.5, "magnitude"), progress=False)
    hd = 8
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert model.config.head_dim == hd
    for i, (block, ref) in enumerate(zip(get_blocks(model), get_blocks(dense), strict=True)):
        attn, old = block.self_attn, ref.self_attn
        assert attn.num_key_value_groups == 2 and attn.head_dim == hd
        kept = [g for g in range(4) if g not in report.removed[f"{i}.heads"]]
        assert len(kept) == 2
        q_rows = torch.cat([torch.arange(g * 2 * hd, (g + 1) * 2 * hd) for g in kept])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept])
        assert torch.equal(attn.q_proj.weight, old.q_proj.weight[q_rows])
        assert torch.equal(attn.k_proj.weight, old.k_proj.weight[kv_rows])
        assert torch.equal(attn.v_proj.weight, old.v_proj.weight[kv_rows])
        assert torch.equal(attn.o_proj.weight, old.o_proj.weight[:, q_rows])
    logits(model)  # still runs


def test_phi3_fused_qkv_heads(tokenizer):
    """Phi-3 keeps q, k, v in one stacked layer: the kept group's rows are taken from each part."""
    model = build_tiny_model("phi3", tokenizer.vocab_size)
    dense = copy.deepcopy(model)
    report = structured_prune(model, StructureConfig("heads", 0.5, "magnitude"), progress=False)
    g = next(x for x in range(2) if x not in report.removed["0.heads"])
    hd = 16
    old = dense.model.layers[0].self_attn.qkv_proj.weight
    rows = torch.cat(
        [
            torch.arange(g * 2 * hd, (g + 1) * 2 * hd),
            64 + torch.arange(g * hd, (g + 1) * hd),
            96 + g * hd + torch.arange(hd),
        ]
    )
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, old[rows])
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


# ------------------------------------------------------------------------------------------------ corrections


@pytest.mark.parametrize("structure", ["ffn", "heads"])
def test_correction_reduces_block_output_error(structure, calib):
    """On the calibration windows, block 0's output is closer to the dense one with either correction."""
    dense = build_tiny_model("llama", 320, num_attention_heads=8, num_key_value_heads=8)
    inputs = capture_block_inputs(dense, calib, torch.device("cpu"))
    target = run_block(get_blocks(dense)[0], inputs)
    err = {}
    for method in ("none", "bias", "lstsq"):
        model = copy.deepcopy(dense)
        structured_prune(model, StructureConfig(structure, 0.5, "wanda", method), calib, progress=False)
        out = run_block(get_blocks(model)[0], inputs)
        err[method] = (out - target).pow(2).mean().item()
    assert err["lstsq"] < err["none"] and err["bias"] < err["none"], err


# ---------------------------------------------------------------------------------------- API, saving, loading


@pytest.mark.parametrize("structure", ["ffn", "heads"])
def test_api_uniform_loads_with_plain_transformers(structure, tiny_folder, tmp_path):
    source = tiny_folder("llama")
    out = tmp_path / "pruned"
    config = StructureConfig(structure, 0.5, "wanda", "lstsq")
    structured_prune_pretrained(
        source, config, out, calib_data="bundled:wikitext2-valid", nsamples=4, seqlen=32, progress=False
    )
    # the same job in memory
    model, tok = load_model(source)
    calib, _ = draw(tok, "bundled:wikitext2-valid", nsamples=4, seqlen=32)
    structured_prune(model, config, calib, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["kind"] == "structured" and "surgery" not in recipe
    assert recipe["source_model"] == str(source) and recipe["versions"]["torch"]


def test_api_owl_per_layer_loads_with_lmcompress_load(tiny_folder, tmp_path, tokenizer):
    model = build_tiny_model(
        "llama", tokenizer.vocab_size, max_positions=256, num_attention_heads=8, num_key_value_heads=8
    )
    source = tmp_path / "src"
    save_model(model, tokenizer, source, {"kind": "test-model"})
    out = tmp_path / "owl"
    config = StructureConfig("ffn,heads", 0.4, "fluctuation", "bias", allocation="owl", owl_lambda=0.2)
    report = structured_prune_pretrained(
        source, config, out, calib_data="bundled:wikitext2-valid", nsamples=4, seqlen=32, progress=False
    )
    assert not report.uniform
    assert len(set(report.ffn_widths)) > 1 or len(set(report.heads)) > 1
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["surgery"], "per-layer shapes must be recorded"
    net, tok = load_model(source)
    calib, _ = draw(tok, "bundled:wikitext2-valid", nsamples=4, seqlen=32)
    structured_prune(net, config, calib, progress=False)
    loaded, _ = lmcompress.load(out)
    for block, width, heads in zip(get_blocks(loaded), report.ffn_widths, report.heads, strict=True):
        assert block.mlp.down_proj.in_features == width and block.self_attn.o_proj.in_features == heads * 8
        assert block.mlp.down_proj.bias is not None  # the bias correction added one
    torch.testing.assert_close(logits(loaded), logits(net), atol=0, rtol=0)


@pytest.mark.parametrize("structure", ["ffn", "heads", "ffn,heads"])
def test_uniform_bias_on_llama_sets_the_config_flag_and_loads_plainly(structure, tiny_folder, tmp_path):
    """LLaMA's config can give its MLP / attention layers biases: the correction's bias loads with plain HF."""
    out = tmp_path / "b"
    config = StructureConfig(structure, 0.5, "wanda", "bias")
    report = structured_prune_pretrained(
        tiny_folder("llama"), config, out, calib_data="bundled:wikitext2-valid", nsamples=4, seqlen=32, progress=False
    )
    assert report.uniform and report.surgery == []
    saved = json.loads((out / "config.json").read_text())
    assert saved["mlp_bias"] is ("ffn" in structure) and saved["attention_bias"] is ("heads" in structure)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded, _ = lmcompress.load(out)
    layer = plain.model.layers[0]
    if "ffn" in structure:
        assert layer.mlp.down_proj.bias.abs().sum() > 0 and layer.mlp.up_proj.bias.abs().sum() == 0
    if "heads" in structure:
        assert layer.self_attn.o_proj.bias.abs().sum() > 0 and layer.self_attn.q_proj.bias.abs().sum() == 0
    torch.testing.assert_close(logits(plain), logits(loaded), atol=0, rtol=0)


def test_uniform_bias_the_config_cannot_describe_is_recorded(tiny_folder, tmp_path):
    """Mistral's down_proj has no bias and no config flag for one: the new bias is a surgery record, not lost."""
    out = tmp_path / "b"
    config = StructureConfig("ffn", 0.25, "wanda", "bias")
    report = structured_prune_pretrained(
        tiny_folder("mistral"), config, out, calib_data="bundled:wikitext2-valid", nsamples=4, seqlen=32, progress=False
    )
    assert report.uniform and {r["module"] for r in report.surgery} == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    loaded, _ = lmcompress.load(out)
    assert loaded.config.intermediate_size == 96 and loaded.model.layers[0].mlp.down_proj.bias is not None
    # plain transformers would drop that bias with a mere warning: it must refuse the folder instead
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)
    again, _ = lmcompress.load(out)  # and lmcompress still reads it, identically
    ids = torch.arange(12).unsqueeze(0)
    torch.testing.assert_close(again(ids).logits, loaded(ids).logits, atol=0, rtol=0)


def test_ratio_that_rounds_to_zero_is_reported(calib):
    model = build_tiny_model("llama", 320)
    report = structured_prune(model, StructureConfig("heads", 0.25, "wanda"), calib, progress=False)
    assert report.heads == [4, 4] and "removes no KV groups" in report.notes[0] and "above 0.25" in report.notes[0]


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(UserError, match="ratio"):
        StructureConfig("ffn", ratio)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(structure="experts"), "structure"),
        (dict(criterion="random"), "criterion"),
        (dict(correction="refit"), "correction"),
        (dict(allocation="global"), "allocation"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(UserError, match=match):
        StructureConfig(**kwargs)


def test_bad_inputs_write_nothing(tiny_folder, tmp_path):
    out = tmp_path / "never"
    common = dict(calib_data="bundled:wikitext2-valid", nsamples=2, seqlen=32, progress=False)
    with pytest.raises(UserError, match="all 2 KV groups"):  # tiny llama has 2 KV groups: 0.9 → 2
        structured_prune_pretrained(tiny_folder("llama"), StructureConfig("heads", 0.9), out, **common)
    with pytest.raises(UserError, match=r"attention-head removal is not supported for 'opt'.*llama"):
        structured_prune_pretrained(tiny_folder("opt"), StructureConfig("heads", 0.5), out, **common)
    with pytest.raises(UserError, match="allocation uniform"):
        structured_prune_pretrained(tiny_folder("phi3"), StructureConfig("heads", 0.5, allocation="owl"), out, **common)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_cli_structured(tiny_folder, tmp_path):
    from typer.testing import CliRunner

    from lmcompress.cli import app

    out = tmp_path / "cli"
    args = ["shrink", "ffn", str(tiny_folder("qwen2")), "-o", str(out), "--ratio", "0.25"]
    args += ["--criterion", "magnitude", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 96
    bad = CliRunner().invoke(app, [*args[:4], str(tmp_path / "x"), "--ratio", "1.2"])
    assert isinstance(bad.exception, UserError) and "--ratio" in str(bad.exception)
    assert not (tmp_path / "x").exists()
    mixed = CliRunner().invoke(app, [*args[:4], str(tmp_path / "y"), "--sparsity", "0.5"])
    assert mixed.exit_code == 2 and "--sparsity" in mixed.output  # not an option of shrink
    assert not (tmp_path / "y").exists()
    bad = CliRunner().invoke(app, ["shrink", "experts", *args[2:4], str(tmp_path / "z")])
    assert isinstance(bad.exception, UserError) and "drop-experts" in str(bad.exception)
    assert not (tmp_path / "z").exists()


# ---------------------------------------------------------------------------------------------------- profile


def test_profile_counts_follow_the_removal():
    model = build_tiny_model("llama", 300)
    params, flops = count_params(model), flops_breakdown(model, 64)
    assert params == sum(p.numel() for p in model.parameters())
    # 2 blocks × (q 64×64, k/v 64×32, o 64×64, gate/up/down 64×128) + head 64×300, 2 FLOPs per multiply-add
    linear = 2 * (2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 64 * 300)
    assert flops["linear"] == linear
    assert flops["attention"] == 2 * 4 * 64 * 32.5
    structured_prune(model, StructureConfig("ffn", 0.5, "magnitude"), progress=False)
    assert flops_breakdown(model, 64)["linear"] == linear - 2 * 2 * 3 * 64 * 64
    assert count_params(model) == params - 2 * 3 * 64 * 64
    assert latency_per_token(model, 16, "cpu", repeats=1, warmup=0) > 0
    assert latency_per_token(model, 16, "cpu", repeats=2, warmup=0, reduce="min", clock="cpu") > 0


def test_eval_profile_reports_model_and_source(tiny_folder, tmp_path):
    from typer.testing import CliRunner

    from lmcompress.cli import app

    out = tmp_path / "p"
    structured_prune_pretrained(tiny_folder("llama"), StructureConfig("ffn", 0.5, "magnitude"), out, progress=False)
    args = ["eval", str(out), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "32", "--profile", "--json", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    prof = json.loads(result.output)["profile"]
    assert prof["source"]["path"] == str(tiny_folder("llama"))
    assert prof["model"]["params"] == prof["source"]["params"] - 2 * 3 * 64 * 64
    assert prof["flops_ratio"] < 1 and prof["model"]["latency_ms_per_token"] > 0
    info = CliRunner().invoke(app, ["info", str(out), "--profile", "--seqlen", "16", "--json"])
    assert info.exit_code == 0, info.output
    prof = json.loads(info.output)["profile"]
    assert prof["model"]["params"] == prof["source"]["params"] - 2 * 3 * 64 * 64
    assert prof["model"]["cpu_ms_per_token"] > 0 and prof["flops_ratio"] < 1
    text = CliRunner().invoke(app, ["info", str(out), "--profile", "--seqlen", "16"])
    assert text.exit_code == 0 and "FLOPs/token" in text.output and "vs the dense source" in text.output


@pytest.mark.parametrize(
    "family,structure,correction",
    [(f, "ffn", c) for f in sorted(LAYOUTS) for c in ("bias", "lstsq")]
    + [(f, "heads", "lstsq") for f in HEAD_FAMILIES],
)
def test_every_family_with_correction_round_trips(family, structure, correction, calib, tmp_path, tokenizer):
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=64)
    report = structured_prune(model, StructureConfig(structure, 0.5, "wanda", correction), calib, progress=False)
    expected = logits(model)
    assert torch.isfinite(expected).all()
    save_model(model, tokenizer, tmp_path / "out", {"kind": "structured", "surgery": report.surgery})
    loaded, _ = lmcompress.load(tmp_path / "out")
    torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)
    if not report.surgery:  # the config alone describes it
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(logits(plain), expected, atol=0, rtol=0)


def test_ratio_that_removes_nothing_changes_nothing(calib):
    """0.1 of 2 KV groups rounds to 0: no unit goes, and no correction is applied to the unchanged layers."""
    model = build_tiny_model("llama", 320)
    before = logits(model)
    report = structured_prune(model, StructureConfig("heads", 0.1, "wanda", "lstsq"), calib, progress=False)
    assert report.heads == [4, 4] and report.surgery == []
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
