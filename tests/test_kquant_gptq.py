"""GPTQ on llama.cpp's K-quant grids: the grid fixed before the sweep, codes solved on it, bytes that hold them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from lmcompress.algorithms import kquants as K
from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.quant import kquant_grid_of, kquant_spec, rtn_quantize
from lmcompress.errors import UserError

TYPES = list(K.KTYPES)


def correlated_layer(rows: int = 48, cols: int = 512, n: int = 1536, seed: int = 0):
    """A random weight and inputs whose features are mixed (off-diagonal Hessian) and of unequal energy."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=gen) @ mix * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    return w, x, 2 * x.T @ x / n


def output_error(wq: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return (x @ (wq - w).T).square().mean().item()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_same_grid(name, act_order):
    w, x, h = correlated_layer()
    spec = kquant_spec(name)
    result = gptq_quantize(w, h, spec, act_order=act_order)
    q = result.quantized
    rtn = rtn_quantize(w, spec, torch.diag(h))  # the grid GPTQ fixes: same search, same importance
    assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero) and q.g_idx is None
    assert torch.equal(result.weight, q.dequantize())  # what GPTQ solved is what the tensor holds
    assert output_error(result.weight, w, x) < 0.95 * output_error(rtn.dequantize(), w, x)
    grid = kquant_grid_of(q)
    data = K.pack(q.codes, grid)
    codes, back = K.unpack(data, name, w.shape[1])
    assert torch.equal(codes, q.codes) and torch.equal(back.scales, grid.scales) and torch.equal(back.mins, grid.mins)
    assert torch.equal(back.d.view(torch.int16), grid.d.view(torch.int16))
    assert torch.equal(back.dmin.view(torch.int16), grid.dmin.view(torch.int16))
    llama = K.dequantize_bytes(data, name, w.shape[1])
    assert torch.allclose(llama, result.weight, rtol=0, atol=1e-6)  # d₁·q − m₁ against (q − m₁/d₁)·d₁


@pytest.mark.parametrize("name", ["q4_k", "q3_k"])
def test_gptq_with_nothing_to_compensate_is_rtn(name):
    w, _, _ = correlated_layer(rows=16, cols=256)
    result = gptq_quantize(w, torch.eye(256), kquant_spec(name), percdamp=0.0)
    assert torch.equal(result.quantized.codes, rtn_quantize(w, kquant_spec(name), torch.ones(256)).codes)


def test_gptq_refuses_rows_that_are_not_super_blocks():
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj has 576 inputs.*Q5_0"):
        gptq_quantize(torch.randn(8, 576), torch.eye(576), kquant_spec("q4_k"), layer="model.layers.0.self_attn.q_proj")


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory, tokenizer):
    """A tiny llama whose layers read 256 and 512 inputs: whole K-quant super-blocks."""
    from lmcompress.checkpoint.save import save_model
    from lmcompress.models.tiny import build_tiny_model

    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=128, hidden_size=256, intermediate_size=512)
    folder = tmp_path_factory.mktemp("wide") / "model"
    save_model(model, tokenizer, folder, {"kind": "test-model"})
    return folder


def test_cli_gptq_on_q4_k_stores_codes_llama_cpp_reads(wide_folder, tiny_folder, tmp_path, calib_file, capsys):
    out = tmp_path / "q4k"
    argv = ["quantize", str(wide_folder), "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym"]
    calib = ["--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "32", "-q"]
    assert run_cli([*argv, "--grid", "q4_k", "-o", str(out), *calib]) == 0
    assert "q4_k grid" in capsys.readouterr().out
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["quantization"]["grid"] == "q4_k"
    from lmcompress.checkpoint.packed import read_packed

    _, quantized = read_packed(out, recipe)
    assert quantized
    for q in quantized.values():
        grid = kquant_grid_of(q)
        data = K.pack(q.codes, grid)
        assert np.array_equal(K.unpack(data, "q4_k", q.codes.shape[1])[0].numpy(), q.codes.numpy())
        assert torch.allclose(K.dequantize_bytes(data, "q4_k", q.codes.shape[1]), q.dequantize(), rtol=0, atol=1e-6)
    bad = tmp_path / "bad"
    small = ["quantize", str(tiny_folder("llama")), "--method", "rtn", "--bits", "4", "--group-size", "32", "--asym"]
    assert run_cli([*small, "--grid", "q4_k", "-o", str(bad), "-q"]) == 2  # 64 inputs: not a super-block
    assert "Q5_0" in capsys.readouterr().err and not bad.exists()
    assert run_cli(["quantize", str(wide_folder), "--method", "rtn", "--grid", "q4_k", "-o", str(bad), "-q"]) == 2
    assert "--group-size 32 and asymmetric codes (not --sym)" in capsys.readouterr().err and not bad.exists()


def test_gguf_export_writes_the_solved_blocks(wide_folder, tmp_path, calib_file):
    """quantize --grid q4_k → export --format gguf: the file's blocks are the stored codes and integers, and
    transformers' GGUF reader (the gguf package's dequantization) runs the model lmcompress simulated."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from lmcompress.checkpoint.gguf_export import export_gguf
    from lmcompress.checkpoint.load import load
    from lmcompress.checkpoint.packed import read_packed

    out = tmp_path / "q6k"
    argv = ["quantize", str(wide_folder), "--method", "gptq", "--bits", "6", "--group-size", "16", "--grid", "q6_k"]
    calib = ["--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "32", "-q"]
    assert run_cli([*argv, "-o", str(out), *calib]) == 0
    summary = export_gguf(out, tmp_path / "m.gguf")
    assert summary["file_type"] == "Q6_K" and summary["requantized"]["tensors"] == 0
    assert summary["from_codes"]["tensors"] == 14 and summary["from_codes"]["max_rel_error"] == 0.0
    _, quantized = read_packed(out, json.loads((out / "lmcompress.json").read_text()))
    blocks = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    q = quantized["model.layers.1.mlp.down_proj.weight"]
    codes, grid = K.unpack(np.asarray(blocks["blk.1.ffn_down.weight"].data), "q6_k", q.codes.shape[1])
    assert torch.equal(codes, q.codes) and torch.equal(grid.scales, kquant_grid_of(q).scales)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = torch.arange(2, 26).reshape(2, 12)
    with torch.no_grad():
        ours, theirs = load(out)[0](ids).logits, hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-3)  # the embeddings and head as f16
    dense = export_gguf(wide_folder, tmp_path / "d.gguf", qtype="q4_k")  # dense weights re-quantized by our RTN
    assert dense["file_type"] == "Q4_K" and dense["requantized"]["tensors"] == 14
    assert 0 < dense["requantized"]["max_rel_error"] < 0.2


def test_gguf_export_refuses_k_quants_for_narrow_rows(tiny_folder, tmp_path):
    from lmcompress.checkpoint.gguf_export import export_gguf

    with pytest.raises(UserError, match=r"64 inputs, not a multiple of 256.*Q5_1"):
        export_gguf(tiny_folder("llama"), tmp_path / "m.gguf", qtype="q5_k")
    assert not list(tmp_path.iterdir())
