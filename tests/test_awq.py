"""AWQ: scales, the exponent search against plain RTN, and folds that leave the dense function unchanged."""

from __future__ import annotations

import pytest
import torch

from lmcompress.algorithms.awq import awq_scales, awq_search, effective_weight, group_output_error, rtn_quantizer
from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.errors import UserError
from lmcompress.models.smoothing import awq, model_groups, recorded_inputs
from lmcompress.models.tiny import build_tiny_model
from tests.conftest import logits_of, random_ids
from tests.test_smoothquant import perturbed

SPEC = QuantSpec(bits=4, group_size=128, sym=False)


def outlier_layer(seed: int = 0, outliers: int = 4, n: int = 512):
    """Inputs where a few channels are ~30× larger than the rest, and a weight of 64 rows × 256 inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 256, generator=gen)
    big = torch.randperm(256, generator=gen)[:outliers]
    x[:, big] *= 30
    return x, torch.randn(64, 256, generator=gen) * 0.05


def rtn_error(x: torch.Tensor, w: torch.Tensor) -> float:
    """Output error of plain RTN, computed directly (not through the AWQ code)."""
    return float((x @ (rtn_quantize(w, SPEC).dequantize() - w).t()).pow(2).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_beats_rtn_on_a_layer_with_large_input_channels(seed):
    x, w = outlier_layer(seed)
    result = awq_search(x, [w], rtn_quantizer(SPEC), grid=11)
    plain = rtn_error(x, w)
    assert result.losses[0.0] == pytest.approx(plain, rel=1e-5)  # exponent 0 is plain RTN
    assert result.exponent > 0
    awq_error = group_output_error(x, [w], result.scales, rtn_quantizer(SPEC))
    assert awq_error == pytest.approx(result.losses[result.exponent], rel=1e-5)
    assert awq_error < 0.7 * plain, (awq_error, plain)


def test_scales_are_normalized_powers_of_the_mean_input():
    mean = torch.tensor([0.5, 2.0, 8.0, 1.0])
    s = awq_scales(mean, 0.5)
    torch.testing.assert_close(s / s[0], (mean / mean[0]).sqrt())
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert torch.equal(awq_scales(mean, 0.0), torch.ones(4))
    with pytest.raises(UserError, match="exponent must be in"):
        awq_scales(mean, 1.2)


def test_effective_weight_is_exact_without_quantization():
    x, w = outlier_layer()
    s = awq_scales(x.abs().mean(0), 0.7)
    torch.testing.assert_close(effective_weight(w, s, lambda v: v), w)
    q = effective_weight(w, s, rtn_quantizer(SPEC))
    folded = rtn_quantize(w * s, SPEC).dequantize()  # what the folded layer holds
    torch.testing.assert_close((x / s) @ folded.t(), x @ q.t(), rtol=1e-4, atol=1e-4)


def test_a_custom_loss_decides():
    x, w = outlier_layer()
    result = awq_search(x, [w], rtn_quantizer(SPEC), grid=[0.0, 0.5, 1.0], loss=lambda s: float(s.max()))
    assert result.exponent == 0.0 and set(result.losses) == {0.0, 0.5, 1.0}


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_awq_fold_leaves_the_dense_function_unchanged(family):
    model = perturbed(build_tiny_model(family, num_key_value_heads=4) if family == "phi3" else build_tiny_model(family))
    ids = random_ids(model.config.vocab_size)
    dense = logits_of(model, ids)
    groups = model_groups(model)
    with recorded_inputs(groups, keep_tokens=32) as stats:
        logits_of(model, ids)
    assert all(s.samples.shape == (32, s.absmax.numel()) for s in stats.values())
    results = awq(groups, stats, rtn_quantizer(QuantSpec(bits=3, group_size=32)), grid=6)
    assert any(r.exponent > 0 for r in results.values())  # some group was really rescaled
    torch.testing.assert_close(logits_of(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_awq_needs_kept_inputs():
    model = build_tiny_model("llama")
    groups = model_groups(model)
    with recorded_inputs(groups) as stats:
        logits_of(model, random_ids(model.config.vocab_size))
    with pytest.raises(ValueError, match="keep_tokens"):
        awq(groups, stats, rtn_quantizer(SPEC))
