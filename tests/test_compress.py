"""Compressing one block's layers (``calibration.compress``): the sequential order (calls taking turns) against the
parallel one, and OWL's pass, which pruning and shrinking share."""

from __future__ import annotations

import copy

import pytest
import torch

from lmcompress.calibration.engine import capture_block_inputs
from lmcompress.models.families import get_blocks
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.prune import PruneConfig, prune
from lmcompress.transforms.shrink import StructureConfig, structured_prune

CPU = torch.device("cpu")


def _block0(family: str, calib: torch.Tensor):
    model = build_tiny_model(family, 320, max_positions=256)
    return get_blocks(model)[0], capture_block_inputs(model, calib, CPU)


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


class _Recorder:
    """A layer solver that changes nothing and notes what the driver asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def solve(self, i, layers, group, stats):
        self.calls.append(("solve", i, tuple(group), stats is None))

    def apply(self, i, layers, group, result):
        self.calls.append(("apply", i, tuple(group)))

    def block_done(self, i, layers):
        self.calls.append(("done", i))


@torch.no_grad()
def test_one_layerwise_driver_for_every_method_with_or_without_data(calib):
    """``compress_layers`` (prune and quantize are two solvers on it): without data every layer is solved alone
    from its weights; with data the layers reading one input are solved together from their statistics; each
    block is done once, in order."""
    from lmcompress.models.families import find_prunable
    from lmcompress.transforms.layerwise import compress_layers

    model = build_tiny_model("llama", 320, max_positions=256)
    n, names = len(get_blocks(model)), list(find_prunable(get_blocks(model)[0]))
    free = _Recorder()
    flags = {"hessian": False, "desc": "test", "progress": False}
    assert compress_layers(model, free, None, CPU, in_block="sequential", last_outputs=False, **flags) == (None, {})

    def alone(i: int) -> list[tuple]:
        return [("solve", i, (m,), True) for m in names] + [("apply", i, (m,)) for m in names] + [("done", i)]

    assert free.calls == [c for i in range(n) for c in alone(i)]
    data = _Recorder()
    last, fallback = compress_layers(model, data, calib, CPU, in_block="parallel", last_outputs=True, **flags)
    solved = [c for c in data.calls if c[0] == "solve"]
    assert ("solve", 0, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), False) in solved
    assert sorted(m for c in solved if c[1] == 0 for m in c[2]) == sorted(names)
    assert [c for c in data.calls if c[0] == "done"] == [("done", i) for i in range(n)] and fallback == {}
    assert last.hidden.shape[:2] == calib.shape
