"""transforms.smooth: SmoothQuant (α given or searched) and AWQ on whole models, block by block, before
quantization; the dense function is unchanged, the searches keep their best point, bad input is refused."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lmcompress.errors import UserError
from lmcompress.models.families import get_blocks, weight_matrix
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.quantize import QuantConfig, quantize
from lmcompress.transforms.smooth import SmoothConfig, check_smoothquant, smooth_model
from tests.conftest import logits_of, random_ids, run_cli
from tests.test_smoothquant import perturbed

FAMILIES = [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", {"num_key_value_heads": 4}),
    ("opt", {}),
    ("gpt2", {}),
    ("phi3", {}),
    ("phi", {}),
    ("gpt_neox", {}),
]


def windows(vocab: int, n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


def block_weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for b in get_blocks(model) for p in b.parameters()]


@pytest.mark.parametrize(("family", "overrides"), FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("how", ["alpha", "auto", "awq"])
def test_smoothing_leaves_the_dense_function_unchanged(family, overrides, how):
    model = perturbed(build_tiny_model(family, **overrides))
    ids = random_ids(model.config.vocab_size)
    dense = logits_of(model, ids)
    before = block_weights(model)
    kwargs = {"alpha": dict(alpha=0.5), "auto": dict(alpha="auto", alpha_grid=3), "awq": dict(awq=True, awq_grid=3)}
    config = SmoothConfig(weight_spec=QuantConfig(bits=3, group_size=16).spec, search_tokens=32, **kwargs[how])
    report = smooth_model(model, config, windows(model.config.vocab_size), progress=False)
    changed = [not torch.equal(a, b) for a, b in zip(before, block_weights(model), strict=True)]
    assert any(changed)
    torch.testing.assert_close(logits_of(model, ids), dense, rtol=1e-4, atol=1e-4)
    blocks = model.config.num_hidden_layers
    assert report.groups > 0 and report.search_windows == 1
    if how == "awq":
        assert len(report.awq_exponent) == report.groups and not report.alpha
        assert all(len(losses) == 3 for losses in report.awq_losses.values())
    else:
        assert sorted(report.alpha) == list(range(blocks)) and not report.awq_exponent
    if how == "auto":  # the golden search tries 2 or 3 of the grid's 3 points
        for i, losses in report.alpha_losses.items():
            assert set(losses) <= {0.0, 0.5, 1.0} and len(losses) >= 2
            assert losses[report.alpha[i]] == min(losses.values())
    json.dumps(report.recipe_fields())


@pytest.mark.parametrize("how", ["alpha", "grid", "golden"])
def test_one_pass_per_block_gives_the_statistics_and_the_outputs(how):
    model = perturbed(build_tiny_model("llama", num_hidden_layers=3))
    calib = windows(model.config.vocab_size, n=4, length=32)
    seen = {i: 0 for i in range(3)}
    for i, block in enumerate(get_blocks(model)):
        block.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, seen[i] + args[0].shape[0]))
    alpha = 0.5 if how == "alpha" else "auto"
    config = SmoothConfig(alpha=alpha, alpha_grid=11, alpha_search="grid" if how == "alpha" else how, search_tokens=32)
    report = smooth_model(model, config, calib, progress=False)
    # each α tried runs the block once on the one search window: all 11 of the grid, or the golden search's ≤ 5
    trials = {i: len(report.alpha_losses.get(i, {})) for i in range(3)}
    assert all(t == {"alpha": 0, "grid": 11, "golden": t}[how] for t in trials.values())
    if how == "golden":
        assert all(3 <= t <= 5 for t in trials.values())
    # capturing the inputs calls block 0 (skipped) on every window and the later blocks on window 0; block 0's
    # choose_batch runs two windows together and one by one; then one pass of the 4 windows per block
    assert seen == {0: 4 + 4 + 4 + trials[0], 1: 1 + 4 + trials[1], 2: 1 + 4 + trials[2]}


def test_golden_search_picks_the_grid_alpha_where_the_block_error_is_unimodal():
    reports = {}
    for how in ("grid", "golden"):
        model = perturbed(build_tiny_model("llama", num_hidden_layers=3))
        config = SmoothConfig(alpha="auto", alpha_grid=11, alpha_search=how, search_tokens=64)
        reports[how] = smooth_model(model, config, windows(model.config.vocab_size), progress=False)
    unimodal = 0
    for i, losses in reports["grid"].alpha_losses.items():
        values = list(losses.values())
        low = values.index(min(values))
        steps = [b - a for a, b in itertools.pairwise(values)]  # falls strictly to the minimum, then rises strictly
        if all(d < 0 for d in steps[:low]) and all(d > 0 for d in steps[low:]):
            unimodal += 1
            assert reports["golden"].alpha[i] == reports["grid"].alpha[i], (i, losses)
        pick = list(losses).index(reports["golden"].alpha[i])  # elsewhere (noise): still a local minimum
        assert all(values[pick] <= v * (1 + 1e-3) for v in values[max(pick - 1, 0) : pick + 2]), (i, losses)
        tried = reports["golden"].alpha_losses[i]
        assert len(tried) <= 5
        for a, value in tried.items():  # the same objective: each α tried has the grid's error for that α
            assert value == pytest.approx(losses[a], rel=1e-3)
    assert unimodal >= 1  # the check above really ran
    assert reports["golden"].to_dict()["config"]["alpha_search"] == "golden"
    with pytest.raises(UserError, match="alpha_search must be one of golden, grid"):
        SmoothConfig(alpha="auto", alpha_search="exhaustive")


def test_awq_keeps_the_exponent_with_the_lowest_block_error():
    model = perturbed(build_tiny_model("llama"))
    config = SmoothConfig(awq=True, awq_grid=5, weight_spec=QuantConfig(bits=3, group_size=16).spec)
    report = smooth_model(model, config, windows(model.config.vocab_size), progress=False)
    for name, losses in report.awq_losses.items():
        assert losses[report.awq_exponent[name]] == min(losses.values())
        assert min(losses.values()) <= losses[0.0]  # a = 0 is plain RTN: AWQ never does worse on its search
    # the perturbed norms make outlier channels: somewhere a nonzero exponent must win
    assert any(a > 0 for a in report.awq_exponent.values())


def test_awq_before_rtn_lowers_the_output_error():
    base = perturbed(build_tiny_model("llama"))
    ids = windows(base.config.vocab_size, n=4, length=32)
    dense = logits_of(base, ids)
    errors = {}
    for awq in (False, True):
        model = perturbed(build_tiny_model("llama"))
        config = QuantConfig(method="rtn", bits=3, group_size=16, awq=awq, awq_grid=6)
        report = quantize(model, config, ids if awq else None, progress=False)
        errors[awq] = float((logits_of(model, ids) - dense).pow(2).mean())
        assert ("smoothing" in report.recipe_fields()) == awq
    assert errors[True] < errors[False]


@pytest.mark.parametrize("value", [1.5, -0.1, "half", float("nan")])
def test_alpha_outside_the_unit_interval_is_refused(value):
    with pytest.raises(UserError, match=r"α outside|must be a number"):
        check_smoothquant(value)
    with pytest.raises(UserError, match=r"α outside|must be a number"):
        QuantConfig(method="rtn", smoothquant=value)


def test_smoothquant_values_and_refusals():
    assert check_smoothquant("AUTO") == "auto" and check_smoothquant("0.25") == 0.25 and check_smoothquant(None) is None
    assert QuantConfig(method="rtn", smoothquant="0.5").smoothquant == 0.5
    with pytest.raises(UserError, match="alternatives"):
        QuantConfig(smoothquant=0.5, awq=True)
    with pytest.raises(UserError, match="at least 2"):
        QuantConfig(awq=True, awq_grid=1)
    model = build_tiny_model("llama")
    with pytest.raises(UserError, match="calibration data"):
        quantize(model, QuantConfig(method="rtn", awq=True), None, progress=False)
    with pytest.raises(UserError, match="calibration data"):
        smooth_model(model, SmoothConfig(alpha=0.5), None, progress=False)


def test_cli_awq_and_smoothquant_record_what_was_done(tiny_folder, tmp_path, calib_file):
    src = tiny_folder("llama")
    out = tmp_path / "awq"
    common = ["--calib-data", str(calib_file), "--nsamples", "2", "--seqlen", "32"]
    argv = ["quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "16", "--awq", "-o", str(out)]
    assert run_cli(argv + common) == 0
    recipe = json.loads((out / "lmcompress.json").read_text())
    text = json.dumps(recipe)
    assert '"awq": {"grid": 20' in text and "exponent_per_group" in text
    bad = tmp_path / "bad"
    argv = ["quantize", str(src), "--method", "rtn", "--smoothquant", "1.5", "-o", str(bad)]
    assert run_cli(argv + common) != 0
    assert not bad.exists()
    sq = tmp_path / "sq"
    argv = ["quantize", str(src), "--method", "rtn", "--bits", "8", "--group-size", "-1", "--smoothquant", "auto"]
    assert run_cli([*argv, "-o", str(sq), *common]) == 0
    assert "alpha_per_block" in (sq / "lmcompress.json").read_text()


def test_smoothing_refuses_a_streamed_model(tiny_folder, tmp_path, calib_file, capsys):
    src = tiny_folder("llama")
    out = tmp_path / "streamed"
    argv = ["quantize", str(src), "--method", "rtn", "--awq", "--offload", "disk", "-o", str(out)]
    assert run_cli([*argv, "--calib-data", str(calib_file), "--nsamples", "2", "--seqlen", "32"]) != 0
    assert "need the model in memory" in capsys.readouterr().err  # refused before the model loads
    assert not out.exists()


def test_weights_of_the_targets_carry_the_scales():
    model = perturbed(build_tiny_model("llama"))
    q = weight_matrix(get_blocks(model)[0].self_attn.q_proj).clone()
    norm = get_blocks(model)[0].input_layernorm.weight.detach().clone()
    smooth_model(model, SmoothConfig(alpha=0.5), windows(model.config.vocab_size), progress=False)
    new_q = weight_matrix(get_blocks(model)[0].self_attn.q_proj)
    s = new_q[0] / q[0]  # the column scales
    torch.testing.assert_close(get_blocks(model)[0].input_layernorm.weight.detach() * s, norm, rtol=1e-5, atol=1e-6)
