"""The machinery every transform shares: the statistics collector, the OWL pass and the whole-job skeleton."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmcompress.algorithms.units import UnitStats
from lmcompress.calibration.engine import capture_block_inputs, collect, collect_input_stats, run_block, walk_blocks
from lmcompress.calibration.stats import GRAM_SLAB, InputRows, InputStats, add_gram_, fill_lower_
from lmcompress.checkpoint.folder import json_text
from lmcompress.errors import UserError
from lmcompress.jobs import (
    drop_experts_pretrained,
    factorize_pretrained,
    prune_pretrained,
    quantize_pretrained,
    structured_prune_pretrained,
)
from lmcompress.models.families import get_blocks, get_final_norm
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


@pytest.mark.parametrize("width", [7, 256, 576, 1000])
def test_gram_from_upper_slabs_equals_the_full_product_once_filled(width):
    torch.manual_seed(0)
    xtx = torch.zeros(width, width)
    parts = [torch.randn(33, width), torch.randn(20, width), torch.randn(5, width)]
    add_gram_(xtx, parts[0])
    fill_lower_(xtx)  # read half-way (a filled lower part then goes stale and is filled again)
    for x in parts[1:]:  # accumulated over calls, as a statistic is
        add_gram_(xtx, x)
    x = torch.cat(parts)
    torch.testing.assert_close(fill_lower_(xtx), x.t() @ x, rtol=1e-5, atol=1e-4)
    if width > GRAM_SLAB:  # the lower triangle is a copy of the upper one (one plain product: equal up to rounding)
        assert torch.equal(xtx, xtx.t())
    stats = InputStats(width, torch.device("cpu"), hessian=True)
    for k, part in enumerate(parts):
        stats.add(part)
        seen = torch.cat(parts[: k + 1])
        torch.testing.assert_close(stats.xtx, seen.t() @ seen, rtol=1e-5, atol=1e-4)  # whole after every read
        assert torch.equal(stats.xtx, stats.xtx.t()) or width <= GRAM_SLAB


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_collect_stops_the_forward_once_every_module_has_its_input_and_sums_stay_exact(family, calib):
    block, inputs = _block0(family, calib)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] if family == "llama" else ["mlp.gate"]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # a plain pass, every input kept
    handles = [block.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0])) for n in names]
    run_block(block, inputs, keep="none")
    for h in handles:
        h.remove()
    last = block.get_submodule(names[-1])
    finished = []  # the last module's forward completes for the probe window only, then the block stops at its input
    handle = last.register_forward_hook(lambda *_: finished.append(1))
    stats = collect_input_stats(block, inputs, names, hessian=True)
    handle.remove()
    assert inputs.hidden.shape[0] > 1 and finished == [1]
    for n in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[n]]).float()
        assert stats[n].tokens == x.shape[0] == calib.numel()
        torch.testing.assert_close(stats[n].sq_sum, (x * x).sum(0))
        torch.testing.assert_close(stats[n].hessian, 2 * x.t() @ x / x.shape[0])


@torch.no_grad()
@pytest.mark.parametrize("last_outputs", [True, False])
def test_walk_runs_the_last_block_again_only_when_its_outputs_are_read(last_outputs, calib):
    model = build_tiny_model("llama", 320, max_positions=256, num_hidden_layers=3)
    blocks = get_blocks(model)
    calls = [0] * len(blocks)
    for i, b in enumerate(blocks):
        b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    after_visit: list[int] = []
    last = walk_blocks(
        model, calib, CPU, lambda i, _b, _in: after_visit.append(calls[i]), progress=False, last_outputs=last_outputs
    )
    runs_after = [calls[i] - after_visit[i] for i in range(len(blocks))]
    assert runs_after[:-1] == [runs_after[0]] * (len(blocks) - 1) and runs_after[0] > 0
    assert runs_after[-1] == (runs_after[0] if last_outputs else 0)
    if last_outputs:  # the returned hidden states are the model's own last-block outputs (HF's last: normed)
        hidden = model(calib, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(get_final_norm(model)(last.hidden), hidden, rtol=1e-4, atol=1e-4)


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


def test_phases_are_exclusive_and_add_up(monkeypatch):
    from lmcompress.calibration import phases

    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])  # enter a, enter b, leave b, enter c, leave c, leave a
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(clock))
    phases.reset()
    with phases.phase("a"):
        with phases.phase("b"):
            pass
        with phases.phase("c"):
            pass
    assert phases.seconds() == {"a": 1.0 + 3.0 + 5.0, "b": 2.0, "c": 4.0}


def test_a_job_recipe_says_where_its_time_went(tmp_path, tiny_folder):
    out = tmp_path / "o"
    prune_pretrained(
        str(tiny_folder("llama")),
        PruneConfig(method="sparsegpt", sparsity=0.5),
        out,
        calib_data="bundled:wikitext2-valid",
        nsamples=4,
        seqlen=32,
        progress=False,
    )
    recipe = json.loads((out / "lmcompress.json").read_text())
    timings = recipe["timings_s"]
    assert {"load", "calibration text", "capture", "statistics", "solves", "block outputs"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert sum(timings.values()) <= recipe["wall_time_s"] + 0.01
    assert sum(timings.values()) >= 0.5 * recipe["wall_time_s"]  # the phases cover the job, not a corner of it


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
    assert {"load", "transform (rest)"} <= set(recipe["timings_s"])
    assert sum(recipe["timings_s"].values()) <= recipe["wall_time_s"] + 0.01
    said = json.loads(json_text(report.recipe_fields()))  # the report says what the recipe records
    said.pop("surgery", None)  # the recipe puts a resized source's records first
    assert said and {k: recipe[k] for k in said} == said


def test_job_options_check_themselves_and_are_the_clis_job_keys():
    from lmcompress.cli.options import JOB_KEYS
    from lmcompress.job_options import JobOptions, names

    assert set(JOB_KEYS) | {"progress"} == set(names())
    assert JobOptions(offload=" Disk ").offload == "disk"
    for bad in ({"offload": "tape"}, {"nsamples": 0}, {"seqlen": 0}, {"nsamples": True}):
        with pytest.raises(UserError) as caught:
            JobOptions(**bad)
        assert caught.value.params == tuple(bad)
    with pytest.raises(TypeError, match="nsample"):
        JobOptions.of({"nsample": 4})


def test_a_job_refuses_bad_options_before_writing_anything(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="nsamples"):
        prune_pretrained(tiny_folder("llama"), PruneConfig("magnitude", 0.5), tmp_path / "o", nsamples=0)
    assert list(tmp_path.iterdir()) == []


def test_placements_in_memory_shared_over_ranks_or_streamed(tiny_folder, monkeypatch):
    """One process: in memory or streamed; several ranks: shared, and streaming is refused before any work."""
    import lmcompress.jobs as jobs
    from lmcompress.calibration import distributed
    from lmcompress.job_options import JobOptions
    from lmcompress.streaming import Streamed

    source, config = str(tiny_folder("llama")), PruneConfig("wanda", 0.5)

    def placement(offload: str):
        return jobs.choose_placement("prune", source, config, JobOptions(offload=offload), "dense")

    assert isinstance(placement("disk"), Streamed) and type(placement("none")) is jobs.InMemory
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    assert type(placement("none")) is jobs.Distributed
    with pytest.raises(UserError, match=r"torch\.distributed"):
        placement("disk")


@torch.no_grad()
def test_the_walker_asks_the_block_source_to_load_finish_and_free_each_block(calib):
    """The one loop over the blocks: load, visit, outputs, finish (with the next inputs unless unread), free."""
    from lmcompress.calibration.offload import STREAM_ATTR, InMemory

    model = build_tiny_model("llama", 320, max_positions=256)
    plain = copy.deepcopy(model)
    calls: list[tuple] = []

    class Recording(InMemory):
        def load(self, i, device):
            calls.append(("load", i))
            super().load(i, device)

        def finish(self, i, hidden):
            calls.append(("finish", i, hidden is None))

        def free(self, i):
            calls.append(("free", i))
            super().free(i)

    setattr(model, STREAM_ATTR, Recording(model))
    n = len(get_blocks(model))
    for last_outputs in (True, False):
        calls.clear()
        walked = walk_blocks(model, calib, CPU, lambda *_: None, progress=False, last_outputs=last_outputs)
        unread = [not last_outputs and i == n - 1 for i in range(n)]
        assert calls == [c for i in range(n) for c in (("load", i), ("finish", i, unread[i]), ("free", i))]
    reference = walk_blocks(plain, calib, CPU, lambda *_: None, progress=False)
    walked = walk_blocks(model, calib, CPU, lambda *_: None, progress=False)
    assert torch.equal(walked.hidden, reference.hidden)


# ------------------------------------------------------------------ the order of the layers inside a block


def _sparsegpt_by_hand(model, ids: torch.Tensor, sparsity: float) -> None:
    """Sequential SparseGPT with the model's own forward, layer by layer in the order each block calls them:
    each layer's Hessian is measured by a whole-model forward after every layer before it was pruned."""
    from lmcompress.algorithms.sparsegpt import sparsegpt_prune
    from lmcompress.models.families import find_prunable, weight_matrix

    for block in get_blocks(model):
        layers = find_prunable(block)
        order: list[str] = []
        note = [lambda _m, _a, n=n, order=order: order.append(n) for n in layers]
        handles = [m.register_forward_pre_hook(f) for m, f in zip(layers.values(), note, strict=True)]
        model(ids[:1], use_cache=False)
        for h in handles:
            h.remove()
        for name in dict.fromkeys(order):
            rows: list[torch.Tensor] = []
            handle = layers[name].register_forward_pre_hook(lambda _m, a, rows=rows: rows.append(a[0]))
            model(ids, use_cache=False)
            handle.remove()
            x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
            hessian = (2 * x.t() @ x / x.shape[0]).float()
            weight_matrix(layers[name]).copy_(sparsegpt_prune(weight_matrix(layers[name]), hessian, sparsity).weight)


@torch.no_grad()
def test_sequential_order_is_layer_by_layer_pruning_with_several_calls_taking_turns(calib, monkeypatch):
    """``in_block="sequential"`` equals pruning each layer after the layers its block runs before it, with the
    block's windows split over four calls that take turns (2 windows each), and runs each block once."""
    import lmcompress.calibration.batching as batching

    monkeypatch.setattr(batching, "WINDOW_TOKENS", 2 * calib.shape[1])
    model = build_tiny_model("llama", 320, max_positions=256)
    reference = copy.deepcopy(model)
    windows_run: list[int] = []  # windows per call of block 0
    get_blocks(model)[0].register_forward_pre_hook(
        lambda _m, a, k: windows_run.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    report = prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calib, progress=False)
    assert report.in_block_fallback == {}
    # two-window calls: choose_batch's check, then the four calls (the parallel order: 1 + 4 statistics + 4 outputs)
    assert windows_run.count(2) == 5 and max(windows_run) == 2
    _sparsegpt_by_hand(reference, calib, 0.5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@torch.no_grad()
def test_sequential_falls_back_to_parallel_where_it_cannot_pause_every_call(calib, monkeypatch):
    """Too many activations for one pass, or experts that not every call reaches: the parallel order, said in
    the report, with exactly the parallel order's result."""
    import lmcompress.calibration.compress as compress

    model = build_tiny_model("llama", 320, max_positions=256)
    parallel = copy.deepcopy(model)
    monkeypatch.setattr(compress, "ONE_PASS_ELEMENTS", 1000)
    report = prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calib, progress=False)
    (why, blocks), *rest = report.in_block_fallback.items()
    assert not rest and blocks == len(get_blocks(model)) and "do not fit one call" in why
    prune(parallel, PruneConfig(method="sparsegpt", sparsity=0.5, in_block="parallel"), calib, progress=False)
    for a, b in zip(model.parameters(), parallel.parameters(), strict=True):
        assert torch.equal(a, b)
    moe = build_tiny_model("mixtral", 320, max_positions=256)
    monkeypatch.undo()  # experts are fused tensors, not layers: the router and attention run for every window
    assert prune(moe, PruneConfig(method="wanda", sparsity=0.5), calib, progress=False).in_block_fallback == {}


class _Routed(torch.nn.Module):
    """A block whose second layer runs only for windows whose first input is positive (a routed expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, hidden):
        out = self.a(hidden)
        return out + self.b(out) if hidden[0, 0, 0] > 0 else out


@torch.no_grad()
def test_calls_that_reach_different_layers_stop_with_a_clear_error():
    from lmcompress.calibration.compress import compress_block
    from lmcompress.calibration.engine import BlockInputs

    hidden = torch.randn(4, 3, 4)
    hidden[:, 0, 0] = torch.tensor([1.0, 1.0, -1.0, 1.0])  # the third call does not reach ``b``
    block = _Routed()
    with pytest.raises(RuntimeError, match="in-block parallel"):
        compress_block(
            block, BlockInputs(hidden, batch=1), ["a", "b"], lambda _g, _s: None, lambda _g, _r: None,
            lambda _g: 1.0, hessian=False,
        )  # fmt: skip


@torch.no_grad()
def test_a_failing_solve_inside_the_turns_reaches_the_caller_and_leaves_no_thread(calib, monkeypatch):
    import threading

    import lmcompress.calibration.compress as compress
    from lmcompress.calibration.compress import compress_block

    block, inputs = _block0("llama", calib)
    inputs.batch = 2  # four calls
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    solved: list[list[str]] = []

    def solve(group, stat):
        solved.append(group)
        if group == ["self_attn.o_proj"]:
            raise ValueError("no solution")
        return None

    before = threading.active_count()
    with pytest.raises(ValueError, match="no solution"):
        compress_block(
            block, inputs, names, solve, lambda _g, _r: None, lambda _g: 1.0, hessian=False,
        )  # fmt: skip
    assert solved == [names[:3], names[3:]] and threading.active_count() == before
    assert compress.IN_BLOCK == ("sequential", "parallel")
