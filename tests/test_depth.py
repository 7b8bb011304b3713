"""Depth pruning (``shrink blocks`` / ``shrink sublayers``): the result equals the original with the removed blocks
replaced by identity, or the skipped sublayers' outputs zeroed; it loads, generates with its KV cache, exports."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_cli

from lmcompress.checkpoint.load import load, read_state_dict
from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.jobs import depth_prune_pretrained
from lmcompress.models.depth import renumbered_fields
from lmcompress.models.families import get_blocks
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.depth import DepthConfig, depth_prune, least_influential, remove_blocks, skip_sublayers

VOCAB = 320
_ALTERNATE = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
# family → overrides for a 4-block tiny model (Gemma 2/3: window 8 < the test windows, so layer types matter)
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": 8},
    "gemma2": {"layer_types": _ALTERNATE},
    "gemma3_text": {"layer_types": _ALTERNATE},
    "gpt2": {},
    "opt": {},
}
JOB = dict(calib_data="bundled:wikitext2-valid", nsamples=4, seqlen=32, progress=False)


def tiny(family: str, seed: int = 0):
    layers = {"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4}
    return build_tiny_model(family, VOCAB, max_positions=128, seed=seed, **layers, **FAMILIES.get(family, {}))


def ids(n: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x, use_cache=False).logits


def with_identity_blocks(model, drop: list[int]):
    """``model`` (a copy) whose blocks ``drop`` still run but return their input hidden states."""
    model = copy.deepcopy(model)
    blocks = get_blocks(model)
    for i in drop:

        def forward(*args, _orig=blocks[i].forward, **kwargs):
            out = _orig(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        blocks[i].forward = forward
    return model


def with_zeroed(model, path: str, indices: list[int]):
    """``model`` (a copy) whose sublayer ``path`` in blocks ``indices`` runs but returns zeros (a forward hook)."""
    model = copy.deepcopy(model)
    blocks = get_blocks(model)

    def zero(_m, _args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    for i in indices:
        blocks[i].get_submodule(path).register_forward_hook(zero)
    return model


def greedy_without_cache(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    x = prompt
    for _ in range(n):
        x = torch.cat([x, logits(model, x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_removed_blocks_equal_identity_blocks(family):
    model = tiny(family)
    reference = with_identity_blocks(model, [0, 2])
    remove_blocks(model, [0, 2])
    assert len(get_blocks(model)) == 2 and model.config.num_hidden_layers == 2
    if "layer_types" in FAMILIES[family]:
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=1e-5, atol=1e-5)
    # the original's forward differs, so the comparison can fail
    assert not torch.allclose(logits(tiny(family), x), logits(model, x), atol=1e-3)
    indices = [
        m.layer_idx for b in get_blocks(model) for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)
    ]
    assert set(indices) == {0, 1}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_generate_with_kv_cache_after_removal(family):
    model = tiny(family)
    remove_blocks(model, [1])
    prompt = ids(12)[:1]  # longer than the sliding window of 8
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, prompt, 6))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2"])
@pytest.mark.parametrize("sublayer", ["attention", "ffn"])
def test_skipped_sublayers_equal_zeroed_outputs(family, sublayer):
    model = tiny(family)
    path = {"attention": "attn" if family == "gpt2" else "self_attn", "ffn": "mlp"}[sublayer]
    reference = with_zeroed(model, path, [0, 3])
    skip_sublayers(model, {sublayer: [0, 3]})
    assert not [n for n, _ in model.named_parameters() if f".0.{path}." in n or f".3.{path}." in n]
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(tiny(family), x), logits(model, x), atol=1e-3)
    prompt = ids(12)[:1]  # block 0's attention skipped: the cache still counts the tokens seen
    assert torch.equal(
        model.generate(prompt, max_new_tokens=5, do_sample=False), greedy_without_cache(model, prompt, 5)
    )


def test_influence_picks_a_block_that_does_nothing(calib):
    model = tiny("llama")
    for p in get_blocks(model)[2].parameters():  # block 2 adds zero to the residual stream: influence 0
        if p.dim() == 2:
            p.data.zero_()
    report = depth_prune(model, DepthConfig("blocks", count=1), calib[:2, :32], progress=False)
    assert report.removed == {"blocks": [2]}
    assert report.scores["block"][2] == pytest.approx(0.0, abs=1e-6)
    assert min(s for i, s in enumerate(report.scores["block"]) if i != 2) > 1e-3
    assert least_influential([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]


def test_sublayer_influence_finds_a_dead_ffn(calib):
    model = tiny("qwen2")
    get_blocks(model)[1].mlp.down_proj.weight.data.zero_()
    get_blocks(model)[3].self_attn.o_proj.weight.data.zero_()
    report = depth_prune(model, DepthConfig("sublayers", ffn=1, attention=1), calib[:2, :32], progress=False)
    assert report.removed == {"attention": [3], "ffn": [1]}
    assert report.scores["ffn"][1] == pytest.approx(0.0, abs=1e-6)


def test_shrink_blocks_cli_writes_a_plain_folder(tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    source = tiny_folder("llama")
    out = tmp_path / "depth"
    code = run_cli(["shrink", "blocks", str(source), "--count", "1", "--calib-data", "bundled:wikitext2-valid",
                    "--nsamples", "2", "--seqlen", "32", "-q", "-o", str(out)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "2 → 1 blocks" in text and "removed blocks:" in text
    recipe = json.loads((out / "lmcompress.json").read_text())
    dropped = recipe["removed"]["blocks"]
    assert len(dropped) == 1 and len(recipe["scores"]["block"]) == 2 and "surgery" not in recipe
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    x = ids()
    torch.testing.assert_close(logits(plain, x), logits(with_identity_blocks(original, dropped), x))


def test_shrink_sublayers_loads_with_lmcompress_and_gguf_refuses(tiny_folder, tmp_path):
    from lmcompress.checkpoint.gguf_export import export_gguf

    source = tiny_folder("llama")
    out = tmp_path / "skip"
    report = depth_prune_pretrained(source, DepthConfig("sublayers", attention=1, ffn=1), out, **JOB)
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert [r["kind"] for r in recipe["surgery"]] == ["skip", "skip"]
    model, _ = load(out)
    original, _ = load(source)
    reference = with_zeroed(original, "self_attn", report.removed["attention"])
    reference = with_zeroed(reference, "mlp", report.removed["ffn"])
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(reference, x))
    stored = read_state_dict(out)
    assert stored and any(".mlp." in k for k in stored)
    assert not any(f".{report.removed['ffn'][0]}.mlp." in k for k in stored)  # skipped weights are not stored
    with pytest.raises(UserError, match=r"llama\.cpp"):
        export_gguf(out, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_removed_blocks_export_to_gguf(tiny_folder, tmp_path):
    gguf = pytest.importorskip("gguf")
    from lmcompress.checkpoint.gguf_export import export_gguf

    out = tmp_path / "depth"
    depth_prune_pretrained(tiny_folder("llama"), DepthConfig("blocks", count=1), out, **JOB)
    export_gguf(out, tmp_path / "m.gguf", qtype="f16")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert int(reader.fields["llama.block_count"].contents()) == 1
    assert {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")} == {"0"}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["blocks", "--count", "0"], "at least 1"),
        (["blocks", "--count", "2"], "all 2 blocks"),
        (["blocks", "--count", "5"], "all 2 blocks"),
        (["blocks"], "--count"),
        (["sublayers"], "nothing to skip"),
        (["sublayers", "--ffn", "3"], "exceeds"),
        (["blocks", "--count", "1", "--criterion", "wanda"], "cosine"),
        (["blocks", "--count", "1", "--ratio", "0.2"], "--ratio"),
        (["sublayers", "--ffn", "1", "--count", "1"], "--count"),
        (["blocks", "--count", "1", "--swap-scans", "1"], "--swap-scans"),
        (["blocks", "--count", "1", "--criterion", "search", "--swap-scans", "-1"], "--swap-scans must be"),
    ],
)
def test_bad_input_writes_nothing(argv, match, tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(["shrink", argv[0], str(tiny_folder("llama")), *argv[1:], "-q", "-o", str(out)])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_family_without_a_row_and_parallel_blocks_are_refused(tmp_path, tokenizer, tiny_folder):
    source = tmp_path / "neox"
    save_model(build_tiny_model("gpt_neox", tokenizer.vocab_size), tokenizer, source, {"kind": "test-model"})
    with pytest.raises(UserError, match="in parallel"):
        depth_prune_pretrained(source, DepthConfig("sublayers", ffn=1), tmp_path / "a", **JOB)
    with pytest.raises(UserError, match=r"opt blocks"):
        DepthConfig("sublayers", ffn=1).check_model(tiny("opt").config)
    bloom = build_tiny_model("bloom", tokenizer.vocab_size)
    with pytest.raises(UserError, match="not supported for 'bloom'"):
        DepthConfig("blocks", count=1).check_model(bloom.config)
    assert not (tmp_path / "a").exists()


def test_per_layer_config_fields():
    config = tiny("qwen2").config
    config.max_window_layers, config.layer_types = 2, ["full_attention"] * 2 + ["sliding_attention"] * 2
    fields = renumbered_fields(config, [1, 3])
    assert fields == {
        "num_hidden_layers": 2,
        "layer_types": ["full_attention", "sliding_attention"],
        "max_window_layers": 1,
    }
    config.mlp_only_layers = [0, 3]
    assert renumbered_fields(config, [1, 3])["mlp_only_layers"] == [1]
    config.decoder_sparse_step = 2
    with pytest.raises(UserError, match="decoder_sparse_step"):
        renumbered_fields(config, [1, 3])
    del config.decoder_sparse_step
    config.mystery_per_layer = [1, 2, 3, 4]
    with pytest.raises(UserError, match="mystery_per_layer"):
        renumbered_fields(config, [1, 3])


def test_search_finds_the_dead_block_from_a_bad_start(calib):
    from lmcompress.search.depth import search_drop_set

    model = tiny("llama")
    for p in get_blocks(model)[2].parameters():  # block 2 adds zero: dropping it changes nothing (KL 0)
        if p.dim() == 2:
            p.data.zero_()
    drop, info = search_drop_set(model, [0], calib[:4, :32], generations=3, offspring=6, progress=False)
    assert drop == [2]
    assert info["kl"] == pytest.approx(0.0, abs=1e-6) and info["start_kl"] > 1e-3
    x = ids()
    reference = logits(model, x)
    assert torch.equal(logits(model, x), reference)  # the search leaves the model as it was


def test_shrink_blocks_search_through_the_job(tiny_folder, tmp_path):
    out = tmp_path / "searched"
    config = DepthConfig("blocks", count=1, criterion="search", generations=2, offspring=2, fitness_windows=2)
    report = depth_prune_pretrained(tiny_folder("llama"), config, out, **JOB)
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["search"]["kl"] <= recipe["search"]["start_kl"]
    assert recipe["removed"]["blocks"] == report.removed["blocks"] and len(report.removed["blocks"]) == 1
    assert recipe["removed"]["ranking"] == recipe["search"]["start_drop"]
    with pytest.raises(UserError, match="whole blocks"):
        DepthConfig("sublayers", ffn=1, criterion="search")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_prefix_cached_drop_fitness_equals_the_full_forward(family, calib):
    from lmcompress.search.depth import DropFitness

    model = tiny(family)
    windows = calib[:3, :32]
    cached, full = DropFitness(model, windows), DropFitness(model, windows, prefix=False)
    cached.rebase([0, 1, 0, 0])  # one full forward per window
    assert cached.cache is not None and cached.cache.usable and cached.block_runs == 4 * 3
    later = [0, 1, 1, 0]  # equals the base before block 2: blocks 0 and 1 come from the cache
    assert cached(later, 3, capture=True) == pytest.approx(full(later, 3), rel=1e-5, abs=1e-7)
    assert cached.block_runs == 4 * 3 + 2 * 3 and cached.full_block_runs == 4 * 3
    cached.rebase(later)  # from the capture: no forward
    assert cached.block_runs == 4 * 3 + 2 * 3 and cached.base == later
    for levels in ([0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0], later):
        assert cached(levels, 3) == pytest.approx(full(levels, 3), rel=1e-5, abs=1e-7)
    runs = cached.block_runs
    cached([0, 1, 1, 1], 3)  # a repeat is memoized: nothing runs
    assert cached.block_runs == runs


def test_swap_scans_find_the_dead_block_without_generations(calib):
    from lmcompress.search.depth import search_drop_set

    model = tiny("llama")
    for p in get_blocks(model)[2].parameters():  # block 2 adds zero: dropping it changes nothing (KL 0)
        if p.dim() == 2:
            p.data.zero_()
    drop, info = search_drop_set(model, [0], calib[:4, :32], generations=0, swap_scans=3, progress=False)
    assert drop == [2] and info["kl"] == pytest.approx(0.0, abs=1e-6) and info["start_kl"] > 1e-3
    assert info["history"][0]["improved"] and not info["history"][-1]["improved"]  # stops when no swap helps
    slow, slow_info = search_drop_set(
        model, [0], calib[:4, :32], generations=0, swap_scans=3, progress=False, prefix=False
    )
    assert slow == drop and slow_info["kl"] == pytest.approx(info["kl"], abs=1e-6)


def test_shrink_blocks_cli_search_with_swap_scans(tiny_folder, tmp_path, capsys):
    out = tmp_path / "searched"
    code = run_cli(["shrink", "blocks", str(tiny_folder("llama")), "--count", "1", "--criterion", "search",
                    "--generations", "1", "--swap-scans", "2", "--calib-data", "bundled:wikitext2-valid",
                    "--nsamples", "2", "--seqlen", "32", "-q", "-o", str(out)])  # fmt: skip
    assert code == 0
    assert "swap scans + 1 generations" in capsys.readouterr().out
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["swap_scans"] == 2 and recipe["search"]["history"][0]["scan"]
    assert recipe["search"]["kl"] <= recipe["search"]["start_kl"]
