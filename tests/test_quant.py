"""Quantization: RTN/GPTQ grids and error bounds, act-order, joint SparseGPT + quantization, the CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run

from lmcompress.algorithms import Pattern, sparsegpt_prune
from lmcompress.algorithms.gptq import ColumnQuantizer, gptq_quantize
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, rtn_quantize
from lmcompress.checkpoint.load import load_model
from lmcompress.errors import UserError
from lmcompress.models.families import find_prunable, get_blocks, weight_matrix
from lmcompress.models.tiny import TINY_CONFIGS, build_tiny_model
from lmcompress.transforms.prune import PruneConfig, prune
from lmcompress.transforms.quantize import QuantConfig, quantize


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


def assert_same_up_to_rounding(a: QuantizedTensor, b: QuantizedTensor, rows: float = 0.1, codes: float = 0.02) -> None:
    """Two runs that are equal in exact arithmetic (e.g. GPTQ with different lazy block sizes) agree up to ties.

    A changed summation order moves a weight by float rounding; only where it sits at a rounding tie does its
    code change, and then the different error is compensated along that row only (rows are independent given
    H), possibly flipping a few more codes of that row. So nearly every row must come out identical, and the
    codes that differ must be few; bit-for-bit equality is not what the math promises.
    """
    assert a.codes.shape == b.codes.shape
    differ = a.codes != b.codes
    assert differ.any(1).float().mean().item() <= rows, f"{int(differ.any(1).sum())} of {len(differ)} rows differ"
    assert differ.float().mean().item() <= codes, f"{differ.float().mean().item():.2%} of the codes differ"
    same_rows = ~differ.any(1)
    assert torch.allclose(a.scale[same_rows], b.scale[same_rows], rtol=1e-4), "grids differ in identical rows"


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


@pytest.mark.parametrize("seed", [0, 3])
def test_gptq_groups_straddling_blocks_are_up_to_date(seed):
    """Grids of groups that reach past a lazy block must see the block's updates (flush), not stale weights.

    The block size does not change GPTQ in exact arithmetic, so the runs agree up to rounding ties (with stale
    grids about half the rows came out different on this problem, with 10% different scales).
    """
    w, _, h = layer_problem(cols=120, seed=seed)
    a = gptq_quantize(w, h, QuantSpec(3, 40), blocksize=120)  # every group inside one block
    for blocksize in (32, 7):  # groups straddle block borders
        b = gptq_quantize(w, h, QuantSpec(3, 40), blocksize=blocksize)
        assert_same_up_to_rounding(a.quantized, b.quantized)
        assert b.loss == pytest.approx(a.loss, rel=2e-2)


@pytest.mark.parametrize("inner", [1, 5, 1000])
def test_sub_blocks_change_only_the_order_of_the_arithmetic(inner, monkeypatch):
    """Columns updated one by one within sub-blocks of INNER columns, the rest of the block by a product: any
    sub-block width (1: every column lazy; 1000: none) gives the same GPTQ and joint SparseGPT result up to
    rounding ties, with groups (of 40) that start inside sub-blocks and straddle blocks (of 32)."""
    from lmcompress.algorithms import gptq, sparsegpt

    w, _, h = layer_problem(rows=96, cols=120, seed=3)
    runs = []
    for width in (16, inner):
        monkeypatch.setattr(gptq, "INNER", width)
        monkeypatch.setattr(sparsegpt, "INNER", width)
        a = gptq_quantize(w, h, QuantSpec(3, 40), blocksize=32)
        quantizer = ColumnQuantizer(QuantSpec(4, 40), tuple(w.shape))
        b = sparsegpt_prune(w, h, 0.5, Pattern(2, 4), blocksize=32, quantizer=quantizer)
        c = sparsegpt_prune(w, h, 0.6, blocksize=32)
        runs.append((a, quantizer.result(), b, c))
    (a0, q0, b0, c0), (a1, q1, b1, c1) = runs
    assert_same_up_to_rounding(a0.quantized, a1.quantized)
    assert_same_up_to_rounding(q0, q1)
    # a tie flipped in one row re-routes that row's error (one row of 96 carries ~1% of the loss)
    assert a1.loss == pytest.approx(a0.loss, rel=1e-2) and b1.loss == pytest.approx(b0.loss, rel=1e-2)
    assert torch.equal(c0.mask, c1.mask)  # unstructured masks are chosen per block, before its columns move
    assert torch.allclose(c0.weight, c1.weight, atol=1e-4) and c1.loss == pytest.approx(c0.loss, rel=1e-4)


def test_stacked_layers_solve_as_if_alone():
    """Layers that read one input, stacked row-wise with per-layer sparsities, get what they get alone."""
    w, _, h = layer_problem(rows=64, cols=96, seed=4)
    parts, sparsities = (w[:40], w[40:]), (0.5, 0.7)
    stacked = sparsegpt_prune(w, h, sparsities, blocksize=32, segments=(40, 24))
    rows = 0
    for part, s in zip(parts, sparsities, strict=True):
        alone = sparsegpt_prune(part, h, s, blocksize=32)
        assert torch.equal(stacked.mask[rows : rows + len(part)], alone.mask)
        assert torch.allclose(stacked.weight[rows : rows + len(part)], alone.weight, atol=1e-5)
        assert stacked.row_loss[rows : rows + len(part)].sum().item() == pytest.approx(alone.loss, rel=1e-4)
        rows += len(part)
    with pytest.raises(ValueError, match="do not split"):
        sparsegpt_prune(w, h, (0.5, 0.7), segments=(40, 20))
    together = gptq_quantize(w, h, QuantSpec(3, 32))
    for r0, r1 in ((0, 40), (40, 64)):
        assert_same_up_to_rounding(
            together.quantized.rows(r0, r1), gptq_quantize(w[r0:r1], h, QuantSpec(3, 32)).quantized
        )


def test_gptq_mask_keeps_exact_zeros_and_dead_inputs():
    w, _, h = layer_problem()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    h[7, :] = 0.0
    h[:, 7] = 0.0
    res = gptq_quantize(w.masked_fill(mask, 0.0), h, QuantSpec(4, 32), mask=mask, act_order=True)
    assert (res.weight[mask] == 0).all() and (res.weight[:, 7] == 0).all()
    assert_on_grid(res.quantized, res.weight)


# ---------------------------------------------------------------- a group size that does not divide the width


def assert_on_each_group_grid(qt: QuantizedTensor, weight: torch.Tensor) -> None:
    """Every weight is ``(k − z)·s`` for an integer code ``k`` of its own group (natural groups: ``c // g``)."""
    cols = weight.shape[1]
    groups = qt.group_index()
    for g in range(qt.spec.groups(cols)):
        cols_g = groups == g
        scale, zero = qt.scale[:, g : g + 1], qt.zero[:, g : g + 1]
        k = weight[:, cols_g] / scale + zero
        assert torch.allclose(k, k.round(), atol=1e-3), f"group {g} is off its grid"
        assert k.round().min() >= 0 and k.round().max() <= qt.spec.maxq


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_partial_last_group_has_its_own_grid(sym):
    spec = QuantSpec(3, 32, sym)
    w = torch.randn(16, 72)
    w[:, 64:] *= 0.01  # the partial group's own range is far smaller than the others'
    qt = rtn_quantize(w, spec)
    assert spec.groups(72) == 3 and spec.last_width(72) == 8 and spec.has_partial_group(72)
    assert qt.scale.shape == (16, 3) and torch.equal(qt.group_index(), torch.arange(72) // 32)
    deq = qt.dequantize()
    assert_on_each_group_grid(qt, deq)
    assert qt.scale[:, 2].max() < 0.05 * qt.scale[:, :2].min()  # chosen from its 8 inputs only
    err = (w - deq).abs()
    assert (err <= qt.scale[:, qt.group_index()] / 2 * (1 + 1e-4) + 1e-7).all()
    assert not QuantSpec(3, 24).has_partial_group(72) and not QuantSpec(3, -1).has_partial_group(72)


@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, False), (True, True)])
def test_gptq_partial_last_group(act_order, static_groups):
    w, x, h = layer_problem(cols=72)
    spec = QuantSpec(3, 32)
    res = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static_groups, blocksize=20)
    qt = res.quantized
    assert_on_grid(qt, res.weight)
    assert_on_each_group_grid(qt, res.weight)
    assert qt.scale.shape == (48, 3)
    assert torch.bincount(qt.group_index(), minlength=3).tolist() == [32, 32, 8]
    if act_order and not static_groups:  # the short group holds the 8 inputs processed last (least energy)
        last = torch.argsort(torch.diag(h), descending=True)[64:]
        assert set(torch.nonzero(qt.group_index() == 2).flatten().tolist()) == set(last.tolist())
    else:
        assert qt.g_idx is None  # g_idx = c // 32, the short group is inputs 64..71
    rtn = rtn_quantize(w, spec).dequantize()
    n = x.shape[0]
    assert output_error(w, res.weight, x) < output_error(w, rtn, x)
    assert res.loss <= output_error(w, rtn, x) / n  # GPTQ's layer loss is no worse than RTN's


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_joint_mode_partial_last_group(pattern):
    w, x, h = layer_problem(cols=72)
    spec = QuantSpec(3, 32)
    quantizer = ColumnQuantizer(spec, tuple(w.shape))
    res = sparsegpt_prune(w, h, 0.5, pattern, blocksize=16, quantizer=quantizer)  # groups straddle blocks
    qt = quantizer.result()
    assert_on_grid(qt, res.weight)
    assert_on_each_group_grid(qt, res.weight)
    assert qt.scale.shape == (48, 3) and qt.g_idx is None
    assert (res.weight[res.mask] == 0).all() and res.mask.float().mean().item() == 0.5
    plain = sparsegpt_prune(w, h, 0.5, pattern, blocksize=16).weight
    assert output_error(w, res.weight, x) < output_error(w, rtn_quantize(plain, spec).dequantize(), x)


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_mode_groups_straddling_blocks_are_up_to_date(seed):
    """As for GPTQ: a group reaching past a SparseGPT block sees the block's updates (N:M masks do not depend
    on the block size, so the runs are equal in exact arithmetic; with stale grids a quarter to a half of the
    rows came out different here, against at most 4% from ties)."""
    w, _, h = layer_problem(rows=128, cols=72, seed=seed)  # many rows: the share of rows at a tie is stable
    runs = []
    for blocksize in (72, 24, 8):  # one block; groups of 32 straddle blocks of 24 and of 8
        quantizer = ColumnQuantizer(QuantSpec(3, 32), tuple(w.shape))
        res = sparsegpt_prune(w, h, 0.5, Pattern(2, 4), blocksize=blocksize, quantizer=quantizer)
        runs.append((quantizer.result(), res.loss))
    for qt, loss in runs[1:]:
        assert_same_up_to_rounding(runs[0][0], qt)
        assert loss == pytest.approx(runs[0][1], rel=2e-2)


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
        ["quantize", "--group-size", "0"],
        ["quantize", "--method", "awq"],
        ["quantize", "--method", "rtn", "--act-order"],
        ["prune", "--method", "magnitude", "--bits", "4"],
        ["prune", "--method", "sparsegpt", "--bits", "9"],
        ["prune", "--method", "wanda", "--pattern", "2:6"],  # 6 divides no width of the model
        ["prune", "--method", "sparsegpt", "--pattern", "2:6", "--blocksize", "120"],
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


def test_group_size_that_divides_no_width_end_to_end(tmp_path, tiny_folder, calib_file, capsys):
    """--group-size 48 on a model of widths 64 and 128: a partial last group per layer, through every command."""
    from lmcompress.checkpoint.packed import read_packed

    src = tiny_folder("llama")
    out = tmp_path / "g48"
    argv = ["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "48", "--act-order"]
    assert run([*argv, "--calib-data", str(calib_file), "-o", str(out), *SMALL]) == 0
    model, _ = load_model(out)
    quantized = read_packed(out)[1]
    assert len(quantized) == 14
    for name, qt in quantized.items():
        cols = qt.codes.shape[1]
        assert cols % 48 and qt.scale.shape[1] == -(-cols // 48)
        assert torch.bincount(qt.group_index()).tolist()[-1] == cols % 48
        assert torch.equal(model.get_parameter(name).data.float(), qt.dequantize())
    assert perplexity_of(out, calib_file, capsys) == pytest.approx(perplexity_of(src, calib_file, capsys), rel=0.1)

    capsys.readouterr()
    assert run(["info", str(out)]) == 0
    assert "partial last group: 14 layers (64 = 1×48 + 16: 12; 128 = 2×48 + 32: 2)" in capsys.readouterr().out
    assert run(["info", str(out), "--json"]) == 0
    partial = json.loads(capsys.readouterr().out)["linear"]["partial_groups"]
    assert partial["layers"] == 14 and partial["names"]["model.layers.0.mlp.down_proj.weight"] == "128 = 2×48 + 32"

    plain = tmp_path / "plain"
    assert run(["unpack", str(out), "-o", str(plain)]) == 0
    unpacked, _ = load_model(plain)
    for name, qt in quantized.items():
        assert torch.equal(unpacked.get_parameter(name).data.float(), qt.dequantize())

    capsys.readouterr()
    assert run(["export", str(out), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert "14 layers have a partial last quantization group" in err
    assert "128 = 2×48 + 32: model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj" in err
    assert "group_size 32" in err and not (tmp_path / "ct").exists()


def test_joint_prune_with_a_partial_last_group(tmp_path, tiny_folder, calib_file, capsys):
    out = tmp_path / "joint48"
    argv = ["prune", str(tiny_folder("llama")), "--method", "sparsegpt", "--pattern", "2:4", "--bits", "4"]
    assert run([*argv, "--group-size", "48", "--calib-data", str(calib_file), "-o", str(out), *SMALL]) == 0
    model, _ = load_model(out)
    from lmcompress.checkpoint.packed import read_packed

    for name, qt in read_packed(out)[1].items():
        w = model.get_parameter(name).data.float()
        assert torch.equal(w, qt.dequantize()) and qt.scale.shape[1] == -(-w.shape[1] // 48)
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_that_does_not_fit_the_widths_fails_before_calibration(
    tmp_path, tiny_folder, method, capsys, monkeypatch
):
    """Checked right after loading, before any calibration text is read (drawing windows would fail the test)."""
    import lmcompress.jobs

    def no_drawing(*_a, **_k):
        raise AssertionError("calibration windows were drawn before the pattern was checked")

    monkeypatch.setattr(lmcompress.jobs, "draw", no_drawing)
    out = tmp_path / "out"
    argv = ["prune", str(tiny_folder("llama")), "--method", method, "--pattern", "3:12"]
    argv += ["--blocksize", "120"] if method == "sparsegpt" else []  # other methods refuse SparseGPT's options
    argv += ["--calib-data", "bundled:wikitext2-valid"] if method != "magnitude" else []  # magnitude reads no data
    assert run([*argv, "-o", str(out), "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pattern 3:12 needs input widths that are multiples of 12" in err and "14 of the 14 layers" in err
    assert "128 inputs: model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj)" in err and "--pattern 2:4" in err
    assert "blocksize" not in err and not out.exists()


def test_nm_width_check_in_the_api(model_of, calib):
    model = model_of("llama")
    with pytest.raises(UserError, match=r"64 inputs: model\.layers\.0\.self_attn\.q_proj, .* and 9 more"):
        prune(model, PruneConfig(method="wanda", sparsity=None, pattern="1:5"), calib, progress=False)
    with pytest.raises(UserError, match="multiple of M=5 for SparseGPT"):
        PruneConfig(method="sparsegpt", sparsity=None, pattern="1:5")
    PruneConfig(method="wanda", sparsity=None, pattern="1:5", blocksize=128)  # Wanda has no blocks: not its error
