"""Agreement with the dense model (KL, top-1, Δp) and the 95% intervals eval reports."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lmcompress import UserError, perplexity
from lmcompress.calibration.data import eval_windows
from lmcompress.measure.agreement import agreement
from lmcompress.measure.intervals import mean_interval, t_quantile, wilson_interval
from lmcompress.measure.perplexity import perplexity_interval
from lmcompress.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def pair(tokenizer):
    """A tiny dense model and a copy with perturbed weights."""
    torch.manual_seed(0)
    dense = build_tiny_model("llama", tokenizer.vocab_size)
    other = copy.deepcopy(dense)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dense, other


@pytest.fixture(scope="module")
def windows(tokenizer, eval_text):
    return eval_windows(tokenizer, eval_text, 32)[:5]


def test_a_model_agrees_fully_with_itself(pair, windows):
    dense, _ = pair
    res = agreement(dense, dense, windows)
    assert res["kl_mean"] == pytest.approx(0, abs=1e-6) and res["kl_p99"] == pytest.approx(0, abs=1e-5)
    assert res["top1_agreement"] == 1.0 and res["delta_p_mean"] == pytest.approx(0, abs=1e-7)
    assert res["windows"] == 5 and res["tokens"] == 5 * 31


def test_numbers_match_a_per_token_hand_computation(pair, windows):
    dense, other = pair
    res = agreement(other, dense, windows, batch_size=2)
    kls, agree, dp = [], [], []
    with torch.no_grad():
        for row in windows:
            logp = F.log_softmax(dense(row[None]).logits[0].double(), -1)
            logq = F.log_softmax(other(row[None]).logits[0].double(), -1)
            for t in range(row.numel() - 1):
                p, q = logp[t].exp(), logq[t].exp()
                kls.append(float((p * (logp[t] - logq[t])).sum()))
                agree.append(float(p.argmax() == q.argmax()))
                dp.append(float(q[row[t + 1]] - p[row[t + 1]]))
    kl = torch.tensor(kls, dtype=torch.float64)
    assert res["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res["kl_median"] == pytest.approx(kl.quantile(0.5).item(), rel=1e-4)
    assert res["kl_p99"] == pytest.approx(kl.quantile(0.99).item(), rel=1e-4)
    assert res["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert res["delta_p_mean"] == pytest.approx(sum(dp) / len(dp), abs=1e-6)
    assert res["kl_mean"] > 1e-4 and res["kl_median"] <= res["kl_p99"]
    lo, hi = res["kl_mean_ci"]
    assert lo < res["kl_mean"] < hi
    assert agreement(other, dense, windows, batch_size=5)["kl_mean"] == pytest.approx(res["kl_mean"], rel=1e-5)


def test_one_window_has_no_interval_and_bad_input_is_refused(pair, windows):
    dense, other = pair
    assert agreement(other, dense, windows[:1])["kl_mean_ci"] is None
    with pytest.raises(UserError, match="at least 2 tokens"):
        agreement(other, dense, windows[:, :1])
    small = build_tiny_model("llama", 100)
    with pytest.raises(UserError, match="same vocabulary"):
        agreement(small, dense, windows.clamp_max(99))


def test_t_quantiles_match_the_tables():
    for df, value in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (120, 1.980)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)


def test_mean_interval_covers_the_mean_and_narrows_with_more_data():
    gen = torch.Generator().manual_seed(0)
    small = (torch.randn(8, generator=gen) + 3).tolist()
    large = (torch.randn(800, generator=gen) + 3).tolist()
    a, b = mean_interval(small), mean_interval(large)
    assert a[0] < sum(small) / 8 < a[1] and b[0] < 3 < b[1]
    assert b[1] - b[0] < (a[1] - a[0]) / 5
    assert mean_interval([1.0]) is None


def test_wilson_interval_stays_in_zero_one():
    assert wilson_interval(0, 10)[0] == 0.0 and 0.2 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == 1.0
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(1 - hi) and 0.39 < lo < 0.41
    assert wilson_interval(0, 0) is None


def test_perplexity_interval_is_exp_of_the_window_nll_interval(tokenizer, eval_text):
    model = build_tiny_model("gpt2", tokenizer.vocab_size)
    res = perplexity(model, eval_windows(tokenizer, eval_text, 32)[:6], progress=False)
    lo, hi = res.perplexity_ci
    assert lo < res.perplexity < hi
    m = mean_interval(res.window_nll)
    assert (lo, hi) == pytest.approx((math.exp(m[0]), math.exp(m[1])))
    assert perplexity_interval([2.0]) is None


def test_chunks_of_positions_give_the_same_numbers(pair, windows, monkeypatch):
    import lmcompress.measure.agreement as A

    dense, other = pair
    whole = agreement(other, dense, windows, batch_size=2)
    monkeypatch.setattr(A, "CHUNK_BYTES", 4 * 4 * 2 * 320 * 5)  # 5 positions a chunk: 7 chunks of 31
    chunked = agreement(other, dense, windows, batch_size=2)
    for key in ("kl_mean", "kl_median", "kl_p99", "top1_agreement", "delta_p_mean"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key
    assert chunked["tokens"] == whole["tokens"]
