"""Calibration / evaluation windows and the perplexity protocol."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from lmcompress import UserError, perplexity
from lmcompress.calibration.data import calibration_windows, draw, eval_windows, load_text, windows_hash
from lmcompress.checkpoint.save import save_model
from lmcompress.models.tiny import build_tiny_model


def test_calibration_windows_are_seeded_slices(tokenizer, calib_text):
    a = calibration_windows(tokenizer, calib_text, 6, 32, seed=1)
    b = calibration_windows(tokenizer, calib_text, 6, 32, seed=1)
    c = calibration_windows(tokenizer, calib_text, 6, 32, seed=2)
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert windows_hash(a) == windows_hash(b) != windows_hash(c)
    ids = torch.tensor(tokenizer(calib_text)["input_ids"])
    for row in a:  # each window is a contiguous slice of the tokenized text
        starts = torch.nonzero(ids[: ids.numel() - 31] == row[0]).flatten()
        assert any(torch.equal(ids[s : s + 32], row) for s in starts.tolist())


def test_eval_windows_are_non_overlapping_and_drop_the_tail(tokenizer, eval_text):
    ids = torch.tensor(tokenizer(eval_text)["input_ids"])
    w = eval_windows(tokenizer, eval_text, 100)
    assert w.shape == (ids.numel() // 100, 100)
    assert torch.equal(w.flatten(), ids[: w.numel()])


def test_held_out_windows_share_no_token_position_with_calibration_windows(tokenizer):
    ids = torch.arange(300)  # token id = position in the text
    for seed in range(4):
        w = calibration_windows(tokenizer, "", 6, 16, seed=seed, ids=ids, bos=False, held_out=4)
        calib, held = w[:6], w[6:]
        assert w.shape == (10, 16)
        assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 16)) for row in w)  # contiguous slices
        assert not set(calib.flatten().tolist()) & set(held.flatten().tolist())
        assert int(held.min()) > int(calib.max())  # calibration from the head, held-out from the tail
    # without held-out windows the calibration windows are drawn as before, anywhere in the text
    plain = calibration_windows(tokenizer, "", 6, 16, seed=0, ids=ids, bos=False)
    starts = torch.randint(0, 300 - 16 + 1, (6,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain[:, 0], starts)


def test_held_out_windows_need_enough_text_for_both_parts(tokenizer):
    # 3 calibration windows of 4 tokens need 6 tokens, 2 held-out windows 5 (one window and one more token)
    with pytest.raises(UserError, match=r"has 9 tokens; 3 calibration windows and 2 held-out .* at least 11 tokens"):
        calibration_windows(tokenizer, "", 3, 4, ids=torch.arange(9), bos=False, held_out=2)
    w = calibration_windows(tokenizer, "", 3, 4, ids=torch.arange(11), bos=False, held_out=2)
    assert int(w[3:].min()) >= 6 and int(w[:3].max()) <= 5


def test_draw_records_held_out_windows_only_when_asked(tokenizer):
    _, info = draw(tokenizer, "bundled:wikitext2-valid", nsamples=4, seqlen=32)
    both, with_held = draw(tokenizer, "bundled:wikitext2-valid", nsamples=4, seqlen=32, held_out=3)
    assert "held_out" not in info and with_held["held_out"] == 3 and with_held["nsamples"] == 4
    assert both.shape == (7, 32) and with_held["sha256"] == windows_hash(both) != info["sha256"]


def test_short_text_is_a_clear_error(tokenizer):
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_windows(tokenizer, "a few words", 2, 64)
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(tokenizer, "a few words", 64)


def test_perplexity_is_exp_mean_token_nll(tokenizer, eval_text):
    model = build_tiny_model("gpt2", tokenizer.vocab_size)
    w = eval_windows(tokenizer, eval_text, 64)[:3]
    res = perplexity(model, w, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in w:
            logp = F.log_softmax(model(row[None]).logits[0].double(), -1)
            for t in range(63):
                nll -= logp[t, row[t + 1]].item()
                count += 1
    assert res.tokens == count == 3 * 63
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(UserError, match="neither an existing file nor a known dataset"):
        load_text("definitely-not-a-dataset")


def test_bundled_samples_have_attribution():
    from importlib import resources

    readme = resources.files("lmcompress.assets").joinpath("README.md").read_text()
    assert "CC" in readme or "Creative Commons" in readme
    assert len(load_text("bundled:wikitext2-test").text) > 50000


# ------------------------------------------------------------------------------------------------------------
# eval from the CLI: intervals, agreement with the dense model, refused options


def _perturbed(tokenizer, tmp_path, source):
    """A dense tiny LLaMA at tmp_path/dense and a perturbed copy whose recipe names ``source`` as its source."""
    dense = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256)
    save_model(dense, tokenizer, tmp_path / "dense", {"kind": "test-model"})
    other = copy.deepcopy(dense)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(other, tokenizer, tmp_path / "other", {"kind": "prune", "source_model": str(source)})
    return tmp_path / "dense", tmp_path / "other"


def _eval_json(argv, capsys) -> dict:
    capsys.readouterr()
    assert run_cli(["eval", *argv, "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_reports_the_interval_and_agreement_with_the_recipe_source(tokenizer, tmp_path, capsys):
    dense, other = _perturbed(tokenizer, tmp_path, tmp_path / "dense")
    res = _eval_json([str(other), "--agreement"], capsys)
    lo, hi = res["perplexity_ci"]
    assert lo < res["perplexity"] < hi and res["bos"] is False
    a = res["agreement"]
    assert res["reference"] == str(dense) and a["kl_mean"] > 0 and 0 <= a["top1_agreement"] <= 1
    assert a["windows"] == res["windows"] and a["tokens"] == res["tokens"]
    same = _eval_json([str(dense), "--reference", str(dense)], capsys)["agreement"]
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert run_cli(["eval", str(other), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "--agreement"]) == 0
    out = capsys.readouterr().out
    assert "KL mean" in out and "top-1 agreement" in out and "(95%)" in out


def test_agreement_without_a_local_source_is_a_clear_error(tokenizer, tmp_path, capsys):
    _, other = _perturbed(tokenizer, tmp_path, tmp_path / "gone")
    capsys.readouterr()
    assert run_cli(["eval", str(other), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "--agreement"]) == 2
    assert "--reference" in capsys.readouterr().err


def test_eval_refuses_pooling_on_a_decoder_and_a_one_token_context(tokenizer, tmp_path, capsys):
    dense, _ = _perturbed(tokenizer, tmp_path, tmp_path / "dense")
    argv = ["eval", str(dense), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64"]
    assert run_cli([*argv, "--pooling", "mean"]) == 2
    assert "pooling" in capsys.readouterr().err
    save_model(build_tiny_model("llama", tokenizer.vocab_size, max_positions=1), tokenizer, tmp_path / "one", {})
    for extra in ([], ["--seqlen", "2"]):
        assert run_cli(["eval", str(tmp_path / "one"), "--ppl-data", "bundled:wikitext2-test", *extra]) == 2
        err = capsys.readouterr().err
        assert "cannot be evaluated" in err and "seqlen 1" not in err
