"""Streamed (``offload="disk"``) pruning and quantization of mixture-of-experts checkpoints: the per-expert tensors
of the checkpoint (Mixtral ``block_sparse_moe.experts.E.w1/w3/w2``, Qwen-MoE ``mlp.experts.E.gate_proj/...``) or
already fused ones are read through transformers' conversion one block at a time, and the output equals the
in-memory job's (files, recipe, logits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import logits_of, random_ids
from safetensors import safe_open
from safetensors.torch import save_file

from lmcompress.checkpoint.load import load
from lmcompress.checkpoint.packed import read_packed
from lmcompress.checkpoint.stream import SHARD_INDEX, DiskStream, WorkFolder
from lmcompress.errors import UserError
from lmcompress.jobs import prune_pretrained, quantize_pretrained
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.prune import PruneConfig
from lmcompress.transforms.quantize import QuantConfig

PER_EXPERT = {  # expert E of block B's gate linear, as the checkpoints name it
    "mixtral": "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
    "qwen2_moe": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
}
JOBS = {
    "gptq-w4": (quantize_pretrained, QuantConfig(method="gptq", bits=4, group_size=32)),
    "sparsegpt-50": (prune_pretrained, PruneConfig(method="sparsegpt", sparsity=0.5)),
}


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory, tokenizer):
    """Factory: a tiny MoE saved by ``save_pretrained`` in bfloat16 over several shards (per-expert tensors, the
    experts of one block split across files)."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
            folder = tmp_path_factory.mktemp(f"moe-{family}") / "model"
            model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
            tokenizer.save_pretrained(folder)
            assert (folder / SHARD_INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2
            cache[family] = folder
        return cache[family]

    return make


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def _recipe(folder: Path) -> dict:
    recipe = json.loads((folder / "lmcompress.json").read_text())
    return {k: v for k, v in recipe.items() if not k.endswith(("time_s", "timings_s"))}


@pytest.mark.parametrize("name", sorted(JOBS))
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_streamed_moe_equals_in_memory(tmp_path, moe_source, opts, family, name):
    job, config = JOBS[name]
    source = moe_source(family)
    job(source, config, tmp_path / "mem", offload="none", **opts)
    job(source, config, tmp_path / "disk", offload="disk", **opts)
    mem, disk = _tensors(tmp_path / "mem"), _tensors(tmp_path / "disk")
    assert mem.keys() == disk.keys()
    for k in mem:
        assert torch.equal(mem[k], disk[k]), k
    recipe = _recipe(tmp_path / "disk")
    assert recipe == _recipe(tmp_path / "mem")
    assert sum(recipe["expert_tokens"]["model.layers.1.mlp.experts.gate_up_proj"]) == 2 * 4 * 32  # top-2, routed
    ids = random_ids(300)
    a, b = load(tmp_path / "mem")[0], load(tmp_path / "disk")[0]
    assert torch.equal(logits_of(a, ids), logits_of(b, ids))
    fused = load(source)[0].model.layers[1].mlp.experts.gate_up_proj
    if name == "gptq-w4":  # every routed expert quantized, stored packed under the fused names
        _, codes = read_packed(tmp_path / "disk")
        q = codes["model.layers.1.mlp.experts.gate_up_proj"]
        assert q.codes.shape == (fused.shape[0] * fused.shape[1], fused.shape[2])
    else:  # dense: written back per expert, as save_pretrained writes it, each expert at the target
        w = disk[PER_EXPERT[family].format(1, 5)]
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        assert "model.layers.1.mlp.experts.gate_up_proj" not in disk
        got = b.model.layers[1].mlp.experts.gate_up_proj
        assert (got == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        assert not torch.equal(got, fused.to(got.dtype))


def test_one_moe_block_in_memory_at_a_time(tmp_path, moe_source, opts, monkeypatch):
    seen = []
    finish = DiskStream._finish

    def spy(self, i, before, hidden):
        loaded = [j for j, keys in enumerate(self.block_keys) if any(not _is_meta(self.model, k) for k in keys)]
        seen.append((i, loaded, self.model.get_input_embeddings().weight.is_meta))
        finish(self, i, before, hidden)

    monkeypatch.setattr(DiskStream, "_finish", spy)
    quantize_pretrained(moe_source("mixtral"), JOBS["gptq-w4"][1], tmp_path / "out", offload="disk", **opts)
    assert seen == [(0, [0], True), (1, [1], True)]


def _is_meta(model, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    t = module._parameters.get(leaf, module._buffers.get(leaf))
    return t.is_meta


def test_fused_checkpoint_streams_too(tmp_path, moe_source, opts, tokenizer):
    """A checkpoint that already stores the fused 3-D experts under the model's names streams as well; the dense
    output keeps that layout and holds the same weights as the per-expert source's in-memory output."""
    source = moe_source("qwen2_moe")
    model, _ = load(source, dtype="bfloat16")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(fused / "model.safetensors"), {"format": "pt"})
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / f).is_file():
            (fused / f).write_bytes((source / f).read_bytes())
    assert "model.layers.0.mlp.experts.gate_up_proj" in _tensors(fused)
    job, config = JOBS["sparsegpt-50"]
    job(source, config, tmp_path / "mem", offload="none", **opts)
    job(fused, config, tmp_path / "disk", offload="disk", **opts)
    out = _tensors(tmp_path / "disk")
    assert "model.layers.0.mlp.experts.gate_up_proj" in out
    ids = random_ids(300)
    a, b = load(tmp_path / "mem")[0], load(tmp_path / "disk")[0]
    assert torch.equal(logits_of(a, ids), logits_of(b, ids))


EXPERT_FIELDS = ("expert_tokens", "experts_few_tokens")


def _killed_and_resumed(tmp_path: Path, source: Path, opts: dict, monkeypatch) -> tuple[Path, Path]:
    """A streamed GPTQ run, and the same run killed after block 0 and resumed."""
    job, config = JOBS["gptq-w4"]
    job(source, config, tmp_path / "whole", offload="disk", **opts)
    commit = WorkFolder.commit

    def killed(self, i, record, hidden):
        commit(self, i, record, hidden)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        job(source, config, tmp_path / "resumed", offload="disk", **opts)
    monkeypatch.setattr(WorkFolder, "commit", commit)
    job(source, config, tmp_path / "resumed", resume=True, **opts)
    return tmp_path / "whole", tmp_path / "resumed"


def test_resumed_moe_run_gives_the_same_files(tmp_path, moe_source, opts, monkeypatch):
    whole, resumed = _killed_and_resumed(tmp_path, moe_source("qwen2_moe"), opts, monkeypatch)
    files = {p.name: p.read_bytes() for p in whole.iterdir() if p.name != "lmcompress.json"}
    assert files == {p.name: p.read_bytes() for p in resumed.iterdir() if p.name != "lmcompress.json"}
    a, b = _recipe(whole), _recipe(resumed)
    assert {k: v for k, v in a.items() if k not in EXPERT_FIELDS} == {
        k: v for k, v in b.items() if k not in EXPERT_FIELDS
    }


def test_resumed_moe_run_keeps_the_routed_token_counts(tmp_path, moe_source, opts, monkeypatch):
    whole, resumed = _killed_and_resumed(tmp_path, moe_source("qwen2_moe"), opts, monkeypatch)
    a, b = _recipe(whole), _recipe(resumed)
    assert [a[k] for k in EXPERT_FIELDS] == [b[k] for k in EXPERT_FIELDS]


def test_experts_that_do_not_fit_the_config_are_refused_before_anything_is_written(tmp_path, moe_source, opts):
    source = moe_source("mixtral")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in source.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    extra = bad / "extra.safetensors"  # a ninth expert in block 0 where the config says 8
    w = _tensors(source)[PER_EXPERT["mixtral"].format(0, 0)]
    save_file({PER_EXPERT["mixtral"].format(0, 8): w}, str(extra), {"format": "pt"})
    index = json.loads((bad / SHARD_INDEX).read_text())
    index["weight_map"][PER_EXPERT["mixtral"].format(0, 8)] = extra.name
    (bad / SHARD_INDEX).write_text(json.dumps(index))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"gate_up_proj.*offload none"):
        prune_pretrained(bad, JOBS["sparsegpt-50"][1], out, offload="disk", **opts)
    assert not out.exists() and not WorkFolder.path_for(out).exists()
