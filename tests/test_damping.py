"""Dampening of the GPTQ / SparseGPT Hessian: the ``auto`` rule and the ``--percdamp`` option."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli as run

from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.obs import AUTO_FEW_TOKENS, BASE_DAMP, damping_fraction, damping_raised
from lmcompress.algorithms.quant import QuantSpec
from lmcompress.algorithms.sparsegpt import sparsegpt_prune
from lmcompress.errors import UserError
from lmcompress.job_options import check_percdamp
from lmcompress.transforms.prune import PruneConfig
from lmcompress.transforms.quantize import QuantConfig


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


# ------------------------------------------------------------------------------------------------- the rule


def test_auto_is_the_standard_dampening_when_the_tokens_cover_the_inputs():
    assert damping_fraction("auto", 1536, 8192) == BASE_DAMP == damping_fraction("auto", 1536, 1536)
    assert damping_fraction("auto", 1536) == BASE_DAMP  # token count unknown: the standard value


def test_auto_rises_when_the_hessian_is_rank_deficient():
    assert damping_fraction("auto", 8960, 4096) == AUTO_FEW_TOKENS > BASE_DAMP


def test_a_number_is_used_as_given():
    assert damping_fraction(0.01, 8960, 4096) == 0.01 and damping_fraction("0.2", 64, 4096) == 0.2
    assert damping_raised(0.1, 0.01) and not damping_raised(0.01, 0.01)
    assert damping_raised(AUTO_FEW_TOKENS, "auto") and not damping_raised(BASE_DAMP, "auto")


def test_auto_through_a_whole_job_dampens_only_the_layers_with_more_inputs_than_tokens(tiny_folder, calib):
    from lmcompress.checkpoint.load import load_model
    from lmcompress.transforms.quantize import quantize

    model, _ = load_model(str(tiny_folder("llama")))
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m.in_features < 1000}
    tokens = calib.shape[1]  # one window: as many tokens as the narrow layers' inputs, fewer than the wide ones'
    assert min(widths) <= tokens < max(widths), (widths, tokens)
    report = quantize(model, QuantConfig(bits=4, group_size=32, percdamp="auto"), calib[:1], progress=False)
    wide = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features > tokens}
    assert report.damping and set(report.damping) <= wide | {n.replace(".weight", "") for n in wide}
    assert all(v == AUTO_FEW_TOKENS for v in report.damping.values())


def test_the_solvers_report_the_fraction_they_used():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))  # 64 tokens < 256 inputs
    h, p = hessian(x), damping_fraction("auto", 256, 64)
    res = gptq_quantize(w, h.clone(), QuantSpec(3, 64), percdamp=p)
    assert res.damping == AUTO_FEW_TOKENS and sparsegpt_prune(w, h.clone(), 0.5, percdamp=p).damping == res.damping


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
