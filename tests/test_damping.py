"""Dampening of the GPTQ / SparseGPT Hessian: the ``auto`` rule and the ``--percdamp`` option."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli as run

from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.obs import BASE_DAMP, damping_fraction, damping_raised
from lmcompress.algorithms.quant import QuantSpec
from lmcompress.algorithms.sparsegpt import sparsegpt_prune
from lmcompress.errors import UserError
from lmcompress.job_options import check_percdamp
from lmcompress.transforms.prune import PruneConfig
from lmcompress.transforms.quantize import QuantConfig


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


def ordinary(n: int = 256, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs of an ordinary layer: channels of unequal scale (0.3 to 3), no token or direction dominating."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.5, n)[torch.randperm(n, generator=g)]
    return torch.randn(tokens, n, generator=g) * scales


def with_sink(x: torch.Tensor, size: float, every: int = 256, seed: int = 1) -> torch.Tensor:
    """``x`` with a massive activation: one token in every ``every`` carries ``size`` × a fixed direction spread over
    all channels (as Qwen's sink token feeds a ``down_proj``)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(x.shape[1], generator=g)
    x = x.clone()
    x[::every] += size * direction / direction.norm() * x.shape[1] ** 0.5
    return x


def with_channel(x: torch.Tensor, size: float, channel: int = 7) -> torch.Tensor:
    """``x`` with one input channel ``size`` times larger on every token (an outlier channel, not a sink)."""
    x = x.clone()
    x[:, channel] *= size
    return x


# ------------------------------------------------------------------------------------------------- the rule


def test_auto_is_the_standard_dampening_on_ordinary_layers():
    for seed in range(3):
        assert damping_fraction("auto", hessian(ordinary(seed=seed))) == BASE_DAMP
    assert damping_fraction("auto", torch.eye(64)) == BASE_DAMP


def test_auto_leaves_an_outlier_channel_alone():
    # one channel 30x larger holds most of the trace, but it is one input: the standard dampening serves it
    assert damping_fraction("auto", hessian(with_channel(ordinary(), 30.0))) == BASE_DAMP


def test_auto_rises_with_a_massive_activation_spread_over_the_inputs():
    x = ordinary()
    small, large = (damping_fraction("auto", hessian(with_sink(x, s))) for s in (30.0, 300.0))
    assert BASE_DAMP < small < large <= 0.5


def test_a_number_is_used_as_given():
    h = hessian(with_sink(ordinary(), 300.0))
    assert damping_fraction(0.01, h) == 0.01 and damping_fraction("0.2", h) == 0.2
    assert damping_raised(0.1, 0.01) and not damping_raised(0.01, 0.01)
    assert damping_raised(0.02, "auto") and not damping_raised(BASE_DAMP, "auto")


def test_the_solvers_take_auto_and_report_the_fraction_they_used():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    flat = hessian(ordinary())
    spec = QuantSpec(3, 64)
    same = gptq_quantize(w, flat.clone(), spec, percdamp="auto"), gptq_quantize(w, flat.clone(), spec, percdamp=0.01)
    assert same[0].damping == 0.01 and torch.equal(same[0].weight, same[1].weight)
    sink = hessian(with_sink(ordinary(), 300.0))
    res = gptq_quantize(w, sink.clone(), spec, percdamp="auto")
    assert res.damping == pytest.approx(damping_fraction("auto", sink)) and res.damping > BASE_DAMP
    assert sparsegpt_prune(w, sink.clone(), 0.5, percdamp="auto").damping == res.damping


# ----------------------------------------------------------------------------------------------- the option


@pytest.mark.parametrize("text,value", [("auto", "auto"), (" AUTO ", "auto"), ("0.1", 0.1), (0.05, 0.05), (0, 0.0)])
def test_percdamp_accepts_numbers_and_auto(text, value):
    assert check_percdamp(text) == value
    assert QuantConfig(percdamp=text).percdamp == value
    assert PruneConfig(method="sparsegpt", percdamp=text).percdamp == value


@pytest.mark.parametrize("bad", ["automatic", "", "nan", "1", 1.5, -0.01, True, None])
def test_percdamp_refuses_anything_else(bad):
    with pytest.raises(UserError) as info:
        QuantConfig(percdamp=bad)
    assert info.value.param == "percdamp" and "auto" in str(info.value)


def test_cli_takes_percdamp_auto_and_refuses_garbage(tmp_path, tiny_folder, calib_file, capsys):
    src = str(tiny_folder("llama"))
    calib = ["--calib-data", str(calib_file), "--nsamples", "2", "--seqlen", "32", "-q"]
    out = tmp_path / "q"
    assert run(["quantize", src, "--method", "gptq", "--bits", "4", "--group-size", "32", "--percdamp", "auto",
                *calib, "-o", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "lmcompress.json").read_text())["quantization"]["percdamp"] == "auto"
    for verb in (["quantize", src, "--method", "gptq"], ["prune", src, "--method", "sparsegpt"]):
        assert run([*verb, "--percdamp", "lots", *calib, "-o", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert "--percdamp" in err and "auto" in err, err
        assert not (tmp_path / "never").exists()
