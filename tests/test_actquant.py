"""W8A8 int8 and FP8 simulation: hand-computed codes, the integer product, compressed-tensors' own math."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lmcompress.algorithms import actquant as aq
from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.errors import UserError
from lmcompress.models.families import get_blocks
from lmcompress.models.smoothing import model_groups, recorded_inputs, smooth
from lmcompress.models.tiny import build_tiny_model
from tests.conftest import logits_of, random_ids


def test_int8_per_token_by_hand():
    x = torch.tensor([[1.4, -2.6, 100.2, 127.5, -127.5], [0.5, 0.25, -0.2, 0.0, 0.0]])
    codes, scale = aq.quantize_per_token_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (2, 1)
    assert scale[0, 0] == 1.0  # max|x| / 127.5
    assert codes[0].tolist() == [1, -3, 100, 127, -128]  # +127.5 clipped to 127, −127.5 rounds (half even) to −128
    torch.testing.assert_close(scale[1, 0], torch.tensor(0.5 / 127.5))
    assert codes[1].tolist() == [128 - 1, 64, -51, 0, 0]  # 0.25·255 = 63.75 → 64; −0.2·255 = −51
    zero_codes, zero_scale = aq.quantize_per_token_int8(torch.zeros(1, 3))  # an all-zero token stays zero
    assert zero_codes.tolist() == [[0, 0, 0]] and zero_scale.item() > 0
    vllm_codes, vllm_scale = aq.quantize_per_token_int8(x[:1], divisor=127)
    assert vllm_codes[0, 3] == 127 and vllm_scale.item() == pytest.approx(127.5 / 127)


def test_fp8_by_hand():
    x = torch.tensor([[448.0, 1.0625, 0.3, -300.0, 1000.0 / 1e9]])
    codes, scale = aq.quantize_per_token_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.item() == 1.0
    # E4M3 grid: 1.0625 is the tie between 1 and 1.125 (to even: 1); 0.3 → 0.3125 (step 2⁻⁵ in [¼, ½));
    # −300 → −288 (step 32 in [256, 512)); 1e-6 is below the smallest subnormal 2⁻⁹ → 0
    assert aq.dequantize(codes, scale)[0].tolist() == [448.0, 1.0, 0.3125, -288.0, 0.0]
    big = torch.tensor([[896.0, 500.0]])  # scale 2: 500 / 2 = 250 → 256 (step 16 in [128, 256))
    assert aq.dequantize(*aq.quantize_per_token_fp8(big))[0].tolist() == [896.0, 512.0]


def test_weights_per_output_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [-63.75, 10.0, 3.3]])
    codes, scale = aq.quantize_weight_int8(w)
    torch.testing.assert_close(scale, torch.tensor([[1 / 127.5], [0.5]]))
    assert codes.tolist() == [[127, -64, 32], [-128, 20, 7]]  # −63.75, 31.875 → 32; 6.6 → 7; −127.5 → −128
    fcodes, fscale = aq.quantize_weight_fp8(w)
    torch.testing.assert_close(fscale, torch.tensor([[1 / 448], [63.75 / 448]]))
    assert aq.dequantize(fcodes, fscale).abs().amax(1).tolist() == pytest.approx([1.0, 63.75])


def test_lmcompress_8bit_symmetric_codes_are_the_int8_grid():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=gen) * torch.rand(24, 1, generator=gen) * 5
    qt = rtn_quantize(w, QuantSpec(bits=8, group_size=-1, sym=True))
    codes, scale = aq.quantize_weight_int8(w)
    layer = aq.ActQuantLinear.from_quantized(qt, None, aq.ActScheme("int8"))
    assert torch.equal(layer.codes, codes)
    torch.testing.assert_close(layer.weight_scale, scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.dequantized_weight(), qt.dequantize(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="per-channel"):
        aq.ActQuantLinear.from_quantized(rtn_quantize(w, QuantSpec(bits=8, group_size=8)), None, aq.ActScheme())


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_linear_equals_the_integer_product(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 32, generator=gen) * torch.linspace(0.1, 8, 32)
    w, b = torch.randn(16, 32, generator=gen), torch.randn(16, generator=gen)
    layer = aq.ActQuantLinear.from_weight(w, b, aq.ActScheme(kind))
    qw, sw = aq.weight_scheme_quantize(w, kind)
    qx, sx = aq.quantize_per_token_int8(x) if kind == "int8" else aq.quantize_per_token_fp8(x)
    acc = qx.double() @ qw.double().t()  # exact: what an int8 × int8 → int32 (or FP8) kernel accumulates
    expected = acc * sx.double() * sw.double().t() + b.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)
    if kind == "int8":
        assert torch.equal(acc, (qx.to(torch.int32) @ qw.to(torch.int32).t()).double())


def test_static_fp8_uses_one_calibrated_scale():
    x = torch.tensor([[1.0, -2.0], [100.0, 3.0]])
    act = aq.ActScheme("fp8", static_scale=aq.static_fp8_scale(50.0))  # calibrated max 50: 100 saturates
    out = act.fake_quantize(x)
    assert out[1, 0].item() == pytest.approx(50.0)
    assert out[0].tolist() == pytest.approx([1.0, -2.0], rel=0.07)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "int4"}, "int8 or fp8"),
        ({"kind": "int8", "static_scale": 1.0}, "fp8 only"),
        ({"kind": "fp8", "static_scale": 0.0}, "positive"),
    ],
)
def test_bad_schemes(kwargs, match):
    with pytest.raises(UserError, match=match):
        aq.ActScheme(**kwargs)


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors not installed")
@pytest.mark.parametrize("kind", ["int8", "fp8", "int8_asym"])
def test_equal_to_compressed_tensors(kind):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, compute_dynamic_scales_and_zp

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen) * torch.linspace(0.1, 10, 16)
    w = torch.randn(8, 16, generator=gen)
    symmetric = kind != "int8_asym"
    kind = kind.removesuffix("_asym")
    x = x if symmetric else x + 2.0  # tokens leaning to one sign
    typ = QuantizationType.INT if kind == "int8" else QuantizationType.FLOAT
    wargs = QuantizationArgs(num_bits=8, type=typ, strategy=QuantizationStrategy.CHANNEL, symmetric=True)
    scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), wargs)
    assert torch.equal(aq.dequantize(*aq.weight_scheme_quantize(w, kind)), fake_quantize(w, scale, zero, wargs))
    xargs = QuantizationArgs(
        num_bits=8, type=typ, strategy=QuantizationStrategy.TOKEN, symmetric=symmetric, dynamic=True
    )
    scale, zero = compute_dynamic_scales_and_zp(x, xargs, torch.nn.Linear(16, 8))
    ours = aq.ActScheme(kind, symmetric=symmetric).fake_quantize(x)
    assert torch.equal(ours, fake_quantize(x, scale, zero, xargs))


def test_asymmetric_int8_by_hand():
    """Per token: the range widened to hold 0, s = (hi − lo) / 255, z = round(−128 − lo / s); a token of one sign
    gets a finer step than the symmetric grid's, and its error stays within half a step."""
    x = torch.tensor([[0.5, 1.0, 2.0, 4.0], [-3.0, -1.0, 1.0, 2.1]])
    codes, scale, zero = aq.quantize_per_token_int8_asym(x)
    assert torch.allclose(scale.squeeze(1), torch.tensor([4.0 / 255, 5.1 / 255]))  # row 0: lo = 0, not 0.5
    assert zero.squeeze(1).tolist() == [-128.0, round(-128 + 3.0 / (5.1 / 255))]
    assert codes[0].tolist()[-1] == 127 and codes.dtype == torch.int8
    fake = aq.ActScheme("int8", symmetric=False).fake_quantize(x)
    assert torch.equal(fake, (codes.float() - zero) * scale)
    assert float((fake - x).abs().max()) <= float(scale.max()) / 2 + 1e-6
    sym_step = 4.0 / 127.5
    assert float(scale[0]) < 0.55 * sym_step  # a one-signed token: about twice the resolution
    assert torch.equal(aq.ActScheme("int8", symmetric=False).fake_quantize(torch.zeros(1, 4)), torch.zeros(1, 4))


def w8a8_error(model, ids, dense) -> float:
    for block in get_blocks(model):
        aq.simulate_linears(block, aq.ActScheme("int8"))
    return float((logits_of(model, ids) - dense).pow(2).mean())


def test_smoothquant_reduces_w8a8_error_with_outlier_channels():
    model = build_tiny_model("llama", num_key_value_heads=4)
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():  # activation outliers: a few norm channels 40× larger, as in real LLMs
        for block in get_blocks(model):
            block.input_layernorm.weight[:3] = 40.0
            block.post_attention_layernorm.weight[:3] = 40.0
    dense = logits_of(model, ids)
    smoothed = build_tiny_model("llama", num_key_value_heads=4)
    smoothed.load_state_dict(model.state_dict())
    groups = model_groups(smoothed)
    with recorded_inputs(groups) as stats:
        logits_of(smoothed, ids)
    smooth(groups, stats, 0.5)
    plain_error, smooth_error = w8a8_error(model, ids, dense), w8a8_error(smoothed, ids, dense)
    assert isinstance(get_blocks(model)[0].mlp.down_proj, aq.ActQuantLinear)
    assert smooth_error < 0.5 * plain_error, (smooth_error, plain_error)


def test_static_fp8_calibrates_each_layer():
    model = build_tiny_model("llama")
    ids = random_ids(model.config.vocab_size)
    block = get_blocks(model)[0]
    with aq.recorded_input_absmax(block) as absmax:
        logits_of(model, ids)
    assert absmax["mlp.down_proj"] > 0 and set(absmax) == {n for n, _ in block.named_modules() if "proj" in n}
    aq.simulate_linears(block, aq.ActScheme("fp8"), input_absmax=absmax)
    down = block.mlp.down_proj
    assert down.act.static_scale == pytest.approx(absmax["mlp.down_proj"] / 448)
    with pytest.raises(ValueError, match="no calibrated input maximum"):
        aq.simulate_linears(get_blocks(model)[1], aq.ActScheme("fp8"), input_absmax={})


def test_simulate_linears_handles_conv1d():
    model = build_tiny_model("gpt2")
    ids = random_ids(model.config.vocab_size)
    dense = logits_of(model, ids)
    names = aq.simulate_linears(get_blocks(model)[0], aq.ActScheme("int8"))
    assert "attn.c_attn" in names and "mlp.c_proj" in names
    out = logits_of(model, ids)
    assert not torch.equal(out, dense)
    torch.testing.assert_close(out, dense, rtol=0.05, atol=0.05)
