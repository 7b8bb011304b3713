"""W8A8 int8 and FP8 schemes end to end: quantize → packed folder → load (activation quantization simulated) →
compressed-tensors export that transformers loads with the same logits; bad input writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress.algorithms import actquant as aq
from lmcompress.checkpoint.folder import RECIPE_FILE
from lmcompress.checkpoint.inspect import folder_info
from lmcompress.checkpoint.load import load
from lmcompress.errors import UserError
from lmcompress.models.families import get_blocks
from lmcompress.transforms.quantize import QuantConfig
from tests.conftest import logits_of, random_ids, run_cli

N = ["--nsamples", "4", "--seqlen", "32"]


def _quantize(src, out, calib_file, *args) -> int:
    return run_cli(["quantize", str(src), "-o", str(out), "--calib-data", str(calib_file), *N, "--quiet", *args])


def _layers(model) -> list[aq.ActQuantLinear]:
    return [m for block in get_blocks(model) for m in block.modules() if isinstance(m, aq.ActQuantLinear)]


@pytest.mark.parametrize(
    ("args", "kind", "codes", "static"),
    [
        (["--scheme", "w8a8", "--method", "rtn"], "int8", torch.int8, False),
        (["--scheme", "w8a8", "--method", "gptq"], "int8", torch.int8, False),
        (["--scheme", "w8a8", "--method", "rtn", "--asym-activations"], "int8", torch.int8, False),
        (["--scheme", "fp8"], "fp8", torch.float8_e4m3fn, True),
        (["--scheme", "fp8", "--dynamic"], "fp8", torch.float8_e4m3fn, False),
        (["--scheme", "fp8", "--method", "gptq"], "fp8", torch.float8_e4m3fn, True),
        (
            ["--scheme", "fp8", "--dynamic", "--method", "gptq", "--in-block", "parallel"],
            "fp8",
            torch.float8_e4m3fn,
            False,
        ),
    ],
)
def test_quantize_load_simulates_the_scheme(tiny_folder, tmp_path, calib_file, args, kind, codes, static):
    src, out = tiny_folder("llama"), tmp_path / "q"
    if (
        "--dynamic" in args and "gptq" not in args
    ) or "rtn" in args:  # no calibration: the calibration options do not apply
        assert run_cli(["quantize", str(src), "-o", str(out), "--quiet", *args]) == 0
    else:
        assert _quantize(src, out, calib_file, *args) == 0
    recipe = json.loads((out / RECIPE_FILE).read_text())
    scheme = recipe["scheme"]
    assert scheme["name"] == args[1] and recipe["quantization"]["scheme"] == args[1]
    assert ("static" in scheme["activations"]) == static and bool(scheme["input_scales"]) == static
    assert folder_info(out)["linear"]["bits_per_weight"] < 9  # 8-bit codes and a scale per row
    model, _ = load(out)
    layers = _layers(model)
    assert len(layers) == recipe["quantized_layers"] == 7 * len(get_blocks(model))
    assert all(m.codes.dtype == codes and m.act.kind == kind for m in layers)
    assert all((m.act.static_scale is not None) == static for m in layers)
    asym = "--asym-activations" in args
    assert scheme["activations_symmetric"] is not asym and all(m.act.symmetric is not asym for m in layers)
    gptq = "gptq" in args
    assert bool(recipe["layer_loss"]) == gptq and len(recipe["layer_loss"]) in (
        0, len(layers))  # fmt: skip
    if static:
        down = get_blocks(model)[0].mlp.down_proj
        assert down.act.static_scale == scheme["input_scales"]["model.layers.0.mlp.down_proj"]
    ids = random_ids(model.config.vocab_size)
    simulated = logits_of(model, ids)
    dense_src, _ = load(src)
    assert not torch.equal(simulated, logits_of(dense_src, ids))
    torch.testing.assert_close(simulated, logits_of(dense_src, ids), rtol=0.2, atol=0.2)


def test_reloaded_weights_are_the_quantized_ones(tiny_folder, tmp_path, calib_file):
    """The codes loaded are those the transform computed: RTN int8 equals actquant's own per-channel grid."""
    src = tiny_folder("llama")
    assert run_cli(["quantize", str(src), "-o", str(tmp_path / "q"), "--scheme", "w8a8", "--method", "rtn"]) == 0
    assert run_cli(["quantize", str(src), "-o", str(tmp_path / "f"), "--scheme", "fp8", "--dynamic"]) == 0
    dense, _ = load(src)
    w8, _ = load(tmp_path / "q")
    f8, _ = load(tmp_path / "f")
    w = get_blocks(dense)[1].self_attn.o_proj.weight
    codes, scale = aq.quantize_weight_int8(w)
    assert torch.equal(get_blocks(w8)[1].self_attn.o_proj.codes, codes)
    torch.testing.assert_close(get_blocks(w8)[1].self_attn.o_proj.weight_scale, scale, rtol=1e-6, atol=0)
    fcodes, fscale = aq.quantize_weight_fp8(w)
    layer = get_blocks(f8)[1].self_attn.o_proj
    assert torch.equal(layer.codes.view(torch.uint8), fcodes.view(torch.uint8)) and torch.equal(
        layer.weight_scale, fscale
    )


def test_info_shows_the_scheme(tiny_folder, tmp_path, capsys):
    out = tmp_path / "f"
    assert run_cli(["quantize", str(tiny_folder("llama")), "-o", str(out), "--scheme", "fp8", "--dynamic"]) == 0
    assert "fp8 scheme" in (said := capsys.readouterr().out) and "14 layers" in said
    assert run_cli(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        '"scheme": "fp8: weights fp8_e4m3 per channel' in printed
        and "fp8_e4m3 per token, dynamic" in printed
        and "fp8 e4m3 channel" in printed
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--scheme", "w4a4"], "unknown"),
        (["--scheme", "w8a8", "--bits", "4"], "8-bit grid per output channel"),
        (["--scheme", "w8a8", "--group-size", "128"], "8-bit grid per output channel"),
        (["--scheme", "w8a8", "--asym"], "symmetric"),
        (["--scheme", "w8a8", "--include-head"], "head"),
        (["--dynamic"], "fp8"),
        (["--asym-activations"], "scheme w8a8"),
        (["--scheme", "fp8", "--dynamic", "--asym-activations"], "scheme w8a8"),
        (["--scheme", "fp8", "--dynamic", "--nsamples", "4"], "--nsamples"),
    ],
)
def test_bad_input_writes_nothing(tiny_folder, tmp_path, capsys, args, match):
    out = tmp_path / "bad"
    assert run_cli(["quantize", str(tiny_folder("llama")), "-o", str(out), *args]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_config_api():
    config = QuantConfig(scheme="w8a8", method="rtn")
    assert (config.bits, config.group_size, config.needs_calibration) == (8, -1, False)
    assert QuantConfig(scheme="fp8", method="rtn").needs_calibration
    assert not QuantConfig(scheme="fp8", method="rtn", dynamic=True).needs_calibration
    with pytest.raises(UserError, match="8-bit grid per output channel"):
        QuantConfig(scheme="w8a8", bits=4, group_size=-1)
    assert QuantConfig(scheme="fp8").needs_calibration  # GPTQ on the FP8 grid (the API's default method)


def test_fp8_on_cpu_is_simulated(tiny_folder, tmp_path):
    """No FP8 hardware is needed: the codes are stored and the layers run the E4M3 grid in float32."""
    out = tmp_path / "f"
    assert run_cli(["quantize", str(tiny_folder("llama")), "-o", str(out), "--scheme", "fp8", "--dynamic"]) == 0
    model, _ = load(out, kernels="auto")
    assert "activation quantization simulated" in model.lmcompress_kernels.summary()
    assert torch.isfinite(logits_of(model, random_ids(model.config.vocab_size))).all()


@pytest.mark.parametrize(
    "args",
    [
        ["--scheme", "w8a8", "--method", "rtn"],
        ["--scheme", "fp8"],
        ["--scheme", "fp8", "--dynamic"],
        ["--scheme", "fp8", "--dynamic", "--method", "gptq"],
        ["--scheme", "w8a8", "--method", "rtn", "--asym-activations"],
    ],
)
def test_compressed_tensors_export_loads_with_the_same_logits(tiny_folder, tmp_path, calib_file, args):
    pytest.importorskip("compressed_tensors", reason='compressed-tensors not installed (pip install -e ".[export]")')
    from transformers import AutoModelForCausalLM

    src, q, ct = tiny_folder("llama"), tmp_path / "q", tmp_path / "ct"
    if ("--dynamic" in args and "gptq" not in args) or "rtn" in args:
        assert run_cli(["quantize", str(src), "-o", str(q), "--quiet", *args]) == 0
    else:
        assert _quantize(src, q, calib_file, *args) == 0
    assert run_cli(["export", str(q), "--format", "compressed-tensors", "-o", str(ct)]) == 0
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    static = args == ["--scheme", "fp8"]
    assert config["format"] == ("int-quantized" if "w8a8" in args else "float-quantized")
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]  # as llm-compressor writes it
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"]["strategy"] == ("tensor" if static else "token")
    assert group["input_activations"]["dynamic"] is (not static)
    assert group["input_activations"]["symmetric"] is ("--asym-activations" not in args)
    assert group["weights"]["type"] == group["input_activations"]["type"] == ("int" if "w8a8" in args else "float")
    assert json.loads((ct / RECIPE_FILE).read_text())["export"]["codes_changed"] == 0
    model, _ = load(q)
    ids = random_ids(model.config.vocab_size)
    expected = logits_of(model, ids)
    hf = AutoModelForCausalLM.from_pretrained(ct)  # transformers' compressed-tensors integration
    torch.testing.assert_close(logits_of(hf, ids), expected, rtol=1e-4, atol=1e-4)
    for m in _layers(model):  # the activation quantization is what the two share: without it, farther apart
        m.forward = lambda x, m=m: torch.nn.functional.linear(x, m.dequantized_weight(), m.bias)
    assert (logits_of(model, ids) - expected).abs().max() > 1e-3


def test_eval_and_generate_run_the_scheme(tiny_folder, tmp_path, calib_file, capsys):
    src, out = tiny_folder("llama"), tmp_path / "w8a8"
    assert run_cli(["quantize", str(src), "-o", str(out), "--scheme", "w8a8", "--method", "rtn", "--quiet"]) == 0
    capsys.readouterr()
    argv = ["eval", str(out), "--ppl-data", str(calib_file), "--seqlen", "32", "--limit", "3", "--json"]
    assert run_cli([*argv, "--reference", str(src)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["agreement"]["kl_mean"] < 0.05 and result["perplexity"] > 1
    assert run_cli(["generate", str(out), "--prompt", "the", "--max-new-tokens", "3", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["kernels"]["swapped"] and not generated["kernels"]["dense"]  # the int8 kernel runs W8A8


def test_compressed_tensors_refusal_names_the_k_grid():
    from types import SimpleNamespace

    from lmcompress.algorithms.quant import QuantSpec
    from lmcompress.checkpoint.export import _check_grid

    with pytest.raises(UserError, match=r"on the q4_k grid \(llama.cpp's grids\).*--format gguf"):
        _check_grid({"model.layers.0.mlp.down_proj": SimpleNamespace(spec=QuantSpec(4, 32, False, "q4_k"))})
    with pytest.raises(UserError, match=r"on the q4_0 grid \(llama.cpp's Q4_0"):
        _check_grid({"model.layers.0.mlp.down_proj": SimpleNamespace(spec=QuantSpec(4, 32, True, "q4_0"))})


def test_w8a8_runs_on_the_int8_kernel_within_the_simulated_tolerance(tiny_folder, tmp_path):
    out = tmp_path / "w8a8"
    assert run_cli(["quantize", str(tiny_folder("llama")), "-o", str(out), "--scheme", "w8a8", "--method", "rtn"]) == 0
    simulated, _ = load(out)
    fast, _ = load(out, kernels="auto")
    report = fast.lmcompress_kernels
    assert len(report.swapped) == len(_layers(simulated)) and not report.dense
    assert not _layers(fast)  # every int8 layer runs the integer product
    ids = random_ids(simulated.config.vocab_size)
    torch.testing.assert_close(logits_of(fast, ids), logits_of(simulated, ids), rtol=1e-4, atol=1e-4)


def test_unpack_writes_the_quantized_weights_as_a_plain_folder(tiny_folder, tmp_path):
    from torch.nn import functional as F
    from transformers import AutoModelForCausalLM

    q, plain = tmp_path / "fp8", tmp_path / "plain"
    assert run_cli(["quantize", str(tiny_folder("llama")), "-o", str(q), "--scheme", "fp8", "--dynamic"]) == 0
    assert run_cli(["unpack", str(q), "-o", str(plain)]) == 0
    recipe = json.loads((plain / RECIPE_FILE).read_text())
    assert "scheme" not in recipe and recipe["scheme_dropped"]["name"] == "fp8"
    model, _ = load(q)
    for m in _layers(model):  # weights as stored, inputs no longer quantized
        m.forward = lambda x, m=m: F.linear(x, m.dequantized_weight(), m.bias)
    ids = random_ids(model.config.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(plain)
    torch.testing.assert_close(logits_of(hf, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize(("scheme", "dynamic"), [("w8a8", False), ("fp8", True)])
def test_search_simulation_is_the_quantized_folders_computation(tiny_folder, scheme, dynamic):
    """A search's scheme simulation of a (pruned) model computes what `quantize --scheme --method rtn` then
    `load` computes, follows weight changes it is told of, and leaves the plain layers outside ``active``."""
    import copy

    from lmcompress.measure.sweep import simulate_scheme
    from lmcompress.models.families import prunable_layers
    from lmcompress.search.scheme import SchemeSimulation
    from lmcompress.transforms.quantize import quantize

    model, _ = load(tiny_folder("llama"))
    for m in prunable_layers(model).values():  # a pruned candidate: the smallest half of every row at zero
        w = m.weight.data
        w[w.abs() < w.abs().median(dim=1, keepdim=True).values] = 0
    ids = random_ids(model.config.vocab_size)
    plain = logits_of(model, ids)
    deployed = copy.deepcopy(model)
    simulate_scheme(deployed, quantize(deployed, QuantConfig(method="rtn", scheme=scheme, dynamic=dynamic)))
    sim = SchemeSimulation(model, scheme, dynamic)
    with sim.active():
        torch.testing.assert_close(logits_of(model, ids), logits_of(deployed, ids), rtol=0, atol=0)
    assert torch.equal(logits_of(model, ids), plain)  # outside: the plain layers
    name, layer = next(iter(prunable_layers(model).items()))
    layer.weight.data.mul_(0.5)
    with sim.active():
        stale = logits_of(model, ids)
        sim.forget([name])
        fresh = logits_of(model, ids)
    assert not torch.equal(stale, fresh)
    target = deployed.get_submodule(name)
    target.weight_scale.mul_(0.5)  # the int8 / fp8 grid scales with the weight: the same codes, half the scale
    torch.testing.assert_close(fresh, logits_of(deployed, ids), rtol=1e-5, atol=1e-5)


def test_search_scores_candidates_as_the_scheme_runs_them(tiny_folder, tmp_path, calib_file, capsys):
    src = tiny_folder("llama")
    base = ["search", str(src), "--budget", "sparsity=0.5", "--levels", "0.3:0.7:0.1", "--generations", "1",
            "--offspring", "2", "--survivors", "2,1", "--stage-windows", "1,2", "--fitness-windows", "2",
            "--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--quiet"]  # fmt: skip
    found = {}
    for tag, extra in {"plain": [], "w8a8": ["--scheme", "w8a8"]}.items():
        out = tmp_path / tag
        assert run_cli([*base, "-o", str(out), *extra]) == 0
        assert ("--scheme w8a8 --method rtn" in capsys.readouterr().out) == bool(extra)  # how to deploy it
        found[tag] = json.loads((out / "search.json").read_text())
    assert found["w8a8"]["config"]["scheme"] == "w8a8" and found["plain"]["config"]["scheme"] is None
    # the same uniform allocation, scored with and without the scheme
    assert found["w8a8"]["baselines"]["uniform"] != found["plain"]["baselines"]["uniform"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--scheme", "w8a8", "--budget", "bits=4", "--levels", "2,4,8"], "leaves no bit widths to search"),
        (["--scheme", "fp8"], "add (--)?dynamic"),
        (["--dynamic"], "dynamic applies to (--)?scheme fp8"),
        (["--scheme", "int4"], "scheme 'int4' is unknown"),
        (["--scheme", "w8a8", "--max-loss", "ppl=+5%"], "not supported with (--)?max.loss"),
    ],
)
def test_search_scheme_bad_input_writes_nothing(tiny_folder, tmp_path, capsys, args, match):
    import re

    out = tmp_path / "s"
    assert run_cli(["search", str(tiny_folder("llama")), "-o", str(out), *args]) == 2
    assert re.search(match, capsys.readouterr().err) and not out.exists()
    assert not list(tmp_path.glob(".*search-work"))
