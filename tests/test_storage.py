"""Packed model folders: exact reload for every family, sizes as `info` reports, damage detected, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import logits_of as _logits
from conftest import random_ids as _ids
from conftest import run_cli as _cli
from safetensors.torch import load_file, save_file

import lmcompress
from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.checkpoint.inspect import folder_info
from lmcompress.checkpoint.load import load, load_model
from lmcompress.checkpoint.packed import PACKED_FILE, read_packed, save_packed
from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.models.families import find_prunable, get_blocks, set_weight_matrix, weight_matrix
from lmcompress.models.tiny import TINY_CONFIGS, build_tiny_model
from lmcompress.transforms.prune import PruneConfig

FAMILIES = sorted(TINY_CONFIGS)


def _pruned(family: str, tokenizer, pattern: str = "unstructured"):
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    lmcompress.prune(model, PruneConfig(method="magnitude", sparsity=0.5, pattern=pattern), progress=False)
    return model


def _quantize_blocks(model, spec: QuantSpec) -> dict:
    """RTN every block linear layer in place; the QuantizedTensor of each weight, by parameter name."""
    quantized = {}
    for i, block in enumerate(get_blocks(model)):
        for module in find_prunable(block).values():
            q = rtn_quantize(weight_matrix(module).float(), spec)
            set_weight_matrix(module, q.dequantize())
            param = next(n for n, p in model.named_parameters() if p is module.weight)
            quantized[param] = q
            assert f".{i}." in param
    return quantized


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_reloads_with_identical_logits(family, tokenizer, tmp_path):
    model = _pruned(family, tokenizer)
    out = save_packed(model, tokenizer, tmp_path / "packed", {"kind": "prune"})
    loaded, tok = load(out)
    ids = _ids(tokenizer.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert tok.vocab_size == tokenizer.vocab_size
    info = folder_info(out)
    assert info["linear"]["sparsity"] >= 0.49
    assert info["linear"]["bits_per_weight"] < 0.6 * 32  # bitmask + half the values, not dense fp32
    model_io, _ = load_model(out)  # io.load_model (used by `eval`) goes through the same loader
    assert torch.equal(_logits(model_io, ids), _logits(model, ids))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pruned_model_uses_nm_layout(pattern, tokenizer, tmp_path):
    model = _pruned("llama", tokenizer, pattern)
    out = save_packed(model, tokenizer, tmp_path / "nm", {"kind": "prune"}, dtype=torch.float16)
    index = json.loads((out / "lmcompress.json").read_text())["packed"]["tensors"]
    layouts = {e["layout"] for n, e in index.items() if n.endswith("proj.weight")}
    assert layouts == {"nm"}
    loaded, _ = load(out, dtype="float16")
    expected = {k: v.half() for k, v in model.state_dict().items()}
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # 2:4 in fp16: 8 bits of value + 0.75 bit of index per weight; 4:8: 8 + 7/8
    expected = 8.75 if pattern == "2:4" else 8.875
    assert folder_info(out)["linear"]["bits_per_weight"] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored transposed
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (3, -1, False), (8, 64, True), (2, 16, False)])
def test_quantized_weights_saved_and_loaded_exactly(family, bits, group_size, sym, tokenizer, tmp_path):
    model = _pruned(family, tokenizer, "2:4")
    quantized = _quantize_blocks(model, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    out = save_packed(model, tokenizer, tmp_path / "q", {"kind": "quantize"}, quantized=quantized)
    _, back = read_packed(out)
    assert set(back) == set(quantized)
    for name, q in quantized.items():
        b = back[name]
        assert b.spec == q.spec and torch.equal(b.codes, q.codes)
        assert torch.equal(b.scale, q.scale) and torch.equal(b.zero, q.zero)
    loaded, _ = load(out)
    ids = _ids(tokenizer.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    info = folder_info(out)
    assert info["by_kind"]["codes"] > 0 and info["by_kind"]["values"] == 0
    width = 64 if group_size == -1 else group_size  # tiny models: 64 or 128 inputs per row
    assert info["linear"]["bits_per_weight"] <= bits + (32 + bits) / width  # never more than dense codes + grid


def test_quantized_that_does_not_match_the_weight_is_refused(tokenizer, tmp_path):
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256)
    name = "model.layers.0.mlp.up_proj.weight"
    q = rtn_quantize(model.get_parameter(name).detach(), QuantSpec(bits=2, group_size=32))
    with pytest.raises(ValueError, match="does not match"):  # the weight was never set to q's values
        save_packed(model, tokenizer, tmp_path / "bad", {}, quantized={name: q})
    assert not (tmp_path / "bad").exists()


def test_size_on_disk_is_what_info_reports(tokenizer, tmp_path):
    model = _pruned("llama", tokenizer)
    quantized = _quantize_blocks(model, QuantSpec(bits=4, group_size=32))
    out = save_packed(model, tokenizer, tmp_path / "q", {"kind": "quantize"}, quantized=quantized)
    info = folder_info(out)
    assert info["weights_bytes"] == (out / PACKED_FILE).stat().st_size
    assert sum(info["by_kind"].values()) == info["weights_bytes"]
    assert info["total_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    dense = save_model(model, tokenizer, tmp_path / "dense", {"kind": "x"})
    dense_info = folder_info(dense)
    assert dense_info["weights_bytes"] == (dense / "model.safetensors").stat().st_size
    assert sum(dense_info["by_kind"].values()) == dense_info["weights_bytes"]
    assert dense_info["linear"]["bits_per_weight"] == 32
    assert info["weights_bytes"] < 0.5 * dense_info["weights_bytes"]


@pytest.fixture
def packed_folder(tokenizer, tmp_path):
    model = _pruned("llama", tokenizer)
    return save_packed(model, tokenizer, tmp_path / "packed", {"kind": "prune"})


def _flip_byte(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset", [1, 1000, 60000])
def test_flipped_byte_is_detected(packed_folder, offset):
    _flip_byte(packed_folder / PACKED_FILE, offset)
    with pytest.raises(UserError, match=r"checksum mismatch|corrupted|damaged"):
        load(packed_folder)


def test_truncated_file_is_detected(packed_folder):
    path = packed_folder / PACKED_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupted"):
        load(packed_folder)


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_info_refuses_a_weights_file_of_the_wrong_length(packed_folder, tiny_folder, tmp_path, change):
    """`info` reads only headers, but never reports sizes of a file that is shorter or longer than they say."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_folder("llama"), plain)
    for path in (packed_folder / PACKED_FILE, plain / "model.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[:-100] if change == "truncate" else data + bytes(16))
    for folder in (packed_folder, plain):
        with pytest.raises(UserError, match="truncated or corrupted"):
            folder_info(folder)
        assert _cli(["info", str(folder)]) == 2
    with pytest.raises(UserError, match="truncated or corrupted"):
        load(packed_folder)


def test_corrupted_header_is_detected(packed_folder):
    path = packed_folder / PACKED_FILE
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="truncated or corrupted"):
        load(packed_folder)


def test_missing_tensor_is_detected(packed_folder):
    path = packed_folder / PACKED_FILE
    tensors = load_file(path)
    victim = next(k for k in tensors if k.endswith(".packed_mask"))
    del tensors[victim]
    save_file(tensors, path)
    with pytest.raises(UserError, match="missing tensors"):
        load(packed_folder)


def test_missing_weights_file_is_detected(packed_folder):
    (packed_folder / PACKED_FILE).unlink()
    with pytest.raises(UserError, match="missing"):
        load(packed_folder)


def test_index_that_does_not_match_the_file_is_detected(packed_folder):
    recipe_path = packed_folder / "lmcompress.json"
    recipe = json.loads(recipe_path.read_text())
    entry = recipe["packed"]["tensors"]["model.layers.0.mlp.up_proj.weight"]
    entry["parts"]["values"]["shape"] = [entry["parts"]["values"]["shape"][0] - 1]
    recipe_path.write_text(json.dumps(recipe))
    with pytest.raises(UserError, match="index says"):
        load(packed_folder)
    entry["parts"]["values"]["shape"] = [entry["parts"]["values"]["shape"][0] + 1]
    entry["shape"] = [entry["shape"][1], entry["shape"][0]]  # consistent parts, wrong logical shape
    recipe_path.write_text(json.dumps(recipe))
    with pytest.raises(UserError, match=r"cannot be rebuilt|do not fit"):
        load(packed_folder)


def test_damaged_recipe_is_detected(packed_folder):
    path = packed_folder / "lmcompress.json"
    path.write_text(path.read_text()[:-200])
    with pytest.raises(UserError, match="not valid JSON"):
        load(packed_folder)


def test_plain_from_pretrained_refuses_a_packed_folder(packed_folder):
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(packed_folder)


def test_cli_prune_packed_info_unpack_eval(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    packed, dense = tmp_path / "packed", tmp_path / "dense"
    common = ["--method", "magnitude", "--sparsity", "0.5", "--quiet"]
    assert _cli(["prune", str(src), "-o", str(packed), "--save-format", "packed", *common]) == 0
    assert _cli(["prune", str(src), "-o", str(dense), *common]) == 0  # the default stays a plain folder
    capsys.readouterr()
    assert _cli(["info", str(packed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["storage"] == "packed" and info["linear"]["sparsity"] >= 0.49
    assert info["weights_bytes"] == (packed / PACKED_FILE).stat().st_size
    assert _cli(["info", str(dense)]) == 0
    assert "dense storage" in capsys.readouterr().out
    unpacked = tmp_path / "unpacked"
    assert _cli(["unpack", str(packed), "-o", str(unpacked)]) == 0
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(dense)
    again = AutoModelForCausalLM.from_pretrained(unpacked)
    ids = _ids(plain.config.vocab_size)
    assert torch.equal(_logits(again, ids), _logits(plain, ids))
    assert torch.equal(_logits(load(packed)[0], ids), _logits(plain, ids))
    capsys.readouterr()
    assert (
        _cli(["eval", str(packed), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "--json", "--quiet"]) == 0
    )
    packed_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert (
        _cli(["eval", str(dense), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "--json", "--quiet"]) == 0
    )
    assert packed_ppl == pytest.approx(json.loads(capsys.readouterr().out)["perplexity"], rel=1e-6)


def test_cli_quantize_act_order_unpack_from_pretrained(tiny_folder, tmp_path, capsys):
    """The documented path from a packed quantized folder to plain transformers: `lmcompress unpack`."""
    from transformers import AutoModelForCausalLM

    src, packed, unpacked = tiny_folder("llama"), tmp_path / "q", tmp_path / "plain"
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    argv = ["quantize", str(src), "--method", "gptq", "--bits", "3", "--group-size", "32", "--act-order"]
    argv += ["--calib-data", str(calib), "--nsamples", "4", "--seqlen", "32", "-o", str(packed), "--quiet"]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    index = json.loads((packed / "lmcompress.json").read_text())["packed"]["tensors"]
    assert any("g_idx" in e.get("parts", {}) for e in index.values())  # act-order group indices are stored
    info = folder_info(packed)
    # the bits per weight the CLI announces are what the (dense-layout) files really take
    assert info["linear"]["layouts"] == {"dense int3 g32": 14}
    assert f"~{info['linear']['bits_per_weight']:.2f} bits/weight" in printed
    assert _cli(["unpack", str(packed), "-o", str(unpacked)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(unpacked)
    ids = _ids(plain.config.vocab_size)
    assert torch.equal(_logits(plain, ids), _logits(load(packed)[0], ids))
    assert (unpacked / "model.safetensors").stat().st_size > 2 * (packed / PACKED_FILE).stat().st_size  # dense again


def test_bad_save_format_and_unpack_of_a_plain_folder(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    status = _cli(["prune", str(src), "-o", str(tmp_path / "x"), "--method", "magnitude", "--save-format", "zip"])
    assert status == 2 and not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="not a packed"):
        from lmcompress.checkpoint.save import unpack_folder

        unpack_folder(src, tmp_path / "y")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert folder_info(copy)["storage"] == "dense"


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(8, -1, True), QuantSpec(3, 64, True)])
def test_export_compressed_tensors_round_trip(spec, tokenizer, tmp_path):
    pytest.importorskip("compressed_tensors", reason='compressed-tensors not installed (pip install -e ".[export]")')
    from transformers import AutoModelForCausalLM

    from lmcompress.checkpoint.export import export_compressed_tensors

    model = _pruned("llama", tokenizer, "2:4")
    quantized = _quantize_blocks(model, spec)
    packed = save_packed(model, tokenizer, tmp_path / "q", {"kind": "quantize"}, quantized=quantized)
    summary = export_compressed_tensors(packed, tmp_path / "ct")
    assert summary["codes_changed"] == 0 and summary["quantized_layers"] == len(quantized)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    ids = _ids(tokenizer.vocab_size)
    expected = _logits(load(packed)[0], ids)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # transformers' compressed-tensors integration
    torch.testing.assert_close(_logits(hf, ids), expected, rtol=1e-5, atol=1e-5)
    again, _ = load(tmp_path / "ct")  # and lmcompress.load, through the plain path
    torch.testing.assert_close(_logits(again, ids), expected, rtol=1e-5, atol=1e-5)
    info = folder_info(tmp_path / "ct")  # info reads compressed-tensors folders too
    assert info["by_kind"]["codes"] > 0 and sum(info["by_kind"].values()) == info["weights_bytes"]
    assert info["linear"]["params"] == folder_info(packed)["linear"]["params"]


def test_export_refuses_what_compressed_tensors_cannot_store(tokenizer, tmp_path):
    pytest.importorskip("compressed_tensors", reason='compressed-tensors not installed (pip install -e ".[export]")')
    from lmcompress.checkpoint.export import export_compressed_tensors

    sparse = save_packed(_pruned("llama", tokenizer), tokenizer, tmp_path / "sparse", {"kind": "prune"})
    with pytest.raises(UserError, match="no sparse formats"):
        export_compressed_tensors(sparse, tmp_path / "out")
    gpt2 = _pruned("gpt2", tokenizer)
    quantized = _quantize_blocks(gpt2, QuantSpec(4, 32, True))
    packed = save_packed(gpt2, tokenizer, tmp_path / "gpt2", {"kind": "quantize"}, quantized=quantized)
    with pytest.raises(UserError, match="Conv1D"):
        export_compressed_tensors(packed, tmp_path / "out")
    llama = _pruned("llama", tokenizer)
    asym = _quantize_blocks(llama, QuantSpec(4, 32, False))
    packed_asym = save_packed(llama, tokenizer, tmp_path / "asym", {"kind": "quantize"}, quantized=asym)
    with pytest.raises(UserError, match="asymmetrically"):
        export_compressed_tensors(packed_asym, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _cli(["export", str(packed), "--format", "onnx", "-o", str(tmp_path / "out")]) == 2


def test_tied_output_head_quantized_once(tokenizer, tmp_path):
    model = build_tiny_model("gpt2", tokenizer.vocab_size, max_positions=256)  # lm_head tied to wte
    assert model.lm_head.weight is model.transformer.wte.weight
    q = rtn_quantize(model.lm_head.weight.detach(), QuantSpec(bits=8, group_size=-1))
    model.lm_head.weight.data.copy_(q.dequantize())
    out = save_packed(model, tokenizer, tmp_path / "tied", {"kind": "quantize"}, quantized={"lm_head.weight": q})
    index = json.loads((out / "lmcompress.json").read_text())["packed"]["tensors"]
    assert index["lm_head.weight"]["kind"] == "quantized"
    assert index["transformer.wte.weight"] == {"layout": "alias", "of": "lm_head.weight"}
    loaded, _ = load(out)
    ids = _ids(tokenizer.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    head = 320 * 64 + 320 * 4  # int8 codes + one fp32 scale per row (symmetric: no zero points)
    assert folder_info(out)["by_kind"]["embeddings"] == head + model.transformer.wpe.weight.numel() * 4
