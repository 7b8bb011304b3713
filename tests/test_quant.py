"""Quantization: RTN/GPTQ grids and error bounds, act-order, joint SparseGPT + quantization, the CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmcompress.algorithms import Pattern, sparsegpt_prune
from lmcompress.algorithms.gptq import ColumnQuantizer, gptq_quantize
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, rtn_quantize
from lmcompress.checkpoint.load import load_model
from lmcompress.cli import main
from lmcompress.errors import UserError
from lmcompress.models.families import find_prunable, get_blocks, weight_matrix
from lmcompress.models.tiny import TINY_CONFIGS, build_tiny_model
from lmcompress.transforms.prune import PruneConfig, prune
from lmcompress.transforms.quantize import QuantConfig, quantize


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def layer_problem(rows: int = 48, cols: int = 128, n: int = 600, seed: int = 0):
    """A weight and correlated calibration inputs with uneven feature scales, and their Hessian 2XᵀX/n."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=gen) @ mix * (0.5 + torch.rand(cols, generator=gen))
    w = torch.randn(rows, cols, generator=gen)
    return w, x, 2 * x.t() @ x / n


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return ((w - w_hat) @ x.t()).pow(2).sum().item()


def assert_on_grid(qt: QuantizedTensor, weight: torch.Tensor) -> None:
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= qt.spec.maxq
    assert torch.equal(qt.zero, qt.zero.round())
    assert torch.equal(qt.dequantize(), weight), "the weight is not exactly what its codes stand for"


# ---------------------------------------------------------------- grids and RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_within_half_a_step(bits, group_size, sym):
    w = torch.randn(24, 96) * torch.linspace(0.1, 3, 96)
    qt = rtn_quantize(w, QuantSpec(bits, group_size, sym))
    groups = qt.group_index()
    step = qt.scale[:, groups]
    err = (w - qt.dequantize()).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all(), f"max error {(err / step).max():.3f} steps"
    assert qt.scale.shape == (24, QuantSpec(bits, group_size, sym).groups(96))
    assert len(torch.unique(qt.dequantize()[0, : qt.spec.width(96)])) <= 2**bits


def test_zero_is_exact_on_every_grid():
    w = torch.randn(16, 64)
    w[:, ::3] = 0.0
    w[5] = torch.rand(64) + 1  # all positive: the asymmetric range still includes 0
    for sym in (True, False):
        qt = rtn_quantize(w, QuantSpec(3, 16, sym))
        assert (qt.dequantize()[w == 0] == 0).all()


def test_bad_specs_rejected():
    for bits in (1, 9):
        with pytest.raises(ValueError):
            QuantSpec(bits)
    with pytest.raises(ValueError):
        QuantSpec(4, 0)


# ---------------------------------------------------------------- GPTQ


@pytest.mark.parametrize(
    ("bits", "group_size"), [(2, -1), (3, -1), (3, 32), (4, -1), (4, 32), (4, 64), (8, -1), (8, 32)]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(bits, group_size, act_order):
    w, x, h = layer_problem()
    spec = QuantSpec(bits, group_size)
    res = gptq_quantize(w, h, spec, act_order=act_order, blocksize=64)
    rtn = rtn_quantize(w, spec).dequantize()
    assert output_error(w, res.weight, x) < 0.9 * output_error(w, rtn, x)
    assert_on_grid(res.quantized, res.weight)


def test_gptq_loss_estimate_matches_real_error():
    w, x, h = layer_problem(n=800)
    res = gptq_quantize(w, h, QuantSpec(3, 32), percdamp=1e-6, blocksize=32)
    assert res.loss == pytest.approx(output_error(w, res.weight, x) / x.shape[0], rel=1e-2)


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("group_size", [32, 48, -1])
def test_act_order_dequantization_exact(static_groups, group_size):
    w, x, h = layer_problem(cols=96)
    if static_groups and group_size == -1:
        pytest.skip("static groups need groups")
    res = gptq_quantize(w, h, QuantSpec(4, group_size), act_order=True, static_groups=static_groups, blocksize=40)
    qt = res.quantized
    assert_on_grid(qt, res.weight)
    if static_groups or group_size == -1:
        assert qt.g_idx is None  # groups in natural column order
    else:
        assert qt.g_idx is not None and qt.g_idx.shape == (96,)
        counts = torch.bincount(qt.g_idx.long())
        assert counts[:-1].eq(group_size).all() and counts.sum() == 96
        # act-order groups follow decreasing diag H: group 0 holds the largest-energy inputs
        top = torch.argsort(torch.diag(h), descending=True)[:group_size]
        assert (qt.g_idx[top] == 0).all()
    assert output_error(w, res.weight, x) < output_error(w, rtn_quantize(w, QuantSpec(4, group_size)).dequantize(), x)


def test_gptq_groups_straddling_blocks_are_up_to_date():
    """Grids of groups that reach past a lazy block must see the block's updates (flush), not stale weights."""
    w, _, h = layer_problem(cols=120)
    a = gptq_quantize(w, h, QuantSpec(3, 40), blocksize=120)  # every group inside one block
    b = gptq_quantize(w, h, QuantSpec(3, 40), blocksize=32)  # groups straddle block borders
    assert torch.allclose(a.weight, b.weight, atol=1e-4)


def test_gptq_mask_keeps_exact_zeros_and_dead_inputs():
    w, _, h = layer_problem()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    h[7, :] = 0.0
    h[:, 7] = 0.0
    res = gptq_quantize(w.masked_fill(mask, 0.0), h, QuantSpec(4, 32), mask=mask, act_order=True)
    assert (res.weight[mask] == 0).all() and (res.weight[:, 7] == 0).all()
    assert_on_grid(res.quantized, res.weight)


# ---------------------------------------------------------------- joint SparseGPT + quantization


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
@pytest.mark.parametrize("sym", [True, False])
def test_joint_mode_exact_sparsity_and_grid(pattern, sym):
    w, x, h = layer_problem()
    quantizer = ColumnQuantizer(QuantSpec(3, 32, sym), tuple(w.shape))
    res = sparsegpt_prune(w, h, 0.5, pattern, blocksize=64, quantizer=quantizer)
    qt = quantizer.result()
    assert_on_grid(qt, res.weight)
    assert (res.weight[res.mask] == 0).all()
    assert res.mask.float().mean().item() == 0.5
    if pattern.is_nm:
        assert (res.mask.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    plain = sparsegpt_prune(w, h, 0.5, pattern, blocksize=64).weight
    rtn_after = rtn_quantize(plain, QuantSpec(3, 32, sym)).dequantize()
    # compensating the rounding error in the same pass beats rounding the pruned weights afterwards
    assert output_error(w, res.weight, x) < output_error(w, rtn_after, x)


@pytest.fixture
def model_of(tokenizer):
    def make(family: str = "llama"):
        return build_tiny_model(family, tokenizer.vocab_size, max_positions=256)

    return make


def test_joint_prune_of_a_model(model_of, calib):
    model = model_of("llama")
    report = prune(model, PruneConfig(method="sparsegpt", pattern="2:4", bits=4, group_size=32), calib, progress=False)
    assert report.mask_sparsity == 0.5 and report.sparsity >= 0.5
    layers = {
        f"model.layers.{i}.{n}.weight": m for i, b in enumerate(get_blocks(model)) for n, m in find_prunable(b).items()
    }
    assert set(report.quantized) == set(layers)
    for name, module in layers.items():
        w = weight_matrix(module)
        assert_on_grid(report.quantized[name], w)
        kept = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert (kept <= 2).all()
    assert "quantized" not in report.to_dict()
    json.dumps(report.to_dict())


def test_gptq_model_beats_rtn_model(model_of, calib):
    dense = model_of("llama")
    ref = dense(calib[:2]).logits
    errs = {}
    for method in ("rtn", "gptq"):
        model = model_of("llama")
        report = quantize(model, QuantConfig(method=method, bits=3, group_size=-1), calib, progress=False)
        errs[method] = (model(calib[:2]).logits - ref).pow(2).mean().item()
        for name, qt in report.quantized.items():
            module = model.get_submodule(name.removesuffix(".weight"))
            assert_on_grid(qt, weight_matrix(module))
        if method == "gptq":
            assert len(report.layer_loss) == len(report.quantized) == 14
    assert errs["gptq"] < errs["rtn"]


def test_keep_zeros_quantizes_a_pruned_model_without_losing_sparsity(model_of, calib):
    model = model_of("qwen3")
    prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calib, progress=False)
    before = {
        f"{i}.{n}": (weight_matrix(m) == 0).clone()
        for i, b in enumerate(get_blocks(model))
        for n, m in find_prunable(b).items()
    }
    quantize(model, QuantConfig(method="gptq", bits=4, group_size=32, act_order=True), calib, progress=False)
    for i, b in enumerate(get_blocks(model)):
        for n, m in find_prunable(b).items():
            assert (weight_matrix(m)[before[f"{i}.{n}"]] == 0).all()


# ---------------------------------------------------------------- CLI and API end to end


@pytest.fixture
def calib_file(tmp_path, calib_text) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(calib_text[:8000])
    return path


SMALL = ["--nsamples", "2", "--seqlen", "32", "-q"]


def perplexity_of(folder: Path, text: Path, capsys) -> float:
    capsys.readouterr()
    assert run(["eval", str(folder), "--ppl-data", str(text), "--seqlen", "32", "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)["perplexity"]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_quantize_cli_then_eval(tmp_path, tiny_folder, calib_file, family, capsys):
    src = tiny_folder(family)
    out = tmp_path / "q"
    argv = ["quantize", str(src), "--method", "gptq", "--bits", "8", "--group-size", "32", "--asym", "--act-order"]
    assert run([*argv, "--calib-data", str(calib_file), "-o", str(out), *SMALL]) == 0
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["kind"] == "quantize" and recipe["quantization"]["bits"] == 8
    assert recipe["quantization"]["act_order"] and not recipe["quantization"]["sym"]
    assert recipe["calibration"]["nsamples"] == 2 and recipe["layer_loss"]
    assert set(recipe["versions"]) >= {"torch", "transformers", "lmcompress"} and recipe["wall_time_s"] > 0
    assert not list(tmp_path.glob(".q.tmp-*"))
    dense = perplexity_of(src, calib_file, capsys)
    quant = perplexity_of(out, calib_file, capsys)
    assert quant == pytest.approx(dense, rel=0.02)  # 8 bits barely moves a model


def test_quantize_api_saved_weights_are_the_codes(tmp_path, tiny_folder, calib_file):
    from lmcompress.jobs import quantize_pretrained

    out = tmp_path / "q"
    config = QuantConfig(method="gptq", bits=3, group_size=32, act_order=True)
    report = quantize_pretrained(
        tiny_folder("llama"), config, out, calib_data=str(calib_file), nsamples=2, seqlen=32, progress=False
    )
    model, _ = load_model(out)
    params = dict(model.named_parameters())
    assert len(report.quantized) == 14
    for name, qt in report.quantized.items():
        assert torch.equal(params[name].data.float(), qt.dequantize())


def test_quantize_rtn_needs_no_calibration(tmp_path, tiny_folder, capsys):
    out = tmp_path / "rtn"
    argv = ["quantize", str(tiny_folder("gpt2")), "--method", "rtn", "--bits", "4", "--group-size", "-1", "-q"]
    assert run([*argv, "-o", str(out)]) == 0  # the default --calib-data (c4) is never read
    assert run([*argv, "--calib-data", "no-such-file.txt", "-o", str(tmp_path / "x")]) == 2  # would be ignored
    assert "--calib-data does not apply" in capsys.readouterr().err
    assert json.loads((out / "lmcompress.json").read_text())["calibration"] is None


def test_joint_prune_cli(tmp_path, tiny_folder, calib_file, capsys):
    out = tmp_path / "joint"
    argv = ["prune", str(tiny_folder("llama")), "--method", "sparsegpt", "--pattern", "2:4", "--bits", "4"]
    assert run([*argv, "--group-size", "32", "--calib-data", str(calib_file), "-o", str(out), *SMALL]) == 0
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["bits"] == 4 and recipe["mask_sparsity"] == 0.5 and recipe["achieved_sparsity"] >= 0.5
    assert perplexity_of(out, calib_file, capsys) > 1


@pytest.mark.parametrize(
    "extra",
    [
        ["quantize", "--bits", "1"],
        ["quantize", "--bits", "9"],
        ["quantize", "--group-size", "48"],  # does not divide 64 inputs
        ["quantize", "--group-size", "0"],
        ["quantize", "--method", "awq"],
        ["quantize", "--method", "rtn", "--act-order"],
        ["prune", "--method", "magnitude", "--bits", "4"],
        ["prune", "--method", "sparsegpt", "--bits", "9"],
        ["prune", "--method", "sparsegpt", "--bits", "4", "--group-size", "48"],
    ],
)
def test_bad_input_is_a_user_error_and_writes_nothing(tmp_path, tiny_folder, calib_file, extra, capsys):
    out = tmp_path / "out"
    command, *options = extra
    code = run([command, str(tiny_folder("llama")), *options, "--calib-data", str(calib_file), "-o", str(out), *SMALL])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_gptq_without_calibration_is_a_user_error(model_of):
    with pytest.raises(UserError, match="calibration"):
        quantize(model_of("llama"), QuantConfig(method="gptq", group_size=32), None, progress=False)
    with pytest.raises(UserError, match="group_size"):
        quantize(model_of("llama"), QuantConfig(method="rtn", group_size=128), None, progress=False)
