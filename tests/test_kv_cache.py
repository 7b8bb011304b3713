"""The compressed KV cache: H2O eviction and int8 / int4 storage (lmcompress.algorithms.kv, lmcompress.kv_cache)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmcompress.algorithms.kv import (
    budget_tokens,
    check_group,
    dequantize_kv,
    dequantize_kv_channels,
    h2o_keep,
    kv_bytes_per_token,
    kv_cache_bytes,
    parse_budget,
    quantize_kv,
    quantize_kv_channels,
)
from lmcompress.errors import UserError
from lmcompress.kv_cache import (
    ChannelKeyLayer,
    KVCache,
    KVSettings,
    attach,
    format_memory,
    kv_settings,
    memory_report,
    window_nll,
)
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


@pytest.mark.parametrize("key_grid", ["token", "channel"])
def test_quantized_cache_one_forward_equals_token_by_token(model, key_grid):
    """Token grid: one forward per window; channel key grid: one forward per token group (5 tokens here, so the
    last group of 18 is a residual of 3); either equals the tokens fed one at a time."""
    ids = _ids(18, 1)
    settings = KVSettings(bits=4, group=8, key_grid=key_grid, key_tokens=5 if key_grid == "channel" else None)
    one = window_nll(model, ids, settings)
    cache = KVCache(model.config, settings, 18)
    assert isinstance(cache.layers[0], ChannelKeyLayer) == (key_grid == "channel")
    logits = []
    with torch.no_grad():
        for t in range(18):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    logits = torch.cat(logits, 1)[:, :-1].float()
    streamed = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(1, -1)
    torch.testing.assert_close(one, streamed, atol=1e-5, rtol=1e-5)


def test_stored_bytes_match_the_formula(model):
    ids = _ids(24, 1)
    configs = (
        KVSettings(bits=8),
        KVSettings(bits=4, group=8, key_grid="token"),
        KVSettings(bits=4, budget=10),
        KVSettings(bits=4, group=8, key_tokens=5),  # channel keys: 4 groups of 5 and a residual of 4 exact keys
        KVSettings(bits=8, key_grid="channel", key_tokens=8),  # 3 full groups, no residual
    )
    for settings in configs:
        cache = KVCache(model.config, settings, 24)
        with attach(model, settings), torch.no_grad():
            model(ids[:, :10], cache=cache, use_cache=True)
            for t in range(10, 24):
                model(ids[:, t : t + 1], cache=cache, use_cache=True)
        held = 10 if settings.evicts else 24
        report = memory_report(model.config, settings)
        tokens = settings.channel_tokens
        assert cache.stored_bytes() == kv_cache_bytes(held, 2, 2, 16, settings.bits, report["group"], 4, tokens)
        if tokens is None:
            assert cache.stored_bytes() == held * report["bytes_per_token"]
        else:  # full groups at bytes_per_token; the residual's exact float32 keys within the reported bound
            residual = held % tokens
            quantized_key = 2 * 2 * (16 * settings.bits // 8 + 16 * 4 / tokens)  # per token, all layers and heads
            assert cache.stored_bytes() == held * report["bytes_per_token"] + residual * (
                2 * 2 * 16 * 4 - quantized_key
            )
            assert residual * 2 * 2 * 16 * 4 <= report["key_residual_max_bytes"] == (tokens - 1) * 2 * 2 * 16 * 4
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


def test_channel_key_grid_holds_an_outlier_channel_the_token_grid_cannot():
    """Keys with one channel ~100x larger than the rest (Qwen2.5-like): a per-token grid over 32 channels spends its
    16 levels on the outlier and rounds the other 31 channels of its group to one or two levels; per channel each
    channel gets a grid of its own."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 64, 64, generator=g)
    keys[..., 7] = 150 + 3 * torch.randn(1, 2, 64, generator=g)
    token = dequantize_kv(*quantize_kv(keys, 4, 32), 4, 32, torch.float32)
    channel = dequantize_kv_channels(*quantize_kv_channels(keys, 4, 32), 4, 32, torch.float32)
    others = [c for c in range(64) if c != 7]
    err_token = (token - keys)[..., others].pow(2).mean()
    err_channel = (channel - keys)[..., others].pow(2).mean()
    assert err_channel < 0.05 * err_token  # measured: about 0.01 against 2.6
    assert (channel - keys).pow(2).mean() < 0.05 * (token - keys).pow(2).mean()


def test_channel_grid_equals_a_direct_computation():
    """One (scale, min) per channel and group of 4 consecutive tokens; codes packed in channel pairs at 4 bits."""
    x = torch.randn(2, 3, 8, 6) * 3
    for bits in (8, 4):
        codes, scale, low = quantize_kv_channels(x, bits, 4)
        assert codes.shape == (2, 3, 8, 6 if bits == 8 else 3) and scale.shape == low.shape == (2, 3, 2, 6)
        expect = torch.empty_like(x)
        for t0 in (0, 4):
            block = x[:, :, t0 : t0 + 4]  # [2, 3, 4 tokens, 6 channels]
            lo = block.amin(2, keepdim=True).half().float()
            step = ((block.amax(2, keepdim=True) - lo) / (2**bits - 1)).half().float()
            expect[:, :, t0 : t0 + 4] = ((block - lo) / step).round().clamp(0, 2**bits - 1) * step + lo
            assert torch.equal(low[:, :, t0 // 4], lo.squeeze(2).half())
        torch.testing.assert_close(dequantize_kv_channels(codes, scale, low, bits, 4, torch.float32), expect)
    with pytest.raises(ValueError, match="whole groups"):
        quantize_kv_channels(x[:, :, :7], 4, 4)


def test_channel_key_residual_is_exact_and_groups_are_quantized_once_full():
    """Fed 3, 2, 4, 1, 1, 6 tokens with groups of 4: each forward reads the groups complete before it quantized and
    everything newer exact; afterwards the cache holds ⌊n/4⌋ quantized groups and the n mod 4 newest keys exact."""
    layer = ChannelKeyLayer(bits=4, group=8, tokens=4)
    g = torch.Generator().manual_seed(2)
    seen = torch.empty(1, 2, 0, 16)
    for step in (3, 2, 4, 1, 1, 6):
        k, v = torch.randn(1, 2, step, 16, generator=g), torch.randn(1, 2, step, 16, generator=g)
        done = seen.shape[-2] // 4 * 4  # tokens in groups completed before this forward
        seen = torch.cat([seen, k], dim=-2)
        keys, values = layer.update(k, v)
        expect = seen.clone()
        if done:
            expect[:, :, :done] = dequantize_kv_channels(
                *quantize_kv_channels(seen[:, :, :done], 4, 4), 4, 4, torch.float32
            )
        assert torch.equal(keys, expect)
        assert torch.equal(values[:, :, -step:], dequantize_kv(*quantize_kv(v, 4, 8), 4, 8, torch.float32))
        full, rest = divmod(seen.shape[-2], 4)
        assert torch.equal(layer.residual, seen[:, :, seen.shape[-2] - rest :])
        assert (layer.qkeys[0].shape[-2] if layer.qkeys else 0) == 4 * full and layer.stored == seen.shape[-2]
        assert layer.get_seq_length() == seen.shape[-2]
    assert seen.shape[-2] == 17 and layer.residual.shape[-2] == 1


def test_key_grid_defaults_and_bad_input(model):
    assert kv_settings(bits=4).key_grid == "channel" and kv_settings(bits=4).channel_tokens == 32
    assert kv_settings(bits=8).key_grid == "token" and kv_settings(bits=8).channel_tokens is None
    assert kv_settings(bits=4, budget="0.5").key_grid == "token"  # H2O + int4: per-token keys
    assert kv_settings(bits=8, key_grid="channel", key_tokens=16).channel_tokens == 16
    assert KVSettings(bits=4).to_dict()["key_grid"] == "channel" and KVSettings(bits=4).to_dict()["key_tokens"] == 32
    with pytest.raises(UserError, match="kv-key-grid 'diag'"):
        kv_settings(bits=4, key_grid="diag")
    for bad in (0, -4, True, 2.5):
        with pytest.raises(UserError, match="kv-key-tokens"):
            kv_settings(bits=4, key_tokens=bad)
    with pytest.raises(UserError, match="kv-budget"):
        kv_settings(bits=4, budget="0.2", key_grid="channel")
    with pytest.raises(UserError, match="kv-bits 8"):
        kv_settings(key_grid="channel")
    with pytest.raises(UserError, match="kv-key-tokens"):
        kv_settings(bits=4, key_grid="token", key_tokens=16)
    for bad_group in (5, 0, 32):  # not a divisor of the head dimension 16, or < 1
        with pytest.raises(UserError, match="kv-group"):
            KVCache(model.config, KVSettings(bits=4, group=bad_group))
    with pytest.raises(UserError, match="kv-budget"):  # built directly, the combination is refused too
        KVCache(model.config, KVSettings(bits=4, budget=8, key_grid="channel"), 16)


def test_memory_report_counts_the_channel_grid_and_its_residual(model):
    report = memory_report(model.config, KVSettings(bits=4, group=8, key_tokens=4), torch.float32)
    # per layer and KV head: keys 16/2 codes + 16 channels x 4 bytes / 4 tokens; values 8 + 2 groups x 4 bytes
    assert report["bytes_per_token"] == 2 * 2 * ((8 + 16) + (8 + 8)) == kv_bytes_per_token(2, 2, 16, 4, 8, 4, 4)
    assert report["key_grid"] == "channel" and report["key_residual_max_bytes"] == 2 * 2 * 3 * 16 * 4
    line = format_memory(report)
    assert "keys per channel over 4 tokens" in line and "768 bytes of exact keys" in line
    token = memory_report(model.config, KVSettings(bits=4, group=8, key_grid="token"))
    assert token["key_grid"] == "token" and "key_residual_max_bytes" not in token
    assert "keys and values per token" in format_memory(token)


def test_cli_int4_with_the_channel_key_grid(tiny_folder, capsys, tmp_path):
    import json

    folder = tiny_folder("llama")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    argv = ["eval", str(folder), "--ppl-data", str(text), "--seqlen", "64", "--limit", "2", "--json"]
    assert run_cli([*argv, "--kv-bits", "4", "--profile"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["kv_cache"]["key_grid"] == "channel" and default["kv_cache"]["key_tokens"] == 32
    assert default["profile"]["kv_cache"]["key_residual_max_bytes"] > 0
    assert run_cli([*argv, "--kv-bits", "4", "--kv-key-grid", "token"]) == 0
    token = json.loads(capsys.readouterr().out)
    assert token["kv_cache"]["key_grid"] == "token" and token["perplexity"] != default["perplexity"]
    assert run_cli([*argv, "--kv-bits", "4", "--kv-key-grid", "channel", "--kv-key-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"]["settings"]["key_tokens"] == 8
    for bad, message in (
        (["--kv-bits", "4", "--kv-key-grid", "diag"], "kv-key-grid 'diag'"),
        (["--kv-bits", "4", "--kv-key-tokens", "0"], "kv-key-tokens"),
        (["--kv-bits", "4", "--kv-group", "5"], "kv-group"),
        (["--kv-bits", "4", "--kv-budget", "16", "--kv-key-grid", "channel"], "kv-budget"),
    ):
        assert run_cli([*argv, *bad]) != 0
        assert message in capsys.readouterr().err
    gen = ["generate", str(folder), "--prompt", "The quick brown fox", "--max-new-tokens", "4", "--json"]
    assert run_cli([*gen, "--kv-bits", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 4 and result["kv_cache"]["settings"]["key_grid"] == "channel"
