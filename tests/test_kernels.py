"""CPU weight-only kernels (lmcompress.kernels): outputs against the dequantized matmul, loading packed folders with
kernels, generation with and without them, the fallbacks and their reasons, bad input.

Tolerances (``bound = |x| · |W|ᵀ``, the sum of the magnitudes of the products each output adds up):
float32 compute: ``1e-5 · bound`` (float32 rounding, different summation order); bfloat16 compute (the default,
the fast path): ``2⁻⁷ · bound``, since the input, the scales and the output are each rounded to bfloat16's 8
significant bits (≤ 2⁻⁹ relative each).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from torch import nn
from typer.testing import CliRunner

from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, rtn_quantize
from lmcompress.checkpoint.load import load
from lmcompress.cli import app
from lmcompress.errors import UserError
from lmcompress.jobs import quantize_pretrained
from lmcompress.kernels import (
    Int4Linear,
    Int8Linear,
    PackedLinear,
    cpu_ext,
    kernel_for,
    kernel_report,
    swap_quantized_linears,
)
from lmcompress.transforms.quantize import QuantConfig

BF16_TOL = 2.0**-7
FP32_TOL = 1e-5


def _check(layer: nn.Module, q: QuantizedTensor, tol: float, bias: torch.Tensor | None = None) -> float:
    torch.manual_seed(1)
    w = q.dequantize()
    x = torch.randn(3, 5, w.shape[1])
    ref = x @ w.T + (0 if bias is None else bias)
    bound = x.abs() @ w.abs().T + 1e-6
    y = layer(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = float(((y - ref).abs() / bound).max())
    assert err <= tol, err
    return err


def _weight(rows: int, cols: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols)) + shift


@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, False), (6, True)])
def test_int8_per_channel_matches_dequantized(bits, sym):
    q = rtn_quantize(_weight(48, 80, shift=0.7), QuantSpec(bits, -1, sym))
    assert kernel_for(q, "aten")[0] == "int8"
    bias = torch.randn(48)
    assert _check(Int8Linear(q, bias, torch.float32), q, FP32_TOL, bias) < FP32_TOL
    _check(Int8Linear(q, bias), q, BF16_TOL, bias)


@pytest.mark.parametrize(
    "bits,group,sym,cols",
    [
        (4, 32, True, 128),
        (4, 64, False, 192),
        (4, 128, True, 320),
        (3, 32, False, 96),
        (2, 64, True, 128),
        (4, 256, False, 512),
        (4, 64, True, 96),
    ],
)
def test_int4_grouped_matches_dequantized(bits, group, sym, cols):
    q = rtn_quantize(_weight(32, cols, shift=0.3), QuantSpec(bits, group, sym))
    kind, why = kernel_for(q, "aten")
    assert kind == "int4"
    assert ("padded" in why) == (cols % group != 0)  # a partial last group runs padded with zero inputs
    _check(Int4Linear(q, None, torch.float32), q, FP32_TOL)
    _check(Int4Linear(q), q, BF16_TOL)


def test_int4_op_refuses_other_group_sizes_and_we_fall_back():
    with pytest.raises(RuntimeError, match="qGroupSize"):  # the op itself: 32, 64, 128 or 256 only
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64), w, 16, torch.zeros(4, 16, 2))
    cases = {
        "group size 16": rtn_quantize(_weight(32, 64), QuantSpec(4, 16)),
        "one scale per output": rtn_quantize(_weight(32, 256), QuantSpec(8, 128)),
        "multiples of 16": rtn_quantize(_weight(24, 64), QuantSpec(4, 32)),
    }
    for reason, q in cases.items():
        kind, why = kernel_for(q, "aten")
        assert kind is None and reason in why
    q = rtn_quantize(_weight(32, 64), QuantSpec(4, 32))
    shuffled = QuantizedTensor(q.codes, q.scale, q.zero, q.spec, torch.randperm(64) % 2)
    assert kernel_for(shuffled, "aten") == (
        None,
        "act-order groups (g_idx): PyTorch's kernels read no scattered groups",
    )
    plain = QuantizedTensor(q.codes, q.scale, q.zero, q.spec, torch.arange(64) // 32)
    assert kernel_for(plain, "aten")[0] == "int4"  # a g_idx that is the natural order is no obstacle


def test_lmcompress_kernel_builds_where_it_should():
    """On x86-64 with AVX2 (this project's machines) the kernel must build: a broken build fails here instead of
    silently falling back to PyTorch's kernels."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("lmcompress's kernel is AVX2 code: not this machine")
    assert cpu_ext.extension() is not None, cpu_ext.unavailable_reason()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [40, 64, 100, 576])
def test_pack_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (7, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.uint8)
    packed = cpu_ext.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (
        7,
        cpu_ext.padded_cols(cols, bits) * (cpu_ext.storage_bits(bits)) // 8,
    )
    assert torch.equal(cpu_ext.unpack(packed, bits, cols), codes)


@pytest.mark.parametrize(
    "bits,group,sym,cols",
    [
        (4, 32, True, 576),  # SmolLM2's q/k/v/gate/up shape
        (4, 128, False, 576),  # a partial last group (4 × 128 + 64)
        (3, 64, False, 1536),
        (2, -1, True, 100),  # per channel, inputs not a multiple of 32
        (5, 32, False, 96),  # 5-8 bit grouped grids: no aten kernel runs these
        (8, 64, True, 200),
        (8, -1, False, 70),
        (4, 32, True, 40),  # one and a quarter units: padding inside the last group
    ],
)
def test_packed_kernel_matches_dequantized(bits, group, sym, cols):
    if cpu_ext.extension() is None:
        pytest.skip(cpu_ext.unavailable_reason())
    q = rtn_quantize(_weight(24, cols, shift=0.3), QuantSpec(bits, group, sym))
    assert kernel_for(q)[0] == "packed"
    bias = torch.randn(24)
    layer = PackedLinear(q, bias)
    _check(layer, q, FP32_TOL, bias)  # 15 rows: dequantized slices and one GEMM each
    layer.slice_rows = 5  # several slices, the last one short
    _check(layer, q, FP32_TOL, bias)
    w = q.dequantize()
    for rows in (1, 2, 4):  # from the codes (decode)
        x = torch.randn(rows, cols)
        ref, bound = x @ w.T + bias, x.abs() @ w.abs().T + 1e-6
        assert float(((layer(x) - ref).abs() / bound).max()) <= FP32_TOL


def test_packed_kernel_runs_act_order_groups():
    """GPTQ act-order without static groups scatters each group's columns (``g_idx``): lmcompress's kernel sorts the
    inputs by group once (codes permuted at load, ``x[:, perm]`` per call) and runs them like any grouped grid."""
    if cpu_ext.extension() is None:
        pytest.skip(cpu_ext.unavailable_reason())
    cols, g = 96, 32
    order = torch.randperm(cols, generator=torch.Generator().manual_seed(3))  # activation order
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[order] = (torch.arange(cols) // g).to(torch.int32)  # group k: the k-th run of 32 columns in that order
    w = _weight(16, cols)
    base = rtn_quantize(w[:, order], QuantSpec(4, g, False))  # quantize in activation order, then scatter back
    codes = torch.empty_like(base.codes)
    codes[:, order] = base.codes
    q = QuantizedTensor(codes, base.scale, base.zero, base.spec, g_idx)
    kind, why = kernel_for(q)
    assert kind == "packed" and "act-order" in why
    layer = PackedLinear(q)
    _check(layer, q, FP32_TOL)
    x = torch.randn(1, cols)
    assert float(((layer(x) - x @ q.dequantize().T).abs() / (x.abs() @ q.dequantize().abs().T)).max()) <= FP32_TOL
    sizes = torch.tensor([0] * 40 + [1] * 24 + [2] * 32, dtype=torch.int32)  # groups of 40, 24 and 32 columns
    uneven = QuantizedTensor(codes, base.scale, base.zero, base.spec, sizes[torch.randperm(cols)])
    assert kernel_for(uneven)[0] is None and "unequal" in kernel_for(uneven)[1]


def test_auto_falls_back_to_aten_kernels_without_lmcompress_kernel(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_state", {"why": "no compiler (test)"})
    q = rtn_quantize(_weight(32, 64), QuantSpec(4, 32))
    assert kernel_for(q)[0] == "int4"
    q8 = rtn_quantize(_weight(32, 256), QuantSpec(8, 128))
    assert kernel_for(q8)[0] is None  # nothing else runs a grouped 8-bit grid
    with pytest.raises(RuntimeError, match="no compiler"):
        PackedLinear(q)


@pytest.fixture(scope="module")
def quantized_folders(tiny_folder, tmp_path_factory):
    """Packed tiny llamas: RTN 4-bit g32 (int4), 8-bit per channel (int8), 4-bit g16 (no kernel)."""
    root = tmp_path_factory.mktemp("kernels")
    out = {}
    for name, config in {
        "int4": QuantConfig("rtn", 4, 32),
        "int8": QuantConfig("rtn", 8, -1),
        "g16": QuantConfig("rtn", 4, 16),
    }.items():
        quantize_pretrained(tiny_folder("llama"), config, root / name, progress=False)
        out[name] = root / name
    return out


@pytest.mark.parametrize("kind,mode", [("int4", "aten"), ("int8", "aten"), ("int4", "auto"), ("int8", "auto")])
def test_load_with_kernels_swaps_without_dense_weights(quantized_folders, kind, mode):
    dense, _ = load(quantized_folders[kind])
    fast, _ = load(quantized_folders[kind], kernels=mode)
    report = kernel_report(fast)
    assert len(report.swapped) == 14 and not report.dense  # 2 blocks × 7 linear layers
    prefix, cls, tol = f"{kind} kernel", Int4Linear if kind == "int4" else Int8Linear, 0.05  # bfloat16 compute
    if mode == "auto":  # lmcompress's own kernel, float32 throughout
        prefix, cls, tol = "lmcompress AVX2 kernel", PackedLinear, 1e-4
        assert report.compute_dtype == "float32"
    assert all(d.startswith(prefix) for d in report.swapped.values()), report.swapped
    layers = [m for m in fast.modules() if isinstance(m, cls)]
    assert len(layers) == 14 and all(not hasattr(m, "weight") for m in layers)
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in dense.parameters())
    ids = torch.randint(0, dense.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = dense(ids).logits, fast(ids).logits
        assert float((got - ref).abs().max()) < tol * float(ref.abs().max())
        out = fast(ids[:, :1], use_cache=False).logits  # one row: the decode path (from the codes)
        assert float((out - dense(ids[:, :1]).logits).abs().max()) < tol * float(ref.abs().max())
    assert kernel_report(dense) is None  # kernels none (the default) leaves the model as before


def test_layers_no_kernel_runs_stay_dense_and_are_reported(quantized_folders):
    dense, _ = load(quantized_folders["g16"])
    model, _ = load(quantized_folders["g16"], kernels="auto")
    report = kernel_report(model)
    assert not report.swapped and len(report.dense) == 14
    assert report.compute_dtype == "bfloat16"  # nothing swapped: the report keeps the requested compute dtype
    assert all("group size 16" in why for why in report.dense.values())
    assert "14 quantized layers dense" in report.summary()
    for (name, p), (_, r) in zip(model.named_parameters(), dense.named_parameters(), strict=True):
        assert torch.equal(p, r), name


def test_greedy_generation_identical_with_lmcompress_kernel(quantized_folders):
    """lmcompress's kernel computes in float32 (decode from the codes, prefill from dequantized slices): greedy
    decoding gives the dequantized model's tokens."""
    from lmcompress.cli.generate import generate_text

    if cpu_ext.extension() is None:
        pytest.skip(cpu_ext.unavailable_reason())
    for kind in ("int4", "int8"):
        model, tokenizer = load(quantized_folders[kind])
        plain = generate_text(model, tokenizer, "the history of", max_new_tokens=12)
        fast_model, _ = load(quantized_folders[kind], kernels="auto")
        assert any(isinstance(m, PackedLinear) for m in fast_model.modules())
        fast = generate_text(fast_model, tokenizer, "the history of", max_new_tokens=12)
        assert fast["token_ids"] == plain["token_ids"] and len(fast["token_ids"]) == 12


def test_greedy_generation_identical_with_float32_kernels(quantized_folders):
    """float32 compute: the kernels agree with the dequantized matmul to float32 rounding, so greedy decoding
    gives the same tokens. The default bfloat16 compute is not bit-close (see the logits test above)."""
    from lmcompress.checkpoint.packed import read_packed
    from lmcompress.cli.generate import generate_text

    model, tokenizer = load(quantized_folders["int4"])
    plain = generate_text(model, tokenizer, "the history of", max_new_tokens=12)
    _, quantized = read_packed(quantized_folders["int4"])
    report = swap_quantized_linears(model, quantized, "aten", compute_dtype=torch.float32)
    assert len(report.swapped) == 14
    fast = generate_text(model, tokenizer, "the history of", max_new_tokens=12)
    assert fast["token_ids"] == plain["token_ids"] and len(fast["token_ids"]) == 12
    assert fast["decode_tokens_per_s"] > 0 and fast["prefill_tokens_per_s"] > 0


def test_generate_cli(quantized_folders, tiny_folder):
    runner = CliRunner()
    args = ["generate", str(quantized_folders["int8"]), "--prompt", "the history of", "--max-new-tokens", "5"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["new_tokens"] == 5 and len(out["kernels"]["swapped"]) == 14 and out["decode_tokens_per_s"] > 0
    text = runner.invoke(app, args)
    assert text.exit_code == 0 and "14 layers lmcompress AVX2" in text.output and "tokens/s" in text.output
    sampled = runner.invoke(app, [*args, "--sample", "--temperature", "0.8", "--seed", "3", "--kernels", "none"])
    assert sampled.exit_code == 0, sampled.output
    dense = runner.invoke(app, ["generate", str(tiny_folder("llama")), "--prompt", "the", "--max-new-tokens", "2"])
    assert dense.exit_code == 0 and "no quantized layers" in dense.output and "runs dense" in dense.output


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--kernels", "bogus"], "--kernels must be one of auto, aten, none"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (["--sample", "--temperature", "0"], "--temperature must be positive"),
        (["--chat"], "defines no chat_template; give the prompt without --chat"),
    ],
)
def test_generate_bad_input(quantized_folders, extra, message):
    result = CliRunner().invoke(app, ["generate", str(quantized_folders["int8"]), "--prompt", "the", *extra])
    assert result.exit_code != 0
    assert message in str(result.exception) + result.output


def test_load_refuses_unknown_kernels(quantized_folders):
    with pytest.raises(UserError, match="kernels must be one of auto, aten, none"):
        load(quantized_folders["int8"], kernels="bogus")


def test_eval_profile_reports_generation_speed(quantized_folders, tiny_folder):
    from lmcompress.measure.profile import format_profile, profile_pretrained

    prof = profile_pretrained(quantized_folders["int4"], seqlen=64, repeats=1, generation=True)
    gen = prof["generation"]
    assert "14 layers lmcompress AVX2" in gen["model"]["kernel_summary"]
    assert gen["source"] is not None and gen["source"]["kernel_summary"] is None  # the dense source, as it is
    for side in ("model", "source"):
        assert gen[side]["decode_tokens_per_s"] > 0 and gen[side]["prefill_tokens"] == 64
        assert gen[side]["peak_rss_mb"] >= gen[side]["load_peak_rss_mb"] > 0
    assert gen["decode_speedup"] > 0
    assert "decode speed-up" in format_profile(prof)
    bad = CliRunner().invoke(app, ["eval", str(quantized_folders["int4"]), "--kernels", "none"])
    assert bad.exit_code != 0 and "--kernels does not apply without --profile" in str(bad.exception) + bad.output


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_head_runs_on_a_kernel(tmp_path, tokenizer, tied, method):
    """``quantize --include-head``: the head is stored quantized (8 bits per channel), loads dequantized or on the
    int8 / lmcompress kernel, and a tied embedding takes the head's quantized values (one tensor, stored once)."""
    from lmcompress.checkpoint.save import save_model
    from lmcompress.models.tiny import build_tiny_model

    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256, tie_word_embeddings=tied)
    save_model(model, tokenizer, tmp_path / "src", {"kind": "test-model"})
    out = tmp_path / "q"
    args = ["quantize", str(tmp_path / "src"), "-o", str(out), "--method", method, "--bits", "4", "--group-size", "32"]
    if method == "gptq":
        args += ["--calib-data", "bundled:wikitext2-valid", "--nsamples", "4", "--seqlen", "64"]
    result = CliRunner().invoke(app, [*args, "--include-head", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["config"]["include_head"] and ("lm_head" in report["layer_loss"]) == (method == "gptq")
    head = model.lm_head.weight.detach()
    q = rtn_quantize(head, QuantSpec(8, -1))
    dense, _ = load(out)
    step = q.scale.abs().max()
    assert float((dense.lm_head.weight.detach() - head).abs().max()) <= (0.51 if method == "rtn" else 8) * float(step)
    if method == "rtn":
        assert torch.equal(dense.lm_head.weight, q.dequantize())  # RTN: exactly the 8-bit grid's values
    assert (dense.lm_head.weight is dense.model.embed_tokens.weight) == tied
    for mode, cls in (("aten", Int8Linear), ("auto", PackedLinear)):
        fast, _ = load(out, kernels=mode)
        assert isinstance(fast.lm_head, cls) and "lm_head" in kernel_report(fast).swapped
        expected_embed = dense.lm_head.weight if tied else model.model.embed_tokens.weight
        assert torch.equal(fast.model.embed_tokens.weight, expected_embed)
        ids = torch.randint(0, tokenizer.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, got = dense(ids).logits, fast(ids).logits
        assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_head_options_need_include_head(tiny_folder, tmp_path, capsys):
    out = tmp_path / "x"  # --head-bits alone implies --include-head (tests/test_head_bits.py); a group size does not
    code = run_cli(["quantize", str(tiny_folder("llama")), "-o", str(out), "--method", "rtn", "--head-group-size", "8"])
    err = capsys.readouterr().err
    assert code != 0 and "--head-group-size" in err and "--include-head" in err
    assert not out.exists()
    with pytest.raises(UserError, match="head_group_size"):
        QuantConfig("rtn", include_head=True, head_group_size=0)
