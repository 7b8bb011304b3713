"""Streaming jobs (``offload="disk"``): same tensors and recipe as in memory, resume after a kill, clear refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from lmcompress.checkpoint.load import load
from lmcompress.checkpoint.stream import SHARD_INDEX, DiskStream, WorkFolder
from lmcompress.errors import UserError
from lmcompress.jobs import prune_pretrained, quantize_pretrained, structured_prune_pretrained
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.prune import PruneConfig
from lmcompress.transforms.quantize import QuantConfig
from lmcompress.transforms.shrink import StructureConfig

LAYERS = 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    """Factory: a tiny LLaMA of LAYERS blocks saved in bfloat16 as several safetensors shards with an index."""
    cache: dict[bool, Path] = {}

    def make(tied: bool = False) -> Path:
        if tied not in cache:
            model = build_tiny_model(
                "llama", tokenizer.vocab_size, max_positions=256, num_hidden_layers=LAYERS, tie_word_embeddings=tied
            )
            folder = tmp_path_factory.mktemp("sharded") / "model"
            model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
            tokenizer.save_pretrained(folder)
            assert (folder / SHARD_INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2
            cache[tied] = folder
        return cache[tied]

    return make


def _recipe(folder: Path) -> dict:
    recipe = json.loads((folder / "lmcompress.json").read_text())
    return {k: v for k, v in recipe.items() if not k.endswith(("time_s", "timings_s"))}


def _same_model(a: Path, b: Path) -> None:
    sa, sb = load(a)[0].state_dict(), load(b)[0].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _recipe(a) == _recipe(b)


def _digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


JOBS = {
    "sparsegpt": (prune_pretrained, PruneConfig(method="sparsegpt", sparsity=0.5), {"save_format": "dense"}),
    "wanda-2:4-packed": (prune_pretrained, PruneConfig(method="wanda", pattern="2:4"), {"save_format": "packed"}),
    "wanda-owl": (prune_pretrained, PruneConfig(method="wanda", sparsity=0.6, allocation="owl"), {}),
    "magnitude": (prune_pretrained, PruneConfig(method="magnitude", sparsity=0.4), {}),
    "sparsegpt-w4": (prune_pretrained, PruneConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=32), {}),
    "gptq": (quantize_pretrained, QuantConfig(method="gptq", bits=4, group_size=32), {}),
    "rtn": (quantize_pretrained, QuantConfig(method="rtn", bits=3, group_size=-1, sym=False), {}),
}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_streamed_equals_in_memory(tmp_path, sharded, opts, name):
    job, config, extra = JOBS[name]
    source = sharded(tied=name == "sparsegpt-w4")
    before = _digest(source)
    job(source, config, tmp_path / "mem", offload="none", **extra, **opts)
    job(source, config, tmp_path / "disk", offload="disk", **extra, **opts)
    _same_model(tmp_path / "mem", tmp_path / "disk")
    assert _digest(source) == before  # the source shards are only read
    assert not WorkFolder.path_for(tmp_path / "disk").exists()  # the work folder became the output
    timings = json.loads((tmp_path / "disk" / "lmcompress.json").read_text())["timings_s"]
    assert {"shard I/O", "solves"} <= set(timings)  # the streamed job's phases, reading and writing apart
    packed = (tmp_path / "disk" / "model.packed.safetensors").is_file()
    assert packed == (tmp_path / "mem" / "model.packed.safetensors").is_file()
    if not packed:  # dense: one shard per block plus one for embeddings, norm and head, with an index
        index = json.loads((tmp_path / "disk" / SHARD_INDEX).read_text())
        assert len(set(index["weight_map"].values())) == LAYERS + 1


def test_one_block_in_memory_at_a_time(tmp_path, sharded, opts, monkeypatch):
    seen = []
    finish = DiskStream._finish

    def spy(self, i, before, hidden):
        loaded = [j for j, keys in enumerate(self.block_keys) if not self.model.get_parameter(keys[0]).is_meta]
        seen.append((i, loaded, self.model.get_input_embeddings().weight.is_meta))
        finish(self, i, before, hidden)

    monkeypatch.setattr(DiskStream, "_finish", spy)
    prune_pretrained(sharded(), PruneConfig(method="wanda"), tmp_path / "out", offload="disk", **opts)
    assert seen == [(i, [i], True) for i in range(LAYERS)]


@pytest.mark.parametrize("name", ["sparsegpt", "sparsegpt-w4", "magnitude"])
def test_resume_after_kill_gives_the_same_files(tmp_path, sharded, opts, monkeypatch, name):
    job, config, extra = JOBS[name]
    source = sharded()
    job(source, config, tmp_path / "whole", offload="disk", **extra, **opts)
    out = tmp_path / "resumed"
    commit = WorkFolder.commit
    kill_after = 1

    def killed(self, i, record, hidden):
        commit(self, i, record, hidden)
        if i == kill_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        job(source, config, out, offload="disk", **extra, **opts)
    monkeypatch.setattr(WorkFolder, "commit", commit)
    work = WorkFolder.path_for(out)
    assert not out.exists() and json.loads((work / "state.json").read_text())["done"] == kill_after + 1
    with pytest.raises(UserError, match="resume"):  # a leftover work folder is never silently reused
        job(source, config, out, offload="disk", **extra, **opts)

    done = []
    monkeypatch.setattr(WorkFolder, "commit", lambda self, i, r, h: (done.append(i), commit(self, i, r, h)))
    job(source, config, out, resume=True, **extra, **opts)  # resume implies streaming
    assert done == list(range(kill_after + 1, LAYERS))  # only the unfinished blocks were worked on
    assert not work.exists()
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir() if p.name != "lmcompress.json"}
    resumed = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "lmcompress.json"}
    assert whole == resumed
    assert _recipe(tmp_path / "whole") == _recipe(out)


def test_resume_refuses_other_settings(tmp_path, sharded, opts, monkeypatch):
    out = tmp_path / "out"
    commit = WorkFolder.commit

    def killed(self, i, record, hidden):
        commit(self, i, record, hidden)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_pretrained(sharded(), PruneConfig(method="wanda", sparsity=0.5), out, offload="disk", **opts)
    monkeypatch.setattr(WorkFolder, "commit", commit)
    with pytest.raises(UserError, match=r"other settings.*config"):
        prune_pretrained(sharded(), PruneConfig(method="wanda", sparsity=0.6), out, resume=True, **opts)
    # overwrite without resume starts over
    prune_pretrained(sharded(), PruneConfig(method="wanda", sparsity=0.6), out, overwrite=True, offload="disk", **opts)
    assert (out / SHARD_INDEX).is_file() and not WorkFolder.path_for(out).exists()


def test_too_big_for_memory(tmp_path, sharded, opts, monkeypatch):
    monkeypatch.setattr("lmcompress.streaming.available_memory", lambda: 10_000)
    with pytest.raises(UserError, match=r"does not fit in memory.*offload disk"):
        prune_pretrained(sharded(), PruneConfig(method="magnitude"), tmp_path / "none", offload="none", **opts)
    assert not (tmp_path / "none").exists()
    prune_pretrained(sharded(), PruneConfig(method="magnitude"), tmp_path / "auto", offload="auto", **opts)
    assert (tmp_path / "auto" / SHARD_INDEX).is_file()  # auto streamed it


def test_commands_that_cannot_stream_say_so(tmp_path, sharded, opts, capsys):
    with pytest.raises(UserError, match=r"shrink cannot stream.*offload none"):
        structured_prune_pretrained(
            sharded(), StructureConfig("ffn", 0.25, "magnitude"), tmp_path / "s", offload="disk", **opts
        )
    with pytest.raises(UserError, match=r"include_head.*offload none"):
        prune_pretrained(sharded(), PruneConfig(include_head=True), tmp_path / "h", offload="disk", **opts)
    with pytest.raises(UserError, match=r"include_head.*offload none"):
        quantize_pretrained(sharded(), QuantConfig("rtn", include_head=True), tmp_path / "q", offload="disk", **opts)
    assert run_cli(["shrink", "ffn", str(sharded()), "-o", str(tmp_path / "c"), "--offload", "disk", "-q"]) == 2
    assert "--offload none" in capsys.readouterr().err
    assert run_cli(["eval", str(sharded()), "--offload", "disk"]) == 2
    assert "--offload none" in capsys.readouterr().err
    assert not any(p.name.startswith((".c.", ".s.", ".h.", ".q.")) for p in tmp_path.iterdir())


def test_cli_prune_streams_and_resumes(tmp_path, sharded, opts, capsys):
    args = ["prune", str(sharded()), "--method", "sparsegpt", "--offload", "disk", "--calib-data", opts["calib_data"]]
    args += ["--nsamples", "4", "--seqlen", "32", "-q", "-o"]
    assert run_cli([*args, str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / SHARD_INDEX).is_file()
    assert run_cli([*args, str(tmp_path / "b"), "--resume"]) == 0  # nothing to resume: a fresh run
    _same_model(tmp_path / "a", tmp_path / "b")
    assert run_cli(["quantize", str(sharded()), "--method", "rtn", "--offload", "none", "--resume", "-o", "x"]) == 2
    assert "--resume" in capsys.readouterr().err
