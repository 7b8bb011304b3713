"""llama.cpp's quantization mixes: the type table (hand-checked against llama-quantize's choices), the 32-weight
block grids a mix falls back to (bytes equal to gguf's reference quantizer, codes read back identical), and
quantize --gguf-mix → export --type MIX written from the codes, every tensor on its mix type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from transformers import LlamaConfig, Qwen2Config

from lmcompress.algorithms import kquants as K
from lmcompress.algorithms.quant import LEGACY, QuantizedTensor, QuantSpec, kquant_grid_of, kquant_spec, rtn_quantize
from lmcompress.errors import UserError
from lmcompress.models.gguf_mixes import MIXES, check_mix, mix_table, more_bits, tensor_type, type_spec
from lmcompress.transforms.quantize import QuantConfig, nominal_bits_per_weight

gguf = pytest.importorskip("gguf")

SMOLLM2 = LlamaConfig(  # SmolLM2-135M's shapes
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip
QWEN = Qwen2Config(  # Qwen2.5-Coder-1.5B's shapes, untied as the converted GGUF is
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, tie_word_embeddings=False,
)  # fmt: skip


def test_more_bits_is_llama_cpps_layer_choice():
    assert [i for i in range(30) if more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(28) if more_bits(i, 28)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]


def test_smollm2_mixes_are_llama_quantizes():
    """SmolLM2: every tensor but ffn_down reads 576 inputs, so the K types fall back to 32-weight blocks
    (the types llama-quantize --dry-run prints for SmolLM2-135M)."""
    t = mix_table("q4_k_m", SMOLLM2)
    assert t["token_embd.weight"] == "q8_0" and "output.weight" not in t  # tied: the output's rule, 576 wide
    assert [t[f"blk.{i}.attn_v.weight"] for i in (0, 2, 3, 4, 5, 29)] == [
        "q8_0",
        "q8_0",
        "q5_0",
        "q5_0",
        "q8_0",
        "q8_0",
    ]
    assert [t[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 5)] == ["q6_k", "q4_k", "q6_k"]
    assert {t[f"blk.7.{k}.weight"] for k in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {"q5_0"}
    q2 = mix_table("q2_k", SMOLLM2)
    assert q2["blk.4.ffn_down.weight"] == "q3_k" and q2["blk.4.attn_v.weight"] == "q4_0"  # GQA 3: Q3_K → Q4_0
    q3 = mix_table("q3_k_m", SMOLLM2)
    assert q3["blk.1.attn_v.weight"] == "q5_1" and q3["blk.2.attn_v.weight"] == "q5_0"  # Q5_K / Q4_K, 576 wide
    assert q3["blk.0.ffn_down.weight"] == "q5_k" and q3["blk.1.ffn_down.weight"] == "q4_k"  # 30 / 16 = 1
    assert set(mix_table("q6_k", SMOLLM2).values()) == {"q8_0", "q6_k"}
    assert set(mix_table("q5_k_m", SMOLLM2).values()) == {"q8_0", "q6_k", "q5_k", "q5_1"}


def test_qwen_mixes_are_llama_quantizes():
    """Qwen2.5-Coder-1.5B: every width is whole super-blocks; GQA 6; untied embeddings."""
    q2 = mix_table("q2_k", QWEN)
    assert q2["blk.0.attn_v.weight"] == "q4_k" and q2["blk.0.attn_output.weight"] == "q3_k"  # GQA ≥ 4
    assert q2["blk.9.ffn_down.weight"] == "q3_k" and q2["blk.9.attn_q.weight"] == "q2_k"
    assert q2["output.weight"] == "q6_k" and q2["token_embd.weight"] == "q2_k"  # untied: the default type
    q3 = mix_table("q3_k_m", QWEN)
    assert [q3[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2, 27)] == ["q5_k", "q5_k", "q4_k", "q4_k"]
    assert [q3[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 27)] == ["q5_k", "q4_k", "q4_k"]
    assert q3["blk.3.attn_output.weight"] == "q4_k" and q3["blk.3.ffn_up.weight"] == "q3_k"
    q4 = mix_table("q4_k_m", QWEN)
    six = [i for i in range(28) if q4[f"blk.{i}.ffn_down.weight"] == "q6_k"]
    assert (
        six
        == [i for i in range(28) if q4[f"blk.{i}.attn_v.weight"] == "q6_k"]
        == [i for i in range(28) if more_bits(i, 28)]
    )
    assert q4["token_embd.weight"] == "q4_k" and q4["output.weight"] == "q6_k"


def test_q4_0_and_q5_0_mixes_are_llama_quantize_imatrixs():
    """llama-quantize --imatrix … Q4_0 / Q5_0 (checked against --dry-run): the first L/8 ffn_down on Q4_1 / Q5_1
    (30 and 28 blocks: 0, 1, 2), the head on Q6_K, or Q8_0 when 576 wide; everything else the default type."""
    for mix, low, high in (("q4_0_mix", "q4_0", "q4_1"), ("q5_0_mix", "q5_0", "q5_1")):
        for config, head in ((SMOLLM2, "token_embd.weight"), (QWEN, "output.weight")):
            t = mix_table(mix, config)
            n = config.num_hidden_layers
            assert [i for i in range(n) if t[f"blk.{i}.ffn_down.weight"] == high] == [0, 1, 2]
            assert t[head] == ("q8_0" if config is SMOLLM2 else "q6_k")
            rest = {
                k: v
                for k, v in t.items()
                if k != head and not k.endswith(tuple(f"{i}.ffn_down.weight" for i in range(3)))
            }
            assert set(rest.values()) == {low}  # Qwen's untied token_embd too
    eight = LlamaConfig(**{**SMOLLM2.to_dict(), "num_hidden_layers": 16})
    assert [i for i in range(16) if mix_table("q4_0_mix", eight)[f"blk.{i}.ffn_down.weight"] == "q4_1"] == [0, 1]
    assert type_spec("q4_1") == QuantSpec(4, 32, False, "q4_1")  # llama.cpp's own Q4_1 rounding


def test_fallbacks_and_float_last_resort():
    from lmcompress.models.gguf_mixes import MixModel

    m = MixModel(n_layers=4)
    assert [tensor_type(mix, "blk.1.attn_q.weight", 320, m) for mix in MIXES] == [
        "q4_0",
        "q4_0",
        "q5_0",
        "q5_1",
        "q8_0",
        "q4_0",
        "q5_0",
    ]
    assert tensor_type("q4_k_m", "blk.1.attn_q.weight", 100, m) == "f16"  # not even 32-weight blocks
    assert tensor_type("q4_k_m", "output.weight", 320, m) == "q8_0"
    assert tensor_type("q4_0_mix", "output.weight", 100, m) == "f16"  # Q8_0, then not even 32-weight blocks
    with pytest.raises(UserError, match="mixture-of-experts"):
        tensor_type("q4_k_m", "blk.1.attn_q.weight", 512, MixModel(n_layers=4, n_expert=8))


def test_unknown_mix_is_refused_listing_the_mixes():
    with pytest.raises(UserError, match="q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k"):
        check_mix("q4_k_s")
    with pytest.raises(UserError, match="unknown GGUF mix 'q4_k_l'"):
        QuantConfig(method="rtn", gguf_mix="q4_k_l")


def _unpack_legacy(data: np.ndarray, kind: str, cols: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A reader written from the block layouts: ``(codes, d, m)`` of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 bytes."""
    rows = data.shape[0]
    b = data.reshape(rows, cols // 32, -1)
    d = b[..., :2].copy().view("<f2")[..., 0]
    m = b[..., 2:4].copy().view("<f2")[..., 0] if kind in ("q4_1", "q5_1") else np.zeros_like(d)
    rest = b[..., 4:] if kind in ("q4_1", "q5_1") else b[..., 2:]
    if kind == "q8_0":
        return torch.from_numpy(rest.view(np.int8).astype(np.int16) + 128).reshape(rows, cols), d, m
    high = np.zeros((*rest.shape[:-1], 32), np.int64)
    if kind in ("q5_0", "q5_1"):
        word = rest[..., :4].copy().view("<u4")[..., 0].astype(np.int64)
        high = ((word[..., None] >> np.arange(32)) & 1) << 4
        rest = rest[..., 4:]
    low = np.concatenate([rest & 15, rest >> 4], -1).astype(np.int64)
    return torch.from_numpy(low | high).reshape(rows, cols), d, m


@pytest.mark.parametrize("grid", list(LEGACY))
def test_legacy_grids_are_llama_cpps_blocks_and_read_back(grid):
    from lmcompress.checkpoint.gguf_export import exact_block_type, pack_codes

    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    w[0, :32] = 0.0  # an all-zero block: d = 0
    bits, sym = LEGACY[grid]
    q = rtn_quantize(w, QuantSpec(bits, 32, sym, grid))
    assert exact_block_type(q)[0] == grid
    data = pack_codes(q, grid)
    ggml = getattr(gguf.GGMLQuantizationType, grid.upper())
    assert np.array_equal(data, gguf.quants.quantize(w.numpy(), ggml))  # gguf's reference quantizer, byte for byte
    codes, d, m = _unpack_legacy(data, grid, 96)
    assert torch.equal(codes, q.codes.long())
    assert np.array_equal(d.astype(np.float32), q.scale.numpy())
    if grid in ("q4_1", "q5_1"):
        assert np.array_equal(m.astype(np.float32), (-q.scale * q.zero).half().float().numpy())
    back = gguf.quants.dequantize(data, ggml)
    assert np.allclose(back, q.dequantize().numpy(), rtol=0, atol=1e-6)  # Q5_1: d·q + m within float32 ulps


@pytest.mark.parametrize("name", list(K.KTYPES))
def test_kquant_codes_bytes_codes_through_gguf(name, tmp_path):
    """Codes → bytes in a GGUF file → gguf's reader → the same codes and integer grid."""
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(1))
    q = rtn_quantize(w, kquant_spec(name))
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor(
        "t", K.pack(q.codes, kquant_grid_of(q)), raw_dtype=getattr(gguf.GGMLQuantizationType, name.upper())
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (t,) = gguf.GGUFReader(str(path)).tensors
    codes, grid = K.unpack(np.asarray(t.data), name, 512)
    want = kquant_grid_of(q)
    assert torch.equal(codes, q.codes)
    assert torch.equal(grid.scales, want.scales) and torch.equal(grid.mins, want.mins)
    assert torch.equal(grid.d, want.d) and torch.equal(grid.dmin, want.dmin)


def test_nominal_bits_are_llama_cpps_block_sizes():
    w = torch.randn(4, 512)
    want = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
    want |= {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5}
    for kind, bpw in want.items():
        assert nominal_bits_per_weight({"w": rtn_quantize(w, type_spec(kind))}) == bpw


@pytest.fixture(scope="module")
def mix_folder(tmp_path_factory, tokenizer):
    """A tiny llama shaped like SmolLM2 in miniature: 288 inputs (not whole super-blocks), ffn_down 512 (two),
    eight blocks (so llama.cpp's layer choices differ), GQA 3, tied embeddings."""
    from lmcompress.checkpoint.save import save_model
    from lmcompress.models.tiny import build_tiny_model

    model = build_tiny_model(
        "llama", tokenizer.vocab_size, max_positions=128, hidden_size=288, intermediate_size=512,
        num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("mix") / "model"
    save_model(model, tokenizer, folder, {"kind": "test-model"})
    return folder


@pytest.mark.parametrize(("mix", "method"), [("q4_k_m", "gptq"), ("q3_k_m", "rtn")])
def test_quantize_gguf_mix_then_export_writes_every_tensor_from_its_codes(
    mix, method, mix_folder, tmp_path, calib_file, capsys
):
    from lmcompress.checkpoint.packed import read_packed
    from lmcompress.models.gguf_names import rotary_row_order, rotary_rows

    out = tmp_path / "mixed"
    calib = ["--calib-data", str(calib_file), "--nsamples", "2", "--seqlen", "32"] if method == "gptq" else []
    assert run_cli(["quantize", str(mix_folder), "--method", method, "--gguf-mix", mix, "-o", str(out), *calib]) == 0
    assert f"{mix.upper()} mix" in capsys.readouterr().out
    recipe = json.loads((out / "lmcompress.json").read_text())
    config, quantized = LlamaConfig.from_pretrained(out), read_packed(out, recipe)[1]
    table = mix_table(mix, config)
    assert "lm_head.weight" in quantized  # the (tied) head on its mix type: 288 wide → Q8_0
    assert quantized["lm_head.weight"].spec.grid == table["token_embd.weight"] == "q8_0"

    path = tmp_path / "m.gguf"
    assert run_cli(["export", str(out), "--format", "gguf", "--type", mix, "-o", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["file_type"] == mix.upper()
    assert summary["requantized"]["tensors"] == 0  # K / Q5_1 minimums: d·q − m against (q − z)·s, float32 ulps
    assert summary["from_codes"]["tensors"] == len(table) and summary["from_codes"]["max_rel_error"] < 1e-6
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    names = {v: k for k, v in table.items()}
    assert {n: t.tensor_type.name.lower() for n, t in tensors.items() if n in table} == table
    from lmcompress.models.gguf_names import gguf_family, tensor_name_map

    hf = tensor_name_map(gguf_family(config), 8)
    for param, q in quantized.items():
        gname = "token_embd.weight" if param == "lm_head.weight" else hf.get_name(param, try_suffixes=(".weight",))
        kind = table[gname]
        assert q.spec.grid == kind, param
        heads = rotary_rows(param, config)
        codes = q.codes if heads is None else q.codes[rotary_row_order(q.codes.shape[0], heads)]
        data = np.asarray(tensors[gname].data).reshape(codes.shape[0], -1)
        back = (
            K.unpack(data, kind, codes.shape[1])[0]
            if kind in K.KTYPES
            else _unpack_legacy(data, kind, codes.shape[1])[0]
        )
        assert torch.equal(back.to(torch.uint8), codes), param
    assert names  # the table named every tensor


def test_export_mix_from_dense_is_rtn_and_bad_names_write_nothing(mix_folder, tmp_path, capsys):
    path = tmp_path / "d.gguf"
    assert run_cli(["export", str(mix_folder), "--format", "gguf", "--type", "q5_k_m", "-o", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["file_type"] == "Q5_K_M" and summary["from_codes"]["tensors"] == 0
    assert summary["tensor_types"]["Q5_1"] and summary["tensor_types"]["Q6_K"] and summary["tensor_types"]["Q5_K"]
    bad = tmp_path / "bad.gguf"
    assert run_cli(["export", str(mix_folder), "--format", "gguf", "--type", "q4_k_s", "-o", str(bad)]) == 2
    assert "q4_k_m" in capsys.readouterr().err and not bad.exists()
    out = tmp_path / "q"
    assert run_cli(["quantize", str(mix_folder), "--method", "rtn", "--gguf-mix", "q9_k", "-o", str(out)]) == 2
    assert "q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k" in capsys.readouterr().err and not out.exists()
    argv = ["quantize", str(mix_folder), "--method", "rtn", "--gguf-mix", "q4_k_m", "--bits", "3", "-o", str(out)]
    assert run_cli(argv) == 2
    assert "--bits" in capsys.readouterr().err and not out.exists()


def test_a_mix_solves_each_layer_on_its_own_grid(mix_folder):
    """GPTQ on a group whose layers have different mix types (q/k on Q5_0, v on Q8_0 in block 0): each layer
    on its own grid, in 32-weight blocks where it falls back."""
    from lmcompress.checkpoint.load import load
    from lmcompress.transforms.quantize import quantize

    model, _ = load(str(mix_folder), dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    report = quantize(model, QuantConfig(method="gptq", gguf_mix="q4_k_m", in_block="parallel"), ids, progress=False)
    grids = {k: q.spec.grid for k, q in report.quantized.items() if ".0." in k}
    assert grids["model.layers.0.self_attn.v_proj.weight"] == "q8_0"
    assert grids["model.layers.0.self_attn.q_proj.weight"] == "q5_0"
    assert grids["model.layers.0.mlp.down_proj.weight"] == "q6_k"
    for q in report.quantized.values():
        assert isinstance(q, QuantizedTensor)
        if q.spec.grid in LEGACY:
            assert q.spec.group_size == 32


def test_untied_embedding_takes_its_mix_type_and_the_file_is_all_codes(tokenizer, tmp_path, capsys):
    """Untied (as the converted Qwen2.5-Coder): token_embd on the mix's default type by RTN, output on Q6_K; the
    folder loads with those weights, and its GGUF is written wholly from the stored codes."""
    from lmcompress.checkpoint.load import load
    from lmcompress.checkpoint.save import save_model
    from lmcompress.models.tiny import build_tiny_model

    model = build_tiny_model(
        "llama", tokenizer.vocab_size, max_positions=64, hidden_size=256, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    src = tmp_path / "src"
    save_model(model, tokenizer, src, {"kind": "test-model"})
    out = tmp_path / "q"
    assert run_cli(["quantize", str(src), "--method", "rtn", "--gguf-mix", "q2_k", "-o", str(out), "-q"]) == 0
    assert "Q2_K mix" in capsys.readouterr().out
    path = tmp_path / "m.gguf"
    assert run_cli(["export", str(out), "--format", "gguf", "--type", "q2_k", "-o", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requantized"]["tensors"] == 0 and summary["cast_to_float"]["tensors"] == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["token_embd.weight"] == "Q2_K" and types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q3_K"  # GQA 4
    loaded, _ = load(str(out), dtype="float32")
    for name, module in (("token_embd.weight", loaded.get_input_embeddings()), ("output.weight", loaded.lm_head)):
        t = tensors[name]
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(module.weight.shape)
        assert not torch.equal(module.weight, model.get_input_embeddings().weight)
        assert np.allclose(back, module.weight.detach().numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", [*K.KTYPES, "q4_1", "q5_1"])
def test_packed_storage_keeps_the_formats_own_grid(kind):
    """Packed folders store a K grid as fp16 d / dmin and int8 sub-block integers, a Q5_1 zero point as its fp16
    minimum; unpacking gives the same codes, scales and zero points bit for bit."""
    from lmcompress.checkpoint.packing import pack_quantized, unpack_quantized

    q = rtn_quantize(torch.randn(6, 512, generator=torch.Generator().manual_seed(2)), type_spec(kind))
    p = pack_quantized(q)
    back = unpack_quantized(p)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale) and torch.equal(back.zero, q.zero)
    if kind in K.KTYPES:
        assert p.meta["zero"] == "kquant" and "scale" not in p.parts and p.parts["d"].dtype == torch.float16
        assert p.parts["sub_scale"].dtype == torch.int8 and ("dmin" in p.parts) == K.KTYPES[kind].has_min
    else:
        assert p.meta["zero"] == "q5_1_min" and p.parts["zero"].dtype == torch.float16


def test_help_names_every_type_and_mix():
    import typer

    from lmcompress.checkpoint.gguf_export import TYPES
    from lmcompress.cli import app

    group = typer.main.get_command(app)

    def option_help(verb: str, name: str) -> str:
        return next(p.help for p in group.commands[verb].params if p.name == name)

    assert all(t in option_help("export", "qtype") for t in TYPES)
    assert all(m in option_help("quantize", "gguf_mix") for m in MIXES)


def test_q4_0_mix_quantize_then_export_has_llama_cpps_types(mix_folder, tmp_path, capsys):
    """Eight blocks: ffn_down of block 0 on Q4_1 (llama.cpp's ``q4_1`` grid in 32-blocks), the rest Q4_0,
    the tied 288-wide head Q8_0; the GGUF is written from the codes and reads back as the stored weights."""
    from lmcompress.checkpoint.packed import read_packed

    out = tmp_path / "q40"
    argv = ["quantize", str(mix_folder), "--method", "rtn", "--gguf-mix", "q4_0_mix", "-o", str(out), "-q"]
    assert run_cli(argv) == 0
    assert "Q4_0_MIX mix" in capsys.readouterr().out
    recipe = json.loads((out / "lmcompress.json").read_text())
    quantized = read_packed(out, recipe)[1]
    down = quantized["model.layers.0.mlp.down_proj.weight"]
    assert (
        down.spec == QuantSpec(4, 32, False, "q4_1")
        and quantized["model.layers.1.mlp.down_proj.weight"].spec.grid == "q4_0"
    )
    path = tmp_path / "m.gguf"
    argv = ["export", str(out), "--format", "gguf", "--type", "q4_0_mix", "-o", str(path), "--json"]
    assert run_cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    table = mix_table("q4_0_mix", LlamaConfig.from_pretrained(out))
    assert summary["requantized"]["tensors"] == 0 and summary["from_codes"]["tensors"] == len(table)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert {n: t.tensor_type.name.lower() for n, t in tensors.items() if n in table} == table
    assert [n for n, k in table.items() if k == "q4_1"] == ["blk.0.ffn_down.weight"]
    t = tensors["blk.0.ffn_down.weight"]
    back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(down.codes.shape)
    ref = down.dequantize().numpy()
    assert np.abs(back - ref).max() <= 2e-3 * np.abs(ref).max()  # fp16 d and m of the stored codes
    dense = tmp_path / "d.gguf"  # a dense model: every tensor re-quantized by gguf's reference quantizers
    assert run_cli(["export", str(mix_folder), "--format", "gguf", "--type", "q4_0_mix", "-o", str(dense)]) == 0
    assert {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(dense)).tensors if t.name in table} == table
