"""compressed-tensors export of fused routed experts: per-expert packed linears under the checkpoint's names,
loaded back by transformers with the in-memory compressed model's logits; refusals of what cannot be written
(experts left dense beside quantized layers) or computed (GGUF mixes, W8A8 / FP8 schemes, AWQ on experts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import logits_of, random_ids
from conftest import run_cli as run
from transformers import AutoModelForCausalLM

from lmcompress.checkpoint.load import load
from lmcompress.checkpoint.save import save_quantized
from lmcompress.errors import UserError
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.prune import PruneConfig, prune
from lmcompress.transforms.quantize import QuantConfig, quantize
from tests.conftest import tiny_deepseek_v3

pytest.importorskip("compressed_tensors")
from lmcompress.checkpoint.ct_experts import EXPERTS_TARGET
from lmcompress.checkpoint.export import export_compressed_tensors

# (gate, up, down) names of expert e of block 0 in each family's checkpoints
NAMES = {
    "mixtral": (
        "block_sparse_moe.experts.{e}.w1",
        "block_sparse_moe.experts.{e}.w3",
        "block_sparse_moe.experts.{e}.w2",
    ),
    "qwen2_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
}
NAMES["olmoe"] = NAMES["qwen3_moe"] = NAMES["deepseek_v3"] = NAMES["qwen2_moe"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _check_experts_in_file(out: Path, family: str, block: int, q_gate_up, q_down) -> None:
    """Every expert of ``block`` in the file: its packed codes are lmcompress's, and compressed-tensors' own
    decompressor gives back lmcompress's dequantized rows (gate = gate_up rows [:I], up = rows [I:])."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = next(
        g for g in QuantizationConfig.model_validate(config).config_groups.values() if EXPERTS_TARGET in g.targets
    )
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    tensors = _tensors(out)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in tensors)  # no fused tensor written
    i = q_down.codes.shape[1]  # down_proj [E·H, I]
    experts = q_gate_up.codes.shape[0] // (2 * i)  # gate_up_proj [E·2I, H]
    h = q_down.codes.shape[0] // experts
    for e in range(experts):
        gu, dn = q_gate_up.rows(e * 2 * i, (e + 1) * 2 * i), q_down.rows(e * h, (e + 1) * h)
        for name, q in zip(NAMES[family], (gu.rows(0, i), gu.rows(i, 2 * i), dn), strict=True):
            key = f"model.layers.{block}.{name.format(e=e)}"
            state = {p: tensors[f"{key}.{p}"] for p in ("weight_packed", "weight_scale", "weight_shape")}
            assert state["weight_shape"].tolist() == list(q.codes.shape)
            weight = compressor.decompress(state, scheme)["weight"]
            torch.testing.assert_close(weight.float(), q.dequantize(), rtol=0, atol=1e-6)
            codes = unpack_from_int32(state["weight_packed"], q.spec.bits, torch.Size(q.codes.shape))
            assert torch.equal(codes.to(torch.int32) + 2 ** (q.spec.bits - 1), q.codes.to(torch.int32))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3"])
def test_quantized_experts_export_and_reload(family, calib, tokenizer, tmp_path):
    if family == "deepseek_v3":
        model, group = tiny_deepseek_v3(tokenizer.vocab_size), 16  # kv_b_proj reads 16 inputs
    else:
        model, group = build_tiny_model(family, tokenizer.vocab_size), 32
    block = 1 if family == "deepseek_v3" else 0  # DeepSeek's first block is dense
    report = quantize(model, QuantConfig(method="gptq", bits=4, group_size=group), calib, progress=False)
    folder = save_quantized(model, tokenizer, tmp_path / "q", {"kind": "quantize"}, report.quantized)
    summary = export_compressed_tensors(folder, tmp_path / "ct")
    experts = model.model.layers[block].mlp.experts
    n_layers = sum(1 for b in model.model.layers if hasattr(b.mlp, "experts"))
    assert summary["expert_layers"] == 3 * experts.gate_up_proj.shape[0] * n_layers
    assert summary["codes_changed"] == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = [t for g in config["config_groups"].values() for t in g["targets"]]
    assert EXPERTS_TARGET in targets and not any(".experts." in t for t in targets if t != EXPERTS_TARGET)
    prefix = f"model.layers.{block}.mlp.experts"
    codes = report.quantized
    _check_experts_in_file(
        tmp_path / "ct", family, block, codes[f"{prefix}.gate_up_proj"], codes[f"{prefix}.down_proj"]
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    loaded, _ = load(folder)
    ids = random_ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(loaded, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)


def test_sparse_quantized_experts_keep_their_zeros(calib, tokenizer, tmp_path):
    model = build_tiny_model("qwen3_moe", tokenizer.vocab_size)
    report = prune(model, PruneConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=32), calib, progress=False)
    folder = save_quantized(model, tokenizer, tmp_path / "q", {"kind": "prune"}, report.quantized)
    export_compressed_tensors(folder, tmp_path / "ct")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    gu = reloaded.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gu == 0, model.model.layers[1].mlp.experts.gate_up_proj == 0)
    assert (gu == 0).float().mean().item() >= 0.5
    ids = random_ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)


def test_dense_experts_beside_quantized_layers_refused(calib, tokenizer, tmp_path):
    model = build_tiny_model("mixtral", tokenizer.vocab_size)
    report = prune(model, PruneConfig(method="wanda", sparsity=0.5, head_bits=8), calib, progress=False)
    folder = save_quantized(model, tokenizer, tmp_path / "q", {"kind": "prune"}, report.quantized)
    with pytest.raises(UserError, match="fused routed-expert parameters are not quantized"):
        export_compressed_tensors(folder, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cli_export_of_quantized_experts(tiny_folder, calib_file, tmp_path):
    src, out = tiny_folder("mixtral"), tmp_path / "q"
    args = ["quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", str(out)]
    assert run(args) == 0
    assert run(["export", str(out), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    keys = _tensors(tmp_path / "ct")
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight_packed" in keys


CALIB = ["--nsamples", "2", "--seqlen", "32"]  # with --calib-data


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "rtn", "--gguf-mix", "q4_k_m"],
        ["--method", "rtn", "--scheme", "w8a8"],
        ["--method", "rtn", "--scheme", "fp8", "--dynamic"],
        ["--method", "rtn", "--scheme", "fp8", *CALIB],
        ["--method", "rtn", "--bits", "4", "--awq", *CALIB],
        ["--method", "gptq", "--bits", "4", "--smoothquant", "0.5", *CALIB],
    ],
)
def test_options_that_do_not_cover_experts_refused(extra, tiny_folder, calib_file, tmp_path, capsys):
    """Each either names the experts (GGUF mixes, the W8A8 / FP8 schemes) or says that scales cannot be folded
    into a mixture-of-experts block (AWQ, SmoothQuant); nothing is written."""
    out = tmp_path / "q"
    cal = ["--calib-data", str(calib_file)] if "--nsamples" in extra else []
    assert run(["quantize", str(tiny_folder("mixtral")), *extra, *cal, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fused routed experts" in err or "mixture-of-experts" in err, err
    assert not out.exists()


def test_experts_on_different_grids_refused():
    """transformers reads every expert of a checkpoint through one config group: a mixed-precision allocation
    that gives experts different grids cannot be written so that it loads back."""
    from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
    from lmcompress.checkpoint.export import _check_fused

    w = torch.randn(16, 64)
    names = ["m.layers.0.mlp.experts.gate_up_proj", "m.layers.0.mlp.experts.down_proj"]
    same = {n: rtn_quantize(w, QuantSpec(4, 32, True)) for n in names}
    _check_fused(same, names)
    mixed = {names[0]: same[names[0]], names[1]: rtn_quantize(w, QuantSpec(3, 32, True))}
    with pytest.raises(UserError, match="2 different grids"):
        _check_fused(mixed, names)
    with pytest.raises(UserError, match="1 of the 2 fused routed-expert parameters are not quantized"):
        _check_fused({names[0]: same[names[0]]}, names)
