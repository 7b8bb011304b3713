"""Joint search under a decode-time budget: the latency table (measured once, cached per machine), the budget
met by the prediction, and bad budgets refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmcompress.errors import UserError
from lmcompress.models.tiny import build_tiny_model
from lmcompress.search import latency
from lmcompress.search.config import SearchConfig
from lmcompress.search.joint import head_bits
from lmcompress.search.levels import JointLevel, parse_joint_levels
from tests.conftest import run_cli, search_args

# fake seconds per weight of a layer at each level (falling with the level, as auto's levels do), and the rest
PER_WEIGHT = {"0/16": 8e-9, "0/8": 4e-9, "0/4": 2e-9, "0/3": 1.8e-9, "2:4/4": 1.5e-9, "2:4/3": 1.4e-9, "0/2": 1.2e-9}
REST = 2e-4


def fake_seconds(key: str) -> float:
    if key.startswith("rest/"):
        return REST
    _, shape, *level = key.split("/")
    out, inp = (int(x) for x in shape.split("x"))
    label = "/".join(level[:2])
    return PER_WEIGHT[label] * out * inp


@pytest.fixture
def fake_timer(monkeypatch, tmp_path):
    """Layers and the rest timed by :func:`fake_seconds` (the rest's step run once, to check it runs), one copy
    of each layer, the table in a fresh cache; returns the list of keys timed."""
    timed: list[str] = []

    def fake(call, key):
        timed.append(key)
        if key.startswith("rest/"):
            call()
        return fake_seconds(key)

    monkeypatch.setattr(latency, "time_call", fake)
    monkeypatch.setattr(latency, "ROTATE_BYTES", 0)
    monkeypatch.setenv("LMCOMPRESS_CACHE", str(tmp_path / "cache"))
    return timed


def test_decode_texts_parse_and_bad_ones_say_what_to_write():
    assert latency.parse_decode("2.5x") == (2.5, "x")
    assert latency.parse_decode(" 40ms ") == (pytest.approx(0.04), "s")
    assert latency.parse_decode("25tok/s") == (pytest.approx(0.04), "s")
    assert latency.parse_decode("0.5s") == (0.5, "s")
    for bad, message in {"fast": "speed-up", "40": "speed-up", "0.5x": "at least 1x", "0ms": "positive"}.items():
        with pytest.raises(UserError, match=message):
            latency.parse_decode(bad)
    with pytest.raises(UserError, match="joint SPARSITY/BITS"):
        SearchConfig(kind="sparsity", decode="2x")
    with pytest.raises(UserError, match="speed-up"):
        SearchConfig(kind="size", target=1.0, decode="quick")


def test_layers_are_built_with_the_kernels_load_uses():
    w_shape = (64, 128)
    x = torch.randn(3, 128)
    cases = {
        JointLevel(0.0, 16): "dense float32",
        JointLevel(0.5, 16, "2:4"): "sparse kernel, 2:4 float32",
        JointLevel(0.5, 4, "2:4"): "sparse kernel, 2:4 4-bit",
        JointLevel(0.0, 4): "4-bit",
        JointLevel(0.5, 16): "",  # unstructured: whatever load runs it with (dense, or a bitmask kernel)
    }
    for level, expected in cases.items():
        layer, how = latency.build_layer(w_shape, level, 32, True)
        assert expected in how and (expected or "dense float32" in how or "bitmask" in how), (level, how)
        assert layer(x).shape == (3, 64)
    assert latency.layer_key(w_shape, JointLevel(0.5, 4, "2:4"), 32, True) == "layer/64x128/2:4/4/g32s"
    assert latency.layer_key(w_shape, JointLevel(0.0, 16), 32, True) == "layer/64x128/0/16"


def test_the_table_is_built_with_the_timer_and_reused_from_its_file(fake_timer, tokenizer):
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256, tie_word_embeddings=True)
    levels = parse_joint_levels("0/16,0/4,2:4/4,0/2", 32)
    costs = latency.decode_costs(model, levels, "2x", 32)
    shapes = {tuple(m.weight.shape) for name, m in model.named_modules() if name in costs.layers}
    head_levels = set(head_bits(levels))  # the head at the fewest bits so far: 16, 4, 2
    assert len(fake_timer) == (len(shapes) - 1) * len(levels) + len(head_levels) + 1  # each once, and the rest
    layer = costs.layers[0]
    out, inp = model.get_submodule(layer).weight.shape
    assert costs.cost[layer] == [PER_WEIGHT[lv.label] * out * inp for lv in levels]
    head = costs.layers[-1]
    assert head == "lm_head" and costs.cost[head][-1] == PER_WEIGHT["0/2"] * tokenizer.vocab_size * inp
    assert costs.rest == REST and costs.dense == pytest.approx(REST + sum(c[0] for c in costs.cost.values()))
    assert costs.budget == pytest.approx(costs.dense / 2) and costs.measured == len(fake_timer)
    table = json.loads(Path(costs.table).read_text())
    assert table["machine"] == latency.machine() and len(table["entries"]) == len(fake_timer)
    fake_timer.clear()
    again = latency.decode_costs(model, levels, "30ms", 32)
    assert fake_timer == [] and again.measured == 0 and again.cost == costs.cost and again.budget == 0.03


def test_costs_that_grow_with_the_level_are_bounded_from_above():
    costs = latency.DecodeCosts(["a"], ["0/16", "0/4", "0/3", "0/2"], {"a": [4.0, 1.0, 2.0, 1.5]}, 0.5, 4.5, 2.0, "t")
    assert costs.monotone("a") == [4.0, 2.0, 2.0, 1.5]
    assert costs.total({"a": 1}) == 2.5 and costs.total({"a": 1}, monotone=False) == 1.5
    space = latency.decode_space(costs, [["a"]], {"a": 0})
    assert space.cost == ((4_000_000_000, 2_000_000_000, 2_000_000_000, 1_500_000_000),)
    assert space.fixed == 500_000_000 and space.budget_bytes == 2_000_000_000
    costs.budget = 1.9
    with pytest.raises(UserError, match="below the fastest"):
        latency.check_budget(costs)


def test_the_searched_model_meets_the_decode_budget(fake_timer, tied_folder, tmp_path, calib_file, capsys):
    import lmcompress

    out = tmp_path / "fast"
    assert run_cli(search_args(tied_folder, out, calib_file, "decode=2x")) == 0
    report = json.loads(capsys.readouterr().out)
    decode, chosen = report["decode"], report["layer_levels"]
    model, _ = lmcompress.load(tied_folder)
    predicted = REST
    for layer, label in chosen.items():
        out_f, in_f = model.get_submodule(layer).weight.shape
        predicted += fake_seconds(f"layer/{out_f}x{in_f}/{label}")
    assert decode["predicted_s"] == pytest.approx(predicted) and predicted <= decode["budget_s"]
    assert decode["budget_s"] == pytest.approx(decode["dense_s"] / 2) and report["achieved"] == decode["predicted_s"]
    assert "budget" not in report["size"] and report["size"]["written"] > 0  # bytes are reported as bytes only
    assert set(chosen.values()) != {"0/2"}  # the budget is used, not every layer at the fastest level
    assert json.loads((out / "lmcompress.json").read_text())["budget"] == {"decode": "2x"}  # the recipe names it
    fast, _ = lmcompress.load(out, kernels="auto")
    assert fast.lmcompress_kernels.swapped  # the levels run on the kernels the table timed
    measured = len(fake_timer)
    assert run_cli(search_args(tied_folder, tmp_path / "again", calib_file, "decode=2x")) == 0  # the table is reused
    assert len(fake_timer) == measured and json.loads(capsys.readouterr().out)["decode"]["table_entries_measured"] == 0


@pytest.mark.parametrize(
    ("budget", "message"),
    [("decode=100x", "below the fastest"), ("decode=fast", "decode budget"), ("decode=", "decode budget")],
)
def test_bad_decode_budgets_are_refused_and_write_nothing(
    fake_timer, tied_folder, tmp_path, calib_file, capsys, budget, message
):
    out = tmp_path / "bad"
    assert run_cli(search_args(tied_folder, out, calib_file, budget)) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_clock_is_part_of_the_machine_key(monkeypatch):
    wall = latency.table_path("/x")
    monkeypatch.setenv(latency.CLOCK_VARIABLE, "cpu")
    assert latency.machine()["clock"] == "cpu" and latency.table_path("/x") != wall
    assert latency.time_call(lambda: sum(range(100)), "k") > 0
    monkeypatch.setenv(latency.CLOCK_VARIABLE, "sundial")
    with pytest.raises(UserError, match="wall or cpu"):
        latency.machine()
