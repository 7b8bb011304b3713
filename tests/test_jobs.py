"""The one job pipeline (``lmcompress.jobs``): options, placements, recipes and where the time went."""

from __future__ import annotations

import json

import pytest

from lmcompress.checkpoint.folder import json_text
from lmcompress.errors import UserError
from lmcompress.jobs import (
    drop_experts_pretrained,
    factorize_pretrained,
    prune_pretrained,
    quantize_pretrained,
    structured_prune_pretrained,
)
from lmcompress.transforms.experts import ExpertConfig
from lmcompress.transforms.factorize import FactorizeConfig
from lmcompress.transforms.prune import PruneConfig
from lmcompress.transforms.quantize import QuantConfig
from lmcompress.transforms.shrink import StructureConfig


def test_a_job_recipe_says_where_its_time_went(tmp_path, tiny_folder):
    out = tmp_path / "o"
    prune_pretrained(
        str(tiny_folder("llama")),
        PruneConfig(method="sparsegpt", sparsity=0.5),
        out,
        calib_data="bundled:wikitext2-valid",
        nsamples=4,
        seqlen=32,
        progress=False,
    )
    recipe = json.loads((out / "lmcompress.json").read_text())
    timings = recipe["timings_s"]
    assert {"load", "calibration text", "capture", "statistics", "solves", "block outputs"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert sum(timings.values()) <= recipe["wall_time_s"] + 0.01
    assert sum(timings.values()) >= 0.5 * recipe["wall_time_s"]  # the phases cover the job, not a corner of it


JOBS = {
    "prune": lambda src, out, **kw: prune_pretrained(src, PruneConfig("wanda", 0.5), out, **kw),
    "quantize": lambda src, out, **kw: quantize_pretrained(src, QuantConfig("rtn", 4, 32), out, **kw),
    "structured": lambda src, out, **kw: structured_prune_pretrained(src, StructureConfig("ffn", 0.25), out, **kw),
    "experts": lambda src, out, **kw: drop_experts_pretrained(src, ExpertConfig(keep=4), out, **kw),
    "factorize": lambda src, out, **kw: factorize_pretrained(src, FactorizeConfig("rank:4"), out, **kw),
}


@pytest.mark.parametrize("kind", sorted(JOBS))
def test_every_job_reports_transform_time_and_whole_job_time_the_same_way(kind, tiny_folder, tmp_path):
    source = tiny_folder("mixtral" if kind == "experts" else "llama")
    out = tmp_path / "out"
    report = JOBS[kind](source, out, calib_data="bundled:wikitext2-valid", nsamples=2, seqlen=32, progress=False)
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["kind"] == kind
    assert recipe[f"{kind}_time_s"] == report.wall_time_s  # the transformation alone
    assert 0 < report.wall_time_s < recipe["wall_time_s"]  # the whole job also loaded the model and the text
    assert {"load", "transform (rest)"} <= set(recipe["timings_s"])
    assert sum(recipe["timings_s"].values()) <= recipe["wall_time_s"] + 0.01
    said = json.loads(json_text(report.recipe_fields()))  # the report says what the recipe records
    said.pop("surgery", None)  # the recipe puts a resized source's records first
    assert said and {k: recipe[k] for k in said} == said


def test_job_options_check_themselves_and_are_the_clis_job_keys():
    from lmcompress.cli.options import JOB_KEYS
    from lmcompress.job_options import JobOptions, names

    assert set(JOB_KEYS) | {"progress"} == set(names())
    assert JobOptions(offload=" Disk ").offload == "disk"
    for bad in ({"offload": "tape"}, {"nsamples": 0}, {"seqlen": 0}, {"nsamples": True}):
        with pytest.raises(UserError) as caught:
            JobOptions(**bad)
        assert caught.value.params == tuple(bad)
    with pytest.raises(TypeError, match="nsample"):
        JobOptions.of({"nsample": 4})


def test_a_job_refuses_bad_options_before_writing_anything(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="nsamples"):
        prune_pretrained(tiny_folder("llama"), PruneConfig("magnitude", 0.5), tmp_path / "o", nsamples=0)
    assert list(tmp_path.iterdir()) == []


def test_placements_in_memory_shared_over_ranks_or_streamed(tiny_folder, monkeypatch):
    """One process: in memory or streamed; several ranks: shared, and streaming is refused before any work."""
    import lmcompress.jobs as jobs
    from lmcompress.calibration import distributed
    from lmcompress.job_options import JobOptions
    from lmcompress.streaming import Streamed

    source, config = str(tiny_folder("llama")), PruneConfig("wanda", 0.5)

    def placement(offload: str):
        return jobs.choose_placement("prune", source, config, JobOptions(offload=offload), "dense")

    assert isinstance(placement("disk"), Streamed) and type(placement("none")) is jobs.InMemory
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    assert type(placement("none")) is jobs.Distributed
    with pytest.raises(UserError, match=r"torch\.distributed"):
        placement("disk")
