"""GPTQ on the FP8 E4M3 grid (algorithms.gptq_fp8): the grid is round to nearest's, the codes are what the
dequantized weight holds, and the solve lowers the layer's output error where inputs are correlated."""

from __future__ import annotations

import pytest
import torch

from lmcompress.algorithms.actquant import FP8_DTYPE, quantize_weight_fp8
from lmcompress.algorithms.gptq_fp8 import gptq_fp8


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3.0, d)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


def test_a_diagonal_hessian_gives_round_to_nearest():
    """With uncorrelated inputs no error is spread: every code is RTN's on the same per-row scale."""
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    codes, scale = quantize_weight_fp8(w)
    got = gptq_fp8(w, torch.diag(torch.rand(40) + 0.5), percdamp=0.0)
    assert got.fp8.codes.dtype == FP8_DTYPE
    assert torch.equal(got.fp8.codes.float(), codes.float()) and torch.equal(got.fp8.scale, scale)
    assert torch.equal(got.weight, got.fp8.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_of_round_to_nearest(act_order):
    x = _correlated_inputs(512, 64)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    codes, scale = quantize_weight_fp8(w)
    rtn = codes.float() * scale
    got = gptq_fp8(w, _hessian(x), act_order=act_order, blocksize=16)
    assert torch.equal(got.weight, got.fp8.dequantize())  # the codes in natural column order
    assert torch.equal(got.fp8.scale, scale)  # the grid is fixed from the original weights
    err_rtn = ((x @ (w - rtn).t()) ** 2).mean()
    err_gptq = ((x @ (w - got.weight).t()) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_masked_weights_stay_zero_and_dead_inputs_are_zeroed():
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0.0  # an input that never fires
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(16, 32, generator=torch.Generator().manual_seed(4)) < 0.5
    got = gptq_fp8(w, _hessian(x), mask=mask, act_order=True)
    assert (got.weight[mask] == 0).all() and (got.weight[:, 5] == 0).all()


def test_a_hessian_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        gptq_fp8(torch.randn(4, 8), torch.eye(7))
