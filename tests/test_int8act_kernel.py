"""W8A8 on CPU (lmcompress.kernels.int8act): the int8 × int8 → int32 layers equal the simulated ActQuantLinear."""

from __future__ import annotations

import pytest
import torch

from lmcompress.algorithms import actquant as aq
from lmcompress.kernels import cpu_ext, int8act
from lmcompress.kernels.int8act import Int8ActLinear, swap_act_quant_linears
from lmcompress.models.families import get_blocks
from lmcompress.models.tiny import build_tiny_model
from tests.conftest import logits_of, random_ids

HAS_EXT = cpu_ext.extension() is not None


@pytest.fixture(params=["auto", "int8_gemv", "torch"])
def path(request, monkeypatch):
    """Each way the product can run: _int_mm (+ fused kernels), lmcompress's AVX2 int8 kernel, plain PyTorch."""
    if request.param != "torch" and not HAS_EXT:
        pytest.skip(f"lmcompress's CPU kernel unavailable: {cpu_ext.unavailable_reason()}")
    if request.param == "int8_gemv":
        monkeypatch.setitem(int8act._STATE, "int_mm", False)
    if request.param == "torch":
        monkeypatch.setattr(int8act, "_extension", lambda: None)
    return request.param


def exact_reference(layer: aq.ActQuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The W8A8 output from the integer product in float64 (exact), and Σ|x̂|·|Ŵ| (the float rounding scale)."""
    q, s = aq.quantize_per_token_int8(x.reshape(-1, layer.in_features), layer.act.divisor)
    acc = q.double() @ layer.codes.double().t()
    y = acc * s.double() * layer.weight_scale.double().t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    mag = (q.double().abs() * s.double()) @ (layer.codes.double().abs() * layer.weight_scale.double()).t()
    return y.reshape(*x.shape[:-1], -1), mag.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("tokens", [1, 3, 37])
@pytest.mark.parametrize("shape", [(13, 29), (130, 577), (64, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_simulated_layer(path, tokens, shape, bias):
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(tokens * 1000 + out_f)
    weight = torch.randn(out_f, in_f, generator=gen)
    sim = aq.ActQuantLinear.from_weight(weight, torch.randn(out_f, generator=gen) if bias else None, aq.ActScheme())
    layer = Int8ActLinear.from_act_quant(sim)
    x = torch.randn(2, tokens, in_f, generator=gen) * torch.linspace(0.1, 20, in_f)  # 3-D, outlier columns
    x[0, 0] = 0.0  # an all-zero token: codes 0, output = bias
    y, y_sim = layer(x), sim(x)
    exact, mag = exact_reference(sim, x)
    assert y.shape == y_sim.shape == (2, tokens, out_f) and y.dtype == x.dtype
    assert torch.equal(y[0, 0], sim.bias if bias else torch.zeros(out_f))
    assert float(((y.double() - exact).abs() / (mag + 1e-30)).max()) < 1e-6  # integer product: float rounding only
    assert float(((y - y_sim).abs() / (mag + 1e-30)).max()) < 1e-5
    dense = torch.nn.functional.linear(x, weight, sim.bias)  # activations quantized: far from the float layer
    assert float((y - dense).abs().max()) > 100 * float((y - y_sim).abs().max())


@pytest.mark.skipif(not HAS_EXT, reason="lmcompress's CPU kernel unavailable")
def test_kernel_codes_equal_the_scheme():
    """The fused quantization gives the codes and scales of ActScheme('int8'), ties to even and clamps included."""
    ext = cpu_ext.extension()
    x = torch.tensor([[2.5, -3.5, 0.5, -0.5, 127.5, -127.5, 126.5, 1.5, -2.5, 7.0, 0.0]])  # s = 1: exact ties
    gen = torch.Generator().manual_seed(0)
    for rows in (x, torch.randn(9, 1031, generator=gen) * 5, torch.zeros(2, 40)):
        q, s = ext.quantize_per_token(rows, aq.INT8_DIVISOR)
        q_ref, s_ref = aq.quantize_per_token_int8(rows)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert ext.quantize_per_token(x, aq.INT8_DIVISOR)[0].tolist()[0][:7] == [2, -4, 0, 0, 127, -128, 126]


def test_int8_product_is_exact_at_the_extremes(path):
    """All codes ±128/127 over 4,099 inputs: |Σ| ≈ 2²⁶, beyond float32's exact integers, exact in int32."""
    in_f = 4099
    codes = torch.full((3, in_f), -128, dtype=torch.int8)
    codes[1] = 127
    codes[2, ::2] = 127
    sim = aq.ActQuantLinear(codes, torch.ones(3, 1), None, aq.ActScheme())
    x = torch.full((1, in_f), -127.5)  # s_x = 1, codes −128
    x[0, -1] = -127.0  # one code −127: the sum is odd
    y = Int8ActLinear.from_act_quant(sim)(x).double()
    q = aq.quantize_per_token_int8(x)[0].long()
    exact = (q @ codes.long().t()).double()
    assert exact.abs().max() > 2**25
    assert torch.allclose(y, exact, rtol=1e-7, atol=0)


def test_swap_on_tiny_model_matches_simulation(path):
    model = build_tiny_model("llama")
    ids = random_ids(model.config.vocab_size)
    for block in get_blocks(model):
        aq.simulate_linears(block, aq.ActScheme("int8"))
    simulated = logits_of(model, ids)
    report = swap_act_quant_linears(model)
    blocks = get_blocks(model)
    assert len(report) == 7 * len(blocks) and isinstance(blocks[0].mlp.down_proj, Int8ActLinear)
    assert not any(isinstance(m, aq.ActQuantLinear) for m in model.modules())
    assert all("simulated" not in v for v in report.values())
    out = logits_of(model, ids)
    torch.testing.assert_close(out, simulated, rtol=1e-4, atol=1e-4)


def test_fp8_layers_stay_simulated():
    model = build_tiny_model("llama")
    blocks = get_blocks(model)
    aq.simulate_linears(blocks[0], aq.ActScheme("int8"))
    aq.simulate_linears(blocks[1], aq.ActScheme("fp8"))
    report = swap_act_quant_linears(model)
    assert isinstance(blocks[0].self_attn.q_proj, Int8ActLinear)
    assert isinstance(blocks[1].self_attn.q_proj, aq.ActQuantLinear)
    fp8 = {k: v for k, v in report.items() if k.startswith("model.layers.1.")}
    assert len(fp8) == 7 and all("FP8" in v and "simulated" in v for v in fp8.values())
    with pytest.raises(ValueError, match="int8"):
        Int8ActLinear.from_act_quant(blocks[1].self_attn.q_proj)


def test_bfloat16_input_keeps_its_dtype():
    gen = torch.Generator().manual_seed(3)
    sim = aq.ActQuantLinear.from_weight(torch.randn(24, 40, generator=gen), None, aq.ActScheme())
    x = torch.randn(5, 40, generator=gen).bfloat16()
    y = Int8ActLinear.from_act_quant(sim)(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, sim(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("path_", ["int_mm", "float64"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_asymmetric_activations_equal_the_simulated_layer(monkeypatch, path_, tokens):
    """A zero point per token: the integer product with the zero point taken out equals the simulated layer."""
    if path_ == "float64":
        monkeypatch.setitem(int8act._STATE, "int_mm", False)
    gen = torch.Generator().manual_seed(tokens)
    weight, bias = torch.randn(40, 96, generator=gen), torch.randn(40, generator=gen)
    sim = aq.ActQuantLinear.from_weight(weight, bias, aq.ActScheme("int8", symmetric=False))
    layer = Int8ActLinear.from_act_quant(sim)
    x = torch.randn(tokens, 96, generator=gen) + 3.0  # tokens leaning to one sign: the zero point matters
    q, s, z = aq.quantize_per_token_int8_asym(x)
    exact = ((q.double() - z.double()) @ sim.codes.double().t()) * s.double() * sim.weight_scale.double().t() + bias
    mag = ((q.double() - z.double()).abs() * s.double()) @ (sim.codes.double().abs() * sim.weight_scale.double()).t()
    y = layer(x)
    assert float(((y.double() - exact).abs() / mag).max()) < 1e-6
    assert float(((y - sim(x)).abs() / mag).max()) < 1e-5
    assert "zero point per token" in repr(layer)
