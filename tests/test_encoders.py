"""BERT-style encoders: every pruning path, save/load, MLM perplexity and embedding similarity, CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import run_cli as run
from transformers import AutoConfig

import lmcompress
from lmcompress import PruneConfig, UserError
from lmcompress.calibration.data import calibration_windows
from lmcompress.calibration.engine import capture_block_inputs, run_block
from lmcompress.checkpoint.load import auto_model_class, load_model
from lmcompress.checkpoint.save import save_model
from lmcompress.measure.encoder import (
    cosine_similarity,
    evaluate_encoder,
    mask_tokens,
    mlm_perplexity,
    mlm_windows,
    sentence_embeddings,
    sentences,
)
from lmcompress.models.families import blocks_path, context_length, find_prunable, get_blocks, weight_matrix
from lmcompress.models.tiny import TINY_ENCODER_CONFIGS, build_encoder_tokenizer, build_tiny_encoder

ENCODERS = sorted(TINY_ENCODER_CONFIGS)
CASES = [(f, h) for f in ("bert", "roberta") for h in (True, False)]
ALL_CASES = [*CASES, ("distilbert", True), ("xlm-roberta", False)]


@pytest.fixture(scope="module")
def enc_tokenizer(calib_text):
    return build_encoder_tokenizer(calib_text, vocab_size=320)


@pytest.fixture(scope="module")
def enc_calib(enc_tokenizer, calib_text) -> torch.Tensor:
    return calibration_windows(enc_tokenizer, calib_text, nsamples=8, seqlen=64, seed=0)


def make(family: str, tokenizer, mlm_head: bool = True, **kw):
    # A larger init than BERT's 0.02 so that the blocks, not the residual stream alone, shape the output.
    kw.setdefault("initializer_range", 0.2)
    return build_tiny_encoder(family, len(tokenizer), mlm_head=mlm_head, max_positions=128, seed=1, **kw)


def outside_blocks(model) -> dict[str, torch.Tensor]:
    prefix = blocks_path(model)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("mlm_head", [True, False])
def test_blocks_found_in_bare_and_mlm_models(family, mlm_head, enc_tokenizer, enc_calib):
    model = make(family, enc_tokenizer, mlm_head)
    path = blocks_path(model)
    assert path.endswith(("encoder.layer", "transformer.layer"))
    assert path.count(".") == (2 if mlm_head else 1)
    blocks = get_blocks(model)
    assert len(blocks) == 2
    layers = find_prunable(blocks[0])
    assert len(layers) == 6  # q, k, v, attention out, FFN in, FFN out
    assert not any("embed" in n or "pooler" in n or "predictions" in n for n in layers)
    # the walker reproduces the model's own hidden states
    ids = enc_calib[:2]
    with torch.no_grad():
        ref = [model(row.unsqueeze(0), output_hidden_states=True).hidden_states for row in ids]
    inputs = capture_block_inputs(model, ids, torch.device("cpu"))
    assert torch.allclose(inputs.hidden, torch.cat([r[0] for r in ref]), atol=1e-5)
    out = run_block(blocks[0], inputs)
    assert torch.allclose(out, torch.cat([r[1] for r in ref]), atol=1e-5)


@pytest.mark.parametrize(("family", "mlm_head"), ALL_CASES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_and_pattern(family, mlm_head, method, pattern, enc_tokenizer, enc_calib):
    model = make(family, enc_tokenizer, mlm_head)
    before = outside_blocks(model)
    config = PruneConfig(method=method, sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern)
    _, report = lmcompress.prune(model, config, enc_calib, progress=False)
    assert len(report.layer_sparsity) == 12
    assert all(name.startswith(blocks_path(model)) for name in report.layer_sparsity)
    for block in get_blocks(model):
        for layer in find_prunable(block).values():
            w = weight_matrix(layer)
            if pattern == "2:4":
                assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
            else:
                assert abs((w == 0).sum().item() - 0.5 * w.numel()) <= w.shape[0]
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    # embeddings, pooler and MLM head are untouched
    after = outside_blocks(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        out = model(enc_calib[:1])
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_on_an_encoder(method, enc_tokenizer, enc_calib):
    model = make("bert", enc_tokenizer, num_hidden_layers=4)
    config = PruneConfig(method=method, sparsity=0.6, allocation="owl", owl_lambda=0.1, owl_m=3)
    _, report = lmcompress.prune(model, config, enc_calib, progress=False)
    assert sum(report.block_targets) / 4 == pytest.approx(0.6, abs=1e-6)
    assert max(report.block_targets) - min(report.block_targets) > 0.01
    assert report.sparsity == pytest.approx(0.6, abs=0.01)


def test_include_head_is_refused_for_encoders(enc_tokenizer, enc_calib):
    model = make("bert", enc_tokenizer)
    with pytest.raises(UserError, match="include_head"):
        lmcompress.prune(model, PruneConfig(method="magnitude", include_head=True), enc_calib, progress=False)


def test_auto_class_follows_the_architecture():
    def cls(arch):
        return auto_model_class(AutoConfig.for_model("bert", architectures=arch)).__name__

    assert cls(["BertForMaskedLM"]) == "AutoModelForMaskedLM"
    assert cls(["BertModel"]) == "AutoModel"
    assert cls(["BertForSequenceClassification"]) == "AutoModelForSequenceClassification"
    assert cls(["BertLMHeadModel"]) == "AutoModelForCausalLM"
    assert cls(None) == "AutoModel"
    assert auto_model_class(AutoConfig.for_model("llama")).__name__ == "AutoModelForCausalLM"


def test_roberta_context_excludes_padding_positions(enc_tokenizer):
    model = make("roberta", enc_tokenizer)
    assert context_length(model.config) == 128  # max_position_embeddings 129, pad id 0
    ids = torch.randint(5, len(enc_tokenizer), (1, 128))
    with torch.no_grad():
        model(ids)  # the longest input it claims fits really does


@pytest.mark.parametrize(("family", "mlm_head"), CASES)
def test_save_load_round_trip_gives_identical_outputs(family, mlm_head, enc_tokenizer, enc_calib, tmp_path):
    model = make(family, enc_tokenizer, mlm_head)
    lmcompress.prune(model, PruneConfig(method="wanda", sparsity=0.5), enc_calib, progress=False)
    save_model(model, enc_tokenizer, tmp_path / "m", {"kind": "prune"})
    loaded, tok = load_model(tmp_path / "m")
    assert type(loaded) is type(model)
    assert tok.mask_token_id == enc_tokenizer.mask_token_id
    with torch.no_grad():
        a, b = model(enc_calib[:2])[0], loaded(enc_calib[:2])[0]
    assert torch.equal(a, b)
    assert lmcompress.measure_sparsity(loaded)[0] == pytest.approx(0.5, abs=0.01)


def test_masking_is_seeded_and_skips_special_tokens(enc_tokenizer, eval_text):
    windows = mlm_windows(enc_tokenizer, eval_text, 32)
    assert (windows[:, 0] == enc_tokenizer.cls_token_id).all() and (windows[:, -1] == enc_tokenizer.sep_token_id).all()
    special = set(enc_tokenizer.all_special_ids)
    x, y = mask_tokens(windows, enc_tokenizer.mask_token_id, special, prob=0.15, seed=3)
    masked = y != -100
    assert (masked.sum(1) == round(0.15 * 30)).all()
    assert not masked[:, 0].any() and not masked[:, -1].any()
    assert (x[masked] == enc_tokenizer.mask_token_id).all() and torch.equal(x[~masked], windows[~masked])
    assert torch.equal(y[masked], windows[masked])
    x2, y2 = mask_tokens(windows, enc_tokenizer.mask_token_id, special, prob=0.15, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y3 = mask_tokens(windows, enc_tokenizer.mask_token_id, special, prob=0.15, seed=4)
    assert not torch.equal(y, y3)
    xb, yb = mask_tokens(windows, 4, special, seed=3, mode="bert", vocab_size=len(enc_tokenizer))
    frac = (xb[yb != -100] == 4).float().mean().item()
    assert 0.7 < frac < 0.9  # 80% [MASK], the rest random or unchanged


def test_mlm_perplexity_matches_a_hand_computation(enc_tokenizer, eval_text):
    model = make("bert", enc_tokenizer)
    windows = mlm_windows(enc_tokenizer, eval_text, 24)[:5]
    result = mlm_perplexity(model, enc_tokenizer, windows, seed=7, batch_size=2, progress=False)
    x, y = mask_tokens(windows, enc_tokenizer.mask_token_id, set(enc_tokenizer.all_special_ids), seed=7)
    nll = []
    with torch.no_grad():
        for i in range(len(windows)):
            logp = torch.log_softmax(model(x[i : i + 1]).logits[0], dim=-1)
            nll += [-logp[j, y[i, j]].item() for j in range(windows.shape[1]) if y[i, j] != -100]
    assert result.masked == len(nll) == 5 * round(0.15 * 22)
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_mlm_perplexity_needs_a_head(enc_tokenizer, eval_text):
    model = make("bert", enc_tokenizer, mlm_head=False)
    with pytest.raises(UserError, match="no MLM head"):
        mlm_perplexity(model, enc_tokenizer, mlm_windows(enc_tokenizer, eval_text, 24)[:2], progress=False)


def test_embeddings_mean_pooling_ignores_padding(enc_tokenizer):
    model = make("roberta", enc_tokenizer, mlm_head=False)
    texts = ["a short sentence here.", "a much longer sentence that needs padding in the other one of the batch."]
    together = sentence_embeddings(model, enc_tokenizer, texts, progress=False)
    alone = torch.cat([sentence_embeddings(model, enc_tokenizer, [t], progress=False) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    cls = sentence_embeddings(model, enc_tokenizer, texts, pooling="cls", progress=False)
    pooler = sentence_embeddings(model, enc_tokenizer, texts, pooling="pooler", progress=False)
    assert not torch.allclose(cls, together) and not torch.allclose(pooler, cls)
    with pytest.raises(UserError, match="no pooler"):
        sentence_embeddings(make("bert", enc_tokenizer), enc_tokenizer, texts, pooling="pooler", progress=False)


@pytest.mark.parametrize(("family", "mlm_head"), [("bert", True), ("roberta", False)])
def test_cosine_is_one_unpruned_and_drops_with_pruning(family, mlm_head, enc_tokenizer, enc_calib, eval_text):
    dense = make(family, enc_tokenizer, mlm_head)
    model = copy.deepcopy(dense)
    kw = dict(seqlen=32, nsentences=64, progress=False)
    same = evaluate_encoder(model, enc_tokenizer, eval_text, reference=dense, **kw)
    assert same["embedding_similarity"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["embedding_similarity"]["min"] == pytest.approx(1.0, abs=1e-6)
    lmcompress.prune(model, PruneConfig(method="magnitude", sparsity=0.3), progress=False)
    light = evaluate_encoder(model, enc_tokenizer, eval_text, reference=dense, **kw)["embedding_similarity"]
    lmcompress.prune(model, PruneConfig(method="magnitude", sparsity=0.9), progress=False)
    heavy = evaluate_encoder(model, enc_tokenizer, eval_text, reference=dense, **kw)
    sim = heavy["embedding_similarity"]
    assert sim["min"] <= sim["mean"] < light["mean"] < 1.0 - 1e-4
    assert sim["centered_mean"] < light["centered_mean"] < 1.0 - 1e-4
    assert same["embedding_similarity"]["centered_mean"] == pytest.approx(1.0, abs=1e-6)
    assert sim["sentences"] == 64
    if mlm_head:
        assert heavy["mlm"]["perplexity"] != same["mlm"]["perplexity"]
    else:
        assert heavy["mlm"] is None


def test_centered_cosine_ignores_a_shared_direction():
    ref = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    shifted = cosine_similarity(ref + 100.0, ref)
    assert shifted["centered_mean"] == pytest.approx(1.0, abs=1e-9) and shifted["mean"] < 1.0
    scrambled = cosine_similarity(ref[torch.randperm(50)] + 100.0, ref + 100.0)
    assert scrambled["mean"] > 0.99 and scrambled["centered_mean"] < 0.5  # the raw score hides the loss


def test_cosine_rejects_mismatched_shapes():
    with pytest.raises(UserError, match="cannot be compared"):
        cosine_similarity(torch.ones(3, 4), torch.ones(3, 5))


def test_sentences_skip_headings():
    text = " = Heading = \n The first sentence is here now. And a second one is here too ! \n short .\n"
    assert sentences(text) == ["The first sentence is here now.", "And a second one is here too !"]


def test_cli_prune_then_eval_an_encoder(enc_tokenizer, tmp_path, capsys):
    dense = make("bert", enc_tokenizer)
    save_model(dense, enc_tokenizer, tmp_path / "dense", {"kind": "test-model"})
    out = tmp_path / "pruned"
    options = ["--calib-data", "bundled:wikitext2-valid", "--nsamples", "4", "--seqlen", "64", "-q"]
    assert (
        run(["prune", str(tmp_path / "dense"), "-o", str(out), "--method", "sparsegpt", "--pattern", "2:4", *options])
        == 0
    )
    assert (out / "lmcompress.json").is_file()
    capsys.readouterr()
    assert run(["eval", str(out), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "-q"]) == 0
    text = capsys.readouterr().out
    assert "MLM perplexity" in text and "embedding cosine similarity to" in text  # reference from the recipe
    assert "sparsity 50.00%" in text
    result = lmcompress.evaluate_pretrained(
        out, "bundled:wikitext2-test", seqlen=64, reference=str(tmp_path / "dense"), progress=False
    )
    dense_result = lmcompress.evaluate_pretrained(
        tmp_path / "dense", "bundled:wikitext2-test", seqlen=64, reference=str(tmp_path / "dense"), progress=False
    )
    assert dense_result["embedding_similarity"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["embedding_similarity"]["mean"] < 1.0 - 1e-4
    assert result["mlm"]["masked"] == dense_result["mlm"]["masked"]  # same masks for both
    assert result["perplexity"] == result["mlm"]["perplexity"] != dense_result["perplexity"]


def test_eval_without_reference_reports_mlm_only(enc_tokenizer, tmp_path, capsys):
    save_model(make("roberta", enc_tokenizer), enc_tokenizer, tmp_path / "m", {"kind": "test-model"})
    assert run(["eval", str(tmp_path / "m"), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "-q"]) == 0
    text = capsys.readouterr().out
    assert "MLM perplexity" in text and "no dense reference" in text


def test_calibration_text_is_plain_token_windows(enc_tokenizer, enc_calib):
    """Calibration windows are cut from the token stream (documented): no per-window [CLS]/[SEP] framing."""
    assert enc_calib.shape == (8, 64)
    assert (enc_calib == enc_tokenizer.pad_token_id).sum() == 0


@pytest.mark.parametrize(("family", "mlm_head"), [("bert", True), ("roberta", False)])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantization_runs_on_encoders(family, mlm_head, method, enc_tokenizer, enc_calib, eval_text):
    from lmcompress.transforms.quantize import QuantConfig, quantize

    dense = make(family, enc_tokenizer, mlm_head)
    model = copy.deepcopy(dense)
    before = outside_blocks(model)
    report = quantize(model, QuantConfig(method=method, bits=4, group_size=32), enc_calib, progress=False)
    assert len(report.quantized) == 12
    assert all(k.startswith(blocks_path(model) + ".") for k in report.quantized)
    for block in get_blocks(model):
        for layer in find_prunable(block).values():
            w = weight_matrix(layer)
            groups = w.reshape(w.shape[0], -1, 32)
            assert max(len(torch.unique(g)) for g in groups.flatten(0, 1)) <= 16  # 4-bit grid per group
    after = outside_blocks(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    res = evaluate_encoder(model, enc_tokenizer, eval_text, reference=dense, seqlen=32, nsentences=32, progress=False)
    assert 0.5 < res["embedding_similarity"]["mean"] < 1.0 - 1e-6
    if mlm_head:
        assert math.isfinite(res["mlm"]["perplexity"])


def test_cli_quantize_then_eval_an_encoder(enc_tokenizer, tmp_path, capsys):
    dense = make("bert", enc_tokenizer)
    save_model(dense, enc_tokenizer, tmp_path / "dense", {"kind": "test-model"})
    out = tmp_path / "q"
    options = ["--calib-data", "bundled:wikitext2-valid", "--nsamples", "4", "--seqlen", "64", "-q"]
    assert (
        run(["quantize", str(tmp_path / "dense"), "-o", str(out), "--bits", "4", "--group-size", "32", *options]) == 0
    )
    capsys.readouterr()
    assert run(["eval", str(out), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "-q"]) == 0
    text = capsys.readouterr().out
    assert "MLM perplexity" in text and "embedding cosine similarity to" in text


def test_sentence_transformers_pooling_config_is_followed(enc_tokenizer, tmp_path):
    model = make("roberta", enc_tokenizer, mlm_head=False)
    folder = tmp_path / "st"
    save_model(model, enc_tokenizer, folder, {"kind": "test-model"})
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}'
    )
    result = lmcompress.evaluate_pretrained(
        folder, "bundled:wikitext2-test", seqlen=64, reference=str(folder), progress=False
    )
    assert result["pooling"] == "cls"
    assert result["mlm"] is None and result["perplexity"] is None
    assert result["embedding_similarity"]["mean"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(UserError, match="unknown pooling"):
        lmcompress.evaluate_pretrained(
            folder, "bundled:wikitext2-test", seqlen=64, reference=str(folder), pooling="max", progress=False
        )


def test_packed_and_joint_outputs_of_an_encoder_load_and_evaluate(enc_tokenizer, enc_calib, tmp_path, capsys):
    from lmcompress.checkpoint.load import load

    save_model(make("roberta", enc_tokenizer), enc_tokenizer, tmp_path / "dense", {"kind": "test-model"})
    options = ["--calib-data", "bundled:wikitext2-valid", "--nsamples", "4", "--seqlen", "64", "-q"]
    prune = ["prune", str(tmp_path / "dense"), "--method", "sparsegpt", *options]
    assert run([*prune, "-o", str(tmp_path / "plain"), "--pattern", "2:4"]) == 0
    assert run([*prune, "-o", str(tmp_path / "packed"), "--pattern", "2:4", "--save-format", "packed"]) == 0
    assert run([*prune, "-o", str(tmp_path / "joint"), "--sparsity", "0.5", "--bits", "4", "--group-size", "32"]) == 0
    plain, _ = load(tmp_path / "plain")
    packed, _ = load(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(plain(enc_calib[:2]).logits, packed(enc_calib[:2]).logits)
    capsys.readouterr()
    for name in ("packed", "joint"):
        assert run(["eval", str(tmp_path / name), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "64", "-q"]) == 0
        text = capsys.readouterr().out
        assert "MLM perplexity" in text and "embedding cosine similarity to" in text
