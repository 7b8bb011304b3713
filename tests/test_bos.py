"""Windows that start the way the model expects: BOS first where the tokenizer puts it first (LLaMA, Gemma, OPT),
cut as before where it does not (GPT-2, Qwen2); the token-id and window-count checks of calibration/data.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_cli

from lmcompress import UserError
from lmcompress.calibration.data import calibration_windows, draw, eval_windows, wants_bos
from lmcompress.checkpoint.save import save_model
from lmcompress.models.tiny import build_tiny_model


def _family_tokenizer(tokenizer, family: str, tmp_path):
    """The tests' BPE vocabulary wrapped as ``family``'s tokenizer class with its BOS habit, saved and reloaded."""
    from transformers import (
        AutoTokenizer,
        GemmaTokenizerFast,
        GPT2TokenizerFast,
        LlamaTokenizerFast,
        Qwen2TokenizerFast,
    )

    obj = copy.deepcopy(tokenizer.backend_tokenizer)
    eos = "<|endoftext|>"
    made = {
        "llama": lambda: LlamaTokenizerFast(tokenizer_object=obj, bos_token=eos, eos_token=eos, add_bos_token=True),
        "gemma": lambda: GemmaTokenizerFast(
            tokenizer_object=obj, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos, add_bos_token=True
        ),
        "opt": lambda: GPT2TokenizerFast(tokenizer_object=obj, bos_token=eos, eos_token=eos, add_bos_token=True),
        "gpt2": lambda: GPT2TokenizerFast(tokenizer_object=obj, bos_token=eos, eos_token=eos),
        "qwen2": lambda: Qwen2TokenizerFast(tokenizer_object=obj, eos_token=eos, bos_token=None),
    }[family]()
    folder = tmp_path / f"tok-{family}"
    made.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


WANTS = {"llama": True, "gemma": True, "opt": True, "gpt2": False, "qwen2": False}


@pytest.mark.parametrize("family", sorted(WANTS))
def test_windows_start_with_bos_exactly_where_the_tokenizer_wants_it(family, tokenizer, eval_text, tmp_path):
    tok = _family_tokenizer(tokenizer, family, tmp_path)
    assert wants_bos(tok) is WANTS[family]
    ids = torch.tensor(tok(eval_text)["input_ids"])
    assert bool(ids[0] == tok.bos_token_id) is WANTS[family]
    stream = ids[1:] if WANTS[family] else ids  # the text alone
    w = eval_windows(tok, eval_text, 50)
    c = calibration_windows(tok, eval_text, 5, 50, seed=3)
    assert w.shape[1] == c.shape[1] == 50
    if WANTS[family]:  # BOS + 49 stream tokens each: every stream token is predicted once, after BOS
        assert (w[:, 0] == tok.bos_token_id).all() and (c[:, 0] == tok.bos_token_id).all()
        assert w.shape[0] == stream.numel() // 49 and torch.equal(w[:, 1:].flatten(), stream[: w.shape[0] * 49])
        body = c[:, 1:]
    else:  # cut as before
        assert torch.equal(w.flatten(), stream[: w.numel()])
        body = c
    for row in body:  # a contiguous slice of the text
        width = row.numel()
        assert any(torch.equal(stream[s : s + width], row) for s in range(stream.numel() - width + 1))
    windows, info = draw(tok, "bundled:wikitext2-valid", nsamples=3, seqlen=40)
    assert info["bos"] is WANTS[family]
    assert not WANTS[family] or (windows[:, 0] == tok.bos_token_id).all()


def test_bos_can_be_forced_either_way(tokenizer, eval_text, tmp_path):
    llama = _family_tokenizer(tokenizer, "llama", tmp_path)
    plain = eval_windows(llama, eval_text, 50, bos=False)
    assert plain[0, 0] == llama.bos_token_id and (plain[1:, 0] != llama.bos_token_id).any()  # only the first
    qwen = _family_tokenizer(tokenizer, "qwen2", tmp_path)
    with pytest.raises(UserError, match="has none"):
        eval_windows(qwen, eval_text, 50, bos=True)
    with pytest.raises(UserError, match="at least 2"):
        calibration_windows(llama, eval_text, 2, 1)


def test_prune_records_bos_and_eval_reports_it(tokenizer, tmp_path, capsys):
    tok = _family_tokenizer(tokenizer, "llama", tmp_path)
    model = build_tiny_model("llama", len(tok), max_positions=256)
    save_model(model, tok, tmp_path / "dense", {"kind": "test-model"})
    out = tmp_path / "pruned"
    argv = ["prune", str(tmp_path / "dense"), "-o", str(out), "--method", "wanda", "--sparsity", "0.5"]
    assert run_cli([*argv, "--nsamples", "4", "--seqlen", "32", "--calib-data", "bundled:wikitext2-valid", "-q"]) == 0
    assert json.loads((out / "lmcompress.json").read_text())["calibration"]["bos"] is True
    capsys.readouterr()
    assert run_cli(["eval", str(out), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "--json", "-q"]) == 0
    with_bos = json.loads(capsys.readouterr().out)
    assert with_bos["bos"] is True
    assert (
        run_cli(["eval", str(out), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "--no-bos", "--json"]) == 0
    )
    without = json.loads(capsys.readouterr().out)
    assert without["bos"] is False and without["tokens"] != with_bos["tokens"]  # 64 vs 63 text tokens a window


def test_a_tokenizer_larger_than_the_embedding_is_a_clear_error(tokenizer, tmp_path, capsys):
    model = build_tiny_model("llama", 200, max_positions=256)  # the tokenizer has 320 ids
    save_model(model, tokenizer, tmp_path / "dense", {"kind": "test-model"})
    argv = ["prune", str(tmp_path / "dense"), "-o", str(tmp_path / "p"), "--method", "wanda", "--sparsity", "0.5"]
    assert run_cli([*argv, "--nsamples", "4", "--seqlen", "32", "--calib-data", "bundled:wikitext2-valid", "-q"]) == 2
    assert "embedding has only 200 rows" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert run_cli(["eval", str(tmp_path / "dense"), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "32"]) == 2
    assert "embedding has only 200 rows" in capsys.readouterr().err


def test_a_sweep_checks_the_tokenizer_against_the_embedding(tokenizer, tmp_path, capsys, monkeypatch):
    from lmcompress.measure import tasks as tasks_module

    model = build_tiny_model("llama", 200, max_positions=256)  # the tokenizer has 320 ids
    save_model(model, tokenizer, tmp_path / "dense", {"kind": "test-model"})
    out = tmp_path / "s"
    argv = ["sweep", str(tmp_path / "dense"), "-o", str(out), "--methods", "wanda", "--sparsities", "0.5"]
    argv += ["--tasks", "ppl:bundled:wikitext2-test", "--limit", "2", "--seqlen", "32", "--nsamples", "4"]
    argv += ["--calib-data", "bundled:wikitext2-valid", "-q"]
    assert run_cli(argv) == 2  # the perplexity windows
    assert "embedding has only 200 rows" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(tasks_module, "prepare_tasks", lambda *args, **kwargs: [])
    assert run_cli(argv) == 2  # the calibration windows, with no task windows cut before them
    assert "embedding has only 200 rows" in capsys.readouterr().err and not out.exists()


def test_absurd_nsamples_are_refused_before_anything_is_allocated(tokenizer, eval_text):
    with pytest.raises(UserError, match="memory"):
        draw(tokenizer, "bundled:wikitext2-valid", nsamples=1_000_000_000, seqlen=2048)
    with pytest.raises(UserError, match="different windows"):
        calibration_windows(tokenizer, eval_text[:2000], 5000, 32)
