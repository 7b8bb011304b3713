"""``--head-bits N``: ``prune`` quantizes the output head without pruning it (saved packed, loaded and run by the
kernels like ``quantize``'s head); ``quantize --head-bits N`` implies ``--include-head``."""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress import load
from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.checkpoint.folder import RECIPE_FILE
from lmcompress.errors import UserError
from lmcompress.transforms.prune import PruneConfig
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tokenizer):
    """A tiny LLaMA whose head is its own tensor (so that its values are the head's alone)."""
    from lmcompress.checkpoint.save import save_model
    from lmcompress.models.tiny import build_tiny_model

    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("untied") / "model"
    save_model(model, tokenizer, folder, {"kind": "test-model"})
    return folder, model.lm_head.weight.detach().clone()


def _calib(calib_file) -> list[str]:
    return ["--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "64"]


def _distinct_per_row(weight: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in weight)


def test_prune_magnitude_head_bits_rounds_the_head_and_keeps_it_whole(untied, tmp_path):
    src, head = untied
    out = tmp_path / "p"
    argv = ["prune", str(src), "-o", str(out), "--method", "magnitude", "--sparsity", "0.5", "--head-bits", "8", "-q"]
    assert run_cli(argv) == 0
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["storage"] == "packed" and recipe["head_quantization"]["method"] == "rtn"
    assert recipe["head_bits"] == 8 and not recipe["include_head"] and "mask_sparsity" not in recipe
    assert "lm_head" not in recipe["layer_sparsity"]
    model, _ = load(out)
    expected = rtn_quantize(head, QuantSpec(8, -1)).dequantize()
    assert torch.equal(model.lm_head.weight.detach(), expected)  # rounded to nearest on the 8-bit grid, not pruned
    assert float((model.lm_head.weight == 0).float().mean()) < 0.05
    down = model.model.layers[0].mlp.down_proj.weight
    assert abs(float((down == 0).float().mean()) - 0.5) < 0.01  # the blocks are pruned as asked


def test_prune_wanda_head_bits_solves_the_head_by_gptq_and_runs_on_a_kernel(untied, tmp_path, calib_file):
    from lmcompress.kernels import Int8Linear, kernel_report

    src, head = untied
    out = tmp_path / "p"
    argv = ["prune", str(src), "-o", str(out), "--method", "wanda", "--head-bits", "4", "--head-group-size", "16"]
    assert run_cli([*argv, *_calib(calib_file), "-q"]) == 0
    recipe = json.loads((out / RECIPE_FILE).read_text())
    quant = recipe["head_quantization"]
    assert quant["method"] == "gptq" and quant["bits"] == 4 and quant["group_size"] == 16 and quant["loss"] > 0
    model, _ = load(out)
    got = model.lm_head.weight.detach()
    assert _distinct_per_row(got) <= 16 * (got.shape[1] // 16)  # 4-bit codes, one grid per 16 inputs
    assert not torch.equal(got, rtn_quantize(head, QuantSpec(4, 16)).dequantize())  # GPTQ moved some weights
    rel = float((got - head).norm() / head.norm())
    assert rel < 0.5
    out8 = tmp_path / "p8"
    argv = ["prune", str(src), "-o", str(out8), "--method", "wanda", "--head-bits", "8", *_calib(calib_file), "-q"]
    assert run_cli(argv) == 0
    fast, _ = load(out8, kernels="aten")
    assert isinstance(fast.lm_head, Int8Linear) and "lm_head" in kernel_report(fast).swapped


def test_prune_joint_bits_and_head_bits(untied, tmp_path, calib_file, capsys):
    src, _ = untied
    common = ["--method", "sparsegpt", "--sparsity", "0.5", "--bits", "4", "--group-size", "32", "--head-bits", "8"]
    out = tmp_path / "j"
    assert run_cli(["prune", str(src), "-o", str(out), *common, *_calib(calib_file), "-q"]) == 0
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["mask_sparsity"] > 0.49 and recipe["head_quantization"]["method"] == "gptq"
    model, _ = load(out)
    assert _distinct_per_row(model.lm_head.weight) <= 256
    assert _distinct_per_row(model.model.layers[0].mlp.down_proj.weight) <= 16 * 4 + 1  # 4-bit codes, 32-wide groups
    capsys.readouterr()  # a streamed model's head is never loaded: refused before any work
    code = run_cli(["prune", str(src), "-o", str(tmp_path / "d"), *common, "--offload", "disk", *_calib(calib_file)])
    assert code == 2 and "head_bits" in capsys.readouterr().err.replace("--head-bits", "head_bits")
    assert not (tmp_path / "d").exists()


def test_prune_head_bits_conflicts_are_refused(tiny_folder, tmp_path, capsys):
    src = str(tiny_folder("llama"))
    base = ["prune", src, "--method", "magnitude", "-q"]
    cases = [
        (["--head-bits", "8", "--include-head"], "--head-bits quantizes the output head without pruning it"),
        (["--head-group-size", "32"], "--head-group-size does not apply without --head-bits"),
        (["--head-bits", "8", "--save-format", "dense"], "--save-format does not apply with --head-bits"),
        (["--head-bits", "9"], "--head-bits must be an integer from 2 to 8"),
        (["--head-bits", "8", "--head-group-size", "0"], "--head-group-size must be a positive number"),
    ]
    for k, (extra, message) in enumerate(cases):
        out = tmp_path / f"x{k}"
        code = run_cli([*base, *extra, "-o", str(out)])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and message in err, (extra, err)
        assert not out.exists()
    with pytest.raises(UserError, match="give head_bits instead of include_head"):
        PruneConfig(method="sparsegpt", bits=4, include_head=True)


def test_quantize_head_bits_implies_include_head(untied, tmp_path, capsys):
    src, head = untied
    base = ["quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "-q"]
    assert run_cli([*base, "--head-bits", "4", "-o", str(tmp_path / "a")]) == 0
    recipe = json.loads((tmp_path / "a" / RECIPE_FILE).read_text())["quantization"]
    assert recipe["include_head"] and recipe["head_bits"] == 4
    model, _ = load(tmp_path / "a")
    assert torch.equal(model.lm_head.weight.detach(), rtn_quantize(head, QuantSpec(4, -1)).dequantize())
    assert run_cli([*base, "--include-head", "-o", str(tmp_path / "b")]) == 0  # the 8-bit spelling still works
    recipe = json.loads((tmp_path / "b" / RECIPE_FILE).read_text())["quantization"]
    assert recipe["include_head"] and recipe["head_bits"] == 8
    capsys.readouterr()
    code = run_cli([*base, "--head-bits", "4", "--gguf-mix", "q4_k_m", "-o", str(tmp_path / "c")])
    assert code == 2 and "--head-bits" in capsys.readouterr().err and not (tmp_path / "c").exists()
