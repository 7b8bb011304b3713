"""Joint sparsity × bits search under a size budget: levels grammar, exact bytes, the budget met on disk."""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.models.tiny import build_tiny_model
from lmcompress.search.joint import packed_size, parse_size
from lmcompress.search.levels import parse_joint_levels
from tests.conftest import run_cli, search_args


def test_joint_levels_grammar_sorts_by_cost_and_refuses_bad_items():
    levels = parse_joint_levels("0/4,0/16,2:4/4,0.5/3,0/2,0/4")
    assert [lv.label for lv in levels] == ["0/16", "0/4", "2:4/4", "0.5/3", "0/2"]
    assert levels[2].pattern == "2:4" and levels[2].sparsity == 0.5 and levels[3].pattern == "unstructured"
    assert parse_joint_levels("auto")[0].label == "0/16"
    bad = {
        "0/4": "at least two",
        "0/4,0.5": "SPARSITY/BITS",
        "0/4,1.2/3": r"\[0, 1\)",
        "0/4,0/7": "not one of",
        "0/4,0/x": "not a bit width",
        "0/4,3:2/4": "N:M",
        "0/4,abc/4": "not a sparsity",
    }
    for text, message in bad.items():
        with pytest.raises(UserError, match=message):
            parse_joint_levels(text)


def test_size_texts_parse_to_bytes_or_a_fraction():
    assert parse_size("60MB") == (60_000_000, False)
    assert parse_size("1.5 MiB") == (1_572_864, False)
    assert parse_size("0.3x") == (0.3, True)
    for bad in ("sixty", "1.5x", "0x", "-3MB"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_size_budget_is_met_on_disk_and_predicted_bytes_are_written(tied_folder, tmp_path, calib_file, capsys):
    import lmcompress

    out = tmp_path / "joint"
    budget = 0.3 * 2 * sum(p.numel() for p in lmcompress.load(tied_folder)[0].parameters())
    assert run_cli(search_args(tied_folder, out, calib_file, f"size={int(budget)}")) == 0
    report = json.loads(capsys.readouterr().out)
    size = report["size"]
    written = packed_size(out)
    assert size["written"] == written
    assert written <= size["budget"] == int(budget)  # never over the budget, counted from the bytes written
    assert 0 <= size["predicted"] - written <= 16 * len(report["layer_levels"]) + 64  # header offsets' digits only
    step = max(size["budget"] - size["predicted"], 0)
    assert step < 0.2 * budget  # the search fills the budget to within one level step
    levels = {lv.label for lv in parse_joint_levels("auto")}
    assert set(report["layer_levels"].values()) <= levels and "lm_head" in report["layer_levels"]
    recipe = json.loads((out / "lmcompress.json").read_text())  # floats are stored in 16 bits, as they were counted
    floats = [e for e in recipe["packed"]["tensors"].values() if e.get("kind") == "tensor"]
    assert floats and {e["dtype"] for e in floats} == {"bfloat16"}
    model, _ = lmcompress.load(out)  # the saved model is the searched one: its head holds at most 2^bits values
    head_bits = report["layer_levels"]["lm_head"].split("/")[1]
    w = model.lm_head.weight.detach().float()
    if head_bits != "16":
        assert len(torch.unique(w[0, :32])) <= 2 ** int(head_bits)
    assert model.model.embed_tokens.weight is model.lm_head.weight or torch.equal(model.model.embed_tokens.weight, w)
    assert run_cli(["report", str(out)]) == 0  # drawn as its levels' nominal bits per weight
    assert "bits per weight" in (out / "report.md").read_text()


def test_relative_size_budget_and_explicit_levels(tied_folder, tmp_path, calib_file, capsys):
    out = tmp_path / "rel"
    assert run_cli(search_args(tied_folder, out, calib_file, "size=0.35x", "--levels", "0/16,0/8,0/4,2:4/4,0/2")) == 0
    size = json.loads(capsys.readouterr().out)["size"]
    assert packed_size(out) <= size["budget"] == int(0.35 * size["sixteen_bit"])


def test_a_budget_below_the_smallest_level_is_refused_and_writes_nothing(tied_folder, tmp_path, calib_file, capsys):
    out = tmp_path / "tiny"
    assert run_cli(search_args(tied_folder, out, calib_file, "size=2KB")) != 0
    err = capsys.readouterr().err
    assert "below the smallest" in err and "0/2" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("budget", "extra", "message"),
    [
        ("size=lots", (), "must be bytes"),
        ("size=60MB", ("--levels", "0/4,0/9"), "not one of"),
        ("size=60MB", ("--method", "wanda"), "sparsegpt"),
        ("size=60MB", ("--rounds", "2"), "rounds"),
    ],
)
def test_bad_size_searches_are_refused(tied_folder, tmp_path, calib_file, capsys, budget, extra, message):
    out = tmp_path / "bad"
    assert run_cli(search_args(tied_folder, out, calib_file, budget, *extra)) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_uniform_start_fills_the_budget_to_within_one_step_of_a_block():
    from lmcompress.search.joint import place_uniform, size_space

    # unit 0: a head whose steps are large; units 1-4: blocks; levels at 16, 8, 4 and 2 bits per weight
    cost = [[160.0, 80.0, 40.0, 20.0]] + [[32.0, 16.0, 8.0, 4.0]] * 4
    values = [16.0, 8.0, 4.0, 2.0]
    for budget in (100, 123, 150, 200, 288):
        space = size_space(cost, 0, budget, ["a", "b", "c", "d"], heads=[0])
        assert space.slack == 16  # the largest step of a block, not the head's
        levels = place_uniform(space, values, 8 * budget / 288)
        assert budget - 16 <= space.total(levels) <= budget
    with pytest.raises(UserError, match="below the smallest"):
        size_space(cost, 10, 35, ["a", "b", "c", "d"], heads=[0])


def test_dropped_blocks_leave_the_saved_model_and_the_budget_holds(tmp_path, tokenizer, calib_file, capsys):
    import lmcompress

    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256, tie_word_embeddings=True,
                             num_hidden_layers=4)  # fmt: skip
    src = tmp_path / "four"
    save_model(model, tokenizer, src, {"kind": "test-model"})
    out = tmp_path / "dropped"
    assert run_cli(search_args(src, out, calib_file, "size=0.15x", "--levels", "0/16,0/4,0/2,drop")) == 0
    report = json.loads(capsys.readouterr().out)
    size, dropped = report["size"], report["size"]["dropped_blocks"]
    assert dropped and packed_size(out) <= size["budget"]  # 0/2 everywhere takes more than 0.15x: blocks must go
    assert [lv for lv in report["allocation"] if lv == "drop"] == ["drop"] * len(dropped)
    loaded, _ = lmcompress.load(out)
    assert loaded.config.num_hidden_layers == len(loaded.model.layers) == 4 - len(dropped)
    ids = torch.arange(16).unsqueeze(0) % tokenizer.vocab_size
    assert torch.isfinite(loaded(ids).logits).all()


def test_drop_is_refused_where_a_zero_block_is_not_the_identity(tokenizer):
    from lmcompress.search.joint import check_drop
    from lmcompress.search.run import SearchConfig

    check_drop(build_tiny_model("llama", tokenizer.vocab_size))  # no bias on the output projections: passes
    gpt2 = build_tiny_model("gpt2", tokenizer.vocab_size)
    gpt2.transformer.h[0].mlp.c_proj.bias.data.fill_(0.1)  # an output projection's bias: a zero block adds it
    with pytest.raises(UserError, match="pass their input through"):
        check_drop(gpt2)
    with pytest.raises(UserError, match="granularity block"):
        SearchConfig(kind="size", target=1e6, levels="0/4,drop", granularity="layer")
