"""GGUF export: codes written exactly per block type, llama.cpp names and rotary order (checked by loading the
file back with transformers and llama.cpp), tokenizer metadata, re-quantization error, refusals, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import logits_of as _logits  # noqa: E402
from conftest import random_ids as _ids  # noqa: E402
from conftest import run_cli as _cli  # noqa: E402

import lmcompress  # noqa: E402
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, rtn_quantize  # noqa: E402
from lmcompress.checkpoint.gguf_export import export_gguf  # noqa: E402
from lmcompress.checkpoint.load import load  # noqa: E402
from lmcompress.checkpoint.packed import save_packed  # noqa: E402
from lmcompress.checkpoint.save import save_model  # noqa: E402
from lmcompress.errors import UserError  # noqa: E402
from lmcompress.models.families import find_prunable, get_blocks, set_weight_matrix, weight_matrix  # noqa: E402
from lmcompress.models.gguf_names import rotary_row_order, rotary_rows, tensor_name_map  # noqa: E402
from lmcompress.models.tiny import build_tiny_model  # noqa: E402
from lmcompress.transforms.prune import PruneConfig  # noqa: E402


def _packed(family: str, tokenizer, folder, spec: QuantSpec, *, act_order: bool = False, **overrides):
    """A tiny model, half pruned, every block linear layer RTN-quantized with ``spec``, saved packed."""
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256, **overrides)
    lmcompress.prune(model, PruneConfig(method="magnitude", sparsity=0.5), progress=False)
    quantized = {}
    for block in get_blocks(model):
        for module in find_prunable(block).values():
            q = rtn_quantize(weight_matrix(module).float(), spec)
            if act_order:  # scatter the columns of the groups, as GPTQ's act-order does
                perm = torch.randperm(q.codes.shape[1], generator=torch.Generator().manual_seed(1))
                q = QuantizedTensor(q.codes, q.scale, q.zero, spec, q.group_index()[perm].int())
            set_weight_matrix(module, q.dequantize())
            quantized[next(n for n, p in model.named_parameters() if p is module.weight)] = q
    save_packed(model, tokenizer, folder, {"kind": "quantize"}, quantized=quantized)
    return model, quantized


def _gguf_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


@pytest.mark.parametrize(
    ("spec", "block_type"),
    [(QuantSpec(4, 32, True), "Q4_0"), (QuantSpec(4, 64, False), "Q4_1"), (QuantSpec(8, -1, True), "Q8_0")],
)
def test_codes_are_written_as_they_are(spec, block_type, tokenizer, tmp_path):
    model, quantized = _packed("llama", tokenizer, tmp_path / "q", spec)
    summary = export_gguf(tmp_path / "q", tmp_path / "m.gguf")
    assert summary["from_codes"]["tensors"] == len(quantized) and summary["requantized"]["tensors"] == 0
    tensors = _gguf_tensors(tmp_path / "m.gguf")
    names = tensor_name_map(lmcompress.models.gguf_names.gguf_family(model.config), 2)
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[block_type]
    for hf_name, q in quantized.items():
        t = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        assert t.tensor_type.name == block_type
        heads = rotary_rows(hf_name, model.config)
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        raw = torch.from_numpy(np.asarray(t.data).copy()).reshape(q.codes.shape[0], -1, block_bytes)
        if heads is not None:  # q/k rows are in llama.cpp's rotary order: undo it
            inverse = torch.argsort(rotary_row_order(q.codes.shape[0], heads))
            back, raw = back[inverse], raw[inverse]
        # the codes themselves, unpacked from the bytes
        if block_type == "Q8_0":
            codes = raw[..., 2:].view(torch.int8).to(torch.int16) + 128
        else:
            nib = raw[..., block_bytes - 16 :]
            codes = torch.cat([nib & 0x0F, nib >> 4], dim=-1)
        assert torch.equal(codes.reshape(q.codes.shape).to(torch.uint8), q.codes)
        # the weights: ours with the scale rounded to fp16 (and Q4_1's minimum m = fp16(-d·z))
        g = q.group_index()
        d = q.scale.half().float()[:, g]
        if block_type == "Q4_1":
            m = (-d * q.zero[:, g]).half().float()
            want = d * q.codes.float() + m
            torch.testing.assert_close(back, want, rtol=0, atol=1e-6 * float(d.max()))
        else:
            assert torch.equal(back, (q.codes.float() - q.zero[:, g]) * d)
        err = torch.linalg.norm(back - q.dequantize()) / torch.linalg.norm(q.dequantize())
        assert 0 < err < 1e-3  # only the fp16 scale rounding
    if block_type != "Q4_1":  # pruned zeros stay exact zeros
        assert summary["zeros_kept"] == summary["zeros_in_blocks"] > 0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_transformers_loads_the_export(family, tokenizer, tmp_path):
    """transformers' own GGUF reader (it undoes llama.cpp's rotary order) gives back the source model."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    save_model(model, tokenizer, tmp_path / "src", {"kind": "test-model"})
    ids = _ids(tokenizer.vocab_size)
    expected = _logits(model, ids)
    for qtype, tol in (("f32", 1e-5), ("f16", 5e-3)):
        export_gguf(tmp_path / "src", tmp_path / f"{qtype}.gguf", qtype=qtype)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{qtype}.gguf")
        torch.testing.assert_close(_logits(hf, ids), expected, rtol=0, atol=tol)
    # a packed Q4_0 model: equal to lmcompress.load up to the fp16 scales
    _packed(family, tokenizer, tmp_path / "q", QuantSpec(4, 32, True))
    export_gguf(tmp_path / "q", tmp_path / "q4.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q4.gguf")
    torch.testing.assert_close(_logits(hf, ids), _logits(load(tmp_path / "q")[0], ids), rtol=0, atol=5e-3)


def test_tokenizer_metadata(tokenizer, tiny_folder, tmp_path):
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny_folder("llama"), src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
    (src / "chat_template.jinja").write_text(template)
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    summary = export_gguf(src, tmp_path / "m.gguf", qtype="f16")
    assert summary["tokenizer"]["pre"] == "gpt-2"
    fields = _fields(tmp_path / "m.gguf")
    source = AutoTokenizer.from_pretrained(src)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == fields["llama.vocab_size"] == source.vocab_size
    assert len(fields["tokenizer.ggml.merges"]) > 0
    eot = source.convert_tokens_to_ids("<|endoftext|>")
    assert fields["tokenizer.ggml.token_type"][eot] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.bos_token_id"] == source.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == source.eos_token_id
    assert fields["tokenizer.chat_template"] == template
    assert fields["tokenizer.ggml.add_bos_token"] is False
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "The tower is 324 metres (1,063 ft) tall,  about the same height as an 81-storey building.<|endoftext|>"
    assert loaded(text)["input_ids"] == source(text)["input_ids"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_llama_cpp_runs_the_export(family, tokenizer, tmp_path):
    """llama.cpp itself loads the file, tokenizes as the source does, and computes the same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _packed(family, tokenizer, tmp_path / "q", QuantSpec(8, 32, True))
    model, source_tok = load(tmp_path / "q")
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    ids = source_tok(text)["input_ids"]
    want = _logits(model, torch.tensor([ids]))[0]
    # f32: differences are float rounding (without the rotary row order they are ~30x larger for llama);
    # Q8_0 from the codes: llama.cpp also rounds the activations to 8 bits for its products
    del llama_cpp  # llama.cpp runs in a child process: a native crash there must not take the test session down
    for qtype, tol in (("f32", 2e-3), ("auto", 5e-2)):
        export_gguf(tmp_path / "q", tmp_path / f"{qtype}.gguf", qtype=qtype)
        out = tmp_path / f"{qtype}.scores.npy"
        cmd = [sys.executable, "-c", _LLAMA_CPP_SCORES, str(tmp_path / f"{qtype}.gguf"), text, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode < 0:
            pytest.skip(f"llama.cpp crashed with signal {-proc.returncode} in this llama-cpp-python build (a native "
                        "crash in libggml-cpu, not a wrong result); see docs/gguf.md")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        got_ids, scores = json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)
        assert got_ids == ids
        torch.testing.assert_close(torch.from_numpy(scores[: len(ids)]), want, rtol=0, atol=tol)


_LLAMA_CPP_SCORES = """
import json, sys
import numpy as np
import llama_cpp
path, text, out = sys.argv[1:]
llm = llama_cpp.Llama(model_path=path, n_threads=1, logits_all=True, verbose=False, n_ctx=64)
ids = llm.tokenize(text.encode(), add_bos=False, special=True)
llm.eval(ids)
np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))
print(json.dumps(ids))
"""


def test_other_grids_need_a_type_and_report_the_error(tokenizer, tmp_path):
    _packed("llama", tokenizer, tmp_path / "q3", QuantSpec(3, 32, True))
    with pytest.raises(UserError, match="3-bit symmetric grid has no GGUF block type"):
        export_gguf(tmp_path / "q3", tmp_path / "m.gguf")
    summary = export_gguf(tmp_path / "q3", tmp_path / "m.gguf", qtype="q4_0")
    assert summary["requantized"]["tensors"] == 14 and summary["from_codes"]["tensors"] == 0
    assert 0 < summary["requantized"]["mean_rel_error"] <= summary["requantized"]["max_rel_error"] < 0.5
    assert summary["tensor_types"]["Q4_0"] == 14 and summary["tensor_types"]["F16"] == 2  # embeddings, head
    assert summary["zeros_kept"] == summary["zeros_in_blocks"] > 0  # Q4_0 rounds 0 to the code 8, i.e. 0
    _packed("llama", tokenizer, tmp_path / "act", QuantSpec(4, 32, True), act_order=True)
    with pytest.raises(UserError, match="act-order"):
        export_gguf(tmp_path / "act", tmp_path / "a.gguf")
    summary = export_gguf(tmp_path / "act", tmp_path / "a.gguf", qtype="f16", embed_type="q8_0")
    assert summary["cast_to_float"]["tensors"] == 14 and summary["tensor_types"]["Q8_0"] == 2
    # a Q4_0 grid asked for as Q8_0 is re-quantized: its error is reported, not hidden
    _packed("llama", tokenizer, tmp_path / "q4", QuantSpec(4, 32, True))
    summary = export_gguf(tmp_path / "q4", tmp_path / "q8.gguf", qtype="q8_0")
    assert summary["requantized"]["tensors"] == 16 and summary["requantized"]["max_rel_error"] > 0  # + embeddings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "act", "m.gguf", "q3", "q4", "q8.gguf"]


def test_refusals_write_nothing(tokenizer, tiny_folder, tmp_path):
    src = tiny_folder("llama")
    gpt2 = tmp_path / "gpt2"
    save_model(build_tiny_model("gpt2", tokenizer.vocab_size, max_positions=256), tokenizer, gpt2, {"kind": "t"})
    with pytest.raises(UserError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3"):
        export_gguf(gpt2, tmp_path / "g.gguf")
    resized = tmp_path / "resized"
    shutil.copytree(src, resized)
    (resized / "lmcompress.json").write_text(json.dumps({"kind": "shrink", "surgery": [{"op": "x"}]}))
    with pytest.raises(UserError, match="surgery"):
        export_gguf(resized, tmp_path / "r.gguf")
    with pytest.raises(UserError, match="inside the source"):
        export_gguf(src, src / "m.gguf")
    with pytest.raises(UserError, match=r"ending in \.gguf"):
        export_gguf(src, tmp_path / "m")
    with pytest.raises(UserError, match="unknown GGUF type"):
        export_gguf(src, tmp_path / "m.gguf", qtype="q7_k")
    (tmp_path / "exists.gguf").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(src, tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf", "gpt2", "resized"]
    export_gguf(src, tmp_path / "exists.gguf", overwrite=True)
    assert _fields(tmp_path / "exists.gguf")["general.architecture"] == "llama"


def test_cli(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    assert _cli(["export", str(src), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    assert "as GGUF (llama" in capsys.readouterr().out
    out = str(tmp_path / "q.gguf")
    assert _cli(["export", str(src), "--format", "gguf", "--type", "q8_0", "-o", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["file_type"] == "Q8_0" and summary["requantized"]["tensors"] == 16  # blocks, embeddings, head
    assert _cli(["export", str(src), "--format", "gguf", "--type", "q9", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "--type" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
