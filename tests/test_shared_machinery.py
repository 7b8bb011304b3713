"""The machinery every transform shares: the statistics collector, the OWL pass and the whole-job skeleton."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmcompress.algorithms.units import UnitStats
from lmcompress.calibration.engine import capture_block_inputs, collect, collect_input_stats
from lmcompress.calibration.stats import InputRows
from lmcompress.jobs import (
    drop_experts_pretrained,
    factorize_pretrained,
    prune_pretrained,
    quantize_pretrained,
    structured_prune_pretrained,
)
from lmcompress.models.families import get_blocks
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.experts import ExpertConfig
from lmcompress.transforms.factorize import FactorizeConfig
from lmcompress.transforms.prune import PruneConfig, prune
from lmcompress.transforms.quantize import QuantConfig
from lmcompress.transforms.shrink import StructureConfig, structured_prune

CPU = torch.device("cpu")


def _block0(family: str, calib: torch.Tensor):
    model = build_tiny_model(family, 320, max_positions=256)
    return get_blocks(model)[0], capture_block_inputs(model, calib, CPU)


@torch.no_grad()
def test_input_stats_shared_between_layers_that_read_one_tensor_and_equal_direct_sums(calib):
    block, inputs = _block0("llama", calib)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj"]
    stats = collect_input_stats(block, inputs, names, hessian=True)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert stats["mlp.gate_proj"] is not stats["self_attn.q_proj"]
    x = block.input_layernorm(inputs.hidden).reshape(-1, inputs.hidden.shape[-1]).float()  # what q/k/v read
    s = stats["self_attn.q_proj"]
    assert s.tokens == calib.numel()
    torch.testing.assert_close(s.sq_sum, (x * x).sum(0))
    torch.testing.assert_close(s.hessian, 2 * x.t() @ x / x.shape[0])


@torch.no_grad()
def test_collect_feeds_outputs_too_and_keeps_rows_in_window_order(calib):
    block, inputs = _block0("llama", calib)
    rows = lambda _n, _m: InputRows()  # noqa: E731
    normed = collect(block, inputs, ["input_layernorm"], rows, output=True)["input_layernorm"].rows
    q_in = collect(block, inputs, ["self_attn.q_proj"], rows)["self_attn.q_proj"].rows
    assert normed.shape == (calib.numel(), inputs.hidden.shape[-1])
    assert torch.equal(normed, q_in)
    assert torch.equal(q_in, block.input_layernorm(inputs.hidden).reshape(normed.shape))


@torch.no_grad()
def test_unit_stats_and_moe_rows_come_from_the_same_collector(calib):
    block, inputs = _block0("mixtral", calib)
    moe_in = collect(block, inputs, ["mlp"], lambda _n, _m: InputRows())["mlp"].rows
    normed = collect(block, inputs, ["post_attention_layernorm"], lambda _n, _m: InputRows(), output=True)
    assert torch.equal(moe_in, normed["post_attention_layernorm"].rows)
    unit = collect(block, inputs, ["mlp"], lambda _n, _m: UnitStats(moe_in.shape[1], covariance=False))["mlp"]
    assert unit.tokens == moe_in.shape[0]
    torch.testing.assert_close(unit.mean, moe_in.double().mean(0).float())


def test_owl_pass_is_the_same_for_unstructured_and_structured_pruning(calib):
    model = build_tiny_model("llama", 320, max_positions=256, num_hidden_layers=3)
    pruned = prune(
        copy.deepcopy(model),
        PruneConfig(method="magnitude", sparsity=0.3, allocation="owl", owl_m=2.0, owl_lambda=0.1),
        calib,
        progress=False,
    )
    shrunk = structured_prune(
        copy.deepcopy(model),
        StructureConfig("ffn", 0.3, "magnitude", allocation="owl", owl_m=2.0, owl_lambda=0.1),
        calib,
        progress=False,
    )
    assert len(set(pruned.outlier_ratios)) > 1, "the blocks should differ, or the test shows nothing"
    assert shrunk.outlier_ratios == pruned.outlier_ratios
    assert shrunk.block_ratios["ffn"] == pruned.block_targets
    assert sum(pruned.block_targets) / 3 == pytest.approx(0.3)


def test_phi3_ffn_after_heads_is_measured_with_the_pruned_head_count(calib):
    """Phi-3's forward reads the head count from the config: the FFN statistics run behind pruned attention."""
    model = build_tiny_model("phi3", 320, max_positions=256)
    report = structured_prune(model, StructureConfig("ffn,heads", 0.5), calib, progress=False)
    assert report.heads == [2, 2] and report.ffn_widths[0] < 128
    assert torch.isfinite(model(calib[:1]).logits).all()


JOBS = {
    "prune": lambda src, out, **kw: prune_pretrained(src, PruneConfig("wanda", 0.5), out, **kw),
    "quantize": lambda src, out, **kw: quantize_pretrained(src, QuantConfig("rtn", 4, 32), out, **kw),
    "structured": lambda src, out, **kw: structured_prune_pretrained(src, StructureConfig("ffn", 0.25), out, **kw),
    "experts": lambda src, out, **kw: drop_experts_pretrained(src, ExpertConfig(keep=4), out, **kw),
    "factorize": lambda src, out, **kw: factorize_pretrained(src, FactorizeConfig("rank:4"), out, **kw),
}


@pytest.mark.parametrize("kind", sorted(JOBS))
def test_every_job_reports_transform_time_and_whole_job_time_the_same_way(kind, tiny_folder, tmp_path):
    source = tiny_folder("mixtral" if kind == "experts" else "llama")
    out = tmp_path / "out"
    report = JOBS[kind](source, out, calib_data="bundled:wikitext2-valid", nsamples=2, seqlen=32, progress=False)
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["kind"] == kind
    assert recipe[f"{kind}_time_s"] == report.wall_time_s  # the transformation alone
    assert 0 < report.wall_time_s < recipe["wall_time_s"]  # the whole job also loaded the model and the text
