"""The compressed KV cache: H2O eviction and int8 / int4 storage (lmcompress.algorithms.kv, lmcompress.kv_cache)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmcompress.algorithms.kv import (
    budget_tokens,
    check_group,
    dequantize_kv,
    h2o_keep,
    kv_bytes_per_token,
    parse_budget,
    quantize_kv,
)
from lmcompress.errors import UserError
from lmcompress.kv_cache import KVCache, KVSettings, attach, kv_settings, memory_report, window_nll
from lmcompress.models.tiny import build_tiny_model
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", 320, max_positions=256)  # 4 query heads sharing 2 KV heads


def _ids(length: int = 40, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(1))


def _full_nll(model, ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


def test_h2o_keep_budget_recent_and_heavy_hitters():
    scores = torch.tensor([[5.0, 0.1, 9.0, 0.2, 0.3, 7.0, 0.0, 0.0]])
    keep = h2o_keep(scores, budget=4, recent=2)
    assert keep.tolist() == [[2, 5, 6, 7]]  # the two newest, then the two largest older scores (9 and 7)
    assert h2o_keep(scores, budget=4, recent=4).tolist() == [[4, 5, 6, 7]]
    assert h2o_keep(scores, budget=3, recent=0).tolist() == [[0, 2, 5]]
    assert h2o_keep(scores, budget=8, recent=2).tolist() == [list(range(8))]
    with pytest.raises(ValueError):
        h2o_keep(scores, budget=2, recent=3)


def test_budget_parsing_and_bad_input(model):
    assert parse_budget("0.2") == 0.2 and parse_budget("256") == 256 and parse_budget(None) is None
    assert budget_tokens(0.2, 2048) == 410 and budget_tokens(256, 2048) == 256 and budget_tokens(0.001, 10) == 1
    for bad in ("0", "0.0", "-3", "1.5", "abc", "nan"):
        with pytest.raises(UserError, match="kv-budget"):
            parse_budget(bad)
    with pytest.raises(UserError, match="kv-bits 3"):
        kv_settings(bits=3)
    with pytest.raises(UserError, match="kv-recent"):
        kv_settings(budget="0.2", recent=1.5)
    assert kv_settings() is None and kv_settings(bits=16) is None
    with pytest.raises(UserError, match="divisor"):
        KVCache(model.config, KVSettings(bits=8, group=5))


def test_kv_grid_error_bound_and_packing():
    x = torch.randn(2, 3, 7, 16) * 4
    for bits in (8, 4):
        codes, scale, low = quantize_kv(x, bits, 8)
        assert codes.dtype == torch.uint8 and codes.shape[-1] == (16 if bits == 8 else 8)
        assert scale.shape == (2, 3, 7, 2) and scale.dtype == torch.float16
        xhat = dequantize_kv(codes, scale, low, bits, 8, torch.float32)
        step = scale.float().repeat_interleave(8, dim=-1)
        assert ((xhat - x).abs() <= step / 2 + 1e-2).all()  # half a step, plus float16 rounding of scale / min
        # per token: quantizing one token alone gives the same codes
        one = quantize_kv(x[:, :, 3:4], bits, 8)
        assert torch.equal(one[0], codes[:, :, 3:4])
    assert check_group(None, 64, 8) == 64 and check_group(None, 64, 4) == 32 and check_group(None, 16, 4) == 16
    const = torch.full((1, 1, 1, 8), 1.5)
    assert torch.equal(dequantize_kv(*quantize_kv(const, 4, 8), 4, 8, torch.float32), const)


def test_h2o_with_budget_at_least_the_sequence_equals_the_full_cache(model):
    ids = _ids()
    model.set_attn_implementation("sdpa")
    settings = KVSettings(budget=ids.shape[1])
    with attach(model, settings):
        assert model.config._attn_implementation == "eager"
        streamed = window_nll(model, ids, settings)
        reference = _full_nll(model, ids)  # the same eager attention, no cache
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "lmcompress_kv")
    assert torch.equal(streamed, reference)
    # token by token (prefill 1) through the same cache: no eviction, the same numbers up to rounding
    settings = KVSettings(budget=1.0)
    with attach(model, settings):
        one_by_one = window_nll(model, ids, settings, prefill=1)
    torch.testing.assert_close(one_by_one, _full_nll(model, ids), atol=1e-5, rtol=1e-5)


def test_generate_with_a_large_budget_equals_plain_generate(model):
    ids = _ids(12, 1)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    with attach(model, KVSettings(budget=64)):
        h2o = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, h2o)
    with attach(model, KVSettings(budget=3, recent=0.34)):  # evicting: runs, and differs
        small = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert small.shape == plain.shape and not torch.equal(small, plain)


def test_eviction_keeps_exactly_the_budget_and_the_recent_window(model):
    ids = _ids(30, 2)
    settings = KVSettings(budget=8, recent=0.5)
    cache = KVCache(model.config, settings, ids.shape[1])
    assert cache.budget == 8 and cache.layers[0].recent == 4
    with attach(model, settings), torch.no_grad():
        model(ids[:, :8], cache=cache, use_cache=True)
        for t in range(8, 30):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            for layer in cache.layers:
                assert layer.keys.shape[-2] == 8 and layer.scores.shape[-1] == 8
            assert cache.get_seq_length() == t + 1
    # recent window: the keys of positions 26..29 are the cache's last 4 entries in every layer and head
    with torch.no_grad():
        reference = KVCache(model.config, KVSettings(bits=16, budget=100), 30)
        with attach(model, KVSettings(budget=100)):
            model(ids, cache=reference, use_cache=True)
    # layer 0's keys depend on the token and its position only, so they can be matched to the full run's
    layer, ref = cache.layers[0], reference.layers[0]
    torch.testing.assert_close(layer.keys[:, :, -4:], ref.keys[:, :, -4:])
    # every kept key is one real key, each once (evicted ones gone, nothing invented), and older than the window
    match = (layer.keys.unsqueeze(3) - ref.keys.unsqueeze(2)).abs().amax(-1) < 1e-5  # [B, H, 8, 30]
    assert bool((match.sum(-1) == 1).all())
    positions = match.float().argmax(-1)
    assert bool((positions[..., :4] < 26).all()) and positions[..., 4:].tolist() == [[[26, 27, 28, 29]] * 2] * 2
    assert bool((positions.diff(dim=-1) > 0).all())  # kept in order


def test_recent_only_keeps_the_last_tokens(model):
    ids = _ids(20, 1)
    settings = KVSettings(budget=5, recent=1.0)
    cache = KVCache(model.config, settings, 20)
    full = KVCache(model.config, KVSettings(budget=100), 20)
    with attach(model, settings), torch.no_grad():
        for t in range(20):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
        model(ids, cache=full, use_cache=True)
    assert all(layer.keys.shape[-2] == 5 for layer in cache.layers)
    torch.testing.assert_close(cache.layers[0].keys, full.layers[0].keys[:, :, -5:], atol=1e-5, rtol=1e-5)


def test_kv_bits_16_is_no_quantization_and_int8_is_close(model):
    ids = _ids()
    reference = _full_nll(model, ids)
    assert torch.equal(window_nll(model, ids, KVSettings(bits=16, budget=None)), reference)
    cache16 = KVCache(model.config, KVSettings(bits=16), 40)
    with torch.no_grad():
        k = torch.randn(2, 2, 5, 16)
        out_k, _ = cache16.layers[0].update(k, k + 1)
    assert torch.equal(out_k, k)
    int8 = window_nll(model, ids, KVSettings(bits=8))
    int4 = window_nll(model, ids, KVSettings(bits=4, group=8))
    err8, err4 = (int8 - reference).abs().mean(), (int4 - reference).abs().mean()
    assert 0 < err8 < 2e-3 and err8 < err4 < 5e-2


def test_quantized_cache_one_forward_equals_token_by_token(model):
    """The grid is per token, so a window in one forward equals the tokens fed one at a time."""
    ids = _ids(16, 1)
    settings = KVSettings(bits=4, group=8)
    one = window_nll(model, ids, settings)
    cache = KVCache(model.config, settings, 16)
    logits = []
    with torch.no_grad():
        for t in range(16):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    logits = torch.cat(logits, 1)[:, :-1].float()
    streamed = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(1, -1)
    torch.testing.assert_close(one, streamed, atol=1e-5, rtol=1e-5)


def test_stored_bytes_match_the_formula(model):
    ids = _ids(24, 1)
    for settings in (KVSettings(bits=8), KVSettings(bits=4, group=8), KVSettings(bits=4, budget=10)):
        cache = KVCache(model.config, settings, 24)
        with attach(model, settings), torch.no_grad():
            model(ids[:, :10], cache=cache, use_cache=True)
            for t in range(10, 24):
                model(ids[:, t : t + 1], cache=cache, use_cache=True)
        held = 10 if settings.evicts else 24
        report = memory_report(model.config, settings)
        assert cache.stored_bytes() == held * report["bytes_per_token"]
    # 2 layers x 2 KV heads x 16 channels x (K, V): fp16 256 bytes; int8 one group: 16 + 4 per head
    assert kv_bytes_per_token(2, 2, 16, 16, 16, 2) == 256 and kv_bytes_per_token(2, 2, 16, 8, 16) == 160


def test_eval_cli_with_kv_flags(tiny_folder, capsys, tmp_path):
    import json

    folder = tiny_folder("llama")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert run_cli(["eval", str(folder), "--ppl-data", str(text), "--seqlen", "64", "--limit", "2", "--json"]) == 0

    base = json.loads(capsys.readouterr().out)
    argv = ["eval", str(folder), "--ppl-data", str(text), "--seqlen", "64", "--limit", "2", "--json"]
    assert run_cli([*argv, "--kv-budget", "1.0"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
    assert same["kv_cache"]["settings"]["budget"] == 1.0
    assert run_cli([*argv, "--kv-budget", "16", "--kv-bits", "8", "--profile"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] != base["perplexity"] and out["profile"]["kv_cache"]["bytes_per_token"] > 0
    assert run_cli([*argv, "--kv-bits", "3"]) != 0
    assert "kv-bits 3" in capsys.readouterr().err
    assert run_cli([*argv, "--kv-budget", "0"]) != 0
    assert "kv-budget" in capsys.readouterr().err


def test_generate_cli_with_kv_flags(tiny_folder, capsys):
    import json

    folder = tiny_folder("llama")
    gen = ["generate", str(folder), "--prompt", "The quick brown fox", "--max-new-tokens", "4", "--json"]
    assert run_cli([*gen, "--kv-budget", "3", "--kv-bits", "4", "--kv-group", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 4 and result["kv_cache"]["settings"]["bits"] == 4


def test_batched_generation_with_eviction_equals_each_row_alone(model, tokenizer):
    from lmcompress.measure.tasks.lm import LM

    prompts = ["The game was released in Japan in", "In the", "The second season of the series began"]
    batched = LM(model, tokenizer, batch_size=3, progress=False)
    single = LM(model, tokenizer, batch_size=1, progress=False)
    with attach(model, KVSettings(budget=0.5, recent=0.5)):
        together = batched.generate(prompts, max_new_tokens=6, stop="")
        alone = single.generate(prompts, max_new_tokens=6, stop="")
    assert together == alone
    assert together != single.generate(prompts, max_new_tokens=6, stop="")  # outside attach: the full cache
