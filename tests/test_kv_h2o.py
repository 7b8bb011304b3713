"""H2O as the paper defines it (scores, keep-set, budget split, token-by-token protocol) and the generated
passage QA the KV cache is measured with (lmcompress.measure.tasks.planted_qa)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from lmcompress.algorithms.kv import dequantize_kv, h2o_keep, quantize_kv
from lmcompress.errors import UserError
from lmcompress.kv_cache import KVCache, KVSettings, attach, format_memory, kv_settings, memory_report, window_nll
from lmcompress.measure.tasks import parse_tasks, planted_qa
from lmcompress.models.tiny import build_tiny_model
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", 320, max_positions=256)  # 4 query heads sharing 2 KV heads


def _ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(3))


def _fill(model, ids, settings, *caches):
    """Run ``ids`` through ``model`` into each cache under ``settings``; return the full-attention weights."""
    with attach(model, settings), torch.no_grad():
        for cache in caches:
            model(ids, cache=cache, use_cache=True)
        return model(ids, use_cache=False, output_attentions=True).attentions


def _direct_scores(attentions, kv_heads: int) -> list[torch.Tensor]:
    """Per layer ``[B, H_kv, T]``: each key's attention summed over every query and over the query heads
    that read that KV head (query head ``h`` reads KV head ``h // (H_q / H_kv)``), written out head by head."""
    out = []
    for a in attentions:  # [B, H_q, q, T]
        group = a.shape[1] // kv_heads
        s = torch.zeros(a.shape[0], kv_heads, a.shape[-1], dtype=torch.float32)
        for h in range(a.shape[1]):
            s[:, h // group] += a[:, h].float().sum(dim=1)
        out.append(s)
    return out


def test_scores_are_column_sums_over_queries_and_the_heads_of_a_group(model):
    ids = _ids(24)
    settings = KVSettings(budget=24)  # nothing evicted
    cache = KVCache(model.config, settings, 24)
    with attach(model, settings), torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        attentions = model(ids, use_cache=False, output_attentions=True).attentions
    assert model.config.num_attention_heads == 2 * model.config.num_key_value_heads
    for layer, direct in zip(cache.layers, _direct_scores(attentions, 2), strict=True):
        torch.testing.assert_close(layer.scores, direct)
        # every query's weights sum to 1: the column sums of a group add up to (queries x heads in the group)
        torch.testing.assert_close(layer.scores.sum(-1), torch.full((2, 2), 24.0 * 2))


def test_prefill_evicts_to_recent_window_plus_heavy_hitters_per_layer_and_kv_head():
    model = build_tiny_model("llama", 320, max_positions=256)
    with torch.no_grad():  # peaky attention, so that the heavy hitters are not simply the oldest tokens
        for module in model.modules():
            if hasattr(module, "k_proj"):
                module.k_proj.weight.mul_(12)
    ids = _ids(24)
    settings = KVSettings(budget=10, recent=0.5, score="sum")  # the paper's split: 5 recent + 5 heavy hitters
    cache = KVCache(model.config, settings, 24)
    full = KVCache(model.config, KVSettings(budget=100), 24)
    attentions = _fill(model, ids, settings, cache, full)
    chosen = set()
    for layer, ref, direct in zip(cache.layers, full.layers, _direct_scores(attentions, 2), strict=True):
        assert layer.budget == 10 and layer.recent == 5
        for b in range(2):
            for h in range(2):
                heavy = sorted(direct[b, h, :19].topk(5).indices.tolist())  # the 5 largest among tokens 0..18
                keep = heavy + list(range(19, 24))
                chosen.add(tuple(heavy))
                torch.testing.assert_close(layer.keys[b, h], ref.keys[b, h, keep])
                torch.testing.assert_close(layer.values[b, h], ref.values[b, h, keep])
                torch.testing.assert_close(layer.scores[b, h], direct[b, h, keep])
    assert len(chosen) > 1  # layers / heads keep different tokens


def test_each_decode_step_adds_its_weights_over_the_held_tokens_then_evicts_one(model):
    ids = _ids(20, 1)
    settings = KVSettings(budget=8, recent=0.25, score="sum")
    cache = KVCache(model.config, settings, 20)
    with attach(model, settings), torch.no_grad():
        model(ids[:, :8], cache=cache, use_cache=True)
        before = [layer.scores.clone() for layer in cache.layers]
        keys_before = [layer.keys.clone() for layer in cache.layers]
        out = model(ids[:, 8:9], cache=cache, use_cache=True, output_attentions=True)
    for layer, old, old_keys, att in zip(cache.layers, before, keys_before, out.attentions, strict=True):
        assert att.shape[-1] == 9  # the new token attended to the 8 held tokens and itself
        step = _direct_scores([att], 2)[0]
        acc = torch.cat([old, torch.zeros(1, 2, 1)], dim=-1) + step
        # recent 2 = tokens 7 and 8; heavy 6 of tokens 0..6: one of them is evicted, the smallest score
        for h in range(2):
            dropped = int(acc[0, h, :7].argmin())
            keep = [i for i in range(9) if i != dropped]
            torch.testing.assert_close(layer.scores[0, h], acc[0, h, keep])
            torch.testing.assert_close(layer.keys[0, h, :7], old_keys[0, h, [i for i in range(8) if i != dropped]])


def test_default_is_a_quarter_recent_ranked_by_mean_and_the_paper_split_is_an_option():
    assert (KVSettings().recent, KVSettings().score, KVSettings().sinks) == (0.25, "mean", 0)
    checked = kv_settings(budget="0.2")
    assert (checked.recent, checked.score) == (0.25, "mean")
    cfg = build_tiny_model("llama", 320, max_positions=256).config
    cache = KVCache(cfg, KVSettings(budget=0.2), 2048)
    assert cache.budget == 410 and all(layer.recent == 102 and layer.score == "mean" for layer in cache.layers)
    paper = KVCache(cfg, KVSettings(budget=0.2, recent=0.5, score="sum"), 2048)  # --kv-recent 0.5 --kv-score sum
    assert all(layer.recent == 205 and layer.score == "sum" for layer in paper.layers)


def test_chunk_one_is_token_by_token_and_differs_from_larger_chunks(model):
    ids = _ids(32)
    settings = KVSettings(budget=8, chunk=1)
    with attach(model, settings):
        nll = window_nll(model, ids, settings)
        chunked = window_nll(model, ids, KVSettings(budget=8, chunk=4))
    cache = KVCache(model.config, settings, 32)
    with attach(model, settings), torch.no_grad():
        logits = [model(ids[:, :8], cache=cache, use_cache=True).logits]
        logits += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(8, 32)]
    logits = torch.cat(logits, 1)[:, :-1].float()
    manual = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, -1)
    torch.testing.assert_close(nll, manual)
    assert nll.shape == chunked.shape == (2, 31)
    assert torch.equal(nll[:, :8], chunked[:, :8]) and not torch.equal(nll, chunked)


def test_cache_memory_per_token_with_eviction(model):
    full = memory_report(model.config, None)
    assert full["bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, 16 channels, float32
    h2o = memory_report(model.config, KVSettings(budget=0.25, bits=8, score="sum"))
    held = h2o["bytes_per_token"] + h2o["score_bytes_per_token"]
    assert h2o["bytes_per_token"] == 2 * 2 * 2 * (16 + 4) and h2o["score_bytes_per_token"] == 4 * 2 * 2
    assert h2o["evicted_bytes_per_token"] == pytest.approx(0.25 * held)
    assert "bytes per sequence token once full" in format_memory(h2o)
    count = memory_report(model.config, KVSettings(budget=64, score="sum"))
    assert count["max_cache_bytes"] == 64 * (full["bytes_per_token"] + 16) and "at most" in format_memory(count)


# ------------------------------------------------------------- the stated options: attention sinks, mean score


def _peaky():
    model = build_tiny_model("llama", 320, max_positions=256)
    with torch.no_grad():  # peaky attention, so that eviction choices depend on the scores
        for module in model.modules():
            if hasattr(module, "k_proj"):
                module.k_proj.weight.mul_(12)
    return model


def test_h2o_keep_with_sinks():
    scores = torch.tensor([[0.0, 0.1, 9.0, 0.2, 0.3, 7.0, 0.0, 0.0]])
    assert h2o_keep(scores, budget=5, recent=2, sinks=1).tolist() == [[0, 2, 5, 6, 7]]
    assert h2o_keep(scores, budget=4, recent=2, sinks=2).tolist() == [[0, 1, 6, 7]]  # no heavy share left
    assert h2o_keep(scores, budget=3, recent=0, sinks=1).tolist() == [[0, 2, 5]]
    with pytest.raises(ValueError):
        h2o_keep(scores, budget=4, recent=3, sinks=2)


@pytest.mark.parametrize(
    "options",
    [{"sinks": 4}, {"score": "mean"}, {"score": "decay"}, {"sinks": 2, "score": "mean", "recent": 0.25, "pool": 5}],
)
def test_options_with_a_budget_of_the_whole_sequence_equal_the_full_cache(model, options):
    ids = _ids(40)
    settings = KVSettings(budget=40, **options)
    with attach(model, settings):
        streamed = window_nll(model, ids, settings)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
        chunked = window_nll(model, ids, KVSettings(budget=1.0, chunk=3, **options), prefill=5)
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, -1)
    assert torch.equal(streamed, reference)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)


def test_mean_score_is_the_column_sum_over_the_queries_that_saw_each_token():
    model = _peaky()
    ids = _ids(27)
    settings = KVSettings(budget=27, score="mean")  # nothing evicted: the cache sees the full attention
    cache = KVCache(model.config, settings, 27)
    with attach(model, settings), torch.no_grad():
        model(ids[:, :20], cache=cache, use_cache=True)  # a prefill, then chunks of 4 and 3 tokens
        model(ids[:, 20:24], cache=cache, use_cache=True)
        model(ids[:, 24:], cache=cache, use_cache=True)
        attentions = model(ids, use_cache=False, output_attentions=True).attentions
    group = model.config.num_attention_heads // 2
    seen_by = torch.arange(27, 0, -1, dtype=torch.float32) * group  # token j: queries j..26 of every query head
    for layer, direct in zip(cache.layers, _direct_scores(attentions, 2), strict=True):
        torch.testing.assert_close(layer.scores, direct)  # the sum (the H2O paper's score) is unchanged
        torch.testing.assert_close(layer.counts, seen_by.expand(2, 2, 27))
        torch.testing.assert_close(layer.ranking(), direct / seen_by)
        assert not torch.allclose(layer.ranking().argsort(-1), direct.argsort(-1))  # it ranks differently


def test_decayed_score_weights_each_query_by_decay_to_its_age():
    model = _peaky()
    ids = _ids(27)
    settings = KVSettings(budget=27, score="decay", decay=0.9)
    cache = KVCache(model.config, settings, 27)
    with attach(model, settings), torch.no_grad():
        for start, end in ((0, 20), (20, 24), (24, 25), (25, 27)):
            model(ids[:, start:end], cache=cache, use_cache=True)
        attentions = model(ids, use_cache=False, output_attentions=True).attentions
    age = 0.9 ** torch.arange(26, -1, -1, dtype=torch.float32)  # query i of 27 counts 0.9^(26 − i)
    for layer, a in zip(cache.layers, attentions, strict=True):
        direct = _direct_scores([a * age[:, None]], 2)[0]
        torch.testing.assert_close(layer.ranking(), direct)
        assert not torch.equal(direct.argsort(-1), _direct_scores([a], 2)[0].argsort(-1))


def test_pooled_ranking_is_the_largest_score_of_the_neighbours():
    model = _peaky()
    ids = _ids(24)
    settings = KVSettings(budget=10, recent=0.5, score="mean", pool=3)  # 5 recent + 5 heavy by the pooled mean
    cache = KVCache(model.config, settings, 24)
    full = KVCache(model.config, KVSettings(budget=100), 24)
    attentions = _fill(model, ids, settings, cache, full)
    mean = [d / (torch.arange(24, 0, -1, dtype=torch.float32) * 2) for d in _direct_scores(attentions, 2)]
    differs = False
    for layer, ref, m in zip(cache.layers, full.layers, mean, strict=True):
        for b in range(2):
            for h in range(2):
                pooled = torch.stack([m[b, h, max(0, t - 1) : t + 2].max() for t in range(24)])
                heavy = sorted(pooled[:19].topk(5).indices.tolist())
                torch.testing.assert_close(layer.keys[b, h], ref.keys[b, h, [*heavy, *range(19, 24)]])
                differs |= heavy != sorted(m[b, h, :19].topk(5).indices.tolist())
    assert differs  # pooling changed some keep-set


@pytest.mark.parametrize("bits", [16, 8])
def test_value_norm_ranks_by_score_times_the_l1_norm_of_the_stored_value(bits):
    model = _peaky()
    ids = _ids(24)
    settings = KVSettings(budget=24, score="mean", value_norm=True, bits=bits)  # nothing evicted
    cache = KVCache(model.config, settings, 24)
    exact = KVCache(model.config, KVSettings(budget=24), 24)
    attentions = _fill(model, ids, settings, cache, exact)
    seen_by = torch.arange(24, 0, -1, dtype=torch.float32) * 2
    layers = zip(cache.layers, exact.layers, _direct_scores(attentions, 2), strict=True)
    for i, (layer, ref, direct) in enumerate(layers):
        values = ref.values
        if bits == 8:  # the stored values, on the grid; in layer 0 those of the exact cache, quantized
            values = dequantize_kv(*layer.qvalues, 8, layer.group, torch.float32)
            if i == 0:
                torch.testing.assert_close(
                    values, dequantize_kv(*quantize_kv(ref.values, 8, layer.group), 8, layer.group, torch.float32)
                )
        else:
            torch.testing.assert_close(layer.scores, direct)
        mean = layer.scores / seen_by
        torch.testing.assert_close(layer.ranking(), mean * values.abs().sum(-1))
        assert not torch.equal(layer.ranking().argsort(-1), mean.argsort(-1))


def test_mean_score_evicts_by_the_mean_and_keeps_the_sinks():
    model = _peaky()
    ids = _ids(24)
    settings = KVSettings(budget=10, recent=0.5, sinks=2, score="mean")  # 2 sinks, then 4 recent + 4 heavy
    cache = KVCache(model.config, settings, 24)
    full = KVCache(model.config, KVSettings(budget=100), 24)
    attentions = _fill(model, ids, settings, cache, full)
    seen_by = torch.arange(24, 0, -1, dtype=torch.float32) * 2
    for layer, ref, direct in zip(cache.layers, full.layers, _direct_scores(attentions, 2), strict=True):
        assert (layer.budget, layer.sinks, layer.recent) == (10, 2, 4)
        mean = direct / seen_by
        for b in range(2):
            for h in range(2):
                heavy = sorted((mean[b, h, 2:20].topk(4).indices + 2).tolist())
                keep = [0, 1, *heavy, *range(20, 24)]
                torch.testing.assert_close(layer.keys[b, h], ref.keys[b, h, keep])
                torch.testing.assert_close(layer.scores[b, h], direct[b, h, keep])
                torch.testing.assert_close(layer.counts[b, h], seen_by[keep])


@pytest.mark.parametrize("score", ["sum", "mean", "decay"])
def test_sinks_are_never_evicted_token_by_token(score):
    model = _peaky()
    ids = _ids(48, 1)
    evicted_without = set()
    for sinks in (0, 3):
        settings = KVSettings(budget=8, recent=0.25, sinks=sinks, score=score, decay=0.5)
        cache = KVCache(model.config, settings, 48)
        full = KVCache(model.config, KVSettings(budget=100), 48)
        with attach(model, settings), torch.no_grad():
            model(ids[:, :8], cache=full, use_cache=True)
            model(ids[:, :8], cache=cache, use_cache=True)
            for t in range(8, 48):
                model(ids[:, t : t + 1], cache=full, use_cache=True)
                model(ids[:, t : t + 1], cache=cache, use_cache=True)
                for i, (layer, ref) in enumerate(zip(cache.layers, full.layers, strict=True)):
                    assert layer.keys.shape[-2] == 8
                    held = (layer.keys[0, :, :3] == ref.keys[0, :, :3]).all(-1)  # [H_kv, 3]
                    if sinks:
                        assert held.all(), (t, i)
                    else:
                        evicted_without |= {(i, h) for h in range(2) if not held[h].all()}
    if score != "sum":  # without sinks some layer / head drops one of the first three tokens (the sum favours them)
        assert evicted_without


def test_sinks_and_score_options_are_checked(tiny_folder, capsys, tmp_path):
    checked = kv_settings(budget="0.2", sinks=4, score="mean")
    assert (checked.budget, checked.sinks, checked.score) == (0.2, 4, "mean")
    with pytest.raises(UserError, match="kv-sinks"):
        kv_settings(budget="0.2", sinks=-1)
    with pytest.raises(UserError, match="kv-score"):
        kv_settings(budget="0.2", score="max")
    with pytest.raises(UserError, match="kv-decay"):
        kv_settings(budget="0.2", score="decay", decay=0.0)
    with pytest.raises(UserError, match="kv-pool"):
        kv_settings(budget="0.2", pool=4)
    cfg = build_tiny_model("llama", 320, max_positions=256).config
    cache = KVCache(cfg, KVSettings(budget=0.2, recent=0.5, sinks=4), 2048)
    assert cache.budget == 410 and cache.layers[0].sinks == 4 and cache.layers[0].recent == 203  # half of 406
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    argv = ["eval", str(tiny_folder("llama")), "--ppl-data", str(text), "--seqlen", "64", "--limit", "2", "--json"]
    assert run_cli([*argv, "--kv-budget", "16", "--kv-sinks", "4", "--kv-score", "mean"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache"]["settings"]["sinks"] == 4 and out["kv_cache"]["settings"]["score"] == "mean"
    report = out["kv_cache"]
    assert report["score_bytes_per_token"] == 2 * 4 * report["layers"] * report["kv_heads"]  # a count beside each sum
    assert "the first 4 always, score mean" in format_memory(report)
    assert run_cli([*argv, "--kv-sinks", "4"]) != 0
    assert "kv-sinks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- generated passage QA


@pytest.fixture(scope="module")
def encode(tokenizer):
    return lambda s: tokenizer(s)["input_ids"]


def test_planted_qa_examples(encode, eval_text):
    examples = planted_qa.make_examples(encode, lengths=[256, 512], n=10, filler=eval_text)
    again = planted_qa.make_examples(encode, lengths=[256, 512], n=10, filler=eval_text)
    assert [e.prompt for e in examples] == [e.prompt for e in again]
    assert {e.length for e in examples} == {256, 512} and {e.depth for e in examples} == {0, 0.25, 0.5, 0.75, 1}
    assert len({e.kind for e in examples}) == 4
    for ex in examples:
        assert ex.tokens <= ex.length and ex.tokens == len(encode(ex.prompt)) and ex.tokens > ex.length - 24
        template, question, _ = planted_qa.FACTS[ex.kind]
        name = re.fullmatch(question.format(name="(\\w+)").replace("?", "\\?"), ex.question).group(1)
        target = template.format(name=name, value=ex.answer)
        assert ex.prompt.count(target) == 1
        prose = ex.context.removeprefix(planted_qa.HEADER).split("\n\nQuestion:")[0]
        fact = template.format(name="\\w+", value="(\\w+)").replace(".", "\\.")
        planted = re.findall(r"\b" + fact, prose)
        assert len(planted) == 4 and len(set(planted)) == 4 and ex.answer in planted  # 3 distractors
        shot_answer = ex.context.rstrip().rsplit("Answer: ", 1)[1]
        assert shot_answer in planted and shot_answer != ex.answer
        # the depth in the prose without the other facts: where the target was inserted
        alone = prose
        for other in {m.group(0) for m in re.finditer(r"\b" + fact, prose)} - {target}:
            alone = alone.replace(other + " ", "").replace(other, "")
        where = alone.index(target) / (len(alone) - len(target))
        assert abs(where - ex.depth) < 0.15, (where, ex.depth)
    with pytest.raises(UserError, match="at least 64"):
        planted_qa.make_examples(encode, lengths=[32], filler=eval_text)


class _Stub:
    """Answers by reading the asked-about person's fact from the prompt (or a distractor's)."""

    def __init__(self, wrong: bool = False) -> None:
        self.wrong = wrong

    def generate(self, prompts, **kwargs):
        out = []
        for p in prompts:
            name = re.findall(r"(?:is |does |old is )(\w+)(?:'s|\b)", p.rsplit("Question:", 1)[1])[0]
            kind = next(k for k, (_, q, _) in planted_qa.FACTS.items() if q.format(name=name) in p)
            pattern = planted_qa.FACTS[kind][0].format(name="(\\w+)", value="(\\w+)").replace(".", "\\.")
            facts = dict(re.findall(pattern, p))
            out.append(" " + (next(v for n, v in facts.items() if n != name) if self.wrong else facts[name]) + "\n")
        return out


def test_planted_qa_scores_with_intervals(encode, eval_text):
    examples = planted_qa.make_examples(encode, lengths=[128], n=8, filler=eval_text)
    right = planted_qa.evaluate_planted_qa(_Stub(), examples)
    assert right["em"] == 1.0 and right["f1"] == 1.0 and right["n"] == 8 and right["em_ci"][1] == 1.0
    assert right["em_ci"][0] < 1.0 and set(right["by_depth"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    wrong = planted_qa.evaluate_planted_qa(_Stub(wrong=True), examples)
    assert wrong["em"] == 0.0 and wrong["f1"] == 0.0


def test_qa_task_spec_without_a_source_is_the_generated_task():
    assert [str(s) for s in parse_tasks("qa,qa:triviaqa")] == ["qa", "qa:triviaqa"]
    assert parse_tasks("qa")[0].source is None
    with pytest.raises(UserError, match="after the colon"):
        parse_tasks("qa:")
    with pytest.raises(UserError, match="needs a source"):
        parse_tasks("mc")


def test_eval_cli_runs_generated_qa_through_the_compressed_cache(tiny_folder, capsys):
    folder = tiny_folder("llama")
    argv = ["eval", str(folder), "--tasks", "qa,retrieval", "--limit", "4", "--json"]
    assert run_cli([*argv, "--retrieval-lengths", "96", "--kv-budget", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    qa = out["tasks"]["qa"]
    assert qa["n"] == 4 and 0 <= qa["em"] <= qa["f1"] + 1e-9 <= 1 and len(qa["em_ci"]) == 2
    assert "lengths [96]" in qa["data"] and out["kv_cache"]["settings"]["budget"] == 0.5
    assert "qa/em" in out["intervals"] and "qa/f1" in out["metrics"]


def test_retrieval_lengths_apply_to_bare_qa_and_are_refused_for_sourced_tasks(tiny_folder, capsys, tmp_path):
    folder = tiny_folder("llama")
    argv = ["eval", str(folder), "--limit", "2", "--json", "--retrieval-lengths", "96"]
    assert run_cli([*argv, "--tasks", "qa"]) == 0
    assert "lengths [96]" in json.loads(capsys.readouterr().out)["tasks"]["qa"]["data"]
    assert run_cli([*argv, "--tasks", "ppl:bundled:wikitext2-test"]) != 0
    assert "without a retrieval task or bare qa" in capsys.readouterr().err
