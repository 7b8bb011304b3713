"""The block walker and its block sources, the statistics collector and the phases (``lmcompress.calibration``)."""

from __future__ import annotations

import copy

import pytest
import torch

from lmcompress.algorithms.units import UnitStats
from lmcompress.calibration.engine import capture_block_inputs, collect, collect_input_stats, run_block, walk_blocks
from lmcompress.calibration.stats import GRAM_SLAB, InputRows, InputStats, add_gram_, fill_lower_
from lmcompress.models.families import get_blocks, get_final_norm
from lmcompress.models.tiny import build_tiny_model
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


def test_phi3_ffn_after_heads_is_measured_with_the_pruned_head_count(calib):
    """Phi-3's forward reads the head count from the config: the FFN statistics run behind pruned attention."""
    model = build_tiny_model("phi3", 320, max_positions=256)
    report = structured_prune(model, StructureConfig("ffn,heads", 0.5), calib, progress=False)
    assert report.heads == [2, 2] and report.ffn_widths[0] < 128
    assert torch.isfinite(model(calib[:1]).logits).all()


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
