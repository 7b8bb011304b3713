"""Calibration / evaluation windows and the perplexity protocol."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmcompress import UserError, perplexity
from lmcompress.calibration.data import calibration_windows, eval_windows, load_text, windows_hash
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
